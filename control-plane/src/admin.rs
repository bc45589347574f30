//! The `Admin` service. Every call is a Cedar admin action decided by the
//! policy in force, for the roles and regions that the caller's admin
//! certificate carries. A call that policy allows only with a second
//! admin's approval is stored and answered FAILED_PRECONDITION with the
//! request id; `Approve` by another admin runs it, and both names are kept
//! (in the policy release itself, and in the logs).

mod secrets;

use std::net::IpAddr;
use std::time::Duration;

use lattice_shared::clock::unix_secs;
use lattice_shared::id::{Role, SpiffeId};
use lattice_shared::net::peer_addr;
use lattice_shared::pki::{MAX_DER_LEN, inspect};
use lattice_shared::policy::{
    AdminAction, AdminAttributes, AdminRequest, AdminRole, Approval, BundleFiles, hour_and_weekday,
};
use lattice_shared::proto::{self as pb, admin_server::Admin};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::admin_trail;
use crate::approval::{self, NewPending};
use crate::policy::{NewRelease, push_again, with_any_approval};
use crate::service::{Service, blocking, require_role};
use crate::{Error, join};

const MAX_MESSAGE_LEN: usize = 1024;

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
    approved_by: Option<SpiffeId>,
    /// For an approved policy change: the version it was asked against.
    base_version: Option<u64>,
}

fn region_of(id: &SpiffeId) -> String {
    id.region().map(|r| r.to_string()).unwrap_or_default()
}

fn check_message(m: &str) -> Result<(), Status> {
    if m.len() > MAX_MESSAGE_LEN {
        return Err(Status::invalid_argument(format!(
            "message is longer than {MAX_MESSAGE_LEN} bytes"
        )));
    }
    Ok(())
}

impl Service {
    /// Writes an admin trail record durably.
    async fn trail(&self, r: admin_trail::AdminRecord) -> Result<(), Status> {
        let state = self.state.clone();
        blocking(move || admin_trail::record(&state, &r)).await
    }

    #[allow(clippy::too_many_arguments)]
    fn trail_record(
        &self,
        c: &Caller,
        action: AdminAction,
        outcome: admin_trail::Outcome,
        decided: &lattice_shared::policy::Outcome,
        approved_by: Option<&SpiffeId>,
        request_id: Option<&str>,
        summary: &str,
    ) -> admin_trail::AdminRecord {
        admin_trail::AdminRecord {
            at_unix_ms: self.state.now_ms(),
            action: action.name().to_string(),
            admin: c.id.to_string(),
            outcome,
            approved_by: approved_by.map(|a| a.to_string()),
            request_id: request_id.map(str::to_owned),
            policy_version: decided.version,
            policies: decided.policies.clone(),
            summary: summary.to_string(),
        }
    }

