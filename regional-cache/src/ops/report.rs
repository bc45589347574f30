//! What agents report: events their proxy recorded (into this cache's audit
//! trail, under a per-agent quota) and changes of their claims, after which
//! each live token issued to them is decided again and those the policy no
//! longer allows are revoked through the control plane.

use std::sync::Arc;

use lattice_shared::clock::unix_secs;
use lattice_shared::id::SpiffeId;

use crate::call::{AgentCall, AgentClaims, Decision};
use crate::outbox::Ticket;
use crate::{AuditEvent, Error, State};

/// Reported events an agent may send per window.
const REPORT_QUOTA: usize = 2000;
const REPORT_WINDOW_SECS: u64 = 10;

/// An event an agent's proxy recorded, bounded and of a known kind.
#[derive(Debug)]
pub(crate) struct Reported {
    /// `proxy_use` or `proxy_refused`.
    pub kind: String,
    pub resource: String,
    pub detail: String,
    pub fingerprint: String,
    pub local_caller: String,
    pub request_id: String,
    pub at_unix_ms: i64,
}

/// Records the events `agent` reported. Returns how many were accepted and
/// the last one's ticket (the agent forgets what is acknowledged).
pub(crate) fn report_audit(
    state: &State,
    agent: &SpiffeId,
    events: Vec<Reported>,
) -> Result<(usize, Option<Ticket>), Error> {
    let n = events.len();
    // At most REPORT_QUOTA events per agent per REPORT_WINDOW: an agent
    // cannot flood the outbox its cache's own records go through.
    {
        let window = state.clock.monotonic().as_secs() / REPORT_WINDOW_SECS;
        let slot = state.report_quota.get_with(agent.clone(), || {
            Arc::new(std::sync::Mutex::new((window, 0)))
        });
        let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 != window {
            *g = (window, 0);
        }
        if g.1 + n > REPORT_QUOTA {
            metrics::counter!("lattice_cache_reported_events_refused_total").increment(n as u64);
            return Err(Error::Exhausted(format!(
                "at most {REPORT_QUOTA} reported events per {REPORT_WINDOW_SECS} s per agent; retry later"
            )));
        }
        g.1 += n;
    }
    let received = state.clock.now_unix_ms();
    let mut last = None;
    let mut dropped = 0usize;
    for e in events {
        let ticket = state.audit(AuditEvent::Reported {
            cache: state.id.clone(),
            agent: agent.clone(),
            kind: e.kind,
            resource: e.resource,
            detail: e.detail,
            fingerprint: e.fingerprint,
            local_caller: e.local_caller,
            request_id: e.request_id,
            at_unix_ms: e.at_unix_ms,
            received_at_unix_ms: received,
        });
        match ticket {
            Some(t) => last = Some(t),
            None => dropped += 1,
        }
    }
    if dropped > 0 {
        // The agent keeps what is not acknowledged and sends it again: an
        // event recorded twice rather than one lost.
        return Err(Error::Refused(crate::Refused::AuditUnavailable(format!(
            "audit unavailable: {dropped} of {n} reported events could not be recorded"
        ))));
    }
    metrics::counter!("lattice_cache_reported_events_total").increment(n as u64);
    Ok((n, last))
}

/// The agent's claims changed (or not): re-decides its live tokens.
/// Returns the jtis whose revocation was requested and the deciding
/// policy version.
pub(crate) fn report_claims(
    call: AgentCall<'_>,
    claims: AgentClaims,
) -> Result<(Vec<String>, u64), Error> {
    call.serve()?;
    let state = call.state;
    let now = unix_secs(state.clock.now());
    let (changed, live) = state.issued.update_claims(&call.agent, &claims, now);
    let mut revoked = Vec::new();
    let mut version = state.policy.version();
    if changed {
        for t in &live {
            let outcome = call.decide(&Decision {
                action: t.action,
                resource: &t.audience,
                ttl_secs: u64::try_from(t.exp_unix - now).unwrap_or(0),
                scopes: &t.scopes,
                claims: &claims,
                delegation_depth: t.depth,
            })?;
            version = outcome.version;
            if !outcome.allowed {
                revoked.push(t.jti.clone());
            }
        }
    }
    if !revoked.is_empty() {
        let agent = &call.agent;
        let reason =
            format!("{agent}: claims changed; policy v{version} no longer allows these tokens");
        state.issued.forget(agent, &revoked);
        state.issued.request_revocation(&revoked, &reason);
        metrics::counter!("lattice_cache_posture_revocations_total")
            .increment(revoked.len() as u64);
        tracing::warn!(agent_id = %agent, tokens = revoked.len(), policy_version = version, "claims changed: revoking tokens the policy no longer allows");
        let _ = call.finish(call.refusal_record(
            format!(
                "claims changed: {} live token(s) no longer allowed, revocation requested",
                revoked.len()
            ),
            state.policy.version(),
        ));
    }
    Ok((revoked, version))
}
