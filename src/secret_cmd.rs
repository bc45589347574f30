//! `lattice secret …` and `lattice kms …`: upstream secrets at the control
//! plane. Values are read from stdin or a file, never from the command line
//! (argv is visible to every user of the machine and lands in shell history).

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Subcommand;
use lattice_shared::proto as pb;
use zeroize::Zeroizing;

use crate::AdminArgs;

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Store a new version (it becomes active; the old one stays leasable
    /// for the grace window). The value comes from --file or stdin.
    Put {
        name: String,
        /// Regions whose caches receive it; repeat, or `*` for every region.
        #[arg(long = "region", required = true)]
        regions: Vec<String>,
        /// Read the value from this file instead of stdin.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Keep a trailing newline (stripped by default).
        #[arg(long)]
        keep_newline: bool,
        #[arg(long, short, default_value = "")]
        message: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Every secret: active and previous versions, regions, holders.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// A secret's versions with state, fingerprint and KEK version.
    Versions {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Activate the previous version again (within its grace window).
    Rollback {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Rotate the upstream key through its rotator, step by step.
    Rotate {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Re-encrypt the live versions under new DEKs (DEK rotation).
    Rekey {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke one version: every cache refuses it within its staleness bound.
    RevokeVersion {
        name: String,
        version: u64,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke every version and withdraw the secret from every cache.
    Delete {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum KmsCommand {
    /// New KEK version; every DEK is rewrapped under it (no ciphertext changes).
    Rotate {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

fn read_value(file: Option<&PathBuf>, keep_newline: bool) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    // Allocated once: a growing buffer would leave copies in freed memory.
    let mut buf = Zeroizing::new(Vec::with_capacity(
        lattice_shared::envelope::MAX_SECRET_VALUE_LEN + 2,
    ));
    match file {
        Some(p) => {
            std::fs::File::open(p)
                .with_context(|| format!("opening {}", p.display()))?
                .take(lattice_shared::envelope::MAX_SECRET_VALUE_LEN as u64 + 2)
                .read_to_end(&mut buf)
                .with_context(|| format!("reading {}", p.display()))?;
        }
        None => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("enter the secret value, then Ctrl-D:");
            }
            std::io::stdin()
                .take(lattice_shared::envelope::MAX_SECRET_VALUE_LEN as u64 + 2)
                .read_to_end(&mut buf)
                .context("reading the value from stdin")?;
        }
    }
    if !keep_newline {
        // Truncating keeps the capacity, which `Zeroizing` wipes on drop.
        let n = buf.len();
        if buf.ends_with(b"\r\n") {
            buf.truncate(n - 2);
        } else if buf.ends_with(b"\n") {
            buf.truncate(n - 1);
        }
    }
    if buf.is_empty() {
        return Err(anyhow!("the secret value is empty"));
    }
    if buf.len() > lattice_shared::envelope::MAX_SECRET_VALUE_LEN {
        return Err(anyhow!(
            "the secret value is longer than {} bytes",
            lattice_shared::envelope::MAX_SECRET_VALUE_LEN
        ));
    }
    Ok(buf)
}

fn unix(t: i64) -> String {
    if t == 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

pub fn render_version(v: &pb::SecretVersionInfo) -> String {
    let mut s = format!(
        "{} v{} {:<8} fingerprint {} kek v{} {} by {}{} at {}",
        v.name,
        v.version,
        v.state,
        v.fingerprint,
        v.kek_version,
        v.origin,
        v.created_by,
        if v.approved_by.is_empty() {
            String::new()
        } else {
            format!(" approved by {}", v.approved_by)
        },
        unix(v.created_at_unix)
    );
    if v.previous_until_unix != 0 {
        s.push_str(&format!(
            " (leasable until {})",
            unix(v.previous_until_unix)
        ));
    }
    s
}

pub fn render_versions(r: &pb::SecretVersionsResponse) -> String {
    let mut out = String::new();
    if let Some(s) = &r.summary {
        out.push_str(&render_summary(s));
        out.push('\n');
    }
    for v in &r.versions {
        out.push_str("  ");
        out.push_str(&render_version(v));
        out.push('\n');
    }
    out
}

pub fn render_summary(s: &pb::SecretSummary) -> String {
    format!(
        "{}: active v{}, previous {}, regions {}, held by {} cache(s){}",
        s.name,
        s.active,
        if s.previous == 0 {
            "-".to_string()
        } else {
            format!("v{}", s.previous)
        },
        s.regions.join(","),
        s.holders.len(),
        if s.last_rotated_unix != 0 {
            format!(", last rotated {}", unix(s.last_rotated_unix))
        } else {
            String::new()
        }
    )
}

pub async fn run(command: SecretCommand) -> anyhow::Result<()> {
    let refused = lattice::admin::refused;
    match command {
        SecretCommand::Put {
            name,
            regions,
            file,
            keep_newline,
            message,
            admin,
        } => {
            let value = read_value(file.as_ref(), keep_newline)?;
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let v = client
                .put_secret(pb::PutSecretRequest {
                    name,
                    value: value.to_vec(),
                    regions,
                    message,
                })
                .await
                .map_err(refused)?
                .into_inner();
            eprintln!("stored; caches of its regions receive it sealed to their own keys:");
            println!("{}", render_version(&v));
        }
        SecretCommand::List { admin } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .list_secrets(pb::ListSecretsRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            if r.secrets.is_empty() {
                eprintln!("no secrets");
            }
            for s in &r.secrets {
                println!("{}", render_summary(s));
            }
        }
        SecretCommand::Versions { name, admin } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .secret_versions(pb::SecretVersionsRequest { name })
                .await
                .map_err(refused)?
                .into_inner();
            print!("{}", render_versions(&r));
        }
        SecretCommand::Rollback { name, admin } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .rollback_secret(pb::RollbackSecretRequest { name })
                .await
                .map_err(refused)?
                .into_inner();
            print!("{}", render_versions(&r));
        }
        SecretCommand::Rekey { name, admin } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .rekey_secret(pb::RekeySecretRequest { name })
                .await
                .map_err(refused)?
                .into_inner();
            eprintln!("re-encrypted under new DEKs and sealed again to every holder:");
            print!("{}", render_versions(&r));
        }
        SecretCommand::Rotate { name, admin } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let mut stream = client
                .rotate_secret(pb::RotateSecretRequest { name })
                .await
                .map_err(refused)?
                .into_inner();
            let mut n = 0;
            loop {
                match stream.message().await {
                    Ok(Some(p)) => {
                        n += 1;
                        eprintln!("[{n}] {:<10} {}", p.step, p.detail);
                        if p.done {
                            println!("{}", p.new_version);
                        }
                    }
                    Ok(None) => break,
                    Err(s) => return Err(refused(s)),
                }
            }
        }
        SecretCommand::RevokeVersion {
            name,
            version,
            reason,
            admin,
        } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .revoke(pb::RevokeRequest {
                    revocation: Some(pb::Revocation {
                        target: Some(pb::revocation::Target::SecretVersion(
                            pb::SecretVersionRef { name, version },
                        )),
                        reason,
                    }),
                })
                .await
                .map_err(refused)?
                .into_inner();
            eprintln!(
                "revocation committed durably; caches refuse the version within their staleness bound"
            );
            println!("{}", r.seq);
        }
        SecretCommand::Delete { name, admin } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .delete_secret(pb::DeleteSecretRequest { name })
                .await
                .map_err(refused)?
                .into_inner();
            eprintln!(
                "{} version(s) revoked; envelopes withdrawn from every cache",
                r.versions_revoked
            );
            println!("{}", r.seq);
        }
    }
    Ok(())
}

pub async fn run_kms(command: KmsCommand) -> anyhow::Result<()> {
    match command {
        KmsCommand::Rotate { admin } => {
            let mut client = lattice::admin::connect(admin.control_plane, &admin.admin_dir)?;
            let r = client
                .rotate_kms(pb::RotateKmsRequest {})
                .await
                .map_err(lattice::admin::refused)?
                .into_inner();
            eprintln!(
                "{}: KEK version {} is current; {} DEK(s) rewrapped, no ciphertext touched",
                r.kms, r.kek_version, r.rewrapped
            );
            println!("{}", r.kek_version);
        }
    }
    Ok(())
}
