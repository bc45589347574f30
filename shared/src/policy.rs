//! Policy as code: Cedar bundles (policies, schema, entity data, named test
//! cases), their compilation into an [`Engine`] that decides requests, and
//! the contract between a bundle and the lattice.
//!
//! The lattice builds every request itself (principal entity, context) from
//! facts it has verified or been told; a bundle is accepted only if its
//! schema accepts those requests, so that strict validation rules out type
//! errors at evaluation. Any evaluation error still denies (fail closed):
//! Cedar skips a policy that errors, which for a `forbid` would mean allow.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::SystemTime;

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, Policy, PolicyId, PolicySet, Request, ResourceConstraint, RestrictedExpression,
    Schema, ValidationMode, Validator,
};
use serde::{Deserialize, Serialize};

use crate::id::{Role, SpiffeId};

pub mod sign;

pub const SCHEMA_FILE: &str = "schema.cedarschema";
pub const ENTITIES_FILE: &str = "entities.json";
pub const TESTS_FILE: &str = "tests.json";
/// Largest bundle (all files together), file count and file size.
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;
pub const MAX_FILES: usize = 256;
pub const MAX_FILE_NAME: usize = 128;
pub const MAX_TEST_CASES: usize = 10_000;

const NS: &str = "Lattice";

/// The bundle a new control plane starts with (see `shared/policies/default`).
pub fn default_bundle() -> BundleFiles {
    BundleFiles::from_files([
        (
            SCHEMA_FILE.to_string(),
            include_str!("../policies/default/schema.cedarschema").to_string(),
        ),
        (
            "lattice.cedar".to_string(),
            include_str!("../policies/default/lattice.cedar").to_string(),
        ),
        (
            ENTITIES_FILE.to_string(),
            include_str!("../policies/default/entities.json").to_string(),
        ),
        (
            TESTS_FILE.to_string(),
            include_str!("../policies/default/tests.json").to_string(),
        ),
    ])
    .expect("the built-in default bundle is well-formed") // checked by a unit test
}

/// The lattice schema, as the default bundle carries it.
pub fn lattice_schema_text() -> &'static str {
    include_str!("../policies/default/schema.cedarschema")
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("bundle: {0}")]
    Bundle(String),
    #[error("{0}")]
    Rejected(Report),
    #[error("policy signature: {0}")]
    Signature(String),
    #[error("reading {path}: {err}")]
    Io { path: String, err: std::io::Error },
}

/// Why a bundle was refused: one line per problem, ready to print.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub problems: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "bundle refused, {} problem(s):", self.problems.len())?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Bundle files.

/// The files of a bundle by name: `*.cedar` policies, the schema, the entity
/// data and the test cases. Ordered, so that its encoding and digest are
/// canonical.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleFiles {
    files: BTreeMap<String, String>,
}

fn is_bundle_file(name: &str) -> bool {
    name.ends_with(".cedar") || name == SCHEMA_FILE || name == ENTITIES_FILE || name == TESTS_FILE
}

