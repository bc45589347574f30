//! The compiled bundle, [`Engine`]: compilation (parsing, strict
//! validation, checks of the entity data), the Cedar entities and context
//! of each request, and the decision.

use std::collections::HashSet;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityUid, Policy, PolicyId, PolicySet,
    Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

use super::cedar::{
    NS, action_uid, grant_pairs, ip_expr, read_string, read_string_set, string_set, time_pairs, uid,
};
use super::slice::{Reach, Slice, Slices};
use super::{
    AdminAction, AdminRequest, AdminRole, AgentAction, AgentRequest, Approval, BundleFiles,
    ENTITIES_FILE, MAX_TEST_CASES, Outcome, PolicyError, Report, SCHEMA_FILE, TESTS_FILE, TestCase,
};
use crate::id::{Role, SpiffeId};

/// A compiled, validated bundle: decides requests.
pub struct Engine {
    version: u64,
    sha256: [u8; 32],
    files: BundleFiles,
    schema: Schema,
    policies: PolicySet,
    pub(super) slices: Slices,
    entities: Entities,
    /// Evaluate against every entity (entity-valued attributes present)
    /// instead of the per-request slice.
    full_store: bool,
    pub(super) tests: Vec<TestCase>,
    authorizer: Authorizer,
    policy_count: usize,
    /// The entities an agent request reaches, by (agent, resource type,
    /// resource, action): they depend on the bundle and those four only
    /// (never on the request's context), so a new bundle, a new engine,
    /// starts empty. Saves rebuilding the agent entity and Cedar's
    /// transitive closure on requests whose context is new.
    pub(super) reach: Reach,
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

    /// Whether the bundle's schema declares the action `name`.
    pub fn declares_action(&self, name: &str) -> bool {
        let uid = action_uid(name);
        self.schema.actions().any(|a| a == &uid)
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
    pub(super) fn agent_parts(
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

    /// The Cedar request of an admin call. `with_grant` adds what an
    /// `IssueAdminCertificate` grants (`granted_roles`, `granted_regions`,
    /// `ttl_secs`); only bundles whose schema predates those fields are
    /// checked without them (their policies cannot name them).
    pub(super) fn admin_parts(
        &self,
        req: &AdminRequest,
        with_schema: bool,
        with_grant: bool,
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
            .chain(time_pairs(req.hour_utc, req.weekday))
            .chain(
                with_grant
                    .then(|| grant_pairs(&req.grant))
                    .into_iter()
                    .flatten(),
            ),
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
        if let Some(earlier) = req.action.predecessor()
            && !self.declares_action(req.action.name())
        {
            return self.decide_admin(&AdminRequest {
                action: earlier,
                ..req.clone()
            });
        }
        match self.admin_parts(req, false, true) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::fixtures::{mint, with};
    use crate::policy::{ENTITIES_FILE, default_bundle};
    use std::net::IpAddr;

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
            grant: Default::default(),
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
            grant: Default::default(),
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
}
