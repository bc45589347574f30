//! Access tokens: compact JWS (EdDSA) minted by caches, the JWKS that lists
//! every valid cache signing key, and an offline verifier.
//!
//! Signing uses ed25519-dalek with the key parsed once and held in memory
//! (zeroized on drop; about twice as fast as ring's Ed25519 signing here);
//! only the compact serialisation (base64url of header and claims) is done
//! here. Verification uses the `jsonwebtoken` crate, as any service would,
//! with expiry checked against the injected clock.

use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::Signer as _;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm,
    OctetKeyPairParameters, OctetKeyPairType, PublicKeyUse,
};
use serde::{Deserialize, Serialize};

use crate::clock::{SharedClock, unix_secs};
use crate::id::{Role, SpiffeId};
use crate::pki::{TrustBundle, Usage};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("signing key is malformed")]
    BadKey,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token signed by unknown key {0:?}")]
    UnknownKey(String),
    #[error("token signature or claims are invalid: {0}")]
    Invalid(String),
    #[error("token has expired")]
    Expired,
    #[error("token is not yet valid")]
    NotYetValid,
    #[error("token issuer {iss} does not match the certificate of key {kid}")]
    WrongIssuer { iss: String, kid: String },
    /// The token names a principal its issuing cache has no authority over.
    #[error("token reaches outside its issuing cache's authority: {0}")]
    NotConfined(String),
}

/// Longest token accepted anywhere.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// RFC 8705 confirmation: the SHA-256 thumbprint of the agent's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    /// Space-separated, as in OAuth 2.0.
    pub scope: String,
    pub jti: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cnf: Option<Confirmation>,
    /// RFC 8693 actor chain of a delegated token: the current actor first,
    /// each earlier one nested in its `act`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub act: Option<Actor>,
    /// The `jti`s of the tokens this one was delegated from, the original
    /// first: revoking any of them revokes this one (the cascade).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub parent_jtis: Vec<String>,
}

/// One link of an RFC 8693 `act` chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub sub: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// The agent an actor acts for: `act.sub` is `AGENT_ID/ACTOR_NAME`.
    pub fn agent(&self) -> Option<SpiffeId> {
        let (agent, name) = self.sub.rsplit_once('/')?;
        if name.is_empty() {
            return None;
        }
        SpiffeId::parse(agent).ok()
    }

    /// Number of links: 1 for a first delegation.
    pub fn depth(&self) -> usize {
        1 + self.act.as_ref().map_or(0, |a| a.depth())
    }
}

impl Claims {
    /// How many delegations separate this token from one minted directly.
    pub fn delegation_depth(&self) -> usize {
        self.act.as_ref().map_or(0, Actor::depth)
    }

    /// The scopes, split.
    pub fn scopes(&self) -> Vec<&str> {
        self.scope.split(' ').filter(|s| !s.is_empty()).collect()
    }
}

/// The confinement rule for tokens, as [`crate::pki::check_issuance_scope`]
/// is for certificates: a cache speaks only for the agents of its own trust
/// domain and region. `issuer` is the cache the root certified the signing
/// key for (from the key's certificate, not from the token): `iss` must name
/// it, and `sub` and the agent of every `act` link must be agents in its
/// scope — never an admin, a cache, the control plane or another region's
/// agent.
pub fn check_confinement(claims: &Claims, issuer: &SpiffeId) -> Result<(), TokenError> {
    let outside = |m: String| Err(TokenError::NotConfined(m));
    if issuer.role() != Role::Cache {
        return outside(format!("{issuer} is not a cache"));
    }
    if claims.iss != issuer.as_str() {
        return outside(format!(
            "iss {} is not the cache that signed the token",
            claims.iss
        ));
    }
    let sub = SpiffeId::parse(&claims.sub)
        .map_err(|_| TokenError::Malformed("sub is not a SPIFFE id".into()))?;
    if !sub.is_agent_within(issuer) {
        return outside(format!(
            "{sub} is not an agent of {issuer}'s trust domain and region"
        ));
    }
    let mut actor = claims.act.as_ref();
    while let Some(a) = actor {
        let Some(agent) = a.agent() else {
            return Err(TokenError::Malformed(
                "the agent of act.sub is not a SPIFFE id".into(),
            ));
        };
        if !agent.is_agent_within(issuer) {
            return outside(format!(
                "actor {agent} is not an agent of {issuer}'s trust domain and region"
            ));
        }
        actor = a.act.as_deref();
    }
    Ok(())
}

