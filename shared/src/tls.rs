//! rustls configuration for every Lattice link: TLS 1.3 only, one crypto
//! provider (ring), certificates verified with the injected clock against the
//! trust bundle, peers identified by their SPIFFE id.
//!
//! Servers ask for a client certificate but do not require one at the TLS
//! layer, so that the enrolment calls can run over server-auth TLS on the same
//! port; [`crate::net::AuthGuardLayer`] refuses every other call that carries
//! no verified certificate, before any handler runs.

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use crate::clock::SharedClock;
use crate::id::{RegionId, Role, SpiffeId};
use crate::pki::{CertInfo, PrivateKey, TrustBundle, Usage};

/// Installs ring as the process-wide rustls provider. Call first thing in
/// every `main` and test harness; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn sig_algs() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// This process's own certificate chain and key, swappable on renewal.
#[derive(Debug)]
pub struct ReloadableCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl ReloadableCert {
    pub fn empty() -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(None),
        })
    }
    pub fn new(chain: Vec<Vec<u8>>, key: &PrivateKey) -> Result<Arc<Self>, rustls::Error> {
        let me = Self::empty();
        me.replace(chain, key)?;
        Ok(me)
    }
    /// `chain` is leaf first, then intermediates.
    pub fn replace(&self, chain: Vec<Vec<u8>>, key: &PrivateKey) -> Result<(), rustls::Error> {
        let pkcs8 = key.pkcs8_der();
        let signer = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
        ))?;
        let certified = CertifiedKey::new(
            chain.into_iter().map(CertificateDer::from).collect(),
            signer,
        );
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(certified));
        Ok(())
    }
    /// Stops presenting any certificate (the identity was revoked).
    pub fn clear(&self) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl rustls::server::ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl rustls::client::ResolvesClientCert for ReloadableCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

/// A further check of a verified peer certificate, such as revocation.
/// `issuer` is the intermediate that signed the leaf (`None`: the root).
pub trait PeerCheck: Send + Sync + std::fmt::Debug + 'static {
    fn check(&self, leaf: &CertInfo, issuer: Option<&CertInfo>) -> Result<(), String>;
}

/// Verifies client certificates with the injected clock, the scope rules and
/// the optional extra check.
#[derive(Debug)]
struct ClientVerifier {
    bundle: Arc<TrustBundle>,
    clock: SharedClock,
    algs: WebPkiSupportedAlgorithms,
    check: Option<Arc<dyn PeerCheck>>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let (leaf, issuer) = self
            .bundle
            .verify_path(
                end_entity,
                intermediates,
                self.clock.now(),
                Usage::TlsClient,
            )
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if let Some(check) = &self.check {
            check
                .check(&leaf, issuer.as_ref())
                .map_err(rustls::Error::General)?;
        }
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Which server a client is willing to talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedServer {
    /// Exactly this id.
    Id(SpiffeId),
    /// Any control plane of the trust domain.
    ControlPlane,
    /// Any cache of this region.
    CacheIn(RegionId),
}

impl ExpectedServer {
    fn accepts(&self, id: &SpiffeId) -> bool {
        match self {
            ExpectedServer::Id(want) => want == id,
            ExpectedServer::ControlPlane => id.role() == Role::ControlPlane,
            ExpectedServer::CacheIn(region) => {
                id.role() == Role::Cache && id.region() == Some(region)
            }
        }
    }
}

#[derive(Debug)]
struct ServerVerifier {
    bundle: Arc<TrustBundle>,
    clock: SharedClock,
    expected: ExpectedServer,
    algs: WebPkiSupportedAlgorithms,
    check: Option<Arc<dyn PeerCheck>>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // SPIFFE-style: the server is named by the id in its certificate, not
        // by a DNS name.
        let (info, issuer) = self
            .bundle
            .verify_path(
                end_entity,
                intermediates,
                self.clock.now(),
                Usage::TlsServer,
            )
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if let Some(check) = &self.check {
            check
                .check(&info, issuer.as_ref())
                .map_err(rustls::Error::General)?;
        }
        match &info.id {
            Some(id) if self.expected.accepts(id) => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "server {id} is not the expected {:?}",
                self.expected
            ))),
            None => Err(rustls::Error::General(
                "server certificate carries no id".into(),
            )),
        }
    }
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: presents `cert`, verifies client certificates when offered.
/// ALPN offers h2 (gRPC) and http/1.1 (the JWKS document).
pub fn server_config(
    bundle: Arc<TrustBundle>,
    clock: SharedClock,
    cert: Arc<ReloadableCert>,
    check: Option<Arc<dyn PeerCheck>>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let verifier = Arc::new(ClientVerifier {
        bundle,
        clock,
        algs: sig_algs(),
        check,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client side: verifies the server against `expected`; presents `cert` if any.
pub fn client_config(
    bundle: Arc<TrustBundle>,
    clock: SharedClock,
    expected: ExpectedServer,
    cert: Option<Arc<ReloadableCert>>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    client_config_checked(bundle, clock, expected, cert, None)
}

/// As [`client_config`], also applying `check` (e.g. the revocations the
/// client knows of) to the server's certificate.
pub fn client_config_checked(
    bundle: Arc<TrustBundle>,
    clock: SharedClock,
    expected: ExpectedServer,
    cert: Option<Arc<ReloadableCert>>,
    check: Option<Arc<dyn PeerCheck>>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let verifier = Arc::new(ServerVerifier {
        bundle,
        clock,
        expected,
        algs: sig_algs(),
        check,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match cert {
        Some(c) => builder.with_client_cert_resolver(c),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}
