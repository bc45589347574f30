//! End-to-end freshness for the followers of a cache (verifiers, agents):
//! the control plane signs checkpoints of its log, caches relay them, and a
//! follower counts itself fresh only from a checkpoint it verified and whose
//! revocations it holds. A cache can withhold checkpoints or a revocation,
//! but then its followers go stale; it cannot make them fresh.
//!
//! The **revocation chain** is a hash chain over the revocation events of
//! the log, in order: `h0` is 32 zero bytes and each revocation at sequence
//! `seq` makes `h = SHA-256(CHAIN_CONTEXT || h' || seq_be || encoded
//! Revocation)`. It depends only on the control plane's log, so every cache
//! relays the same chain and a follower keeps its own across failovers.
//!
//! A **checkpoint** states "at control-plane time `at_unix_ms` the head was
//! `head_seq`, and the chain over every revocation up to it is `chain`",
//! signed by the control plane's signing key (the one that signs policy
//! releases and audit tree heads, under a context of its own). Read first
//! the time, then the head: every revocation committed before `at_unix_ms`
//! is at or below `head_seq`.
//!
//! A follower that holds the chain up to `head_seq` equal to the
//! checkpoint's holds every revocation committed before `at_unix_ms`. It is
//! fresh as of its local monotonic `now − (wall_now − at_unix_ms)`: the
//! checkpoint's age is read on wall clocks, so a follower whose clock runs
//! behind the control plane's by `s` overestimates its freshness by `s`
//! (the bound becomes `L + s`); one ahead goes stale early.

use std::collections::VecDeque;
use std::time::Duration;

use prost::Message;

use crate::id::TrustDomain;
use crate::pki::CertInfo;
use crate::policy::sign::{PolicySigner, check_signature};
use crate::proto as pb;
use crate::revocation::RevocationSet;

/// Domain separation of the chain's hash.
pub const CHAIN_CONTEXT: &[u8] = b"lattice revocation chain v1\0";
/// Domain separation of a checkpoint's signature: never a policy release
/// or a tree head.
pub const CHECKPOINT_CONTEXT: &[u8] = b"lattice freshness checkpoint v1\0";
/// One link of the chain.
pub type Link = [u8; 32];
/// The chain before any revocation.
pub const GENESIS: Link = [0; 32];
/// Links a follower keeps to match checkpoints older than its newest
/// revocation (a checkpoint is at most a few seconds old, a burst of
/// revocations can be long).
pub const HISTORY: usize = 4096;

/// The link after `prev` for the revocation `r` at `seq`.
pub fn next_link(prev: &Link, seq: u64, r: &pb::Revocation) -> Link {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(CHAIN_CONTEXT);
    h.update(prev);
    h.update(&seq.to_be_bytes());
    h.update(&r.encode_to_vec());
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

/// Signs a checkpoint (control plane).
pub fn sign(
    signer: &PolicySigner,
    head_seq: u64,
    at_unix_ms: i64,
    chain: &Link,
) -> Result<pb::FreshnessCheckpoint, crate::policy::PolicyError> {
    let body = pb::CheckpointBody {
        head_seq,
        at_unix_ms,
        revocation_chain: chain.to_vec(),
    }
    .encode_to_vec();
    let signature = signer.sign_detached(CHECKPOINT_CONTEXT, &body)?;
    Ok(pb::FreshnessCheckpoint {
        body,
        signature,
        signer_cert: signer.cert_der().to_vec(),
    })
}

/// A checkpoint whose signature and signer were verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub head_seq: u64,
    pub at_unix_ms: i64,
    pub chain: Link,
    pub signer_serial: String,
}

/// Why a checkpoint did not make a follower fresh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unproven {
    #[error("invalid checkpoint: {0}")]
    Invalid(String),
    #[error("the checkpoint's signer is revoked: {0}")]
    RevokedSigner(String),
    /// The revocations held up to the checkpoint's head differ from the
    /// control plane's: one is missing (withheld, or still on its way).
    #[error("the revocations held do not match the checkpoint at seq {0}")]
    Mismatch(u64),
    /// Older than the links kept.
    #[error("the checkpoint at seq {0} is older than the revocations kept")]
    TooOld(u64),
}

