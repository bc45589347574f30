//! Identity PKI: root CA at the control plane, one intermediate CA per cache
//! (path length 0), leaf certificates from CSRs. Certificates are made with
//! rcgen and read with x509-parser; chains are verified with rustls-webpki.
//!
//! rcgen cannot encode URI name constraints, so a cache's intermediate is not
//! constrained in the certificate. Instead every verifier runs
//! [`check_issuance_scope`]: a leaf signed by a cache's intermediate must be an
//! agent id in that cache's region and trust domain, and the root signs no
//! agent leaves at all.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{CertificateDer, UnixTime};
use zeroize::{Zeroize, Zeroizing};

use crate::id::{HostName, Role, SpiffeId, TrustDomain};

/// Certificates are dated this much before `now` so that peers whose clocks
/// lag slightly still accept them.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// Largest certificate or CSR accepted from a peer.
pub const MAX_DER_LEN: usize = 8 * 1024;
/// DNS and IP names one server certificate may carry.
pub const MAX_HOST_NAMES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate request is malformed or its signature is invalid")]
    BadCsr,
    #[error(
        "certificate request uses an unsupported key or signature algorithm (supported: {SUPPORTED_CSR_ALGORITHMS})"
    )]
    UnsupportedKey,
    #[error("certificate or request is larger than {MAX_DER_LEN} bytes")]
    TooLarge,
    #[error("certificate is malformed: {0}")]
    BadCert(String),
    #[error("certificate carries no valid SPIFFE id: {0}")]
    NoIdentity(String),
    #[error("certificate chain does not verify: {0}")]
    Untrusted(String),
    #[error("certificate issuance scope violated: {0}")]
    Scope(String),
    #[error("certificate request names a host badly: {0}")]
    BadName(String),
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        PkiError::Generate(e.to_string())
    }
}

/// A private key that is zeroized on drop. Its `Debug` shows nothing secret.
pub struct PrivateKey(KeyPair);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey({:?}, <redacted>)", self.0.algorithm())
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PrivateKey {
    /// ECDSA P-256: CA, TLS and agent keys.
    pub fn generate_p256() -> Result<Self, PkiError> {
        Ok(Self(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?))
    }
    /// Ed25519: JWT signing keys.
    pub fn generate_ed25519() -> Result<Self, PkiError> {
        Ok(Self(KeyPair::generate_for(&rcgen::PKCS_ED25519)?))
    }
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, PkiError> {
        Ok(Self(KeyPair::try_from(der)?))
    }
    pub fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.0.serialize_der())
    }
    /// The raw public key (for Ed25519, the 32 bytes a JWK's `x` carries).
    pub fn public_key_raw(&self) -> &[u8] {
        self.0.public_key_raw()
    }
    /// A PKCS#10 request proving possession of this key. The subject is a
    /// hint only: issuers take the identity from the attested enrolment.
    pub fn csr_der(&self) -> Result<Vec<u8>, PkiError> {
        self.csr_der_naming(&[])
    }
    /// A request that also asks for DNS and IP names (a server's TLS key);
    /// the issuer checks them ([`requested_host_names`]).
    pub fn csr_der_naming(&self, names: &[HostName]) -> Result<Vec<u8>, PkiError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = san_names(names)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "lattice csr");
        Ok(params.serialize_request(&self.0)?.der().to_vec())
    }
}

/// The (key, signature) pairs a certificate request may use: every pair that
/// rcgen can label in a certificate and webpki (ring) can verify.
pub const SUPPORTED_CSR_ALGORITHMS: &str = "ECDSA P-256 or P-384 keys signed with SHA-256 or SHA-384; \
     Ed25519; RSA keys of 2048 to 8192 bits signed with PKCS#1 v1.5 or PSS and SHA-256, SHA-384 or SHA-512";

/// Checks a certificate request (size, signature, key type) without issuing:
/// callers check before consuming anything, such as a one-time join token.
pub fn check_csr(csr_der: &[u8]) -> Result<(), PkiError> {
    parse_csr(csr_der).map(|_| ())
}

