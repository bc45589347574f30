//! SPIFFE-style identities. A [`SpiffeId`] can only be built valid, so every
//! holder of one knows its trust domain, role, region and name are well formed.
//! Secret names follow one rule here too, for every module that reads one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest id accepted from anywhere (certificates, requests, config).
pub const MAX_ID_LEN: usize = 255;
const MAX_SEGMENT_LEN: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("id must start with spiffe://")]
    Scheme,
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-'")]
    TrustDomain(String),
    #[error(
        "invalid id path {0:?}: expected cp/NAME, admin/NAME, cache/REGION/NAME or agent/REGION/NAME"
    )]
    Path(String),
    #[error(
        "invalid segment {0:?}: use 1-63 of lowercase letters, digits, '-', '_', '.' (not starting with '.')"
    )]
    Segment(String),
    #[error(
        "invalid host name {0:?}: use a DNS name (lowercase labels of letters, digits, '-'; no wildcard) or an IP address"
    )]
    HostName(String),
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SEGMENT_LEN
        && !s.starts_with('.')
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// A trust domain such as `lattice.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(s: &str) -> Result<Self, IdError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_SEGMENT_LEN * 2
            && !s.starts_with(['.', '-'])
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::TrustDomain(s.to_owned()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for TrustDomain {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::new(&s)
    }
}
impl From<TrustDomain> for String {
    fn from(t: TrustDomain) -> String {
        t.0
    }
}
impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A region such as `eu`: caches and agents of a region share its namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RegionId(String);

impl RegionId {
    pub fn new(s: &str) -> Result<Self, IdError> {
        if valid_segment(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::Segment(s.to_owned()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for RegionId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::new(&s)
    }
}
impl From<RegionId> for String {
    fn from(r: RegionId) -> String {
        r.0
    }
}
impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest DNS name (RFC 1035) a server may be named by.
pub const MAX_HOST_NAME_LEN: usize = 253;

/// A name a server is reached by, as standard TLS clients check it: a DNS
/// name (lowercase letters, digits, '-', dot-separated labels of 1-63; no
/// wildcard, no trailing dot) or an IP address. Server certificates carry
/// these as DNS and IP SANs beside the SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum HostName {
    Dns(String),
    Ip(std::net::IpAddr),
}

impl HostName {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if let Ok(ip) = s.parse() {
            return Ok(Self::Ip(ip));
        }
        let label = |l: &str| {
            (1..=MAX_SEGMENT_LEN).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        // An all-numeric last label would read as an IPv4 address to some clients.
        let numeric_tld = s
            .rsplit('.')
            .next()
            .is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit()));
        if s.len() <= MAX_HOST_NAME_LEN && s.split('.').all(label) && !numeric_tld {
            Ok(Self::Dns(s.to_owned()))
        } else {
            Err(IdError::HostName(s.to_owned()))
        }
    }
    /// The names a server is reached by when none are configured: the IP it
    /// listens on (unless it listens on every address) and `localhost`.
    pub fn defaults_for(listen: std::net::SocketAddr) -> Vec<Self> {
        let ip = Some(listen.ip()).filter(|ip| !ip.is_unspecified());
        ip.map(Self::Ip)
            .into_iter()
            .chain([Self::Dns("localhost".into())])
            .collect()
    }
    /// `localhost` and loopback addresses name whichever server runs on the
    /// client's own host, so every server may carry them.
    pub fn is_loopback(&self) -> bool {
        match self {
            Self::Dns(d) => d == "localhost",
            Self::Ip(ip) => ip.is_loopback(),
        }
    }
}
impl TryFrom<String> for HostName {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}
impl From<HostName> for String {
    fn from(h: HostName) -> String {
        h.to_string()
    }
}
impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(d) => f.write_str(d),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// What kind of principal an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    ControlPlane,
    Admin,
    Cache,
    Agent,
}

impl Role {
    fn path_word(self) -> &'static str {
        match self {
            Role::ControlPlane => "cp",
            Role::Admin => "admin",
            Role::Cache => "cache",
            Role::Agent => "agent",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::ControlPlane => "control plane",
            Role::Admin => "admin",
            Role::Cache => "cache",
            Role::Agent => "agent",
        })
    }
}

/// `spiffe://TD/cp/NAME`, `spiffe://TD/admin/NAME`, `spiffe://TD/cache/REGION/NAME`
/// or `spiffe://TD/agent/REGION/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    uri: String,
    trust_domain: TrustDomain,
    role: RoleTag,
    region: Option<RegionId>,
    name: String,
}

// Role with Ord for the derive above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
enum RoleTag {
    Cp,
    Admin,
    Cache,
    Agent,
}

