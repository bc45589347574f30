//! The contract between a bundle and the lattice: the bundle's schema must
//! accept every request the lattice builds, so that strict validation rules
//! out type errors at evaluation.

use std::net::IpAddr;

use super::{
    AdminAction, AdminGrant, AdminRequest, AdminRole, AgentAction, AgentRequest, Engine, Posture,
};
use crate::id::SpiffeId;

impl Engine {
    /// The requests the lattice builds must conform to the bundle's schema:
    /// checked once per action, with posture claims all present and all
    /// absent (so posture attributes must be optional).
    pub(super) fn contract_problems(&self) -> Vec<String> {
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
            // Bundles from before an action decide it as its predecessor.
            if action.predecessor().is_some() && !self.declares_action(action.name()) {
                continue;
            }
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
                grant: AdminGrant {
                    roles: vec![AdminRole::Auditor],
                    regions: vec!["r".into()],
                    ttl_secs: 1,
                },
            };
            // A bundle whose schema predates the grant fields is still
            // accepted: its policies cannot name them.
            if let Err(e) = self.admin_parts(&req, true, true)
                && self.admin_parts(&req, true, false).is_err()
            {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::fixtures::with;
    use crate::policy::{PolicyError, SCHEMA_FILE, lattice_schema_text};

    #[test]
    fn a_schema_from_before_the_grant_fields_still_compiles() {
        let old = lattice_schema_text()
            .replace("    granted_roles: Set<String>,\n", "")
            .replace("    granted_regions: Set<String>,\n", "")
            .replace(
                "    ttl_secs: Long,\n  };\n\n  action Enrol",
                "  };\n\n  action Enrol",
            );
        assert!(!old.contains("granted_roles"), "{old}");
        let files = with(&[(SCHEMA_FILE, &old)]);
        Engine::compile(&files, 2).expect("a bundle released before the grant fields loads");
    }

    #[test]
    fn a_schema_from_before_enrol_cache_decides_it_as_create_join_token() {
        let old = lattice_schema_text().replace(",\n         EnrolCache, HoldSecret", "");
        assert!(!old.contains("EnrolCache, HoldSecret"), "{old}");
        let policies = include_str!("../../policies/default/lattice.cedar")
            .replace("    Lattice::Action::\"EnrolCache\",\n", "")
            .replace(",\n    Lattice::Action::\"EnrolCache\"", "")
            .replace("    Lattice::Action::\"HoldSecret\",\n", "");
        assert!(!policies.contains("EnrolCache") && !policies.contains("HoldSecret"));
        let files = with(&[(SCHEMA_FILE, &old), ("lattice.cedar", &policies)]);
        let engine = Engine::compile(&files, 2).expect("an older bundle loads");
        assert!(!engine.declares_action("EnrolCache"));
        let req = |roles: Vec<AdminRole>, action| AdminRequest {
            principal: SpiffeId::parse("spiffe://lattice.invalid/admin/a").expect("id"),
            roles,
            regions: vec![],
            action,
            resource: String::new(),
            target_region: "eu".into(),
            source_ip: IpAddr::from([127, 0, 0, 1]),
            approvals: vec![],
            hour_utc: 12,
            weekday: 1,
            grant: AdminGrant::default(),
        };
        // The default bundle lets platform admins make join tokens and
        // custodians rotate KMS keys: its predecessors decide.
        for (roles, action, allowed) in [
            (
                vec![AdminRole::PlatformAdmin],
                AdminAction::EnrolCache,
                true,
            ),
            (vec![AdminRole::Auditor], AdminAction::EnrolCache, false),
            (
                vec![AdminRole::SecretCustodian],
                AdminAction::HoldSecret,
                true,
            ),
            (
                vec![AdminRole::PlatformAdmin],
                AdminAction::HoldSecret,
                false,
            ),
        ] {
            let o = engine.decide_admin(&req(roles.clone(), action));
            assert_eq!(o.allowed, allowed, "{roles:?} {action:?}: {o:?}");
        }
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
}
