//! The `Authorizer` seam: who may mint what. The foundation's rule is narrow
//! and built in: an enrolled agent of this cache's region may mint tokens for
//! the audiences this cache's configuration lists, with a subset of the
//! scopes listed for that audience. The policy-as-code work replaces this
//! implementation behind the same trait.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use lattice_shared::id::SpiffeId;
use serde::{Deserialize, Serialize};

/// A token request, as the authorizer sees it.
#[derive(Debug)]
pub struct MintRequest<'a> {
    pub agent: &'a SpiffeId,
    pub audience: &'a str,
    pub scopes: &'a [String],
    pub ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// The reason is shown to the caller.
    Deny(String),
}

pub trait Authorizer: Send + Sync + std::fmt::Debug + 'static {
    fn authorize_mint(&self, req: &MintRequest<'_>) -> Decision;
}

/// One audience agents may mint for, with the scopes allowed for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AudienceRule {
    pub name: String,
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Debug)]
pub struct BuiltinAuthorizer {
    audiences: HashMap<String, HashSet<String>>,
}

impl BuiltinAuthorizer {
    pub fn new(rules: &[AudienceRule]) -> Self {
        Self {
            audiences: rules
                .iter()
                .map(|r| (r.name.clone(), r.scopes.iter().cloned().collect()))
                .collect(),
        }
    }
}

impl Authorizer for BuiltinAuthorizer {
    fn authorize_mint(&self, req: &MintRequest<'_>) -> Decision {
        let Some(allowed) = self.audiences.get(req.audience) else {
            return Decision::Deny(format!(
                "audience {:?} is not allowed at this cache",
                req.audience
            ));
        };
        if let Some(s) = req.scopes.iter().find(|s| !allowed.contains(*s)) {
            return Decision::Deny(format!(
                "scope {s:?} is not allowed for audience {:?}",
                req.audience
            ));
        }
        Decision::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_rule() {
        let a = BuiltinAuthorizer::new(&[AudienceRule {
            name: "api".into(),
            scopes: vec!["read".into()],
        }]);
        let agent = SpiffeId::parse("spiffe://t/agent/eu/a").expect("id");
        let ok = MintRequest {
            agent: &agent,
            audience: "api",
            scopes: &["read".into()],
            ttl: Duration::from_secs(60),
        };
        assert_eq!(a.authorize_mint(&ok), Decision::Allow);
        let wide = MintRequest {
            scopes: &["write".into()],
            ..ok
        };
        assert!(matches!(a.authorize_mint(&wide), Decision::Deny(m) if m.contains("write")));
        let other = MintRequest {
            agent: &agent,
            audience: "db",
            scopes: &[],
            ttl: Duration::from_secs(60),
        };
        assert!(matches!(a.authorize_mint(&other), Decision::Deny(_)));
    }
}