/// Parses a request, verifying its signature (proof of possession), and
/// returns the requested key. The key type comes from the request's
/// SubjectPublicKeyInfo, never from its signature algorithm (rcgen's own
/// CSR parser takes it from the signature, so a P-384 key signed with
/// SHA-256 would be labelled P-256); the pair must be one of
/// [`SUPPORTED_CSR_ALGORITHMS`].
fn parse_csr(csr_der: &[u8]) -> Result<rcgen::SubjectPublicKeyInfo, PkiError> {
    use x509_parser::oid_registry as oid;
    use x509_parser::prelude::FromDer as _;
    if csr_der.len() > MAX_DER_LEN {
        return Err(PkiError::TooLarge);
    }
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
            .map_err(|_| PkiError::BadCsr)?;
    if !rest.is_empty() {
        return Err(PkiError::BadCsr);
    }
    let key = rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|_| PkiError::UnsupportedKey)?;
    let sig = &csr.signature_algorithm.algorithm;
    let alg = rcgen::PublicKeyData::algorithm(&key);
    let supported =
        if alg == &rcgen::PKCS_ECDSA_P256_SHA256 || alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
            [
                oid::OID_SIG_ECDSA_WITH_SHA256,
                oid::OID_SIG_ECDSA_WITH_SHA384,
            ]
            .contains(sig)
        } else if alg == &rcgen::PKCS_ED25519 {
            *sig == oid::OID_SIG_ED25519
        } else if alg == &rcgen::PKCS_RSA_SHA256 {
            // An rsaEncryption key. PSS parameters naming SHA-1 fail the
            // signature check below as unsupported; ring refuses moduli outside
            // 2048..=8192 bits.
            [
                oid::OID_PKCS1_SHA256WITHRSA,
                oid::OID_PKCS1_SHA384WITHRSA,
                oid::OID_PKCS1_SHA512WITHRSA,
                oid::OID_PKCS1_RSASSAPSS,
            ]
            .contains(sig)
        } else {
            false
        };
    if !supported {
        return Err(PkiError::UnsupportedKey);
    }
    csr.verify_signature().map_err(|e| match e {
        x509_parser::error::X509Error::SignatureUnsupportedAlgorithm => PkiError::UnsupportedKey,
        _ => PkiError::BadCsr,
    })?;
    Ok(key)
}

fn san_names(names: &[HostName]) -> Result<Vec<SanType>, PkiError> {
    names
        .iter()
        .map(|n| match n {
            HostName::Dns(d) => Ok(SanType::DnsName(
                d.as_str()
                    .try_into()
                    .map_err(|_| PkiError::BadName(d.clone()))?,
            )),
            HostName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
        })
        .collect()
}

/// The DNS and IP names a request asks for, each checked ([`HostName`]: no
/// wildcard), at most [`MAX_HOST_NAMES`]. URI names are ignored (the id
/// comes from the enrolment, never from the request); any other kind of
/// name is refused.
pub fn requested_host_names(csr_der: &[u8]) -> Result<Vec<HostName>, PkiError> {
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::prelude::FromDer as _;
    parse_csr(csr_der)?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
        .map_err(|_| PkiError::BadCsr)?;
    let mut names = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for n in &san.general_names {
                if let Some(name) = host_name(n)? {
                    names.push(name);
                }
            }
        }
    }
    names.sort();
    names.dedup();
    if names.len() > MAX_HOST_NAMES {
        return Err(PkiError::BadName(format!(
            "{} names, at most {MAX_HOST_NAMES}",
            names.len()
        )));
    }
    Ok(names)
}

fn host_name(n: &x509_parser::extensions::GeneralName<'_>) -> Result<Option<HostName>, PkiError> {
    use x509_parser::extensions::GeneralName;
    let bad = |what: String| PkiError::BadName(what);
    Ok(match n {
        GeneralName::URI(_) => None,
        GeneralName::DNSName(d) => Some(HostName::parse(d).map_err(|e| bad(e.to_string()))?),
        GeneralName::IPAddress(b) => Some(HostName::Ip(
            match b.len() {
                4 => <[u8; 4]>::try_from(*b).map(std::net::IpAddr::from),
                _ => <[u8; 16]>::try_from(*b).map(std::net::IpAddr::from),
            }
            .map_err(|_| bad("an IP address of neither 4 nor 16 bytes".into()))?,
        )),
        other => return Err(bad(format!("{other}: only DNS names and IP addresses"))),
    })
}

/// The DNS and IP names a certificate carries (what standard TLS clients
/// match the host they dialled against).
pub fn host_names(cert_der: &[u8]) -> Result<Vec<HostName>, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::BadCert(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCert(e.to_string()))?;
    let mut names = Vec::new();
    for n in san.iter().flat_map(|s| &s.value.general_names) {
        if let Ok(Some(name)) = host_name(n) {
            names.push(name);
        }
    }
    Ok(names)
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// A cache's CA: signs its region's agent leaves; path length 0.
    IntermediateCa,
    /// A TLS server that is also a client (cache, control plane).
    TlsServerClient,
    /// A TLS client only (agent, admin).
    TlsClient,
    /// A JWT signing key: digital signature only, no TLS use.
    JwtSigning,
}

