//! `lattice dev`: a whole local lattice in one process, and a walkthrough of
//! enrolment, issuance and verification that prints what it does.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use lattice_shared::clock::SystemClock;
use lattice_shared::pki::{PrivateKey, TrustBundle, Usage};
use lattice_shared::proto as pb;
use lattice_shared::token::TokenVerifier;
use rustls_pki_types::CertificateDer;

use crate::harness::{Lattice, Spec};

pub struct Options {
    pub exit_after_demo: bool,
    pub data_dir: Option<std::path::PathBuf>,
}

fn step(n: usize, text: &str) {
    println!("\n[{n}] {text}");
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let clock = SystemClock::shared();
    let started = Instant::now();
    println!(
        "Lattice dev: control plane, two regional caches (eu, us) and one edge agent on 127.0.0.1"
    );
    let spec = Spec {
        agents: vec![],
        ..Spec::default()
    };
    let mut lattice = match &opts.data_dir {
        Some(d) => Lattice::start_in(d, spec, clock.clone()).await?,
        None => Lattice::start(spec, clock.clone()).await?,
    };
    println!("data directory: {}", lattice.dir.display());

    step(
        1,
        "control plane up: root CA created, its key sealed under a local key-encryption key",
    );
    println!(
        "    control plane   https://{}  ({})",
        lattice.cp().local_addr(),
        lattice.cp().state.id
    );
    println!("    root CA         {}", lattice.root_pem().display());
    println!(
        "    admin identity  {}",
        lattice.cp().admin_files().dir.display()
    );

    step(
        2,
        "caches enrolled with one-time join tokens; each got an intermediate CA, a TLS and a JWT signing certificate",
    );
    for c in &lattice.caches {
        let ident = c.app().state.identity();
        println!(
            "    {:<42} https://{}  CA serial {}  kid {}",
            c.cfg.id,
            c.addr(),
            &ident.ca.info().serial_hex[..16],
            ident.signer.kid()
        );
        println!(
            "    {:<42} JWKS https://{}/.well-known/jwks.json",
            "",
            c.addr()
        );
    }

    step(
        3,
        "policy as code: Cedar bundles, validated, tested, signed by the control plane and streamed to every cache",
    );
    let mut admin = lattice.bootstrap_admin()?;
    let history = admin
        .policy_history(pb::PolicyHistoryRequest {})
        .await
        .map_err(crate::admin::refused)?
        .into_inner();
    for v in &history.versions {
        println!("    {}", crate::admin::render_version(v));
    }
    // A second platform admin, while the default bundle lets one admin do it
    // alone; the example bundle puts this under the two-person rule.
    let bob_key = PrivateKey::generate_p256()?;
    let bob_cert = admin
        .issue_admin_certificate(pb::IssueAdminCertificateRequest {
            id: format!("spiffe://{}/admin/bob", crate::harness::TRUST_DOMAIN),
            roles: vec!["platform-admin".into()],
            regions: vec![],
            csr: bob_key.csr_der()?,
            ttl_secs: 3600,
        })
        .await
        .map_err(crate::admin::refused)?
        .into_inner();
    println!("    a second admin, bob (platform-admin), has a certificate carrying his role");
    let mut bob = crate::admin::connect_with(
        lattice.cp_cfg.listen,
        bob_cert.root.clone(),
        vec![bob_cert.cert.clone()],
        &bob_key,
    )?;
    let example = crate::example_bundle();
    let (_, report) = lattice_shared::policy::check(&example, 0)
        .map_err(|e| anyhow::anyhow!("example bundle: {e}"))?;
    println!(
        "    deploy/policies/example: {} test cases pass (business hours, IP range, TTL cap by label, posture, separation of duties)",
        report.passed.len()
    );
    let v = admin
        .push_policy(pb::PushPolicyRequest {
            bundle: Some(example.to_proto()),
            message: "example bundle".into(),
        })
        .await
        .map_err(crate::admin::refused)?
        .into_inner();
    println!("    pushed: {}", crate::admin::render_version(&v));
    for c in &lattice.caches {
        c.wait_applied(v.seq).await?;
        println!(
            "    {:<42} verified the signature and enforces version {}",
            c.cfg.id,
            c.app().state.policy.version()
        );
    }

    step(
        4,
        "join token for the edge agent (bound to its id and region, shown once, stored as a hash)",
    );
    let agent_id = Lattice::agent_id("eu", "agent-1");
    let token = lattice.join_token(&agent_id, None)?;
    println!("    {agent_id}: {}…", &token[..12]);

    step(
        5,
        "agent generates its key locally and enrols at the eu cache with a CSR",
    );
    let t = Instant::now();
    lattice
        .add_agent_with_token("eu", "agent-1", token)
        .await
        .context("agent enrolment")?;
    let agent = &lattice.agents[0];
    let chain = agent.chain();
    println!(
        "    enrolled in {:.1} ms; certificate valid until unix {}",
        t.elapsed().as_secs_f64() * 1e3,
        agent.not_after_unix()
    );
    let pem_dir = lattice.dir.join("agent-eu-agent-1");
    std::fs::create_dir_all(&pem_dir)?;
    let chain_path = pem_dir.join("chain.pem");
    std::fs::write(
        &chain_path,
        lattice_shared::pem::encode_certs([
            chain.leaf.as_slice(),
            chain.intermediate.as_slice(),
            chain.root.as_slice(),
        ]),
    )?;
    println!(
        "    certificate chain (leaf, eu intermediate, root): {}",
        chain_path.display()
    );
    let bundle = Arc::new(TrustBundle::new(
        lattice_shared::id::TrustDomain::new(crate::harness::TRUST_DOMAIN)?,
        chain.root.clone(),
    )?);
    bundle.verify(
        &chain.leaf,
        &[CertificateDer::from(chain.intermediate.as_slice())],
        clock.now(),
        Usage::TlsClient,
    )?;
    println!("    chain verified to the root with rustls-webpki");

    step(6, "agent mints a token over mTLS");
    let audience = "https://api.example.com";
    let t = Instant::now();
    let minted = agent.mint(audience, &["read".to_string()], None).await?;
    println!(
        "    minted in {:.2} ms, expires at unix {}",
        t.elapsed().as_secs_f64() * 1e3,
        minted.expires_at_unix
    );
    println!("    token: {}", minted.token);
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&agent.jwks().await?)?;
    let claims = TokenVerifier::new(jwks.clone(), bundle.clone(), clock.clone())
        .verify(&minted.token, audience)?;
    println!(
        "    claims: {}",
        serde_json::to_string_pretty(&claims)?.replace('\n', "\n    ")
    );

    step(
        7,
        "token verified offline against the JWKS (kid → key certified by the root for the issuing cache)",
    );
    println!(
        "    JWKS holds {} keys (one per cache); issuer {} matches the key's certificate",
        jwks.keys.len(),
        claims.iss
    );

    step(
        8,
        "context-aware decisions at the eu cache (each denial names the deciding policy)",
    );
    let agent = &lattice.agents[0];
    let (hour, weekday) = lattice_shared::policy::hour_and_weekday(clock.now());
    for (audience, scopes, why) in [
        (
            "https://payments.example.com",
            vec!["charge".to_string()],
            "high-assurance: needs os_patched posture",
        ),
        (
            "https://db.internal.example.com",
            vec!["read".to_string()],
            "only from 10.0.0.0/8; this agent calls from 127.0.0.1",
        ),
        (
            "https://reports.example.com",
            vec!["read".to_string()],
            "business hours only (Mon-Fri 08-18 UTC)",
        ),
    ] {
        let outcome = match agent.mint(audience, &scopes, None).await {
            Ok(m) => format!("allowed by version {}", m.policy_version),
            Err(e) => format!("{e}"),
        };
        println!("    {audience:<32} ({why}): {outcome}");
    }
    println!("    (now: weekday {weekday}, {hour:02}h UTC)");

    step(
        9,
        "two-person rule: under the example bundle a policy change waits for a second admin",
    );
    let pending = match admin
        .push_policy(pb::PushPolicyRequest {
            bundle: Some(example.to_proto()),
            message: "re-release, approved".into(),
        })
        .await
    {
        Err(s) if s.code() == tonic::Code::FailedPrecondition => s,
        Err(s) => return Err(crate::admin::refused(s)),
        Ok(_) => anyhow::bail!("the example bundle should put pushes under the two-person rule"),
    };
    let request_id = pending
        .metadata()
        .get("lattice-approval-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    println!(
        "    bootstrap pushes: {:?}: {}",
        pending.code(),
        pending.message()
    );
    let approved = bob
        .approve(pb::ApproveRequest {
            request_id: request_id.clone(),
        })
        .await
        .map_err(crate::admin::refused)?
        .into_inner();
    if let Some(pb::approve_response::Result::Policy(v)) = approved.result {
        println!(
            "    bob approves {request_id}: {}",
            crate::admin::render_version(&v)
        );
    }

    secret_step(&lattice).await?;

    step(
        11,
        "revoke the agent at the control plane and measure how fast every cache enforces it",
    );
    let agent = lattice.agents[0].clone();
    let held = agent.held_jtis().len();
    let t0 = Instant::now();
    let ev = lattice.revoke(lattice_shared::revocation::Target::Agent(agent.id.clone()))?;
    println!(
        "    committed durably as sequence {} in {:.2} ms",
        ev.seq,
        t0.elapsed().as_secs_f64() * 1e3
    );
    let waits = lattice.caches.iter().map(|c| async move {
        c.wait_applied(ev.seq)
            .await
            .map(|()| (c.cfg.id.clone(), t0.elapsed()))
    });
    for r in futures::future::join_all(waits).await {
        let (id, at) = r?;
        println!(
            "    {id:<42} enforcing after {:.2} ms (durable, acknowledged)",
            at.as_secs_f64() * 1e3
        );
    }
    let refused = agent
        .cache_client()
        .mint_token(lattice_shared::proto::MintTokenRequest {
            audience: audience.into(),
            scopes: vec![],
            ttl_secs: 0,
            claims: None,
        })
        .await;
    match refused {
        Err(s) => println!(
            "    the agent's next mint is refused: {:?}: {}",
            s.code(),
            s.message()
        ),
        Ok(_) => anyhow::bail!("a revoked agent could still mint"),
    }
    let mut revoked = agent.revoked_signal();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), revoked.wait_for(|r| *r)).await;
    println!(
        "    the agent learnt it on its revocation stream: revoked = {}, dropped {held} held token(s) and its key",
        agent.is_revoked()
    );
    println!(
        "    a cache that cannot prove freshness within L = {} ms refuses to mint (UNAVAILABLE, \"stale\")",
        lattice.cp_cfg.max_staleness_ms
    );

    println!(
        "\nWalkthrough done in {:.2} s.",
        started.elapsed().as_secs_f64()
    );
    print_endpoints(&lattice, &lattice.dir);
    if opts.exit_after_demo {
        lattice.shutdown().await;
        return Ok(());
    }
    println!("\nServing until Ctrl-C.");
    tokio::signal::ctrl_c().await?;
    lattice.shutdown().await;
    Ok(())
}

