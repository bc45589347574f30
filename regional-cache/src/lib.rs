//! The regional cache: near the agents. It holds an intermediate CA for its
//! region and a JWT signing key (both certified by the control plane, both
//! generated here and sealed at rest), enrols agents, renews their
//! certificates and mints short-lived, scope-limited tokens.

pub mod authz;
pub mod issued;
pub mod outbox;
pub mod secrets;
mod service;
pub mod sync;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lattice_shared::clock::{SharedClock, past_half_life};
use lattice_shared::id::{RegionId, Role, SpiffeId};
use lattice_shared::net::AuthGuardLayer;
use lattice_shared::pki::{Authority, CertInfo, PkiError, PrivateKey, TrustBundle, Usage, inspect};
use lattice_shared::proto::{self as pb, control_plane_client::ControlPlaneClient};
use lattice_shared::seal::{KeyVault, SealError};
use lattice_shared::store::{SharedStore, StoreError, Write};
use lattice_shared::tls::{ExpectedServer, ReloadableCert};
use lattice_shared::token::{TokenSigner, jwks_from_certs};
use lattice_shared::{limits, pem};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::authz::{Authorizer, PolicyAuthorizer};

pub const SCHEMA_VERSION: u32 = 1;
const T_IDENTITY: &str = "identity";

/// No secret lease outlives 15 minutes.
pub const MAX_LEASE_TTL_SECS: u64 = 900;

/// Cache configuration (TOML, `LATTICE_CACHE_*` environment overrides).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `spiffe://TD/cache/REGION/NAME`.
    pub id: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub control_plane: SocketAddr,
    /// PEM file with the root CA certificate (`root.crt` of the control plane).
    pub root_ca: PathBuf,
    /// One-time join token, needed only for the first start. Prefer the
    /// environment (LATTICE_CACHE_JOIN_TOKEN) to a file.
    pub join_token: Option<lattice_shared::secret::Secret>,
    pub agent_cert_ttl_secs: u64,
    pub token_default_ttl_secs: u64,
    pub token_max_ttl_secs: u64,
    /// Secret leases: default and longest (at most 900 s).
    pub lease_default_ttl_secs: u64,
    pub lease_max_ttl_secs: u64,
    pub jwks_refresh_secs: u64,
    pub renew_check_secs: u64,
    /// L: the cache refuses to mint once it cannot prove it holds every
    /// revocation older than this. Pings go out every L/5.
    pub max_staleness_ms: u64,
    /// Audit records held on disk while the control plane is unreachable;
    /// past 80 % an `audit_backlog` alert follows, when full new records
    /// are dropped (counted).
    pub audit_outbox_max_records: u64,
    pub metrics_listen: Option<SocketAddr>,
    pub log_json: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            id: "spiffe://lattice.local/cache/eu/cache-1".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            data_dir: PathBuf::from("./data/cache"),
            control_plane: SocketAddr::from(([127, 0, 0, 1], 7443)),
            root_ca: PathBuf::from("./data/cp/root.crt"),
            join_token: None,
            agent_cert_ttl_secs: 3600,
            token_default_ttl_secs: 300,
            token_max_ttl_secs: 900,
            lease_default_ttl_secs: 300,
            lease_max_ttl_secs: 900,
            jwks_refresh_secs: 30,
            renew_check_secs: 60,
            max_staleness_ms: 5000,
            audit_outbox_max_records: outbox::MAX_EVENTS,
            metrics_listen: None,
            log_json: false,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<SpiffeId, String> {
        let id = SpiffeId::parse(&self.id).map_err(|e| format!("id: {e}"))?;
        if id.role() != Role::Cache {
            return Err(format!(
                "id: {id} is not a cache id (spiffe://TD/cache/REGION/NAME)"
            ));
        }
        if self.token_default_ttl_secs == 0 || self.token_default_ttl_secs > self.token_max_ttl_secs
        {
            return Err("token_default_ttl_secs must be within 1..=token_max_ttl_secs".into());
        }
        if self.token_max_ttl_secs > 3600 {
            return Err("token_max_ttl_secs may not exceed 3600: tokens are short-lived".into());
        }
        if self.lease_default_ttl_secs == 0
            || self.lease_default_ttl_secs > self.lease_max_ttl_secs
            || self.lease_max_ttl_secs > MAX_LEASE_TTL_SECS
        {
            return Err(format!(
                "lease ttls must satisfy 1 <= lease_default_ttl_secs <= lease_max_ttl_secs <= {MAX_LEASE_TTL_SECS}"
            ));
        }
        if self.agent_cert_ttl_secs < 60 || self.agent_cert_ttl_secs > 86400 {
            return Err("agent_cert_ttl_secs must be within 60..=86400".into());
        }
        if self.max_staleness_ms < 50 || self.max_staleness_ms > 3_600_000 {
            return Err("max_staleness_ms must be within 50..=3600000".into());
        }
        if !(1000..=100_000_000).contains(&self.audit_outbox_max_records) {
            return Err("audit_outbox_max_records must be within 1000..=100000000".into());
        }
        if self.jwks_refresh_secs == 0 || self.renew_check_secs == 0 {
            return Err("jwks_refresh_secs and renew_check_secs must be positive".into());
        }
        Ok(id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("token signing key: {0}")]
    Token(#[from] lattice_shared::token::TokenError),
    #[error("control plane: {0}")]
    ControlPlane(String),
    #[error("stored identity is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "this cache is not enrolled and has no join token: set LATTICE_CACHE_JOIN_TOKEN (from `lattice join-token create --id ...`)"
    )]
    NeedsJoinToken,
}