/// What we need to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub id: Option<SpiffeId>,
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    /// SHA-256 of the DER encoding (the RFC 8705 `x5t#S256` thumbprint).
    pub sha256: [u8; 32],
    /// Explicit extended key usages.
    pub eku_client_auth: bool,
    pub eku_server_auth: bool,
    /// The subject's organizational unit: admin certificates carry their
    /// roles and regions there (see `policy::AdminAttributes`).
    pub org_unit: Option<String>,
}

impl CertInfo {
    pub fn thumbprint_b64(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.sha256)
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Reads a certificate: validity, serial, CA flag and the SPIFFE id in its URI
/// SAN (at most one URI SAN is allowed).
pub fn inspect(der: &[u8]) -> Result<CertInfo, PkiError> {
    if der.len() > MAX_DER_LEN {
        return Err(PkiError::TooLarge);
    }
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::BadCert(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCert("trailing data".into()));
    }
    let mut uris = Vec::new();
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCert(e.to_string()))?
    {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                uris.push(*u);
            }
        }
    }
    let id = match uris.as_slice() {
        [] => None,
        [one] => Some(SpiffeId::parse(one).map_err(|e| PkiError::NoIdentity(e.to_string()))?),
        _ => return Err(PkiError::NoIdentity("more than one URI name".into())),
    };
    let validity = cert.validity();
    let eku = cert
        .extended_key_usage()
        .map_err(|e| PkiError::BadCert(e.to_string()))?;
    Ok(CertInfo {
        eku_client_auth: eku.as_ref().is_some_and(|e| e.value.client_auth),
        eku_server_auth: eku.as_ref().is_some_and(|e| e.value.server_auth),
        id,
        serial_hex: hex::encode(cert.tbs_certificate.raw_serial()),
        not_before: crate::clock::from_unix_secs(validity.not_before.timestamp()),
        not_after: crate::clock::from_unix_secs(validity.not_after.timestamp()),
        is_ca: cert.is_ca(),
        sha256: sha256(der),
        org_unit: cert
            .subject()
            .iter_organizational_unit()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_owned),
    })
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Generate("rng".into()))?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte to strip
    Ok(SerialNumber::from_slice(&bytes))
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(crate::clock::unix_secs(t))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn common_name(id: &SpiffeId) -> String {
    let mut cn = format!("lattice {} {}", id.role(), id.name());
    cn.truncate(64);
    cn
}

/// A certificate authority: the root at the control plane or a cache's
/// intermediate.
pub struct Authority {
    cert: CertificateDer<'static>,
    info: CertInfo,
    issuer: Issuer<'static, PrivateKey>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl rcgen::PublicKeyData for PrivateKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        rcgen::PublicKeyData::algorithm(&self.0)
    }
}

impl rcgen::SigningKey for PrivateKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg)
    }
}

impl Authority {
    /// A new self-signed root for `td`.
    pub fn new_root(
        td: &TrustDomain,
        key: PrivateKey,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, td.as_str());
        params
            .distinguished_name
            .push(DnType::CommonName, "lattice root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = to_offset(now - BACKDATE);
        params.not_after = to_offset(now + ttl);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        Self::from_parts(cert.der().to_vec(), key)
    }