impl BundleFiles {
    pub fn from_files(
        files: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, PolicyError> {
        let mut out = BTreeMap::new();
        let mut total = 0usize;
        for (name, content) in files {
            if name.is_empty()
                || name.len() > MAX_FILE_NAME
                || name.contains(['/', '\\'])
                || name.starts_with('.')
                || !is_bundle_file(&name)
            {
                return Err(PolicyError::Bundle(format!(
                    "{name:?} is not a bundle file name (*.cedar, {SCHEMA_FILE}, {ENTITIES_FILE}, {TESTS_FILE})"
                )));
            }
            total += name.len() + content.len();
            if total > MAX_BUNDLE_BYTES {
                return Err(PolicyError::Bundle(format!(
                    "bundle is larger than {MAX_BUNDLE_BYTES} bytes"
                )));
            }
            if out.insert(name.clone(), content).is_some() {
                return Err(PolicyError::Bundle(format!("{name:?} appears twice")));
            }
            if out.len() > MAX_FILES {
                return Err(PolicyError::Bundle(format!("more than {MAX_FILES} files")));
            }
        }
        Ok(Self { files: out })
    }

    /// Reads the bundle files of `dir` (not recursive; other files such as a
    /// README are ignored).
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        let io = |err| PolicyError::Io {
            path: dir.display().to_string(),
            err,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.file_type().map_err(io)?.is_file() || !is_bundle_file(&name) {
                continue;
            }
            let path = entry.path();
            let meta = std::fs::metadata(&path).map_err(io)?;
            if meta.len() > MAX_BUNDLE_BYTES as u64 {
                return Err(PolicyError::Bundle(format!(
                    "{} is larger than {MAX_BUNDLE_BYTES} bytes",
                    path.display()
                )));
            }
            let content = std::fs::read_to_string(&path).map_err(|err| PolicyError::Io {
                path: path.display().to_string(),
                err,
            })?;
            files.push((name, content));
        }
        Self::from_files(files)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.files.get(name).map(String::as_str)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.files.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
    pub fn len(&self) -> usize {
        self.files.len()
    }
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn to_proto(&self) -> crate::proto::PolicyBundleFiles {
        crate::proto::PolicyBundleFiles {
            files: self
                .files
                .iter()
                .map(|(path, content)| crate::proto::PolicyFile {
                    path: path.clone(),
                    content: content.clone(),
                })
                .collect(),
        }
    }

    pub fn from_proto(p: &crate::proto::PolicyBundleFiles) -> Result<Self, PolicyError> {
        Self::from_files(p.files.iter().map(|f| (f.path.clone(), f.content.clone())))
    }

    /// SHA-256 of the canonical encoding (files sorted by name).
    pub fn sha256(&self) -> [u8; 32] {
        use prost::Message;
        crate::pki::sha256(&self.to_proto().encode_to_vec())
    }

    /// A readable, line-level diff from `self` to `new`.
    pub fn diff(&self, new: &BundleFiles) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let names: std::collections::BTreeSet<&String> =
            self.files.keys().chain(new.files.keys()).collect();
        for name in names {
            let old = self.files.get(name).map(String::as_str).unwrap_or("");
            let newer = new.files.get(name).map(String::as_str).unwrap_or("");
            if old == newer {
                continue;
            }
            let d = similar::TextDiff::from_lines(old, newer);
            let _ = write!(
                out,
                "{}",
                d.unified_diff()
                    .context_radius(3)
                    .header(&format!("a/{name}"), &format!("b/{name}"))
            );
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Requests.

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
    fn resource_type(self) -> &'static str {
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
}

impl AdminAction {
    pub const ALL: [AdminAction; 12] = [
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
        }
    }
    fn resource_type(self) -> &'static str {
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

/// Device posture reported by an agent. Unreported claims are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Posture {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_patched: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_encrypted: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
}

pub const MAX_POSTURE_STRING: usize = 128;
pub const MAX_JOB_TYPE: usize = 128;

impl Posture {
    pub fn from_proto(p: &crate::proto::Posture) -> Result<Self, String> {
        if p.os_version
            .as_ref()
            .is_some_and(|v| v.len() > MAX_POSTURE_STRING)
        {
            return Err(format!(
                "posture.os_version is longer than {MAX_POSTURE_STRING} bytes"
            ));
        }
        Ok(Self {
            os_patched: p.os_patched,
            disk_encrypted: p.disk_encrypted,
            secure_boot: p.secure_boot,
            os_version: p.os_version.clone(),
        })
    }
    pub fn to_proto(&self) -> crate::proto::Posture {
        crate::proto::Posture {
            os_patched: self.os_patched,
            disk_encrypted: self.disk_encrypted,
            secure_boot: self.secure_boot,
            os_version: self.os_version.clone(),
        }
    }
    fn expr(&self) -> RestrictedExpression {
        let mut fields: Vec<(String, RestrictedExpression)> = Vec::new();
        for (k, v) in [
            ("os_patched", self.os_patched),
            ("disk_encrypted", self.disk_encrypted),
            ("secure_boot", self.secure_boot),
        ] {
            if let Some(v) = v {
                fields.push((k.into(), RestrictedExpression::new_bool(v)));
            }
        }
        if let Some(v) = &self.os_version {
            fields.push((
                "os_version".into(),
                RestrictedExpression::new_string(v.clone()),
            ));
        }
        // Keys are distinct by construction.
        RestrictedExpression::new_record(fields).unwrap_or_else(|_| {
            RestrictedExpression::new_record(Vec::<(String, RestrictedExpression)>::new())
                .expect("an empty record is valid")
        })
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

// ---------------------------------------------------------------------------
// Cedar helpers.

const TYPES: [&str; 9] = [
    "Agent",
    "Cache",
    "Admin",
    "Role",
    "Region",
    "ControlPlane",
    "Audience",
    "Secret",
    "Action",
];

/// Type names parsed once: parsing one runs Cedar's parser, which costs
/// more than a whole decision.
static TYPE_NAMES: std::sync::LazyLock<HashMap<&'static str, EntityTypeName>> =
    std::sync::LazyLock::new(|| {
        TYPES
            .iter()
            .map(|t| {
                (
                    *t,
                    EntityTypeName::from_str(&format!("{NS}::{t}"))
                        .expect("lattice type names are valid"), // fixed names
                )
            })
            .collect()
    });

static ACTION_UIDS: std::sync::LazyLock<HashMap<&'static str, EntityUid>> =
    std::sync::LazyLock::new(|| {
        AgentAction::ALL
            .iter()
            .map(|a| a.name())
            .chain(AdminAction::ALL.iter().map(|a| a.name()))
            .map(|n| (n, uid("Action", n)))
            .collect()
    });

/// `ip("…")` expressions by address: Cedar resolves the extension's name
/// with its parser on every construction, which costs a sixth of a
/// decision. Bounded: cleared when full.
static IP_EXPRS: std::sync::LazyLock<std::sync::Mutex<HashMap<IpAddr, RestrictedExpression>>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(HashMap::new()));
const MAX_IP_EXPRS: usize = 4096;

fn ip_expr(ip: IpAddr) -> RestrictedExpression {
    let mut g = IP_EXPRS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = g.get(&ip) {
        return e.clone();
    }
    if g.len() >= MAX_IP_EXPRS {
        g.clear();
    }
    let e = RestrictedExpression::new_ip(ip.to_string());
    g.insert(ip, e.clone());
    e
}

fn type_name(t: &str) -> EntityTypeName {
    match TYPE_NAMES.get(t) {
        Some(n) => n.clone(),
        None => {
            EntityTypeName::from_str(&format!("{NS}::{t}")).expect("lattice type names are valid")
        } // callers pass the names above
    }
}

fn uid(t: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(type_name(t), EntityId::new(id))
}

fn action_uid(name: &str) -> EntityUid {
    match ACTION_UIDS.get(name) {
        Some(u) => u.clone(),
        None => uid("Action", name),
    }
}

/// The time fields every context carries.
fn time_pairs(hour_utc: u8, weekday: u8) -> [(String, RestrictedExpression); 2] {
    [
        (
            "hour_utc".to_string(),
            RestrictedExpression::new_long(hour_utc.into()),
        ),
        (
            "weekday".to_string(),
            RestrictedExpression::new_long(weekday.into()),
        ),
    ]
}

fn string_set(items: impl IntoIterator<Item = String>) -> RestrictedExpression {
    RestrictedExpression::new_set(items.into_iter().map(RestrictedExpression::new_string))
}

fn read_string_set(e: &Entity, attr: &str) -> Vec<String> {
    match e.attr(attr) {
        Some(Ok(cedar_policy::EvalResult::Set(s))) => s
            .iter()
            .filter_map(|v| match v {
                cedar_policy::EvalResult::String(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn read_string(e: &Entity, attr: &str) -> Option<String> {
    match e.attr(attr) {
        Some(Ok(cedar_policy::EvalResult::String(s))) => Some(s),
        _ => None,
    }
}

/// Named test cases of a bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    pub name: String,
    pub principal: String,
    pub action: String,
    /// Audience, secret or region name; for admin actions other than secret
    /// ones it is ignored.
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub context: TestContext,
    /// Roles of an admin principal.
    #[serde(default)]
    pub roles: Vec<AdminRole>,
    /// Regions of an admin principal (regional operators).
    #[serde(default)]
    pub regions: Vec<String>,
    /// Approvals already given (admin actions).
    #[serde(default)]
    pub approvals: Vec<TestApproval>,
    pub expect: Expect,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TestApproval {
    pub admin: String,
    #[serde(default)]
    pub roles: Vec<AdminRole>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Allow,
    Deny,
}

/// The request context of a test case; absent fields take defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TestContext {
    /// The cache's region (default: the principal's).
    pub region: Option<String>,
    /// Default 127.0.0.1.
    pub source_ip: Option<IpAddr>,
    /// Default 300.
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub posture: Posture,
    #[serde(default)]
    pub job_type: String,
    /// RFC 3339 UTC time (default: a Monday at 12:00 UTC).
    pub time: Option<String>,
    #[serde(default)]
    pub target_region: String,
    /// Token exchange: the `act` chain length of the token asked for.
    #[serde(default)]
    pub delegation_depth: u32,
}

/// The result of a bundle's test cases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestReport {
    pub passed: Vec<String>,
    /// (name, what happened)
    pub failed: Vec<(String, String)>,
}

impl TestReport {
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

impl std::fmt::Display for TestReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for n in &self.passed {
            writeln!(f, "  ok    {n}")?;
        }
        for (n, why) in &self.failed {
            writeln!(f, "  FAIL  {n}: {why}")?;
        }
        write!(
            f,
            "{} passed, {} failed",
            self.passed.len(),
            self.failed.len()
        )
    }
}

// ---------------------------------------------------------------------------
// The engine.

/// Policies indexed by (action, resource): a policy is left out of a slice
/// only when its scope cannot match the slice's requests (`action == A` or
/// `action in [..]` with no group holding the slice's action, `resource ==
/// R` for another R), and such a policy is never satisfied and never
/// errs, so each slice decides exactly as the whole set would.
#[derive(Debug, Default)]
struct Slices {
    /// action name → (resource uid → policies, policies for other resources)
    by_action: HashMap<String, (HashMap<EntityUid, Slice>, Slice)>,
}

#[derive(Debug)]
struct Slice {
    set: PolicySet,
    /// The context attributes its policies can read; `None`: the context
    /// may be used whole, so every attribute is built.
    reads: Option<HashSet<String>>,
}

/// Each policy's `context_reads`, by id (worked out once per bundle).
type Reads = HashMap<PolicyId, Option<HashSet<String>>>;

impl Slice {
    fn new(policies: Vec<Policy>, each: &Reads) -> Result<Self, String> {
        let mut reads = Some(HashSet::new());
        for p in &policies {
            match (each.get(p.id()).cloned().flatten(), reads.as_mut()) {
                (Some(r), Some(all)) => all.extend(r),
                _ => reads = None,
            }
        }
        let set = PolicySet::from_policies(policies).map_err(|e| e.to_string())?;
        Ok(Self { set, reads })
    }
}

/// The context attributes a policy reads, from its JSON form: `context.a`
/// and `context has a` name `a`; `context` anywhere else (compared, put in
/// a set, ...) means it is used whole: `None`. Leaving out of a request's
/// context only attributes that no policy of its slice names cannot change
/// a decision; a wrong answer here could (a forbid reading a missing
/// attribute errs and is skipped), so anything unexpected answers `None`.
fn context_reads(p: &Policy) -> Option<HashSet<String>> {
    use serde_json::Value;
    fn is_context(v: &Value) -> bool {
        v.as_object().is_some_and(|m| {
            m.len() == 1 && m.get("Var").and_then(Value::as_str) == Some("context")
        })
    }
    /// False when `context` is used whole.
    fn walk(v: &Value, out: &mut HashSet<String>) -> bool {
        match v {
            Value::Object(m) => {
                if is_context(v) {
                    return false;
                }
                if m.len() == 1 {
                    for op in [".", "has"] {
                        if let Some(Value::Object(inner)) = m.get(op)
                            && inner.get("left").is_some_and(is_context)
                        {
                            return match inner.get("attr").and_then(Value::as_str) {
                                Some(a) if inner.len() == 2 => {
                                    out.insert(a.to_string());
                                    true
                                }
                                _ => false,
                            };
                        }
                    }
                }
                m.values().all(|x| walk(x, out))
            }
            Value::Array(a) => a.iter().all(|x| walk(x, out)),
            _ => true,
        }
    }
    let json = p.to_json().ok()?;
    let mut out = HashSet::new();
    walk(&json, &mut out).then_some(out)
}

impl Slices {
    /// `entities` must hold the schema's action entities: `action in G`
    /// holds for the groups among an action's ancestors.
    fn build(set: &PolicySet, actions: &[&str], entities: &Entities) -> Result<Self, String> {
        let each: Reads = set
            .policies()
            .map(|p| (p.id().clone(), context_reads(p)))
            .collect();
        let mut by_action = HashMap::new();
        for a in actions {
            let a_uid = action_uid(a);
            // The action and every group it belongs to, transitively; an
            // action the entities do not hold keeps every `in` policy.
            let groups: Option<HashSet<EntityUid>> = entities.get(&a_uid).map(|_| {
                entities
                    .ancestors(&a_uid)
                    .into_iter()
                    .flatten()
                    .cloned()
                    .chain([a_uid.clone()])
                    .collect()
            });
            let mut named: HashMap<EntityUid, Vec<Policy>> = HashMap::new();
            let mut rest: Vec<Policy> = Vec::new();
            for p in set.policies() {
                let applies = match p.action_constraint() {
                    ActionConstraint::Eq(u) => u == a_uid,
                    ActionConstraint::In(list) => groups
                        .as_ref()
                        .is_none_or(|g| list.iter().any(|u| g.contains(u))),
                    ActionConstraint::Any => true,
                };
                if !applies {
                    continue;
                }
                match p.resource_constraint() {
                    ResourceConstraint::Eq(u) => named.entry(u).or_default().push(p.clone()),
                    _ => rest.push(p.clone()),
                }
            }
            let mut by_res = HashMap::new();
            for (u, ps) in named {
                by_res.insert(
                    u,
                    Slice::new(ps.into_iter().chain(rest.iter().cloned()).collect(), &each)?,
                );
            }
            by_action.insert((*a).to_string(), (by_res, Slice::new(rest, &each)?));
        }
        Ok(Self { by_action })
    }

    fn get(&self, action: &str, resource: &EntityUid) -> Option<&Slice> {
        let (named, rest) = self.by_action.get(action)?;
        Some(named.get(resource).unwrap_or(rest))
    }
}

/// A compiled, validated bundle: decides requests.
pub struct Engine {
    version: u64,
    sha256: [u8; 32],
    files: BundleFiles,
    schema: Schema,
    policies: PolicySet,
    slices: Slices,
    entities: Entities,
    /// Evaluate against every entity (entity-valued attributes present)
    /// instead of the per-request slice.
    full_store: bool,
    tests: Vec<TestCase>,
    authorizer: Authorizer,
    policy_count: usize,
    /// The entities an agent request reaches, by (agent, resource type,
    /// resource, action): they depend on the bundle and those four only
    /// (never on the request's context), so a new bundle, a new engine,
    /// starts empty. Saves rebuilding the agent entity and Cedar's
    /// transitive closure on requests whose context is new.
    reach: Reach,
}

type ReachKey = (String, &'static str, String, &'static str);

/// Agent request slices an engine keeps (a few KiB each), at most.
const REACH_CAPACITY: usize = 8192;

/// A bounded map in two generations: lookups and inserts are O(1) with no
/// background upkeep (a general cache's eviction work showed as 0.4 ms
/// spikes on cold decisions); when the young generation is full the old
/// one is dropped and the young becomes old, so a slice used since then
/// survives (it is moved back on use).
#[derive(Default)]
struct Reach {
    gens: std::sync::Mutex<[HashMap<ReachKey, std::sync::Arc<Entities>>; 2]>,
}

impl Reach {
    fn get(&self, key: &ReachKey) -> Option<std::sync::Arc<Entities>> {
        let mut g = self.gens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = g[0].get(key) {
            return Some(e.clone());
        }
        let e = g[1].remove(key)?;
        g[0].insert(key.clone(), e.clone());
        Some(e)
    }

    fn insert(&self, key: ReachKey, e: std::sync::Arc<Entities>) {
        let dropped = {
            let mut g = self.gens.lock().unwrap_or_else(|p| p.into_inner());
            g[0].insert(key, e);
            if g[0].len() < REACH_CAPACITY / 2 {
                return;
            }
            let young = std::mem::take(&mut g[0]);
            std::mem::replace(&mut g[1], young)
        };
        // Freed outside the lock.
        drop(dropped);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let g = self.gens.lock().unwrap_or_else(|p| p.into_inner());
        g[0].len() + g[1].len()
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("version", &self.version)
            .field("sha256", &hex::encode(self.sha256))
            .field("policies", &self.policy_count)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Parses, validates (strict mode) and checks the bundle against the
    /// requests the lattice builds. Every problem found is reported.
    pub fn compile(files: &BundleFiles, version: u64) -> Result<Self, PolicyError> {
        let mut report = Report::default();
        let reject = |r: Report| PolicyError::Rejected(r);

        let Some(schema_text) = files.get(SCHEMA_FILE) else {
            report.problems.push(format!("{SCHEMA_FILE} is missing"));
            return Err(reject(report));
        };
        let schema = match Schema::from_cedarschema_str(schema_text) {
            Ok((s, _warnings)) => s,
            Err(e) => {
                report.problems.push(format!("{SCHEMA_FILE}: {e}"));
                return Err(reject(report));
            }
        };

        // Policies, re-identified by their @id annotation or file:index.
        let mut policies = PolicySet::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut any_policy_file = false;
        for (name, text) in files.iter().filter(|(n, _)| n.ends_with(".cedar")) {
            any_policy_file = true;
            let set = match PolicySet::from_str(text) {
                Ok(s) => s,
                Err(e) => {
                    report.problems.push(format!("{name}: {e}"));
                    continue;
                }
            };
            if set.templates().next().is_some() {
                report
                    .problems
                    .push(format!("{name}: templates are not supported"));
                continue;
            }
            let mut ps: Vec<&Policy> = set.policies().collect();
            // Source order, which the generated ids follow.
            ps.sort_by_key(|p| {
                p.id()
                    .to_string()
                    .trim_start_matches("policy")
                    .parse::<u64>()
                    .unwrap_or(u64::MAX)
            });
            for (i, p) in ps.into_iter().enumerate() {
                let id = match p.annotation("id") {
                    Some(a) => a.to_string(),
                    None => format!("{name}:{i}"),
                };
                if !seen.insert(id.clone()) {
                    report
                        .problems
                        .push(format!("{name}: policy id {id:?} is used twice"));
                    continue;
                }
                if let Err(e) = policies.add(p.new_id(PolicyId::new(&id))) {
                    report.problems.push(format!("{name}: {e}"));
                }
            }
        }
        if !any_policy_file {
            report.problems.push("no .cedar policy file".into());
        }

        let validation = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        for e in validation.validation_errors() {
            report.problems.push(format!("schema violation: {e}"));
        }

        let entities = match Entities::from_json_str(
            files.get(ENTITIES_FILE).unwrap_or("[]"),
            Some(&schema),
        ) {
            Ok(e) => e,
            Err(e) => {
                report.problems.push(format!("{ENTITIES_FILE}: {e}"));
                Entities::empty()
            }
        };
        for e in entities.iter() {
            let t = e.uid().type_name().to_string();
            if t == format!("{NS}::Agent") {
                let id = e.uid().id().unescaped().to_string();
                match SpiffeId::parse(&id) {
                    Ok(sid) if sid.role() == Role::Agent => {
                        let region = sid.region().map(|r| r.to_string()).unwrap_or_default();
                        if read_string(e, "region").as_deref() != Some(region.as_str()) {
                            report.problems.push(format!(
                                "{ENTITIES_FILE}: {id}: region must be {region:?}, the region of its id"
                            ));
                        }
                    }
                    _ => report
                        .problems
                        .push(format!("{ENTITIES_FILE}: {id:?} is not an agent SPIFFE id")),
                }
            }
            if t == format!("{NS}::Admin") {
                report.problems.push(format!(
                    "{ENTITIES_FILE}: {} must not be listed: admin roles and regions come from admin certificates only",
                    e.uid()
                ));
            }
        }
        // Action entities, so that `action in [...]` groups resolve.
        let entities = match schema
            .action_entities()
            .map_err(|e| e.to_string())
            .and_then(|actions| {
                entities
                    .clone()
                    .add_entities(actions, None)
                    .map_err(|e| e.to_string())
            }) {
            Ok(all) => all,
            Err(e) => {
                report.problems.push(format!("{SCHEMA_FILE}: actions: {e}"));
                entities
            }
        };
        // Entity-valued attributes lead policies to entities that no
        // request names; such bundles are evaluated against every entity.
        // So do conditions that name an entity (its attributes could be read,
        // and `has` on an entity outside a slice would read false).
        let names_entities = policies.policies().any(|p| {
            p.to_json()
                .map(|j| {
                    j.get("conditions")
                        .is_some_and(|c| c.to_string().contains("__entity"))
                })
                .unwrap_or(true)
        });
        let full_store = names_entities
            || entities.iter().any(|e| {
                fn holds_entity(v: &cedar_policy::EvalResult) -> bool {
                    match v {
                        cedar_policy::EvalResult::EntityUid(_) => true,
                        cedar_policy::EvalResult::Set(s) => s.iter().any(holds_entity),
                        cedar_policy::EvalResult::Record(r) => {
                            r.iter().any(|(_, v)| holds_entity(v))
                        }
                        _ => false,
                    }
                }
                // An attribute that is not a value is treated as one that may be.
                e.attrs()
                    .any(|(_, v)| v.as_ref().map(holds_entity).unwrap_or(true))
            });

        let tests: Vec<TestCase> = match files.get(TESTS_FILE) {
            None => Vec::new(),
            Some(t) => match serde_json::from_str::<Vec<TestCase>>(t) {
                Ok(v) if v.len() <= MAX_TEST_CASES => v,
                Ok(_) => {
                    report
                        .problems
                        .push(format!("{TESTS_FILE}: more than {MAX_TEST_CASES} cases"));
                    Vec::new()
                }
                Err(e) => {
                    report.problems.push(format!("{TESTS_FILE}: {e}"));
                    Vec::new()
                }
            },
        };

        let mut action_names: Vec<&str> = AgentAction::ALL.iter().map(|a| a.name()).collect();
        action_names.extend(AdminAction::ALL.iter().map(|a| a.name()));
        let slices = Slices::build(&policies, &action_names, &entities).unwrap_or_else(|e| {
            report.problems.push(format!("indexing policies: {e}"));
            Slices::default()
        });

        if !report.problems.is_empty() {
            return Err(reject(report));
        }
        let policy_count = policies.policies().count();
        let engine = Self {
            version,
            sha256: files.sha256(),
            files: files.clone(),
            schema,
            policies,
            slices,
            entities,
            full_store,
            tests,
            authorizer: Authorizer::new(),
            policy_count,
            reach: Reach::default(),
        };
        let contract = engine.contract_problems();
        if !contract.is_empty() {
            return Err(reject(Report { problems: contract }));
        }
        Ok(engine)
    }

    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }
    pub fn files(&self) -> &BundleFiles {
        &self.files
    }
    pub fn policy_count(&self) -> usize {
        self.policy_count
    }

    /// The requests the lattice builds must conform to the bundle's schema:
    /// checked once per action, with posture claims all present and all
    /// absent (so posture attributes must be optional).
    fn contract_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let td = "spiffe://lattice.invalid";
        for action in AgentAction::ALL {
            for posture in [
                Posture::default(),
                Posture {
                    os_patched: Some(true),
                    disk_encrypted: Some(true),
                    secure_boot: Some(true),
                    os_version: Some("1".into()),
                },
            ] {
                let principal = match SpiffeId::parse(&format!("{td}/agent/r/a")) {
                    Ok(p) => p,
                    Err(e) => {
                        out.push(e.to_string());
                        continue;
                    }
                };
                let req = AgentRequest {
                    principal,
                    action,
                    resource: "r".into(),
                    region: "r".into(),
                    source_ip: IpAddr::from([127, 0, 0, 1]),
                    ttl_secs: 1,
                    scopes: vec!["s".into()],
                    posture,
                    job_type: "j".into(),
                    hour_utc: 0,
                    weekday: 1,
                    delegation_depth: 0,
                };
                if let Err(e) = self.agent_parts(&req, true) {
                    out.push(format!(
                        "the schema does not accept the lattice's {} requests: {e}",
                        action.name()
                    ));
                }
            }
        }
        for action in AdminAction::ALL {
            let Ok(principal) = SpiffeId::parse(&format!("{td}/admin/a")) else {
                continue;
            };
            let req = AdminRequest {
                principal,
                roles: vec![AdminRole::Auditor],
                regions: vec!["r".into()],
                action,
                resource: "s".into(),
                target_region: "r".into(),
                source_ip: IpAddr::from([127, 0, 0, 1]),
                approvals: vec![],
                hour_utc: 0,
                weekday: 1,
            };
            if let Err(e) = self.admin_parts(&req, true) {
                out.push(format!(
                    "the schema does not accept the lattice's {} requests: {e}",
                    action.name()
                ));
            }
        }
        // Every Cedar request type must be formed with the same names.
        out.dedup();
        out
    }

    fn agent_entity(&self, id: &SpiffeId) -> Result<Entity, String> {
        let u = uid("Agent", id.as_str());
        let known = self.entities.get(&u);
        let labels = known
            .map(|e| read_string_set(e, "labels"))
            .unwrap_or_default();
        let job_type = known
            .and_then(|e| read_string(e, "job_type"))
            .unwrap_or_default();
        let parents: HashSet<EntityUid> = known
            .map(|e| {
                self.entities
                    .ancestors(&e.uid())
                    .into_iter()
                    .flatten()
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Entity::new(
            u,
            [
                (
                    "region".to_string(),
                    RestrictedExpression::new_string(
                        id.region().map(|r| r.to_string()).unwrap_or_default(),
                    ),
                ),
                ("labels".to_string(), string_set(labels)),
                (
                    "job_type".to_string(),
                    RestrictedExpression::new_string(job_type),
                ),
            ]
            .into_iter()
            .collect(),
            parents,
        )
        .map_err(|e| e.to_string())
    }

    /// An admin entity from the facts of its certificate only.
    fn admin_entity(
        &self,
        id: &SpiffeId,
        roles: &[AdminRole],
        regions: &[String],
    ) -> Result<Entity, String> {
        Entity::new(
            uid("Admin", id.as_str()),
            [
                (
                    "roles".to_string(),
                    string_set(roles.iter().map(|r| r.as_str().to_string())),
                ),
                ("regions".to_string(), string_set(regions.iter().cloned())),
            ]
            .into_iter()
            .collect(),
            roles.iter().map(|r| uid("Role", r.as_str())).collect(),
        )
        .map_err(|e| e.to_string())
    }

    fn resource_entity(&self, ty: &str, name: &str) -> EntityUid {
        uid(ty, name)
    }

    /// Builds the Cedar request and the entities for an agent request.
    fn agent_parts(
        &self,
        req: &AgentRequest,
        with_schema: bool,
    ) -> Result<(Request, std::sync::Arc<Entities>, Option<&Slice>), String> {
        let resource = self.resource_entity(req.action.resource_type(), &req.resource);
        let slice = self.slices.get(req.action.name(), &resource);
        // Only what the deciding slice reads (the schema check wants all).
        let reads = if with_schema {
            None
        } else {
            slice.and_then(|s| s.reads.as_ref())
        };
        let context = self.agent_context(req, reads)?;
        let action = action_uid(req.action.name());
        if with_schema || self.full_store {
            let principal = self.agent_entity(&req.principal)?;
            let (request, entities) =
                self.request_parts(principal, resource, req.action.name(), context, with_schema)?;
            return Ok((request, std::sync::Arc::new(entities), slice));
        }
        let key = (
            req.principal.as_str().to_owned(),
            req.action.resource_type(),
            req.resource.clone(),
            req.action.name(),
        );
        let entities = match self.reach.get(&key) {
            Some(e) => e,
            None => {
                let principal = self.agent_entity(&req.principal)?;
                let e = std::sync::Arc::new(
                    self.request_entities(principal, &resource, &action, None)?,
                );
                self.reach.insert(key, e.clone());
                e
            }
        };
        let request = Request::new(
            uid("Agent", req.principal.as_str()),
            action,
            resource,
            context,
            None,
        )
        .map_err(|e| e.to_string())?;
        Ok((request, entities, slice))
    }

    /// The request's context; with `reads`, only those attributes (those
    /// its slice's policies name): building a Cedar context costs as much
    /// as evaluating a few policies.
    fn agent_context(
        &self,
        req: &AgentRequest,
        reads: Option<&HashSet<String>>,
    ) -> Result<Context, String> {
        let want = |k: &str| reads.is_none_or(|r| r.contains(k));
        let mut pairs: Vec<(String, RestrictedExpression)> = Vec::with_capacity(9);
        let mut add = |k: &str, v: &dyn Fn() -> RestrictedExpression| {
            if want(k) {
                pairs.push((k.to_string(), v()));
            }
        };
        add("region", &|| {
            RestrictedExpression::new_string(req.region.clone())
        });
        add("source_ip", &|| ip_expr(req.source_ip));
        add("ttl_secs", &|| {
            RestrictedExpression::new_long(i64::try_from(req.ttl_secs).unwrap_or(i64::MAX))
        });
        add("scopes", &|| string_set(req.scopes.iter().cloned()));
        add("posture", &|| req.posture.expr());
        add("job_type", &|| {
            RestrictedExpression::new_string(req.job_type.clone())
        });
        add("delegation_depth", &|| {
            RestrictedExpression::new_long(i64::from(req.delegation_depth))
        });
        for (k, v) in time_pairs(req.hour_utc, req.weekday) {
            if want(&k) {
                pairs.push((k, v));
            }
        }
        Context::from_pairs(pairs).map_err(|e| e.to_string())
    }

    fn admin_parts(
        &self,
        req: &AdminRequest,
        with_schema: bool,
    ) -> Result<(Request, Entities), String> {
        let principal = self.admin_entity(&req.principal, &req.roles, &req.regions)?;
        let resource = match req.action.resource_type() {
            "Secret" => self.resource_entity("Secret", &req.resource),
            _ => self.resource_entity("ControlPlane", "control-plane"),
        };
        let approvers: Vec<&Approval> = req
            .approvals
            .iter()
            .filter(|a| a.admin != req.principal)
            .collect();
        let mut approver_roles: Vec<String> = approvers
            .iter()
            .flat_map(|a| a.roles.iter().map(|r| r.as_str().to_string()))
            .collect();
        approver_roles.sort();
        approver_roles.dedup();
        let distinct: HashSet<&SpiffeId> = approvers.iter().map(|a| &a.admin).collect();
        let context = Context::from_pairs(
            [
                ("source_ip".to_string(), ip_expr(req.source_ip)),
                (
                    "target_region".to_string(),
                    RestrictedExpression::new_string(req.target_region.clone()),
                ),
                (
                    "approvals".to_string(),
                    RestrictedExpression::new_long(i64::try_from(distinct.len()).unwrap_or(0)),
                ),
                ("approver_roles".to_string(), string_set(approver_roles)),
            ]
            .into_iter()
            .chain(time_pairs(req.hour_utc, req.weekday)),
        )
        .map_err(|e| e.to_string())?;
        self.request_parts(principal, resource, req.action.name(), context, with_schema)
    }

    /// The Cedar request and the entities it can reach.
    fn request_parts(
        &self,
        principal: Entity,
        resource: EntityUid,
        action: &str,
        context: Context,
        with_schema: bool,
    ) -> Result<(Request, Entities), String> {
        let schema = with_schema.then_some(&self.schema);
        let action = action_uid(action);
        let request = Request::new(
            principal.uid(),
            action.clone(),
            resource.clone(),
            context,
            schema,
        )
        .map_err(|e| e.to_string())?;
        let entities = self.request_entities(principal, &resource, &action, schema)?;
        Ok((request, entities))
    }

    /// The entities a request can reach: the principal as built, the
    /// resource and the action as the bundle holds them, and the ancestors
    /// of each and of the principal's parents (Cedar's entity slicing). No
    /// other entity can be reached: a bundle whose conditions name an entity,
    /// or whose entities hold entity-valued attributes, is evaluated against
    /// every entity instead.
    fn request_entities(
        &self,
        principal: Entity,
        resource: &EntityUid,
        action: &EntityUid,
        schema: Option<&Schema>,
    ) -> Result<Entities, String> {
        if self.full_store {
            return self
                .entities
                .clone()
                .upsert_entities([principal], schema)
                .map_err(|e| e.to_string());
        }
        let mut seen: HashSet<EntityUid> = HashSet::new();
        let mut list: Vec<Entity> = Vec::with_capacity(4);
        seen.insert(principal.uid());
        let mut roots: Vec<EntityUid> = vec![resource.clone(), action.clone()];
        // The principal's parents as built (an admin's roles), so that a
        // hierarchy the bundle gives them is seen.
        roots.extend(principal.clone().into_inner().2);
        roots.extend(
            self.entities
                .get(&principal.uid())
                .map(|_| {
                    self.entities
                        .ancestors(&principal.uid())
                        .into_iter()
                        .flatten()
                        .cloned()
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        );
        for uid in roots {
            if !seen.insert(uid.clone()) {
                continue;
            }
            if let Some(e) = self.entities.get(&uid) {
                list.push(e.clone());
            }
            for a in self.entities.ancestors(&uid).into_iter().flatten() {
                if seen.insert(a.clone())
                    && let Some(e) = self.entities.get(a)
                {
                    list.push(e.clone());
                }
            }
        }
        list.push(principal);
        Entities::from_entities(list, schema).map_err(|e| e.to_string())
    }

    /// Decides with `slice`'s policies, or the whole set without one.
    fn decide(&self, slice: Option<&Slice>, request: &Request, entities: &Entities) -> Outcome {
        let set = slice.map_or(&self.policies, |s| &s.set);
        let resp = self.authorizer.is_authorized(request, set, entities);
        let errors: Vec<String> = resp.diagnostics().errors().map(|e| e.to_string()).collect();
        let mut policies: Vec<String> =
            resp.diagnostics().reason().map(|p| p.to_string()).collect();
        policies.sort();
        Outcome {
            allowed: resp.decision() == Decision::Allow && errors.is_empty(),
            version: self.version,
            policies,
            errors,
        }
    }

    pub fn decide_agent(&self, req: &AgentRequest) -> Outcome {
        match self.agent_parts(req, false) {
            Ok((request, entities, slice)) => self.decide(slice, &request, &entities),
            Err(e) => self.build_error(e),
        }
    }

    pub fn decide_admin(&self, req: &AdminRequest) -> Outcome {
        match self.admin_parts(req, false) {
            Ok((request, entities)) => {
                let slice = request
                    .resource()
                    .and_then(|r| self.slices.get(req.action.name(), r));
                self.decide(slice, &request, &entities)
            }
            Err(e) => self.build_error(e),
        }
    }

    fn build_error(&self, e: String) -> Outcome {
        Outcome {
            allowed: false,
            version: self.version,
            policies: vec![],
            errors: vec![format!("building the request: {e}")],
        }
    }

    /// Runs the bundle's named test cases.
    pub fn run_tests(&self) -> TestReport {
        let mut report = TestReport::default();
        for case in &self.tests {
            match self.run_case(case) {
                Ok(outcome) => {
                    let got = if outcome.allowed {
                        Expect::Allow
                    } else {
                        Expect::Deny
                    };
                    if got == case.expect {
                        report.passed.push(case.name.clone());
                    } else {
                        let why = if outcome.allowed {
                            format!(
                                "expected deny, got allow (permitted by {})",
                                outcome.policies.join(", ")
                            )
                        } else {
                            format!("expected allow, got a denial: {}", outcome.reason())
                        };
                        report.failed.push((case.name.clone(), why));
                    }
                }
                Err(e) => report.failed.push((case.name.clone(), e)),
            }
        }
        report
    }

    fn run_case(&self, case: &TestCase) -> Result<Outcome, String> {
        let principal = SpiffeId::parse(&case.principal).map_err(|e| format!("principal: {e}"))?;
        let action: Action = case.action.parse()?;
        let at = match &case.context.time {
            Some(t) => {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| format!("context.time: {e}"))?
            }
            // Monday 2026-01-05 12:00 UTC.
            None => time::OffsetDateTime::from_unix_timestamp(1_767_614_400)
                .map_err(|e| e.to_string())?,
        };
        let at = at.to_offset(time::UtcOffset::UTC);
        let (hour_utc, weekday) = (at.hour(), at.weekday().number_from_monday());
        let source_ip = case
            .context
            .source_ip
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        match action {
            Action::Agent(action) => {
                if principal.role() != Role::Agent {
                    return Err(format!("{} is not an agent id", case.principal));
                }
                let region = principal
                    .region()
                    .map(|r| r.to_string())
                    .unwrap_or_default();
                Ok(self.decide_agent(&AgentRequest {
                    action,
                    resource: case.resource.clone(),
                    region: case.context.region.clone().unwrap_or(region),
                    source_ip,
                    ttl_secs: case.context.ttl_secs.unwrap_or(300),
                    scopes: case.context.scopes.clone(),
                    posture: case.context.posture.clone(),
                    job_type: case.context.job_type.clone(),
                    hour_utc,
                    weekday,
                    delegation_depth: case.context.delegation_depth,
                    principal,
                }))
            }
            Action::Admin(action) => {
                if principal.role() != Role::Admin {
                    return Err(format!("{} is not an admin id", case.principal));
                }
                let approvals = case
                    .approvals
                    .iter()
                    .map(|a| {
                        Ok(Approval {
                            admin: SpiffeId::parse(&a.admin)
                                .map_err(|e| format!("approval: {e}"))?,
                            roles: a.roles.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                Ok(self.decide_admin(&AdminRequest {
                    principal,
                    roles: case.roles.clone(),
                    regions: case.regions.clone(),
                    action,
                    resource: case.resource.clone(),
                    target_region: case.context.target_region.clone(),
                    source_ip,
                    approvals,
                    hour_utc,
                    weekday,
                }))
            }
        }
    }
}

/// Compiles and tests a bundle: what `lattice policy test` and `push` run.
pub fn check(files: &BundleFiles, version: u64) -> Result<(Engine, TestReport), PolicyError> {
    let engine = Engine::compile(files, version)?;
    let report = engine.run_tests();
    if !report.ok() {
        return Err(PolicyError::Rejected(Report {
            problems: report
                .failed
                .iter()
                .map(|(n, why)| format!("test {n:?} failed: {why}"))
                .collect(),
        }));
    }
    Ok((engine, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(extra: &[(&str, &str)]) -> BundleFiles {
        let mut files: BTreeMap<String, String> = default_bundle()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in extra {
            files.insert((*k).to_string(), (*v).to_string());
        }
        BundleFiles::from_files(files).expect("files")
    }

    fn mint_request(agent: &str, audience: &str, scopes: &[&str]) -> AgentRequest {
        AgentRequest {
            principal: SpiffeId::parse(agent).expect("id"),
            action: AgentAction::MintToken,
            resource: audience.into(),
            region: "eu".into(),
            source_ip: IpAddr::from([10, 1, 2, 3]),
            ttl_secs: 300,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            posture: Posture::default(),
            job_type: String::new(),
            hour_utc: 12,
            weekday: 1,
            delegation_depth: 0,
        }
    }

    fn mint(engine: &Engine, agent: &str, audience: &str, scopes: &[&str]) -> Outcome {
        engine.decide_agent(&mint_request(agent, audience, scopes))
    }

    #[test]
    fn the_default_bundle_compiles_and_passes_its_tests() {
        let (engine, report) = check(&default_bundle(), 1).expect("default bundle");
        assert!(report.passed.len() >= 5, "{report}");
        assert!(engine.policy_count() >= 6);
    }

    #[test]
    fn schema_violations_are_rejected_with_the_policy_named() {
        let files = with(&[(
            "bad.cedar",
            "@id(\"typo\")\npermit(principal is Lattice::Agent, action == Lattice::Action::\"MintToken\", resource) when { principal.lables.contains(\"x\") };",
        )]);
        let Err(PolicyError::Rejected(r)) = Engine::compile(&files, 2) else {
            panic!("a policy reading an undeclared attribute must be refused");
        };
        let text = r.to_string();
        assert!(text.contains("typo") && text.contains("lables"), "{text}");
    }

    #[test]
    fn entity_data_must_match_the_schema() {
        let files = with(&[(
            ENTITIES_FILE,
            r#"[{"uid":{"type":"Lattice::Audience","id":"api"},"attrs":{"scopes":"read","labels":[]},"parents":[]}]"#,
        )]);
        assert!(matches!(
            Engine::compile(&files, 2),
            Err(PolicyError::Rejected(_))
        ));
    }

    #[test]
    fn a_schema_that_cannot_type_the_lattice_requests_is_refused() {
        let schema = lattice_schema_text().replace("os_patched?: Bool", "os_patched: Bool");
        let files = with(&[(SCHEMA_FILE, &schema)]);
        let Err(PolicyError::Rejected(r)) = Engine::compile(&files, 2) else {
            panic!("a required posture claim cannot be guaranteed by the lattice");
        };
        assert!(r.to_string().contains("does not accept"), "{r}");
    }

    #[test]
    fn a_failing_test_case_blocks_the_bundle() {
        let files = with(&[(
            TESTS_FILE,
            r#"[{"name":"wrong","principal":"spiffe://t/agent/eu/a","action":"MintToken","resource":"api","expect":"allow"}]"#,
        )]);
        let Err(PolicyError::Rejected(r)) = check(&files, 2) else {
            panic!("a failing test must refuse the bundle");
        };
        assert!(r.to_string().contains("\"wrong\""), "{r}");
    }

    #[test]
    fn decisions_name_the_determining_policies_and_the_version() {
        let files = with(&[
            (
                ENTITIES_FILE,
                r#"[{"uid":{"type":"Lattice::Audience","id":"api"},"attrs":{"scopes":["read"],"labels":[]},"parents":[]}]"#,
            ),
            (
                "deny.cedar",
                "@id(\"no-10\")\nforbid(principal, action == Lattice::Action::\"MintToken\", resource == Lattice::Audience::\"api\") when { context.source_ip.isInRange(ip(\"10.0.0.0/8\")) && context.scopes.contains(\"admin\") };",
            ),
        ]);
        let engine = Engine::compile(&files, 7).expect("compile");
        let ok = mint(&engine, "spiffe://t/agent/eu/a", "api", &["read"]);
        assert!(ok.allowed);
        assert_eq!(ok.version, 7);
        assert_eq!(ok.policies, vec!["mint-listed-scopes".to_string()]);
        let wide = mint(&engine, "spiffe://t/agent/eu/a", "api", &["write"]);
        assert!(!wide.allowed);
        assert!(
            wide.denial().contains("no policy permits"),
            "{}",
            wide.denial()
        );
        // The forbid applies even though "admin" is not a listed scope.
        let forbidden = mint(&engine, "spiffe://t/agent/eu/a", "api", &["admin"]);
        assert!(!forbidden.allowed);
        let unknown = mint(&engine, "spiffe://t/agent/eu/a", "db", &[]);
        assert!(!unknown.allowed);
    }

    #[test]
    fn slices_decide_exactly_as_the_whole_set() {
        // A forbid scoped with `in` must never be sliced away.
        let files = with(&[
            (
                ENTITIES_FILE,
                r#"[{"uid":{"type":"Lattice::Audience","id":"api"},"attrs":{"scopes":[],"labels":[]},"parents":[]}]"#,
            ),
            (
                "f.cedar",
                "@id(\"never\")\nforbid(principal, action in [Lattice::Action::\"MintToken\"], resource);",
            ),
        ]);
        let engine = Engine::compile(&files, 3).expect("compile");
        let o = mint(&engine, "spiffe://t/agent/eu/a", "api", &[]);
        assert!(!o.allowed);
        assert_eq!(o.policies, vec!["never".to_string()]);
    }

    #[test]
    fn slices_leave_out_action_lists_without_the_action_and_keep_its_groups() {
        let schema = default_bundle().get(SCHEMA_FILE).expect("schema").replace(
            "action MintToken appliesTo {",
            "action Issuing;\n  action MintToken in [Issuing] appliesTo {",
        );
        let files = with(&[
            (SCHEMA_FILE, schema.as_str()),
            (
                ENTITIES_FILE,
                r#"[{"uid":{"type":"Lattice::Audience","id":"api"},"attrs":{"scopes":[],"labels":[]},"parents":[]}]"#,
            ),
            (
                "f.cedar",
                "@id(\"no-issuing\")\nforbid(principal, action in [Lattice::Action::\"Enrol\", Lattice::Action::\"Issuing\"], resource) when { context.ttl_secs > 600 };",
            ),
        ]);
        let engine = Engine::compile(&files, 3).expect("compile");
        let api = uid("Audience", "api");
        let ids = |action: &str| {
            let mut v: Vec<String> = engine
                .slices
                .get(action, &api)
                .expect("indexed action")
                .set
                .policies()
                .map(|p| p.id().to_string())
                .collect();
            v.sort();
            v
        };
        // The admin role policies list other actions only; the forbid names
        // MintToken's group.
        assert_eq!(ids("MintToken"), vec!["mint-listed-scopes", "no-issuing"]);
        assert!(ids("Enrol").contains(&"no-issuing".to_string()));
        assert!(!ids("LeaseSecret").contains(&"no-issuing".to_string()));
        assert!(ids("PushPolicy").contains(&"platform-admin".to_string()));
        // And the group's forbid decides through the slice.
        let mut req = mint_request("spiffe://t/agent/eu/a", "api", &[]);
        assert!(engine.decide_agent(&req).allowed);
        req.ttl_secs = 900;
        let o = engine.decide_agent(&req);
        assert!(!o.allowed);
        assert_eq!(o.policies, vec!["no-issuing".to_string()]);
    }

    #[test]
    fn context_reads_names_the_attributes_read_and_gives_up_on_whole_use() {
        let reads = |text: &str| {
            let p = Policy::parse(None, text).expect("policy");
            context_reads(&p).map(|r| {
                let mut v: Vec<String> = r.into_iter().collect();
                v.sort();
                v
            })
        };
        assert_eq!(reads("permit(principal, action, resource);"), Some(vec![]));
        assert_eq!(
            reads(
                "forbid(principal, action, resource) when { context has posture && context.posture.os_patched == false } unless { resource.scopes.containsAll(context.scopes) };"
            ),
            Some(vec!["posture".to_string(), "scopes".to_string()])
        );
        // Whole uses: compared, put in a set, an attribute of an attribute
        // named like one of the context's.
        assert_eq!(
            reads("permit(principal, action, resource) when { [context].contains(context) };"),
            None
        );
        assert_eq!(
            reads("permit(principal, action, resource) when { context == {\"scopes\": []} };"),
            None
        );
        assert_eq!(
            reads("permit(principal, action, resource) when { principal.context.scopes == [] };"),
            Some(vec![])
        );
    }

    #[test]
    fn a_slice_builds_only_the_context_its_policies_read() {
        let engine = Engine::compile(&default_bundle(), 1).expect("compile");
        let aud = uid("Audience", "https://api.example.com");
        let reads = |e: &Engine, action: &str| {
            let mut v: Vec<String> = e
                .slices
                .get(action, &aud)
                .and_then(|s| s.reads.clone())
                .expect("a slice that reads named attributes")
                .into_iter()
                .collect();
            v.sort();
            v
        };
        assert_eq!(reads(&engine, "MintToken"), vec!["scopes".to_string()]);
        // A forbid on posture: the posture is built, and decides.
        let files = with(&[
            (
                ENTITIES_FILE,
                r#"[{"uid":{"type":"Lattice::Audience","id":"https://api.example.com"},"attrs":{"scopes":["read"],"labels":[]},"parents":[]}]"#,
            ),
            (
                "f.cedar",
                "@id(\"patched-only\")\nforbid(principal, action == Lattice::Action::\"MintToken\", resource) unless { context.posture has os_patched && context.posture.os_patched };",
            ),
        ]);
        let engine = Engine::compile(&files, 2).expect("compile");
        assert_eq!(
            reads(&engine, "MintToken"),
            vec!["posture".to_string(), "scopes".to_string()]
        );
        let mut req = mint_request(
            "spiffe://t/agent/eu/a",
            "https://api.example.com",
            &["read"],
        );
        let o = engine.decide_agent(&req);
        assert!(!o.allowed);
        assert_eq!(o.policies, vec!["patched-only".to_string()]);
        req.posture.os_patched = Some(true);
        let o = engine.decide_agent(&req);
        assert!(o.allowed, "{o:?}");
        assert!(o.errors.is_empty(), "{o:?}");
    }

    #[test]
    fn the_kept_slice_never_carries_one_requests_context_to_the_next() {
        let files = with(&[
            (
                ENTITIES_FILE,
                r#"[{"uid":{"type":"Lattice::Audience","id":"api"},"attrs":{"scopes":["admin","read"],"labels":[]},"parents":[]}]"#,
            ),
            (
                "p.cedar",
                "@id(\"no-admin\")\nforbid(principal, action == Lattice::Action::\"MintToken\", resource == Lattice::Audience::\"api\") when { context.scopes.contains(\"admin\") };",
            ),
        ]);
        let engine = Engine::compile(&files, 4).expect("compile");
        let a = "spiffe://t/agent/eu/a";
        for (scopes, allowed) in [
            (&["read"][..], true),
            (&["admin"][..], false),
            (&["read"][..], true),
        ] {
            let fresh = Engine::compile(&files, 4).expect("compile");
            let o = mint(&engine, a, "api", scopes);
            assert_eq!(o.allowed, allowed, "{scopes:?}: {o:?}");
            if !allowed {
                assert_eq!(o.policies, vec!["no-admin".to_string()]);
            }
            assert_eq!(
                o,
                mint(&fresh, a, "api", scopes),
                "same as an engine that kept nothing"
            );
        }
        assert_eq!(engine.reach.len(), 1, "one slice for one (agent, audience)");
        mint(&engine, "spiffe://t/agent/eu/b", "api", &["read"]);
        assert_eq!(engine.reach.len(), 2);
    }

    #[test]
    fn kept_slices_are_bounded_and_the_used_ones_stay() {
        let engine = Engine::compile(&default_bundle(), 1).expect("compile");
        let a = "spiffe://t/agent/eu/keep";
        mint(&engine, a, "api", &[]);
        for i in 0..REACH_CAPACITY * 2 {
            mint(&engine, &format!("spiffe://t/agent/eu/n{i}"), "api", &[]);
            if i % 1000 == 0 {
                mint(&engine, a, "api", &[]);
            }
            assert!(engine.reach.len() <= REACH_CAPACITY);
        }
        let key = (a.to_string(), "Audience", "api".to_string(), "MintToken");
        assert!(engine.reach.get(&key).is_some(), "a slice in use is kept");
    }

    #[test]
    fn admin_roles_come_from_the_request() {
        let engine = Engine::compile(&default_bundle(), 1).expect("compile");
        let req = |roles: Vec<AdminRole>, action| AdminRequest {
            principal: SpiffeId::parse("spiffe://t/admin/a").expect("id"),
            roles,
            regions: vec![],
            action,
            resource: String::new(),
            target_region: "eu".into(),
            source_ip: IpAddr::from([127, 0, 0, 1]),
            approvals: vec![],
            hour_utc: 12,
            weekday: 1,
        };
        assert!(
            engine
                .decide_admin(&req(vec![AdminRole::PlatformAdmin], AdminAction::Revoke))
                .allowed
        );
        assert!(
            !engine
                .decide_admin(&req(vec![AdminRole::Auditor], AdminAction::Revoke))
                .allowed
        );
        assert!(
            !engine
                .decide_admin(&req(vec![AdminRole::RegionalOperator], AdminAction::Revoke))
                .allowed
        );
        let mut r = req(vec![AdminRole::RegionalOperator], AdminAction::Revoke);
        r.regions = vec!["eu".into()];
        assert!(engine.decide_admin(&r).allowed);
    }

    #[test]
    fn a_role_hierarchy_in_entity_data_is_seen_through_the_slice() {
        let files = with(&[
            (
                ENTITIES_FILE,
                r#"[{"uid":{"type":"Lattice::Role","id":"platform-admin"},"attrs":{},"parents":[{"type":"Lattice::Role","id":"frozen"}]}]"#,
            ),
            (
                "freeze.cedar",
                "@id(\"frozen\")\nforbid(principal in Lattice::Role::\"frozen\", action == Lattice::Action::\"Revoke\", resource);",
            ),
        ]);
        let engine = Engine::compile(&files, 2).expect("compile");
        assert!(!engine.full_store, "no entity literal in a condition");
        let o = engine.decide_admin(&AdminRequest {
            principal: SpiffeId::parse("spiffe://t/admin/a").expect("id"),
            roles: vec![AdminRole::PlatformAdmin],
            regions: vec![],
            action: AdminAction::Revoke,
            resource: String::new(),
            target_region: "eu".into(),
            source_ip: IpAddr::from([127, 0, 0, 1]),
            approvals: vec![],
            hour_utc: 12,
            weekday: 1,
        });
        assert!(!o.allowed);
        assert_eq!(o.policies, vec!["frozen".to_string()]);
    }

    #[test]
    fn conditions_naming_entities_use_the_whole_store() {
        let files = with(&[
            (
                ENTITIES_FILE,
                r#"[{"uid":{"type":"Lattice::Audience","id":"ref"},"attrs":{"scopes":["x"],"labels":["closed"]},"parents":[]},
                   {"uid":{"type":"Lattice::Audience","id":"api"},"attrs":{"scopes":[],"labels":[]},"parents":[]}]"#,
            ),
            (
                "f.cedar",
                "@id(\"closed-by-ref\")\nforbid(principal, action == Lattice::Action::\"MintToken\", resource) when { Lattice::Audience::\"ref\".labels.contains(\"closed\") };",
            ),
        ]);
        let engine = Engine::compile(&files, 2).expect("compile");
        assert!(engine.full_store);
        let o = mint(&engine, "spiffe://t/agent/eu/a", "api", &[]);
        assert!(!o.allowed);
        assert_eq!(o.policies, vec!["closed-by-ref".to_string()]);
    }

    #[test]
    fn bundle_names_and_sizes_are_bounded() {
        assert!(BundleFiles::from_files([("../x.cedar".into(), String::new())]).is_err());
        assert!(BundleFiles::from_files([("notes.txt".into(), String::new())]).is_err());
        assert!(
            BundleFiles::from_files([("a.cedar".into(), "x".repeat(MAX_BUNDLE_BYTES + 1))])
                .is_err()
        );
    }

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

    #[test]
    fn diff_shows_changed_lines() {
        let a = default_bundle();
        let b = with(&[("extra.cedar", "forbid(principal, action, resource);\n")]);
        let d = a.diff(&b);
        assert!(
            d.contains("+++ b/extra.cedar") && d.contains("+forbid"),
            "{d}"
        );
        assert!(a.diff(&a).is_empty());
    }
}
