//! Slicing: the policies, entities and context attributes a request needs,
//! so that a decision evaluates only those and decides exactly as the whole
//! set would.
//!
//! Policies are indexed per (action, resource): only a policy whose scope
//! cannot match is left out (`action ==` another action, `action in [..]`
//! listing neither the action nor a group it belongs to, `resource ==`
//! another resource), so each slice decides exactly as the whole set. Each
//! slice also knows which context attributes its policies name
//! (`context.a`, `context has a`, read from the policies' JSON form; a
//! policy using `context` whole makes it build all of them), and a
//! request's context is built with those only: a pruned attribute is one no
//! policy of the slice can read. Entities are sliced per request
//! (principal, resource, action, the principal's parents, and their
//! ancestors: `Engine::request_entities`); a bundle whose conditions name an
//! entity, or whose entities hold entity-valued attributes, is evaluated
//! against the whole store instead. An engine keeps each agent request's
//! slice by (agent, resource, action) in a bounded two-generation map,
//! [`Reach`] (the slice never depends on the context; a new release is a new
//! engine, so nothing outlives it).

use std::collections::{HashMap, HashSet};

use cedar_policy::{
    ActionConstraint, Entities, EntityUid, Policy, PolicyId, PolicySet, ResourceConstraint,
};

use super::cedar::action_uid;

/// Policies indexed by (action, resource): a policy is left out of a slice
/// only when its scope cannot match the slice's requests (`action == A` or
/// `action in [..]` with no group holding the slice's action, `resource ==
/// R` for another R), and such a policy is never satisfied and never
/// errs, so each slice decides exactly as the whole set would.
#[derive(Debug, Default)]
pub(super) struct Slices {
    /// action name → (resource uid → policies, policies for other resources)
    by_action: HashMap<String, (HashMap<EntityUid, Slice>, Slice)>,
}

#[derive(Debug)]
pub(super) struct Slice {
    pub(super) set: PolicySet,
    /// The context attributes its policies can read; `None`: the context
    /// may be used whole, so every attribute is built.
    pub(super) reads: Option<HashSet<String>>,
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
    pub(super) fn build(
        set: &PolicySet,
        actions: &[&str],
        entities: &Entities,
    ) -> Result<Self, String> {
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

    pub(super) fn get(&self, action: &str, resource: &EntityUid) -> Option<&Slice> {
        let (named, rest) = self.by_action.get(action)?;
        Some(named.get(resource).unwrap_or(rest))
    }
}

pub(super) type ReachKey = (String, &'static str, String, &'static str);

/// Agent request slices an engine keeps (a few KiB each), at most.
const REACH_CAPACITY: usize = 8192;

/// A bounded map in two generations: lookups and inserts are O(1) with no
/// background upkeep (a general cache's eviction work showed as 0.4 ms
/// spikes on cold decisions); when the young generation is full the old
/// one is dropped and the young becomes old, so a slice used since then
/// survives (it is moved back on use).
#[derive(Default)]
pub(super) struct Reach {
    gens: std::sync::Mutex<[HashMap<ReachKey, std::sync::Arc<Entities>>; 2]>,
}

impl Reach {
    pub(super) fn get(&self, key: &ReachKey) -> Option<std::sync::Arc<Entities>> {
        let mut g = self.gens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = g[0].get(key) {
            return Some(e.clone());
        }
        let e = g[1].remove(key)?;
        g[0].insert(key.clone(), e.clone());
        Some(e)
    }

    pub(super) fn insert(&self, key: ReachKey, e: std::sync::Arc<Entities>) {
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
    pub(super) fn len(&self) -> usize {
        let g = self.gens.lock().unwrap_or_else(|p| p.into_inner());
        g[0].len() + g[1].len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::cedar::uid;
    use crate::policy::fixtures::{mint, mint_request, with};
    use crate::policy::{ENTITIES_FILE, Engine, SCHEMA_FILE, default_bundle};

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
}
