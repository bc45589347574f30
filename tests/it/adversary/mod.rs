//! Attacks played as an adversary would, over real mTLS against the
//! in-process lattice, each refused: a rogue cache signing tokens outside its
//! authority (another region's agent, an admin, another cache's `iss`), a
//! bound token presented with a certificate it was not issued to, and CSRs
//! whose key and signature algorithms differ (the key type comes from the
//! SubjectPublicKeyInfo); a revoked bootstrap admin that restarts would
//! bring back.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::*;
use lattice::harness::{Lattice, Spec, WAIT};
use lattice_shared::clock::unix_secs;
use lattice_shared::pki::PrivateKey;
use lattice_shared::proto as pb;
use lattice_shared::revocation::Target;
use lattice_shared::token::{Actor, Claims, Confirmation};
use lattice_shared::verifier::{RevocationReason, Verifier, VerifyError};

/// Caches in eu and us; agents `a` in eu, `b` and `c` in us, and the
/// service `svc` in eu whose verifier follows the eu cache.
fn spec() -> Spec {
    Spec {
        agents: vec![
            ("eu".into(), "a".into()),
            ("us".into(), "b".into()),
            ("us".into(), "c".into()),
            ("eu".into(), "svc".into()),
        ],
        ..Spec::default()
    }
}

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const SVC: usize = 3;
const US: usize = 1;

async fn verifier(l: &Lattice) -> Verifier {
    fresh_verifier(l, SVC).await
}

/// A token the cache `cache` signs with its own key, naming whatever the
/// attacker wants.
fn forge(l: &Lattice, cache: usize, iss: &str, sub: &str, act: Option<Actor>) -> Claims {
    let now = unix_secs(l.clock.now());
    Claims {
        iss: iss.to_owned(),
        sub: sub.to_owned(),
        aud: AUDIENCE.into(),
        scope: "read".into(),
        jti: format!("forged-{cache}-{}", sub.len()),
        iat: now,
        nbf: now,
        exp: now + 300,
        cnf: None,
        act,
        parent_jtis: vec![],
    }
}

fn sign(l: &Lattice, cache: usize, claims: &Claims) -> String {
    l.caches[cache]
        .app()
        .identity()
        .signer
        .sign(claims)
        .expect("the cache signs")
}

fn thumbprint(der: &[u8]) -> Confirmation {
    Confirmation {
        x5t_s256: lattice_shared::pki::inspect(der)
            .expect("cert")
            .thumbprint_b64(),
    }
}

fn chain_of(l: &Lattice, agent: usize) -> Vec<Vec<u8>> {
    let c = l.agents[agent].chain();
    vec![c.leaf, c.intermediate]
}

#[tokio::test]
async fn a_rogue_cache_cannot_sign_outside_its_region_and_role() {
    let (l, _clock) = lattice_with(spec()).await;
    let v = verifier(&l).await;
    let us = l.caches[US].id().to_string();
    let eu = l.caches[0].id().to_string();
    let (a, b) = (l.agents[A].id.to_string(), l.agents[B].id.to_string());

    // The forging path itself works: the us cache may speak for its own agents.
    let own = sign(&l, US, &forge(&l, US, &us, &b, None));
    let claims = v.verify(&own, AUDIENCE).await.expect("its own agent");
    assert_eq!(claims.sub, b);

    let cases: Vec<(&str, Claims)> = vec![
        ("an eu agent", forge(&l, US, &us, &a, None)),
        (
            "an admin",
            forge(&l, US, &us, "spiffe://lattice.local/admin/bootstrap", None),
        ),
        (
            "the control plane",
            forge(&l, US, &us, "spiffe://lattice.local/cp/main", None),
        ),
        (
            "another cache",
            forge(&l, US, &us, "spiffe://lattice.local/cache/us/other", None),
        ),
        (
            "an eu agent as actor",
            forge(
                &l,
                US,
                &us,
                &b,
                Some(Actor {
                    sub: format!("{a}/planner"),
                    act: None,
                }),
            ),
        ),
        (
            "an agent of another trust domain",
            forge(&l, US, &us, "spiffe://other.example/agent/us/b", None),
        ),
        ("the eu cache's iss", forge(&l, US, &eu, &a, None)),
        (
            "the eu cache's iss, a us agent",
            forge(&l, US, &eu, &b, None),
        ),
    ];
    for (what, claims) in cases {
        let token = sign(&l, US, &claims);
        let e = v
            .verify(&token, AUDIENCE)
            .await
            .expect_err(&format!("a token for {what} signed by the us cache"));
        assert!(matches!(e, VerifyError::Token(_)), "{what}: {e}");
        assert!(!e.is_unavailable(), "{what}: {e}");
    }
    l.shutdown().await;
}

