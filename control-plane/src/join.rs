//! One-time join tokens: 256-bit random, shown once, stored only as a
//! SHA-256 hash, bound to one id (and so one region), short-lived. Redeeming
//! is an atomic compare-and-swap, so a token enrols at most one party even
//! when two race.

use std::time::Duration;

use base64::Engine;
use lattice_shared::clock::unix_secs;
use lattice_shared::id::{RegionId, Role, SpiffeId};
use lattice_shared::pki::sha256;
use lattice_shared::store::JsonStore as _;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{Error, State};

const T_JOIN: &str = "join_tokens";
const PREFIX: &str = "ljt_";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JoinTokenRecord {
    pub id: SpiffeId,
    pub created_at_unix: i64,
    pub expires_at_unix: i64,
    pub used_at_unix: Option<i64>,
}

/// A freshly created token: the secret is returned once and never stored.
pub struct NewJoinToken {
    pub token: Zeroizing<String>,
    pub record: JoinTokenRecord,
}

impl std::fmt::Debug for NewJoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewJoinToken")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// The stored key of a token: SHA-256 of its text.
pub fn token_hash(token: &str) -> [u8; 32] {
    sha256(token.as_bytes())
}

pub(crate) fn create(
    state: &State,
    id: &SpiffeId,
    ttl: Option<Duration>,
) -> Result<NewJoinToken, Error> {
    if id.trust_domain() != &state.td {
        return Err(Error::InvalidArgument(format!(
            "{id} is not in this trust domain ({})",
            state.td
        )));
    }
    if !matches!(id.role(), Role::Cache | Role::Agent) {
        return Err(Error::InvalidArgument(format!(
            "join tokens enrol caches and agents, not a {}",
            id.role()
        )));
    }
    let ttl_secs = ttl
        .map(|t| t.as_secs())
        .unwrap_or(state.cfg.join_token_default_ttl_secs);
    if ttl_secs == 0 || ttl_secs > state.cfg.join_token_max_ttl_secs {
        return Err(Error::InvalidArgument(format!(
            "ttl must be between 1s and {}s",
            state.cfg.join_token_max_ttl_secs
        )));
    }
    let mut secret = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(&mut *secret)
        .map_err(|_| Error::Corrupt("random number generator failed".into()))?;
    let token = Zeroizing::new(format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(*secret)
    ));
    let now = unix_secs(state.clock.now());
    let record = JoinTokenRecord {
        id: id.clone(),
        created_at_unix: now,
        expires_at_unix: now.saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX)),
        used_at_unix: None,
    };
    state.store.put_json(T_JOIN, &token_hash(&token), &record)?;
    metrics::counter!("lattice_cp_join_tokens_created_total").increment(1);
    tracing::info!(id = %id, expires_at = record.expires_at_unix, "join token created");
    Ok(NewJoinToken { token, record })
}

/// Who redeems a token and what they expect it to name.
pub(crate) struct Redemption<'a> {
    pub token_hash: [u8; 32],
    pub role: Role,
    /// The region of the cache that redeems an agent token.
    pub region: Option<&'a RegionId>,
    pub requested_id: Option<&'a SpiffeId>,
}

/// Checks every binding, then marks the token used atomically. Nothing is
/// consumed when a check fails.
pub(crate) fn redeem(state: &State, r: Redemption<'_>) -> Result<SpiffeId, Error> {
    let Some(old) = state.store.get(T_JOIN, &r.token_hash)? else {
        return Err(Error::Unauthenticated("unknown join token".into()));
    };
    let mut record: JoinTokenRecord =
        serde_json::from_slice(&old).map_err(|e| Error::Corrupt(e.to_string()))?;
    let now = unix_secs(state.clock.now());
    {
        let revoked = state.log.revocations();
        if revoked.is_join_token_revoked(&r.token_hash) {
            return Err(Error::Denied("join token has been revoked".into()));
        }
        if revoked.is_agent_revoked(&record.id) || revoked.is_cache_revoked(&record.id) {
            return Err(Error::Denied(format!("{} has been revoked", record.id)));
        }
    }
    if record.used_at_unix.is_some() {
        return Err(Error::Denied("join token has already been used".into()));
    }
    if now >= record.expires_at_unix {
        return Err(Error::Unauthenticated(
            "join token has expired; ask for a new one".into(),
        ));
    }
    if record.id.role() != r.role {
        return Err(Error::Denied(format!(
            "join token is for a {}, not a {}",
            record.id.role(),
            r.role
        )));
    }
    if let Some(region) = r.region
        && record.id.region() != Some(region)
    {
        return Err(Error::Denied(format!(
            "join token is bound to region {}; this cache serves region {region}",
            record.id.region().map(RegionId::as_str).unwrap_or("-")
        )));
    }
    if let Some(want) = r.requested_id
        && want != &record.id
    {
        return Err(Error::Denied(format!(
            "join token is bound to another id than {want}"
        )));
    }
    record.used_at_unix = Some(now);
    let new = serde_json::to_vec(&record).map_err(|e| Error::Corrupt(e.to_string()))?;
    if !state
        .store
        .compare_and_swap(T_JOIN, &r.token_hash, Some(&old), Some(&new))?
    {
        return Err(Error::Denied("join token has already been used".into()));
    }
    metrics::counter!("lattice_cp_join_tokens_redeemed_total").increment(1);
    tracing::info!(id = %record.id, "join token redeemed");
    Ok(record.id)
}

/// Gives a redeemed token back when what it was redeemed for failed
/// afterwards (a name another cache holds, say): the one-time token is not
/// burned by a refusal. Only a token marked used is changed.
pub(crate) fn unredeem(state: &State, token_hash: &[u8; 32]) -> Result<(), Error> {
    let Some(old) = state.store.get(T_JOIN, token_hash)? else {
        return Ok(());
    };
    let mut record: JoinTokenRecord =
        serde_json::from_slice(&old).map_err(|e| Error::Corrupt(e.to_string()))?;
    if record.used_at_unix.take().is_none() {
        return Ok(());
    }
    let new = serde_json::to_vec(&record).map_err(|e| Error::Corrupt(e.to_string()))?;
    if state
        .store
        .compare_and_swap(T_JOIN, token_hash, Some(&old), Some(&new))?
    {
        tracing::info!(id = %record.id, "join token given back: what it was redeemed for failed");
    }
    Ok(())
}

/// Tokens neither used nor expired.
pub(crate) fn outstanding(state: &State) -> Result<u64, Error> {
    let now = unix_secs(state.clock.now());
    let mut n = 0;
    for (_, v) in state.store.scan_prefix(T_JOIN, b"", 1_000_000)? {
        let r: JoinTokenRecord =
            serde_json::from_slice(&v).map_err(|e| Error::Corrupt(e.to_string()))?;
        if r.used_at_unix.is_none() && now < r.expires_at_unix {
            n += 1;
        }
    }
    Ok(n)
}
