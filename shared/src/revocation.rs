//! Revocations: what can be revoked, the set of what has been, and the checks
//! every enforcer (control plane, caches, agents, `shared::verifier`) runs
//! against it — for tokens, one rule ([`RevocationSet::check_token`]).

use std::collections::{HashMap, HashSet};

use crate::id::{Role, SpiffeId};
use crate::pki::{BACKDATE, CertInfo};
use crate::proto as pb;

pub const MAX_REASON_LEN: usize = 256;
pub const MAX_JTI_LEN: usize = 64;
pub const MAX_SERIAL_HEX_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Agent(SpiffeId),
    Jti(String),
    /// Hex serial of a certificate.
    CertSerial(String),
    /// Every credential of the subject issued before this time.
    SubjectBefore {
        subject: SpiffeId,
        issued_before_unix: i64,
    },
    /// A cache: its signing keys leave every JWKS and its intermediate CA is refused.
    Cache(SpiffeId),
    JoinToken([u8; 32]),
    /// One version of an upstream secret: no cache leases it again.
    SecretVersion {
        name: String,
        version: u64,
    },
}

/// Why a token is refused as revoked. The text names only what the holder
/// of the token already knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationReason {
    #[error("token {0} has been revoked")]
    Token(String),
    #[error("token {0}, which this token was delegated from, has been revoked")]
    Parent(String),
    #[error("agent {0} has been revoked")]
    Agent(SpiffeId),
    #[error("credentials of {0} issued before the cutoff have been revoked")]
    Cutoff(SpiffeId),
    #[error("issuing cache {0} has been revoked")]
    Issuer(SpiffeId),
    #[error("the signing key certificate {0} has been revoked")]
    SigningKey(String),
    #[error("the client certificate: {0}")]
    ClientCertificate(String),
    /// A principal of the token does not parse, so its revocations cannot
    /// be looked up: refused (fail closed).
    #[error("the token cannot be checked for revocation: {0}")]
    Unreadable(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub target: Target,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid revocation: {0}")]
pub struct InvalidRevocation(pub String);

impl TryFrom<&pb::Revocation> for Revocation {
    type Error = InvalidRevocation;
    fn try_from(p: &pb::Revocation) -> Result<Self, InvalidRevocation> {
        use pb::revocation::Target as T;
        let bad = |m: &str| InvalidRevocation(m.to_owned());
        if p.reason.len() > MAX_REASON_LEN {
            return Err(bad("reason is too long"));
        }
        let id = |s: &str, role: Role| -> Result<SpiffeId, InvalidRevocation> {
            let id = SpiffeId::parse(s).map_err(|e| InvalidRevocation(e.to_string()))?;
            if id.role() != role {
                return Err(InvalidRevocation(format!("{id} is not a {role} id")));
            }
            Ok(id)
        };
        let target = match p.target.as_ref().ok_or_else(|| bad("no target"))? {
            T::AgentId(s) => Target::Agent(id(s, Role::Agent)?),
            T::Jti(j) => {
                if j.is_empty() || j.len() > MAX_JTI_LEN || !j.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(bad("jti must be 1..=64 printable characters"));
                }
                Target::Jti(j.clone())
            }
            T::CertSerial(s) => {
                let s = s.to_ascii_lowercase();
                if s.is_empty()
                    || s.len() > MAX_SERIAL_HEX_LEN
                    || !s.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(bad("cert_serial must be 1..=64 hex digits"));
                }
                Target::CertSerial(s)
            }
            T::SubjectBefore(sb) => {
                let subject =
                    SpiffeId::parse(&sb.subject).map_err(|e| InvalidRevocation(e.to_string()))?;
                if !matches!(subject.role(), Role::Agent | Role::Admin) {
                    return Err(bad("subject_before applies to agent and admin ids"));
                }
                Target::SubjectBefore {
                    subject,
                    issued_before_unix: sb.issued_before_unix,
                }
            }
            T::CacheId(s) => Target::Cache(id(s, Role::Cache)?),
            T::JoinTokenSha256(h) => Target::JoinToken(
                h.as_slice()
                    .try_into()
                    .map_err(|_| bad("join_token_sha256 must be 32 bytes"))?,
            ),
            T::SecretVersion(v) => {
                crate::id::check_secret_name(&v.name).map_err(|e| bad(&e))?;
                if v.version == 0 {
                    return Err(bad("secret versions start at 1"));
                }
                Target::SecretVersion {
                    name: v.name.clone(),
                    version: v.version,
                }
            }
        };
        Ok(Revocation {
            target,
            reason: p.reason.clone(),
        })
    }
}

