//! `lattice report access`: for every audience and secret, which agents the
//! policy in force allows and which actually used it in the last N days,
//! computed from the audit log up to a signed tree head (checked against
//! the root, and the entries recomputed to its root hash), as JSON or CSV.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use anyhow::{Context, anyhow, bail};
use lattice_shared::id::SpiffeId;
use lattice_shared::merkle;
use lattice_shared::policy::{AgentAction, AgentRequest, BundleFiles, Engine, Posture};
use lattice_shared::proto as pb;
use serde::Serialize;

/// One resource and one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessRow {
    /// `audience` or `secret`.
    pub kind: String,
    pub resource: String,
    pub principal: String,
    /// Under the policy in force, with a neutral context (no posture, no
    /// scope, source 0.0.0.0, the report's time): policies that test the
    /// context may decide otherwise for a real request.
    pub allowed: bool,
    /// The policies that decided.
    pub policies: Vec<String>,
    /// Credentials issued (tokens, delegations) or leases in the window.
    pub uses: u64,
    pub last_used_unix_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TreeHeadRef {
    pub tree_size: u64,
    pub root_hash: String,
    pub timestamp_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AccessReport {
    pub policy_version: u64,
    pub tree_head: TreeHeadRef,
    pub since_unix_ms: i64,
    pub rows: Vec<AccessRow>,
}

fn resources_of(files: &BundleFiles) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let mut audiences = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    let mut agents = BTreeSet::new();
    let entities: Vec<serde_json::Value> = files
        .get(lattice_shared::policy::ENTITIES_FILE)
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default();
    for e in entities {
        let id = e["uid"]["id"].as_str().unwrap_or_default().to_string();
        match e["uid"]["type"].as_str() {
            Some("Lattice::Audience") => {
                audiences.insert(id);
            }
            Some("Lattice::Secret") => {
                secrets.insert(id);
            }
            Some("Lattice::Agent") => {
                agents.insert(id);
            }
            _ => {}
        }
    }
    (audiences, secrets, agents)
}

/// The report from the policy and the log's records (pure: tested alone).
pub fn compute(
    engine: &Engine,
    files: &BundleFiles,
    records: &[Vec<u8>],
    since_unix_ms: i64,
    now: std::time::SystemTime,
    head: TreeHeadRef,
) -> AccessReport {
    let (mut audiences, mut secrets, mut agents) = resources_of(files);
    // (kind, resource, agent) → (uses, last)
    let mut used: BTreeMap<(String, String, String), (u64, i64)> = BTreeMap::new();
    for r in records {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(r) else {
            continue;
        };
        let Some(agent) = v["agent"].as_str() else {
            continue;
        };
        agents.insert(agent.to_string());
        let at = v["at_unix_ms"].as_i64().unwrap_or(0);
        let (kind, resource) = match v["kind"].as_str() {
            Some("issued") | Some("delegated") => ("audience", v["audience"].as_str()),
            Some("leased") => ("secret", v["secret"].as_str()),
            _ => continue,
        };
        let Some(resource) = resource else { continue };
        if kind == "audience" {
            audiences.insert(resource.to_string());
        } else {
            secrets.insert(resource.to_string());
        }
        if at < since_unix_ms {
            continue;
        }
        let e = used
            .entry((kind.into(), resource.into(), agent.into()))
            .or_insert((0, i64::MIN));
        e.0 += 1;
        e.1 = e.1.max(at);
    }
    let (hour_utc, weekday) = lattice_shared::policy::hour_and_weekday(now);
    let mut rows = Vec::new();
    let kinds = [("audience", &audiences), ("secret", &secrets)];
    for (kind, resources) in kinds {
        for resource in resources.iter() {
            for agent in &agents {
                let Ok(principal) = SpiffeId::parse(agent) else {
                    continue;
                };
                let region = principal
                    .region()
                    .map(|r| r.to_string())
                    .unwrap_or_default();
                let outcome = engine.decide_agent(&AgentRequest {
                    principal,
                    action: if kind == "audience" {
                        AgentAction::MintToken
                    } else {
                        AgentAction::LeaseSecret
                    },
                    resource: resource.clone(),
                    region,
                    source_ip: IpAddr::from([0, 0, 0, 0]),
                    ttl_secs: 300,
                    scopes: Vec::new(),
                    posture: Posture::default(),
                    job_type: String::new(),
                    hour_utc,
                    weekday,
                    delegation_depth: 0,
                });
                let u = used.get(&(kind.into(), resource.clone(), agent.clone()));
                if !outcome.allowed && u.is_none() {
                    continue;
                }
                rows.push(AccessRow {
                    kind: kind.into(),
                    resource: resource.clone(),
                    principal: agent.clone(),
                    allowed: outcome.allowed,
                    policies: outcome.policies,
                    uses: u.map_or(0, |u| u.0),
                    last_used_unix_ms: u.map(|u| u.1),
                });
            }
        }
    }
    AccessReport {
        policy_version: engine.version(),
        tree_head: head,
        since_unix_ms,
        rows,
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn to_csv(r: &AccessReport) -> String {
    let mut out = format!(
        "# policy v{}, audit tree head size {} root {} at {}, since {}\nkind,resource,principal,allowed,policies,uses,last_used_unix_ms\n",
        r.policy_version,
        r.tree_head.tree_size,
        r.tree_head.root_hash,
        r.tree_head.timestamp_unix_ms,
        r.since_unix_ms
    );
    for row in &r.rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            row.kind,
            csv_field(&row.resource),
            csv_field(&row.principal),
            row.allowed,
            csv_field(&row.policies.join(" ")),
            row.uses,
            row.last_used_unix_ms
                .map(|t| t.to_string())
                .unwrap_or_default()
        ));
    }
    out
}

