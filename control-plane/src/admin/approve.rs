//! `Approve`: a second admin runs a parked request. It is decided again
//! with the approval, against the requester's certificate (which must still
//! be good), taken from the store by compare-and-swap so it runs once, and
//! its stored payload decoded and dispatched to its `exec_*`.

use lattice_shared::clock::unix_secs;
use lattice_shared::id::SpiffeId;
use lattice_shared::policy::{AdminAction, AdminRequest, Approval};
use lattice_shared::proto as pb;
use prost::Message;

use super::gate::{Allowed, Caller};
use super::parse_revocation;
use crate::api::{Service, blocking};
use crate::{Error, admin_trail, approval};

impl Service {
    /// Runs request `id` for `approver` (who may approve): decided again
    /// with the approval, taken by compare-and-swap, then dispatched.
    pub(crate) async fn approve(
        &self,
        approver: &Caller,
        id: String,
    ) -> Result<pb::ApproveResponse, Error> {
        let now_unix = unix_secs(self.state.clock.now());
        let (pending, raw) = {
            let state = self.state.clone();
            let id = id.clone();
            blocking(move || approval::get(&state.store, &id, now_unix)).await?
        };
        if pending.requested_by == approver.id {
            return Err(Error::Denied(
                "an admin cannot approve their own request; a second admin must".into(),
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
            return Err(Error::FailedPrecondition(format!(
                "the certificate {} made request {id} with has expired; it must ask again",
                requester.id
            )));
        }
        self.state
            .log
            .revocations()
            .check_cert(&requester.cert, None)
            .map_err(|e| Error::Denied(format!("request {id} cannot run: {e}")))?;
        let engine = self.state.policy.current();
        let payload = pending
            .payload()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let outcome = engine.decide_admin(&AdminRequest {
            grant: self.grant_of(pending.action, &payload)?,
            ..self.admin_request(
                &requester,
                pending.action,
                &pending.target_region,
                &pending.resource,
                vec![Approval {
                    admin: approver.id.clone(),
                    roles: approver.attrs.roles.clone(),
                }],
            )
        });
        if !outcome.allowed {
            let summary = format!(
                "approve {} by {}",
                pending.action.name(),
                pending.requested_by
            );
            self.trail(admin_trail::AdminRecord {
                request_id: Some(id.clone()),
                ..self.trail_record(
                    approver,
                    AdminAction::Approve,
                    admin_trail::Outcome::Denied,
                    &outcome,
                    &summary,
                )
            })
            .await?;
            return Err(Error::Denied(format!(
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
                return Err(Error::NotFound(format!(
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
        self.trail(admin_trail::AdminRecord {
            approved_by: Some(approver.id.to_string()),
            request_id: Some(id.clone()),
            ..self.trail_record(
                &requester,
                pending.action,
                admin_trail::Outcome::Approved,
                &outcome,
                &pending.summary,
            )
        })
        .await?;
        let allowed = Allowed {
            approved_by: Some(approver.id.clone()),
            base_version: Some(pending.policy_version),
        };
        let bad = |e: prost::DecodeError| Error::Internal(format!("stored request: {e}"));
        use pb::approve_response::Result as R;
        let result = match pending.action {
            AdminAction::PushPolicy => R::Policy(
                self.exec_push(
                    &requester,
                    allowed,
                    pb::PushPolicyRequest::decode(payload.as_slice()).map_err(bad)?,
                )
                .await?
                .into(),
            ),
            AdminAction::RollbackPolicy => R::Policy(
                self.exec_rollback(
                    &requester,
                    allowed,
                    pb::RollbackPolicyRequest::decode(payload.as_slice()).map_err(bad)?,
                )
                .await?
                .into(),
            ),
            AdminAction::Revoke => {
                let r = pb::RevokeRequest::decode(payload.as_slice()).map_err(bad)?;
                let rev = parse_revocation(r.revocation.as_ref())?;
                R::Revoke(self.exec_revoke(&requester, allowed, rev).await?)
            }
            AdminAction::HoldSecret => {
                let r = pb::GrantCustodyRequest::decode(payload.as_slice()).map_err(bad)?;
                let cache = super::parse_cache_id(&r.cache_id)?;
                R::Custody(self.exec_grant_custody(&requester, allowed, cache).await?)
            }
            AdminAction::CreateJoinToken | AdminAction::EnrolCache => {
                let r = pb::CreateJoinTokenRequest::decode(payload.as_slice()).map_err(bad)?;
                let jid = SpiffeId::parse(&r.id)
                    .map_err(|e| Error::InvalidArgument(format!("id: {e}")))?;
                R::JoinToken(
                    self.exec_join_token(&requester, allowed, jid, r.ttl_secs)
                        .await?,
                )
            }
            AdminAction::PutSecret | AdminAction::RotateSecret | AdminAction::RotateKmsKey => {
                let change = pb::PendingSecretChange::decode(payload.as_slice()).map_err(bad)?;
                if super::secrets::action_of(&change.op) != Some(pending.action) {
                    return Err(Error::Internal(
                        "stored secret change does not match its action".into(),
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
                return Err(Error::Internal(format!(
                    "{} cannot be run from an approval",
                    other.name()
                )));
            }
        };
        Ok(pb::ApproveResponse {
            request_id: id,
            action: pending.action.name().to_string(),
            requested_by: pending.requested_by.to_string(),
            result: Some(result),
        })
    }
}
