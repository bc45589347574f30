//! Separation of duties under the example bundle: an admin certifies only
//! roles they hold (platform admins appoint auditors and regional
//! operators too), so platform admins cannot make themselves a secret
//! custodian, even two of them together; Cedar sees what a certificate
//! would grant (`granted_roles`, `granted_regions`, `ttl_secs`).

use lattice::harness::Spec;
use lattice_shared::pki::PrivateKey;
use lattice_shared::policy::AdminRole;
use lattice_shared::proto as pb;
use tonic::Code;

use crate::common::*;

fn certify(
    name: &str,
    roles: &[&str],
    regions: &[&str],
    ttl_secs: u64,
) -> pb::IssueAdminCertificateRequest {
    pb::IssueAdminCertificateRequest {
        id: format!("spiffe://{}/admin/{name}", lattice::harness::TRUST_DOMAIN),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        regions: regions.iter().map(|r| r.to_string()).collect(),
        csr: PrivateKey::generate_p256()
            .expect("key")
            .csr_der()
            .expect("csr"),
        ttl_secs,
    }
}

fn approval_id(s: &tonic::Status) -> String {
    assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
    s.metadata()
        .get("lattice-approval-id")
        .and_then(|v| v.to_str().ok())
        .expect("the request id")
        .to_string()
}

#[tokio::test]
async fn platform_admins_cannot_certify_a_secret_custodian_even_two_together() {
    let (l, _clock) = lattice_with(Spec {
        policy: Some(lattice::example_bundle()),
        ..Spec::default()
    })
    .await;
    let mut alice = l.bootstrap_admin().expect("bootstrap admin");
    let mut bob = l
        .admin("bob", &[AdminRole::PlatformAdmin], &[])
        .expect("bob");
    let mut carol = l
        .admin("carol", &[AdminRole::SecretCustodian], &[])
        .expect("carol");
    let mut dave = l
        .admin("dave", &[AdminRole::SecretCustodian], &[])
        .expect("dave");

    // Alone or approved by a second platform admin: refused outright, and
    // the refusal names the rule.
    let s = alice
        .issue_admin_certificate(certify("mallory", &["secret-custodian"], &[], 3600))
        .await
        .expect_err("a platform admin cannot make a custodian");
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    assert!(
        s.message().contains("grant-only-held-roles"),
        "{}",
        s.message()
    );
    let s = alice
        .issue_admin_certificate(certify(
            "mallory",
            &["platform-admin", "secret-custodian"],
            &[],
            3600,
        ))
        .await
        .expect_err("nor hide the role among others");
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());

    // A custodian cannot make a platform admin either.
    let s = carol
        .issue_admin_certificate(certify("mallory", &["platform-admin"], &[], 3600))
        .await
        .expect_err("a custodian cannot make a platform admin");
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());

    // The lifetime is seen too: a month-long platform-admin certificate is
    // refused, a day-long one waits for bob and is issued.
    let s = alice
        .issue_admin_certificate(certify("frank", &["platform-admin"], &[], 30 * 86400))
        .await
        .expect_err("too long");
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    assert!(
        s.message().contains("platform-admin-certificates-short"),
        "{}",
        s.message()
    );
    let s = alice
        .issue_admin_certificate(certify("frank", &["platform-admin"], &[], 86400))
        .await
        .expect_err("waits for a second platform admin");
    let id = approval_id(&s);
    let done = bob
        .approve(pb::ApproveRequest { request_id: id })
        .await
        .expect("bob approves")
        .into_inner();
    let Some(pb::approve_response::Result::AdminCertificate(cert)) = done.result else {
        panic!("an admin certificate: {done:?}");
    };
    let info = lattice_shared::pki::inspect(&cert.cert).expect("cert");
    assert_eq!(
        info.org_unit.as_deref(),
        Some("roles=platform-admin;regions=")
    );

    // Custodians appoint custodians, with a second custodian.
    let s = carol
        .issue_admin_certificate(certify("grace", &["secret-custodian"], &[], 86400))
        .await
        .expect_err("waits for a second custodian");
    let id = approval_id(&s);
    let s = bob
        .approve(pb::ApproveRequest {
            request_id: id.clone(),
        })
        .await
        .expect_err("a platform admin's approval does not count");
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    dave.approve(pb::ApproveRequest { request_id: id })
        .await
        .expect("dave approves");
}

/// A platform admin (the default bundle lets one make a cache join token
/// alone) enrols a stock cache to read the `*` secrets: the cache enrols
/// and serves tokens, but is sealed nothing until a custodian grants it
/// custody, which the platform admin cannot do.
#[tokio::test]
async fn a_platform_admin_enrolling_a_cache_reads_no_secret() {
    let (mut l, _clock) = lattice_with(Spec {
        secrets: vec!["openai".into()],
        ..Spec::default()
    })
    .await;
    put_secret_applied(&l, "openai", b"sk-everywhere", &["*"]).await;
    let mut alice = l.bootstrap_admin().expect("bootstrap admin");
    let rogue_id = lattice::harness::Lattice::cache_id("ap", "rogue");
    let token = alice
        .create_join_token(pb::CreateJoinTokenRequest {
            id: rogue_id.clone(),
            ttl_secs: 0,
        })
        .await
        .expect("one platform admin makes a cache join token")
        .into_inner()
        .token;
    l.add_cache_with_token("ap", "rogue", token)
        .await
        .expect("the rogue cache enrols and becomes fresh");
    let x = l
        .add_agent("ap", "x")
        .await
        .expect("an agent at the rogue cache");
    l.agents[x]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("the cache serves tokens");
    let e = l.agents[x]
        .lease_secret("openai", 0, None)
        .await
        .expect_err("the cache holds no secret");
    let (code, msg) = refusal(&e);
    assert_eq!(code, Code::NotFound, "{msg}");
    let status = alice
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let rogue = status
        .caches
        .iter()
        .find(|c| c.cache_id == rogue_id)
        .expect("listed");
    assert_eq!(rogue.custody, "pending");

    // The platform admin cannot grant custody, the custodian can.
    let grant = || pb::GrantCustodyRequest {
        cache_id: rogue_id.clone(),
    };
    let s = alice
        .grant_custody(grant())
        .await
        .expect_err("platform admins never grant custody");
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    let mut carol = l
        .admin("carol", &[AdminRole::SecretCustodian], &[])
        .expect("carol");
    let r = carol
        .grant_custody(grant())
        .await
        .expect("a custodian grants custody")
        .into_inner();
    assert_eq!(r.secrets, 1);
    let head = l.cp().event_log().head();
    l.wait_all_applied(head).await.expect("applied");
    let lease = l.agents[x]
        .lease_secret("openai", 0, None)
        .await
        .expect("now the cache holds it");
    assert_eq!(&lease.value[..], b"sk-everywhere");
}