#[tokio::test]
async fn a_bound_token_is_refused_with_another_agents_certificate() {
    let (l, _clock) = lattice_with(spec()).await;
    let v = verifier(&l).await;
    let us = l.caches[US].id().to_string();
    let (a, b) = (l.agents[A].id.to_string(), l.agents[B].id.to_string());
    let (chain_b, chain_c) = (chain_of(&l, B), chain_of(&l, C));

    // A genuine bound token verifies with its holder's chain.
    let t = l.agents[B].mint(AUDIENCE, &[], None).await.expect("mint");
    v.verify_bound(&t.token, AUDIENCE, &chain_b)
        .await
        .expect("the holder's certificate");

    // The cache binds a token for b to c's certificate, which it issued, and
    // presents c's certificate: the thumbprint matches, the subject does not.
    let mut claims = forge(&l, US, &us, &b, None);
    claims.cnf = Some(thumbprint(&chain_c[0]));
    let e = v
        .verify_bound(&sign(&l, US, &claims), AUDIENCE, &chain_c)
        .await
        .expect_err("c's certificate for b's token");
    assert!(matches!(e, VerifyError::NotBound(_)), "{e}");

    // Another region's agent, bound to a us certificate.
    let mut claims = forge(&l, US, &us, &a, None);
    claims.cnf = Some(thumbprint(&chain_c[0]));
    let e = v
        .verify_bound(&sign(&l, US, &claims), AUDIENCE, &chain_c)
        .await
        .expect_err("an eu subject bound to a us certificate");
    assert!(
        matches!(e, VerifyError::Token(_) | VerifyError::NotBound(_)),
        "{e}"
    );
    l.shutdown().await;
}

#[tokio::test]
async fn a_bound_token_is_refused_when_the_certificates_issuing_ca_is_revoked() {
    let (l, _clock) = lattice_with(spec()).await;
    let v = verifier(&l).await;
    let us = l.caches[US].id().to_string();
    let b = l.agents[B].id.to_string();
    let chain_b = chain_of(&l, B);
    let mut claims = forge(&l, US, &us, &b, None);
    claims.cnf = Some(thumbprint(&chain_b[0]));
    let token = sign(&l, US, &claims);
    v.verify_bound(&token, AUDIENCE, &chain_b)
        .await
        .expect("bound to b's certificate");

    // Only the us cache's CA certificate is revoked: its signing key and its
    // id stay valid, but no leaf it issued may be presented any more.
    let ca = lattice_shared::pki::inspect(&chain_b[1]).expect("ca");
    let ev = l.revoke(Target::CertSerial(ca.serial_hex)).expect("revoke");
    tokio::time::timeout(WAIT, v.follower().wait_applied(ev.seq))
        .await
        .expect("the verifier applies the revocation");
    match v.verify_bound(&token, AUDIENCE, &chain_b).await {
        Err(VerifyError::Revoked(RevocationReason::ClientCertificate(m))) => {
            assert!(m.contains("issuing CA"), "{m}");
        }
        other => panic!("expected the client certificate refused, got {other:?}"),
    }
    l.shutdown().await;
}

