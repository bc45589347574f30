//! Who may do what at this cache: the Cedar policy release in force
//! ([`PolicyAuthorizer`]), which the sync stream replaces whole when a
//! verified release arrives. Decisions are
//! cached per release: the cache key carries the release version and the
//! whole request (context included), and a new release empties the cache.

use std::sync::{Arc, RwLock};

use lattice_shared::policy::{AgentRequest, Engine, Outcome};

/// Bytes of cached decisions at most (keys weigh what they hold).
const DECISION_CACHE_BYTES: u64 = 64 * 1024 * 1024;

fn weight(key: &(u64, AgentRequest), value: &Arc<Outcome>) -> u32 {
    let r = &key.1;
    let bytes = 256
        + r.principal.as_str().len()
        + r.resource.len()
        + r.region.len()
        + r.job_type.len()
        + r.scopes.iter().map(|s| s.len() + 24).sum::<usize>()
        + r.posture.os_version.as_ref().map_or(0, String::len)
        + value.policies.iter().map(|p| p.len() + 24).sum::<usize>()
        + value.errors.iter().map(|e| e.len() + 24).sum::<usize>();
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

pub struct PolicyAuthorizer {
    engine: RwLock<Option<Arc<Engine>>>,
    decisions: moka::sync::Cache<(u64, AgentRequest), Arc<Outcome>>,
    cache_decisions: bool,
}

impl std::fmt::Debug for PolicyAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyAuthorizer")
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

impl Default for PolicyAuthorizer {
    fn default() -> Self {
        Self::new(true)
    }
}

impl PolicyAuthorizer {
    pub fn new(cache_decisions: bool) -> Self {
        Self {
            engine: RwLock::new(None),
            decisions: moka::sync::Cache::builder()
                .max_capacity(DECISION_CACHE_BYTES)
                .weigher(weight)
                .build(),
            cache_decisions,
        }
    }

    /// Puts a release in force; earlier decisions are forgotten.
    pub fn install(&self, engine: Engine) {
        let version = engine.version();
        *self.engine.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(engine));
        self.decisions.invalidate_all();
        metrics::gauge!("lattice_cache_policy_version").set(version as f64);
    }

    pub fn current(&self) -> Option<Arc<Engine>> {
        self.engine
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The version in force (0: none yet).
    pub fn version(&self) -> u64 {
        self.current().map(|e| e.version()).unwrap_or(0)
    }

    /// Decisions currently cached (for tests and metrics).
    pub fn cached_decisions(&self) -> u64 {
        self.decisions.run_pending_tasks();
        self.decisions.entry_count()
    }

    /// The decision of the release in force (cached per release).
    pub fn authorize(&self, req: &AgentRequest) -> Outcome {
        let Some(engine) = self.current() else {
            return Outcome {
                allowed: false,
                version: 0,
                policies: vec![],
                errors: vec!["this cache has received no policy release yet".into()],
            };
        };
        if !self.cache_decisions {
            return engine.decide_agent(req);
        }
        let key = (engine.version(), req.clone());
        if let Some(hit) = self.decisions.get(&key) {
            metrics::counter!("lattice_cache_policy_decisions_total", "cached" => "true")
                .increment(1);
            return (*hit).clone();
        }
        let outcome = engine.decide_agent(req);
        metrics::counter!("lattice_cache_policy_decisions_total", "cached" => "false").increment(1);
        self.decisions.insert(key, Arc::new(outcome.clone()));
        outcome
    }
}
