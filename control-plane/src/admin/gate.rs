//! The two-person-rule engine: who is calling (`caller`), the Cedar admin
//! request for a call, and the three gates — `gate_read` (allowed or
//! denied), `may_ever` (a cheap refusal before expensive preparation) and
//! `gate` (allowed, parked for a second admin, or denied). Every decision is
//! written to the admin trail before the caller learns it.

use std::net::IpAddr;

use lattice_shared::clock::unix_secs;
use lattice_shared::id::{Role, SpiffeId};
use lattice_shared::net::peer_addr;
use lattice_shared::policy::{
    AdminAction, AdminAttributes, AdminRequest, Approval, hour_and_weekday,
};
use prost::Message;
use tonic::Request;

use crate::Error;
use crate::admin_trail;
use crate::api::{Service, blocking, require_role};
use crate::approval::{self, NewPending};
use crate::policy::with_any_approval;

pub(crate) const MAX_MESSAGE_LEN: usize = 1024;

/// The admin making a call (or the one whose approved request runs).
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub id: SpiffeId,
    pub attrs: AdminAttributes,
    pub ip: IpAddr,
    /// The certificate the call was made with (checked again at approval).
    pub cert: lattice_shared::pki::CertInfo,
}

/// How a call was allowed.
#[derive(Debug, Clone)]
pub(crate) struct Allowed {
    pub approved_by: Option<SpiffeId>,
    /// For an approved policy change: the version it was asked against.
    pub base_version: Option<u64>,
}

pub(crate) fn region_of(id: &SpiffeId) -> String {
    id.region().map(|r| r.to_string()).unwrap_or_default()
}

pub(crate) fn check_message(m: &str) -> Result<(), Error> {
    if m.len() > MAX_MESSAGE_LEN {
        return Err(Error::InvalidArgument(format!(
            "message is longer than {MAX_MESSAGE_LEN} bytes"
        )));
    }
    Ok(())
}

impl Service {
    /// Writes an admin trail record durably.
    pub(crate) async fn trail(&self, r: admin_trail::AdminRecord) -> Result<(), Error> {
        let state = self.state.clone();
        blocking(move || admin_trail::record(&state, &r)).await
    }

    /// The trail record of a decision about `action` by `c` (no approver,
    /// no request id; callers add them).
    pub(crate) fn trail_record(
        &self,
        c: &Caller,
        action: AdminAction,
        outcome: admin_trail::Outcome,
        decided: &lattice_shared::policy::Outcome,
        summary: &str,
    ) -> admin_trail::AdminRecord {
        admin_trail::AdminRecord {
            at_unix_ms: self.state.clock.now_unix_ms(),
            action: action.name().to_string(),
            admin: c.id.to_string(),
            outcome,
            approved_by: None,
            request_id: None,
            policy_version: decided.version,
            policies: decided.policies.clone(),
            summary: summary.to_string(),
        }
    }

    pub(crate) fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Error> {
        let peer = require_role(&self.state, req, Role::Admin)?;
        let attrs = AdminAttributes::of_cert(&peer.cert)
            .map_err(|e| Error::Denied(format!("admin certificate of {}: {e}", peer.id)))?;
        Ok(Caller {
            id: peer.id.clone(),
            cert: peer.cert.clone(),
            attrs,
            ip: peer_addr(req)
                .map(|a| a.ip())
                .unwrap_or(IpAddr::from([0, 0, 0, 0])),
        })
    }

    pub(crate) fn admin_request(
        &self,
        c: &Caller,
        action: AdminAction,
        target_region: &str,
        resource: &str,
        approvals: Vec<Approval>,
    ) -> AdminRequest {
        let (hour_utc, weekday) = hour_and_weekday(self.state.clock.now());
        AdminRequest {
            principal: c.id.clone(),
            roles: c.attrs.roles.clone(),
            regions: c.attrs.regions.clone(),
            action,
            resource: resource.to_string(),
            target_region: target_region.to_string(),
            source_ip: c.ip,
            approvals,
            hour_utc,
            weekday,
            grant: Default::default(),
        }
    }

