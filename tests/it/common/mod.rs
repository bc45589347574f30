//! Helpers shared by the integration tests.

pub mod procs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lattice::harness::{Lattice, Spec, TRUST_DOMAIN};
use lattice_shared::clock::{FakeClock, SharedClock};
use lattice_shared::id::{RegionId, TrustDomain};
use lattice_shared::pki::{PrivateKey, TrustBundle};
use lattice_shared::proto as pb;
use lattice_shared::proto::cache_client::CacheClient;
use lattice_shared::tls::{ExpectedServer, ReloadableCert};
use tonic::transport::Channel;

pub const AUDIENCE: &str = "https://api.example.com";

pub async fn lattice_with(spec: Spec) -> (Lattice, FakeClock) {
    let clock = FakeClock::new();
    let l = Lattice::start(spec, clock.shared())
        .await
        .expect("lattice starts");
    (l, clock)
}

/// Control plane, caches in eu and us, one agent in eu.
pub async fn lattice() -> (Lattice, FakeClock) {
    lattice_with(Spec::default()).await
}

pub fn bundle(l: &Lattice) -> Arc<TrustBundle> {
    let root = lattice_shared::pem::read_certs(&l.root_pem()).expect("root pem");
    Arc::new(
        TrustBundle::new(TrustDomain::new(TRUST_DOMAIN).expect("td"), root[0].clone())
            .expect("bundle"),
    )
}

/// A client to the cache at `addr` that presents `cert` (chain and key), or
/// nothing, and trusts the lattice's root.
pub fn raw_cache_client(
    l: &Lattice,
    clock: &SharedClock,
    addr: SocketAddr,
    region: &str,
    cert: Option<(Vec<Vec<u8>>, &PrivateKey)>,
) -> CacheClient<Channel> {
    let cert = cert.map(|(chain, key)| ReloadableCert::new(chain, key).expect("cert"));
    let tls = lattice_shared::tls::client_config(
        bundle(l),
        clock.clone(),
        ExpectedServer::CacheIn(RegionId::new(region).expect("region")),
        cert,
    )
    .expect("tls");
    CacheClient::new(lattice_shared::net::channel(addr, tls).expect("channel"))
}

pub fn mint_req(audience: &str) -> pb::MintTokenRequest {
    pb::MintTokenRequest {
        audience: audience.into(),
        scopes: vec!["read".into()],
        ttl_secs: 0,
        ..Default::default()
    }
}

pub const HOUR: Duration = Duration::from_secs(3600);

/// What a condition polled by [`eventually`] returns: `bool`, `Option<T>`
/// (done with `T`) or `Result<T, E>` (`E` describes the state not yet
/// reached; the last one is shown on timeout).
pub trait Settled {
    type Value;
    fn settled(self) -> Result<Self::Value, String>;
}

impl Settled for bool {
    type Value = ();
    fn settled(self) -> Result<(), String> {
        if self { Ok(()) } else { Err(String::new()) }
    }
}

impl<T> Settled for Option<T> {
    type Value = T;
    fn settled(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

impl<T, E: std::fmt::Display> Settled for Result<T, E> {
    type Value = T;
    fn settled(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

fn timed_out(what: &str, deadline: Duration, last: &str) -> ! {
    if last.is_empty() {
        panic!("{what}: not within {deadline:?}")
    }
    panic!("{what}: not within {deadline:?}; last seen: {last}")
}

/// Polls `cond` (on `tokio::time`, every 5 ms) until it settles and returns
/// its value; panics with `what` once `deadline` has passed. For states that
/// no event announces; where a watch channel or an `AgentEvent` exists, wait
/// on it instead.
pub async fn eventually<S: Settled>(
    what: &str,
    deadline: Duration,
    mut cond: impl AsyncFnMut() -> S,
) -> S::Value {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        match cond().await.settled() {
            Ok(v) => return v,
            Err(last) if tokio::time::Instant::now() >= end => timed_out(what, deadline, &last),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// [`eventually`] for the synchronous process tests, every 100 ms (each try
/// usually runs a command).
pub fn eventually_blocking<S: Settled>(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> S,
) -> S::Value {
    let end = std::time::Instant::now() + deadline;
    loop {
        match cond().settled() {
            Ok(v) => return v,
            Err(last) if std::time::Instant::now() >= end => timed_out(what, deadline, &last),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The verifier of a service that enrolled as agent `svc`, following its
/// current cache, once fresh.
pub async fn fresh_verifier(l: &Lattice, svc: usize) -> lattice_shared::verifier::Verifier {
    let client = l.agents[svc]
        .cache_client(Some(l.agents[svc].current_cache()))
        .expect("client");
    let cfg = lattice_shared::verifier::VerifierConfig {
        max_staleness: l.caches[0].app().max_staleness(),
        ..Default::default()
    };
    let v = lattice_shared::verifier::Verifier::start(client, bundle(l), l.clock.clone(), cfg)
        .await
        .expect("verifier starts");
    tokio::time::timeout(lattice::harness::WAIT, v.follower().wait_fresh())
        .await
        .expect("the verifier becomes fresh");
    v
}

/// Puts a secret as a custodian `carol` (for `regions`) and waits until
/// every cache has applied it.
pub async fn put_secret_applied(l: &Lattice, name: &str, value: &[u8], regions: &[&str]) {
    let mut custodian = l
        .admin(
            "carol",
            &[lattice_shared::policy::AdminRole::SecretCustodian],
            &[],
        )
        .expect("custodian");
    custodian
        .put_secret(pb::PutSecretRequest {
            name: name.into(),
            value: value.to_vec(),
            regions: regions.iter().map(|r| (*r).to_owned()).collect(),
            message: String::new(),
        })
        .await
        .expect("put");
    let head = l.cp().event_log().head();
    l.wait_all_applied(head).await.expect("applied");
}

/// The code and message of an agent call the cache refused.
pub fn refusal(e: &lattice_edge_agent::Error) -> (tonic::Code, String) {
    match e {
        lattice_edge_agent::Error::Refused { code, message } => (*code, message.clone()),
        other => panic!("expected a refusal, got {other}"),
    }
}
