//! `lattice bench mint`: MintToken at one cache over mTLS with many requests
//! in flight, next to the bare `Ping` echo of the same server stack measured
//! in the same run, so the ratio shows what minting itself costs.

use std::time::{Duration, Instant};

use lattice_shared::clock::SystemClock;
use lattice_shared::proto as pb;

use crate::harness::{Lattice, Spec};

#[derive(Debug, Clone)]
pub struct Options {
    pub concurrency: usize,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

#[derive(Debug, Clone)]
pub struct Stats {
    pub name: &'static str,
    pub requests: usize,
    pub errors: usize,
    pub rps: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<6} {:>9.0} rpc/s  p50 {:>6} µs  p99 {:>6} µs  ({} requests, {} errors)",
            self.name, self.rps, self.p50_us, self.p99_us, self.requests, self.errors
        )
    }
}

#[derive(Clone, Copy)]
enum Call {
    Echo,
    Mint,
}

async fn load(
    clients: &[pb::cache_client::CacheClient<tonic::transport::Channel>],
    call: Call,
    opts: &Options,
    measure: bool,
) -> Stats {
    let duration = if measure { opts.duration } else { opts.warmup };
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..opts.concurrency {
        let mut c = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0usize;
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = match call {
                    Call::Echo => c
                        .ping(pb::PingRequest {
                            payload: vec![0u8; 16],
                        })
                        .await
                        .is_ok(),
                    Call::Mint => c
                        .mint_token(pb::MintTokenRequest {
                            audience: "https://api.example.com".into(),
                            scopes: vec!["read".into()],
                            ttl_secs: 0,
                            claims: None,
                        })
                        .await
                        .is_ok(),
                };
                if ok {
                    lat.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Stats {
        name: match call {
            Call::Echo => "echo",
            Call::Mint => "mint",
        },
        requests: all.len(),
        errors,
        rps: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// Runs echo then mint against one cache of an in-process lattice.
pub async fn mint(opts: Options) -> anyhow::Result<(Stats, Stats)> {
    let spec = Spec {
        caches: vec![("eu".into(), "bench".into())],
        agents: vec![("eu".into(), "bench".into())],
        // An in-memory trail of millions of issuances would measure the Vec.
        record_audit: false,
        ..Spec::default()
    };
    let lattice = Lattice::start(spec, SystemClock::shared()).await?;
    let agent = &lattice.agents[0];
    let clients: Vec<_> = (0..opts.connections.max(1))
        .map(|_| agent.new_cache_client())
        .collect::<Result<_, _>>()?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message("warming up");
    load(&clients, Call::Echo, &opts, false).await;
    load(&clients, Call::Mint, &opts, false).await;
    // LATTICE_BENCH_ONLY=echo|mint runs one phase (for profiling).
    let only = std::env::var("LATTICE_BENCH_ONLY").unwrap_or_default();
    let skip = |name: &str| !only.is_empty() && only != name;
    bar.set_message(format!("echo for {:?}", opts.duration));
    let echo = if skip("echo") {
        Stats {
            name: "echo",
            requests: 0,
            errors: 0,
            rps: 0.0,
            p50_us: 0,
            p99_us: 0,
        }
    } else {
        load(&clients, Call::Echo, &opts, true).await
    };
    bar.set_message(format!("mint for {:?}", opts.duration));
    let mint = if skip("mint") {
        Stats {
            name: "mint",
            requests: 0,
            errors: 0,
            rps: 0.0,
            p50_us: 0,
            p99_us: 0,
        }
    } else {
        load(&clients, Call::Mint, &opts, true).await
    };
    bar.finish_and_clear();
    lattice.shutdown().await;
    Ok((echo, mint))
}

/// Result of `bench propagation`.
#[derive(Debug, Clone)]
pub struct Propagation {
    pub caches: usize,
    pub revocations: usize,
    pub commit_p50_us: u64,
    pub commit_p99_us: u64,
    pub all_p50_us: u64,
    pub all_p99_us: u64,
    pub all_max_us: u64,
    pub durable_p50_us: u64,
    pub durable_p99_us: u64,
}

impl std::fmt::Display for Propagation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>3} caches: revoke call (until durable) p50 {:>6} µs p99 {:>6} µs | commit → enforced at every cache p50 {:>6} µs p99 {:>6} µs max {:>6} µs | commit → durable at every cache p50 {:>6} µs p99 {:>6} µs ({} revocations)",
            self.caches,
            self.commit_p50_us,
            self.commit_p99_us,
            self.all_p50_us,
            self.all_p99_us,
            self.all_max_us,
            self.durable_p50_us,
            self.durable_p99_us,
            self.revocations
        )
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Revocation propagation on loopback: commit at the control plane →
/// enforced at every one of `caches` caches (and, separately, durable there).
pub async fn propagation(caches: usize, revocations: usize) -> anyhow::Result<Propagation> {
    use lattice_shared::revocation::Target;
    let spec = Spec {
        caches: (0..caches)
            .map(|i| ("eu".to_string(), format!("c{i}")))
            .collect(),
        agents: vec![],
        ..Spec::default()
    };
    let bar = indicatif::ProgressBar::new((revocations + 10) as u64);
    bar.set_message(format!("{caches} caches"));
    let lattice = Lattice::start(spec, SystemClock::shared()).await?;
    let (mut commit, mut all, mut durable) = (Vec::new(), Vec::new(), Vec::new());
    let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    for i in 0..revocations + 10 {
        let t0 = Instant::now();
        let ev = lattice.revoke(Target::Jti(format!("bench-{i}")))?;
        // The commit point: the event is durable in the log (and the admin
        // would now get its answer). Propagation is measured from here.
        let t_commit = Instant::now();
        let committed = t_commit - t0;
        for c in &lattice.caches {
            c.wait_enforced(ev.seq).await?;
        }
        let enforced = t_commit.elapsed();
        lattice.wait_all_applied(ev.seq).await?;
        let done = t_commit.elapsed();
        if i >= 10 {
            // The first ten warm up connections and stores.
            commit.push(us(committed));
            all.push(us(enforced));
            durable.push(us(done));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    lattice.shutdown().await;
    commit.sort_unstable();
    all.sort_unstable();
    durable.sort_unstable();
    Ok(Propagation {
        caches,
        revocations,
        commit_p50_us: percentile(&commit, 0.5),
        commit_p99_us: percentile(&commit, 0.99),
        all_p50_us: percentile(&all, 0.5),
        all_p99_us: percentile(&all, 0.99),
        all_max_us: all.last().copied().unwrap_or(0),
        durable_p50_us: percentile(&durable, 0.5),
        durable_p99_us: percentile(&durable, 0.99),
    })
}