    #[allow(clippy::result_large_err)]
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let peer = require_role(&self.state, req, Role::Admin)?;
        let attrs = AdminAttributes::of_cert(&peer.cert).map_err(|e| {
            Status::permission_denied(format!("admin certificate of {}: {e}", peer.id))
        })?;
        Ok(Caller {
            id: peer.id.clone(),
            cert: peer.cert.clone(),
            attrs,
            ip: peer_addr(req)
                .map(|a| a.ip())
                .unwrap_or(IpAddr::from([0, 0, 0, 0])),
        })
    }

    fn admin_request(
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
        }
    }

    /// A read: allowed outright or denied.
    #[allow(clippy::result_large_err)]
    fn gate_read(&self, c: &Caller, action: AdminAction) -> Result<(), Status> {
        let engine = self.state.policy.current();
        let outcome = engine.decide_admin(&self.admin_request(c, action, "", "", vec![]));
        if outcome.allowed {
            return Ok(());
        }
        tracing::warn!(admin = %c.id, action = action.name(), policy_version = outcome.version, "admin action denied");
        let state = self.state.clone();
        let r = self.trail_record(
            c,
            action,
            admin_trail::Outcome::Denied,
            &outcome,
            None,
            None,
            "",
        );
        if let Err(e) = admin_trail::record(&state, &r) {
            tracing::error!(error = %e, "writing the admin trail failed");
            return Err(Status::internal("internal error; see control-plane logs"));
        }
        Err(Status::permission_denied(format!(
            "{} may not {}: {}",
            c.id,
            action.name(),
            outcome.denial()
        )))
    }

    /// Whether `c` could do `action` at all, with an approval if need be
    /// (a cheap refusal before expensive preparation; `gate` decides).
    #[allow(clippy::result_large_err)]
    fn may_ever(&self, c: &Caller, action: AdminAction, resource: &str) -> Result<(), Status> {
        let engine = self.state.policy.current();
        let req = self.admin_request(c, action, "", resource, vec![]);
        if engine.decide_admin(&with_any_approval(&req)).allowed {
            return Ok(());
        }
        // Denied outright: recorded like any other denial.
        let outcome = engine.decide_admin(&req);
        let r = self.trail_record(
            c,
            action,
            admin_trail::Outcome::Denied,
            &outcome,
            None,
            None,
            resource,
        );
        if let Err(e) = admin_trail::record(&self.state, &r) {
            tracing::error!(error = %e, "writing the admin trail failed");
            return Err(Status::internal("internal error; see control-plane logs"));
        }
        Err(Status::permission_denied(format!(
            "{} may not {}: {}",
            c.id,
            action.name(),
            outcome.denial()
        )))
    }

    /// A change: allowed, or parked for a second admin, or denied.
    async fn gate<M: Message>(
        &self,
        c: &Caller,
        action: AdminAction,
        target_region: &str,
        resource: &str,
        payload: &M,
        summary: String,
    ) -> Result<Allowed, Status> {
        let engine = self.state.policy.current();
        let req = self.admin_request(c, action, target_region, resource, vec![]);
        let outcome = engine.decide_admin(&req);
        if outcome.allowed {
            tracing::info!(admin = %c.id, action = action.name(), policy_version = outcome.version, policies = ?outcome.policies, "admin action allowed");
            self.trail(self.trail_record(
                c,
                action,
                admin_trail::Outcome::Allowed,
                &outcome,
                None,
                None,
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
                None,
                None,
                &summary,
            ))
            .await?;
            return Err(Status::permission_denied(format!(
                "{} may not {}: {}",
                c.id,
                action.name(),
                outcome.denial()
            )));
        }
        let state = self.state.clone();
        let new_payload = payload.encode_to_vec();
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
        self.trail(self.trail_record(
            c,
            action,
            admin_trail::Outcome::Pending,
            &outcome,
            None,
            Some(&pending.id),
            &summary,
        ))
        .await?;
        let mut status = Status::failed_precondition(format!(
            "{} by {} needs the approval of a second admin: request {} waits (until {}); \
             another admin runs `lattice approve {}`",
            action.name(),
            c.id,
            pending.id,
            pending.expires_at_unix,
            pending.id
        ));
        if let Ok(v) = pending.id.parse() {
            status.metadata_mut().insert("lattice-approval-id", v);
        }
        Err(status)
    }

    async fn exec_push(
        &self,
        by: &Caller,
        allowed: Allowed,
        r: pb::PushPolicyRequest,
    ) -> Result<pb::PolicyVersion, Status> {
        let files = bundle_of(&r)?;
        let lockout = push_again(&self.admin_request(by, AdminAction::PushPolicy, "", "", vec![]));
        let state = self.state.clone();
        let by = by.id.clone();
        blocking(move || {
            state.release_policy(NewRelease {
                files,
                message: r.message,
                pushed_by: &by,
                approved_by: allowed.approved_by.as_ref(),
                rollback_of: 0,
                lockout_check: Some(lockout),
                base_version: allowed.base_version,
            })
        })
        .await
    }

    async fn exec_rollback(
        &self,
        by: &Caller,
        allowed: Allowed,
        r: pb::RollbackPolicyRequest,
    ) -> Result<pb::PolicyVersion, Status> {
        let lockout = push_again(&self.admin_request(by, AdminAction::PushPolicy, "", "", vec![]));
        let state = self.state.clone();
        let by = by.id.clone();
        blocking(move || {
            if r.to_version == 0 {
                return Err(Error::InvalidArgument("to_version is required".into()));
            }
            let (_, files) = state.policy.get(&state.log, r.to_version)?;
            state.release_policy(NewRelease {
                files,
                message: r.message,
                pushed_by: &by,
                approved_by: allowed.approved_by.as_ref(),
                rollback_of: r.to_version,
                lockout_check: Some(lockout),
                base_version: allowed.base_version,
            })
        })
        .await
    }

    async fn exec_revoke(
        &self,
        by: &Caller,
        allowed: Allowed,
        r: lattice_shared::revocation::Revocation,
    ) -> Result<pb::RevokeResponse, Status> {
        let state = self.state.clone();
        let target = r.target.to_string();
        let ev = blocking(move || state.revoke(&r)).await?;
        tracing::info!(admin = %by.id, approved_by = ?allowed.approved_by.map(|a| a.to_string()), seq = ev.seq, %target, "admin revoked");
        Ok(pb::RevokeResponse {
            seq: ev.seq,
            committed_at_unix_ms: ev.committed_at_unix_ms,
        })
    }

    async fn exec_join_token(
        &self,
        by: &Caller,
        allowed: Allowed,
        id: SpiffeId,
        ttl_secs: u64,
    ) -> Result<pb::CreateJoinTokenResponse, Status> {
        let ttl = (ttl_secs > 0).then(|| Duration::from_secs(ttl_secs));
        let state = self.state.clone();
        let created = blocking(move || join::create(&state, &id, ttl)).await?;
        tracing::info!(admin = %by.id, approved_by = ?allowed.approved_by.map(|a| a.to_string()), id = %created.record.id, "admin created a join token");
        Ok(pb::CreateJoinTokenResponse {
            token: created.token.to_string(),
            id: created.record.id.to_string(),
            region: region_of(&created.record.id),
            expires_at_unix: created.record.expires_at_unix,
        })
    }

    async fn exec_issue_admin(
        &self,
        by: &Caller,
        allowed: Allowed,
        r: pb::IssueAdminCertificateRequest,
    ) -> Result<pb::IssueAdminCertificateResponse, Status> {
        let (id, attrs) = parse_admin_request(&r)?;
        let ttl = Duration::from_secs(if r.ttl_secs == 0 {
            self.state.cfg.admin_cert_ttl_days * 86400
        } else {
            r.ttl_secs
        });
        let state = self.state.clone();
        let (cert_id, csr) = (id.clone(), r.csr);
        let cert = blocking(move || state.issue_admin_cert(&csr, &cert_id, &attrs, ttl)).await?;
        let info = inspect(&cert).map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(admin = %by.id, approved_by = ?allowed.approved_by.map(|a| a.to_string()), new_admin = %id, roles = ?info.org_unit, "admin certificate issued");
        Ok(pb::IssueAdminCertificateResponse {
            cert,
            root: self.state.root.cert_der().to_vec(),
            not_after_unix: unix_secs(info.not_after),
        })
    }
}

