//! A JWT presented to a relying party or to a cache (exchange, delegation).
//! The first byte picks the form: arbitrary text as a compact token, or an
//! arbitrary payload signed by a real cache signing key, so the claims
//! decoding, time checks, certificate checks and region confinement past
//! the signature are reached too.
#![no_main]
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use ed25519_dalek::Signer as _;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use lattice_shared::clock::SystemClock;
use lattice_shared::id::{SpiffeId, TrustDomain};
use lattice_shared::pki::{Authority, PrivateKey, Profile, TrustBundle};
use lattice_shared::token::{self, TokenVerifier};

struct Fixture {
    verifier: TokenVerifier,
    issuer: SpiffeId,
    key: ed25519_dalek::SigningKey,
    header_b64: String,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let now = SystemTime::now();
    let td = TrustDomain::new("fuzz.test").expect("trust domain");
    let root = Authority::new_root(
        &td,
        PrivateKey::generate_p256().expect("key"),
        now,
        Duration::from_secs(86_400),
    )
    .expect("root");
    let issuer = SpiffeId::parse("spiffe://fuzz.test/cache/eu/c1").expect("id");
    let signing = PrivateKey::generate_ed25519().expect("key");
    let cert = root
        .issue(
            &signing.csr_der().expect("csr"),
            &issuer,
            Profile::JwtSigning,
            now,
            Duration::from_secs(86_400),
        )
        .expect("signing certificate");
    let key = ed25519_dalek::SigningKey::from_pkcs8_der(&signing.pkcs8_der()).expect("pkcs8");
    let kid = token::ed25519_kid(key.verifying_key().as_bytes());
    let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": kid});
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let bundle = Arc::new(TrustBundle::new(td, root.cert_der().to_vec()).expect("bundle"));
    Fixture {
        verifier: TokenVerifier::new(
            token::jwks_from_certs([cert.as_slice()], now),
            bundle,
            SystemClock::shared(),
        ),
        issuer,
        key,
        header_b64: b64.encode(header.to_string()),
    }
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let f = &*FIXTURE;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode & 1 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        text.to_owned()
    } else {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut t = format!("{}.{}", f.header_b64, b64.encode(rest));
        let sig = f.key.sign(t.as_bytes());
        t.push('.');
        t.push_str(&b64.encode(sig.to_bytes()));
        t
    };
    let _ = jsonwebtoken::decode_header(&token);
    if let Ok(claims) = f.verifier.verify_any_audience(&token) {
        // Only this cache's key signs: what verifies names it as issuer.
        assert_eq!(claims.iss, f.issuer.as_str());
        let _ = token::check_confinement(&claims, &f.issuer);
    }
    let _ = f.verifier.verify(&token, "https://api.fuzz.test");
});
