//! `lattice-agent run`: keeps the identity and tokens fresh, follows
//! revocations, moves between caches, and serves local processes (the
//! Workload API and, when configured, the credential-injecting proxy) until
//! stopped. On the way out every token is dropped from memory and the
//! socket is removed.

use std::sync::Arc;
use std::time::Duration;

use lattice_shared::backoff::Backoff;

use crate::{Agent, Error};

/// How often a failed-over agent checks whether an earlier cache serves again.
const FAIL_BACK_EVERY: Duration = Duration::from_secs(30);

/// Renews the certificate and kept tokens when due, follows revocations
/// and fails back to earlier caches, until `stop` or revocation.
pub async fn keep_fresh(agent: &Arc<Agent>, stop: impl std::future::Future<Output = ()>) {
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let watcher = agent.watch_revocations(async move {
        let mut rx = done_rx;
        let _ = rx.wait_for(|d| *d).await;
    });
    let renewer = async {
        tokio::pin!(stop);
        let cfg = agent.config().renewal.clone();
        let clock = agent.clock().clone();
        let mut revoked = agent.revoked_signal();
        let mut tick = tokio::time::interval(Duration::from_millis(cfg.check_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Backoff runs on real time (it spares the caches); what is due runs
        // on the agent's clock.
        let started = tokio::time::Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(cfg.max_backoff_ms));
        let mut last_fail_back = clock.monotonic();
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = revoked.wait_for(|r| *r) => break,
                _ = tick.tick() => {}
            }
            let elapsed = started.elapsed();
            if backoff.ready(elapsed) {
                let r = match agent.renew_if_due().await {
                    Ok(_) => agent.refresh_kept().await.map(|_| ()),
                    Err(e) => Err(e),
                };
                match r {
                    Ok(()) => backoff.succeeded(),
                    Err(Error::Revoked) => break,
                    Err(e) => {
                        let wait = backoff.failed(elapsed);
                        metrics::counter!("lattice_agent_renewal_failures_total").increment(1);
                        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "renewal failed; backing off");
                    }
                }
            }
            let now = clock.monotonic();
            if now.saturating_sub(last_fail_back) >= FAIL_BACK_EVERY {
                last_fail_back = now;
                agent.fail_back().await;
            }
            metrics::gauge!("lattice_agent_certificate_expires_unix")
                .set(agent.not_after_unix() as f64);
        }
        done_tx.send_replace(true);
    };
    tokio::join!(watcher, renewer);
}

/// Where a running agent serves.
#[derive(Debug, Clone, Default)]
pub struct Ready {
    pub socket: Option<std::path::PathBuf>,
    pub proxy: Option<std::net::SocketAddr>,
}

/// Everything `lattice-agent run` does, until `stop` resolves or the agent
/// is revoked. `ready` fires once the Workload API (and proxy) listen.
pub async fn run(
    agent: Arc<Agent>,
    ready: Option<tokio::sync::oneshot::Sender<Ready>>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let cfg = agent.config().clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut at = Ready::default();
    let mut socket_ready = None;
    if !cfg.workload.disabled {
        let path = cfg.workload.socket_path(&cfg.data_dir);
        at.socket = Some(path.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        socket_ready = Some(rx);
        let (a, w, s) = (agent.clone(), cfg.workload.clone(), stopped());
        tasks.spawn(async move { crate::workload::serve(a, &w, &path, Some(tx), s).await });
    }
    let mut proxy_ready = None;
    if let Some(p) = cfg.proxy.clone() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        proxy_ready = Some(rx);
        let (a, s) = (agent.clone(), stopped());
        tasks.spawn(async move { serve_proxy(a, p, Some(tx), s).await });
    }
    let keep = {
        let a = agent.clone();
        let s = stopped();
        tokio::spawn(async move { keep_fresh(&a, s).await })
    };
    if let Some(r) = socket_ready {
        let _ = r.await;
    }
    if let Some(r) = proxy_ready {
        at.proxy = r.await.ok();
    }
    if let Some(r) = ready {
        let _ = r.send(at);
    }
    let mut revoked = agent.revoked_signal();
    let mut failed = None;
    tokio::select! {
        _ = stop => {}
        _ = revoked.wait_for(|r| *r) => {
            tracing::warn!(agent_id = %agent.id, "revoked; stopping");
        }
        Some(done) = tasks.join_next() => {
            // Any service ending on its own is fatal: stop, do not run
            // without it.
            failed = Some(match done {
                Ok(Err(e)) => e,
                Ok(Ok(())) => Error::Transport("a local service stopped unexpectedly".into()),
                Err(j) => Error::Transport(format!("a local service failed: {j}")),
            });
        }
    }
    stop_tx.send_replace(true);
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            failed.get_or_insert(e);
        }
    }
    let _ = keep.await;
    if let Err(e) = agent.save_token_cache() {
        tracing::warn!(error = %e, "writing the token cache failed");
    }
    agent.drop_all_tokens();
    tracing::info!(agent_id = %agent.id, "stopped; tokens dropped from memory");
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The agent leases from the cache of its region.
impl crate::proxy::SecretSource for Agent {
    fn lease<'a>(
        &'a self,
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<crate::proxy::LeasedKey, crate::proxy::LeaseError>>
    {
        Box::pin(async move {
            let l = self.lease_secret(name, 0, None).await.map_err(|e| {
                let unreachable = matches!(
                    &e,
                    crate::Error::Transport(_)
                        | crate::Error::Refused {
                            code: tonic::Code::Unavailable | tonic::Code::DeadlineExceeded,
                            ..
                        }
                );
                crate::proxy::LeaseError {
                    message: e.to_string(),
                    unreachable,
                }
            })?;
            Ok(crate::proxy::LeasedKey {
                value: l.value,
                fingerprint: l.fingerprint,
                expires_at_unix: l.expires_at_unix,
                version: l.version,
            })
        })
    }