#[derive(Debug)]
pub struct Deps {
    pub clock: SharedClock,
    pub store: SharedStore,
    pub vault: Arc<dyn KeyVault>,
    pub listener: TcpListener,
    /// `None`: the Cedar policy release in force (from the sync stream).
    pub authorizer: Option<Arc<dyn Authorizer>>,
    /// Receives a record of every issuance and refusal (the audit trail).
    pub audit: Option<Arc<dyn AuditSink>>,
}

/// What the cache did, for the audit trail. Never carries a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditEvent {
    Issued {
        cache: SpiffeId,
        agent: SpiffeId,
        /// The caller's address as the cache saw it ("" if unknown).
        source: String,
        /// The request's id (the caller's `x-lattice-request-id`, or one
        /// the cache made), also returned in the response's metadata.
        request_id: String,
        jti: String,
        audience: String,
        at_unix_ms: i64,
        /// The policy release that allowed it.
        policy_version: u64,
    },
    /// A secret served: the keyed fingerprint names the value, never shows it.
    Leased {
        cache: SpiffeId,
        agent: SpiffeId,
        /// The caller's address as the cache saw it ("" if unknown).
        source: String,
        /// The request's id (the caller's `x-lattice-request-id`, or one
        /// the cache made), also returned in the response's metadata.
        request_id: String,
        secret: String,
        version: u64,
        lease_id: String,
        fingerprint: String,
        expires_at_unix: i64,
        at_unix_ms: i64,
        policy_version: u64,
    },
    Refused {
        cache: SpiffeId,
        agent: SpiffeId,
        /// The caller's address as the cache saw it ("" if unknown).
        source: String,
        /// The request's id (as for `Issued`).
        request_id: String,
        /// What was asked (`MintToken`, `LeaseSecret`, …) and of what (an
        /// audience, a secret name, a region).
        action: String,
        resource: String,
        reason: String,
        at_unix_ms: i64,
        /// The policy release in force (that denied it, for a policy denial).
        policy_version: u64,
    },
    /// A token delegated to a sub-agent by token exchange.
    Delegated {
        cache: SpiffeId,
        agent: SpiffeId,
        /// The caller's address as the cache saw it ("" if unknown).
        source: String,
        /// The request's id (the caller's `x-lattice-request-id`, or one
        /// the cache made), also returned in the response's metadata.
        request_id: String,
        jti: String,
        parent_jti: String,
        actor: String,
        audience: String,
        depth: u32,
        at_unix_ms: i64,
        policy_version: u64,
    },
    /// An event the agent recorded itself (its proxy's use of a key), as
    /// reported by the authenticated agent.
    Reported {
        cache: SpiffeId,
        agent: SpiffeId,
        kind: String,
        resource: String,
        detail: String,
        fingerprint: String,
        local_caller: String,
        request_id: String,
        /// As the agent says.
        at_unix_ms: i64,
        /// When the cache received it.
        received_at_unix_ms: i64,
    },
}

