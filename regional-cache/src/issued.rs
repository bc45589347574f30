//! The live tokens this cache issued, per agent, with the claims the agent
//! last reported: when the claims change, each token is decided again and
//! those the policy no longer allows are revoked through the control plane
//! (`SyncUp.RevokeIssued`, resent until the revocation comes back on the
//! event stream). Memory only and bounded: after a restart the cache has
//! no record of earlier tokens (they expire within their short TTL).

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use lattice_shared::id::SpiffeId;
use lattice_shared::limits::MAX_REVOKE_BATCH;
use lattice_shared::policy::AgentAction;
use lattice_shared::proto as pb;

use crate::call::AgentClaims;

/// Agents tracked at most, and tokens per agent (the oldest go first).
const MAX_AGENTS: u64 = 100_000;
const MAX_TOKENS_PER_AGENT: usize = 1024;
/// Revocations waiting to be sent at most.
const MAX_PENDING: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub jti: String,
    pub action: AgentAction,
    pub audience: String,
    pub scopes: Vec<String>,
    pub exp_unix: i64,
    pub depth: u32,
}

#[derive(Debug, Default)]
struct AgentIssued {
    claims: Option<AgentClaims>,
    tokens: VecDeque<IssuedToken>,
}

#[derive(Debug)]
pub struct Issued {
    agents: moka::sync::Cache<SpiffeId, Arc<Mutex<AgentIssued>>>,
    pending: Mutex<(BTreeSet<String>, String)>,
    pub(crate) changed: tokio::sync::Notify,
}

impl Issued {
    pub fn new(max_token_ttl: std::time::Duration) -> Self {
        Self {
            agents: moka::sync::Cache::builder()
                .max_capacity(MAX_AGENTS)
                .time_to_idle(max_token_ttl)
                .build(),
            pending: Mutex::new((BTreeSet::new(), String::new())),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn entry(&self, agent: &SpiffeId) -> Arc<Mutex<AgentIssued>> {
        self.agents.get_with(agent.clone(), Default::default)
    }

    /// Notes a token issued to `agent` (and the claims it came with, when
    /// none are known yet).
    pub fn record(&self, agent: &SpiffeId, claims: &AgentClaims, t: IssuedToken) {
        let e = self.entry(agent);
        let mut g = e.lock().unwrap_or_else(|p| p.into_inner());
        if g.claims.is_none() {
            g.claims = Some(claims.clone());
        }
        if g.tokens.len() >= MAX_TOKENS_PER_AGENT {
            g.tokens.pop_front();
        }
        g.tokens.push_back(t);
    }

    /// Replaces the agent's claims; returns its tokens still live at
    /// `now_unix` and whether the claims changed.
    pub fn update_claims(
        &self,
        agent: &SpiffeId,
        claims: &AgentClaims,
        now_unix: i64,
    ) -> (bool, Vec<IssuedToken>) {
        let e = self.entry(agent);
        let mut g = e.lock().unwrap_or_else(|p| p.into_inner());
        g.tokens.retain(|t| t.exp_unix > now_unix);
        let changed = g.claims.as_ref() != Some(claims);
        g.claims = Some(claims.clone());
        (changed, g.tokens.iter().cloned().collect())
    }

    /// Forgets tokens (they are being revoked).
    pub fn forget(&self, agent: &SpiffeId, jtis: &[String]) {
        let e = self.entry(agent);
        e.lock()
            .unwrap_or_else(|p| p.into_inner())
            .tokens
            .retain(|t| !jtis.contains(&t.jti));
    }

    /// Queues revocations for the control plane.
    pub fn request_revocation(&self, jtis: &[String], reason: &str) {
        {
            let mut g = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for j in jtis {
                if g.0.len() >= MAX_PENDING {
                    metrics::counter!("lattice_cache_revoke_requests_dropped_total").increment(1);
                    break;
                }
                g.0.insert(j.clone());
            }
            g.1 = reason.to_owned();
        }
        self.changed.notify_one();
    }

    /// What is still to be sent on this link: drops those `applied` says
    /// are revoked, and those in `sent` (already sent on this link; a new
    /// link starts with an empty set and sends them all again).
    pub fn pending(
        &self,
        applied: impl Fn(&str) -> bool,
        sent: &mut std::collections::HashSet<String>,
    ) -> Option<pb::RevokeIssued> {
        let mut g = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        g.0.retain(|j| !applied(j));
        sent.retain(|j| g.0.contains(j));
        metrics::gauge!("lattice_cache_revoke_requests_pending").set(g.0.len() as f64);
        let jtis: Vec<String> =
            g.0.iter()
                .filter(|j| !sent.contains(*j))
                .take(MAX_REVOKE_BATCH)
                .cloned()
                .collect();
        if jtis.is_empty() {
            return None;
        }
        sent.extend(jtis.iter().cloned());
        Some(pb::RevokeIssued {
            jtis,
            reason: g.1.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(jti: &str, exp: i64) -> IssuedToken {
        IssuedToken {
            jti: jti.into(),
            action: AgentAction::MintToken,
            audience: "a".into(),
            scopes: vec![],
            exp_unix: exp,
            depth: 0,
        }
    }

    #[test]
    fn claims_changes_and_live_tokens() {
        let i = Issued::new(std::time::Duration::from_secs(600));
        let a = SpiffeId::parse("spiffe://t/agent/eu/a").expect("id");
        let c1 = AgentClaims::new(None, "x".into());
        i.record(&a, &c1, tok("j1", 100));
        i.record(&a, &c1, tok("j2", 200));
        let (changed, live) = i.update_claims(&a, &c1, 150);
        assert!(!changed, "same claims");
        assert_eq!(live, vec![tok("j2", 200)], "expired tokens are dropped");
        let c2 = AgentClaims::new(None, String::new());
        assert!(i.update_claims(&a, &c2, 150).0, "different claims");
        i.forget(&a, &["j2".into()]);
        assert!(i.update_claims(&a, &c2, 150).1.is_empty());
    }

    #[test]
    fn pending_revocations_go_until_applied() {
        let i = Issued::new(std::time::Duration::from_secs(600));
        let mut sent = Default::default();
        assert!(i.pending(|_| false, &mut sent).is_none());
        i.request_revocation(&["j1".into(), "j2".into()], "posture");
        let p = i.pending(|_| false, &mut sent).expect("pending");
        assert_eq!(p.jtis, vec!["j1".to_string(), "j2".to_string()]);
        assert_eq!(p.reason, "posture");
        assert!(
            i.pending(|_| false, &mut sent).is_none(),
            "not sent twice on one link"
        );
        let mut new_link = Default::default();
        let p = i.pending(|j| j == "j1", &mut new_link).expect("one left");
        assert_eq!(p.jtis, vec!["j2".to_string()], "a new link sends again");
        assert!(i.pending(|_| true, &mut Default::default()).is_none());
    }
}