impl From<&Revocation> for pb::Revocation {
    fn from(r: &Revocation) -> pb::Revocation {
        use pb::revocation::Target as T;
        let target = match &r.target {
            Target::Agent(id) => T::AgentId(id.to_string()),
            Target::Jti(j) => T::Jti(j.clone()),
            Target::CertSerial(s) => T::CertSerial(s.clone()),
            Target::SubjectBefore {
                subject,
                issued_before_unix,
            } => T::SubjectBefore(pb::SubjectBefore {
                subject: subject.to_string(),
                issued_before_unix: *issued_before_unix,
            }),
            Target::Cache(id) => T::CacheId(id.to_string()),
            Target::JoinToken(h) => T::JoinTokenSha256(h.to_vec()),
            Target::SecretVersion { name, version } => T::SecretVersion(pb::SecretVersionRef {
                name: name.clone(),
                version: *version,
            }),
        };
        pb::Revocation {
            target: Some(target),
            reason: r.reason.clone(),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Agent(id) => write!(f, "agent {id}"),
            Target::Jti(j) => write!(f, "token {j}"),
            Target::CertSerial(s) => write!(f, "certificate {s}"),
            Target::SubjectBefore {
                subject,
                issued_before_unix,
            } => {
                write!(
                    f,
                    "credentials of {subject} issued before unix {issued_before_unix}"
                )
            }
            Target::Cache(id) => write!(f, "cache {id}"),
            Target::JoinToken(h) => write!(f, "join token {}…", hex::encode(&h[..6])),
            Target::SecretVersion { name, version } => {
                write!(f, "secret {name} version {version}")
            }
        }
    }
}

/// Everything revoked so far.
#[derive(Debug, Clone, Default)]
pub struct RevocationSet {
    agents: HashSet<SpiffeId>,
    jtis: HashSet<String>,
    serials: HashSet<String>,
    before: HashMap<SpiffeId, i64>,
    caches: HashSet<SpiffeId>,
    join_tokens: HashSet<[u8; 32]>,
    secret_versions: HashSet<(String, u64)>,
    count: u64,
}

impl RevocationSet {
    pub fn apply(&mut self, r: &Revocation) {
        self.count += 1;
        match &r.target {
            Target::Agent(id) => {
                self.agents.insert(id.clone());
            }
            Target::Jti(j) => {
                self.jtis.insert(j.clone());
            }
            Target::CertSerial(s) => {
                self.serials.insert(s.clone());
            }
            Target::SubjectBefore {
                subject,
                issued_before_unix,
            } => {
                let e = self.before.entry(subject.clone()).or_insert(i64::MIN);
                *e = (*e).max(*issued_before_unix);
            }
            Target::Cache(id) => {
                self.caches.insert(id.clone());
            }
            Target::JoinToken(h) => {
                self.join_tokens.insert(*h);
            }
            Target::SecretVersion { name, version } => {
                self.secret_versions.insert((name.clone(), *version));
            }
        }
    }