impl Unproven {
    /// A metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            Unproven::Invalid(_) => "invalid",
            Unproven::RevokedSigner(_) => "revoked_signer",
            Unproven::Mismatch(_) => "mismatch",
            Unproven::TooOld(_) => "too_old",
        }
    }
}

/// Verifies a checkpoint's signature by the control plane of `td` under
/// `root_der`, that it was made while its signer's certificate was valid,
/// and that the signer is not in `revoked`.
pub fn verify(
    cp: &pb::FreshnessCheckpoint,
    root_der: &[u8],
    td: &TrustDomain,
    revoked: &RevocationSet,
) -> Result<Checkpoint, Unproven> {
    let invalid = |m: String| Unproven::Invalid(m);
    let signer: CertInfo = check_signature(
        CHECKPOINT_CONTEXT,
        &cp.body,
        &cp.signature,
        &cp.signer_cert,
        root_der,
        td,
    )
    .map_err(|e| invalid(e.to_string()))?;
    revoked
        .check_cert(&signer, None)
        .map_err(Unproven::RevokedSigner)?;
    let body = pb::CheckpointBody::decode(cp.body.as_slice())
        .map_err(|e| invalid(format!("body: {e}")))?;
    let chain: Link = body
        .revocation_chain
        .as_slice()
        .try_into()
        .map_err(|_| invalid("the chain is not 32 bytes".into()))?;
    let at = crate::clock::from_unix_secs(body.at_unix_ms.div_euclid(1000));
    if at < signer.not_before || at > signer.not_after {
        return Err(invalid(
            "made outside the validity of the signer certificate".into(),
        ));
    }
    Ok(Checkpoint {
        head_seq: body.head_seq,
        at_unix_ms: body.at_unix_ms,
        chain,
        signer_serial: signer.serial_hex,
    })
}

/// The chain over the revocations a follower applied, with the recent links
/// to match checkpoints that predate its newest revocations.
#[derive(Debug, Clone)]
pub struct Chain {
    /// (seq, link after it), oldest first, at most [`HISTORY`].
    links: VecDeque<(u64, Link)>,
    /// The last link dropped from `links` (`None`: nothing dropped, the
    /// chain is known from genesis).
    floor: Option<(u64, Link)>,
}

impl Default for Chain {
    fn default() -> Self {
        Self {
            links: VecDeque::with_capacity(64),
            floor: None,
        }
    }
}

impl Chain {
    /// The sequence of the newest revocation linked (0: none).
    pub fn last_seq(&self) -> u64 {
        self.links
            .back()
            .or(self.floor.as_ref())
            .map_or(0, |(s, _)| *s)
    }

    pub fn tip(&self) -> Link {
        self.links
            .back()
            .or(self.floor.as_ref())
            .map_or(GENESIS, |(_, l)| *l)
    }

    /// Links the revocation at `seq`; one at or below the newest linked is
    /// a repeat and ignored.
    pub fn push(&mut self, seq: u64, r: &pb::Revocation) {
        if seq <= self.last_seq() {
            return;
        }
        let link = next_link(&self.tip(), seq, r);
        if self.links.len() == HISTORY {
            self.floor = self.links.pop_front();
        }
        self.links.push_back((seq, link));
    }

    /// The chain over every revocation at or below `head` (`None`: older
    /// than the links kept).
    pub fn at(&self, head: u64) -> Option<Link> {
        if let Some((_, l)) = self.links.iter().rev().find(|(s, _)| *s <= head) {
            return Some(*l);
        }
        match self.floor {
            None => Some(GENESIS),
            Some((s, l)) if s <= head => Some(l),
            Some(_) => None,
        }
    }

