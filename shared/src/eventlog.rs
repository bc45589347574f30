//! Storage layout of an ordered event log, shared by the control plane (the
//! authority) and the caches (its replicas): events keyed by big-endian
//! sequence number, contiguous from 1, and the revocation set derived by
//! replaying them, with the policy releases they carry.

use prost::Message;

use crate::proto as pb;
use crate::revocation::{Revocation, RevocationSet};
use crate::store::{Store, StoreError};

/// The key of event `seq`.
pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// A sequence number stored at `key` of `tree` (0 when absent).
pub fn read_seq(store: &dyn Store, tree: &str, key: &[u8]) -> Result<u64, StoreError> {
    match store.get(tree, key)? {
        Some(b) => Ok(u64::from_be_bytes(b.as_slice().try_into().map_err(
            |_| StoreError::Corrupt(format!("{tree}/{}", String::from_utf8_lossy(key))),
        )?)),
        None => Ok(0),
    }
}

pub fn decode(bytes: &[u8]) -> Result<pb::LatticeEvent, StoreError> {
    pb::LatticeEvent::decode(bytes).map_err(|e| StoreError::Corrupt(format!("event: {e}")))
}

/// What replaying a log yields. Nothing large is kept: policy releases (up
/// to a MiB each) are remembered by sequence number and read when needed
/// ([`read_policy`]); secret events go to the caller as they are met.
#[derive(Debug, Default)]
pub struct Replayed {
    pub revocations: RevocationSet,
    /// The sequence number of every policy release, in order (not verified
    /// here: whoever enforces a release verifies it).
    pub policies: Vec<u64>,
    /// The revocation chain at the head ([`crate::freshness`]).
    pub revocation_chain: crate::freshness::Link,
}

/// The policy release stored at `seq` of `tree`.
pub fn read_policy(
    store: &dyn Store,
    tree: &str,
    seq: u64,
) -> Result<pb::SignedPolicy, StoreError> {
    let bytes = store
        .get(tree, &seq_key(seq))?
        .ok_or_else(|| StoreError::Corrupt(format!("the policy release at {seq} is missing")))?;
    match decode(&bytes)?.body {
        Some(pb::lattice_event::Body::Policy(p)) => Ok(p),
        _ => Err(StoreError::Corrupt(format!(
            "event {seq} is not a policy release"
        ))),
    }
}

/// Replays the events of `tree`: they must run from 1 to exactly `head`
/// without a gap. Each secret event is handed to `on_secret` in order.
pub fn replay(
    store: &dyn Store,
    tree: &str,
    head: u64,
    mut on_secret: impl FnMut(u64, &pb::SecretEvent),
) -> Result<Replayed, StoreError> {
    let mut revocations = RevocationSet::default();
    let mut policies = Vec::new();
    let mut chain = crate::freshness::GENESIS;
    let mut next = 1u64;
    loop {
        let batch = store.scan_from(tree, &seq_key(next), 1024)?;
        if batch.is_empty() {
            break;
        }
        for (k, v) in batch {
            let ev = decode(&v)?;
            if k.as_slice() != seq_key(next) || ev.seq != next {
                return Err(StoreError::Corrupt(format!(
                    "stored events have a gap at {next}"
                )));
            }
            match ev.body {
                Some(pb::lattice_event::Body::Revocation(r)) => {
                    chain = crate::freshness::next_link(&chain, ev.seq, &r);
                    if let Ok(r) = Revocation::try_from(&r) {
                        revocations.apply(&r);
                    }
                }
                Some(pb::lattice_event::Body::Policy(_)) => policies.push(ev.seq),
                Some(pb::lattice_event::Body::Secret(e)) => on_secret(ev.seq, &e),
                None => {}
            }
            next += 1;
        }
    }
    if next - 1 != head {
        return Err(StoreError::Corrupt(format!(
            "stored events end at {} but the recorded sequence is {head}",
            next - 1
        )));
    }
    Ok(Replayed {
        revocations,
        policies,
        revocation_chain: chain,
    })
}
