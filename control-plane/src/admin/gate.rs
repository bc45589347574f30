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
    pub(crate) fn gate_read(&self, c: &Caller, action: AdminAction) -> Result<(), Error> {
        let engine = self.state.policy.current();
        let outcome = engine.decide_admin(&self.admin_request(c, action, "", "", vec![]));
        if outcome.allowed {
            return Ok(());
        }
        tracing::warn!(admin = %c.id, action = action.name(), policy_version = outcome.version, "admin action denied");
        Err(self.record_denial(c, action, &outcome, ""))
    }

    /// Writes a denial to the admin trail (in place: reads do not wait on a
    /// worker) and returns the refusal the caller sees.
    fn record_denial(
        &self,
        c: &Caller,
        action: AdminAction,
        outcome: &lattice_shared::policy::Outcome,
        summary: &str,
    ) -> Error {
        let r = self.trail_record(c, action, admin_trail::Outcome::Denied, outcome, summary);
        if let Err(e) = admin_trail::record(&self.state, &r) {
            tracing::error!(error = %e, "writing the admin trail failed");
            return Error::Internal("internal error; see control-plane logs".into());
        }
        denial(c, action, outcome)
    }

    /// Whether `c` could do `action` at all, with an approval if need be
    /// (a cheap refusal before expensive preparation; `gate` decides).
    pub(crate) fn may_ever(
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
        Err(self.record_denial(c, action, &outcome, resource))
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
            self.trail(self.trail_record(
                c,
                action,
                admin_trail::Outcome::Denied,
                &outcome,
                &summary,
            ))
            .await?;
            return Err(denial(c, action, &outcome));
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
