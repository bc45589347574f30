//! A compromised cache lies to the services that follow it: it holds back a
//! revocation and reports itself perfectly fresh. Its followers must go
//! stale within L (fail closed) instead of accepting the revoked token.
//!
//! The liar is what an attacker holding the eu cache's keys would run: a
//! server presenting that cache's certificate over real mTLS, relaying the
//! real cache's answers and rewriting its revocation stream.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use lattice::harness::{Lattice, WAIT};
use lattice_shared::proto as pb;
use lattice_shared::proto::cache_client::CacheClient;
use lattice_shared::proto::cache_server::{Cache, CacheServer};
use lattice_shared::revocation::Target;
use lattice_shared::verifier::{Verifier, VerifierConfig, VerifyError};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{A, SVC, spec};
use crate::common::*;

/// What the liar does to the stream it relays.
#[derive(Debug, Clone, Copy)]
enum Lie {
    /// Drops every revocation of this target's agent and says it is fresh.
    HoldBack,
    /// Passes revocations on but strips the control plane's checkpoints and
    /// says it is fresh.
    StripCheckpoints,
}

struct Liar {
    upstream: CacheClient<Channel>,
    hold_back: String,
    lie: Lie,
}

fn relay<T>(r: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
    r.map(|r| Response::new(r.into_inner()))
}

#[tonic::async_trait]
impl Cache for Liar {
    async fn enrol(
        &self,
        _: Request<pb::EnrolAgentRequest>,
    ) -> Result<Response<pb::EnrolAgentResponse>, Status> {
        Err(Status::unimplemented("liar"))
    }
    async fn issue_certificate(
        &self,
        _: Request<pb::IssueCertificateRequest>,
    ) -> Result<Response<pb::IssueCertificateResponse>, Status> {
        Err(Status::unimplemented("liar"))
    }
    async fn mint_token(
        &self,
        _: Request<pb::MintTokenRequest>,
    ) -> Result<Response<pb::MintTokenResponse>, Status> {
        Err(Status::unimplemented("liar"))
    }
    async fn jwks(
        &self,
        r: Request<pb::JwksRequest>,
    ) -> Result<Response<pb::JwksResponse>, Status> {
        relay(self.upstream.clone().jwks(r.into_inner()).await)
    }
    async fn ping(
        &self,
        _: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        Err(Status::unimplemented("liar"))
    }
    type WatchRevocationsStream =
        futures::stream::BoxStream<'static, Result<pb::RevocationNotice, Status>>;
    async fn watch_revocations(
        &self,
        r: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let real = self
            .upstream
            .clone()
            .watch_revocations(r.into_inner())
            .await?
            .into_inner();
        let (hold_back, lie) = (self.hold_back.clone(), self.lie);
        let lied = real.filter_map(move |n| futures::future::ready(lie_about(n, &hold_back, lie)));
        Ok(Response::new(lied.boxed()))
    }
    async fn lease_secret(
        &self,
        _: Request<pb::LeaseSecretRequest>,
    ) -> Result<Response<pb::LeaseSecretResponse>, Status> {
        Err(Status::unimplemented("liar"))
    }
    async fn exchange_token(
        &self,
        _: Request<pb::ExchangeTokenRequest>,
    ) -> Result<Response<pb::ExchangeTokenResponse>, Status> {
        Err(Status::unimplemented("liar"))
    }
    async fn report_audit(
        &self,
        _: Request<pb::ReportAuditRequest>,
    ) -> Result<Response<pb::ReportAuditResponse>, Status> {
        Err(Status::unimplemented("liar"))
    }
    async fn report_claims(
        &self,
        _: Request<pb::ReportClaimsRequest>,
    ) -> Result<Response<pb::ReportClaimsResponse>, Status> {
        Err(Status::unimplemented("liar"))
    }
}

/// The liar's rewrite of one notice from the real cache.
fn lie_about(
    n: Result<pb::RevocationNotice, Status>,
    hold_back: &str,
    lie: Lie,
) -> Option<Result<pb::RevocationNotice, Status>> {
    let mut n = match n {
        Ok(n) => n,
        Err(s) => return Some(Err(s)),
    };
    let held = n.revocation.as_ref().is_some_and(|r| {
        matches!(lie, Lie::HoldBack)
            && lattice_shared::revocation::Revocation::try_from(r)
                .is_ok_and(|r| r.target.to_string().contains(hold_back))
    });
    if held {
        return None;
    }
    n.cache_staleness_ms = 0;
    if matches!(lie, Lie::StripCheckpoints) {
        n.checkpoint = None;
    }
    Some(Ok(n))
}