    /// When `cp` proves this chain complete, the local monotonic time it
    /// makes the follower fresh as of (see the module text), given the
    /// local monotonic and wall clocks now.
    pub fn fresh_as_of(
        &self,
        cp: &Checkpoint,
        now_mono: Duration,
        now_unix_ms: i64,
    ) -> Result<Duration, Unproven> {
        match self.at(cp.head_seq) {
            None => return Err(Unproven::TooOld(cp.head_seq)),
            Some(l) if l != cp.chain => return Err(Unproven::Mismatch(cp.head_seq)),
            Some(_) => {}
        }
        let age = Duration::from_millis(u64::try_from(now_unix_ms - cp.at_unix_ms).unwrap_or(0));
        now_mono
            .checked_sub(age)
            .ok_or(Unproven::TooOld(cp.head_seq))
    }
}

/// What a follower proves of its own freshness: the chain over the
/// revocations it applied and the newest time a checkpoint proved it
/// complete.
#[derive(Debug, Clone, Default)]
pub struct Proof {
    chain: Chain,
    fresh_as_of: Option<Duration>,
}

impl Proof {
    /// Local monotonic time as of which nothing revoked is missing
    /// (`None`: never proven).
    pub fn fresh_as_of(&self) -> Option<Duration> {
        self.fresh_as_of
    }

    /// Links a revocation as received (the wire form: the chain hashes it).
    pub fn on_revocation(&mut self, seq: u64, r: &pb::Revocation) {
        self.chain.push(seq, r);
    }

    /// Verifies `cp` (signer not in `revoked`) and, when it proves the
    /// revocations held complete, moves freshness forward. Returns the time
    /// it proves freshness as of.
    pub fn on_checkpoint(
        &mut self,
        cp: &pb::FreshnessCheckpoint,
        bundle: &crate::pki::TrustBundle,
        revoked: &RevocationSet,
        now_mono: Duration,
        now_unix_ms: i64,
    ) -> Result<Duration, Unproven> {
        let cp = verify(cp, bundle.root_der(), bundle.trust_domain(), revoked)?;
        let at = self.chain.fresh_as_of(&cp, now_mono, now_unix_ms)?;
        if self.fresh_as_of.is_none_or(|f| at > f) {
            self.fresh_as_of = Some(at);
        }
        Ok(at)
    }
}

