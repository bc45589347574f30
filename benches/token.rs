//! Signing one access token as a cache does for every `MintToken`
//! (claims to JSON, base64url, Ed25519), and verifying it offline against
//! the cache's JWKS entry as a resource server would (`jsonwebtoken`).
//! `cargo bench --bench token`; results in BENCHMARKS.md.

use std::hint::black_box;

/// The allocator the binaries run with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};
use lattice_shared::pki::PrivateKey;
use lattice_shared::token::{Claims, Confirmation, TokenSigner};

fn claims() -> Claims {
    Claims {
        iss: "spiffe://lattice.local/cache/eu/cache-1".into(),
        sub: "spiffe://lattice.local/agent/eu/agent-1".into(),
        aud: "https://api.example.com".into(),
        scope: "read write".into(),
        jti: "Y2Yyxa0dB6ZAwVi2zga_VQ".into(),
        iat: 1_796_000_000,
        nbf: 1_796_000_000,
        exp: 1_796_000_300,
        cnf: Some(Confirmation {
            x5t_s256: "q1Z7w0l2d6Xb3m9Yc5s8Rk4Jt1Hf0Ga2Ee7Dd6Cc5Bb".into(),
        }),
        act: None,
        parent_jtis: Vec::new(),
    }
}

fn token(c: &mut Criterion) {
    let key = PrivateKey::generate_ed25519().expect("key");
    let signer = TokenSigner::from_pkcs8(&key.pkcs8_der()).expect("signer");
    let claims = claims();
    let mut g = c.benchmark_group("token");
    g.bench_function("sign (MintToken's signature)", |b| {
        b.iter(|| black_box(signer.sign(black_box(&claims)).expect("sign")))
    });
    let token = signer.sign(&claims).expect("sign");
    let decoding = jsonwebtoken::DecodingKey::from_ed_der(&signer.public_key_raw());
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.set_audience(&["https://api.example.com"]);
    validation.validate_exp = false;
    g.bench_function("verify offline (jsonwebtoken)", |b| {
        b.iter(|| {
            black_box(
                jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation)
                    .expect("verifies"),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, token);
criterion_main!(benches);
