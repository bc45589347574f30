//! Signed policy releases. The control plane signs each release (a version
//! of a bundle, or a rollback to one) with a dedicated Ed25519 key whose
//! certificate the root issued to the control plane's own id; caches verify
//! the chain and the signature before they enforce a release, and refuse
//! anything else, keeping the release they had.

use prost::Message;
use x509_parser::prelude::FromDer;

use super::{BundleFiles, PolicyError};
use crate::id::{Role, TrustDomain};
use crate::pki::{CertInfo, PrivateKey, inspect};
use crate::proto as pb;

/// Domain separation: these bytes are never a certificate or a token.
const SIGNING_CONTEXT: &[u8] = b"lattice policy release v1\0";

fn message(release_bytes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + release_bytes.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(release_bytes);
    m
}

/// The control plane's policy signing key and its certificate.
pub struct PolicySigner {
    key: PrivateKey,
    cert_der: Vec<u8>,
}

impl std::fmt::Debug for PolicySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySigner").finish_non_exhaustive()
    }
}

impl PolicySigner {
    pub fn new(key: PrivateKey, cert_der: Vec<u8>) -> Self {
        Self { key, cert_der }
    }
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Signs `bytes` under another domain-separation `context` (e.g. the
    /// audit log's tree heads): the same certified key, never confusable
    /// with a release.
    pub fn sign_detached(&self, context: &[u8], bytes: &[u8]) -> Result<Vec<u8>, PolicyError> {
        let mut m = Vec::with_capacity(context.len() + bytes.len());
        m.extend_from_slice(context);
        m.extend_from_slice(bytes);
        rcgen::SigningKey::sign(&self.key, &m).map_err(|e| PolicyError::Signature(e.to_string()))
    }

    pub fn sign(&self, release: &pb::PolicyRelease) -> Result<pb::SignedPolicy, PolicyError> {
        let bytes = release.encode_to_vec();
        let signature = rcgen::SigningKey::sign(&self.key, &message(&bytes))
            .map_err(|e| PolicyError::Signature(e.to_string()))?;
        Ok(pb::SignedPolicy {
            release: bytes,
            signature,
            signer_cert: self.cert_der.clone(),
        })
    }
}

/// A release whose signature and signer have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedRelease {
    pub release: pb::PolicyRelease,
    pub files: BundleFiles,
    pub signer: CertInfo,
}

/// Checks that `signed` was signed by the control plane of `td` under the
/// root `root_der`, at a time its certificate was valid, and that the files
/// are the ones the release names.
pub fn verify(
    signed: &pb::SignedPolicy,
    root_der: &[u8],
    td: &TrustDomain,
) -> Result<VerifiedRelease, PolicyError> {
    let bad = |m: &str| PolicyError::Signature(m.to_string());
    let signer = check_signature(
        SIGNING_CONTEXT,
        &signed.release,
        &signed.signature,
        &signed.signer_cert,
        root_der,
        td,
    )?;
    let release = pb::PolicyRelease::decode(signed.release.as_slice())
        .map_err(|e| bad(&format!("release: {e}")))?;
    let at = crate::clock::from_unix_secs(release.released_at_unix_ms.div_euclid(1000));
    if at < signer.not_before || at > signer.not_after {
        return Err(bad(
            "released outside the validity of the signer certificate",
        ));
    }
    let files = BundleFiles::from_proto(
        release
            .bundle
            .as_ref()
            .ok_or_else(|| bad("the release carries no bundle"))?,
    )?;
    if files.sha256().as_slice() != release.bundle_sha256.as_slice() {
        return Err(bad("the bundle does not match its digest"));
    }
    Ok(VerifiedRelease {
        release,
        files,
        signer,
    })
}

/// Checks `signature` over `context || bytes` by the control plane's
/// signing certificate `signer_cert`, issued by the root `root_der` to the
/// control plane of `td`. Returns the signer (the caller checks dates).
pub fn check_signature(
    context: &[u8],
    bytes: &[u8],
    signature: &[u8],
    signer_cert: &[u8],
    root_der: &[u8],
    td: &TrustDomain,
) -> Result<CertInfo, PolicyError> {
    let bad = |m: &str| PolicyError::Signature(m.to_string());
    let signer = inspect(signer_cert).map_err(|e| bad(&format!("signer: {e}")))?;
    match &signer.id {
        Some(id) if id.role() == Role::ControlPlane && id.trust_domain() == td => {}
        _ => return Err(bad("the signer is not this trust domain's control plane")),
    }
    if signer.is_ca || signer.eku_client_auth || signer.eku_server_auth {
        return Err(bad(
            "the signer certificate is not a policy signing certificate",
        ));
    }
    let (_, root) = x509_parser::certificate::X509Certificate::from_der(root_der)
        .map_err(|e| bad(&format!("root: {e}")))?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(signer_cert)
        .map_err(|e| bad(&format!("signer: {e}")))?;
    cert.verify_signature(Some(root.public_key()))
        .map_err(|_| bad("the signer certificate was not issued by the root"))?;
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ED25519,
        cert.public_key().subject_public_key.data.as_ref(),
    );
    let mut m = Vec::with_capacity(context.len() + bytes.len());
    m.extend_from_slice(context);
    m.extend_from_slice(bytes);
    key.verify(&m, signature)
        .map_err(|_| bad("the signature does not match the signed bytes"))?;
    Ok(signer)
}
