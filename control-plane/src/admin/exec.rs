//! The effects of admin calls once allowed (outright or by approval): each
//! `exec_*` runs one change and reports what it did.

use std::time::Duration;

use lattice_shared::clock::unix_secs;
use lattice_shared::id::SpiffeId;
use lattice_shared::pki::inspect;
use lattice_shared::policy::AdminAction;
use lattice_shared::proto as pb;

use super::gate::{Allowed, Caller, region_of};
use super::{bundle_of, parse_admin_request};
use crate::api::{Service, blocking};
use crate::policy::{NewRelease, Released, push_again};
use crate::{Error, join};

impl Service {
    pub(crate) async fn exec_push(
        &self,
        by: &Caller,
        allowed: Allowed,
        r: pb::PushPolicyRequest,
    ) -> Result<Released, Error> {
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

    pub(crate) async fn exec_rollback(
        &self,
        by: &Caller,
        allowed: Allowed,
        r: pb::RollbackPolicyRequest,
    ) -> Result<Released, Error> {
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

    pub(crate) async fn exec_revoke(
        &self,
        by: &Caller,
        allowed: Allowed,
        r: lattice_shared::revocation::Revocation,
    ) -> Result<pb::RevokeResponse, Error> {
        let state = self.state.clone();
        let target = r.target.to_string();
        let ev = blocking(move || state.revoke(&r)).await?;
        tracing::info!(admin = %by.id, approved_by = ?allowed.approved_by.map(|a| a.to_string()), seq = ev.seq, %target, "admin revoked");
        Ok(pb::RevokeResponse {
            seq: ev.seq,
            committed_at_unix_ms: ev.committed_at_unix_ms,
        })
    }

    pub(crate) async fn exec_join_token(
        &self,
        by: &Caller,
        allowed: Allowed,
        id: SpiffeId,
        ttl_secs: u64,
    ) -> Result<pb::CreateJoinTokenResponse, Error> {
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

    pub(crate) async fn exec_grant_custody(
        &self,
        by: &Caller,
        allowed: Allowed,
        cache_id: SpiffeId,
    ) -> Result<pb::GrantCustodyResponse, Error> {
        let state = self.state.clone();
        let (by_id, approved_by, id) =
            (by.id.clone(), allowed.approved_by.clone(), cache_id.clone());
        let (record, secrets) =
            blocking(move || state.grant_custody(&id, &by_id, approved_by.as_ref())).await?;
        tracing::info!(admin = %by.id, approved_by = ?allowed.approved_by.map(|a| a.to_string()), cache_id = %cache_id, secrets, "cache granted custody of its region's secrets");
        let at = match record.custody {
            crate::registry::Custody::Granted { at_unix_ms, .. } => at_unix_ms,
            _ => 0,
        };
        Ok(pb::GrantCustodyResponse {
            cache_id: cache_id.to_string(),
            granted_at_unix_ms: at,
            secrets,
        })
    }

    pub(crate) async fn exec_issue_admin(
        &self,
        by: &Caller,
        allowed: Allowed,
        r: pb::IssueAdminCertificateRequest,
    ) -> Result<pb::IssueAdminCertificateResponse, Error> {
        let (id, attrs) = parse_admin_request(&r)?;
        let ttl = self.admin_cert_ttl(r.ttl_secs);
        let state = self.state.clone();
        let (cert_id, csr) = (id.clone(), r.csr);
        let cert = blocking(move || state.issue_admin_cert(&csr, &cert_id, &attrs, ttl)).await?;
        let info = inspect(&cert).map_err(|e| Error::Internal(e.to_string()))?;
        tracing::info!(admin = %by.id, approved_by = ?allowed.approved_by.map(|a| a.to_string()), new_admin = %id, roles = ?info.org_unit, "admin certificate issued");
        Ok(pb::IssueAdminCertificateResponse {
            cert,
            root: self.state.root.cert_der().to_vec(),
            not_after_unix: unix_secs(info.not_after),
        })
    }
}
