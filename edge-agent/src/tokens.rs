//! The tokens the agent holds for its local processes, in one [`Tokens`]
//! store behind one lock (held tokens, the newest per key, the kept keys,
//! those loaded from the cache file and the file's key), and the agent's
//! token operations: mint, delegate, keep fresh, drop.
//!
//! The lock is a plain mutex and is never held across an `.await`: each
//! operation takes it, reads or changes the store, and lets go before it
//! talks to the cache or announces an event.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use lattice_shared::proto as pb;
use serde::{Deserialize, Serialize};

use crate::{Agent, AgentEvent, Error, token_cache};

/// Tokens held in memory at most.
pub const MAX_HELD: usize = 4096;

/// What a token is for: the key of the agent's token cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenKey {
    pub audience: String,
    /// Sorted, without repeats.
    pub scopes: Vec<String>,
    pub ttl_secs: u64,
}

impl TokenKey {
    pub fn new(audience: &str, scopes: &[String], ttl_secs: u64) -> Self {
        let mut scopes = scopes.to_vec();
        scopes.sort_unstable();
        scopes.dedup();
        Self {
            audience: audience.to_owned(),
            scopes,
            ttl_secs,
        }
    }
}

/// A token as served to a local process.
#[derive(Clone)]
pub struct ServedToken {
    pub token: zeroize::Zeroizing<String>,
    pub jti: String,
    pub audience: String,
    pub iat_unix: i64,
    pub expires_at_unix: i64,
    pub delegation_depth: u32,
}

impl std::fmt::Debug for ServedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedToken")
            .field("jti", &self.jti)
            .field("audience", &self.audience)
            .field("expires_at_unix", &self.expires_at_unix)
            .finish_non_exhaustive()
    }
}

/// A token the agent has minted or had delegated, kept for its local
/// processes (memory only; zeroized when dropped).
pub(crate) struct HeldToken {
    pub(crate) token: zeroize::Zeroizing<String>,
    pub(crate) audience: String,
    pub(crate) iat_unix: i64,
    pub(crate) exp_unix: i64,
    /// The tokens it was delegated from (cascade).
    pub(crate) parent_jtis: Vec<String>,
    pub(crate) depth: u32,
}

impl HeldToken {
    fn served(&self, jti: &str) -> ServedToken {
        ServedToken {
            token: self.token.clone(),
            jti: jti.to_owned(),
            audience: self.audience.clone(),
            iat_unix: self.iat_unix,
            expires_at_unix: self.exp_unix,
            delegation_depth: self.depth,
        }
    }
}

impl std::fmt::Debug for HeldToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldToken")
            .field("audience", &self.audience)
            .field("iat_unix", &self.iat_unix)
            .field("exp_unix", &self.exp_unix)
            .finish_non_exhaustive()
    }
}

/// A token read from the cache file: jti, token, and the key it was the
/// newest for.
pub(crate) type Loaded = (String, HeldToken, Option<TokenKey>);

/// The agent's token store.
#[derive(Debug, Default)]
pub(crate) struct Tokens {
    /// Tokens handed out and not known revoked: jti → token.
    held: HashMap<String, HeldToken>,
    /// The newest token minted for each key, by jti.
    fresh: HashMap<TokenKey, String>,
    /// Keys the runtime keeps fresh, with how many watchers want each.
    kept: HashMap<TokenKey, usize>,
    /// Seals the token cache file (when `token_cache` is on).
    pub(crate) cache_key: Option<token_cache::CacheKey>,
    /// Tokens read from the cache file, served once the revocation
    /// backlog has been replayed (see [`Tokens::promote_loaded`]).
    loaded: Vec<Loaded>,
}

impl Tokens {
    pub(crate) fn new(cache_key: Option<token_cache::CacheKey>, loaded: Vec<Loaded>) -> Self {
        Self {
            cache_key,
            loaded,
            ..Self::default()
        }
    }

    /// Keeps a token: expired ones go first, and the oldest when the store
    /// holds [`MAX_HELD`] already.
    fn hold(&mut self, jti: String, t: HeldToken, now: i64) {
        self.held.retain(|_, h| h.exp_unix > now);
        if self.held.len() >= MAX_HELD
            && let Some(oldest) = self
                .held
                .iter()
                .min_by_key(|(_, h)| h.iat_unix)
                .map(|(j, _)| j.clone())
        {
            self.held.remove(&oldest);
        }
        self.held.insert(jti, t);
    }

