//! `lattice bench mint` and `lattice bench lease`: MintToken or LeaseSecret
//! at one cache over mTLS with many requests in flight, next to the bare
//! `Ping` echo of the same server stack measured in the same run, so the
//! ratio shows what minting (or opening a sealed secret) itself costs.

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
    /// Release a generated bundle of this many policies first (0: the
    /// harness's small default bundle).
    pub policies: usize,
}

#[derive(Debug, Clone)]
pub struct Stats {
    pub name: &'static str,
    pub requests: usize,
    pub errors: usize,
    pub rps: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// CPU time of the whole process (client, cache, control plane) per
    /// answered request; `None` where `/proc/self/stat` cannot be read.
    pub cpu_us: Option<f64>,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<6} {:>9.0} rpc/s  p50 {:>6} µs  p99 {:>6} µs  ({} requests, {} errors",
            self.name, self.rps, self.p50_us, self.p99_us, self.requests, self.errors
        )?;
        match self.cpu_us {
            Some(c) => write!(f, ", {c:.0} µs of CPU each)"),
            None => write!(f, ")"),
        }
    }
}

/// Linux reports process times in USER_HZ ticks, 100 a second on every
/// architecture's user ABI.
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system) this process has used.
fn process_cpu_secs() -> Option<f64> {
    parse_stat_cpu_secs(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// utime + stime from a `/proc/PID/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last
/// `)`: the first is field 3, utime and stime are fields 14 and 15.
fn parse_stat_cpu_secs(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// Claims shaped like a cache's for one agent (the ids, audience and
/// thumbprint of the usual lengths).
pub fn sample_claims() -> lattice_shared::token::Claims {
    lattice_shared::token::Claims {
        iss: "spiffe://lattice.local/cache/eu/cache-1".into(),
        sub: "spiffe://lattice.local/agent/eu/agent-1".into(),
        aud: "https://api.example.com".into(),
        scope: "read write".into(),
        jti: "Y2Yyxa0dB6ZAwVi2zga_VQ".into(),
        iat: 1_796_000_000,
        nbf: 1_796_000_000,
        exp: 1_796_000_300,
        cnf: Some(lattice_shared::token::Confirmation {
            x5t_s256: "q1Z7w0l2d6Xb3m9Yc5s8Rk4Jt1Hf0Ga2Ee7Dd6Cc5Bb".into(),
        }),
        act: None,
        parent_jtis: Vec::new(),
    }
}

/// What one token signature (claims to JSON, base64url, Ed25519) costs on
/// this machine now, in µs: the floor of a mint's cost above an echo.
pub fn sign_cost_us() -> anyhow::Result<f64> {
    let key = lattice_shared::pki::PrivateKey::generate_ed25519()?;
    let signer = lattice_shared::token::TokenSigner::from_pkcs8(&key.pkcs8_der())?;
    let claims = sample_claims();
    const N: u32 = 20_000;
    for _ in 0..N / 10 {
        std::hint::black_box(signer.sign(&claims)?);
    }
    let t = Instant::now();
    for _ in 0..N {
        std::hint::black_box(signer.sign(std::hint::black_box(&claims))?);
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / f64::from(N))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Echo,
    Mint,
    Lease,
}

/// The secret `bench lease` leases (64 bytes, like a long API key).
const BENCH_SECRET: &str = "bench-secret";

async fn load(
    clients: &[pb::cache_client::CacheClient<tonic::transport::Channel>],
    call: Call,
    opts: &Options,
    measure: bool,
) -> Stats {
    let duration = if measure { opts.duration } else { opts.warmup };
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let cpu_before = process_cpu_secs();
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
                    Call::Lease => c
                        .lease_secret(pb::LeaseSecretRequest {
                            name: BENCH_SECRET.into(),
                            version: 0,
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
    let cpu_us = match (cpu_before, process_cpu_secs()) {
        (Some(a), Some(b)) if !all.is_empty() => Some((b - a) * 1e6 / all.len() as f64),
        _ => None,
    };
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
            Call::Lease => "lease",
        },
        requests: all.len(),
        errors,
        rps: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        cpu_us,
    }
}

/// Runs echo, then mint in the default audit mode (answered once the
/// audit record is durable), then mint at a second cache of the region in
/// the `commit_delay` mode, all in one in-process lattice.
pub async fn mint(opts: Options) -> anyhow::Result<Vec<Stats>> {
    phases(opts, Call::Mint).await
}

/// Runs echo then LeaseSecret (a 64-byte secret held sealed at the cache).
pub async fn lease(opts: Options) -> anyhow::Result<Vec<Stats>> {
    phases(opts, Call::Lease).await
}

async fn phases(opts: Options, what: Call) -> anyhow::Result<Vec<Stats>> {
    let mut caches = vec![("eu".into(), "bench".into())];
    if what == Call::Mint {
        caches.push(("eu".into(), "bench-delay".into()));
    }
    let spec = Spec {
        caches,
        agents: vec![("eu".into(), "bench".into())],
        // An in-memory trail of millions of issuances would measure the Vec.
        record_audit: false,
        policy: (what == Call::Mint && opts.policies > 0).then(|| large_bundle(opts.policies)),
        secrets: vec![BENCH_SECRET.into()],
        ..Spec::default()
    };
    let mut lattice = Lattice::start(spec, SystemClock::shared()).await?;
    if what == Call::Mint {
        lattice.caches[1].cfg.audit_mode = lattice_regional_cache::AuditMode::CommitDelay;
        lattice.restart_cache(1).await?;
        lattice
            .wait_all_applied(lattice.cp().event_log().head())
            .await?;
    }
    if what == Call::Lease {
        let mut custodian = lattice.admin(
            "bench-custodian",
            &[lattice_shared::policy::AdminRole::SecretCustodian],
            &[],
        )?;
        custodian
            .put_secret(pb::PutSecretRequest {
                name: BENCH_SECRET.into(),
                value: vec![b'k'; 64],
                regions: vec!["eu".into()],
                message: "bench".into(),
            })
            .await?;
        lattice
            .wait_all_applied(lattice.cp().event_log().head())
            .await?;
    }
    let agent = &lattice.agents[0];
    let clients_of = |at| -> anyhow::Result<Vec<_>> {
        Ok((0..opts.connections.max(1))
            .map(|_| agent.cache_client(Some(at)))
            .collect::<Result<_, _>>()?)
    };
    let clients = clients_of(lattice.caches[0].addr())?;
    let mut plan = vec![(Call::Echo, "echo", &clients)];
    let delay_clients;
    if what == Call::Lease {
        plan.push((Call::Lease, "lease", &clients));
    } else {
        delay_clients = clients_of(lattice.caches[1].addr())?;
        plan.push((Call::Mint, "mint", &clients));
        plan.push((Call::Mint, "mint-commit-delay", &delay_clients));
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message("warming up");
    for (call, _, clients) in &plan {
        load(clients, *call, &opts, false).await;
    }
    // LATTICE_BENCH_ONLY=echo|mint|mint-commit-delay|lease runs one phase
    // (for profiling).
    let only = std::env::var("LATTICE_BENCH_ONLY").unwrap_or_default();
    let skip = |name: &str| !only.is_empty() && only != name;
    let mut phases = Vec::with_capacity(plan.len());
    for (call, name, clients) in plan {
        bar.set_message(format!("{name} for {:?}", opts.duration));
        phases.push(if skip(name) {
            Stats {
                name,
                requests: 0,
                errors: 0,
                rps: 0.0,
                p50_us: 0,
                p99_us: 0,
                cpu_us: None,
            }
        } else {
            let mut stats = load(clients, call, &opts, true).await;
            stats.name = name;
            stats
        });
    }
    bar.finish_and_clear();
    lattice.shutdown().await;
    Ok(phases)
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

/// A bundle of `n` context-aware policies (one permit per audience, with
/// scope, time, address and posture conditions, and a forbid for every
/// tenth), plus the default bundle's, over `n` audiences, one of which is
/// the mint benchmark's.
pub fn large_bundle(n: usize) -> lattice_shared::policy::BundleFiles {
    use std::fmt::Write as _;
    let mut policies = String::new();
    let mut entities = Vec::new();
    for i in 0..n {
        let aud = if i == 0 {
            "https://api.example.com".to_string()
        } else {
            format!("https://aud-{i}.example.com")
        };
        let mut cond = String::from("resource.scopes.containsAll(context.scopes)");
        if i % 3 == 1 {
            cond.push_str(" && context.hour_utc >= 0 && context.weekday <= 7");
        }
        if i % 4 == 2 {
            cond.push_str(" && context.source_ip.isInRange(ip(\"127.0.0.0/8\"))");
        }
        if i % 5 == 3 {
            cond.push_str(" && context.posture has os_patched && context.posture.os_patched");
        }
        let _ = writeln!(
            policies,
            "@id(\"p{i}\")\npermit(principal is Lattice::Agent, action == Lattice::Action::\"MintToken\", resource == Lattice::Audience::\"{aud}\") when {{ {cond} }};"
        );
        if i % 10 == 9 {
            let _ = writeln!(
                policies,
                "@id(\"f{i}\")\nforbid(principal is Lattice::Agent, action == Lattice::Action::\"MintToken\", resource == Lattice::Audience::\"{aud}\") when {{ principal.labels.contains(\"untrusted\") && context.ttl_secs > 60 }};"
            );
        }
        entities.push(serde_json::json!({
            "uid": {"type": "Lattice::Audience", "id": aud},
            "attrs": {"scopes": ["read", "write"], "labels": []},
            "parents": []
        }));
    }
    let default = lattice_shared::policy::default_bundle();
    lattice_shared::policy::BundleFiles::from_files(
        default
            .iter()
            .map(|(k, v)| {
                let v = match k {
                    lattice_shared::policy::ENTITIES_FILE => {
                        serde_json::Value::Array(entities.clone()).to_string()
                    }
                    lattice_shared::policy::TESTS_FILE => "[]".to_string(),
                    _ => v.to_string(),
                };
                (k.to_string(), v)
            })
            .chain([("bench.cedar".to_string(), policies.clone())]),
    )
    .expect("generated names are valid") // fixed names
}

/// Result of `bench policy`.
#[derive(Debug, Clone)]
pub struct PolicyBench {
    pub policies: usize,
    pub compile_ms: f64,
    pub cold: (u64, u64),
    pub uncached: (u64, u64),
    pub cached: (u64, u64),
    pub decisions: usize,
}

impl std::fmt::Display for PolicyBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} policies (compiled, validated and indexed in {:.0} ms); per decision over {} requests:\n  cold (a new agent: entities sliced, context built, Cedar evaluation) p50 {:.1} µs p99 {:.1} µs\n  uncached (a known agent and audience, a new request: context built, Cedar evaluation) p50 {:.1} µs p99 {:.1} µs\n  decision cache hit (what a cache pays for a repeated request)  p50 {:.1} µs p99 {:.1} µs",
            self.policies,
            self.compile_ms,
            self.decisions,
            self.cold.0 as f64 / 1000.0,
            self.cold.1 as f64 / 1000.0,
            self.uncached.0 as f64 / 1000.0,
            self.uncached.1 as f64 / 1000.0,
            self.cached.0 as f64 / 1000.0,
            self.cached.1 as f64 / 1000.0,
        )
    }
}

/// The `i`-th MintToken request of agent `agent` against `large_bundle(n)`:
/// the audiences in turn, posture patched every other time.
pub fn policy_request(n: usize, i: usize, agent: usize) -> lattice_shared::policy::AgentRequest {
    use lattice_shared::policy::{AgentAction, AgentRequest, Posture};
    AgentRequest {
        principal: lattice_shared::id::SpiffeId::parse(&format!(
            "spiffe://lattice.local/agent/eu/a{agent}"
        ))
        .expect("valid id"), // fixed pattern
        action: AgentAction::MintToken,
        resource: if i.is_multiple_of(n.max(1)) {
            "https://api.example.com".to_string()
        } else {
            format!("https://aud-{}.example.com", i % n.max(1))
        },
        region: "eu".into(),
        source_ip: std::net::IpAddr::from([127, 0, 0, 1]),
        ttl_secs: 300,
        delegation_depth: 0,
        scopes: vec!["read".into()],
        posture: Posture {
            os_patched: Some(i.is_multiple_of(2)),
            ..Posture::default()
        },
        job_type: "inference".into(),
        hour_utc: 12,
        weekday: 2,
    }
}

/// Decision cost with an `n`-policy bundle: `decisions` requests spread
/// over every audience and a few agents, first uncached, then through the
/// cache's decision cache (warm).
pub fn policy(n: usize, decisions: usize) -> anyhow::Result<PolicyBench> {
    use lattice_regional_cache::authz::PolicyAuthorizer;
    use lattice_shared::policy::{AgentRequest, Engine};
    let files = large_bundle(n);
    let t = Instant::now();
    let engine = Engine::compile(&files, 1).map_err(|e| anyhow::anyhow!("{e}"))?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let policies = engine.policy_count();
    let request = |i: usize, agent: usize| policy_request(n, i, agent);
    let requests: Vec<AgentRequest> = (0..n.max(1) * 4).map(|i| request(i, i % 8)).collect();
    // Every one from an agent not seen before: nothing the engine keeps helps.
    let fresh: Vec<AgentRequest> = (0..decisions).map(|i| request(i, 1000 + i)).collect();
    let time_each = |f: &dyn Fn(&AgentRequest) -> bool, requests: &[AgentRequest]| {
        let mut lat = Vec::with_capacity(decisions);
        let mut allowed = 0usize;
        for i in 0..decisions {
            let r = &requests[i % requests.len()];
            let t = Instant::now();
            let ok = std::hint::black_box(f(r));
            lat.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
            allowed += usize::from(ok);
        }
        lat.sort_unstable();
        (percentile(&lat, 0.5), percentile(&lat, 0.99), allowed)
    };
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message("cold decisions");
    let (k50, k99, allowed) = time_each(&|r| engine.decide_agent(r).allowed, &fresh);
    anyhow::ensure!(allowed > 0, "the generated bundle allows nothing");
    drop(fresh);
    bar.set_message("uncached decisions");
    let engine = Engine::compile(&files, 1).map_err(|e| anyhow::anyhow!("{e}"))?;
    for r in &requests {
        engine.decide_agent(r);
    }
    let (u50, u99, _) = time_each(&|r| engine.decide_agent(r).allowed, &requests);
    let authz = PolicyAuthorizer::default();
    authz.install(Engine::compile(&files, 1).map_err(|e| anyhow::anyhow!("{e}"))?);
    for r in &requests {
        authz.authorize(r);
    }
    bar.set_message("cached decisions");
    let (c50, c99, _) = time_each(&|r| authz.authorize(r).allowed, &requests);
    bar.finish_and_clear();
    Ok(PolicyBench {
        policies,
        compile_ms,
        cold: (k50, k99),
        uncached: (u50, u99),
        cached: (c50, c99),
        decisions,
    })
}

/// Result of `bench audit`.
#[derive(Debug, Clone)]
pub struct AuditBench {
    pub caches: usize,
    pub records: usize,
    pub seconds: f64,
    pub per_second: f64,
}

impl std::fmt::Display for AuditBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records from {} caches durable in the control plane's audit log in {:.2} s: {:.0} records/s",
            self.records, self.caches, self.seconds, self.per_second
        )
    }
}