    /// An authority from its certificate and key (e.g. unsealed from disk).
    pub fn from_parts(cert_der: Vec<u8>, key: PrivateKey) -> Result<Self, PkiError> {
        let info = inspect(&cert_der)?;
        if !info.is_ca {
            return Err(PkiError::BadCert("not a CA certificate".into()));
        }
        let cert = CertificateDer::from(cert_der);
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(Self { cert, info, issuer })
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert
    }
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Issues a certificate without the issuer's scope check, to test that
    /// verifiers catch what a compromised or buggy issuer could sign.
    #[cfg(feature = "dangerous-test-util")]
    pub fn dangerous_issue_unchecked(
        &self,
        public_key: &PrivateKey,
        id: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Vec<u8>, PkiError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|_| PkiError::NoIdentity(id.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = to_offset(now - BACKDATE);
        params.not_after = to_offset(now + ttl);
        params.serial_number = Some(random_serial()?);
        Ok(params.signed_by(public_key, &self.issuer)?.der().to_vec())
    }

    /// Issues a certificate for the key in `csr_der` (whose signature proves
    /// possession) with identity `id`. Nothing else is taken from the request.
    /// The certificate never outlives this authority.
    pub fn issue(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        profile: Profile,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Vec<u8>, PkiError> {
        self.issue_named(csr_der, id, profile, (now, ttl), None, &[])
    }

    /// A TLS server (and client) certificate that also carries `names` as
    /// DNS and IP SANs, for standard clients that check the host name.
    pub fn issue_server(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        names: &[HostName],
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Vec<u8>, PkiError> {
        self.issue_named(
            csr_der,
            id,
            Profile::TlsServerClient,
            (now, ttl),
            None,
            names,
        )
    }

    /// As [`Authority::issue`], with an organizational unit in the subject
    /// (admin roles).
    pub fn issue_with_org_unit(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        profile: Profile,
        now: SystemTime,
        ttl: Duration,
        org_unit: Option<&str>,
    ) -> Result<Vec<u8>, PkiError> {
        self.issue_named(csr_der, id, profile, (now, ttl), org_unit, &[])
    }

    /// `validity`: from when, for how long.
    fn issue_named(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        profile: Profile,
        (now, ttl): (SystemTime, Duration),
        org_unit: Option<&str>,
        names: &[HostName],
    ) -> Result<Vec<u8>, PkiError> {
        let key = parse_csr(csr_der)?;
        if names.len() > MAX_HOST_NAMES
            || (!names.is_empty() && profile != Profile::TlsServerClient)
        {
            return Err(PkiError::BadName(
                "too many names, or names on a certificate that is no TLS server's".into(),
            ));
        }
        // The issuer's own scope rule, applied before signing as well as at
        // every verifier.
        let issuer_scope = if self.info.id.is_some() {
            Some(&self.info)
        } else {
            None
        };
        check_issuance_scope(id, issuer_scope)?;

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, id.trust_domain().as_str());
        params
            .distinguished_name
            .push(DnType::CommonName, common_name(id));
        if let Some(ou) = org_unit {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, ou);
        }
        params.not_before = to_offset(now - BACKDATE);
        params.not_after = to_offset((now + ttl).min(self.info.not_after));
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        params.subject_alt_names = vec![SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|_| PkiError::NoIdentity(id.to_string()))?,
        )];
        params.subject_alt_names.extend(san_names(names)?);
        match profile {
            Profile::IntermediateCa => {
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
            }
            Profile::TlsServerClient | Profile::TlsClient | Profile::JwtSigning => {
                params.is_ca = IsCa::ExplicitNoCa;
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                params.extended_key_usages = match profile {
                    Profile::TlsServerClient => vec![
                        ExtendedKeyUsagePurpose::ServerAuth,
                        ExtendedKeyUsagePurpose::ClientAuth,
                    ],
                    Profile::TlsClient => vec![ExtendedKeyUsagePurpose::ClientAuth],
                    // No TLS EKU: our TLS verifiers demand one explicitly, so a
                    // JWT signing key can never authenticate a TLS peer.
                    _ => vec![],
                };
            }
        }
        Ok(params.signed_by(&key, &self.issuer)?.der().to_vec())
    }
}

/// The scope rule every verifier applies: `issuer` is the CA that signed the
/// leaf (`None`: the root).
pub fn check_issuance_scope(leaf_id: &SpiffeId, issuer: Option<&CertInfo>) -> Result<(), PkiError> {
    match issuer {
        None => {
            if leaf_id.role() == Role::Agent {
                return Err(PkiError::Scope(format!(
                    "{leaf_id}: agent certificates must be issued by a cache of their region"
                )));
            }
            Ok(())
        }
        Some(ca) => {
            let ca_id = ca
                .id
                .as_ref()
                .ok_or_else(|| PkiError::Scope("intermediate CA carries no cache id".into()))?;
            if ca_id.role() != Role::Cache {
                return Err(PkiError::Scope(format!("{ca_id} is not a cache")));
            }
            if leaf_id.role() != Role::Agent {
                return Err(PkiError::Scope(format!(
                    "{leaf_id}: a cache CA may only certify agents"
                )));
            }
            if leaf_id.trust_domain() != ca_id.trust_domain() || leaf_id.region() != ca_id.region()
            {
                return Err(PkiError::Scope(format!(
                    "{leaf_id} lies outside the region of its issuer {ca_id}"
                )));
            }
            Ok(())
        }
    }
}