    /// The newest token for `key` if it is held and before half-life.
    fn fresh(&self, key: &TokenKey, now: i64) -> Option<ServedToken> {
        let jti = self.fresh.get(key)?;
        let h = self.held.get(jti)?;
        (now < h.iat_unix + (h.exp_unix - h.iat_unix) / 2).then(|| h.served(jti))
    }

    /// Drops the tokens `gone` selects (held or loaded); returns the jtis
    /// of the held ones.
    fn drop_where(&mut self, gone: impl Fn(&str, &HeldToken) -> bool) -> Vec<String> {
        self.loaded.retain(|(j, h, _)| !gone(j, h));
        let ids: Vec<String> = self
            .held
            .iter()
            .filter(|(j, h)| gone(j, h))
            .map(|(j, _)| j.clone())
            .collect();
        for j in &ids {
            self.held.remove(j);
        }
        ids
    }

    /// Serves the loaded tokens; returns how many.
    pub(crate) fn promote_loaded(&mut self) -> usize {
        let loaded = std::mem::take(&mut self.loaded);
        let n = loaded.len();
        for (jti, h, key) in loaded {
            if let Some(k) = key {
                self.fresh.insert(k, jti.clone());
            }
            self.held.insert(jti, h);
        }
        n
    }

    /// Every token, loaded ones included.
    pub(crate) fn clear(&mut self) {
        self.loaded.clear();
        self.clear_held();
    }

    fn clear_held(&mut self) {
        self.held.clear();
        self.fresh.clear();
    }

    /// The tokens still valid at `now`, as written to the cache file.
    pub(crate) fn entries(&self, now: i64) -> Vec<token_cache::Entry> {
        let fresh: HashMap<&str, &TokenKey> =
            self.fresh.iter().map(|(k, j)| (j.as_str(), k)).collect();
        let entry = |jti: &str, h: &HeldToken, fresh_for: Option<TokenKey>| token_cache::Entry {
            jti: jti.to_owned(),
            token: h.token.as_str().to_owned(),
            audience: h.audience.clone(),
            iat_unix: h.iat_unix,
            exp_unix: h.exp_unix,
            parent_jtis: h.parent_jtis.clone(),
            depth: h.depth,
            fresh_for,
        };
        let mut entries: Vec<token_cache::Entry> = self
            .held
            .iter()
            .filter(|(_, h)| h.exp_unix > now)
            .map(|(j, h)| entry(j, h, fresh.get(j.as_str()).map(|k| (*k).clone())))
            .collect();
        entries.extend(
            self.loaded
                .iter()
                .filter(|(_, h, _)| h.exp_unix > now)
                .map(|(j, h, k)| entry(j, h, k.clone())),
        );
        entries
    }
}

