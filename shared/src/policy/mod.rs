//! Policy as code: Cedar bundles (policies, schema, entity data, named test
//! cases), their compilation into an [`Engine`] that decides requests, and
//! the contract between a bundle and the lattice.
//!
//! The lattice builds every request itself (principal entity, context) from
//! facts it has verified or been told; a bundle is accepted only if its
//! schema accepts those requests, so that strict validation rules out type
//! errors at evaluation. Any evaluation error still denies (fail closed):
//! Cedar skips a policy that errors, which for a `forbid` would mean allow.

mod bundle;
mod cedar;
mod contract;
mod engine;
mod request;
pub mod sign;
mod slice;
mod testing;

pub use crate::posture::{MAX_JOB_TYPE, MAX_POSTURE_STRING, Posture};
pub use bundle::{
    BundleFiles, ENTITIES_FILE, MAX_BUNDLE_BYTES, MAX_FILE_NAME, MAX_FILES, MAX_TEST_CASES,
    SCHEMA_FILE, TESTS_FILE, default_bundle, lattice_schema_text,
};
pub use engine::Engine;
pub use request::{
    Action, AdminAction, AdminAttributes, AdminGrant, AdminRequest, AdminRole, AgentAction,
    AgentRequest, Approval, Outcome, hour_and_weekday,
};
pub use testing::{Expect, TestApproval, TestCase, TestContext, TestReport, check};

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

/// Bundles and requests the unit tests of the parts share.
#[cfg(test)]
mod fixtures {
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use super::*;
    use crate::id::SpiffeId;

    pub(super) fn with(extra: &[(&str, &str)]) -> BundleFiles {
        let mut files: BTreeMap<String, String> = default_bundle()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in extra {
            files.insert((*k).to_string(), (*v).to_string());
        }
        BundleFiles::from_files(files).expect("files")
    }

    pub(super) fn mint_request(agent: &str, audience: &str, scopes: &[&str]) -> AgentRequest {
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

    pub(super) fn mint(engine: &Engine, agent: &str, audience: &str, scopes: &[&str]) -> Outcome {
        engine.decide_agent(&mint_request(agent, audience, scopes))
    }
}
