//! A tiny HTTP service that accepts only lattice tokens, checked with the
//! shared verifier (`lattice_shared::verifier`): `GET /` with
//! `Authorization: Bearer <jwt>` answers 200 and the token's subject, 401 for
//! a missing, bad or revoked token, and 503 while the verifier cannot prove it
//! knows every revocation (stale: fail closed, as the caches do).
//!
//! To follow revocations the service needs a lattice identity: it enrols at
//! the cache as an agent, once, with a join token.
//!
//! ```text
//! lattice join-token create --id spiffe://lattice.local/agent/eu/verify-service
//! LATTICE_AGENT_JOIN_TOKEN=... cargo run --example verify_service -- \
//!     --cache 127.0.0.1:8443 --root-ca data/cp/root.crt --audience https://api.example.com
//! curl -H "Authorization: Bearer $(lattice-agent token ...)" http://127.0.0.1:8080/
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use clap::Parser;
use lattice_edge_agent as agent;
use lattice_shared::clock::SystemClock;
use lattice_shared::pki::TrustBundle;
use lattice_shared::verifier::{Verifier, VerifierConfig};

/// Answers `GET /` for holders of a valid, unrevoked lattice token.
#[derive(Debug, Parser)]
struct Args {
    /// The regional cache to fetch keys from and follow revocations of.
    #[arg(long)]
    cache: SocketAddr,
    /// PEM file with the lattice's root CA certificate.
    #[arg(long)]
    root_ca: PathBuf,
    /// The audience tokens must name (`aud`).
    #[arg(long)]
    audience: String,
    /// This service's identity, an agent id of the cache's region.
    #[arg(long, default_value = "spiffe://lattice.local/agent/eu/verify-service")]
    id: String,
    /// Where the enrolled identity is kept (sealed).
    #[arg(long, default_value = "./data/verify-service")]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

#[derive(Clone)]
struct App {
    verifier: Verifier,
    audience: Arc<str>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    lattice_shared::telemetry::init_tracing(false, "info");
    lattice_shared::tls::install_crypto_provider();
    let clock = SystemClock::shared();

    // Enrol (or load the stored identity), and keep it renewed.
    let cfg = agent::Config {
        id: args.id.parse()?,
        cache: args.cache,
        data_dir: args.data_dir.clone(),
        root_ca: args.root_ca.clone(),
        // One-time join token for the first start only: from the
        // environment, never from argv (visible in `ps`).
        join_token: std::env::var("LATTICE_AGENT_JOIN_TOKEN")
            .ok()
            .map(lattice_shared::secret::Secret::new),
        ..agent::Config::default()
    };
    let deps = agent::Deps {
        clock: clock.clone(),
        store: lattice_shared::store::SledStore::open(&args.data_dir.join("db"))?,
        vault: Arc::new(lattice_shared::seal::LocalKeyFile::open_or_create(
            &args.data_dir.join("kek.key"),
        )?),
    };
    let me = Arc::new(agent::Agent::start(cfg, deps).await?);
    tokio::spawn({
        let me = me.clone();
        async move { me.run_until(std::future::pending()).await }
    });

    let root = lattice_shared::pem::read_certs(&args.root_ca)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .next()
        .context("the root CA file holds no certificate")?;
    let bundle = Arc::new(TrustBundle::new(me.id.trust_domain().clone(), root)?);
    let verifier = Verifier::start(
        me.cache_client(Some(me.current_cache()))?,
        bundle,
        clock,
        VerifierConfig::default(),
    )
    .await?;

    let app = axum::Router::new()
        .route("/", axum::routing::get(hello))
        .with_state(App {
            verifier,
            audience: args.audience.into(),
        });
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %args.listen, "serving");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn hello(State(app): State<App>, headers: HeaderMap) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return unauthorized("a bearer token is required".into());
    };
    match app.verifier.verify(token, &app.audience).await {
        Ok(claims) => (StatusCode::OK, format!("hello, {}\n", claims.sub)).into_response(),
        // Not the token's fault: the caller may retry.
        Err(e) if e.is_unavailable() => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
        }
        Err(e) => unauthorized(e.to_string()),
    }
}

fn unauthorized(why: String) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"")],
        format!("{why}\n"),
    )
        .into_response()
}
