//! A bundle's named test cases (`tests.json`): their format, the runner,
//! and [`check`], which compiles and tests a bundle.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{
    Action, AdminGrant, AdminRequest, AdminRole, AgentRequest, Approval, BundleFiles, Engine,
    Outcome, PolicyError, Posture, Report,
};
use crate::id::{Role, SpiffeId};

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
    /// Default 300 for agent requests, 0 for admin requests.
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
    /// IssueAdminCertificate: what the new certificate would carry (its
    /// lifetime is `ttl_secs`, default 0 for admin requests).
    #[serde(default)]
    pub granted_roles: Vec<AdminRole>,
    #[serde(default)]
    pub granted_regions: Vec<String>,
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

impl Engine {
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
                    grant: AdminGrant {
                        roles: case.context.granted_roles.clone(),
                        regions: case.context.granted_regions.clone(),
                        ttl_secs: case.context.ttl_secs.unwrap_or(0),
                    },
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
    use crate::policy::fixtures::with;
    use crate::policy::{TESTS_FILE, default_bundle};

    #[test]
    fn the_default_bundle_compiles_and_passes_its_tests() {
        let (engine, report) = check(&default_bundle(), 1).expect("default bundle");
        assert!(report.passed.len() >= 5, "{report}");
        assert!(engine.policy_count() >= 6);
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
}
