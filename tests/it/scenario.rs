//! Seeded randomised scenarios (after TigerBeetle's VOPR): revoke, partition,
//! heal, restart caches and the control plane, move the clock, mint, in a
//! random order. The invariant, checked on the record of issuances: no
//! credential is minted for a subject after its revocation time + L.
//!
//! `LATTICE_SEED=n cargo test --test it scenario::` replays a run; the seed is
//! printed at the start and in every failure.

use crate::common;

use std::time::Duration;

use lattice::harness::{Lattice, Spec};
use lattice_regional_cache::AuditEvent;
use lattice_shared::clock::FakeClock;
use lattice_shared::revocation::Target;

/// splitmix64: a tiny deterministic generator for scenario choices.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Outcome {
    issued: usize,
    refused: usize,
}

async fn scenario(seed: u64, steps: usize) -> Outcome {
    let mut rng = Rng(seed);
    let clock = FakeClock::new();
    let spec = Spec {
        caches: vec![
            ("eu".into(), "c1".into()),
            ("eu".into(), "c2".into()),
            ("us".into(), "c1".into()),
        ],
        agents: vec![
            ("eu".into(), "a".into()),
            ("eu".into(), "b".into()),
            ("us".into(), "c".into()),
            ("us".into(), "d".into()),
        ],
        ..Spec::default()
    };
    let l_ms = i64::try_from(spec.max_staleness.as_millis()).expect("ms");
    let mut l = Lattice::start(spec, clock.shared())
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: start: {e:#}"));
    let mut revocations: Vec<(String, i64)> = Vec::new();
    let mut trace = Vec::new();
    let (mut issued, mut refused) = (0, 0);
    for step in 0..steps {
        let t0 = std::time::Instant::now();
        if std::env::var("LATTICE_TRACE").is_ok() && step > 0 {
            eprintln!("{}", trace.last().map(String::as_str).unwrap_or(""));
        }
        let op = rng.below(100);
        let cache = usize::try_from(rng.below(l.caches.len() as u64)).expect("index");
        let agent = usize::try_from(rng.below(l.agents.len() as u64)).expect("index");
        match op {
            0..=34 => {
                let ok = l.agents[agent]
                    .mint(common::AUDIENCE, &[], None)
                    .await
                    .is_ok();
                if ok {
                    issued += 1
                } else {
                    refused += 1
                }
                trace.push(format!(
                    "{:?} {step}: mint by agent {agent}: {}",
                    t0.elapsed(),
                    if ok { "issued" } else { "refused" }
                ));
            }
            35..=44 => {
                let id = l.agents[agent].id.clone();
                let ev = l
                    .revoke(Target::Agent(id.clone()))
                    .unwrap_or_else(|e| panic!("seed {seed}: revoke: {e:#}"));
                revocations.push((id.to_string(), ev.committed_at_unix_ms));
                trace.push(format!(
                    "{:?} {step}: revoke agent {agent} (seq {})",
                    t0.elapsed(),
                    ev.seq
                ));
            }
            45..=54 => {
                l.caches[cache].partition();
                trace.push(format!(
                    "{:?} {step}: partition cache {cache}",
                    t0.elapsed()
                ));
            }
            55..=66 => {
                l.caches[cache].heal();
                trace.push(format!("{:?} {step}: heal cache {cache}", t0.elapsed()));
            }
            67..=71 => {
                l.restart_cache(cache)
                    .await
                    .unwrap_or_else(|e| panic!("seed {seed}: restart cache: {e:#}"));
                trace.push(format!("{:?} {step}: restart cache {cache}", t0.elapsed()));
            }
            72..=75 => {
                l.restart_cp()
                    .await
                    .unwrap_or_else(|e| panic!("seed {seed}: restart cp: {e:#}"));
                trace.push(format!("{:?} {step}: restart control plane", t0.elapsed()));
            }
            76..=89 => {
                let d = Duration::from_millis(rng.below(2 * l_ms as u64));
                clock.advance(d);
                trace.push(format!("{:?} {step}: advance clock {d:?}", t0.elapsed()));
            }
            _ => {
                // Let connected caches catch up, as time passes in the real world.
                let head = l.cp().event_log().head();
                for c in l
                    .caches
                    .iter()
                    .filter(|c| c.link.mode() == lattice::faults::Mode::Pass)
                {
                    c.wait_applied(head)
                        .await
                        .unwrap_or_else(|e| panic!("seed {seed}: {e:#}\n{}", trace.join("\n")));
                    c.wait_fresh()
                        .await
                        .unwrap_or_else(|e| panic!("seed {seed}: {e:#}\n{}", trace.join("\n")));
                }
                trace.push(format!("{:?} {step}: settle at head {head}", t0.elapsed()));
            }
        }
    }
    // The invariant, on the audit trail of every cache.
    for e in l.audit.events() {
        if let AuditEvent::Issued {
            agent,
            at_unix_ms,
            cache,
            jti,
            ..
        } = e
        {
            for (revoked, t) in &revocations {
                assert!(
                    agent.as_str() != revoked || at_unix_ms <= t + l_ms,
                    "seed {seed}: {cache} minted {jti} for {agent} at {at_unix_ms}, revoked at {t} (+L = {})\n{}",
                    t + l_ms,
                    trace.join("\n")
                );
            }
        }
    }
    l.shutdown().await;
    Outcome { issued, refused }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_is_minted_after_revocation_plus_l() {
    let base = std::env::var("LATTICE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("scenario seed: LATTICE_SEED={base}");
    let mut issued = 0;
    let mut refused = 0;
    for i in 0..4 {
        let o = scenario(base.wrapping_add(i), 60).await;
        issued += o.issued;
        refused += o.refused;
    }
    eprintln!("scenario seed {base}: {issued} issued, {refused} refused");
    assert!(
        issued > 0,
        "seed {base}: scenarios that never mint test nothing"
    );
}