impl Agent {
    /// The token store, locked. Never held across an `.await`.
    pub(crate) fn tokens(&self) -> MutexGuard<'_, Tokens> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn mint(
        &self,
        audience: &str,
        scopes: &[String],
        ttl: Option<Duration>,
    ) -> Result<pb::MintTokenResponse, Error> {
        if self.is_revoked() {
            return Err(Error::Revoked);
        }
        let req = pb::MintTokenRequest {
            audience: audience.to_owned(),
            scopes: scopes.to_vec(),
            ttl_secs: ttl.map(|t| t.as_secs()).unwrap_or(0),
            claims: Some(self.claims()),
        };
        let resp = self
            .call(req, |mut c, r| async move { c.mint_token(r).await })
            .await?;
        let now = self.clock.now_unix();
        let held = HeldToken {
            token: zeroize::Zeroizing::new(resp.token.clone()),
            audience: audience.to_owned(),
            iat_unix: now,
            exp_unix: resp.expires_at_unix,
            parent_jtis: Vec::new(),
            depth: 0,
        };
        self.tokens().hold(resp.jti.clone(), held, now);
        Ok(resp)
    }

    /// A token for `key`: the newest one while more than half of its life
    /// is left, else a fresh one.
    pub async fn token_for(&self, key: &TokenKey) -> Result<ServedToken, Error> {
        if let Some(t) = self.fresh_token(key) {
            return Ok(t);
        }
        let ttl = (key.ttl_secs > 0).then(|| Duration::from_secs(key.ttl_secs));
        let resp = self.mint(&key.audience, &key.scopes, ttl).await?;
        let mut tokens = self.tokens();
        tokens.fresh.insert(key.clone(), resp.jti.clone());
        tokens
            .held
            .get(&resp.jti)
            .map(|h| h.served(&resp.jti))
            .ok_or(Error::Revoked)
    }

    /// The newest token for `key` if it is held and before half-life.
    fn fresh_token(&self, key: &TokenKey) -> Option<ServedToken> {
        let now = self.clock.now_unix();
        self.tokens().fresh(key, now)
    }

    /// Keeps a token for `key` fresh while the returned guard lives: the
    /// runtime renews it at half-life and announces it with
    /// [`AgentEvent::TokenRenewed`].
    pub fn keep(self: &Arc<Self>, key: TokenKey) -> KeepGuard {
        *self.tokens().kept.entry(key.clone()).or_insert(0) += 1;
        KeepGuard {
            agent: self.clone(),
            key,
        }
    }

    /// Renews every kept token that is past half-life or gone; returns how
    /// many were renewed.
    pub async fn refresh_kept(&self) -> Result<usize, Error> {
        let keys: Vec<TokenKey> = self.tokens().kept.keys().cloned().collect();
        let mut n = 0;
        let mut first_err = None;
        // Each key on its own: one the policy now denies does not hold up
        // the others.
        for key in keys {
            if self.fresh_token(&key).is_some() {
                continue;
            }
            match self.token_for(&key).await {
                Ok(_) => {
                    self.emit(AgentEvent::TokenRenewed(key));
                    n += 1;
                }
                Err(Error::Revoked) => return Err(Error::Revoked),
                Err(e) => {
                    tracing::warn!(audience = %key.audience, error = %e, "renewing a kept token failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if n == 0 => Err(e),
            _ => Ok(n),
        }
    }

    /// A token delegated to the sub-agent `actor` from `subject_token`,
    /// which must be a token this agent holds (RFC 8693 at the cache).
    pub async fn delegate(
        &self,
        subject_token: &str,
        actor: &str,
        scopes: &[String],
        ttl: Option<Duration>,
    ) -> Result<ServedToken, Error> {
        if self.is_revoked() {
            return Err(Error::Revoked);
        }
        let parent = self
            .tokens()
            .held
            .iter()
            .find(|(_, h)| h.token.as_bytes() == subject_token.as_bytes())
            .map(|(jti, h)| (jti.clone(), h.parent_jtis.clone(), h.audience.clone()));
        let Some((parent_jti, mut parent_jtis, audience)) = parent else {
            return Err(Error::Refused {
                code: tonic::Code::PermissionDenied,
                message: NOT_HELD.into(),
            });
        };
        let req = pb::ExchangeTokenRequest {
            subject_token: subject_token.to_owned(),
            actor: actor.to_owned(),
            scopes: scopes.to_vec(),
            ttl_secs: ttl.map(|t| t.as_secs()).unwrap_or(0),
            claims: Some(self.claims()),
        };
        let resp = self
            .call(req, |mut c, r| async move { c.exchange_token(r).await })
            .await?;
        parent_jtis.push(parent_jti);
        let now = self.clock.now_unix();
        let held = HeldToken {
            token: zeroize::Zeroizing::new(resp.token),
            audience,
            iat_unix: now,
            exp_unix: resp.expires_at_unix,
            parent_jtis,
            depth: resp.depth,
        };
        let served = held.served(&resp.jti);
        self.tokens().hold(resp.jti, held, now);
        Ok(served)
    }

    /// The audience of a token this agent holds, if it holds it.
    pub fn held_audience(&self, token: &str) -> Option<String> {
        self.tokens()
            .held
            .values()
            .find(|h| h.token.as_bytes() == token.as_bytes())
            .map(|h| h.audience.clone())
    }

    /// The jtis of tokens the agent holds (not known to be revoked).
    pub fn held_jtis(&self) -> Vec<String> {
        self.tokens().held.keys().cloned().collect()
    }

    /// Drops the held tokens `gone` selects and announces each.
    pub(crate) fn drop_tokens(&self, gone: impl Fn(&str, &HeldToken) -> bool) {
        let dropped = self.tokens().drop_where(gone);
        for jti in dropped {
            self.emit(AgentEvent::TokenRevoked { jti });
        }
    }

    /// Drops every token held in memory (at shutdown); the stored identity
    /// stays.
    pub fn drop_all_tokens(&self) {
        self.tokens().clear_held();
    }
}

/// Why a subject token is refused for delegation.
pub(crate) const NOT_HELD: &str =
    "the subject token is not one this agent holds (revoked, expired, or never served here)";

/// Keeps a token fresh while it lives (see [`Agent::keep`]).
#[derive(Debug)]
pub struct KeepGuard {
    agent: Arc<Agent>,
    key: TokenKey,
}

impl Drop for KeepGuard {
    fn drop(&mut self) {
        let mut tokens = self.agent.tokens();
        if let Some(n) = tokens.kept.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                tokens.kept.remove(&self.key);
            }
        }
    }
}