impl AuditEvent {
    /// The record forwarded to the control plane's audit log (JSON; never
    /// a token or a secret value). The control plane adds which cache sent it.
    pub fn to_record(&self, region: &str) -> Vec<u8> {
        /// One per minted token: written straight from borrowed fields
        /// rather than through a JSON tree (a third of the record's cost).
        #[derive(serde::Serialize)]
        struct IssuedRecord<'a> {
            kind: &'static str,
            agent: &'a str,
            jti: &'a str,
            source: &'a str,
            request_id: &'a str,
            audience: &'a str,
            at_unix_ms: i64,
            policy_version: u64,
            region: &'a str,
            decision: &'static str,
        }
        let v = match self {
            AuditEvent::Issued {
                agent,
                source,
                request_id,
                jti,
                audience,
                at_unix_ms,
                policy_version,
                ..
            } => {
                return serde_json::to_vec(&IssuedRecord {
                    kind: "issued",
                    agent: agent.as_str(),
                    jti,
                    source,
                    request_id,
                    audience,
                    at_unix_ms: *at_unix_ms,
                    policy_version: *policy_version,
                    region,
                    decision: "allow",
                })
                // Strings and numbers only: serializing cannot fail.
                .unwrap_or_default();
            }
            AuditEvent::Leased {
                agent,
                source,
                request_id,
                secret,
                version,
                lease_id,
                fingerprint,
                expires_at_unix,
                at_unix_ms,
                policy_version,
                ..
            } => serde_json::json!({
                "kind": "leased", "agent": agent.as_str(), "secret": secret, "source": source, "request_id": request_id,
                "version": version, "lease_id": lease_id, "fingerprint": fingerprint,
                "expires_at_unix": expires_at_unix, "at_unix_ms": at_unix_ms,
                "policy_version": policy_version, "region": region,
                "decision": "allow",
            }),
            AuditEvent::Refused {
                agent,
                source,
                request_id,
                action,
                resource,
                reason,
                at_unix_ms,
                policy_version,
                ..
            } => serde_json::json!({
                "kind": "refused", "agent": agent.as_str(), "reason": reason,
                "source": source, "request_id": request_id,
                "action": action, "resource": resource,
                "at_unix_ms": at_unix_ms, "policy_version": policy_version,
                "region": region, "decision": "deny",
            }),
            AuditEvent::Delegated {
                agent,
                source,
                request_id,
                jti,
                parent_jti,
                actor,
                audience,
                depth,
                at_unix_ms,
                policy_version,
                ..
            } => serde_json::json!({
                "kind": "delegated", "agent": agent.as_str(), "jti": jti, "source": source, "request_id": request_id,
                "parent_jti": parent_jti, "actor": actor, "audience": audience,
                "depth": depth, "at_unix_ms": at_unix_ms,
                "policy_version": policy_version, "region": region,
                "decision": "allow",
            }),
            AuditEvent::Reported {
                agent,
                kind,
                resource,
                detail,
                fingerprint,
                local_caller,
                request_id,
                at_unix_ms,
                received_at_unix_ms,
                ..
            } => serde_json::json!({
                "kind": kind, "agent": agent.as_str(), "resource": resource,
                "detail": detail, "fingerprint": fingerprint,
                "local_caller": local_caller, "request_id": request_id,
                "reported_at_unix_ms": at_unix_ms,
                "at_unix_ms": received_at_unix_ms, "region": region,
                "decision": if kind == "proxy_refused" { "deny" } else { "allow" },
                "reported_by": "agent",
            }),
        };
        v.to_string().into_bytes()
    }
}

pub trait AuditSink: Send + Sync + std::fmt::Debug + 'static {
    fn record(&self, event: AuditEvent);
}

/// Certificates as stored (keys are sealed separately).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredCerts {
    ca_cert: String,
    tls_cert: String,
    signing_cert: String,
}