#[allow(clippy::result_large_err)]
fn bundle_of(r: &pb::PushPolicyRequest) -> Result<BundleFiles, Status> {
    BundleFiles::from_proto(
        r.bundle
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("bundle is required"))?,
    )
    .map_err(|e| Status::invalid_argument(e.to_string()))
}

#[allow(clippy::result_large_err)]
fn parse_revocation(
    r: Option<&pb::Revocation>,
) -> Result<lattice_shared::revocation::Revocation, Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("revocation is required"))?;
    lattice_shared::revocation::Revocation::try_from(r)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

fn revocation_region(r: &lattice_shared::revocation::Revocation) -> String {
    use lattice_shared::revocation::Target;
    match &r.target {
        Target::Agent(id) | Target::Cache(id) => region_of(id),
        Target::SubjectBefore { subject, .. } => region_of(subject),
        _ => String::new(),
    }
}

#[allow(clippy::result_large_err)]
fn parse_admin_request(
    r: &pb::IssueAdminCertificateRequest,
) -> Result<(SpiffeId, AdminAttributes), Status> {
    let id = SpiffeId::parse(&r.id).map_err(|e| Status::invalid_argument(format!("id: {e}")))?;
    if id.role() != Role::Admin {
        return Err(Status::invalid_argument(format!(
            "{id} is not an admin id (spiffe://TD/admin/NAME)"
        )));
    }
    if r.roles.is_empty() || r.roles.len() > AdminRole::ALL.len() {
        return Err(Status::invalid_argument("roles: give one to four roles"));
    }
    if r.regions.len() > 64 {
        return Err(Status::invalid_argument("regions: at most 64"));
    }
    if r.csr.is_empty() || r.csr.len() > MAX_DER_LEN {
        return Err(Status::invalid_argument(format!(
            "csr must be 1..={MAX_DER_LEN} bytes"
        )));
    }
    lattice_shared::pki::check_csr(&r.csr)
        .map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
    let mut attrs = AdminAttributes::default();
    for role in &r.roles {
        attrs
            .roles
            .push(role.parse().map_err(Status::invalid_argument)?);
    }
    for region in &r.regions {
        lattice_shared::id::RegionId::new(region)
            .map_err(|e| Status::invalid_argument(format!("region {region:?}: {e}")))?;
        attrs.regions.push(region.clone());
    }
    attrs.roles.sort();
    attrs.roles.dedup();
    Ok((id, attrs))
}

