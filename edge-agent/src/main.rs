//! `lattice-agent`: the edge agent as a command.

/// mimalloc instead of glibc's malloc (`BENCHMARKS.md`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Print a token on stdout, for scripts: from the running agent's
    /// Workload API when its socket is there, else straight from the cache.
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
    /// Delegate a token to a sub-agent (RFC 8693 token exchange at the
    /// cache) through the running agent's Workload API. The parent token is
    /// read from stdin (never from the command line); the delegated token
    /// is printed on stdout.
    Delegate {
        /// Name of the sub-agent that will act with the token.
        #[arg(long)]
        actor: String,
        /// Scope to keep (a subset of the parent's); repeat for several.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Lifetime in seconds (default and maximum: the parent's remaining).
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
    /// Run the agent: keep the identity and tokens fresh, follow
    /// revocations, fail over between caches, serve the Workload API (and
    /// the proxy when configured) until SIGINT or SIGTERM.
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
    lattice_shared::admission::start_process("lattice-agent");
    lattice_shared::tls::install_crypto_provider();
    match run(cfg, cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lattice-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The running agent's Workload API, if its socket is there.
async fn running_agent(
    cfg: &Config,
) -> Option<lattice_shared::proto::workload_client::WorkloadClient<tonic::transport::Channel>> {
    let path = cfg.workload.socket_path(&cfg.data_dir);
    if cfg.workload.disabled || !path.exists() {
        return None;
    }
    lattice_edge_agent::workload::connect(&path).await.ok()
}

async fn run(cfg: Config, command: Command) -> anyhow::Result<()> {
    use lattice_shared::proto as pb;
    match &command {
        Command::Token {
            audience,
            scopes,
            ttl_secs,
        } => {
            if let Some(mut w) = running_agent(&cfg).await {
                let t = w
                    .fetch_token(pb::WorkloadTokenRequest {
                        audience: audience.clone(),
                        scopes: scopes.clone(),
                        ttl_secs: ttl_secs.unwrap_or(0),
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
                    .into_inner();
                println!("{}", t.token);
                return Ok(());
            }
        }
        Command::Delegate {
            actor,
            scopes,
            ttl_secs,
        } => {
            let Some(mut w) = running_agent(&cfg).await else {
                anyhow::bail!(
                    "no running agent: delegation goes through `lattice-agent run` (its socket {} is absent)",
                    cfg.workload.socket_path(&cfg.data_dir).display()
                );
            };
            let mut parent = zeroize::Zeroizing::new(String::new());
            std::io::Read::read_to_string(
                &mut std::io::Read::take(std::io::stdin(), 16 * 1024),
                &mut parent,
            )?;
            let t = w
                .delegate(pb::WorkloadDelegateRequest {
                    subject_token: parent.trim().to_owned(),
                    actor: actor.clone(),
                    scopes: scopes.clone(),
                    ttl_secs: ttl_secs.unwrap_or(0),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
                .into_inner();
            eprintln!(
                "delegated to {actor}: jti {} depth {} until unix {}",
                t.jti, t.delegation_depth, t.expires_at_unix
            );
            println!("{}", t.token);
            return Ok(());
        }
        _ => {}
    }
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
            lattice_shared::telemetry::install_metrics(agent.config().metrics_listen)
                .map_err(anyhow::Error::msg)?;
            let agent = std::sync::Arc::new(agent);
            let socket = agent
                .config()
                .workload
                .socket_path(&agent.config().data_dir);
            let (ready_tx, ready) =
                tokio::sync::oneshot::channel::<lattice_edge_agent::runtime::Ready>();
            let id = agent.id.clone();
            let announce = async move {
                if let Ok(at) = ready.await {
                    let proxy = at
                        .proxy
                        .map(|p| format!("; proxy on http://{p}"))
                        .unwrap_or_default();
                    eprintln!(
                        "lattice-agent {id} running; workload API on {}{proxy}; Ctrl-C or SIGTERM to stop",
                        socket.display()
                    );
                }
            };
            let (r, ()) = tokio::join!(
                lattice_edge_agent::runtime::run(
                    agent,
                    Some(ready_tx),
                    lattice_shared::signal::shutdown_signal(),
                ),
                announce
            );
            r?;
        }
        Command::Delegate { .. } => unreachable!("handled above"),
    }
    Ok(())
}