/// The cache's current keys and certificates; replaced whole on renewal.
pub struct Identity {
    pub ca: Authority,
    pub signer: TokenSigner,
    pub signing_cert: Vec<u8>,
    /// Serial of `signing_cert`: when it is revoked the cache stops signing.
    pub signing_serial: String,
    pub tls: CertInfo,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("ca", self.ca.info())
            .field("kid", &self.signer.kid())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct State {
    pub cfg: Config,
    pub id: SpiffeId,
    pub region: RegionId,
    pub clock: SharedClock,
    pub store: SharedStore,
    vault: Arc<dyn KeyVault>,
    pub bundle: Arc<TrustBundle>,
    identity: RwLock<Arc<Identity>>,
    tls_cert: Arc<ReloadableCert>,
    /// Signing certificates of every cache, as last fetched from the control plane.
    cp_signing: RwLock<Vec<Vec<u8>>>,
    /// Our own signing certificates still valid (the current one last).
    own_signing: RwLock<Vec<Vec<u8>>>,
    jwks_json: RwLock<Arc<String>>,
    cp: ControlPlaneClient<Channel>,
    pub authorizer: Arc<dyn Authorizer>,
    /// The policy release in force, fed by the sync stream.
    pub policy: Arc<PolicyAuthorizer>,
    /// Freshness and revocations.
    pub sync: sync::Sync,
    /// Secrets' DEKs are sealed to this key (private half sealed at rest).
    pub(crate) hpke: lattice_shared::envelope::HpkeKeyPair,
    pub audit: Option<Arc<dyn AuditSink>>,
    /// Audit records on their way to the control plane (durable).
    pub outbox: Arc<outbox::Outbox>,
    /// Live tokens issued, for re-evaluation when an agent's claims change.
    pub issued: issued::Issued,
    /// Events each agent reported in the current window (`ReportAudit`).
    pub(crate) report_quota: moka::sync::Cache<SpiffeId, Arc<std::sync::Mutex<(u64, usize)>>>,
    /// Turns true when the cache stops; long-lived streams end then.
    pub stopping: watch::Receiver<bool>,
}

/// Refuses revoked agents, certificates and issuing caches at the handshake.
#[derive(Debug)]
struct RevocationCheck(std::sync::Weak<State>);

impl lattice_shared::tls::PeerCheck for RevocationCheck {
    fn check(&self, leaf: &CertInfo, issuer: Option<&CertInfo>) -> Result<(), String> {
        match self.0.upgrade() {
            Some(state) => state.sync.check_cert(leaf, issuer),
            None => Err("cache is shutting down".into()),
        }
    }
}

#[derive(Debug)]
pub struct App {
    pub state: Arc<State>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    kill: watch::Sender<bool>,
    server: JoinHandle<()>,
    background: JoinHandle<()>,
    sync_task: JoinHandle<()>,
    outbox_task: JoinHandle<()>,
}

struct Keys {
    ca: PrivateKey,
    tls: PrivateKey,
    signing: PrivateKey,
}

const AAD_CA: &str = "cache/ca-key";
const AAD_TLS: &str = "cache/tls-key";
const AAD_SIGNING: &str = "cache/signing-key";
const AAD_HPKE: &str = "cache/hpke-key";

/// The cache's X25519 key for sealed secrets: created once, kept sealed.
fn load_or_create_hpke(
    store: &SharedStore,
    vault: &Arc<dyn KeyVault>,
) -> Result<lattice_shared::envelope::HpkeKeyPair, Error> {
    use lattice_shared::envelope::HpkeKeyPair;
    if let Some(sealed) = store.get(T_IDENTITY, b"hpke_key")? {
        let bytes = vault.open(&sealed, AAD_HPKE)?;
        return HpkeKeyPair::from_private_bytes(&bytes)
            .map_err(|e| Error::Corrupt(format!("stored HPKE key: {e}")));
    }
    let pair = HpkeKeyPair::generate();
    store.apply(vec![Write {
        tree: T_IDENTITY,
        key: b"hpke_key".to_vec(),
        value: Some(vault.seal(&pair.private_bytes(), AAD_HPKE)?),
    }])?;
    Ok(pair)
}

fn new_keys() -> Result<(Keys, pb::CacheCsrs), Error> {
    let keys = Keys {
        ca: PrivateKey::generate_p256()?,
        tls: PrivateKey::generate_p256()?,
        signing: PrivateKey::generate_ed25519()?,
    };
    let csrs = pb::CacheCsrs {
        ca_csr: keys.ca.csr_der()?,
        tls_csr: keys.tls.csr_der()?,
        signing_csr: keys.signing.csr_der()?,
    };
    Ok((keys, csrs))
}

fn b64(d: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(d)
}
fn unb64(s: &str) -> Result<Vec<u8>, Error> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| Error::Corrupt(e.to_string()))
}