#[tonic::async_trait]
impl Admin for Service {
    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        let id =
            SpiffeId::parse(&r.id).map_err(|e| Status::invalid_argument(format!("id: {e}")))?;
        let summary = format!("create a join token for {id}");
        let allowed = self
            .gate(
                &c,
                AdminAction::CreateJoinToken,
                &region_of(&id),
                "",
                &r,
                summary,
            )
            .await?;
        Ok(Response::new(
            self.exec_join_token(&c, allowed, id, r.ttl_secs).await?,
        ))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadStatus)?;
        let state = self.state.clone();
        let (caches, outstanding) =
            blocking(move || Ok((state.caches()?, join::outstanding(&state)?))).await?;
        let now = self.state.now_ms();
        let revoked = self.state.log.revocations().clone();
        let caches: Vec<pb::CacheStatus> = caches
            .iter()
            .map(|c| {
                let ca = inspect(&c.ca_cert).ok();
                let link = self.state.links.get(&c.id).unwrap_or_default();
                pb::CacheStatus {
                    cache_id: c.id.to_string(),
                    region: region_of(&c.id),
                    enrolled_at_unix: c.enrolled_at_unix,
                    ca_not_after_unix: ca.as_ref().map(|i| unix_secs(i.not_after)).unwrap_or(0),
                    ca_serial: ca.map(|i| i.serial_hex).unwrap_or_default(),
                    acked_seq: link.acked,
                    last_contact_unix_ms: link.last_contact_ms,
                    connected: link.connected,
                    revoked: revoked.is_cache_revoked(&c.id),
                    policy_version: link.policy_version,
                    // 0 means never fresh; a fresh cache reads at least 1.
                    staleness_ms: if link.fresh_at_ms == 0 {
                        0
                    } else {
                        u64::try_from(now - link.fresh_at_ms).unwrap_or(0).max(1)
                    },
                }
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            trust_domain: self.state.td.to_string(),
            caches,
            join_tokens_outstanding: outstanding,
            head_seq: self.state.log.head(),
            max_staleness_ms: self.state.cfg.max_staleness_ms,
            policy_version: self.state.policy.current().version(),
            policy_seq: self
                .state
                .policy
                .history()
                .last()
                .map(|v| v.seq)
                .unwrap_or(0),
        }))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        let rev = parse_revocation(r.revocation.as_ref())?;
        let summary = format!("revoke {}", rev.target);
        if let lattice_shared::revocation::Target::SecretVersion { name, version } = &rev.target {
            // A secret's custodians decide over its versions.
            let change = pb::PendingSecretChange {
                op: "revoke-version".into(),
                name: name.clone(),
                version: *version,
                reason: rev.reason.clone(),
                ..Default::default()
            };
            return match self.secret_change(&c, change, summary).await? {
                secrets::SecretOutcome::Revoked(r) => Ok(Response::new(r)),
                _ => Err(Status::internal("unexpected outcome")),
            };
        }
        let allowed = self
            .gate(
                &c,
                AdminAction::Revoke,
                &revocation_region(&rev),
                "",
                &r,
                summary,
            )
            .await?;
        Ok(Response::new(self.exec_revoke(&c, allowed, rev).await?))
    }

    async fn push_policy(
        &self,
        req: Request<pb::PushPolicyRequest>,
    ) -> Result<Response<pb::PolicyVersion>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        check_message(&r.message)?;
        let files = bundle_of(&r)?;
        let summary = format!(
            "push policy bundle sha256:{} ({} files): {}",
            hex::encode(files.sha256()),
            files.len(),
            r.message
        );
        // Only an admin who may push (perhaps with an approval) makes the
        // control plane compile and test a bundle.
        let may = crate::policy::may_act(
            &self.state.policy.current(),
            &self.admin_request(&c, AdminAction::PushPolicy, "", "", vec![]),
        );
        if !may {
            self.gate(&c, AdminAction::PushPolicy, "", "", &r, summary)
                .await?;
            return Err(Status::permission_denied("policy push denied"));
        }
        // Refuse a broken bundle before anyone is asked to approve it.
        let checked = files.clone();
        blocking(move || Ok(lattice_shared::policy::check(&checked, 0)?)).await?;
        let allowed = self
            .gate(&c, AdminAction::PushPolicy, "", "", &r, summary)
            .await?;
        Ok(Response::new(self.exec_push(&c, allowed, r).await?))
    }

    async fn rollback_policy(
        &self,
        req: Request<pb::RollbackPolicyRequest>,
    ) -> Result<Response<pb::PolicyVersion>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        check_message(&r.message)?;
        if r.to_version == 0 {
            return Err(Status::invalid_argument("to_version is required"));
        }
        {
            let state = self.state.clone();
            let v = r.to_version;
            blocking(move || state.policy.get(&state.log, v).map(|_| ())).await?;
        }
        let summary = format!(
            "roll policy back to version {}: {}",
            r.to_version, r.message
        );
        let allowed = self
            .gate(&c, AdminAction::RollbackPolicy, "", "", &r, summary)
            .await?;
        Ok(Response::new(self.exec_rollback(&c, allowed, r).await?))
    }

    async fn policy_history(
        &self,
        req: Request<pb::PolicyHistoryRequest>,
    ) -> Result<Response<pb::PolicyHistoryResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadPolicy)?;
        Ok(Response::new(pb::PolicyHistoryResponse {
            versions: self.state.policy.history(),
            current: self.state.policy.current().version(),
        }))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadPolicy)?;
        let v = req.get_ref().version;
        let state = self.state.clone();
        let (info, files) = blocking(move || state.policy.get(&state.log, v)).await?;
        Ok(Response::new(pb::GetPolicyResponse {
            version: Some(info),
            bundle: Some(files.to_proto()),
        }))
    }

    async fn approve(
        &self,
        req: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::ApproveResponse>, Status> {
        let approver = self.caller(&req)?;
        self.gate_read(&approver, AdminAction::Approve)?;
        let id = req.into_inner().request_id;
        let now_unix = unix_secs(self.state.clock.now());
        let (pending, raw) = {
            let state = self.state.clone();
            let id = id.clone();
            blocking(move || approval::get(&state.store, &id, now_unix)).await?
        };
        if pending.requested_by == approver.id {
            return Err(Status::permission_denied(
                "an admin cannot approve their own request; a second admin must",
            ));
        }
        let requester = Caller {
            id: pending.requested_by.clone(),
            attrs: pending.attributes(),
            ip: pending.source_ip,
            cert: pending.requester_cert(),
        };
        // The requester's certificate must still be good: a revoked or
        // expired admin's requests are not run.
        if self.state.clock.now() > requester.cert.not_after {
            return Err(Status::failed_precondition(format!(
                "the certificate {} made request {id} with has expired; it must ask again",
                requester.id
            )));
        }
        self.state
            .log
            .revocations()
            .check_cert(&requester.cert, None)
            .map_err(|e| Status::permission_denied(format!("request {id} cannot run: {e}")))?;
        let engine = self.state.policy.current();
        let outcome = engine.decide_admin(&self.admin_request(
            &requester,
            pending.action,
            &pending.target_region,
            &pending.resource,
            vec![Approval {
                admin: approver.id.clone(),
                roles: approver.attrs.roles.clone(),
            }],
        ));
        if !outcome.allowed {
            self.trail(self.trail_record(
                &approver,
                AdminAction::Approve,
                admin_trail::Outcome::Denied,
                &outcome,
                None,
                Some(&id),
                &format!(
                    "approve {} by {}",
                    pending.action.name(),
                    pending.requested_by
                ),
            ))
            .await?;
            return Err(Status::permission_denied(format!(
                "{} cannot approve {} by {}: {}",
                approver.id,
                pending.action.name(),
                pending.requested_by,
                outcome.denial()
            )));
        }
        {
            let state = self.state.clone();
            let (key, raw) = (id.clone(), raw.clone());
            if !blocking(move || approval::take(&state.store, &key, &raw)).await? {
                return Err(Status::not_found(format!(
                    "request {id} was approved by someone else meanwhile"
                )));
            }
        }
        tracing::info!(
            request_id = %id,
            action = pending.action.name(),
            requested_by = %pending.requested_by,
            approved_by = %approver.id,
            policy_version = outcome.version,
            "admin request approved; running it"
        );
        self.trail(self.trail_record(
            &requester,
            pending.action,
            admin_trail::Outcome::Approved,
            &outcome,
            Some(&approver.id),
            Some(&id),
            &pending.summary,
        ))
        .await?;
        let allowed = Allowed {
            approved_by: Some(approver.id.clone()),
            base_version: Some(pending.policy_version),
        };
        let payload = pending
            .payload()
            .map_err(|e| Status::internal(e.to_string()))?;
        let bad = |e: prost::DecodeError| Status::internal(format!("stored request: {e}"));
        use pb::approve_response::Result as R;
        let result = match pending.action {
            AdminAction::PushPolicy => R::Policy(
                self.exec_push(
                    &requester,
                    allowed,
                    pb::PushPolicyRequest::decode(payload.as_slice()).map_err(bad)?,
                )
                .await?,
            ),
            AdminAction::RollbackPolicy => R::Policy(
                self.exec_rollback(
                    &requester,
                    allowed,
                    pb::RollbackPolicyRequest::decode(payload.as_slice()).map_err(bad)?,
                )
                .await?,
            ),
            AdminAction::Revoke => {
                let r = pb::RevokeRequest::decode(payload.as_slice()).map_err(bad)?;
                let rev = parse_revocation(r.revocation.as_ref())?;
                R::Revoke(self.exec_revoke(&requester, allowed, rev).await?)
            }
            AdminAction::CreateJoinToken => {
                let r = pb::CreateJoinTokenRequest::decode(payload.as_slice()).map_err(bad)?;
                let jid = SpiffeId::parse(&r.id)
                    .map_err(|e| Status::invalid_argument(format!("id: {e}")))?;
                R::JoinToken(
                    self.exec_join_token(&requester, allowed, jid, r.ttl_secs)
                        .await?,
                )
            }
            AdminAction::PutSecret | AdminAction::RotateSecret | AdminAction::RotateKmsKey => {
                let change = pb::PendingSecretChange::decode(payload.as_slice()).map_err(bad)?;
                if secrets::action_of(&change.op) != Some(pending.action) {
                    return Err(Status::internal(
                        "stored secret change does not match its action",
                    ));
                }
                self.exec_secret(&requester, allowed, change)
                    .await?
                    .into_approval()
            }
            AdminAction::IssueAdminCertificate => R::AdminCertificate(
                self.exec_issue_admin(
                    &requester,
                    allowed,
                    pb::IssueAdminCertificateRequest::decode(payload.as_slice()).map_err(bad)?,
                )
                .await?,
            ),
            other => {
                return Err(Status::internal(format!(
                    "{} cannot be run from an approval",
                    other.name()
                )));
            }
        };
        Ok(Response::new(pb::ApproveResponse {
            request_id: id,
            action: pending.action.name().to_string(),
            requested_by: pending.requested_by.to_string(),
            result: Some(result),
        }))
    }

    async fn list_pending(
        &self,
        req: Request<pb::ListPendingRequest>,
    ) -> Result<Response<pb::ListPendingResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadStatus)?;
        let state = self.state.clone();
        let now_unix = unix_secs(self.state.clock.now());
        let list = blocking(move || approval::list(&state.store, now_unix)).await?;
        Ok(Response::new(pb::ListPendingResponse {
            requests: list
                .into_iter()
                .map(|p| pb::PendingRequest {
                    request_id: p.id,
                    action: p.action.name().to_string(),
                    requested_by: p.requested_by.to_string(),
                    created_at_unix: p.created_at_unix,
                    expires_at_unix: p.expires_at_unix,
                    summary: p.summary,
                })
                .collect(),
        }))
    }

    async fn issue_admin_certificate(
        &self,
        req: Request<pb::IssueAdminCertificateRequest>,
    ) -> Result<Response<pb::IssueAdminCertificateResponse>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        let (id, attrs) = parse_admin_request(&r)?;
        let summary = format!(
            "issue an admin certificate to {id} ({})",
            attrs.to_org_unit()
        );
        let allowed = self
            .gate(&c, AdminAction::IssueAdminCertificate, "", "", &r, summary)
            .await?;
        Ok(Response::new(self.exec_issue_admin(&c, allowed, r).await?))
    }
    async fn put_secret(
        &self,
        req: Request<pb::PutSecretRequest>,
    ) -> Result<Response<pb::SecretVersionInfo>, Status> {
        let c = self.caller(&req)?;
        match self.put_secret_change(&c, req.into_inner()).await? {
            secrets::SecretOutcome::Version(v) => Ok(Response::new(v)),
            _ => Err(Status::internal("unexpected outcome")),
        }
    }

    async fn list_secrets(
        &self,
        req: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadStatus)?;
        let state = self.state.clone();
        let secrets = blocking(move || {
            Ok(state
                .secret_records()?
                .iter()
                .filter(|r| !r.deleted)
                .map(|r| state.secret_summary(r))
                .collect())
        })
        .await?;
        Ok(Response::new(pb::ListSecretsResponse { secrets }))
    }

    async fn secret_versions(
        &self,
        req: Request<pb::SecretVersionsRequest>,
    ) -> Result<Response<pb::SecretVersionsResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadStatus)?;
        let name = req.into_inner().name;
        secrets::check_name(&name)?;
        let state = self.state.clone();
        let resp = blocking(move || {
            let rec = state.secret_record(&name)?;
            Ok(state.secret_versions(&rec))
        })
        .await?;
        Ok(Response::new(resp))
    }

    async fn rollback_secret(
        &self,
        req: Request<pb::RollbackSecretRequest>,
    ) -> Result<Response<pb::SecretVersionsResponse>, Status> {
        self.simple_secret_change(req, "rollback").await
    }

    async fn delete_secret(
        &self,
        req: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let c = self.caller(&req)?;
        let name = req.into_inner().name;
        secrets::check_name(&name)?;
        let change = pb::PendingSecretChange {
            op: "delete".into(),
            name: name.clone(),
            ..Default::default()
        };
        match self
            .secret_change(&c, change, format!("delete secret {name}"))
            .await?
        {
            secrets::SecretOutcome::Deleted(d) => Ok(Response::new(d)),
            _ => Err(Status::internal("unexpected outcome")),
        }
    }

    async fn rekey_secret(
        &self,
        req: Request<pb::RekeySecretRequest>,
    ) -> Result<Response<pb::SecretVersionsResponse>, Status> {
        self.simple_secret_change(req, "rekey").await
    }

    type RotateSecretStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::RotationProgress, Status>>;

    async fn rotate_secret(
        &self,
        req: Request<pb::RotateSecretRequest>,
    ) -> Result<Response<Self::RotateSecretStream>, Status> {
        let c = self.caller(&req)?;
        let name = req.into_inner().name;
        secrets::check_name(&name)?;
        let change = pb::PendingSecretChange {
            op: "rotate".into(),
            name: name.clone(),
            ..Default::default()
        };
        let allowed = self
            .gate(
                &c,
                AdminAction::RotateSecret,
                "",
                &name,
                &change,
                format!("rotate secret {name}"),
            )
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (ptx, mut prx) = tokio::sync::mpsc::channel(16);
        let state = self.state.clone();
        let by = c.id.to_string();
        let approved = allowed
            .approved_by
            .map(|a| a.to_string())
            .unwrap_or_default();
        // The rotation runs to its end even if the caller goes away.
        tokio::spawn(async move {
            let forward = async {
                while let Some(p) = prx.recv().await {
                    let _ = tx.send(Ok(p)).await;
                }
            };
            let (result, ()) = tokio::join!(
                crate::rotation::rotate(&state, &name, &by, &approved, Some(ptx)),
                forward
            );
            if let Err(e) = result {
                let _ = tx.send(Err(Status::from(e))).await;
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    type WatchAlertsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::AlertEvent, Status>>;

    async fn watch_alerts(
        &self,
        req: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadAudit)?;
        let mut alerts = self.state.alerts.subscribe();
        let mut stopping = self.state.stopping.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let a = tokio::select! {
                    _ = lattice_shared::net::until_true(&mut stopping) => return,
                    _ = tx.closed() => return,
                    a = alerts.recv() => a,
                };
                let msg = match a {
                    Ok(a) => Ok(pb::AlertEvent {
                        rule: a.rule,
                        subject: a.subject,
                        detail: a.detail,
                        at_unix_ms: a.at_unix_ms,
                        cache: a.cache,
                        action: a.action.name().into(),
                        secret: a.secret,
                    }),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        Err(Status::data_loss(format!(
                            "{n} alerts missed (too slow); they are in the audit log (kind alert)"
                        )))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let end = msg.is_err();
                if tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn audit_entries(
        &self,
        req: Request<pb::AuditEntriesRequest>,
    ) -> Result<Response<pb::AuditEntriesResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadAudit)?;
        let r = req.into_inner();
        let state = self.state.clone();
        let (entries, tree_size) = blocking(move || {
            Ok((
                state.audit_log.entries(r.start, r.limit)?,
                state.audit_log.size(),
            ))
        })
        .await?;
        Ok(Response::new(pb::AuditEntriesResponse {
            entries,
            tree_size,
        }))
    }

    async fn audit_tree_heads(
        &self,
        req: Request<pb::AuditTreeHeadsRequest>,
    ) -> Result<Response<pb::AuditTreeHeadsResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadAudit)?;
        let state = self.state.clone();
        let heads = blocking(move || state.audit_log.heads()).await?;
        Ok(Response::new(pb::AuditTreeHeadsResponse { heads }))
    }

    async fn audit_proof(
        &self,
        req: Request<pb::AuditProofRequest>,
    ) -> Result<Response<pb::AuditProofResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadAudit)?;
        let r = req.into_inner();
        let state = self.state.clone();
        let resp = blocking(move || {
            let log = &state.audit_log;
            let (size, head) = log.head(r.tree_size)?.ok_or_else(|| {
                Error::NotFound(format!("no signed tree head of size {}", r.tree_size))
            })?;
            if r.index >= size {
                return Err(Error::InvalidArgument(format!(
                    "entry {} is not in the tree head of size {size}",
                    r.index
                )));
            }
            let entry = log
                .entries(r.index, 1)?
                .into_iter()
                .next()
                .ok_or_else(|| Error::NotFound(format!("no entry {}", r.index)))?;
            let inclusion = log
                .inclusion(r.index, size)
                .ok_or_else(|| Error::Corrupt("inclusion proof".into()))?;
            let (consistency, first_head) = if r.first_size == 0 {
                (Vec::new(), None)
            } else {
                let (_, first) = log.head(r.first_size)?.ok_or_else(|| {
                    Error::NotFound(format!("no signed tree head of size {}", r.first_size))
                })?;
                if r.first_size > size {
                    return Err(Error::InvalidArgument(
                        "first_size is larger than the tree head's size".into(),
                    ));
                }
                let proof = log
                    .consistency(r.first_size, size)
                    .ok_or_else(|| Error::Corrupt("consistency proof".into()))?;
                (proof, Some(first))
            };
            Ok(pb::AuditProofResponse {
                entry: Some(entry),
                inclusion: inclusion.iter().map(|h| h.to_vec()).collect(),
                head: Some(head),
                consistency: consistency.iter().map(|h| h.to_vec()).collect(),
                first_head,
            })
        })
        .await?;
        Ok(Response::new(resp))
    }

    async fn rotate_kms(
        &self,
        req: Request<pb::RotateKmsRequest>,
    ) -> Result<Response<pb::RotateKmsResponse>, Status> {
        let c = self.caller(&req)?;
        let change = pb::PendingSecretChange {
            op: "kms-rotate".into(),
            ..Default::default()
        };
        match self
            .secret_change(&c, change, "rotate the KEK and rewrap every DEK".into())
            .await?
        {
            secrets::SecretOutcome::Kms(k) => Ok(Response::new(k)),
            _ => Err(Status::internal("unexpected outcome")),
        }
    }
}

