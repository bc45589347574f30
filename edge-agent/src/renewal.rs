//! Certificate renewal: a fresh key and certificate from the cache at
//! half-life, less a random early share (jitter) so that a fleet does not
//! renew in step.

use std::sync::Arc;

use lattice_shared::backoff::random_fraction;
use lattice_shared::clock::past_half_life;
use lattice_shared::pki::PrivateKey;
use lattice_shared::proto as pb;

use crate::{Agent, AgentEvent, Error, identity_store, runtime, token_cache};

impl Agent {
    /// When the certificate should be renewed: half-life, minus this
    /// certificate's random early share (jitter).
    pub fn renewal_due_unix(&self) -> i64 {
        let info = self.chain().info;
        let nb = lattice_shared::clock::unix_secs(info.not_before);
        let na = lattice_shared::clock::unix_secs(info.not_after);
        let early = *self.renew_early.lock().unwrap_or_else(|p| p.into_inner());
        let life = (na - nb) as f64;
        nb + (life * (0.5 - early)) as i64
    }

    /// Renews the certificate with a fresh key once it is due (past
    /// half-life, less jitter).
    pub async fn renew_if_due(&self) -> Result<bool, Error> {
        let info = self.chain().info;
        if self.clock.now_unix() < self.renewal_due_unix()
            && !past_half_life(self.clock.now(), info.not_before, info.not_after)
        {
            return Ok(false);
        }
        if self.is_revoked() {
            return Err(Error::Revoked);
        }
        let key = PrivateKey::generate_p256()?;
        let req = pb::IssueCertificateRequest {
            csr: key.csr_der()?,
            claims: Some(self.claims()),
        };
        let resp = self
            .call(req, |mut c, r| async move { c.issue_certificate(r).await })
            .await?;
        let c = resp
            .chain
            .ok_or_else(|| Error::Corrupt("no chain in response".into()))?;
        let chain = identity_store::verify_chain(
            &self.bundle,
            &self.id,
            &self.clock,
            c.leaf,
            c.intermediate,
        )?;
        identity_store::persist(&self.store, &self.vault, Some(&key), &chain)?;
        self.cert
            .replace(vec![chain.leaf.clone(), chain.intermediate.clone()], &key)?;
        {
            let mut tokens = self.tokens();
            if tokens.cache_key.is_some() {
                tokens.cache_key = Some(token_cache::CacheKey::derive(&key.pkcs8_der()));
            }
        }
        if let Err(e) = self.save_token_cache() {
            tracing::warn!(error = %e, "re-sealing the token cache failed");
        }
        // New connections present the new certificate.
        let client = self.client_for(self.current_cache())?;
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = client;
        tracing::info!(agent_id = %self.id, not_after = ?chain.info.not_after, "certificate renewed");
        *self.chain.write().unwrap_or_else(|p| p.into_inner()) = chain;
        *self.renew_early.lock().unwrap_or_else(|p| p.into_inner()) =
            random_fraction() * self.cfg.renewal.jitter;
        metrics::counter!("lattice_agent_renewals_total").increment(1);
        self.emit(AgentEvent::CertificateRenewed);
        Ok(true)
    }

    /// Keeps the certificate fresh and follows revocations until `stop`
    /// resolves or the agent is revoked (no Workload API; see
    /// [`runtime::run`] for the whole runtime).
    pub async fn run_until(self: &Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        runtime::keep_fresh(self, stop).await;
    }

    /// When the current certificate expires.
    pub fn not_after_unix(&self) -> i64 {
        lattice_shared::clock::unix_secs(self.chain().info.not_after)
    }
}