fn status_to_error(what: &str, s: tonic::Status) -> Error {
    Error::ControlPlane(format!("{what}: {} ({:?})", s.message(), s.code()))
}

impl State {
    /// Checks the certificates the control plane returned against our keys
    /// and the root, persists keys (sealed) and certificates in one durable
    /// batch, and builds the identity.
    fn accept_certificates(
        id: &SpiffeId,
        bundle: &TrustBundle,
        clock: &SharedClock,
        store: &SharedStore,
        vault: &Arc<dyn KeyVault>,
        keys: Keys,
        certs: &pb::CacheCertificates,
    ) -> Result<(Identity, Vec<u8>, PrivateKey), Error> {
        let now = clock.now();
        let tls_info = bundle.verify(&certs.tls_cert, &[], now, Usage::TlsServer)?;
        let signing_info = bundle.verify(&certs.signing_cert, &[], now, Usage::JwtSigning)?;
        let ca_info = inspect(&certs.ca_cert)?;
        for (what, info) in [
            ("TLS", &tls_info),
            ("signing", &signing_info),
            ("CA", &ca_info),
        ] {
            if info.id.as_ref() != Some(id) {
                return Err(Error::ControlPlane(format!(
                    "{what} certificate names {:?}, not {id}",
                    info.id
                )));
            }
        }
        let signer = TokenSigner::from_pkcs8(&keys.signing.pkcs8_der())?;
        if lattice_shared::token::public_key_of_cert(&certs.signing_cert).as_deref()
            != Some(&signer.public_key_raw()[..])
        {
            return Err(Error::ControlPlane(
                "signing certificate does not carry our key".into(),
            ));
        }
        let stored = StoredCerts {
            ca_cert: b64(&certs.ca_cert),
            tls_cert: b64(&certs.tls_cert),
            signing_cert: b64(&certs.signing_cert),
        };
        let json = serde_json::to_vec(&stored).map_err(|e| Error::Corrupt(e.to_string()))?;
        store.apply(vec![
            Write {
                tree: T_IDENTITY,
                key: b"ca_key".to_vec(),
                value: Some(vault.seal(&keys.ca.pkcs8_der(), AAD_CA)?),
            },
            Write {
                tree: T_IDENTITY,
                key: b"tls_key".to_vec(),
                value: Some(vault.seal(&keys.tls.pkcs8_der(), AAD_TLS)?),
            },
            Write {
                tree: T_IDENTITY,
                key: b"signing_key".to_vec(),
                value: Some(vault.seal(&keys.signing.pkcs8_der(), AAD_SIGNING)?),
            },
            Write {
                tree: T_IDENTITY,
                key: b"certs".to_vec(),
                value: Some(json),
            },
        ])?;
        // The signing key lives on inside `signer`; this copy is zeroized on drop.
        let Keys {
            ca,
            tls,
            signing: _,
        } = keys;
        let authority = Authority::from_parts(certs.ca_cert.clone(), ca)?;
        Ok((
            Identity {
                ca: authority,
                signer,
                signing_cert: certs.signing_cert.clone(),
                signing_serial: signing_info.serial_hex.clone(),
                tls: tls_info,
            },
            certs.tls_cert.clone(),
            tls,
        ))
    }

    fn load_identity(
        store: &SharedStore,
        vault: &Arc<dyn KeyVault>,
    ) -> Result<Option<(Identity, Vec<u8>, PrivateKey)>, Error> {
        let Some(json) = store.get(T_IDENTITY, b"certs")? else {
            return Ok(None);
        };
        let stored: StoredCerts =
            serde_json::from_slice(&json).map_err(|e| Error::Corrupt(e.to_string()))?;
        let get = |k: &[u8], aad: &str| -> Result<PrivateKey, Error> {
            let sealed = store
                .get(T_IDENTITY, k)?
                .ok_or_else(|| Error::Corrupt("missing key".into()))?;
            Ok(PrivateKey::from_pkcs8(&vault.open(&sealed, aad)?)?)
        };
        let ca = Authority::from_parts(unb64(&stored.ca_cert)?, get(b"ca_key", AAD_CA)?)?;
        let tls_key = get(b"tls_key", AAD_TLS)?;
        let signing_key = get(b"signing_key", AAD_SIGNING)?;
        let signer = TokenSigner::from_pkcs8(&signing_key.pkcs8_der())?;
        let tls_cert = unb64(&stored.tls_cert)?;
        let tls = inspect(&tls_cert)?;
        let signing_cert = unb64(&stored.signing_cert)?;
        let signing_serial = inspect(&signing_cert)?.serial_hex;
        Ok(Some((
            Identity {
                ca,
                signer,
                signing_cert,
                signing_serial,
                tls,
            },
            tls_cert,
            tls_key,
        )))
    }

