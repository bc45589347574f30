//! The request vocabulary: agent and admin actions, admin roles and the
//! certificate attributes that carry them, the requests the cache and the
//! control plane build, and the outcome of a decision. Plain data.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::Posture;
use crate::id::SpiffeId;

/// The agent actions the lattice evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AgentAction {
    Enrol,
    IssueCertificate,
    MintToken,
    ExchangeToken,
    LeaseSecret,
}

impl AgentAction {
    pub const ALL: [AgentAction; 5] = [
        AgentAction::Enrol,
        AgentAction::IssueCertificate,
        AgentAction::MintToken,
        AgentAction::ExchangeToken,
        AgentAction::LeaseSecret,
    ];
    pub fn name(self) -> &'static str {
        match self {
            AgentAction::Enrol => "Enrol",
            AgentAction::IssueCertificate => "IssueCertificate",
            AgentAction::MintToken => "MintToken",
            AgentAction::ExchangeToken => "ExchangeToken",
            AgentAction::LeaseSecret => "LeaseSecret",
        }
    }
    pub(super) fn resource_type(self) -> &'static str {
        match self {
            AgentAction::Enrol | AgentAction::IssueCertificate => "Region",
            AgentAction::MintToken | AgentAction::ExchangeToken => "Audience",
            AgentAction::LeaseSecret => "Secret",
        }
    }
}

/// The admin actions: every change an operator makes is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AdminAction {
    PushPolicy,
    RollbackPolicy,
    ReadPolicy,
    PutSecret,
    RotateSecret,
    RotateKmsKey,
    Revoke,
    CreateJoinToken,
    IssueAdminCertificate,
    Approve,
    ReadStatus,
    ReadAudit,
    /// A join token for a cache: a new authority in a region.
    EnrolCache,
    /// Custody: a cache is sealed the secrets of its region.
    HoldSecret,
}

impl AdminAction {
    pub const ALL: [AdminAction; 14] = [
        AdminAction::PushPolicy,
        AdminAction::RollbackPolicy,
        AdminAction::ReadPolicy,
        AdminAction::PutSecret,
        AdminAction::RotateSecret,
        AdminAction::RotateKmsKey,
        AdminAction::Revoke,
        AdminAction::CreateJoinToken,
        AdminAction::IssueAdminCertificate,
        AdminAction::Approve,
        AdminAction::ReadStatus,
        AdminAction::ReadAudit,
        AdminAction::EnrolCache,
        AdminAction::HoldSecret,
    ];
    pub fn name(self) -> &'static str {
        match self {
            AdminAction::PushPolicy => "PushPolicy",
            AdminAction::RollbackPolicy => "RollbackPolicy",
            AdminAction::ReadPolicy => "ReadPolicy",
            AdminAction::PutSecret => "PutSecret",
            AdminAction::RotateSecret => "RotateSecret",
            AdminAction::RotateKmsKey => "RotateKmsKey",
            AdminAction::Revoke => "Revoke",
            AdminAction::CreateJoinToken => "CreateJoinToken",
            AdminAction::IssueAdminCertificate => "IssueAdminCertificate",
            AdminAction::Approve => "Approve",
            AdminAction::ReadStatus => "ReadStatus",
            AdminAction::ReadAudit => "ReadAudit",
            AdminAction::EnrolCache => "EnrolCache",
            AdminAction::HoldSecret => "HoldSecret",
        }
    }

    /// For an action added after bundles already released: what a bundle
    /// whose schema does not declare it decides instead (what those bundles
    /// decided that call as): a cache join token was a `CreateJoinToken`;
    /// custody, new, is a custodian's act like a KMS key rotation.
    pub fn predecessor(self) -> Option<AdminAction> {
        match self {
            AdminAction::EnrolCache => Some(AdminAction::CreateJoinToken),
            AdminAction::HoldSecret => Some(AdminAction::RotateKmsKey),
            _ => None,
        }
    }
    pub(super) fn resource_type(self) -> &'static str {
        match self {
            AdminAction::PutSecret | AdminAction::RotateSecret => "Secret",
            _ => "ControlPlane",
        }
    }
}

/// Either kind of action, by its Cedar name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Agent(AgentAction),
    Admin(AdminAction),
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        AgentAction::ALL
            .iter()
            .find(|a| a.name() == s)
            .map(|a| Action::Agent(*a))
            .or_else(|| {
                AdminAction::ALL
                    .iter()
                    .find(|a| a.name() == s)
                    .map(|a| Action::Admin(*a))
            })
            .ok_or_else(|| format!("unknown action {s:?}"))
    }
}

/// Admin roles, carried in admin certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdminRole {
    PlatformAdmin,
    SecretCustodian,
    RegionalOperator,
    Auditor,
}

impl AdminRole {
    pub const ALL: [AdminRole; 4] = [
        AdminRole::PlatformAdmin,
        AdminRole::SecretCustodian,
        AdminRole::RegionalOperator,
        AdminRole::Auditor,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::PlatformAdmin => "platform-admin",
            AdminRole::SecretCustodian => "secret-custodian",
            AdminRole::RegionalOperator => "regional-operator",
            AdminRole::Auditor => "auditor",
        }
    }
}

