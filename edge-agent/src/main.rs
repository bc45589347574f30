//! `lattice-agent`: the edge agent as a command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lattice_edge_agent::{Agent, Config, Deps};

/// Lattice edge agent: device identity and short-lived credentials.
///
/// Configuration comes from defaults, then the TOML file, then environment
/// variables prefixed LATTICE_AGENT_ (e.g. LATTICE_AGENT_JOIN_TOKEN=ljt_...).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file (see deploy/edge-agent.toml).
    #[arg(long, short, global = true, env = "LATTICE_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enrol (if needed) and print the agent's identity.
    Enrol,
    /// Print a fresh token on stdout, for scripts.
    Token {
        /// Audience of the token (`aud`).
        #[arg(long)]
        audience: String,
        /// Scope to request; repeat for several.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Lifetime in seconds (default: the cache's default).
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
    /// Lease an upstream secret and print its value on stdout, for scripts
    /// (lease id and expiry on stderr). Nothing is kept on disk.
    Secret {
        name: String,
        /// A version other than the active one (e.g. the previous one).
        #[arg(long)]
        version: Option<u64>,
        /// Lease lifetime in seconds (default: the cache's; at most 900).
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
    /// Keep the identity fresh until interrupted.
    Run,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg: Config = match lattice_shared::config::load_or_exit(
        "lattice-agent",
        cli.config.as_deref(),
        "LATTICE_AGENT_",
        |c: &Config| c.validate().map(|_| ()),
    ) {
        Ok(c) => c,
        Err(code) => return code,
    };
    lattice_shared::telemetry::init_tracing(cfg.log_json, "info");
    lattice_shared::tls::install_crypto_provider();
    match run(cfg, cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lattice-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config, command: Command) -> anyhow::Result<()> {
    let store = lattice_shared::store::SledStore::open(&cfg.data_dir.join("db"))?;
    let vault = lattice_shared::seal::LocalKeyFile::open_or_create(&cfg.data_dir.join("kek.key"))?;
    let agent = Agent::start(
        cfg,
        Deps {
            clock: lattice_shared::clock::SystemClock::shared(),
            store,
            vault: std::sync::Arc::new(vault),
        },
    )
    .await?;
    match command {
        Command::Enrol => {
            println!(
                "{} (certificate valid until unix {})",
                agent.id,
                agent.not_after_unix()
            );
        }
        Command::Token {
            audience,
            scopes,
            ttl_secs,
        } => {
            agent.renew_if_due().await?;
            let t = agent
                .mint(&audience, &scopes, ttl_secs.map(Duration::from_secs))
                .await?;
            println!("{}", t.token);
        }
        Command::Secret {
            name,
            version,
            ttl_secs,
        } => {
            use std::io::Write as _;
            agent.renew_if_due().await?;
            let lease = agent
                .lease_secret(
                    &name,
                    version.unwrap_or(0),
                    ttl_secs.map(Duration::from_secs),
                )
                .await?;
            eprintln!(
                "{name} v{} lease {} until unix {} (fingerprint {})",
                lease.version, lease.lease_id, lease.expires_at_unix, lease.fingerprint
            );
            let mut out = std::io::stdout().lock();
            out.write_all(&lease.value)?;
            out.flush()?;
        }
        Command::Run => {
            eprintln!("lattice-agent {} running; Ctrl-C to stop", agent.id);
            agent
                .run_until(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await;
        }
    }
    Ok(())
}