    pub fn identity(&self) -> Arc<Identity> {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn jwks_json(&self) -> Arc<String> {
        self.jwks_json
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn rebuild_jwks(&self) {
        let now = self.clock.now();
        let own = self
            .own_signing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let cp = self
            .cp_signing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let revoked = self.sync.revocations();
        let set = jwks_from_certs(
            own.iter()
                .chain(cp.iter())
                .filter(|c| {
                    inspect(c).ok().is_some_and(|i| {
                        !revoked.is_serial_revoked(&i.serial_hex)
                            && i.id.is_some_and(|id| !revoked.is_cache_revoked(&id))
                    })
                })
                .map(Vec::as_slice),
            now,
        );
        let json = serde_json::to_string(&set).unwrap_or_else(|_| "{\"keys\":[]}".into());
        *self.jwks_json.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(json);
    }

    /// Called after a batch of events is applied.
    pub(crate) fn after_events(&self) {
        self.rebuild_jwks();
    }

    pub fn now_ms(&self) -> i64 {
        self.clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    /// Fetches every cache's signing keys from the control plane.
    pub async fn refresh_jwks(&self) -> Result<(), Error> {
        let resp = self
            .cp
            .clone()
            .jwks(pb::JwksRequest {})
            .await
            .map_err(|s| status_to_error("fetching the JWKS", s))?
            .into_inner();
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&resp.jwks_json)
            .map_err(|e| Error::ControlPlane(e.to_string()))?;
        let now = self.clock.now();
        let mut certs = Vec::new();
        for jwk in &set.keys {
            use base64::Engine;
            let Some(c) = jwk.common.x509_chain.as_ref().and_then(|c| c.first()) else {
                continue;
            };
            let Ok(der) = base64::engine::general_purpose::STANDARD.decode(c) else {
                continue;
            };
            // Only keys the root certified for a cache enter our JWKS.
            if self
                .bundle
                .verify(&der, &[], now, Usage::JwtSigning)
                .is_ok()
            {
                certs.push(der);
            }
        }
        *self.cp_signing.write().unwrap_or_else(|p| p.into_inner()) = certs;
        self.rebuild_jwks();
        Ok(())
    }

    /// Renews the CA, TLS and signing certificates (with fresh keys) once the
    /// CA has passed half its life. Returns whether it renewed.
    pub async fn renew_if_due(&self) -> Result<bool, Error> {
        let ident = self.identity();
        let info = ident.ca.info();
        if !past_half_life(self.clock.now(), info.not_before, info.not_after) {
            return Ok(false);
        }
        let (keys, csrs) = new_keys()?;
        let resp = self
            .cp
            .clone()
            .renew_ca(pb::RenewCaRequest {
                csrs: Some(csrs),
                hpke_public_key: self.hpke.public_bytes(),
            })
            .await
            .map_err(|s| status_to_error("renewing certificates", s))?
            .into_inner();
        let certs = resp
            .certificates
            .ok_or_else(|| Error::ControlPlane("no certificates".into()))?;
        let (store, vault, clock, bundle, id) = (
            self.store.clone(),
            self.vault.clone(),
            self.clock.clone(),
            self.bundle.clone(),
            self.id.clone(),
        );
        let (ident, tls_cert, tls_key) = tokio::task::spawn_blocking(move || {
            Self::accept_certificates(&id, &bundle, &clock, &store, &vault, keys, &certs)
        })
        .await
        .map_err(|_| Error::Corrupt("worker failed".into()))??;
        self.tls_cert.replace(vec![tls_cert], &tls_key)?;
        self.own_signing
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(ident.signing_cert.clone());
        tracing::info!(cache_id = %self.id, serial = %ident.ca.info().serial_hex, "renewed cache certificates");
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ident);
        self.rebuild_jwks();
        metrics::counter!("lattice_cache_renewals_total").increment(1);
        Ok(true)
    }
}

impl App {
    pub async fn build(cfg: Config, deps: Deps) -> Result<App, Error> {
        let id = cfg.validate().map_err(Error::Config)?;
        let region = id
            .region()
            .cloned()
            .ok_or_else(|| Error::Config("cache id has no region".into()))?;
        let root_der = pem::read_certs(&cfg.root_ca)
            .map_err(Error::Config)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Config("root_ca holds no certificate".into()))?;
        let bundle = Arc::new(TrustBundle::new(id.trust_domain().clone(), root_der)?);
        lattice_shared::store::check_schema(&*deps.store, "regional-cache", SCHEMA_VERSION)?;

