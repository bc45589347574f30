//! Cedar values built from lattice names: entity type names, uids and
//! `ip(..)` expressions made once, the context's time and string-set fields,
//! the posture record, and attribute reads from entity data.

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;

use cedar_policy::{Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};

use super::{AdminAction, AgentAction, Posture};

pub(super) const NS: &str = "Lattice";

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

pub(super) fn ip_expr(ip: IpAddr) -> RestrictedExpression {
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

pub(super) fn uid(t: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(type_name(t), EntityId::new(id))
}

pub(super) fn action_uid(name: &str) -> EntityUid {
    match ACTION_UIDS.get(name) {
        Some(u) => u.clone(),
        None => uid("Action", name),
    }
}

/// The context of what an admin certificate would grant.
pub(super) fn grant_pairs(g: &super::AdminGrant) -> [(String, RestrictedExpression); 3] {
    [
        (
            "granted_roles".to_string(),
            string_set(g.roles.iter().map(|r| r.as_str().to_string())),
        ),
        (
            "granted_regions".to_string(),
            string_set(g.regions.iter().cloned()),
        ),
        (
            "ttl_secs".to_string(),
            RestrictedExpression::new_long(i64::try_from(g.ttl_secs).unwrap_or(i64::MAX)),
        ),
    ]
}

/// The time fields every context carries.
pub(super) fn time_pairs(hour_utc: u8, weekday: u8) -> [(String, RestrictedExpression); 2] {
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

pub(super) fn string_set(items: impl IntoIterator<Item = String>) -> RestrictedExpression {
    RestrictedExpression::new_set(items.into_iter().map(RestrictedExpression::new_string))
}

pub(super) fn read_string_set(e: &Entity, attr: &str) -> Vec<String> {
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

pub(super) fn read_string(e: &Entity, attr: &str) -> Option<String> {
    match e.attr(attr) {
        Some(Ok(cedar_policy::EvalResult::String(s))) => Some(s),
        _ => None,
    }
}

impl Posture {
    pub(super) fn expr(&self) -> RestrictedExpression {
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
