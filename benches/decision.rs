//! One Cedar decision at a cache under a 200-policy bundle (the one
//! `lattice bench policy` and `lattice bench mint` generate): an agent's
//! first request for an audience (entity slice built), a later request
//! (context built, sliced policies evaluated) and a decision-cache hit.
//! `cargo bench --bench decision`; results in BENCHMARKS.md.

use std::hint::black_box;

/// The allocator the binaries run with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use lattice_regional_cache::authz::PolicyAuthorizer;
use lattice_shared::policy::{AgentRequest, Engine};

const POLICIES: usize = 200;

fn request(i: usize, agent: usize) -> AgentRequest {
    lattice::bench::policy_request(POLICIES, i, agent)
}

fn decisions(c: &mut Criterion) {
    let files = lattice::bench::large_bundle(POLICIES);
    let mut g = c.benchmark_group("decision, 200-policy bundle");

    let engine = Engine::compile(&files, 1).expect("the generated bundle compiles");
    let next_agent = AtomicUsize::new(1_000_000);
    g.bench_function("first request of an agent", |b| {
        b.iter_batched(
            || request(7, next_agent.fetch_add(1, Ordering::Relaxed)),
            |r| black_box(engine.decide_agent(&r).allowed),
            BatchSize::SmallInput,
        )
    });

    let engine = Engine::compile(&files, 1).expect("the generated bundle compiles");
    let requests: Vec<AgentRequest> = (0..POLICIES * 4).map(|i| request(i, i % 8)).collect();
    for r in &requests {
        engine.decide_agent(r);
    }
    let mut i = 0usize;
    g.bench_function("later request (uncached)", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            black_box(engine.decide_agent(&requests[i]).allowed)
        })
    });

    let authz = PolicyAuthorizer::default();
    authz.install(Engine::compile(&files, 1).expect("the generated bundle compiles"));
    for r in &requests {
        authz.authorize(r);
    }
    g.bench_function("decision cache hit", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            black_box(authz.authorize(&requests[i]).allowed)
        })
    });
    g.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
