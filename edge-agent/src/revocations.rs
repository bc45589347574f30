//! The agent's "sync": it follows its cache's revocation stream, applies
//! each revocation to what it holds (tokens, leases, its own identity) and
//! to the caches it will trust, and forgets everything once it is revoked.

use std::sync::RwLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lattice_shared::backoff::Backoff;
use lattice_shared::freshness::Proof;
use lattice_shared::limits::WATCH_SILENCE;
use lattice_shared::pki::CertInfo;
use lattice_shared::proto as pb;
use lattice_shared::revocation::Revocation;

use crate::caches::worth_failover;
use crate::{Agent, AgentEvent, identity_store, token_cache};

/// The revocations this agent has heard of, applied to the caches it
/// connects to: a revoked cache (or its certificate) is not trusted again.
#[derive(Debug, Default)]
pub struct KnownRevocations(RwLock<lattice_shared::revocation::RevocationSet>);

impl KnownRevocations {
    pub fn apply(&self, r: &Revocation) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).apply(r);
    }
}

impl lattice_shared::tls::PeerCheck for KnownRevocations {
    fn check(&self, leaf: &CertInfo, issuer: Option<&CertInfo>) -> Result<(), String> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .check_cert(leaf, issuer)
    }
}

impl Agent {
    /// Applies one revocation: drops affected tokens (and those delegated
    /// from them), and forgets the whole identity (key, certificate,
    /// tokens) when it is the target.
    pub fn apply_revocation(&self, r: &Revocation) {
        use lattice_shared::revocation::Target;
        self.known.apply(r);
        let chain = self.chain();
        let issuer = lattice_shared::pki::inspect(&chain.intermediate)
            .ok()
            .and_then(|i| i.id);
        let issued_at =
            lattice_shared::clock::unix_secs(chain.info.not_before + lattice_shared::pki::BACKDATE);
        let me = match &r.target {
            Target::Agent(id) => id == &self.id,
            Target::CertSerial(s) => s == &chain.info.serial_hex,
            Target::Cache(id) => issuer.as_ref() == Some(id),
            Target::SubjectBefore {
                subject,
                issued_before_unix,
            } => {
                if subject == &self.id {
                    self.drop_tokens(|_, t| t.iat_unix < *issued_before_unix);
                }
                subject == &self.id && issued_at < *issued_before_unix
            }
            Target::Jti(j) => {
                self.drop_tokens(|jti, t| jti == j || t.parent_jtis.iter().any(|p| p == j));
                false
            }
            Target::SecretVersion { .. } => {
                self.invalidate_leases();
                false
            }
            Target::JoinToken(_) => false,
        };
        if me && !self.is_revoked() {
            self.forget(&r.target.to_string());
            tracing::warn!(agent_id = %self.id, target = %r.target, "this agent was revoked; identity and tokens forgotten");
        }
    }

    /// Serves the tokens read from the cache file: called once a verified
    /// checkpoint proves the revocations received complete (after the
    /// backlog), so that those revoked meanwhile are already gone.
    fn promote_loaded(&self) {
        let n = self.tokens().promote_loaded();
        if n > 0 {
            tracing::info!(agent_id = %self.id, tokens = n, "tokens from the cache file are served again");
        }
    }

    /// Drops every credential and erases the stored identity.
    fn forget(&self, why: &str) {
        {
            // The file goes under the lock: no save can write it again.
            let mut tokens = self.tokens();
            tokens.clear();
            let _ = std::fs::remove_file(token_cache::path(&self.cfg.data_dir));
        }
        self.cert.clear();
        identity_store::erase(&self.store);
        // Told before the flag flips: the runtime stops on the flag.
        self.emit(AgentEvent::IdentityRevoked(format!("revoked: {why}")));
        self.revoked.send_replace(true);
    }

    /// Checks a relayed checkpoint against the revocations received; on
    /// proof, serves the tokens loaded from disk.
    fn on_checkpoint(&self, proof: &mut Proof, cp: &pb::FreshnessCheckpoint) {
        let proved = {
            let known = self.known.0.read().unwrap_or_else(|p| p.into_inner());
            proof.on_checkpoint(
                cp,
                &self.bundle,
                &known,
                self.clock.monotonic(),
                self.clock.now_unix_ms(),
            )
        };
        match proved {
            Ok(_) => {
                metrics::counter!("lattice_agent_checkpoints_total", "outcome" => "fresh")
                    .increment(1);
                self.promote_loaded();
            }
            Err(e) => {
                metrics::counter!("lattice_agent_checkpoints_total", "outcome" => e.outcome())
                    .increment(1);
                tracing::debug!(agent_id = %self.id, error = %e, "checkpoint proves nothing");
            }
        }
    }

    /// Follows the cache's revocation stream until revoked or `stop`
    /// resolves, reconnecting with capped backoff (and moving to another
    /// cache when this one is down). The revocation chain carries over
    /// reconnects and failovers: it is the control plane's, not a cache's.
    pub async fn watch_revocations(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut after = 0u64;
        let mut proof = Proof::default();
        let mut backoff = Backoff::with(Duration::from_millis(50), Duration::from_secs(2), 0.0);
        while !self.is_revoked() {
            let at = self.current.load(Ordering::Acquire);
            let stream = self
                .client()
                .watch_revocations(pb::WatchRevocationsRequest { after_seq: after })
                .await;
            match stream {
                Ok(resp) => {
                    backoff.succeeded();
                    self.watching.send_replace(true);
                    let mut s = resp.into_inner();
                    loop {
                        // Heartbeats come every second: a silent stream is
                        // a dead link (no transport timeout covers it).
                        let msg = tokio::select! {
                            _ = &mut stop => return,
                            m = tokio::time::timeout(WATCH_SILENCE, s.message()) => m,
                        };
                        let Ok(Ok(Some(n))) = msg else {
                            tracing::warn!(agent_id = %self.id, "revocation stream ended or went silent; reconnecting");
                            break;
                        };
                        if self.current.load(Ordering::Acquire) != at {
                            // Failed over: follow the cache in use.
                            break;
                        }
                        match &n.revocation {
                            Some(wire) if n.seq > after => {
                                proof.on_revocation(n.seq, wire);
                                if let Ok(r) = Revocation::try_from(wire) {
                                    self.apply_revocation(&r);
                                }
                            }
                            Some(_) => {} // repeated on a resume
                            None => {
                                if let Some(cp) = &n.checkpoint {
                                    self.on_checkpoint(&mut proof, cp);
                                }
                            }
                        }
                        after = after.max(n.seq);
                        if self.is_revoked() {
                            return;
                        }
                    }
                    self.watching.send_replace(false);
                }
                Err(s) if worth_failover(&s) && self.endpoints.len() > 1 => {
                    if self.failover(at).await {
                        continue;
                    }
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(backoff.failed(Duration::ZERO)) => {}
            }
        }
    }
}