/// Audit records recorded at `caches` caches at once → durable leaves of the
/// control plane's Merkle log (cache outbox group commit, Sync stream,
/// control-plane batch append, ack), end to end.
pub async fn audit(caches: usize, records: usize) -> anyhow::Result<AuditBench> {
    let spec = Spec {
        caches: (0..caches)
            .map(|i| ("eu".to_string(), format!("c{i}")))
            .collect(),
        agents: vec![],
        record_audit: false,
        ..Spec::default()
    };
    let lattice = Lattice::start(spec, SystemClock::shared()).await?;
    let log = lattice.cp().audit_log();
    let base = log.size();
    let per = records / caches.max(1);
    let total = per * caches;
    let bar = indicatif::ProgressBar::new(total as u64);
    let t0 = Instant::now();
    for c in &lattice.caches {
        let outbox = c.app().outbox();
        let id = c.cfg.id.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..per {
                let rec = format!(
                    "{{\"kind\":\"issued\",\"agent\":\"spiffe://lattice.local/agent/eu/a{}\",\"jti\":\"{i:016x}\",\"audience\":\"https://api.example.com\",\"at_unix_ms\":0,\"policy_version\":2,\"region\":\"eu\",\"decision\":\"allow\",\"from\":\"{id}\"}}",
                    i % 1000
                );
                outbox.record(rec.into_bytes());
            }
        });
    }
    loop {
        let done = log.size() - base;
        bar.set_position(done);
        if done >= total as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    lattice.shutdown().await;
    Ok(AuditBench {
        caches,
        records: total,
        seconds,
        per_second: total as f64 / seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_times_are_read_after_the_command_name() {
        // A command name with a space and a parenthesis, then fields 3..=15.
        let line = "4242 (tokio rt) x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 37 0 0 20 0 3";
        assert_eq!(parse_stat_cpu_secs(line), Some(2.87));
        assert_eq!(parse_stat_cpu_secs("4242 (short) S 1 2"), None);
        assert_eq!(parse_stat_cpu_secs("no parenthesis"), None);
    }

    #[test]
    fn this_process_cpu_time_grows_with_work() {
        let before = process_cpu_secs().expect("Linux exposes /proc/self/stat");
        let mut x = 0u64;
        let mut now = before;
        // Bounded: about a second of arithmetic at most.
        for i in 0..2_000u64 {
            for j in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i ^ j));
            }
            now = process_cpu_secs().expect("readable");
            if now >= before + 0.05 {
                break;
            }
        }
        assert!(now >= before + 0.05, "{before} → {now} after work ({x})");
    }

    #[test]
    fn the_sample_claims_sign_into_a_token_of_three_parts() {
        let key = lattice_shared::pki::PrivateKey::generate_ed25519().expect("key");
        let signer =
            lattice_shared::token::TokenSigner::from_pkcs8(&key.pkcs8_der()).expect("signer");
        let token = signer.sign(&sample_claims()).expect("sign");
        assert_eq!(token.split('.').count(), 3);
    }
}