impl FromStr for AdminRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        AdminRole::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown admin role {s:?} (one of platform-admin, secret-custodian, regional-operator, auditor)"
                )
            })
    }
}

impl std::fmt::Display for AdminRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an admin certificate says of its holder: roles, and the regions a
/// regional operator is confined to. Encoded in the subject's OU as
/// `roles=a,b;regions=x,y`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminAttributes {
    pub roles: Vec<AdminRole>,
    pub regions: Vec<String>,
}

impl AdminAttributes {
    pub fn to_org_unit(&self) -> String {
        let roles: Vec<&str> = self.roles.iter().map(|r| r.as_str()).collect();
        format!(
            "roles={};regions={}",
            roles.join(","),
            self.regions.join(",")
        )
    }

    /// Unknown roles are refused, not skipped: a certificate is read as a whole.
    pub fn from_org_unit(ou: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for part in ou.split(';') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("admin attributes {ou:?} are malformed"))?;
            let items = v.split(',').filter(|s| !s.is_empty());
            match k {
                "roles" => {
                    for r in items {
                        out.roles.push(r.parse()?);
                    }
                }
                "regions" => {
                    for r in items {
                        crate::id::RegionId::new(r).map_err(|e| e.to_string())?;
                        out.regions.push(r.to_string());
                    }
                }
                _ => return Err(format!("unknown admin attribute {k:?}")),
            }
        }
        out.roles.sort();
        out.roles.dedup();
        Ok(out)
    }

    /// The attributes of an admin's certificate (none: no roles).
    pub fn of_cert(cert: &crate::pki::CertInfo) -> Result<Self, String> {
        match &cert.org_unit {
            Some(ou) => Self::from_org_unit(ou),
            None => Ok(Self::default()),
        }
    }
}

/// A request by an agent, as its cache sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentRequest {
    pub principal: SpiffeId,
    pub action: AgentAction,
    /// Audience, secret or region name, by action.
    pub resource: String,
    /// The evaluating cache's region.
    pub region: String,
    pub source_ip: IpAddr,
    pub ttl_secs: u64,
    pub scopes: Vec<String>,
    pub posture: Posture,
    pub job_type: String,
    pub hour_utc: u8,
    pub weekday: u8,
    /// Length of the `act` chain of the token a request would issue: 0 for
    /// everything but token exchange.
    pub delegation_depth: u32,
}

/// UTC hour (0–23) and ISO weekday (1 = Monday … 7 = Sunday) of `t`.
pub fn hour_and_weekday(t: SystemTime) -> (u8, u8) {
    let secs = crate::clock::unix_secs(t);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(dt) => (dt.hour(), dt.weekday().number_from_monday()),
        Err(_) => (0, 1),
    }
}

/// One approval of a pending admin request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    pub admin: SpiffeId,
    pub roles: Vec<AdminRole>,
}

/// A request by an admin, identified by the certificate of the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRequest {
    pub principal: SpiffeId,
    pub roles: Vec<AdminRole>,
    /// Regions a regional operator is confined to (from the certificate).
    pub regions: Vec<String>,
    pub action: AdminAction,
    /// The secret name for secret actions; ignored otherwise.
    pub resource: String,
    pub target_region: String,
    pub source_ip: IpAddr,
    pub approvals: Vec<Approval>,
    pub hour_utc: u8,
    pub weekday: u8,
    /// What an `IssueAdminCertificate` would grant (empty for every other
    /// action): `context.granted_roles`, `granted_regions`, `ttl_secs`.
    pub grant: AdminGrant,
}

/// The roles, regions and lifetime a new admin certificate would carry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminGrant {
    pub roles: Vec<AdminRole>,
    pub regions: Vec<String>,
    /// The certificate's lifetime as it would be issued (after defaults and
    /// the configured cap).
    pub ttl_secs: u64,
}

/// The outcome of one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// The bundle version that decided.
    pub version: u64,
    /// Ids of the policies that determined the outcome (the permits for an
    /// allow, the forbids for an explicit deny; empty when nothing permitted).
    pub policies: Vec<String>,
    /// Evaluation errors (they deny).
    pub errors: Vec<String>,
}

impl Outcome {
    /// A message for the caller of a denied request.
    pub fn denial(&self) -> String {
        format!(
            "denied by policy version {}: {}",
            self.version,
            self.reason()
        )
    }

    /// Why it was denied, without the version.
    pub fn reason(&self) -> String {
        if !self.errors.is_empty() {
            format!("evaluation error in {}", self.errors.join("; "))
        } else if self.policies.is_empty() {
            "no policy permits this request".to_string()
        } else {
            format!("forbidden by {}", self.policies.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_attributes_round_trip_and_refuse_unknown_roles() {
        let a = AdminAttributes {
            roles: vec![AdminRole::PlatformAdmin, AdminRole::Auditor],
            regions: vec!["eu".into()],
        };
        assert_eq!(AdminAttributes::from_org_unit(&a.to_org_unit()), Ok(a));
        assert!(AdminAttributes::from_org_unit("roles=root").is_err());
        assert!(AdminAttributes::from_org_unit("garbage").is_err());
    }
}
