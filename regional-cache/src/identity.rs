//! The cache's own identity: its keys (generated here, sealed at rest),
//! enrolment at the control plane and renewal at half-life, and the JWKS it
//! publishes (its own signing keys and every other cache's, as the root
//! certified them). The calls to the control plane's gRPC service made for
//! these live here.

use std::net::SocketAddr;
use std::sync::Arc;

use lattice_shared::clock::{SharedClock, past_half_life};
use lattice_shared::id::{HostName, SpiffeId};
use lattice_shared::pki::{Authority, CertInfo, PrivateKey, TrustBundle, Usage, inspect};
use lattice_shared::proto::{self as pb, control_plane_client::ControlPlaneClient};
use lattice_shared::seal::KeyVault;
use lattice_shared::store::{JsonStore as _, SharedStore, Write, to_json};
use lattice_shared::tls::ExpectedServer;
use lattice_shared::token::{TokenSigner, jwks_from_certs};
use serde::{Deserialize, Serialize};

use crate::{Error, State};

const T_IDENTITY: &str = "identity";

/// Certificates as stored (keys are sealed separately).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredCerts {
    #[serde(with = "lattice_shared::serde_b64")]
    ca_cert: Vec<u8>,
    #[serde(with = "lattice_shared::serde_b64")]
    tls_cert: Vec<u8>,
    #[serde(with = "lattice_shared::serde_b64")]
    signing_cert: Vec<u8>,
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
pub(crate) fn load_or_create_hpke(
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

/// Fresh keys and their requests; the TLS one asks for `names`.
fn new_keys(names: &[HostName]) -> Result<(Keys, pb::CacheCsrs), Error> {
    let keys = Keys {
        ca: PrivateKey::generate_p256()?,
        tls: PrivateKey::generate_p256()?,
        signing: PrivateKey::generate_ed25519()?,
    };
    let csrs = pb::CacheCsrs {
        ca_csr: keys.ca.csr_der()?,
        tls_csr: keys.tls.csr_der_naming(names)?,
        signing_csr: keys.signing.csr_der()?,
    };
    Ok((keys, csrs))
}

fn status_to_error(what: &str, s: tonic::Status) -> Error {
    Error::ControlPlane(format!("{what}: {} ({:?})", s.message(), s.code()))
}

/// First start: enrols at the control plane with the one-time join token
/// (server-auth TLS, the control plane proven by the root) and keeps what
/// it certified.
pub(crate) struct Enrolment<'a> {
    pub id: &'a SpiffeId,
    pub names: &'a [HostName],
    pub control_plane: SocketAddr,
    pub join_token: &'a lattice_shared::secret::Secret,
    pub bundle: &'a Arc<TrustBundle>,
    pub clock: &'a SharedClock,
    pub store: &'a SharedStore,
    pub vault: &'a Arc<dyn KeyVault>,
    pub hpke: &'a lattice_shared::envelope::HpkeKeyPair,
}