/// Requests that name only a secret.
trait NamedSecret {
    fn name(&self) -> &str;
}
impl NamedSecret for pb::RollbackSecretRequest {
    fn name(&self) -> &str {
        &self.name
    }
}
impl NamedSecret for pb::RekeySecretRequest {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Service {
    async fn simple_secret_change<T: NamedSecret>(
        &self,
        req: Request<T>,
        op: &str,
    ) -> Result<Response<pb::SecretVersionsResponse>, Status> {
        let c = self.caller(&req)?;
        let name = req.get_ref().name().to_string();
        secrets::check_name(&name)?;
        let mut change = pb::PendingSecretChange {
            op: op.into(),
            name: name.clone(),
            ..Default::default()
        };
        let mut summary = format!("{op} secret {name}");
        if op == "rollback" {
            // Pin the version being restored: an approval runs what was asked.
            let state = self.state.clone();
            let n = name.clone();
            let rec = blocking(move || state.secret_record(&n)).await?;
            change.version = rec.previous;
            summary = format!("roll secret {name} back to version {}", rec.previous);
        }
        match self.secret_change(&c, change, summary).await? {
            secrets::SecretOutcome::Versions(v) => Ok(Response::new(v)),
            _ => Err(Status::internal("unexpected outcome")),
        }
    }
}