    pub fn len(&self) -> u64 {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_agent_revoked(&self, id: &SpiffeId) -> bool {
        self.agents.contains(id)
    }
    pub fn is_cache_revoked(&self, id: &SpiffeId) -> bool {
        self.caches.contains(id)
    }
    pub fn is_secret_version_revoked(&self, name: &str, version: u64) -> bool {
        // Allocation-free lookups would need a borrowed key type; secrets
        // are few and this runs once per lease.
        self.secret_versions.contains(&(name.to_string(), version))
    }
    pub fn is_jti_revoked(&self, jti: &str) -> bool {
        self.jtis.contains(jti)
    }
    pub fn is_join_token_revoked(&self, hash: &[u8; 32]) -> bool {
        self.join_tokens.contains(hash)
    }
    /// Whether a credential of `subject` issued at `issued_at_unix` is cut off.
    pub fn issued_before_cutoff(&self, subject: &SpiffeId, issued_at_unix: i64) -> bool {
        self.before
            .get(subject)
            .is_some_and(|cut| issued_at_unix < *cut)
    }

    /// The one token-revocation rule, for every enforcer (the cache's
    /// exchange path, `shared::verifier`): the token's own `jti`, the tokens
    /// it was delegated from (the cascade), every principal of it — the
    /// subject, then the agent of each actor of its delegation chain —
    /// revoked or cut off before `iat`, its issuing cache, and the
    /// certificate of the key that signed it (`signer_serial`, hex, when the
    /// caller knows it). A `sub`, actor or `iss` that does not parse cannot
    /// be checked, so the token is refused ([`RevocationReason::Unreadable`]).
    pub fn check_token(
        &self,
        c: &crate::token::Claims,
        signer_serial: Option<&str>,
    ) -> Result<(), RevocationReason> {
        if self.jtis.contains(&c.jti) {
            return Err(RevocationReason::Token(c.jti.clone()));
        }
        if let Some(p) = c.parent_jtis.iter().find(|p| self.jtis.contains(*p)) {
            return Err(RevocationReason::Parent(p.clone()));
        }
        let unreadable = |what: &str| Err(RevocationReason::Unreadable(what.to_owned()));
        let Ok(sub) = SpiffeId::parse(&c.sub) else {
            return unreadable("sub is not a SPIFFE id");
        };
        let mut principals = vec![sub];
        let mut actor = c.act.as_ref();
        while let Some(a) = actor {
            // `AGENT_ID/ACTOR`: the sub-agent acts for that agent.
            let Some(id) = a.agent() else {
                return unreadable("the agent of act.sub is not a SPIFFE id");
            };
            principals.push(id);
            actor = a.act.as_deref();
        }
        for id in principals {
            if self.agents.contains(&id) {
                return Err(RevocationReason::Agent(id));
            }
            if self.issued_before_cutoff(&id, c.iat) {
                return Err(RevocationReason::Cutoff(id));
            }
        }
        let Ok(iss) = SpiffeId::parse(&c.iss) else {
            return unreadable("iss is not a SPIFFE id");
        };
        if iss.role() != Role::Cache {
            return unreadable("iss is not a cache id");
        }
        if self.caches.contains(&iss) {
            return Err(RevocationReason::Issuer(iss));
        }
        if let Some(serial) = signer_serial.filter(|s| self.serials.contains(*s)) {
            return Err(RevocationReason::SigningKey(serial.to_owned()));
        }
        Ok(())
    }

    /// Checks a certificate (and the id of the CA that issued it) against
    /// every rule. The error says why, for the peer.
    pub fn is_serial_revoked(&self, serial_hex: &str) -> bool {
        self.serials.contains(serial_hex)
    }

    /// Checks a certificate and the CA that issued it (`None`: the root)
    /// against every rule. The error says why, for the peer.
    pub fn check_cert(&self, cert: &CertInfo, issuer: Option<&CertInfo>) -> Result<(), String> {
        if let Some(ca) = issuer {
            if self.serials.contains(&ca.serial_hex) {
                return Err(format!(
                    "the issuing CA certificate {} has been revoked",
                    ca.serial_hex
                ));
            }
            if let Some(ca_id) = ca.id.as_ref()
                && self.caches.contains(ca_id)
            {
                return Err(format!("the issuing cache {ca_id} has been revoked"));
            }
        }
        let Some(id) = cert.id.as_ref() else {
            return Ok(());
        };
        if self.agents.contains(id) {
            return Err(format!("{id} has been revoked"));
        }
        if self.caches.contains(id) {
            return Err(format!("cache {id} has been revoked"));
        }
        if self.serials.contains(&cert.serial_hex) {
            return Err(format!(
                "certificate {} of {id} has been revoked",
                cert.serial_hex
            ));
        }
        let issued_at = crate::clock::unix_secs(cert.not_before + BACKDATE);
        if self.issued_before_cutoff(id, issued_at) {
            return Err(format!(
                "credentials of {id} issued before the cutoff have been revoked"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("id")
    }

    fn ca_info(id: &SpiffeId) -> CertInfo {
        CertInfo {
            id: Some(id.clone()),
            serial_hex: "ca01".into(),
            not_before: std::time::UNIX_EPOCH,
            not_after: std::time::UNIX_EPOCH + std::time::Duration::from_secs(10_000),
            is_ca: true,
            sha256: [0; 32],
            eku_client_auth: false,
            eku_server_auth: false,
            org_unit: None,
        }
    }

    #[test]
    fn revoking_the_issuing_ca_by_serial_refuses_its_leaves() {
        let cache = id("spiffe://t/cache/eu/c");
        let mut leaf = ca_info(&id("spiffe://t/agent/eu/a"));
        leaf.serial_hex = "aa".into();
        leaf.is_ca = false;
        let mut set = RevocationSet::default();
        assert!(set.check_cert(&leaf, Some(&ca_info(&cache))).is_ok());
        set.apply(&Revocation {
            target: Target::CertSerial("ca01".into()),
            reason: String::new(),
        });
        let e = set
            .check_cert(&leaf, Some(&ca_info(&cache)))
            .expect_err("issuer revoked");
        assert!(e.contains("issuing CA"), "{e}");
    }

    #[test]
    fn proto_round_trip_and_validation() {
        let cases = [
            Target::Agent(id("spiffe://t/agent/eu/a")),
            Target::Jti("abc".into()),
            Target::CertSerial("0a1b".into()),
            Target::SubjectBefore {
                subject: id("spiffe://t/agent/eu/a"),
                issued_before_unix: 5,
            },
            Target::Cache(id("spiffe://t/cache/eu/c")),
            Target::JoinToken([7; 32]),
            Target::SecretVersion {
                name: "openai".into(),
                version: 3,
            },
        ];
        for target in cases {
            let r = Revocation {
                target,
                reason: "test".into(),
            };
            let p = pb::Revocation::from(&r);
            assert_eq!(Revocation::try_from(&p).expect("valid"), r);
        }
        let bad = [
            pb::Revocation {
                target: None,
                reason: String::new(),
            },
            pb::Revocation {
                target: Some(pb::revocation::Target::AgentId(
                    "spiffe://t/cache/eu/c".into(),
                )),
                reason: String::new(),
            },
            pb::Revocation {
                target: Some(pb::revocation::Target::CertSerial("xyz".into())),
                reason: String::new(),
            },
            pb::Revocation {
                target: Some(pb::revocation::Target::JoinTokenSha256(vec![1, 2])),
                reason: String::new(),
            },
            pb::Revocation {
                target: Some(pb::revocation::Target::Jti("a".into())),
                reason: "x".repeat(300),
            },
        ];
        for p in bad {
            assert!(Revocation::try_from(&p).is_err(), "{p:?}");
        }
    }

    #[test]
    fn checks_follow_each_target() {
        use std::time::{Duration, UNIX_EPOCH};
        let agent = id("spiffe://t/agent/eu/a");
        let cache = id("spiffe://t/cache/eu/c");
        let cert = CertInfo {
            id: Some(agent.clone()),
            serial_hex: "aa".into(),
            not_before: UNIX_EPOCH + Duration::from_secs(1000) - BACKDATE,
            not_after: UNIX_EPOCH + Duration::from_secs(5000),
            is_ca: false,
            sha256: [0; 32],
            eku_client_auth: true,
            eku_server_auth: false,
            org_unit: None,
        };
        let mut set = RevocationSet::default();
        assert!(set.check_cert(&cert, Some(&ca_info(&cache))).is_ok());
        set.apply(&Revocation {
            target: Target::SubjectBefore {
                subject: agent.clone(),
                issued_before_unix: 1000,
            },
            reason: String::new(),
        });
        assert!(
            set.check_cert(&cert, None).is_ok(),
            "issued exactly at the cutoff is kept"
        );
        set.apply(&Revocation {
            target: Target::SubjectBefore {
                subject: agent.clone(),
                issued_before_unix: 1001,
            },
            reason: String::new(),
        });
        assert!(set.check_cert(&cert, None).is_err());

        let mut set = RevocationSet::default();
        set.apply(&Revocation {
            target: Target::Cache(cache.clone()),
            reason: String::new(),
        });
        assert!(
            set.check_cert(&cert, Some(&ca_info(&cache)))
                .expect_err("issuer")
                .contains("issuing cache")
        );
        assert!(set.check_cert(&cert, None).is_ok());

        let mut set = RevocationSet::default();
        set.apply(&Revocation {
            target: Target::CertSerial("aa".into()),
            reason: String::new(),
        });
        assert!(set.check_cert(&cert, None).is_err());
        let mut set = RevocationSet::default();
        set.apply(&Revocation {
            target: Target::Agent(agent.clone()),
            reason: String::new(),
        });
        assert!(set.check_cert(&cert, None).is_err());
        assert!(set.is_agent_revoked(&agent));
        assert_eq!(set.len(), 1);
    }

    fn token(sub: &str, iss: &str) -> crate::token::Claims {
        crate::token::Claims {
            iss: iss.into(),
            sub: sub.into(),
            aud: "https://api".into(),
            scope: "read".into(),
            jti: "j1".into(),
            iat: 1000,
            nbf: 1000,
            exp: 1300,
            cnf: None,
            act: None,
            parent_jtis: vec![],
        }
    }

    #[test]
    fn a_token_whose_sub_or_iss_does_not_parse_is_refused() {
        let set = RevocationSet::default();
        let (sub, iss) = ("spiffe://t/agent/eu/a", "spiffe://t/cache/eu/c");
        assert!(set.check_token(&token(sub, iss), None).is_ok());
        for (sub, iss) in [
            ("not an id", iss),
            (sub, "not an id"),
            (sub, "spiffe://t/agent/eu/b"),
        ] {
            assert!(
                matches!(
                    set.check_token(&token(sub, iss), None),
                    Err(RevocationReason::Unreadable(_))
                ),
                "sub {sub:?}, iss {iss:?} cannot be checked, so it is refused"
            );
        }
    }
}