impl Enrolment<'_> {
    pub(crate) async fn run(self) -> Result<(Identity, Vec<u8>, PrivateKey), Error> {
        let (keys, csrs) = new_keys(self.names)?;
        let tls = lattice_shared::tls::client_config(
            self.bundle.clone(),
            self.clock.clone(),
            ExpectedServer::ControlPlane,
            None,
        )?;
        let ch = lattice_shared::net::channel(self.control_plane, tls)
            .map_err(|e| Error::ControlPlane(e.to_string()))?;
        let resp = ControlPlaneClient::new(ch)
            .enrol(pb::EnrolCacheRequest {
                join_token: self.join_token.expose().to_owned(),
                requested_id: self.id.to_string(),
                csrs: Some(csrs),
                hpke_public_key: self.hpke.public_bytes(),
            })
            .await
            .map_err(|s| status_to_error("enrolment refused", s))?
            .into_inner();
        let certs = resp
            .certificates
            .ok_or_else(|| Error::ControlPlane("no certificates".into()))?;
        let accepted = State::accept_certificates(
            self.id,
            self.bundle,
            self.clock,
            self.store,
            self.vault,
            keys,
            &certs,
        )?;
        tracing::info!(cache_id = %self.id, "enrolled at the control plane");
        Ok(accepted)
    }
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
            ca_cert: certs.ca_cert.clone(),
            tls_cert: certs.tls_cert.clone(),
            signing_cert: certs.signing_cert.clone(),
        };
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
                value: Some(to_json(T_IDENTITY, &stored)?),
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

    pub(crate) fn load_identity(
        store: &SharedStore,
        vault: &Arc<dyn KeyVault>,
    ) -> Result<Option<(Identity, Vec<u8>, PrivateKey)>, Error> {
        let Some(stored) = store.get_json::<StoredCerts>(T_IDENTITY, b"certs")? else {
            return Ok(None);
        };
        let get = |k: &[u8], aad: &str| -> Result<PrivateKey, Error> {
            let sealed = store
                .get(T_IDENTITY, k)?
                .ok_or_else(|| Error::Corrupt("missing key".into()))?;
            Ok(PrivateKey::from_pkcs8(&vault.open(&sealed, aad)?)?)
        };
        let ca = Authority::from_parts(stored.ca_cert, get(b"ca_key", AAD_CA)?)?;
        let tls_key = get(b"tls_key", AAD_TLS)?;
        let signing_key = get(b"signing_key", AAD_SIGNING)?;
        let signer = TokenSigner::from_pkcs8(&signing_key.pkcs8_der())?;
        let tls_cert = stored.tls_cert;
        let tls = inspect(&tls_cert)?;
        let signing_cert = stored.signing_cert;
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

    /// This cache's own signing keys only (current and previous): the JWKS
    /// its discovery document names, for libraries configured per issuer.
    pub fn issuer_jwks_json(&self) -> Arc<String> {
        self.issuer_jwks_json
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The OpenID-style discovery document: `issuer` exactly as tokens
    /// carry it (the cache's SPIFFE id) and `jwks_uri` at the first
    /// advertised name.
    pub(crate) fn discovery_json(&self, port: u16) -> String {
        let host = match &self.cfg.advertise[..] {
            [HostName::Ip(ip), ..] => SocketAddr::new(*ip, port).to_string(),
            [name, ..] => format!("{name}:{port}"),
            [] => format!("localhost:{port}"),
        };
        serde_json::json!({
            "issuer": self.id.as_str(),
            "jwks_uri": format!("https://{host}{}", crate::api::ISSUER_JWKS_PATH),
        })
        .to_string()
    }

    pub(crate) fn rebuild_jwks(&self) {
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
        let revoked = self.replica.revocations();
        let live = |c: &&Vec<u8>| {
            inspect(c).ok().is_some_and(|i| {
                !revoked.is_serial_revoked(&i.serial_hex)
                    && i.id.is_some_and(|id| !revoked.is_cache_revoked(&id))
            })
        };
        let json = |certs: Vec<&Vec<u8>>| {
            let set = jwks_from_certs(certs.into_iter().map(Vec::as_slice), now);
            Arc::new(serde_json::to_string(&set).unwrap_or_else(|_| "{\"keys\":[]}".into()))
        };
        let all = json(own.iter().chain(cp.iter()).filter(live).collect());
        let mine = json(own.iter().filter(live).collect());
        drop(revoked);
        *self.jwks_json.write().unwrap_or_else(|p| p.into_inner()) = all;
        *self
            .issuer_jwks_json
            .write()
            .unwrap_or_else(|p| p.into_inner()) = mine;
    }

    /// Called after a batch of events is applied.
    pub(crate) fn after_events(&self) {
        self.rebuild_jwks();
        if self.own_revoked() {
            self.renew_now.notify_one();
        }
    }

    /// Whether our CA or current signing certificate is revoked (only the
    /// serial: a revocation of this cache's id is not cured by renewing).
    fn own_revoked(&self) -> bool {
        let ident = self.identity();
        let revoked = self.replica.revocations();
        revoked.is_serial_revoked(&ident.ca.info().serial_hex)
            || revoked.is_serial_revoked(&ident.signing_serial)
    }

    /// Fetches every cache's signing keys from the control plane.
    pub async fn refresh_jwks(&self) -> Result<(), Error> {
        let resp = self
            .cp()
            .jwks(pb::JwksRequest {})
            .await
            .map_err(|s| status_to_error("fetching the JWKS", s))?
            .into_inner();
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&resp.jwks_json)
            .map_err(|e| Error::ControlPlane(e.to_string()))?;
        let now = self.clock.now();
        let mut certs = Vec::new();
        for jwk in &set.keys {
            let Some(c) = jwk.common.x509_chain.as_ref().and_then(|c| c.first()) else {
                continue;
            };
            let Ok(der) = lattice_shared::serde_b64::decode(c) else {
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
    /// CA has passed half its life, or at once when the CA or signing
    /// certificate is revoked. Returns whether it renewed.
    pub async fn renew_if_due(&self) -> Result<bool, Error> {
        let ident = self.identity();
        let info = ident.ca.info();
        let revoked = self.own_revoked();
        if !revoked && !past_half_life(self.clock.now(), info.not_before, info.not_after) {
            return Ok(false);
        }
        if revoked {
            tracing::warn!(cache_id = %self.id, ca_serial = %info.serial_hex, signing_serial = %ident.signing_serial, "our CA or signing certificate is revoked; renewing now");
        }
        let (keys, csrs) = new_keys(&self.cfg.advertise)?;
        let resp = self
            .cp()
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

    /// Redeems an agent's join token at the control plane (exactly once,
    /// bound to this cache's region; only its hash leaves this process).
    /// Returns the id the token is bound to.
    pub(crate) async fn redeem_join_token(
        &self,
        token_sha256: [u8; 32],
        requested_id: &str,
    ) -> Result<SpiffeId, Error> {
        let resp = self
            .cp()
            .redeem_join_token(pb::RedeemJoinTokenRequest {
                token_sha256: token_sha256.to_vec(),
                requested_id: requested_id.to_owned(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
                | tonic::Code::InvalidArgument => Error::Redeem {
                    code: s.code(),
                    message: s.message().to_owned(),
                },
                _ => {
                    tracing::warn!(error = %s, "control plane unreachable for enrolment");
                    Error::Unavailable(
                        "the control plane is unreachable; enrolment needs it, retry later".into(),
                    )
                }
            })?
            .into_inner();
        SpiffeId::parse(&resp.agent_id)
            .map_err(|_| Error::Internal("control plane returned a malformed id"))
    }
}
