//! `lattice`: the operator CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use lattice_shared::clock::unix_millis;
use lattice_shared::proto as pb;

/// mimalloc instead of glibc's malloc: the per-request allocations of
/// tonic, rustls and Cedar were a fifth of a decision's time and the source
/// of its latency spikes (`BENCHMARKS.md`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod audit_cmd;
mod report_cmd;
mod secret_cmd;

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
pub(crate) struct AdminArgs {
    /// Control-plane address.
    #[arg(
        long,
        global = true,
        env = "LATTICE_CONTROL_PLANE",
        default_value = "127.0.0.1:7443"
    )]
    pub(crate) control_plane: SocketAddr,
    /// Directory with admin.crt, admin.key and root.crt (the control plane
    /// writes a bootstrap one to DATA/admin).
    #[arg(
        long,
        global = true,
        env = "LATTICE_ADMIN_DIR",
        default_value = "./data/cp/admin"
    )]
    pub(crate) admin_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a whole local lattice (control plane, two caches, an edge agent)
    /// in a temporary directory and walk through enrolment, policy, issuance
    /// and revocation.
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
    /// Enrolled caches (applied sequence, staleness, policy version) and
    /// outstanding join tokens.
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
    /// Policy as code: validate and test bundles here, diff them against the
    /// version in force, push, list history, roll back.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Approve another admin's request (two-person rule); it runs at once.
    Approve {
        /// The id printed when the request was made (see `lattice pending`).
        request_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Grant an enrolled cache custody of its region's secrets (Cedar action
    /// HoldSecret, a custodian's decision): until then it serves tokens and
    /// leases nothing.
    GrantCustody {
        /// spiffe://TD/cache/REGION/NAME
        cache_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Requests waiting for a second admin.
    Pending {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Admin certificates, which carry the holder's roles.
    AdminCert {
        #[command(subcommand)]
        command: AdminCertCommand,
    },
    /// Upstream secrets (API keys): put, list, versions, rollback, rotate,
    /// rekey, revoke-version, delete. Values never come from the command line.
    Secret {
        #[command(subcommand)]
        command: secret_cmd::SecretCommand,
    },
    /// The tamper-evident audit log: verify, tail, query, proofs.
    Audit {
        #[command(subcommand)]
        command: audit_cmd::AuditCommand,
    },
    /// Evidence: who the policy allows and who used each audience and
    /// secret, from the audit log under a signed tree head.
    Report {
        #[command(subcommand)]
        command: ReportCommand,
    },
    /// Alerts of the detection rules (rate spikes, new sources, use after
    /// revocation, denial bursts, honeytokens).
    Alerts {
        #[command(subcommand)]
        command: audit_cmd::AlertsCommand,
    },
    /// The KMS that wraps secrets' DEKs.
    Kms {
        #[command(subcommand)]
        command: secret_cmd::KmsCommand,
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
enum PolicyCommand {
    /// Parse a bundle and validate it against its schema (offline).
    Validate { dir: PathBuf },
    /// Validate a bundle and run its test cases (offline).
    Test { dir: PathBuf },
    /// What would change: DIR against the version in force, or against
    /// another directory with --against (offline).
    Diff {
        dir: PathBuf,
        #[arg(long)]
        against: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Validate, test, sign and release DIR to every cache. Under a
    /// two-person rule it waits for `lattice approve`.
    Push {
        dir: PathBuf,
        /// Why (kept with the version).
        #[arg(long, short, default_value = "")]
        message: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Every version released, the one in force marked `*`.
    History {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Release the bundle of an earlier version again, as a new version.
    Rollback {
        version: u64,
        #[arg(long, short, default_value = "")]
        message: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCertCommand {
    /// Issue a certificate for another admin. The key is generated here and
    /// written with the certificate to --out (key mode 0600).
    Issue {
        /// spiffe://TD/admin/NAME
        #[arg(long)]
        id: String,
        /// platform-admin, secret-custodian, regional-operator or auditor;
        /// repeat for several.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Regions of a regional operator; repeat for several.
        #[arg(long = "region")]
        regions: Vec<String>,
        /// Where to write admin.key, admin.crt and root.crt.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime (default: the control plane's).
        #[arg(long)]
        ttl: Option<humantime::Duration>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ReportCommand {
    /// For every audience and secret: the agents the policy in force allows
    /// (neutral context) and those that used it in the last --days, with
    /// the signed tree head it was computed at.
    Access {
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// CSV instead of JSON.
        #[arg(long)]
        csv: bool,
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
    /// Every credential of an agent or admin issued before a time.
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
    /// Policy decision cost with a generated bundle of N context-aware
    /// policies: cold (an agent's first request), uncached (a known agent,
    /// a new request) and through the decision cache.
    Policy {
        #[arg(long, default_value_t = 200)]
        policies: usize,
        #[arg(long, default_value_t = 50_000)]
        decisions: usize,
    },
    /// LeaseSecret (open the sealed envelope, Cedar decision, audit) vs the
    /// bare echo RPC at one cache over mTLS.
    Lease {
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
    },
    /// Audit records from N caches at once into the control plane's
    /// durable Merkle log, end to end.
    Audit {
        #[arg(long, default_value_t = 8)]
        caches: usize,
        #[arg(long, default_value_t = 400_000)]
        records: usize,
    },
    /// MintToken vs the bare echo RPC at one cache over mTLS, in both audit
    /// modes (durable, the default, and commit_delay at a second cache).
    Mint {
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
        /// Release a generated bundle of this many policies first (0: the
        /// small default bundle).
        #[arg(long, default_value_t = 200)]
        policies: usize,
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
    // `lattice dev` and the benchmarks run whole lattices in this process.
    lattice_shared::admission::raise_fd_limit();
    lattice_shared::admission::exit_on_failed_fsync();
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
            print!(
                "{}",
                lattice::admin::render_status(&r, unix_millis(SystemTime::now()))
            );
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
        Command::Policy { command } => policy(command).await,
        Command::Secret { command } => secret_cmd::run(command).await,
        Command::Kms { command } => secret_cmd::run_kms(command).await,
        Command::Audit { command } => audit_cmd::run(command).await,
        Command::Alerts { command } => audit_cmd::alerts(command).await,
        Command::Report {
            command: ReportCommand::Access { days, csv, admin },
        } => report_cmd::run(days, csv, &admin).await,
        Command::Approve { request_id, admin } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .approve(pb::ApproveRequest { request_id })
                .await
                .map_err(lattice::admin::refused)?
                .into_inner();
            eprintln!("approved {} by {}; it ran:", r.action, r.requested_by);
            use pb::approve_response::Result as R;
            match r.result {
                Some(R::Policy(v)) => println!("{}", lattice::admin::render_version(&v)),
                Some(R::Revoke(v)) => println!("revocation committed at sequence {}", v.seq),
                Some(R::JoinToken(t)) => {
                    eprintln!("join token for {} (shown once):", t.id);
                    println!("{}", t.token);
                }
                Some(R::AdminCertificate(c)) => {
                    eprintln!("admin certificate (give it to its holder as admin.crt):");
                    print!("{}", lattice_shared::pem::encode("CERTIFICATE", &c.cert));
                }
                Some(R::Secret(v)) => println!("{}", secret_cmd::render_version(&v)),
                Some(R::Custody(c)) => println!("{}", render_custody(&c)),
                Some(R::Kms(k)) => println!(
                    "{}: KEK version {}; {} DEK(s) rewrapped",
                    k.kms, k.kek_version, k.rewrapped
                ),
                None => {}
            }
            Ok(())
        }
        Command::GrantCustody { cache_id, admin } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .grant_custody(pb::GrantCustodyRequest { cache_id })
                .await
                .map_err(lattice::admin::refused)?
                .into_inner();
            println!("{}", render_custody(&r));
            Ok(())
        }
        Command::Pending { admin } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .list_pending(pb::ListPendingRequest {})
                .await
                .map_err(lattice::admin::refused)?
                .into_inner();
            print!("{}", lattice::admin::render_pending(&r));
            Ok(())
        }
        Command::AdminCert {
            command:
                AdminCertCommand::Issue {
                    id,
                    roles,
                    regions,
                    out,
                    ttl,
                    admin,
                },
        } => {
            let key = lattice_shared::pki::PrivateKey::generate_p256()?;
            std::fs::create_dir_all(&out)?;
            let key_pem = zeroize::Zeroizing::new(lattice_shared::pem::encode(
                "PRIVATE KEY",
                &key.pkcs8_der(),
            ));
            lattice_shared::seal::write_private_file(&out.join("admin.key"), key_pem.as_bytes())?;
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .issue_admin_certificate(pb::IssueAdminCertificateRequest {
                    id,
                    roles,
                    regions,
                    csr: key.csr_der()?,
                    ttl_secs: ttl.map(|t| Duration::from(t).as_secs()).unwrap_or(0),
                })
                .await
                .map_err(|s| {
                    anyhow!(
                        "{} ({:?}); the key is in {}: once approved, save the certificate `lattice approve` prints there as admin.crt",
                        s.message(),
                        s.code(),
                        out.display()
                    )
                })?
                .into_inner();
            for (name, der) in [("admin.crt", &r.cert), ("root.crt", &r.root)] {
                let pem = lattice_shared::pem::encode("CERTIFICATE", der);
                lattice_shared::seal::write_file_atomic(&out.join(name), pem.as_bytes(), false)?;
            }
            println!(
                "wrote {} (admin.key, admin.crt, root.crt); valid until unix {}",
                out.display(),
                r.not_after_unix
            );
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
                BenchCommand::Policy {
                    policies,
                    decisions,
                },
        } => {
            if policies == 0 || policies > 10_000 || decisions == 0 {
                anyhow::bail!("--policies takes 1..=10000 and --decisions a positive count");
            }
            println!("bench policy: {policies} generated policies, {decisions} decisions");
            println!("{}", lattice::bench::policy(policies, decisions)?);
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Mint {
                    concurrency,
                    connections,
                    duration,
                    policies,
                },
        } => {
            let opts = lattice::bench::Options {
                concurrency,
                connections,
                duration: duration.into(),
                warmup: Duration::from_secs(2),
                policies,
            };
            println!(
                "bench mint: {concurrency} in flight over {connections} mTLS connections, {duration} per phase, policy bundle of {policies} generated policies"
            );
            let phases = lattice::bench::mint(opts).await?;
            let [echo, mint, delay] = &phases[..] else {
                anyhow::bail!("bench mint ran {} phases, not 3", phases.len());
            };
            println!("{echo}\n{mint}\n{delay}");
            println!(
                "mint/echo throughput ratio: {:.2}",
                mint.rps / echo.rps.max(1.0)
            );
            println!(
                "audit modes: durable (default) / commit_delay throughput ratio: {:.2}",
                mint.rps / delay.rps.max(1.0)
            );
            if let (Some(e), Some(m)) = (echo.cpu_us, mint.cpu_us) {
                let sign = lattice::bench::sign_cost_us()?;
                println!(
                    "CPU per request (this one process: client, cache, control plane): echo {e:.0} µs, mint {m:.0} µs.\nOne token signature costs {sign:.1} µs on this machine now: with the CPU saturated, a mint that did nothing but sign would reach at most {:.2} of echo.",
                    e / (e + sign)
                );
            }
            Ok(())
        }
        Command::Bench {
            command: BenchCommand::Audit { caches, records },
        } => {
            println!("bench audit: {records} records from {caches} caches");
            println!("{}", lattice::bench::audit(caches, records).await?);
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Lease {
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
                policies: 0,
            };
            println!(
                "bench lease: {concurrency} in flight over {connections} mTLS connections, {duration} per phase, a 64-byte secret sealed at the cache"
            );
            let phases = lattice::bench::lease(opts).await?;
            let [echo, lease] = &phases[..] else {
                anyhow::bail!("bench lease ran {} phases, not 2", phases.len());
            };
            println!("{echo}\n{lease}");
            println!(
                "lease/echo throughput ratio: {:.2}",
                lease.rps / echo.rps.max(1.0)
            );
            Ok(())
        }
    }
}

fn load_bundle(dir: &std::path::Path) -> anyhow::Result<lattice_shared::policy::BundleFiles> {
    lattice_shared::policy::BundleFiles::load_dir(dir)
        .map_err(|e| anyhow!("{}: {e}", dir.display()))
}

async fn policy(command: PolicyCommand) -> anyhow::Result<()> {
    use lattice_shared::policy::{Engine, PolicyError};
    match command {
        PolicyCommand::Validate { dir } => {
            let files = load_bundle(&dir)?;
            let engine =
                Engine::compile(&files, 0).map_err(|e| anyhow!("{}: {e}", dir.display()))?;
            println!(
                "{}: valid; {} policies in {} files, sha256:{}",
                dir.display(),
                engine.policy_count(),
                files.len(),
                hex::encode(files.sha256())
            );
            Ok(())
        }
        PolicyCommand::Test { dir } => {
            let files = load_bundle(&dir)?;
            let engine =
                Engine::compile(&files, 0).map_err(|e| anyhow!("{}: {e}", dir.display()))?;
            let report = engine.run_tests();
            println!("{report}");
            if !report.ok() {
                anyhow::bail!(
                    "{}: {} test case(s) failed",
                    dir.display(),
                    report.failed.len()
                );
            }
            Ok(())
        }
        PolicyCommand::Diff {
            dir,
            against,
            admin,
        } => {
            let new = load_bundle(&dir)?;
            let (old, label) = match against {
                Some(other) => (load_bundle(&other)?, other.display().to_string()),
                None => {
                    let mut client =
                        lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
                    let r = client
                        .get_policy(pb::GetPolicyRequest { version: 0 })
                        .await
                        .map_err(lattice::admin::refused)?
                        .into_inner();
                    let files = lattice_shared::policy::BundleFiles::from_proto(
                        r.bundle
                            .as_ref()
                            .ok_or_else(|| anyhow!("no bundle returned"))?,
                    )?;
                    let v = r.version.map(|v| v.version).unwrap_or(0);
                    (files, format!("version {v} in force"))
                }
            };
            let d = old.diff(&new);
            if d.is_empty() {
                eprintln!("{} is identical to {label}", dir.display());
            } else {
                eprintln!("changes from {label} to {}:", dir.display());
                print!("{d}");
            }
            Ok(())
        }
        PolicyCommand::Push {
            dir,
            message,
            admin,
        } => {
            let files = load_bundle(&dir)?;
            // The same checks the control plane runs, for a readable report
            // before anything is sent.
            if let Err(e) = lattice_shared::policy::check(&files, 0) {
                return Err(match e {
                    PolicyError::Rejected(r) => anyhow!("{}: {r}", dir.display()),
                    other => anyhow!("{}: {other}", dir.display()),
                });
            }
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let v = client
                .push_policy(pb::PushPolicyRequest {
                    bundle: Some(files.to_proto()),
                    message,
                })
                .await
                .map_err(lattice::admin::refused)?
                .into_inner();
            eprintln!("released; caches enforce it as they apply the event:");
            println!("{}", lattice::admin::render_version(&v));
            Ok(())
        }
        PolicyCommand::History { admin } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let h = client
                .policy_history(pb::PolicyHistoryRequest {})
                .await
                .map_err(lattice::admin::refused)?
                .into_inner();
            print!("{}", lattice::admin::render_history(&h));
            Ok(())
        }
        PolicyCommand::Rollback {
            version,
            message,
            admin,
        } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let v = client
                .rollback_policy(pb::RollbackPolicyRequest {
                    to_version: version,
                    message,
                })
                .await
                .map_err(lattice::admin::refused)?
                .into_inner();
            println!("{}", lattice::admin::render_version(&v));
            Ok(())
        }
    }
}

fn connect(
    a: &AdminArgs,
) -> anyhow::Result<pb::admin_client::AdminClient<tonic::transport::Channel>> {
    lattice::admin::connect(a.control_plane, &a.admin_dir)
}

fn admin_refused(s: tonic::Status) -> anyhow::Error {
    lattice::admin::refused(s)
}

fn render_custody(r: &pb::GrantCustodyResponse) -> String {
    format!(
        "{} holds the secrets of its region: {} secret(s) sealed to it",
        r.cache_id, r.secrets
    )
}