/// RFC 7638 thumbprint of an Ed25519 public key: the `kid` of its JWK.
pub fn ed25519_kid(public_raw: &[u8]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        B64.encode(public_raw)
    );
    B64.encode(crate::pki::sha256(canonical.as_bytes()))
}

/// A cache's token signer.
pub struct TokenSigner {
    key: ed25519_dalek::SigningKey,
    kid: String,
    header_b64: String,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, TokenError> {
        // ring writes PKCS#8 v2 (with the public key); dalek reads both.
        let key =
            ed25519_dalek::SigningKey::from_pkcs8_der(pkcs8).map_err(|_| TokenError::BadKey)?;
        let kid = ed25519_kid(key.verifying_key().as_bytes());
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": kid});
        let header_b64 = B64.encode(header.to_string());
        Ok(Self {
            key,
            kid,
            header_b64,
        })
    }
    pub fn kid(&self) -> &str {
        &self.kid
    }
    pub fn public_key_raw(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let body = serde_json::to_vec(claims).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let mut out = String::with_capacity(self.header_b64.len() + body.len() * 4 / 3 + 100);
        out.push_str(&self.header_b64);
        out.push('.');
        B64.encode_string(&body, &mut out);
        let sig = self.key.sign(out.as_bytes());
        out.push('.');
        B64.encode_string(sig.to_bytes(), &mut out);
        Ok(out)
    }
}

/// The JWK of a cache signing key, with its certificate in `x5c` so that a
/// verifier can check that the control plane certified it.
pub fn signing_jwk(public_raw: &[u8], cert_der: &[u8]) -> Jwk {
    let std_b64 = base64::engine::general_purpose::STANDARD;
    Jwk {
        common: CommonParameters {
            public_key_use: Some(PublicKeyUse::Signature),
            key_algorithm: Some(KeyAlgorithm::EdDSA),
            key_id: Some(ed25519_kid(public_raw)),
            x509_chain: Some(vec![std_b64.encode(cert_der)]),
            ..Default::default()
        },
        algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
            key_type: OctetKeyPairType::OctetKeyPair,
            curve: EllipticCurve::Ed25519,
            x: B64.encode(public_raw),
        }),
    }
}

/// The raw Ed25519 public key inside a signing certificate.
pub fn public_key_of_cert(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

/// Builds a JWKS from signing certificates, keeping those valid at `now`
/// (deduplicated by `kid`).
pub fn jwks_from_certs<'a>(certs: impl IntoIterator<Item = &'a [u8]>, now: SystemTime) -> JwkSet {
    let mut keys: Vec<Jwk> = Vec::new();
    for der in certs {
        let Ok(info) = crate::pki::inspect(der) else {
            continue;
        };
        if now < info.not_before || now > info.not_after {
            continue;
        }
        let Some(raw) = public_key_of_cert(der) else {
            continue;
        };
        let jwk = signing_jwk(&raw, der);
        if !keys.iter().any(|k| k.common.key_id == jwk.common.key_id) {
            keys.push(jwk);
        }
    }
    JwkSet { keys }
}

/// Verifies lattice tokens offline against a JWKS. Each key's `x5c`
/// certificate must chain to the trust bundle's root and name the token's
/// issuer.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    jwks: JwkSet,
    bundle: Arc<TrustBundle>,
    clock: SharedClock,
}

impl TokenVerifier {
    pub fn new(jwks: JwkSet, bundle: Arc<TrustBundle>, clock: SharedClock) -> Self {
        Self {
            jwks,
            bundle,
            clock,
        }
    }

    pub fn verify(&self, token: &str, audience: &str) -> Result<Claims, TokenError> {
        self.verify_inner(token, Some(audience))
    }

    /// Like [`verify`](Self::verify) for whatever audience the token names
    /// (token exchange, where the audience is carried over).
    pub fn verify_any_audience(&self, token: &str) -> Result<Claims, TokenError> {
        self.verify_inner(token, None)
    }