impl From<RoleTag> for Role {
    fn from(r: RoleTag) -> Role {
        match r {
            RoleTag::Cp => Role::ControlPlane,
            RoleTag::Admin => Role::Admin,
            RoleTag::Cache => Role::Cache,
            RoleTag::Agent => Role::Agent,
        }
    }
}
impl From<Role> for RoleTag {
    fn from(r: Role) -> RoleTag {
        match r {
            Role::ControlPlane => RoleTag::Cp,
            Role::Admin => RoleTag::Admin,
            Role::Cache => RoleTag::Cache,
            Role::Agent => RoleTag::Agent,
        }
    }
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(IdError::Scheme)?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| IdError::Path(String::new()))?;
        let trust_domain = TrustDomain::new(td)?;
        let parts: Vec<&str> = path.split('/').collect();
        let (role, region, name) = match parts.as_slice() {
            ["cp", name] => (Role::ControlPlane, None, *name),
            ["admin", name] => (Role::Admin, None, *name),
            ["cache", region, name] => (Role::Cache, Some(RegionId::new(region)?), *name),
            ["agent", region, name] => (Role::Agent, Some(RegionId::new(region)?), *name),
            _ => return Err(IdError::Path(path.to_owned())),
        };
        if !valid_segment(name) {
            return Err(IdError::Segment(name.to_owned()));
        }
        Ok(Self {
            uri: s.to_owned(),
            trust_domain,
            role: role.into(),
            region,
            name: name.to_owned(),
        })
    }

    pub fn new(
        trust_domain: &TrustDomain,
        role: Role,
        region: Option<&RegionId>,
        name: &str,
    ) -> Result<Self, IdError> {
        let uri = match (role, region) {
            (Role::Cache | Role::Agent, Some(r)) => {
                format!("spiffe://{trust_domain}/{}/{r}/{name}", role.path_word())
            }
            (Role::ControlPlane | Role::Admin, None) => {
                format!("spiffe://{trust_domain}/{}/{name}", role.path_word())
            }
            _ => return Err(IdError::Path(format!("{}/{name}", role.path_word()))),
        };
        Self::parse(&uri)
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    pub fn role(&self) -> Role {
        self.role.into()
    }
    /// The region of a cache or agent id; `None` for control plane and admin ids.
    pub fn region(&self) -> Option<&RegionId> {
        self.region.as_ref()
    }
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this is an agent id that `cache` has authority over: an
    /// agent of the cache's own trust domain and region. The confinement
    /// rule for certificates and tokens alike.
    pub fn is_agent_within(&self, cache: &SpiffeId) -> bool {
        self.role() == Role::Agent
            && cache.role() == Role::Cache
            && self.trust_domain == cache.trust_domain
            && self.region == cache.region
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}
impl TryFrom<String> for SpiffeId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}
impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.uri
    }
}
impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

pub const MAX_SECRET_NAME_LEN: usize = 64;

/// Secret names: 1..=64 of `a-z 0-9 . _ -`, starting with a letter or digit
/// (they appear in Cedar entity ids, log lines and AADs).
pub fn check_secret_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SECRET_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "secret name {:?} is invalid: use 1 to {MAX_SECRET_NAME_LEN} characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
            name.chars().take(80).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_each_role() {
        let a = SpiffeId::parse("spiffe://lattice.local/agent/eu/bot-1").expect("valid");
        assert_eq!(a.role(), Role::Agent);
        assert_eq!(a.region().map(RegionId::as_str), Some("eu"));
        assert_eq!(a.name(), "bot-1");
        let c = SpiffeId::parse("spiffe://lattice.local/cache/us/c1").expect("valid");
        assert_eq!(c.role(), Role::Cache);
        let cp = SpiffeId::parse("spiffe://lattice.local/cp/main").expect("valid");
        assert_eq!(cp.role(), Role::ControlPlane);
        assert!(cp.region().is_none());
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "http://lattice.local/agent/eu/a",
            "spiffe://lattice.local/agent/eu",
            "spiffe://lattice.local/agent/eu/a/b",
            "spiffe://lattice.local/cp/eu/a",
            "spiffe://lattice.local/agent/EU/a",
            "spiffe://lattice.local/agent/eu/",
            "spiffe://lattice.local/agent/eu/..",
            "spiffe://Lattice/agent/eu/a",
            "spiffe:///agent/eu/a",
            "spiffe://lattice.local/robot/eu/a",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://a/agent/eu/{}", "x".repeat(300))),
            Err(IdError::TooLong)
        );
    }

    proptest! {
        #[test]
        fn display_round_trips(region in "[a-z0-9][a-z0-9_-]{0,20}", name in "[a-z0-9][a-z0-9_.-]{0,40}") {
            let td = TrustDomain::new("lattice.local").expect("valid");
            let region = RegionId::new(&region).expect("valid");
            let id = SpiffeId::new(&td, Role::Agent, Some(&region), &name).expect("valid");
            let back = SpiffeId::parse(id.as_str()).expect("round trip");
            prop_assert_eq!(&back, &id);
            let json = serde_json::to_string(&id).expect("serialize");
            let from_json: SpiffeId = serde_json::from_str(&json).expect("deserialize");
            prop_assert_eq!(from_json, id);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,300}") {
            let _ = SpiffeId::parse(&s);
        }
    }

    #[test]
    fn host_names() {
        for ok in ["cache-eu.example.net", "localhost", "a", "x1.b-2.c"] {
            assert_eq!(HostName::parse(ok).expect(ok).to_string(), ok);
        }
        assert!(HostName::parse("::1").expect("ip").is_loopback());
        assert_eq!(
            HostName::parse("10.1.2.3").expect("ip").to_string(),
            "10.1.2.3"
        );
        let long = format!("{}.net", "a.".repeat(125));
        for bad in [
            "",
            "*.example.net",
            "a..b",
            "a.",
            "-a.b",
            "Upper.net",
            "a_b.net",
            "1.2.3",
            &long,
            "spiffe://t/cp/x",
        ] {
            assert!(HostName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_names() {
        for ok in ["openai", "db.prod-1", "a", "9_x"] {
            assert!(check_secret_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "OpenAI", "-x", "a/b", "a b", &"x".repeat(65), "é"] {
            assert!(check_secret_name(bad).is_err(), "{bad}");
        }
    }
}