    /// A read: allowed outright or denied.
    pub(crate) async fn gate_read(&self, c: &Caller, action: AdminAction) -> Result<(), Error> {
        let engine = self.state.policy.current();
        let outcome = engine.decide_admin(&self.admin_request(c, action, "", "", vec![]));
        if outcome.allowed {
            return Ok(());
        }
        tracing::warn!(admin = %c.id, action = action.name(), policy_version = outcome.version, "admin action denied");
        Err(self.record_denial(c, action, &outcome, "").await)
    }

    /// Writes a denial to the admin trail (on the blocking pool: the fsync
    /// must not stall the runtime) and returns the refusal the caller sees.
    /// A principal past its budget of denials is refused without a trail
    /// write (`RESOURCE_EXHAUSTED`), so that a certificate with no rights
    /// cannot turn denials into an fsync flood; the skipped ones are
    /// counted and the next recorded denial says how many.
    async fn record_denial(
        &self,
        c: &Caller,
        action: AdminAction,
        outcome: &lattice_shared::policy::Outcome,
        summary: &str,
    ) -> Error {
        let now = self.state.clock.monotonic();
        let skipped = match self.state.denials.admit(&c.id, now) {
            Ok(skipped) => skipped,
            Err(()) => {
                metrics::counter!("lattice_admin_denials_unrecorded_total").increment(1);
                return Error::ResourceExhausted(format!(
                    "{} is denied too often; slow down (denials past {} a second are refused \
                     unrecorded)",
                    c.id, DENIALS_PER_SEC
                ));
            }
        };
        let summary = if skipped > 0 {
            format!("{summary} ({skipped} earlier denials over the rate limit were not recorded)")
        } else {
            summary.to_string()
        };
        let r = self.trail_record(c, action, admin_trail::Outcome::Denied, outcome, &summary);
        if let Err(e) = self.trail(r).await {
            tracing::error!(error = %e, "writing the admin trail failed");
            return Error::Internal("internal error; see control-plane logs".into());
        }
        denial(c, action, outcome)
    }

    /// Whether `c` could do `action` at all, with an approval if need be
    /// (a cheap refusal before expensive preparation; `gate` decides).
    pub(crate) async fn may_ever(
        &self,
        c: &Caller,
        action: AdminAction,
        resource: &str,
    ) -> Result<(), Error> {
        let engine = self.state.policy.current();
        let req = self.admin_request(c, action, "", resource, vec![]);
        if engine.decide_admin(&with_any_approval(&req)).allowed {
            return Ok(());
        }
        // Denied outright: recorded like any other denial.
        let outcome = engine.decide_admin(&req);
        Err(self.record_denial(c, action, &outcome, resource).await)
    }

    /// A change: allowed, or parked for a second admin, or denied.
    pub(crate) async fn gate<M: Message>(
        &self,
        c: &Caller,
        action: AdminAction,
        target_region: &str,
        resource: &str,
        payload: &M,
        summary: String,
    ) -> Result<Allowed, Error> {
        let engine = self.state.policy.current();
        let new_payload = payload.encode_to_vec();
        let req = AdminRequest {
            grant: self.grant_of(action, &new_payload)?,
            ..self.admin_request(c, action, target_region, resource, vec![])
        };
        let outcome = engine.decide_admin(&req);
        if outcome.allowed {
            tracing::info!(admin = %c.id, action = action.name(), policy_version = outcome.version, policies = ?outcome.policies, "admin action allowed");
            self.trail(self.trail_record(
                c,
                action,
                admin_trail::Outcome::Allowed,
                &outcome,
                &summary,
            ))
            .await?;
            return Ok(Allowed {
                approved_by: None,
                base_version: None,
            });
        }
        if !engine.decide_admin(&with_any_approval(&req)).allowed {
            tracing::warn!(admin = %c.id, action = action.name(), policy_version = outcome.version, "admin action denied");
            return Err(self.record_denial(c, action, &outcome, &summary).await);
        }
        let state = self.state.clone();
        let (caller, target_region, resource, what) = (
            c.clone(),
            target_region.to_string(),
            resource.to_string(),
            summary.clone(),
        );
        let now_unix = unix_secs(self.state.clock.now());
        let policy_version = engine.version();
        let pending = blocking(move || {
            approval::create(
                &state.store,
                NewPending {
                    action,
                    policy_version,
                    requester_cert: &caller.cert,
                    requested_by: &caller.id,
                    attrs: &caller.attrs,
                    target_region: &target_region,
                    resource: &resource,
                    source_ip: caller.ip,
                    payload: new_payload,
                    summary: what,
                    now_unix,
                },
            )
        })
        .await?;
        tracing::info!(admin = %c.id, action = action.name(), request_id = %pending.id, "admin action waits for a second admin");
        self.trail(admin_trail::AdminRecord {
            request_id: Some(pending.id.clone()),
            ..self.trail_record(c, action, admin_trail::Outcome::Pending, &outcome, &summary)
        })
        .await?;
        Err(Error::Pending {
            message: format!(
                "{} by {} needs the approval of a second admin: request {} waits (until {}); \
                 another admin runs `lattice approve {}`",
                action.name(),
                c.id,
                pending.id,
                pending.expires_at_unix,
                pending.id
            ),
            request_id: pending.id,
        })
    }
}

