//! Which cache the agent talks to: the caches of its region in configured
//! order, failover to the next one that serves, fail-back to an earlier
//! one, and [`Agent::call`], one request with one retry elsewhere.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lattice_shared::clock::SharedClock;
use lattice_shared::id::RegionId;
use lattice_shared::pki::TrustBundle;
use lattice_shared::proto::{self as pb, cache_client::CacheClient};
use lattice_shared::tls::{ExpectedServer, ReloadableCert};
use tonic::transport::Channel;

use crate::revocations::KnownRevocations;
use crate::{Agent, AgentEvent, Error};

/// How long a health probe of a cache may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors worth trying another cache for: the cache is down, stopping or
/// stale.
pub(crate) fn worth_failover(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    )
}

/// A client of the cache at `addr` presenting `cert`, trusting only a cache
/// of `region` that none of the `known` revocations covers.
pub(crate) fn new_client(
    addr: SocketAddr,
    bundle: &Arc<TrustBundle>,
    clock: &SharedClock,
    region: &RegionId,
    cert: &Arc<ReloadableCert>,
    known: &Arc<KnownRevocations>,
) -> Result<CacheClient<Channel>, Error> {
    let tls = lattice_shared::tls::client_config_checked(
        bundle.clone(),
        clock.clone(),
        ExpectedServer::CacheIn(region.clone()),
        Some(cert.clone()),
        Some(known.clone()),
    )?;
    let ch =
        lattice_shared::net::channel(addr, tls).map_err(|e| Error::Transport(e.to_string()))?;
    Ok(CacheClient::new(ch))
}

impl Agent {
    pub(crate) fn client(&self) -> CacheClient<Channel> {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The cache requests go to now.
    pub fn current_cache(&self) -> SocketAddr {
        self.endpoints[self
            .current
            .load(Ordering::Acquire)
            .min(self.endpoints.len() - 1)]
    }

    pub(crate) fn client_for(&self, addr: SocketAddr) -> Result<CacheClient<Channel>, Error> {
        new_client(
            addr,
            &self.bundle,
            &self.clock,
            &self.region,
            &self.cert,
            &self.known,
        )
    }

    /// Whether the cache at `addr` answers and can serve now.
    async fn probe(&self, addr: SocketAddr) -> bool {
        let Ok(mut c) = self.client_for(addr) else {
            return false;
        };
        let ping = c.ping(pb::PingRequest { payload: vec![] });
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, ping).await,
            Ok(Ok(r)) if r.get_ref().serving
        )
    }

    fn switch_to(&self, i: usize) -> Result<(), Error> {
        let client = self.client_for(self.endpoints[i])?;
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = client;
        let before = self.current.swap(i, Ordering::AcqRel);
        if before != i {
            metrics::counter!("lattice_agent_failovers_total").increment(1);
            tracing::warn!(agent_id = %self.id, from = %self.endpoints[before.min(self.endpoints.len() - 1)], to = %self.endpoints[i], "switched cache");
            self.emit(AgentEvent::CacheChanged(self.endpoints[i]));
        }
        Ok(())
    }

    /// Moves to the first cache in configured order that answers and
    /// serves, trying the failing one (`failed`) last. Returns whether the
    /// cache in use changed.
    pub async fn failover(&self, failed: usize) -> bool {
        let _one = self.failing_over.lock().await;
        let now = self.current.load(Ordering::Acquire);
        if now != failed {
            return true; // someone else already moved
        }
        let order = (0..self.endpoints.len())
            .filter(|i| *i != failed)
            .chain(std::iter::once(failed));
        for i in order {
            if self.probe(self.endpoints[i]).await {
                return self.switch_to(i).is_ok() && i != failed;
            }
        }
        false
    }

    /// Moves back to an earlier cache in the configured order once it
    /// serves again (the runtime calls this now and then).
    pub async fn fail_back(&self) -> bool {
        let now = self.current.load(Ordering::Acquire);
        for i in 0..now {
            if self.probe(self.endpoints[i]).await {
                let _one = self.failing_over.lock().await;
                return self.switch_to(i).is_ok();
            }
        }
        false
    }

    /// Runs one call (`f` sends `req` on a client) at the cache in use,
    /// moving to the next serving cache and trying once more when this one
    /// is down, stopping or stale.
    pub async fn call<R, T, F, Fut>(&self, req: R, f: F) -> Result<T, Error>
    where
        R: Clone,
        F: Fn(CacheClient<Channel>, R) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let at = self.current.load(Ordering::Acquire);
        match f(self.client(), req.clone()).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) if worth_failover(&s) && self.endpoints.len() > 1 => {
                if self.failover(at).await {
                    Ok(f(self.client(), req).await?.into_inner())
                } else {
                    Err(s.into())
                }
            }
            Err(s) => Err(s.into()),
        }
    }

    /// A client for raw calls (benchmarks, tests) presenting this agent's
    /// certificate: on the shared connection when `at` is `None`, else on a
    /// new connection of its own to the cache at `at`.
    pub fn cache_client(&self, at: Option<SocketAddr>) -> Result<CacheClient<Channel>, Error> {
        match at {
            None => Ok(self.client()),
            Some(addr) => self.client_for(addr),
        }
    }
}