    fn generation(&self) -> u64 {
        self.lease_generation()
    }
}

/// Audit events of the proxy, queued for the cache (bounded: a full queue
/// drops the event and counts it, the proxy never waits on the network).
#[derive(Debug)]
struct ForwardAudit {
    tx: tokio::sync::mpsc::Sender<lattice_shared::proto::AgentAuditEvent>,
}

/// Events queued for the cache at most.
const AUDIT_QUEUE: usize = 4096;
/// Events per report.
const AUDIT_BATCH: usize = 128;

impl crate::proxy::ProxyAudit for ForwardAudit {
    fn record(&self, e: crate::proxy::ProxyEvent) {
        tracing::info!(
            kind = e.kind.as_str(),
            resource = %e.resource,
            detail = %e.detail,
            status = e.status,
            reason = %e.reason,
            fingerprint = e.fingerprint.as_deref().unwrap_or(""),
            request_id = %e.request_id,
            "proxy audit"
        );
        let ev = lattice_shared::proto::AgentAuditEvent {
            kind: e.kind.as_str().to_owned(),
            resource: e.resource,
            detail: if e.reason.is_empty() {
                e.detail
            } else {
                format!("{} ({})", e.detail, e.reason)
            }
            .chars()
            .take(512)
            .collect(),
            fingerprint: e.fingerprint.unwrap_or_default(),
            at_unix_ms: e.at_unix_ms,
            local_caller: e
                .local_caller
                .map(|u| format!("uid {u}"))
                .unwrap_or_default(),
            request_id: e.request_id,
        };
        if self.tx.try_send(ev).is_err() {
            metrics::counter!("lattice_agent_audit_dropped_total").increment(1);
        }
    }
}

/// Sends queued audit events to the cache in batches until the queue
/// closes; a failed report is retried with backoff (events stay queued in
/// memory meanwhile).
async fn forward_audit(
    agent: Arc<Agent>,
    mut rx: tokio::sync::mpsc::Receiver<lattice_shared::proto::AgentAuditEvent>,
) {
    let mut batch = Vec::new();
    let mut backoff = Backoff::new(Duration::from_secs(30));
    let started = tokio::time::Instant::now();
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(e) => batch.push(e),
                None => return,
            }
        }
        while batch.len() < AUDIT_BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        metrics::gauge!("lattice_agent_audit_queued").set((batch.len() + rx.len()) as f64);
        match agent.report_audit(batch.clone()).await {
            Ok(_) => {
                batch.clear();
                backoff.succeeded();
            }
            Err(Error::Revoked) => return,
            Err(e) => {
                let wait = backoff.failed(started.elapsed());
                tracing::warn!(error = %e, events = batch.len(), retry_in_ms = wait.as_millis() as u64, "audit report failed; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The credential-injecting proxy, leasing keys through the agent and
/// reporting each use to its cache.
async fn serve_proxy(
    agent: Arc<Agent>,
    cfg: crate::proxy::ProxyConfig,
    ready: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let cfg = Arc::new(cfg);
    let (tx, rx) = tokio::sync::mpsc::channel(AUDIT_QUEUE);
    let proxy = crate::proxy::Proxy::build(
        cfg.clone(),
        agent.clone(),
        Arc::new(ForwardAudit { tx }),
        agent.clock().clone(),
    )
    .map_err(|e| Error::Config(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| Error::Config(format!("proxy.listen {}: {e}", cfg.listen)))?;
    tracing::info!(listen = %cfg.listen, upstreams = cfg.upstreams.len(), "credential-injecting proxy listening");
    let forwarder = tokio::spawn(forward_audit(agent.clone(), rx));
    if let Some(r) = ready {
        let _ = r.send(listener.local_addr().unwrap_or(cfg.listen));
    }
    let served = proxy.serve(listener, stop).await;
    // The proxy (and its queue sender) is gone: the forwarder drains the
    // queue and ends.
    let _ = tokio::time::timeout(Duration::from_secs(5), forwarder).await;
    served.map_err(|e| Error::Config(e.to_string()))
}