/// Fetches the policy in force, the newest signed tree head (checked
/// against the root) and the entries it covers (recomputed to its root).
pub async fn run(days: u64, csv: bool, admin: &crate::AdminArgs) -> anyhow::Result<()> {
    let mut client = crate::connect(admin)?;
    let policy = client
        .get_policy(pb::GetPolicyRequest { version: 0 })
        .await
        .map_err(crate::admin_refused)?
        .into_inner();
    let files = BundleFiles::from_proto(&policy.bundle.unwrap_or_default())?;
    let version = policy.version.map(|v| v.version).unwrap_or(0);
    let engine = Engine::compile(&files, version)?;
    let heads = crate::audit_cmd::tree_heads(&mut client).await?;
    let newest = heads.last().ok_or_else(|| {
        anyhow!("the audit log has no signed tree head yet; retry in a few seconds")
    })?;
    let (root, td) = crate::audit_cmd::root_and_td(&admin.admin_dir.join("root.crt"))?;
    let head = lattice_control_plane::audit_log::check_head(
        &newest.tree_head,
        &newest.signature,
        &newest.signer_cert,
        &root,
        &td,
    )
    .map_err(anyhow::Error::msg)
    .context("the newest tree head does not verify against the root")?;
    let mut records = crate::audit_cmd::all_records(&mut client).await?;
    if (records.len() as u64) < head.tree_size {
        bail!("the log returned fewer entries than its signed head covers");
    }
    records.truncate(usize::try_from(head.tree_size).unwrap_or(usize::MAX));
    let mut f = merkle::Frontier::default();
    for r in &records {
        f.push(merkle::leaf_hash(r));
    }
    if f.root().as_slice() != head.root_hash.as_slice() {
        bail!("the entries do not match the signed tree head: run `lattice audit verify`");
    }
    let now = std::time::SystemTime::now();
    let since = lattice_shared::clock::unix_secs(now) * 1000
        - i64::try_from(days.saturating_mul(86_400_000)).unwrap_or(i64::MAX);
    let report = compute(
        &engine,
        &files,
        &records,
        since,
        now,
        TreeHeadRef {
            tree_size: head.tree_size,
            root_hash: hex::encode(&head.root_hash),
            timestamp_unix_ms: head.timestamp_unix_ms,
        },
    );
    if csv {
        print!("{}", to_csv(&report));
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_and_used_per_resource_and_principal() {
        let files = lattice::harness::lattice_bundle(
            &[lattice::harness::Audience::new("https://api", &["read"])],
            &["openai".to_string()],
        );
        let engine = Engine::compile(&files, 3).expect("compiles");
        let a = "spiffe://lattice.local/agent/eu/a";
        let b = "spiffe://lattice.local/agent/eu/b";
        let rec = |v: serde_json::Value| v.to_string().into_bytes();
        let records = vec![
            rec(
                serde_json::json!({"kind":"issued","agent":a,"audience":"https://api","at_unix_ms":5000}),
            ),
            rec(
                serde_json::json!({"kind":"issued","agent":a,"audience":"https://api","at_unix_ms":6000}),
            ),
            rec(serde_json::json!({"kind":"leased","agent":b,"secret":"openai","at_unix_ms":100})),
            rec(
                serde_json::json!({"kind":"issued","agent":b,"audience":"https://old","at_unix_ms":7000}),
            ),
            rec(serde_json::json!({"kind":"admin","admin":"x"})),
        ];
        let r = compute(
            &engine,
            &files,
            &records,
            1000,
            std::time::SystemTime::now(),
            TreeHeadRef {
                tree_size: 5,
                root_hash: "00".into(),
                timestamp_unix_ms: 0,
            },
        );
        let row = |kind: &str, res: &str, p: &str| {
            r.rows
                .iter()
                .find(|x| x.kind == kind && x.resource == res && x.principal == p)
                .cloned()
        };
        let api_a = row("audience", "https://api", a).expect("a on api");
        assert!(api_a.allowed && api_a.uses == 2 && api_a.last_used_unix_ms == Some(6000));
        let api_b = row("audience", "https://api", b).expect("b allowed, unused");
        assert!(api_b.allowed && api_b.uses == 0 && api_b.last_used_unix_ms.is_none());
        let old = row("audience", "https://old", b).expect("used though not allowed now");
        assert!(!old.allowed && old.uses == 1);
        let lease = row("secret", "openai", b).expect("b may lease");
        assert_eq!(lease.uses, 0, "its lease is older than the window");
        assert_eq!(r.policy_version, 3);
        let csv = to_csv(&r);
        assert!(csv.contains("audience,https://api,spiffe://lattice.local/agent/eu/a,true,"));
        assert!(
            csv.lines()
                .nth(1)
                .expect("header")
                .starts_with("kind,resource")
        );
    }
}