        let tls_cert = ReloadableCert::empty();
        let hpke = load_or_create_hpke(&deps.store, &deps.vault)?;
        let (identity, tls_der, tls_key) = match State::load_identity(&deps.store, &deps.vault)? {
            Some(loaded) => loaded,
            None => {
                let token = cfg.join_token.clone().ok_or(Error::NeedsJoinToken)?;
                let (keys, csrs) = new_keys()?;
                // Enrolment: server-auth TLS, the control plane proven by the root.
                let tls = lattice_shared::tls::client_config(
                    bundle.clone(),
                    deps.clock.clone(),
                    ExpectedServer::ControlPlane,
                    None,
                )?;
                let ch = lattice_shared::net::channel(cfg.control_plane, tls)
                    .map_err(|e| Error::ControlPlane(e.to_string()))?;
                let resp = ControlPlaneClient::new(ch)
                    .enrol(pb::EnrolCacheRequest {
                        join_token: token.expose().to_owned(),
                        requested_id: id.to_string(),
                        csrs: Some(csrs),
                        hpke_public_key: hpke.public_bytes(),
                    })
                    .await
                    .map_err(|s| status_to_error("enrolment refused", s))?
                    .into_inner();
                let certs = resp
                    .certificates
                    .ok_or_else(|| Error::ControlPlane("no certificates".into()))?;
                let accepted = State::accept_certificates(
                    &id,
                    &bundle,
                    &deps.clock,
                    &deps.store,
                    &deps.vault,
                    keys,
                    &certs,
                )?;
                tracing::info!(cache_id = %id, "enrolled at the control plane");
                accepted
            }
        };
        if deps.clock.now() > identity.tls.not_after {
            return Err(Error::Config(format!(
                "the stored certificates of {id} expired at {:?}; re-enrol with a new join token (remove {})",
                identity.tls.not_after,
                cfg.data_dir.display()
            )));
        }
        tls_cert.replace(vec![tls_der], &tls_key)?;
        drop(tls_key);

        let cp_tls = lattice_shared::tls::client_config(
            bundle.clone(),
            deps.clock.clone(),
            ExpectedServer::ControlPlane,
            Some(tls_cert.clone()),
        )?;
        let cp = ControlPlaneClient::new(
            lattice_shared::net::channel(cfg.control_plane, cp_tls)
                .map_err(|e| Error::ControlPlane(e.to_string()))?,
        )
        .max_decoding_message_size(limits::MAX_SYNC_MESSAGE_BYTES);
        let policy = Arc::new(PolicyAuthorizer::default());
        let authorizer = deps
            .authorizer
            .unwrap_or_else(|| policy.clone() as Arc<dyn Authorizer>);
        let own_signing = vec![identity.signing_cert.clone()];
        let sync = sync::Sync::load(
            id.clone(),
            &deps.store,
            deps.clock.clone(),
            Duration::from_millis(cfg.max_staleness_ms),
            Some(sync::PolicyTrust {
                root_der: bundle.root_der().to_vec(),
                trust_domain: bundle.trust_domain().clone(),
                authorizer: policy.clone(),
            }),
        )?;
        let outbox = Arc::new(outbox::Outbox::open(
            deps.store.clone(),
            cfg.audit_outbox_max_records,
            deps.clock.clone(),
        )?);
        let (shutdown, mut rx) = watch::channel(false);
        let state = Arc::new(State {
            outbox: outbox.clone(),
            report_quota: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(60))
                .build(),
            issued: issued::Issued::new(std::time::Duration::from_secs(
                cfg.token_max_ttl_secs.max(1),
            )),
            stopping: rx.clone(),
            cfg,
            id,
            region,
            clock: deps.clock.clone(),
            store: deps.store,
            vault: deps.vault,
            bundle: bundle.clone(),
            identity: RwLock::new(Arc::new(identity)),
            tls_cert: tls_cert.clone(),
            cp_signing: RwLock::new(Vec::new()),
            own_signing: RwLock::new(own_signing),
            jwks_json: RwLock::new(Arc::new(String::new())),
            cp,
            authorizer,
            policy,
            sync,
            hpke,
            audit: deps.audit,
        });
        state.rebuild_jwks();
        // The first JWKS fetch happens in the background task: a control
        // plane that is unreachable now must not delay serving.

