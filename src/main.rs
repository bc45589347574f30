//! `lattice`: the operator CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use lattice_shared::proto as pb;

/// Lattice: short-lived credentials for AI agents, from a control plane
/// through regional caches to edge devices.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true, env = "LATTICE_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// Control-plane address.
    #[arg(long, env = "LATTICE_CONTROL_PLANE", default_value = "127.0.0.1:7443")]
    control_plane: SocketAddr,
    /// Directory with admin.crt, admin.key and root.crt (the control plane
    /// writes a bootstrap one to DATA/admin).
    #[arg(long, env = "LATTICE_ADMIN_DIR", default_value = "./data/cp/admin")]
    admin_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a whole local lattice (control plane, two caches, an edge agent)
    /// in a temporary directory and walk through enrolment and issuance.
    Dev {
        /// Exit 0 after the walkthrough instead of serving until Ctrl-C.
        #[arg(long)]
        exit_after_demo: bool,
        /// Keep data here instead of a temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// One-time join tokens for caches and agents.
    JoinToken {
        #[command(subcommand)]
        command: JoinTokenCommand,
    },
    /// Enrolled caches and outstanding join tokens.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Load commands.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum JoinTokenCommand {
    /// Create a token bound to one id; it is printed once.
    Create {
        /// spiffe://TD/cache/REGION/NAME or spiffe://TD/agent/REGION/NAME
        #[arg(long)]
        id: String,
        /// Lifetime, e.g. 10m, 1h (default: the control plane's, 10m).
        #[arg(long)]
        ttl: Option<humantime::Duration>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// MintToken vs the bare echo RPC at one cache over mTLS.
    Mint {
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The walkthrough and the benchmarks print their own story: warnings only.
    let level = match cli.command {
        Command::Dev { .. } | Command::Bench { .. } => "warn",
        _ => "info",
    };
    lattice_shared::telemetry::init_tracing(cli.log_json, level);
    lattice_shared::tls::install_crypto_provider();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lattice: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lattice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev {
            exit_after_demo,
            data_dir,
        } => {
            lattice::dev::run(lattice::dev::Options {
                exit_after_demo,
                data_dir,
            })
            .await
        }
        Command::JoinToken {
            command: JoinTokenCommand::Create { id, ttl, admin },
        } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .create_join_token(pb::CreateJoinTokenRequest {
                    id,
                    ttl_secs: ttl.map(|t| Duration::from(t).as_secs()).unwrap_or(0),
                })
                .await
                .map_err(|s| anyhow!("{} ({:?})", s.message(), s.code()))?
                .into_inner();
            eprintln!(
                "join token for {} (region {}), expires at unix {}; shown once:",
                r.id, r.region, r.expires_at_unix
            );
            println!("{}", r.token);
            Ok(())
        }
        Command::Status { admin } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .status(pb::StatusRequest {})
                .await
                .map_err(|s| anyhow!("{} ({:?})", s.message(), s.code()))?
                .into_inner();
            println!(
                "trust domain {}; {} outstanding join tokens",
                r.trust_domain, r.join_tokens_outstanding
            );
            println!(
                "{:<44} {:<8} {:>12} {:>14}",
                "cache", "region", "enrolled", "CA not after"
            );
            for c in r.caches {
                println!(
                    "{:<44} {:<8} {:>12} {:>14}",
                    c.cache_id, c.region, c.enrolled_at_unix, c.ca_not_after_unix
                );
            }
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Mint {
                    concurrency,
                    connections,
                    duration,
                },
        } => {
            let opts = lattice::bench::Options {
                concurrency,
                connections,
                duration: duration.into(),
                warmup: Duration::from_secs(2),
            };
            println!(
                "bench mint: {concurrency} in flight over {connections} mTLS connections, {duration} per phase"
            );
            let (echo, mint) = lattice::bench::mint(opts).await?;
            println!("{echo}\n{mint}");
            println!(
                "mint/echo throughput ratio: {:.2}",
                mint.rps / echo.rps.max(1.0)
            );
            Ok(())
        }
    }
}
