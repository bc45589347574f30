//! `lattice audit …`: read and check the control plane's tamper-evident
//! audit log. `verify` recomputes the whole Merkle tree and checks every
//! signed tree head; `proof` prints a self-contained JSON proof that
//! `check-proof` (or any RFC 6962 verifier with the root certificate) checks
//! offline.

use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use lattice_shared::merkle;
use lattice_shared::proto as pb;
use lattice_shared::serde_b64 as b64;
use prost::Message;

use crate::AdminArgs;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the whole log and check every signed tree head.
    Verify {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The newest entries as JSON lines.
    Tail {
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Entries matching every filter given, as JSON lines.
    Query {
        /// An id the entry names (admin, approver, agent).
        #[arg(long)]
        subject: Option<String>,
        /// Unix seconds, or RFC 3339.
        #[arg(long)]
        since: Option<String>,
        /// The record kind (e.g. admin).
        #[arg(long)]
        kind: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// A proof that entry INDEX is in a signed tree head (the newest, or
    /// --tree-size), and that an older head is a prefix of it (--first-size),
    /// as JSON a third party can check.
    Proof {
        index: u64,
        #[arg(long, default_value_t = 0)]
        tree_size: u64,
        #[arg(long, default_value_t = 0)]
        first_size: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Check a proof printed by `lattice audit proof`, offline, against a
    /// root certificate.
    CheckProof {
        file: PathBuf,
        /// PEM root certificate of the lattice.
        #[arg(long)]
        root: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// Print alerts as JSON lines as they are raised, until interrupted
    /// (earlier ones: `lattice audit query --kind alert`).
    Watch {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

pub async fn alerts(command: AlertsCommand) -> anyhow::Result<()> {
    match command {
        AlertsCommand::Watch { admin } => {
            let mut client = crate::connect(&admin)?;
            let mut s = client
                .watch_alerts(pb::WatchAlertsRequest {})
                .await
                .map_err(crate::admin_refused)?
                .into_inner();
            eprintln!("watching alerts; Ctrl-C to stop");
            while let Some(a) = s.message().await.map_err(crate::admin_refused)? {
                println!(
                    "{}",
                    serde_json::json!({
                        "rule": a.rule, "subject": a.subject, "detail": a.detail,
                        "at_unix_ms": a.at_unix_ms, "cache": a.cache, "action": a.action,
                        "secret": a.secret,
                    })
                );
            }
        }
    }
    Ok(())
}

fn hex32(b: &[u8]) -> anyhow::Result<merkle::Hash> {
    b.try_into().map_err(|_| anyhow!("a hash is not 32 bytes"))
}

/// Every signed tree head, oldest first.
pub(crate) async fn tree_heads(
    client: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
) -> anyhow::Result<Vec<pb::SignedTreeHead>> {
    let mut out = Vec::new();
    let mut start_size = 0;
    loop {
        let page = client
            .audit_tree_heads(pb::AuditTreeHeadsRequest {
                start_size,
                limit: 0,
            })
            .await
            .map_err(crate::admin_refused)?
            .into_inner();
        if page.next_start_size == 0 {
            out.extend(page.heads);
            return Ok(out);
        }
        // A server that does not move forward is not followed round.
        if page.heads.is_empty() || page.next_start_size <= start_size {
            return Err(anyhow!(
                "the control plane's tree-head pages do not advance (from {start_size} to {})",
                page.next_start_size
            ));
        }
        out.extend(page.heads);
        start_size = page.next_start_size;
    }
}

/// Every entry's record, in index order.
pub(crate) async fn all_records(
    client: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let bar = indicatif::ProgressBar::new_spinner();
    loop {
        let r = client
            .audit_entries(pb::AuditEntriesRequest {
                start: out.len() as u64,
                limit: 1000,
            })
            .await
            .map_err(crate::admin_refused)?
            .into_inner();
        if r.entries.is_empty() {
            break;
        }
        for e in r.entries {
            if e.index != out.len() as u64 {
                bail!("entry {} arrived out of order", e.index);
            }
            out.push(e.record);
        }
        bar.set_message(format!("{} / {} entries", out.len(), r.tree_size));
        if out.len() as u64 >= r.tree_size {
            break;
        }
    }
    bar.finish_and_clear();
    Ok(out)
}

fn json_line(index: u64, record: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(record) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("index".into(), index.into());
            serde_json::Value::Object(m).to_string()
        }
        _ => serde_json::json!({ "index": index, "record_b64": b64::encode(record) }).to_string(),
    }
}

fn since_ms(s: &str) -> anyhow::Result<i64> {
    if let Ok(secs) = s.parse::<i64>() {
        return Ok(secs * 1000);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("--since {s:?}: unix seconds or RFC 3339"))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

fn matches(
    v: &serde_json::Value,
    subject: Option<&str>,
    since: Option<i64>,
    kind: Option<&str>,
) -> bool {
    let field = |k: &str| v.get(k).and_then(|x| x.as_str());
    if let Some(k) = kind
        && field("kind") != Some(k)
    {
        return false;
    }
    if let Some(s) = subject
        && !["admin", "approved_by", "agent", "subject"]
            .iter()
            .any(|f| field(f) == Some(s))
    {
        return false;
    }
    if let Some(t) = since
        && v.get("at_unix_ms").and_then(|x| x.as_i64()).unwrap_or(0) < t
    {
        return false;
    }
    true
}

pub(crate) fn root_and_td(
    root_pem: &std::path::Path,
) -> anyhow::Result<(Vec<u8>, lattice_shared::id::TrustDomain)> {
    let root = lattice_shared::pem::read_certs(root_pem)
        .map_err(|e| anyhow!(e))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("{} holds no certificate", root_pem.display()))?;
    let info = lattice_shared::pki::inspect(&root)?;
    let td = match info.id {
        Some(id) => id.trust_domain().clone(),
        None => lattice_shared::id::TrustDomain::new(lattice::harness::TRUST_DOMAIN)?,
    };
    Ok((root, td))
}

/// The proof document `proof` prints and `check-proof` reads.
#[derive(serde::Serialize, serde::Deserialize)]
struct ProofDoc {
    index: u64,
    record_b64: String,
    leaf_hash: String,
    inclusion: Vec<String>,
    tree_head_b64: String,
    signature_b64: String,
    signer_cert_b64: String,
    tree_size: u64,
    root_hash: String,
    #[serde(default)]
    first_tree_head_b64: Option<String>,
    #[serde(default)]
    first_signature_b64: Option<String>,
    #[serde(default)]
    consistency: Vec<String>,
}

fn check_doc(
    doc: &ProofDoc,
    root_der: &[u8],
    td: &lattice_shared::id::TrustDomain,
) -> anyhow::Result<String> {
    let d = |s: &str| b64::decode(s).context("base64");
    let head_bytes = d(&doc.tree_head_b64)?;
    let cert = d(&doc.signer_cert_b64)?;
    let check = |head: &[u8], sig: &str| {
        lattice_control_plane::audit_log::check_head(head, &d(sig)?, &cert, root_der, td)
            .map_err(anyhow::Error::msg)
    };
    let head = check(&head_bytes, &doc.signature_b64)?;
    let record = d(&doc.record_b64)?;
    let leaf = merkle::leaf_hash(&record);
    let path: Vec<merkle::Hash> = doc
        .inclusion
        .iter()
        .map(|h| hex32(&hex::decode(h)?))
        .collect::<anyhow::Result<_>>()?;
    if !merkle::verify_inclusion(
        doc.index,
        head.tree_size,
        &leaf,
        &path,
        &hex32(&head.root_hash)?,
    ) {
        bail!(
            "entry {} is NOT in the signed tree head of size {}",
            doc.index,
            head.tree_size
        );
    }
    let mut out = format!(
        "entry {} is in the tree head of size {} signed by the control plane",
        doc.index, head.tree_size
    );
    if let (Some(fh), Some(fs)) = (&doc.first_tree_head_b64, &doc.first_signature_b64) {
        let first = check(&d(fh)?, fs)?;
        let proof: Vec<merkle::Hash> = doc
            .consistency
            .iter()
            .map(|h| hex32(&hex::decode(h)?))
            .collect::<anyhow::Result<_>>()?;
        if !merkle::verify_consistency(
            first.tree_size,
            head.tree_size,
            &hex32(&first.root_hash)?,
            &hex32(&head.root_hash)?,
            &proof,
        ) {
            bail!(
                "the tree head of size {} is NOT a prefix of the one of size {}",
                first.tree_size,
                head.tree_size
            );
        }
        out.push_str(&format!(
            "; the head of size {} is a prefix of it",
            first.tree_size
        ));
    }
    Ok(out)
}

pub async fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { admin } => {
            let mut client = crate::connect(&admin)?;
            // Heads first: the log only grows, so every head fetched then
            // covers records fetched after it (the other order races a head
            // signed in between, which covers records we never read).
            let heads = tree_heads(&mut client).await?;
            let records = all_records(&mut client).await?;
            let (root, td) = root_and_td(&admin.admin_dir.join("root.crt"))?;
            let v = lattice_control_plane::audit_log::verify(&records, &heads, &root, &td)
                .map_err(|e| anyhow!("audit log verification FAILED: {e}"))?;
            println!(
                "ok: {} entries recomputed; {} signed tree heads verified against the root",
                v.entries, v.heads
            );
        }
        AuditCommand::Tail { lines, admin } => {
            let mut client = crate::connect(&admin)?;
            let size = client
                .audit_entries(pb::AuditEntriesRequest { start: 0, limit: 1 })
                .await
                .map_err(crate::admin_refused)?
                .into_inner()
                .tree_size;
            let mut start = size.saturating_sub(lines);
            while start < size {
                let page = client
                    .audit_entries(pb::AuditEntriesRequest { start, limit: 1000 })
                    .await
                    .map_err(crate::admin_refused)?
                    .into_inner();
                if page.entries.is_empty() {
                    break;
                }
                for e in &page.entries {
                    println!("{}", json_line(e.index, &e.record));
                    start = e.index + 1;
                }
            }
        }
        AuditCommand::Query {
            subject,
            since,
            kind,
            admin,
        } => {
            let since = since.as_deref().map(since_ms).transpose()?;
            let mut client = crate::connect(&admin)?;
            for (i, r) in all_records(&mut client).await?.iter().enumerate() {
                let v: serde_json::Value = serde_json::from_slice(r).unwrap_or_default();
                if matches(&v, subject.as_deref(), since, kind.as_deref()) {
                    println!("{}", json_line(i as u64, r));
                }
            }
        }
        AuditCommand::Proof {
            index,
            tree_size,
            first_size,
            admin,
        } => {
            let mut client = crate::connect(&admin)?;
            let p = client
                .audit_proof(pb::AuditProofRequest {
                    index,
                    tree_size,
                    first_size,
                })
                .await
                .map_err(crate::admin_refused)?
                .into_inner();
            let entry = p.entry.ok_or_else(|| anyhow!("no entry"))?;
            let head = p.head.ok_or_else(|| anyhow!("no tree head"))?;
            let th = pb::TreeHead::decode(head.tree_head.as_slice())?;
            let doc = ProofDoc {
                index: entry.index,
                leaf_hash: hex::encode(merkle::leaf_hash(&entry.record)),
                record_b64: b64::encode(&entry.record),
                inclusion: p.inclusion.iter().map(hex::encode).collect(),
                tree_head_b64: b64::encode(&head.tree_head),
                signature_b64: b64::encode(&head.signature),
                signer_cert_b64: b64::encode(&head.signer_cert),
                tree_size: th.tree_size,
                root_hash: hex::encode(&th.root_hash),
                first_tree_head_b64: p.first_head.as_ref().map(|h| b64::encode(&h.tree_head)),
                first_signature_b64: p.first_head.as_ref().map(|h| b64::encode(&h.signature)),
                consistency: p.consistency.iter().map(hex::encode).collect(),
            };
            // Checked here too before it is handed on.
            let (root, td) = root_and_td(&admin.admin_dir.join("root.crt"))?;
            let what = check_doc(&doc, &root, &td)?;
            eprintln!("{what}");
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        AuditCommand::CheckProof { file, root } => {
            let doc: ProofDoc = serde_json::from_slice(
                &std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?,
            )
            .with_context(|| format!("{} is not a proof", file.display()))?;
            let (root, td) = root_and_td(&root)?;
            println!("ok: {}", check_doc(&doc, &root, &td)?);
        }
    }
    Ok(())
}