/// Starts the liar on a port of its own, presenting the eu cache's
/// certificate and relaying from the real eu cache as agent `svc`.
async fn start_liar(l: &Lattice, lie: Lie) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    let eu = &l.caches[0];
    let upstream = l.agents[SVC].cache_client(Some(eu.addr())).expect("client");
    let liar = Liar {
        upstream,
        hold_back: l.agents[A].id.to_string(),
        lie,
    };
    let tls = lattice_shared::tls::server_config(
        bundle(l),
        l.clock.clone(),
        eu.app().server_cert(),
        None,
    )
    .expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (kill, kill_rx) = tokio::sync::watch::channel(false);
    let incoming = lattice_shared::net::tls_incoming(listener, tls, kill_rx);
    let mut stop = kill.subscribe();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(CacheServer::new(liar))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
    });
    (addr, kill)
}

/// A service's verifier following the liar.
async fn follow_liar(l: &Lattice, liar: SocketAddr) -> Verifier {
    let client = l.agents[SVC].cache_client(Some(liar)).expect("client");
    let cfg = VerifierConfig {
        max_staleness: l.caches[0].app().max_staleness(),
        ..Default::default()
    };
    Verifier::start(client, bundle(l), l.clock.clone(), cfg)
        .await
        .expect("the verifier starts on the liar")
}

#[tokio::test]
async fn a_cache_that_holds_back_a_revocation_leaves_its_followers_stale_within_l() {
    let (l, clock) = lattice_with(spec()).await;
    let honest = fresh_verifier(&l, SVC).await;
    let (liar, _kill) = start_liar(&l, Lie::HoldBack).await;
    let v = follow_liar(&l, liar).await;
    // Before the revocation the liar has nothing to hide: its followers are
    // fresh from what it relays.
    tokio::time::timeout(WAIT, v.follower().wait_fresh())
        .await
        .expect("fresh through the liar while it relays everything");
    let t = l.agents[A].mint(AUDIENCE, &[], None).await.expect("mint");
    v.verify(&t.token, AUDIENCE).await.expect("verifies");

    let ev = l
        .revoke(Target::Agent(l.agents[A].id.clone()))
        .expect("revoke");
    l.caches[0].wait_applied(ev.seq).await.expect("eu applied");
    tokio::time::timeout(WAIT, honest.follower().wait_applied(ev.seq))
        .await
        .expect("the honest follower hears of it");
    let e = honest
        .verify(&t.token, AUDIENCE)
        .await
        .expect_err("revoked");
    assert!(matches!(e, VerifyError::Revoked(_)), "{e}");

    // Past L after the revocation, nothing the liar can say makes its
    // followers fresh: they refuse as stale rather than accept.
    clock.advance(v.follower().max_staleness() + Duration::from_millis(1));
    let e = v
        .verify(&t.token, AUDIENCE)
        .await
        .expect_err("not accepted");
    assert!(matches!(e, VerifyError::Stale { .. }), "{e}");
    // And it stays so while the liar goes on relaying heartbeats.
    let mut status = v.follower().subscribe();
    for _ in 0..3 {
        status.borrow_and_update();
        tokio::time::timeout(WAIT, status.changed())
            .await
            .expect("the liar keeps sending")
            .expect("follower running");
        let e = v
            .verify(&t.token, AUDIENCE)
            .await
            .expect_err("still refused");
        assert!(matches!(e, VerifyError::Stale { .. }), "{e}");
    }
    l.shutdown().await;
}

#[tokio::test]
async fn a_cache_that_vouches_without_checkpoints_never_makes_a_follower_fresh() {
    let (l, _clock) = lattice_with(spec()).await;
    let (liar, _kill) = start_liar(&l, Lie::StripCheckpoints).await;
    let v = follow_liar(&l, liar).await;
    let t = l.agents[A].mint(AUDIENCE, &[], None).await.expect("mint");
    let mut status = v.follower().subscribe();
    for _ in 0..3 {
        status.borrow_and_update();
        tokio::time::timeout(WAIT, status.changed())
            .await
            .expect("the liar keeps sending")
            .expect("follower running");
        let e = v.verify(&t.token, AUDIENCE).await.expect_err("never fresh");
        assert!(matches!(e, VerifyError::Stale { .. }), "{e}");
    }
    l.shutdown().await;
}