/// Step 10: an upstream API key under the two-person rule, sealed to the eu
/// cache only, leased, then one version revoked.
async fn secret_step(lattice: &Lattice) -> anyhow::Result<()> {
    use lattice_shared::policy::AdminRole;
    step(
        10,
        "upstream API key: custodian carol stores it (dave approves), the eu cache receives it sealed to its own key, the agent leases it",
    );
    let mut carol = lattice.admin("carol", &[AdminRole::SecretCustodian], &[])?;
    let mut dave = lattice.admin("dave", &[AdminRole::SecretCustodian], &[])?;
    // Two-person requests: carol asks, dave approves, the approval runs it.
    async fn approve(
        dave: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
        s: tonic::Status,
    ) -> anyhow::Result<pb::ApproveResponse> {
        if s.code() != tonic::Code::FailedPrecondition {
            return Err(crate::admin::refused(s));
        }
        let id = s
            .metadata()
            .get("lattice-approval-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok(dave
            .approve(pb::ApproveRequest { request_id: id })
            .await
            .map_err(crate::admin::refused)?
            .into_inner())
    }
    for demo_value in [b"sk-demo-first-0123456789", b"sk-demo-second-987654321"] {
        let waiting = carol
            .put_secret(pb::PutSecretRequest {
                name: "openai".into(),
                value: demo_value.to_vec(),
                regions: vec!["eu".into()],
                message: "walkthrough".into(),
            })
            .await;
        if let Err(s) = waiting {
            let r = approve(&mut dave, s).await?;
            if let Some(pb::approve_response::Result::Secret(v)) = r.result {
                println!(
                    "    v{} stored: fingerprint {}, DEK wrapped by KEK v{}, put by carol, approved by dave",
                    v.version, v.fingerprint, v.kek_version
                );
            }
        }
    }
    lattice
        .wait_all_applied(lattice.cp().state.log.head())
        .await?;
    for c in &lattice.caches {
        let held = c.app().state.sync.secrets.held();
        println!("    {:<42} holds (sealed) {held:?}", c.cfg.id);
    }
    let agent = &lattice.agents[0];
    let lease = agent
        .lease_secret("openai", 0, Some(std::time::Duration::from_secs(300)))
        .await?;
    println!(
        "    agent leased v{} ({} bytes, fingerprint {}), lease {} until unix {}",
        lease.version,
        lease.value.len(),
        lease.fingerprint,
        lease.lease_id,
        lease.expires_at_unix
    );
    drop(lease);
    let revoke = carol
        .revoke(pb::RevokeRequest {
            revocation: Some(pb::Revocation {
                target: Some(pb::revocation::Target::SecretVersion(
                    pb::SecretVersionRef {
                        name: "openai".into(),
                        version: 2,
                    },
                )),
                reason: "walkthrough".into(),
            }),
        })
        .await;
    let t0 = Instant::now();
    let seq = match revoke {
        Ok(r) => r.into_inner().seq,
        Err(s) => match approve(&mut dave, s).await?.result {
            Some(pb::approve_response::Result::Revoke(r)) => r.seq,
            _ => anyhow::bail!("the approval did not revoke"),
        },
    };
    for c in &lattice.caches {
        c.wait_applied(seq).await?;
    }
    println!(
        "    carol revokes v2, dave approves (sequence {seq}); every cache applied it {:.2} ms after carol asked",
        t0.elapsed().as_secs_f64() * 1e3
    );
    match agent.lease_secret("openai", 0, None).await {
        Err(e) => println!("    the agent's next lease is refused: {e}"),
        Ok(_) => anyhow::bail!("a revoked version could still be leased"),
    }
    Ok(())
}

fn print_endpoints(lattice: &Lattice, dir: &Path) {
    println!("Endpoints:");
    println!("    control plane  {}", lattice.cp_cfg.listen);
    for c in &lattice.caches {
        println!("    {}  {}", c.cfg.id, c.addr());
    }
    println!(
        "Try: lattice status --control-plane {} --admin-dir {}",
        lattice.cp_cfg.listen,
        dir.join("cp/admin").display()
    );
}