/// A root and a control-plane signer for tests.
#[cfg(test)]
pub(crate) fn test_signer(now: std::time::SystemTime) -> (crate::pki::TrustBundle, PolicySigner) {
    use crate::pki::{Authority, PrivateKey, Profile};
    let td = TrustDomain::new("t").expect("td");
    let day = Duration::from_secs(86_400);
    let root = Authority::new_root(&td, PrivateKey::generate_p256().expect("key"), now, day)
        .expect("root");
    let key = PrivateKey::generate_ed25519().expect("key");
    let id = crate::id::SpiffeId::parse("spiffe://t/cp/main").expect("id");
    let cert = root
        .issue(
            &key.csr_der().expect("csr"),
            &id,
            Profile::JwtSigning,
            now,
            day,
        )
        .expect("cert");
    let bundle = crate::pki::TrustBundle::new(td, root.cert_der().to_vec()).expect("bundle");
    (bundle, PolicySigner::new(key, cert))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revocation::{Revocation, Target};

    fn rev(n: u64) -> pb::Revocation {
        (&Revocation {
            target: Target::Jti(format!("j{n}")),
            reason: String::new(),
        })
            .into()
    }

    fn cp(head: u64, at: i64, chain: Link) -> Checkpoint {
        Checkpoint {
            head_seq: head,
            at_unix_ms: at,
            chain,
            signer_serial: String::new(),
        }
    }

    /// The authority's chain: every revocation of the log.
    fn authority(seqs: &[u64]) -> Vec<(u64, Link)> {
        let mut h = GENESIS;
        seqs.iter()
            .map(|&s| {
                h = next_link(&h, s, &rev(s));
                (s, h)
            })
            .collect()
    }

    #[test]
    fn a_follower_holding_every_revocation_matches_any_head() {
        let log = authority(&[2, 5, 9]);
        let mut c = Chain::default();
        for s in [2, 5, 9] {
            c.push(s, &rev(s));
        }
        c.push(5, &rev(5)); // a repeat on resume: ignored
        assert_eq!(c.at(1), Some(GENESIS));
        assert_eq!(c.at(4), Some(log[0].1));
        assert_eq!(c.at(8), Some(log[1].1));
        assert_eq!(c.at(100), Some(log[2].1));
        let now = Duration::from_secs(100);
        assert_eq!(
            c.fresh_as_of(&cp(12, 10_000, log[2].1), now, 10_400),
            Ok(Duration::from_millis(99_600))
        );
        // A checkpoint stamped ahead of our wall clock counts as made now.
        assert_eq!(
            c.fresh_as_of(&cp(12, 10_900, log[2].1), now, 10_400),
            Ok(now)
        );
    }

    #[test]
    fn a_withheld_revocation_matches_no_later_checkpoint() {
        let log = authority(&[2, 5, 9]);
        let mut c = Chain::default();
        c.push(2, &rev(2));
        c.push(9, &rev(9)); // 5 never arrived
        let now = Duration::from_secs(100);
        assert_eq!(c.fresh_as_of(&cp(4, 0, log[0].1), now, 0), Ok(now));
        for (head, link) in [(5, log[1].1), (9, log[2].1), (20, log[2].1)] {
            assert_eq!(
                c.fresh_as_of(&cp(head, 0, link), now, 0),
                Err(Unproven::Mismatch(head))
            );
        }
    }

    #[test]
    fn only_a_signed_checkpoint_of_this_root_proves_freshness() {
        let wall = std::time::SystemTime::now();
        let ms = crate::clock::unix_millis(wall);
        let (bundle, signer) = test_signer(wall);
        let (other, _) = test_signer(wall);
        let log = authority(&[3]);
        let mut p = Proof::default();
        p.on_revocation(3, &rev(3));
        let now = Duration::from_secs(50);
        let none = RevocationSet::default();
        let good = sign(&signer, 7, ms, &log[0].1).expect("sign");
        assert!(
            matches!(
                p.on_checkpoint(&good, &other, &none, now, ms),
                Err(Unproven::Invalid(_))
            ),
            "another root's signer proves nothing"
        );
        let mut forged = good.clone();
        forged.body = pb::CheckpointBody {
            head_seq: 9,
            at_unix_ms: ms + 5_000,
            revocation_chain: log[0].1.to_vec(),
        }
        .encode_to_vec();
        assert!(matches!(
            p.on_checkpoint(&forged, &bundle, &none, now, ms + 5_000),
            Err(Unproven::Invalid(_))
        ));
        let old = sign(&signer, 7, 1_000, &log[0].1).expect("sign");
        assert!(
            matches!(
                p.on_checkpoint(&old, &bundle, &none, now, ms),
                Err(Unproven::Invalid(_))
            ),
            "made before its signer was certified"
        );
        assert_eq!(p.fresh_as_of(), None);
        assert_eq!(
            p.on_checkpoint(&good, &bundle, &none, now, ms + 500),
            Ok(now - Duration::from_millis(500))
        );
        // A revoked signer's checkpoints prove nothing any more.
        let info = crate::pki::inspect(signer.cert_der()).expect("cert");
        let mut revoked = RevocationSet::default();
        revoked.apply(&Revocation {
            target: Target::CertSerial(info.serial_hex),
            reason: String::new(),
        });
        assert!(matches!(
            p.on_checkpoint(&good, &bundle, &revoked, now, ms),
            Err(Unproven::RevokedSigner(_))
        ));
    }

    #[test]
    fn history_is_bounded_and_older_heads_are_unprovable() {
        let mut c = Chain::default();
        for s in 1..=(HISTORY as u64 + 10) {
            c.push(s, &rev(s));
        }
        let log = authority(&(1..=(HISTORY as u64 + 10)).collect::<Vec<_>>());
        assert_eq!(c.at(10), Some(log[9].1), "the floor still answers");
        assert_eq!(c.at(9), None);
        assert_eq!(c.tip(), log.last().expect("links").1);
    }
}