/// The refusal of `action` to `c`, with the policy's reason.
fn denial(c: &Caller, action: AdminAction, outcome: &lattice_shared::policy::Outcome) -> Error {
    Error::Denied(format!(
        "{} may not {}: {}",
        c.id,
        action.name(),
        outcome.denial()
    ))
}

/// Denials recorded per principal: a burst, then this many a second.
pub(crate) const DENIALS_PER_SEC: u32 = 5;
const DENIAL_BURST: f64 = 20.0;
/// Principals tracked at most (the oldest idle ones are forgotten).
const DENIAL_PRINCIPALS: usize = 10_000;

/// A token bucket per principal over the monotonic clock.
#[derive(Debug, Default)]
pub(crate) struct DenialLimiter {
    buckets: std::sync::Mutex<std::collections::HashMap<SpiffeId, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: std::time::Duration,
    skipped: u64,
}

impl DenialLimiter {
    /// `Ok(denials skipped since the last recorded one)` when this denial
    /// may be recorded, `Err` when the principal is over its budget.
    pub(crate) fn admit(&self, who: &SpiffeId, now: std::time::Duration) -> Result<u64, ()> {
        let mut g = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() >= DENIAL_PRINCIPALS && !g.contains_key(who) {
            // Forget the buckets that are full again (idle principals).
            g.retain(|_, b| {
                b.skipped > 0
                    || b.tokens
                        + (now.saturating_sub(b.at)).as_secs_f64() * f64::from(DENIALS_PER_SEC)
                        < DENIAL_BURST
            });
            if g.len() >= DENIAL_PRINCIPALS {
                // Every tracked principal is busy: record without tracking
                // (each needs an admin certificate of its own).
                return Ok(0);
            }
        }
        let b = g.entry(who.clone()).or_insert(Bucket {
            tokens: DENIAL_BURST,
            at: now,
            skipped: 0,
        });
        let refill = now.saturating_sub(b.at).as_secs_f64() * f64::from(DENIALS_PER_SEC);
        b.tokens = (b.tokens + refill).min(DENIAL_BURST);
        b.at = now;
        if b.tokens < 1.0 {
            b.skipped += 1;
            return Err(());
        }
        b.tokens -= 1.0;
        Ok(std::mem::take(&mut b.skipped))
    }
}

#[cfg(test)]
mod denial_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn denials_are_recorded_in_a_burst_then_at_a_rate_per_principal() {
        let l = DenialLimiter::default();
        let a = SpiffeId::parse("spiffe://t/admin/a").expect("id");
        let b = SpiffeId::parse("spiffe://t/admin/b").expect("id");
        let t0 = Duration::from_secs(100);
        for _ in 0..20 {
            assert_eq!(l.admit(&a, t0), Ok(0));
        }
        assert_eq!(l.admit(&a, t0), Err(()));
        assert_eq!(l.admit(&a, t0), Err(()));
        assert_eq!(
            l.admit(&b, t0),
            Ok(0),
            "another principal has its own budget"
        );
        // A fifth of a second later, one more, which says two were skipped.
        assert_eq!(l.admit(&a, t0 + Duration::from_millis(200)), Ok(2));
        assert_eq!(l.admit(&a, t0 + Duration::from_millis(200)), Err(()));
    }
}
