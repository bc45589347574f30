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
use lattice_shared::token::TokenSigner;

fn token(c: &mut Criterion) {
    let key = PrivateKey::generate_ed25519().expect("key");
    let signer = TokenSigner::from_pkcs8(&key.pkcs8_der()).expect("signer");
    let claims = lattice::bench::sample_claims();
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
