//! `lattice-cache`: a regional cache as a standalone process.

/// mimalloc instead of glibc's malloc (`BENCHMARKS.md`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lattice_regional_cache::{App, Config, Deps};

/// Lattice regional cache: enrols agents of its region, renews their
/// certificates and mints short-lived tokens.
///
/// Configuration comes from defaults, then the TOML file, then environment
/// variables prefixed LATTICE_CACHE_ (e.g. LATTICE_CACHE_JOIN_TOKEN=ljt_...).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file (see deploy/regional-cache.toml).
    #[arg(long, short, env = "LATTICE_CACHE_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg: Config = match lattice_shared::config::load_or_exit(
        "lattice-cache",
        cli.config.as_deref(),
        "LATTICE_CACHE_",
        |c: &Config| c.validate().map(|_| ()),
    ) {
        Ok(c) => c,
        Err(code) => return code,
    };
    lattice_shared::telemetry::init_tracing(cfg.log_json, "info");
    lattice_shared::admission::start_process("lattice-cache");
    lattice_shared::tls::install_crypto_provider();
    match run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lattice-cache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    lattice_shared::telemetry::install_metrics(cfg.metrics_listen).map_err(anyhow::Error::msg)?;
    let store = lattice_shared::store::SledStore::open(&cfg.data_dir.join("db"))?;
    let vault = lattice_shared::seal::LocalKeyFile::open_or_create(&cfg.data_dir.join("kek.key"))?;
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let app = App::build(
        cfg,
        Deps {
            clock: lattice_shared::clock::SystemClock::shared(),
            store,
            vault: std::sync::Arc::new(vault),
            listener,
            audit: None,
        },
    )
    .await?;
    eprintln!(
        "lattice-cache {} listening on {} (JWKS at https://{}/.well-known/jwks.json)",
        app.id(),
        app.local_addr(),
        app.local_addr()
    );
    lattice_shared::signal::shutdown_signal().await;
    tracing::info!("signal received; shutting down");
    app.shutdown().await;
    Ok(())
}
