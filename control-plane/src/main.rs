//! `lattice-cp`: the control plane as a standalone process.

/// mimalloc instead of glibc's malloc (`BENCHMARKS.md`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lattice_control_plane::{App, Config, Deps};

/// Lattice control plane: root CA, join tokens, cache registry.
///
/// Configuration comes from defaults, then the TOML file, then environment
/// variables prefixed LATTICE_CP_ (e.g. LATTICE_CP_LISTEN=0.0.0.0:7443).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file (see deploy/control-plane.toml).
    #[arg(long, short, env = "LATTICE_CP_CONFIG")]
    config: Option<PathBuf>,
    /// Mint the bootstrap admin credential again (DATA_DIR/admin). It is
    /// minted once, at the first start, and never again without this flag;
    /// refused while its certificate is revoked.
    #[arg(long)]
    reissue_bootstrap: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut cfg: Config = match lattice_shared::config::load_or_exit(
        "lattice-cp",
        cli.config.as_deref(),
        "LATTICE_CP_",
        |c: &Config| c.validate().map(|_| ()),
    ) {
        Ok(c) => c,
        Err(code) => return code,
    };
    cfg.reissue_bootstrap = cli.reissue_bootstrap;
    lattice_shared::telemetry::init_tracing(cfg.log_json, "info");
    lattice_shared::admission::start_process("lattice-cp");
    lattice_shared::tls::install_crypto_provider();
    match run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "control plane stopped");
            eprintln!("lattice-cp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    lattice_shared::telemetry::install_metrics(cfg.metrics_listen).map_err(anyhow::Error::msg)?;
    let data = lattice_control_plane::install::open_data_dir(&cfg.data_dir)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let app = App::build(
        cfg,
        Deps {
            clock: lattice_shared::clock::SystemClock::shared(),
            store: data.store,
            vault: data.vault,
            listener,
            install: data.install,
        },
    )
    .await?;
    eprintln!(
        "lattice-cp listening on {}; root certificate {}; admin credential in {}",
        app.local_addr(),
        app.root_pem_path().display(),
        app.admin_files().dir.display()
    );
    lattice_shared::signal::shutdown_signal().await;
    tracing::info!("signal received; shutting down");
    app.shutdown().await;
    Ok(())
}