/// EKU OIDs (DER content) demanded explicitly by TLS verifiers.
const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// What the verified leaf will be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    TlsClient,
    TlsServer,
    /// A JWT signing key certificate in a JWKS `x5c`.
    JwtSigning,
}

static SIG_ALGS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] =
    &[webpki::ring::ECDSA_P256_SHA256, webpki::ring::ED25519];

/// The trust bundle: the root CA of one trust domain.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    td: TrustDomain,
    root_der: CertificateDer<'static>,
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
}

impl TrustBundle {
    pub fn new(td: TrustDomain, root_der: Vec<u8>) -> Result<Self, PkiError> {
        let root_der = CertificateDer::from(root_der);
        let anchor = webpki::anchor_from_trusted_cert(&root_der)
            .map_err(|e| PkiError::BadCert(format!("root: {e}")))?
            .to_owned();
        Ok(Self {
            td,
            root_der,
            anchors: vec![anchor],
        })
    }
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }
    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    /// Verifies `leaf` (with optional intermediates) to the root at time `now`
    /// with rustls-webpki, then applies the SPIFFE id and scope rules. Returns
    /// the leaf's details; its `id` is always `Some`.
    pub fn verify(
        &self,
        leaf: &[u8],
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
        usage: Usage,
    ) -> Result<CertInfo, PkiError> {
        self.verify_path(leaf, intermediates, now, usage)
            .map(|(leaf, _)| leaf)
    }

    /// As [`Self::verify`], also returning the intermediate that issued the
    /// leaf (`None`: the root did).
    pub fn verify_path(
        &self,
        leaf: &[u8],
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
        usage: Usage,
    ) -> Result<(CertInfo, Option<CertInfo>), PkiError> {
        if leaf.len() > MAX_DER_LEN || intermediates.len() > 1 {
            return Err(PkiError::Untrusted("chain too long or too large".into()));
        }
        let leaf_der = CertificateDer::from(leaf);
        let ee = webpki::EndEntityCert::try_from(&leaf_der)
            .map_err(|e| PkiError::BadCert(e.to_string()))?;
        // webpki applies the EKU rule to every certificate of the path (our CAs
        // carry none), so the leaf's explicit TLS EKU is demanded below.
        let eku = match usage {
            Usage::TlsClient | Usage::JwtSigning => {
                webpki::KeyUsage::required_if_present(EKU_CLIENT_AUTH)
            }
            Usage::TlsServer => webpki::KeyUsage::required_if_present(EKU_SERVER_AUTH),
        };
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| PkiError::Untrusted("clock before 1970".into()))?;
        let path = ee
            .verify_for_usage(
                SIG_ALGS,
                &self.anchors,
                intermediates,
                UnixTime::since_unix_epoch(secs),
                eku,
                None,
                None,
            )
            .map_err(|e| PkiError::Untrusted(e.to_string()))?;
        let info = inspect(leaf)?;
        let id = info
            .id
            .as_ref()
            .ok_or_else(|| PkiError::NoIdentity("no URI name".into()))?;
        if id.trust_domain() != &self.td {
            return Err(PkiError::Scope(format!(
                "{id} is not in trust domain {}",
                self.td
            )));
        }
        let eku_ok = match usage {
            Usage::TlsClient => info.eku_client_auth,
            Usage::TlsServer => info.eku_server_auth,
            Usage::JwtSigning => !info.eku_client_auth && !info.eku_server_auth,
        };
        if !eku_ok {
            return Err(PkiError::Untrusted(format!(
                "certificate is not meant for {usage:?}"
            )));
        }
        if usage == Usage::JwtSigning && id.role() != Role::Cache {
            return Err(PkiError::Scope(format!("{id}: only caches sign tokens")));
        }
        let issuer = match path.intermediate_certificates().next() {
            Some(ca) => Some(inspect(&ca.der())?),
            None => None,
        };
        check_issuance_scope(id, issuer.as_ref())?;
        Ok((info, issuer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("lattice.local").expect("valid")
    }
    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("valid id")
    }

    struct Pki {
        root: Authority,
        cache_ca: Authority,
        bundle: TrustBundle,
        now: SystemTime,
    }

    fn pki() -> Pki {
        let now = SystemTime::now();
        let root = Authority::new_root(
            &td(),
            PrivateKey::generate_p256().expect("key"),
            now,
            Duration::from_secs(86400 * 365),
        )
        .expect("root");
        let ca_key = PrivateKey::generate_p256().expect("key");
        let ca_cert = root
            .issue(
                &ca_key.csr_der().expect("csr"),
                &id("spiffe://lattice.local/cache/eu/c1"),
                Profile::IntermediateCa,
                now,
                Duration::from_secs(86400),
            )
            .expect("intermediate");
        let cache_ca = Authority::from_parts(ca_cert, ca_key).expect("authority");
        let bundle = TrustBundle::new(td(), root.cert_der().to_vec()).expect("bundle");
        Pki {
            root,
            cache_ca,
            bundle,
            now,
        }
    }

    fn agent_leaf(p: &Pki, agent: &str) -> Result<Vec<u8>, PkiError> {
        let key = PrivateKey::generate_p256()?;
        p.cache_ca.issue(
            &key.csr_der()?,
            &id(agent),
            Profile::TlsClient,
            p.now,
            Duration::from_secs(3600),
        )
    }

    fn chain(p: &Pki) -> [CertificateDer<'static>; 1] {
        [CertificateDer::from(p.cache_ca.cert_der().to_vec())]
    }

    #[test]
    fn agent_chain_verifies_with_webpki() {
        let p = pki();
        let leaf = agent_leaf(&p, "spiffe://lattice.local/agent/eu/bot").expect("leaf");
        let info = p
            .bundle
            .verify(&leaf, &chain(&p), p.now, Usage::TlsClient)
            .expect("verifies");
        assert_eq!(info.id, Some(id("spiffe://lattice.local/agent/eu/bot")));
        assert!(!info.is_ca);
        let ca = inspect(p.cache_ca.cert_der()).expect("ca");
        assert!(ca.is_ca);
        // Not valid as a server certificate: agents have the client EKU only.
        assert!(
            p.bundle
                .verify(&leaf, &chain(&p), p.now, Usage::TlsServer)
                .is_err()
        );
    }

    #[test]
    fn expired_leaf_is_rejected() {
        let p = pki();
        let leaf = agent_leaf(&p, "spiffe://lattice.local/agent/eu/bot").expect("leaf");
        let later = p.now + Duration::from_secs(3601);
        let err = p
            .bundle
            .verify(&leaf, &chain(&p), later, Usage::TlsClient)
            .expect_err("expired");
        assert!(err.to_string().contains("Expired"), "{err}");
    }

    #[test]
    fn issuer_refuses_other_region_and_verifier_rejects_forged_leaf() {
        let p = pki();
        // The issuing code refuses outright.
        let err = agent_leaf(&p, "spiffe://lattice.local/agent/us/bot").expect_err("refused");
        assert!(matches!(err, PkiError::Scope(_)), "{err}");

        // A leaf forged with the cache's CA key (bypassing `issue`) is rejected
        // by the verifier's scope check although its signature is valid.
        let key = PrivateKey::generate_p256().expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://lattice.local/agent/us/bot"
                .try_into()
                .expect("uri"),
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = to_offset(p.now - BACKDATE);
        params.not_after = to_offset(p.now + Duration::from_secs(600));
        let forged = params.signed_by(&key, &p.cache_ca.issuer).expect("forge");
        let err = p
            .bundle
            .verify(forged.der(), &chain(&p), p.now, Usage::TlsClient)
            .expect_err("rejected");
        assert!(matches!(err, PkiError::Scope(_)), "{err}");
    }

    #[test]
    fn root_never_signs_agents_and_cache_ca_signs_only_agents() {
        let p = pki();
        let key = PrivateKey::generate_p256().expect("key");
        let csr = key.csr_der().expect("csr");
        assert!(matches!(
            p.root.issue(
                &csr,
                &id("spiffe://lattice.local/agent/eu/x"),
                Profile::TlsClient,
                p.now,
                Duration::from_secs(60)
            ),
            Err(PkiError::Scope(_))
        ));
        assert!(matches!(
            p.cache_ca.issue(
                &csr,
                &id("spiffe://lattice.local/cache/eu/c2"),
                Profile::TlsServerClient,
                p.now,
                Duration::from_secs(60)
            ),
            Err(PkiError::Scope(_))
        ));
    }

    #[test]
    fn foreign_root_is_untrusted() {
        let p = pki();
        let other = pki();
        let leaf = agent_leaf(&other, "spiffe://lattice.local/agent/eu/bot").expect("leaf");
        let err = p
            .bundle
            .verify(&leaf, &chain(&other), p.now, Usage::TlsClient)
            .expect_err("foreign");
        assert!(matches!(err, PkiError::Untrusted(_)), "{err}");
    }

    #[test]
    fn jwt_signing_cert_cannot_authenticate_tls() {
        let p = pki();
        let key = PrivateKey::generate_ed25519().expect("key");
        let cert = p
            .root
            .issue(
                &key.csr_der().expect("csr"),
                &id("spiffe://lattice.local/cache/eu/c1"),
                Profile::JwtSigning,
                p.now,
                Duration::from_secs(600),
            )
            .expect("signing cert");
        p.bundle
            .verify(&cert, &[], p.now, Usage::JwtSigning)
            .expect("valid for JWT signing");
        assert!(
            p.bundle
                .verify(&cert, &[], p.now, Usage::TlsClient)
                .is_err()
        );
        assert!(
            p.bundle
                .verify(&cert, &[], p.now, Usage::TlsServer)
                .is_err()
        );
    }

    #[test]
    fn issued_cert_never_outlives_its_issuer() {
        let p = pki();
        let key = PrivateKey::generate_p256().expect("key");
        let cert = p
            .cache_ca
            .issue(
                &key.csr_der().expect("csr"),
                &id("spiffe://lattice.local/agent/eu/a"),
                Profile::TlsClient,
                p.now,
                Duration::from_secs(86400 * 30),
            )
            .expect("leaf");
        assert!(inspect(&cert).expect("info").not_after <= p.cache_ca.info().not_after);
    }

    #[test]
    fn bad_csr_is_rejected() {
        let p = pki();
        let key = PrivateKey::generate_p256().expect("key");
        let mut csr = key.csr_der().expect("csr");
        let n = csr.len();
        csr[n - 5] ^= 0x55; // breaks the signature
        assert!(matches!(
            p.cache_ca.issue(
                &csr,
                &id("spiffe://lattice.local/agent/eu/a"),
                Profile::TlsClient,
                p.now,
                Duration::from_secs(60)
            ),
            Err(PkiError::BadCsr)
        ));
        assert!(matches!(
            p.cache_ca.issue(
                &[0u8; 10_000],
                &id("spiffe://lattice.local/agent/eu/a"),
                Profile::TlsClient,
                p.now,
                Duration::from_secs(60)
            ),
            Err(PkiError::TooLarge)
        ));
    }

    #[test]
    fn server_certificates_carry_the_names_asked_for_within_limits() {
        let p = pki();
        let key = PrivateKey::generate_p256().expect("key");
        let names: Vec<HostName> = ["cache-eu.example.net", "10.1.2.3"]
            .map(|n| HostName::parse(n).expect("name"))
            .to_vec();
        let csr = key.csr_der_naming(&names).expect("csr");
        assert_eq!(requested_host_names(&csr).expect("names"), names);
        let cache = id("spiffe://lattice.local/cache/eu/c1");
        let hour = Duration::from_secs(3600);
        let cert = p
            .root
            .issue_server(&csr, &cache, &names, p.now, hour)
            .expect("cert");
        assert_eq!(host_names(&cert).expect("names"), names);
        let info = p
            .bundle
            .verify(&cert, &[], p.now, Usage::TlsServer)
            .expect("still a lattice server certificate");
        assert_eq!(info.id, Some(cache.clone()));
        // A standard client's host-name check passes for each name.
        let der = CertificateDer::from(cert.as_slice());
        let ee = webpki::EndEntityCert::try_from(&der).expect("cert");
        for n in ["cache-eu.example.net", "10.1.2.3"] {
            let sn = rustls_pki_types::ServerName::try_from(n).expect("name");
            ee.verify_is_valid_for_subject_name(&sn).expect(n);
        }
        // Requests naming a wildcard, a malformed name, an e-mail address or
        // too many names are refused as requests.
        let ask = |sans: Vec<SanType>| {
            let mut params = CertificateParams::default();
            params.subject_alt_names = sans;
            let csr = params
                .serialize_request(&key.0)
                .expect("csr")
                .der()
                .to_vec();
            requested_host_names(&csr)
        };
        let dns = |n: &str| SanType::DnsName(n.try_into().expect("ia5"));
        for bad in [
            vec![dns("*.example.net")],
            vec![dns("Bad_Name.example.net")],
            vec![SanType::Rfc822Name(
                "a@example.net".try_into().expect("ia5"),
            )],
            (0..=MAX_HOST_NAMES)
                .map(|i| dns(&format!("h{i}.example.net")))
                .collect(),
        ] {
            let e = ask(bad).expect_err("refused");
            assert!(matches!(e, PkiError::BadName(_)), "{e}");
        }
    }

    /// A key made by `genpkey_args` and a CSR signed with `req_args`, by the
    /// openssl CLI: ring signs P-384 only with SHA-384 and P-256 only with
    /// SHA-256, so the mixed pairs need another signer. `None` (the test
    /// skips) when openssl is absent.
    fn openssl_csr(dir: &std::path::Path, genpkey: &[&str], req: &[&str]) -> Option<Vec<u8>> {
        use std::process::Command;
        if Command::new("openssl").arg("version").output().is_err() {
            eprintln!("openssl is not installed: skipping the CSRs it builds");
            return None;
        }
        let key = dir.join("k.der");
        let csr = dir.join("c.der");
        let run = |args: Vec<&str>| {
            let out = Command::new("openssl")
                .args(&args)
                .output()
                .expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        let (k, c) = (key.to_str().expect("path"), csr.to_str().expect("path"));
        run([&["genpkey"], genpkey, &["-outform", "DER", "-out", k]].concat());
        run([
            &[
                "req", "-new", "-key", k, "-keyform", "DER", "-subj", "/CN=x",
            ],
            req,
            &["-outform", "DER", "-out", c],
        ]
        .concat());
        Some(std::fs::read(&csr).expect("csr"))
    }

    #[test]
    fn the_key_type_comes_from_the_public_key_not_the_signature() {
        use x509_parser::prelude::FromDer as _;
        let p = pki();
        let dir = tempfile::tempdir().expect("dir");
        let ec = |curve: &'static str| -> Vec<&'static str> {
            vec!["-algorithm", "EC", "-pkeyopt", curve]
        };
        let p256 = ec("ec_paramgen_curve:P-256");
        let p384 = ec("ec_paramgen_curve:P-384");
        let rsa = vec!["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
        let ed = vec!["-algorithm", "ED25519"];
        let pss = |h: &'static str| {
            vec![
                h,
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:digest",
            ]
        };
        let accepted: Vec<(&str, &Vec<&str>, Vec<&str>)> = vec![
            ("P-256/SHA-256", &p256, vec!["-sha256"]),
            ("P-256/SHA-384", &p256, vec!["-sha384"]),
            ("P-384/SHA-256", &p384, vec!["-sha256"]),
            ("P-384/SHA-384", &p384, vec!["-sha384"]),
            ("Ed25519", &ed, vec![]),
            ("RSA/SHA-256", &rsa, vec!["-sha256"]),
            ("RSA/SHA-384", &rsa, vec!["-sha384"]),
            ("RSA/SHA-512", &rsa, vec!["-sha512"]),
            ("RSA-PSS/SHA-256", &rsa, pss("-sha256")),
            ("RSA-PSS/SHA-512", &rsa, pss("-sha512")),
        ];
        for (what, genpkey, req) in accepted {
            let Some(csr) = openssl_csr(dir.path(), genpkey, &req) else {
                return;
            };
            check_csr(&csr).unwrap_or_else(|e| panic!("{what}: {e}"));
            let cert = p
                .cache_ca
                .issue(
                    &csr,
                    &id("spiffe://lattice.local/agent/eu/a"),
                    Profile::TlsClient,
                    p.now,
                    Duration::from_secs(600),
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let (_, req) =
                x509_parser::certification_request::X509CertificationRequest::from_der(&csr)
                    .expect("csr");
            let (_, cert) = x509_parser::parse_x509_certificate(&cert).expect("cert");
            assert_eq!(
                cert.public_key().raw,
                req.certification_request_info.subject_pki.raw,
                "{what}: the certificate carries the request's key, labelled as it was"
            );
        }
        let p521 = ec("ec_paramgen_curve:P-521");
        let k256 = ec("ec_paramgen_curve:secp256k1");
        let refused: Vec<(&str, &Vec<&str>, Vec<&str>)> = vec![
            ("P-256/SHA-512", &p256, vec!["-sha512"]),
            ("P-384/SHA-1", &p384, vec!["-sha1"]),
            ("P-521/SHA-512", &p521, vec!["-sha512"]),
            ("secp256k1/SHA-256", &k256, vec!["-sha256"]),
            ("RSA/SHA-1", &rsa, vec!["-sha1"]),
        ];
        for (what, genpkey, req) in refused {
            let Some(csr) = openssl_csr(dir.path(), genpkey, &req) else {
                return;
            };
            let e = check_csr(&csr).expect_err(what);
            assert!(matches!(e, PkiError::UnsupportedKey), "{what}: {e}");
            assert!(
                e.to_string().contains("P-384"),
                "{what}: names what is supported: {e}"
            );
        }
    }
}