        let tls = lattice_shared::tls::server_config(
            bundle,
            deps.clock.clone(),
            tls_cert,
            Some(Arc::new(RevocationCheck(Arc::downgrade(&state)))),
        )?;
        let addr = deps.listener.local_addr()?;
        let (kill, kill_rx) = watch::channel(false);
        let incoming = lattice_shared::net::tls_incoming(deps.listener, tls, kill_rx);
        let routes = service::routes(state.clone());
        let server = tonic::transport::Server::builder()
            .accept_http1(true)
            .max_concurrent_streams(limits::MAX_CONCURRENT_STREAMS)
            .http2_max_header_list_size(limits::MAX_HEADER_LIST_BYTES)
            .timeout(limits::RPC_TIMEOUT)
            .layer(AuthGuardLayer::new(service::OPEN_PATHS))
            .add_routes(routes);
        let server = tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = server.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::error!(error = %e, "cache server failed");
            }
        });
        let background = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut renew =
                    tokio::time::interval(Duration::from_secs(state.cfg.renew_check_secs));
                let mut jwks =
                    tokio::time::interval(Duration::from_secs(state.cfg.jwks_refresh_secs));
                let mut publish = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = publish.tick() => sync::publish_metrics(&state),
                        _ = renew.tick() => {
                            if let Err(e) = state.renew_if_due().await {
                                tracing::warn!(error = %e, "certificate renewal failed; will retry");
                            }
                        }
                        _ = jwks.tick() => {
                            if let Err(e) = state.refresh_jwks().await {
                                tracing::debug!(error = %e, "JWKS refresh failed; will retry");
                            }
                        }
                    }
                }
            })
        };
        let sync_task = tokio::spawn(sync::run(state.clone()));
        let outbox_task = tokio::spawn(outbox.run_writer());
        tracing::info!(%addr, cache_id = %state.id, "cache listening");
        Ok(App {
            state,
            addr,
            shutdown,
            kill,
            server,
            background,
            sync_task,
            outbox_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.background.abort();
        self.sync_task.abort();
        let _ = self.sync_task.await;
        let _ = self.background.await;
        self.outbox_task.abort();
        let _ = self.outbox_task.await;
        // What was recorded but not yet written goes to disk now.
        let outbox = self.state.outbox.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || outbox.flush_now()).await {
            tracing::error!(error = %e, "writing the last audit records failed");
        }
        lattice_shared::net::stop_server(self.server, &self.kill).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_record_carries_every_field() {
        let e = AuditEvent::Issued {
            cache: SpiffeId::parse("spiffe://t/cache/eu/c1").expect("id"),
            agent: SpiffeId::parse("spiffe://t/agent/eu/a").expect("id"),
            source: "10.0.0.7".into(),
            request_id: "req-\"1\"".into(),
            jti: "j1".into(),
            audience: "https://api.example.com".into(),
            at_unix_ms: 1_700_000_000_123,
            policy_version: 4,
        };
        let v: serde_json::Value = serde_json::from_slice(&e.to_record("eu")).expect("JSON");
        assert_eq!(
            v,
            serde_json::json!({
                "kind": "issued", "agent": "spiffe://t/agent/eu/a", "jti": "j1",
                "source": "10.0.0.7", "request_id": "req-\"1\"",
                "audience": "https://api.example.com", "at_unix_ms": 1_700_000_000_123_i64,
                "policy_version": 4, "region": "eu", "decision": "allow",
            })
        );
    }
}
