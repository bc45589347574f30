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
    #[arg(
        long,
        global = true,
        env = "LATTICE_CONTROL_PLANE",
        default_value = "127.0.0.1:7443"
    )]
    control_plane: SocketAddr,
    /// Directory with admin.crt, admin.key and root.crt (the control plane
    /// writes a bootstrap one to DATA/admin).
    #[arg(
        long,
        global = true,
        env = "LATTICE_ADMIN_DIR",
        default_value = "./data/cp/admin"
    )]
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
    /// Revoke an agent, a token, a certificate, everything of a subject
    /// issued before a time, a cache or a join token. Prints the sequence
    /// number once the revocation is durable at the control plane.
    Revoke {
        #[command(subcommand)]
        target: RevokeTarget,
        /// Why (kept in the log; no secrets).
        #[arg(long, global = true, default_value = "")]
        reason: String,
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
enum RevokeTarget {
    /// An agent id: it can no longer mint, renew or enrol.
    Agent { id: String },
    /// One token, by `jti`.
    Token { jti: String },
    /// One certificate, by hex serial.
    Cert { serial: String },
    /// Every credential of an agent issued before a time.
    Before {
        #[arg(long)]
        subject: String,
        /// Unix seconds, or `now`.
        #[arg(long, default_value = "now")]
        time: String,
    },
    /// A cache: its keys leave every JWKS and its intermediate CA is refused.
    Cache { id: String },
    /// A join token (hashed here; the token itself is not sent).
    JoinToken { token: String },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Revocation propagation: commit at the control plane → applied at
    /// every cache, for each cache count given.
    Propagation {
        #[arg(long, value_delimiter = ',', default_value = "2,8,32")]
        caches: Vec<usize>,
        #[arg(long, default_value_t = 200)]
        revocations: usize,
    },
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
        Command::Dev { .. } | Command::Bench { .. } => "error",
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
            print!("{}", lattice::admin::render_status(&r, now_ms()));
            Ok(())
        }
        Command::Revoke {
            target,
            reason,
            admin,
        } => {
            use pb::revocation::Target as T;
            let target = match target {
                RevokeTarget::Agent { id } => T::AgentId(id),
                RevokeTarget::Token { jti } => T::Jti(jti),
                RevokeTarget::Cert { serial } => T::CertSerial(serial),
                RevokeTarget::Before { subject, time } => {
                    // `now` (0 on the wire) is read from the control plane's
                    // clock at commit, not from this workstation's.
                    let issued_before_unix = if time == "now" {
                        0
                    } else {
                        time.parse()
                            .map_err(|_| anyhow!("--time takes unix seconds or `now`"))?
                    };
                    T::SubjectBefore(pb::SubjectBefore {
                        subject,
                        issued_before_unix,
                    })
                }
                RevokeTarget::Cache { id } => T::CacheId(id),
                RevokeTarget::JoinToken { token } => T::JoinTokenSha256(
                    lattice_shared::pki::sha256(token.trim().as_bytes()).to_vec(),
                ),
            };
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .revoke(pb::RevokeRequest {
                    revocation: Some(pb::Revocation {
                        target: Some(target),
                        reason,
                    }),
                })
                .await
                .map_err(|s| anyhow!("{} ({:?})", s.message(), s.code()))?
                .into_inner();
            eprintln!(
                "revocation committed durably; caches enforce it within their staleness bound"
            );
            println!("{}", r.seq);
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Propagation {
                    caches,
                    revocations,
                },
        } => {
            println!(
                "bench propagation: {revocations} revocations, one at a time, per cache count"
            );
            for n in caches {
                if n == 0 || n > 256 {
                    anyhow::bail!("--caches takes counts from 1 to 256");
                }
                println!("{}", lattice::bench::propagation(n, revocations).await?);
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
