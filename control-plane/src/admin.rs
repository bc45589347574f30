//! The `Admin` service. Every call is a Cedar admin action decided by the
//! policy in force, for the roles and regions that the caller's admin
//! certificate carries. A call that policy allows only with a second
//! admin's approval is stored and answered FAILED_PRECONDITION with the
//! request id; `Approve` by another admin runs it, and both names are kept
//! (in the policy release itself, and in the logs).

//!
//! `gate` is the engine, `approve` runs an approved request, `exec` holds
//! the effects and `secrets` the secret changes; the handlers are in
//! `api::admin`. This file parses the requests both handlers and approvals
//! read.

mod approve;
mod exec;
mod gate;
mod secrets;

use lattice_shared::id::{Role, SpiffeId};
use lattice_shared::pki::MAX_DER_LEN;
use lattice_shared::policy::{AdminAttributes, AdminRole, BundleFiles};
use lattice_shared::proto as pb;

use crate::Error;
pub(crate) use gate::{DenialLimiter, check_message, region_of};
pub(crate) use secrets::{SecretOutcome, check_name};

pub(crate) fn bundle_of(r: &pb::PushPolicyRequest) -> Result<BundleFiles, Error> {
    BundleFiles::from_proto(
        r.bundle
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("bundle is required".into()))?,
    )
    .map_err(|e| Error::InvalidArgument(e.to_string()))
}

pub(crate) fn parse_revocation(
    r: Option<&pb::Revocation>,
) -> Result<lattice_shared::revocation::Revocation, Error> {
    let r = r.ok_or_else(|| Error::InvalidArgument("revocation is required".into()))?;
    lattice_shared::revocation::Revocation::try_from(r)
        .map_err(|e| Error::InvalidArgument(e.to_string()))
}

pub(crate) fn revocation_region(r: &lattice_shared::revocation::Revocation) -> String {
    use lattice_shared::revocation::Target;
    match &r.target {
        Target::Agent(id) | Target::Cache(id) => region_of(id),
        Target::SubjectBefore { subject, .. } => region_of(subject),
        _ => String::new(),
    }
}

/// The id of a cache (`spiffe://TD/cache/REGION/NAME`).
pub(crate) fn parse_cache_id(s: &str) -> Result<SpiffeId, Error> {
    let id = SpiffeId::parse(s).map_err(|e| Error::InvalidArgument(format!("cache_id: {e}")))?;
    if id.role() != Role::Cache {
        return Err(Error::InvalidArgument(format!(
            "{id} is not a cache id (spiffe://TD/cache/REGION/NAME)"
        )));
    }
    Ok(id)
}

/// The admin action a join token for `id` is: a cache is a new authority
/// (`EnrolCache`), an agent is not (`CreateJoinToken`).
pub(crate) fn join_token_action(id: &SpiffeId) -> lattice_shared::policy::AdminAction {
    if id.role() == Role::Cache {
        lattice_shared::policy::AdminAction::EnrolCache
    } else {
        lattice_shared::policy::AdminAction::CreateJoinToken
    }
}

pub(crate) fn parse_admin_request(
    r: &pb::IssueAdminCertificateRequest,
) -> Result<(SpiffeId, AdminAttributes), Error> {
    let id = SpiffeId::parse(&r.id).map_err(|e| Error::InvalidArgument(format!("id: {e}")))?;
    if id.role() != Role::Admin {
        return Err(Error::InvalidArgument(format!(
            "{id} is not an admin id (spiffe://TD/admin/NAME)"
        )));
    }
    if r.roles.is_empty() || r.roles.len() > AdminRole::ALL.len() {
        return Err(Error::InvalidArgument(
            "roles: give one to four roles".into(),
        ));
    }
    if r.regions.len() > 64 {
        return Err(Error::InvalidArgument("regions: at most 64".into()));
    }
    if r.csr.is_empty() || r.csr.len() > MAX_DER_LEN {
        return Err(Error::InvalidArgument(format!(
            "csr must be 1..={MAX_DER_LEN} bytes"
        )));
    }
    lattice_shared::pki::check_csr(&r.csr)
        .map_err(|e| Error::InvalidArgument(format!("csr: {e}")))?;
    let mut attrs = AdminAttributes::default();
    for role in &r.roles {
        attrs
            .roles
            .push(role.parse().map_err(Error::InvalidArgument)?);
    }
    for region in &r.regions {
        lattice_shared::id::RegionId::new(region)
            .map_err(|e| Error::InvalidArgument(format!("region {region:?}: {e}")))?;
        attrs.regions.push(region.clone());
    }
    attrs.roles.sort();
    attrs.roles.dedup();
    Ok((id, attrs))
}

impl crate::api::Service {
    /// The lifetime an admin certificate asked for with `ttl_secs` gets:
    /// the configured default for 0, never more than that.
    pub(crate) fn admin_cert_ttl(&self, ttl_secs: u64) -> std::time::Duration {
        let cap = self.state.cfg.admin_cert_ttl_days.saturating_mul(86400);
        std::time::Duration::from_secs(if ttl_secs == 0 {
            cap
        } else {
            ttl_secs.min(cap)
        })
    }

    /// What the call whose request is `payload` would grant: for
    /// `IssueAdminCertificate` its roles, regions and lifetime as issued
    /// (Cedar decides on them); nothing for every other action.
    pub(crate) fn grant_of(
        &self,
        action: lattice_shared::policy::AdminAction,
        payload: &[u8],
    ) -> Result<lattice_shared::policy::AdminGrant, Error> {
        use prost::Message;
        if action != lattice_shared::policy::AdminAction::IssueAdminCertificate {
            return Ok(Default::default());
        }
        let r = pb::IssueAdminCertificateRequest::decode(payload)
            .map_err(|e| Error::Internal(format!("admin certificate request: {e}")))?;
        let (_, attrs) = parse_admin_request(&r)?;
        Ok(lattice_shared::policy::AdminGrant {
            roles: attrs.roles,
            regions: attrs.regions,
            ttl_secs: self.admin_cert_ttl(r.ttl_secs).as_secs(),
        })
    }
}