    fn verify_inner(&self, token: &str, audience: Option<&str>) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("token too long".into()));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let kid = header
            .kid
            .ok_or_else(|| TokenError::Malformed("no kid".into()))?;
        let jwk = self
            .jwks
            .find(&kid)
            .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        match audience {
            Some(a) => validation.set_audience(&[a]),
            None => validation.validate_aud = false,
        }
        validation.validate_exp = false; // checked below with the injected clock
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let claims = data.claims;

        let now = self.clock.now();
        let now_s = unix_secs(now);
        if now_s >= claims.exp {
            return Err(TokenError::Expired);
        }
        if now_s < claims.nbf {
            return Err(TokenError::NotYetValid);
        }
        // The key must be certified by the root for the cache named in `iss`.
        let cert_b64 = jwk
            .common
            .x509_chain
            .as_ref()
            .and_then(|c| c.first())
            .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
        let cert = base64::engine::general_purpose::STANDARD
            .decode(cert_b64)
            .map_err(|_| TokenError::UnknownKey(kid.clone()))?;
        let info = self
            .bundle
            .verify(&cert, &[], now, Usage::JwtSigning)
            .map_err(|e| TokenError::Invalid(format!("signing key certificate: {e}")))?;
        let iss_ok = SpiffeId::parse(&claims.iss).ok().as_ref() == info.id.as_ref();
        let key_ok = public_key_of_cert(&cert).map(|k| B64.encode(k))
            == match &jwk.algorithm {
                AlgorithmParameters::OctetKeyPair(p) => Some(p.x.clone()),
                _ => None,
            };
        if !iss_ok || !key_ok {
            return Err(TokenError::WrongIssuer {
                iss: claims.iss.clone(),
                kid,
            });
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("valid id")
    }

    fn claims(iss: &str, sub: &str, act: Option<Actor>) -> Claims {
        Claims {
            iss: iss.into(),
            sub: sub.into(),
            aud: "https://api".into(),
            scope: "read".into(),
            jti: "j".into(),
            iat: 0,
            nbf: 0,
            exp: 1,
            cnf: None,
            act,
            parent_jtis: vec![],
        }
    }

    #[test]
    fn a_token_is_confined_to_its_signing_caches_region() {
        let us = id("spiffe://t/cache/us/c1");
        let iss = us.as_str();
        let actor = |sub: &str| {
            Some(Actor {
                sub: sub.into(),
                act: None,
            })
        };
        assert!(check_confinement(&claims(iss, "spiffe://t/agent/us/b", None), &us).is_ok());
        assert!(
            check_confinement(
                &claims(
                    iss,
                    "spiffe://t/agent/us/b",
                    actor("spiffe://t/agent/us/c/planner")
                ),
                &us
            )
            .is_ok()
        );
        for (what, c) in [
            ("another region", claims(iss, "spiffe://t/agent/eu/a", None)),
            (
                "another trust domain",
                claims(iss, "spiffe://o/agent/us/b", None),
            ),
            ("an admin", claims(iss, "spiffe://t/admin/bootstrap", None)),
            ("the control plane", claims(iss, "spiffe://t/cp/main", None)),
            ("a cache", claims(iss, "spiffe://t/cache/us/c1", None)),
            (
                "another region's actor",
                claims(
                    iss,
                    "spiffe://t/agent/us/b",
                    actor("spiffe://t/agent/eu/a/planner"),
                ),
            ),
            (
                "another cache's iss",
                claims("spiffe://t/cache/us/c2", "spiffe://t/agent/us/b", None),
            ),
        ] {
            assert!(
                matches!(check_confinement(&c, &us), Err(TokenError::NotConfined(_))),
                "{what}"
            );
        }
        for c in [
            claims(iss, "not an id", None),
            claims(iss, "spiffe://t/agent/us/b", actor("garbage")),
        ] {
            assert!(matches!(
                check_confinement(&c, &us),
                Err(TokenError::Malformed(_))
            ));
        }
        let agent = id("spiffe://t/agent/us/b");
        assert!(matches!(
            check_confinement(&claims(agent.as_str(), agent.as_str(), None), &agent),
            Err(TokenError::NotConfined(_))
        ));
    }
}