/// A PKCS#8 key on `curve` and a CSR for it signed with `hash` by the
/// openssl CLI (ring signs P-384 only with SHA-384 and P-256 only with
/// SHA-256). `None` when openssl is absent.
fn openssl_csr(dir: &Path, curve: &str, hash: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("openssl is not installed: skipping the CSRs it builds");
        return None;
    }
    let key = dir.join(format!("{curve}-{hash}.key"));
    let csr = dir.join(format!("{curve}-{hash}.csr"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    // The key comes from ring, which reads its own PKCS#8 back (it refuses
    // OpenSSL's EC keys, which repeat the curve inside the key).
    let alg = match curve {
        "P-256" => &rcgen::PKCS_ECDSA_P256_SHA256,
        _ => &rcgen::PKCS_ECDSA_P384_SHA384,
    };
    let pair = rcgen::KeyPair::generate_for(alg).expect("key");
    std::fs::write(&key, pair.serialize_der()).expect("write key");
    let (k, c) = (key.to_str().expect("path"), csr.to_str().expect("path"));
    run(&[
        "req",
        "-new",
        "-key",
        k,
        "-keyform",
        "DER",
        &format!("-{hash}"),
        "-subj",
        "/CN=lattice csr",
        "-outform",
        "DER",
        "-out",
        c,
    ]);
    Some((
        std::fs::read(&key).expect("key"),
        std::fs::read(&csr).expect("csr"),
    ))
}

/// The named curve of a certificate's key, as openssl reads it.
fn openssl_curve(dir: &Path, cert_der: &[u8]) -> String {
    let path = dir.join("leaf.der");
    std::fs::write(&path, cert_der).expect("write");
    let out = Command::new("openssl")
        .args(["x509", "-inform", "DER", "-noout", "-text", "-in"])
        .arg(&path)
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "openssl cannot load it: {out:?}");
    assert!(!text.contains("Unable to load"), "{text}");
    text.lines()
        .find(|l| l.contains("NIST CURVE"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[tokio::test]
async fn a_csr_whose_hash_differs_from_its_curve_enrols_with_its_own_key_type() {
    let (l, clock) = lattice().await;
    let dir = tempfile::tempdir().expect("dir");
    let eu = l.cache_in("eu").expect("eu").addr();
    for (i, (curve, hash)) in [
        ("P-384", "sha256"),
        ("P-256", "sha384"),
        ("P-384", "sha384"),
    ]
    .into_iter()
    .enumerate()
    {
        let Some((key, csr)) = openssl_csr(dir.path(), curve, hash) else {
            return;
        };
        let id = Lattice::agent_id("eu", &format!("odd-{i}"));
        let token = l.join_token(&id, None).expect("token");
        let mut anon = raw_cache_client(&l, &clock.shared(), eu, "eu", None);
        let enrolled = anon
            .enrol(pb::EnrolAgentRequest {
                join_token: token,
                requested_id: String::new(),
                csr,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("{curve}/{hash} enrols: {s:?}"))
            .into_inner();
        let chain = enrolled.chain.expect("chain");
        assert_eq!(
            openssl_curve(dir.path(), &chain.leaf),
            format!("NIST CURVE: {curve}"),
            "{curve}/{hash}: the certificate labels the key it carries"
        );
        // The certificate and its key authenticate over mTLS.
        let key = PrivateKey::from_pkcs8(&key).expect("key");
        let mut client = raw_cache_client(
            &l,
            &clock.shared(),
            eu,
            "eu",
            Some((vec![chain.leaf, chain.intermediate], &key)),
        );
        client
            .mint_token(mint_req(AUDIENCE))
            .await
            .unwrap_or_else(|s| panic!("{curve}/{hash} mints over mTLS: {s:?}"));
    }
    l.shutdown().await;
}

fn bootstrap_serial(files: &lattice_control_plane::AdminFiles) -> Option<String> {
    let certs = lattice_shared::pem::read_certs(&files.cert_pem).ok()?;
    Some(
        lattice_shared::pki::inspect(certs.first()?)
            .ok()?
            .serial_hex,
    )
}

/// The bootstrap platform admin is minted once: revoked, it stays revoked
/// through restarts past its half-life, deleting its files does not bring
/// it back, and its one minting is in the admin trail.
#[tokio::test]
async fn a_revoked_bootstrap_admin_is_not_minted_again_by_restarts() {
    let (mut l, clock) = common::lattice_with(Spec {
        cp_config: Some(lattice::harness::CpConfigFn(std::sync::Arc::new(|c| {
            c.admin_cert_ttl_days = 1;
        }))),
        ..Spec::default()
    })
    .await;
    let files = l.cp().admin_files();
    let serial = bootstrap_serial(&files).expect("the first start wrote it");
    l.revoke(Target::CertSerial(serial.clone()))
        .expect("revoke");

    // Past half-life (12 h of a 1-day certificate), then restarted.
    clock.advance(std::time::Duration::from_secs(13 * 3600));
    l.restart_cp().await.expect("restart");
    assert_eq!(
        bootstrap_serial(&files).as_deref(),
        Some(serial.as_str()),
        "the revoked bootstrap admin was minted again"
    );
    let refused = lattice::admin::connect(l.cp().local_addr(), &files.dir)
        .expect("client")
        .approve(pb::ApproveRequest {
            request_id: "00".into(),
        })
        .await;
    assert!(refused.is_err(), "the revoked admin is still refused");

    // Its files deleted, then restarted: nothing comes back.
    std::fs::remove_file(&files.cert_pem).expect("rm cert");
    std::fs::remove_file(&files.key_pem).expect("rm key");
    l.restart_cp().await.expect("restart");
    assert!(!files.cert_pem.exists() && !files.key_pem.exists());

    let mints = l
        .cp()
        .admin_trail(10_000)
        .expect("trail")
        .into_iter()
        .filter(|r| r.summary.contains("bootstrap admin"))
        .count();
    assert_eq!(mints, 1, "one minting, in the admin trail");
    l.shutdown().await;
}

/// Issue #18: a denied admin call wrote and fsynced its trail record
/// inline on the async runtime, for every call, so any admin certificate,
/// even one with no roles, could turn a flood of denied calls into an
/// fsync flood that stalls the runtime driving every Sync stream. Denials
/// are now recorded (on the blocking pool) in a burst, then at a rate, per
/// principal; the rest are refused `RESOURCE_EXHAUSTED` without a write,
/// and the next recorded denial says how many were skipped.
#[tokio::test]
async fn a_flood_of_denied_admin_calls_is_rate_limited_per_principal() {
    let (l, clock) = lattice().await;
    // Auditors may not approve.
    let auditor = [lattice_shared::policy::AdminRole::Auditor];
    let nobody = l.admin("nobody", &auditor, &[]).expect("admin");
    let trail = |who: &str| {
        l.cp()
            .admin_trail(100_000)
            .expect("trail")
            .into_iter()
            .filter(|r| r.admin.ends_with(who))
            .collect::<Vec<_>>()
    };
    // What an auditor's approval gets back.
    async fn approve(c: &pb::admin_client::AdminClient<tonic::transport::Channel>) -> tonic::Code {
        let r = c
            .clone()
            .approve(pb::ApproveRequest {
                request_id: "00".into(),
            })
            .await;
        r.expect_err("an auditor may not approve").code()
    }
    let (mut denied, mut exhausted) = (0, 0);
    for _ in 0..60 {
        match approve(&nobody).await {
            tonic::Code::PermissionDenied => denied += 1,
            tonic::Code::ResourceExhausted => exhausted += 1,
            other => panic!("an auditor approves: {other:?}"),
        }
    }
    // The fake clock stands still: exactly the burst is recorded.
    assert_eq!((denied, exhausted), (20, 40));
    assert_eq!(trail("/nobody").len(), 20);
    // Another principal has a budget of its own.
    let other = l.admin("other", &auditor, &[]).expect("admin");
    assert_eq!(approve(&other).await, tonic::Code::PermissionDenied);
    // A second later the budget refills; the record counts what it skipped.
    clock.advance(std::time::Duration::from_secs(1));
    assert_eq!(approve(&nobody).await, tonic::Code::PermissionDenied);
    let recs = trail("/nobody");
    assert_eq!(recs.len(), 21);
    assert!(
        recs.iter()
            .any(|r| r.summary.contains("40 earlier denials")),
        "{recs:#?}"
    );
    l.shutdown().await;
}

// Each further attack family has a file of its own; its cases may use the
// helpers above through `use super::*`.
mod audit;
mod custody;
mod discovery;
mod freshness;
