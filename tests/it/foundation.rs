//! End-to-end behaviour of the foundation over real mTLS on loopback: real
//! tonic servers, temp-dir sled stores, one fake clock.

use crate::common;

use std::time::Duration;

use common::*;
use lattice::harness::{Lattice, Spec};
use lattice_shared::clock::Clock;
use lattice_shared::id::SpiffeId;
use lattice_shared::pki::{Authority, PrivateKey, Profile, TrustBundle, Usage};
use lattice_shared::proto as pb;
use lattice_shared::token::{TokenError, TokenVerifier};
use rustls_pki_types::CertificateDer;
use tonic::Code;

#[tokio::test]
async fn happy_path_enrol_mint_and_verify_with_a_standard_jwt_library() {
    let (l, clock) = lattice().await;
    let agent = &l.agents[0];
    let minted = agent
        .mint(AUDIENCE, &["read".into()], None)
        .await
        .expect("mint");

    // A service that knows nothing of Lattice: the JWKS and jsonwebtoken.
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(&agent.jwks().await.expect("jwks")).expect("json");
    assert_eq!(jwks.keys.len(), 2, "the JWKS lists the keys of both caches");
    let header = jsonwebtoken::decode_header(&minted.token).expect("header");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    let kid = header.kid.expect("kid");
    let key =
        jsonwebtoken::DecodingKey::from_jwk(jwks.find(&kid).expect("kid in JWKS")).expect("key");
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&[AUDIENCE]);
    let data =
        jsonwebtoken::decode::<serde_json::Value>(&minted.token, &key, &v).expect("verifies");
    let c = data.claims;
    assert_eq!(c["iss"], "spiffe://lattice.local/cache/eu/cache-1");
    assert_eq!(c["sub"], "spiffe://lattice.local/agent/eu/agent-1");
    assert_eq!(c["aud"], AUDIENCE);
    assert_eq!(c["scope"], "read");
    assert_eq!(
        c["exp"].as_i64().expect("exp") - c["iat"].as_i64().expect("iat"),
        300,
        "default TTL 5 min"
    );
    assert_eq!(
        c["cnf"]["x5t#S256"].as_str().expect("cnf"),
        agent.chain().info.thumbprint_b64(),
        "bound to the agent's certificate"
    );
    assert_eq!(c["jti"].as_str().expect("jti"), minted.jti);

    // Our verifier also checks that the key is certified for the issuer.
    let verifier = TokenVerifier::new(jwks, bundle(&l), clock.shared());
    verifier
        .verify(&minted.token, AUDIENCE)
        .expect("lattice verifier");
    assert!(
        verifier
            .verify(&minted.token, "https://other.example")
            .is_err(),
        "audience is checked"
    );
    l.shutdown().await;
}

#[tokio::test]
async fn token_fails_after_tampering_or_expiry() {
    let (l, clock) = lattice().await;
    let agent = &l.agents[0];
    let minted = agent
        .mint(AUDIENCE, &["read".into()], Some(Duration::from_secs(60)))
        .await
        .expect("mint");
    let jwks = serde_json::from_str(&agent.jwks().await.expect("jwks")).expect("json");
    let verifier = TokenVerifier::new(jwks, bundle(&l), clock.shared());
    verifier.verify(&minted.token, AUDIENCE).expect("valid now");

    // Change one claim (the scope) and keep the signature.
    let parts: Vec<&str> = minted.token.split('.').collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let body = String::from_utf8(b64.decode(parts[1]).expect("b64"))
        .expect("utf8")
        .replace("\"read\"", "\"admin\"");
    let tampered = format!("{}.{}.{}", parts[0], b64.encode(body), parts[2]);
    assert!(matches!(
        verifier.verify(&tampered, AUDIENCE),
        Err(TokenError::Invalid(_))
    ));

    clock.advance(Duration::from_secs(61));
    assert!(matches!(
        verifier.verify(&minted.token, AUDIENCE),
        Err(TokenError::Expired)
    ));
    l.shutdown().await;
}

#[tokio::test]
async fn jwks_is_served_over_https_for_any_verifier() {
    let (l, _clock) = lattice().await;
    let cache = l.cache_in("eu").expect("eu");
    // Plain HTTP/1.1 over server-auth TLS, no client certificate.
    let mut cfg = (*lattice_shared::tls::client_config(
        bundle(&l),
        l.clock.clone(),
        lattice_shared::tls::ExpectedServer::CacheIn(
            lattice_shared::id::RegionId::new("eu").expect("region"),
        ),
        None,
    )
    .expect("tls"))
    .clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(cache.addr())
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("cache").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(
        b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: cache\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("application/jwk-set+json"));
    let kid = cache.app().identity().signer.kid().to_owned();
    assert!(resp.contains(&kid), "the JWKS lists this cache's key");
    l.shutdown().await;
}

#[tokio::test]
async fn every_rpc_but_enrolment_needs_a_client_certificate() {
    let (l, clock) = lattice().await;
    let cache = l.cache_in("eu").expect("eu");
    let mut anon = raw_cache_client(&l, &clock.shared(), cache.addr(), "eu", None);
    let s = anon
        .mint_token(mint_req(AUDIENCE))
        .await
        .expect_err("refused");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    for s in [
        anon.ping(pb::PingRequest { payload: vec![] })
            .await
            .expect_err("refused"),
        anon.jwks(pb::JwksRequest {}).await.expect_err("refused"),
        anon.issue_certificate(pb::IssueCertificateRequest {
            csr: vec![1],
            ..Default::default()
        })
        .await
        .expect_err("refused"),
    ] {
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    }
    // Enrolment is open, and says precisely what is wrong.
    let s = anon
        .enrol(pb::EnrolAgentRequest {
            join_token: "ljt_nope".into(),
            requested_id: String::new(),
            csr: PrivateKey::generate_p256()
                .expect("k")
                .csr_der()
                .expect("csr"),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("unknown join token"), "{s:?}");
    l.shutdown().await;
}

#[tokio::test]
async fn a_certificate_from_a_foreign_ca_is_refused() {
    let (l, clock) = lattice().await;
    let cache = l.cache_in("eu").expect("eu");
    // A look-alike hierarchy with the same ids but another root.
    let now = clock.now();
    let td = lattice_shared::id::TrustDomain::new("lattice.local").expect("td");
    let root = Authority::new_root(&td, PrivateKey::generate_p256().expect("k"), now, 24 * HOUR)
        .expect("root");
    let ca_key = PrivateKey::generate_p256().expect("k");
    let ca_id = SpiffeId::parse("spiffe://lattice.local/cache/eu/cache-1").expect("id");
    let ca = Authority::from_parts(
        root.issue(
            &ca_key.csr_der().expect("csr"),
            &ca_id,
            Profile::IntermediateCa,
            now,
            HOUR,
        )
        .expect("ca"),
        ca_key,
    )
    .expect("authority");
    let key = PrivateKey::generate_p256().expect("k");
    let agent_id = SpiffeId::parse("spiffe://lattice.local/agent/eu/agent-1").expect("id");
    let leaf = ca
        .issue(
            &key.csr_der().expect("csr"),
            &agent_id,
            Profile::TlsClient,
            now,
            HOUR,
        )
        .expect("leaf");

    let mut c = raw_cache_client(
        &l,
        &clock.shared(),
        cache.addr(),
        "eu",
        Some((vec![leaf, ca.cert_der().to_vec()], &key)),
    );
    // TLS 1.3: the client learns of the refusal at its first call.
    let err = c.mint_token(mint_req(AUDIENCE)).await.expect_err("refused");
    assert_ne!(err.code(), Code::Ok);
    l.shutdown().await;
}

#[tokio::test]
async fn an_expired_certificate_is_refused_on_new_and_existing_connections() {
    let (l, clock) = lattice().await;
    let agent = &l.agents[0];
    agent
        .mint(AUDIENCE, &[], None)
        .await
        .expect("mint while valid");
    clock.advance(HOUR + Duration::from_secs(1));

    // The connection made while the certificate was valid is still open.
    let s = agent.mint(AUDIENCE, &[], None).await.expect_err("expired");
    assert_eq!(s_code(&s), Code::Unauthenticated, "{s}");
    assert!(s.to_string().contains("expired"), "{s}");

    // A new connection fails the handshake.
    let fresh = agent
        .cache_client(Some(agent.current_cache()))
        .expect("client");
    let err = fresh
        .clone()
        .ping(pb::PingRequest { payload: vec![] })
        .await
        .expect_err("refused");
    assert_ne!(err.code(), Code::Ok);
    l.shutdown().await;
}

fn s_code(e: &lattice_edge_agent::Error) -> Code {
    match e {
        lattice_edge_agent::Error::Refused { code, .. } => *code,
        _ => Code::Unknown,
    }
}

#[tokio::test]
async fn an_agent_of_region_eu_is_refused_at_the_us_cache() {
    let (l, clock) = lattice().await;
    let agent = &l.agents[0];
    let us = l.cache_in("us").expect("us");
    let chain = agent.chain();
    // The agent's own key is not exposed; re-enrolment gives us one we hold.
    let key = PrivateKey::generate_p256().expect("k");
    let mut eu_client = raw_cache_client(
        &l,
        &clock.shared(),
        l.cache_in("eu").expect("eu").addr(),
        "eu",
        None,
    );
    let token = l
        .join_token("spiffe://lattice.local/agent/eu/agent-2", None)
        .expect("token");
    let enrolled = eu_client
        .enrol(pb::EnrolAgentRequest {
            join_token: token,
            requested_id: String::new(),
            csr: key.csr_der().expect("csr"),
            ..Default::default()
        })
        .await
        .expect("enrol")
        .into_inner();
    let c = enrolled.chain.expect("chain");
    assert_eq!(c.intermediate, chain.intermediate, "issued by the eu cache");

    // Trusting any cache so that the us cache's server check is not what refuses.
    let mut at_us = raw_cache_client(
        &l,
        &clock.shared(),
        us.addr(),
        "us",
        Some((vec![c.leaf, c.intermediate], &key)),
    );
    let s = at_us
        .mint_token(mint_req(AUDIENCE))
        .await
        .expect_err("wrong region");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("another region"), "{s:?}");
    l.shutdown().await;
}

#[tokio::test]
async fn join_tokens_are_one_time_expire_and_are_bound_to_id_and_region() {
    let (l, clock) = lattice().await;
    let eu = l.cache_in("eu").expect("eu").addr();
    let us = l.cache_in("us").expect("us").addr();
    let mut eu_c = raw_cache_client(&l, &clock.shared(), eu, "eu", None);
    let mut us_c = raw_cache_client(&l, &clock.shared(), us, "us", None);
    let csr = || {
        PrivateKey::generate_p256()
            .expect("k")
            .csr_der()
            .expect("csr")
    };
    let enrol = |token: &str, id: &str| pb::EnrolAgentRequest {
        join_token: token.to_owned(),
        requested_id: id.to_owned(),
        csr: csr(),
        ..Default::default()
    };
    let a2 = "spiffe://lattice.local/agent/eu/agent-2";

    // Wrong region: an eu token at the us cache, with or without a claimed id.
    let t = l.join_token(a2, None).expect("token");
    let s = us_c.enrol(enrol(&t, "")).await.expect_err("wrong region");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("region"), "{s:?}");
    let s = us_c.enrol(enrol(&t, a2)).await.expect_err("wrong region");
    assert_eq!(s.code(), Code::PermissionDenied);
    // Wrong id.
    let s = eu_c
        .enrol(enrol(&t, "spiffe://lattice.local/agent/eu/someone-else"))
        .await
        .expect_err("wrong id");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("another id"), "{s:?}");
    // None of the failures consumed it; it works once, then never again.
    let ok = eu_c
        .enrol(enrol(&t, a2))
        .await
        .expect("enrols")
        .into_inner();
    assert_eq!(ok.agent_id, a2);
    let s = eu_c.enrol(enrol(&t, a2)).await.expect_err("reused");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("already been used"), "{s:?}");

    // Expiry runs on the injected clock.
    let t = l
        .join_token(
            "spiffe://lattice.local/agent/eu/agent-3",
            Some(Duration::from_secs(60)),
        )
        .expect("token");
    clock.advance(Duration::from_secs(61));
    // Past L too: a stale cache enrols no one, so prove freshness first.
    for c in &l.caches {
        c.wait_fresh().await.expect("fresh");
    }
    let s = eu_c.enrol(enrol(&t, "")).await.expect_err("expired");
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("expired"), "{s:?}");
    l.shutdown().await;
}

#[tokio::test]
async fn oversized_and_malformed_requests_get_clear_statuses() {
    let (l, _clock) = lattice().await;
    let mut c = l.agents[0].cache_client(None).expect("client");
    let mint = |audience: &str, scopes: Vec<String>, ttl_secs| pb::MintTokenRequest {
        audience: audience.into(),
        scopes,
        ttl_secs,
        ..Default::default()
    };
    // (what, request, expected code, text the message must hold)
    let cases = [
        (
            "too big",
            mint(&"a".repeat(100 * 1024), vec![], 0),
            Code::OutOfRange,
            "",
        ),
        (
            "too long",
            mint(&"a".repeat(1000), vec![], 0),
            Code::InvalidArgument,
            "",
        ),
        (
            "too many scopes",
            mint(AUDIENCE, vec!["x".into(); 17], 0),
            Code::InvalidArgument,
            "",
        ),
        (
            "ttl too long",
            mint(AUDIENCE, vec![], 3600),
            Code::InvalidArgument,
            "exceeds",
        ),
        // The policy in force: unknown audience or scope.
        (
            "audience",
            mint("https://elsewhere.example", vec![], 0),
            Code::PermissionDenied,
            "",
        ),
        (
            "scope",
            mint(AUDIENCE, vec!["delete".into()], 0),
            Code::PermissionDenied,
            "",
        ),
    ];
    for (what, req, code, text) in cases {
        let s = c.mint_token(req).await.expect_err(what);
        assert_eq!(s.code(), code, "{what}: {s:?}");
        assert!(s.message().contains(text), "{what}: {s:?}");
    }
    let s = c
        .issue_certificate(pb::IssueCertificateRequest {
            csr: vec![0x30, 0x03, 1, 2, 3],
            ..Default::default()
        })
        .await
        .expect_err("bad csr");
    assert_eq!(s.code(), Code::InvalidArgument);
    l.shutdown().await;
}

/// A body that does not decode as the method's request is the caller's
/// fault: `INVALID_ARGUMENT`, not tonic's default `INTERNAL`.
#[tokio::test]
async fn a_malformed_protobuf_body_is_invalid_argument() {
    let (l, clock) = lattice().await;
    let tls = lattice_shared::tls::client_config(
        bundle(&l),
        clock.shared(),
        lattice_shared::tls::ExpectedServer::CacheIn(
            lattice_shared::id::RegionId::new("eu").expect("region"),
        ),
        None,
    )
    .expect("tls");
    let channel = lattice_shared::net::channel(l.caches[0].addr(), tls).expect("channel");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    // Field 1 of `EnrolAgentRequest` is a string; this sends it as a varint.
    let body = pb::FreshnessPing {
        ping_id: 7,
        sent_mono_ms: 0,
    };
    let s = grpc
        .unary::<_, pb::EnrolAgentResponse, _>(
            tonic::Request::new(body),
            tonic::codegen::http::uri::PathAndQuery::from_static("/lattice.v1.Cache/Enrol"),
            lattice_shared::proto::codec::LatticeCodec::default(),
        )
        .await
        .expect_err("refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("malformed protobuf"), "{s:?}");
    l.shutdown().await;
}

#[tokio::test]
async fn control_plane_and_cache_restart_with_identity_and_state_intact() {
    let (mut l, clock) = lattice().await;
    let root_before = std::fs::read(l.root_pem()).expect("root");
    let cache_serial = l.caches[0].app().identity().ca.info().serial_hex.clone();
    let used = l
        .join_token("spiffe://lattice.local/agent/eu/agent-9", None)
        .expect("token");
    let mut anon = raw_cache_client(&l, &clock.shared(), l.caches[0].addr(), "eu", None);
    let csr = PrivateKey::generate_p256()
        .expect("k")
        .csr_der()
        .expect("csr");
    anon.enrol(pb::EnrolAgentRequest {
        join_token: used.clone(),
        requested_id: String::new(),
        csr: csr.clone(),
        ..Default::default()
    })
    .await
    .expect("enrols");

    l.restart_cp().await.expect("cp restarts");
    l.restart_cache(0)
        .await
        .expect("cache restarts without a join token");
    l.caches[0].wait_fresh().await.expect("fresh after restart");

    assert_eq!(
        std::fs::read(l.root_pem()).expect("root"),
        root_before,
        "same root CA"
    );
    assert_eq!(
        l.caches[0].app().identity().ca.info().serial_hex,
        cache_serial,
        "same cache CA"
    );
    // The agent reconnects and mints; its token verifies against the restarted cache's JWKS.
    let minted = l.agents[0]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("mint after restarts");
    let jwks = serde_json::from_str(&l.agents[0].jwks().await.expect("jwks")).expect("json");
    TokenVerifier::new(jwks, bundle(&l), clock.shared())
        .verify(&minted.token, AUDIENCE)
        .expect("verifies");
    // The used join token stays used.
    let mut anon = raw_cache_client(&l, &clock.shared(), l.caches[0].addr(), "eu", None);
    let s = anon
        .enrol(pb::EnrolAgentRequest {
            join_token: used,
            requested_id: String::new(),
            csr,
            ..Default::default()
        })
        .await
        .expect_err("still used");
    assert_eq!(s.code(), Code::PermissionDenied);
    // And a new agent enrols through the restarted pair.
    l.add_agent("eu", "agent-after-restart")
        .await
        .expect("enrols");
    l.shutdown().await;
}

#[tokio::test]
async fn agent_chain_verifies_with_webpki_and_out_of_region_leaves_are_rejected_everywhere() {
    let (l, clock) = lattice().await;
    let chain = l.agents[0].chain();
    let td = lattice_shared::id::TrustDomain::new("lattice.local").expect("td");
    let root = TrustBundle::new(td, chain.root.clone()).expect("bundle");
    let inter = [CertificateDer::from(chain.intermediate.as_slice())];
    // rustls-webpki path validation (inside `verify`) to the root.
    root.verify(&chain.leaf, &inter, clock.now(), Usage::TlsClient)
        .expect("chain verifies");
    // And directly with webpki, none of our code involved.
    let root_der = CertificateDer::from(chain.root.as_slice());
    let anchor = webpki::anchor_from_trusted_cert(&root_der).expect("anchor");
    let leaf = CertificateDer::from(chain.leaf.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf).expect("ee");
    let now = rustls_pki_types::UnixTime::since_unix_epoch(
        clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time"),
    );
    ee.verify_for_usage(
        &[webpki::ring::ECDSA_P256_SHA256],
        &[anchor],
        &inter,
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .expect("webpki verifies");

    // A leaf for a us agent signed with the eu cache's CA key (as a
    // compromised or buggy cache could) is rejected by the shared verifier...
    let eu = l.cache_in("eu").expect("eu");
    let key = PrivateKey::generate_p256().expect("k");
    let forged_id = SpiffeId::parse("spiffe://lattice.local/agent/us/intruder").expect("id");
    let ident = eu.app().identity();
    let forged = ident
        .ca
        .dangerous_issue_unchecked(&key, &forged_id, clock.now(), HOUR)
        .expect("forged");
    assert!(
        root.verify(&forged, &inter, clock.now(), Usage::TlsClient)
            .is_err()
    );
    // ...by the us cache's TLS server...
    let us = l.cache_in("us").expect("us");
    let mut c = raw_cache_client(
        &l,
        &clock.shared(),
        us.addr(),
        "us",
        Some((vec![forged.clone(), chain.intermediate.clone()], &key)),
    );
    assert!(c.ping(pb::PingRequest { payload: vec![] }).await.is_err());
    // ...by the eu cache's own TLS server...
    let mut c = raw_cache_client(
        &l,
        &clock.shared(),
        eu.addr(),
        "eu",
        Some((vec![forged.clone(), chain.intermediate.clone()], &key)),
    );
    assert!(c.ping(pb::PingRequest { payload: vec![] }).await.is_err());
    // ...and by the control plane's.
    let tls = lattice_shared::tls::client_config(
        bundle(&l),
        clock.shared(),
        lattice_shared::tls::ExpectedServer::ControlPlane,
        Some(
            lattice_shared::tls::ReloadableCert::new(
                vec![forged, chain.intermediate.clone()],
                &key,
            )
            .expect("cert"),
        ),
    )
    .expect("tls");
    let mut cp = pb::control_plane_client::ControlPlaneClient::new(
        lattice_shared::net::channel(l.cp().local_addr(), tls).expect("channel"),
    );
    assert!(cp.jwks(pb::JwksRequest {}).await.is_err());
    // The legitimate agent still passes at the eu cache.
    l.agents[0]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("legitimate agent");
    l.shutdown().await;
}

#[tokio::test]
async fn certificates_renew_at_half_life_on_the_fake_clock() {
    let (l, clock) = lattice().await;
    let agent = &l.agents[0];
    assert!(
        !agent.renew_if_due().await.expect("check"),
        "not due when fresh"
    );
    let before = agent.chain().info;
    clock.advance(Duration::from_secs(31 * 60));
    // The cache serves only once it has proven freshness on the new time.
    l.caches[0].wait_fresh().await.expect("fresh");
    assert!(
        agent.renew_if_due().await.expect("renews"),
        "due past half-life"
    );
    let after = agent.chain().info;
    assert_ne!(before.serial_hex, after.serial_hex);
    assert!(after.not_after > before.not_after);
    agent
        .mint(AUDIENCE, &[], None)
        .await
        .expect("mints with the renewed certificate");

    // The cache's CA (24 h) renews after 12 h; its old signing key stays in
    // the JWKS so that tokens it signed keep verifying until they expire.
    let cache = &l.caches[0];
    let state = cache.app();
    assert!(!state.renew_if_due().await.expect("check"));
    let old_kid = state.identity().signer.kid().to_owned();
    clock.advance(Duration::from_secs(12 * 3600));
    assert!(state.renew_if_due().await.expect("renews"));
    let new_kid = state.identity().signer.kid().to_owned();
    assert_ne!(old_kid, new_kid);
    let jwks = state.jwks_json();
    assert!(jwks.contains(&old_kid) && jwks.contains(&new_kid));
    l.shutdown().await;
}

#[tokio::test]
async fn a_cache_without_a_token_or_with_a_bad_one_does_not_start() {
    let (l, _clock) = lattice_with(Spec {
        caches: vec![("eu".into(), "c".into())],
        agents: vec![],
        ..Spec::default()
    })
    .await;
    let mut cfg = l.caches[0].cfg.clone();
    cfg.id = Lattice::cache_id("eu", "fresh").parse().expect("id");
    cfg.data_dir = l.dir.join("fresh-cache");
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.join_token = None;
    let deps = || {
        let store =
            lattice_shared::store::SledStore::open(&cfg.data_dir.join("db")).expect("store");
        let vault = lattice_shared::seal::LocalKeyFile::open_or_create(&cfg.data_dir.join("kek"))
            .expect("kek");
        (store, std::sync::Arc::new(vault))
    };
    let (store, vault) = deps();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = lattice_regional_cache::App::build(
        cfg.clone(),
        lattice_regional_cache::Deps {
            clock: l.clock.clone(),
            store,
            vault,
            listener,
            audit: None,
        },
    )
    .await
    .expect_err("no token");
    assert!(
        err.to_string().contains("LATTICE_CACHE_JOIN_TOKEN"),
        "{err}"
    );

    // A token bound to another cache id.
    cfg.join_token = Some(lattice_shared::secret::Secret::new(
        l.join_token(&Lattice::cache_id("eu", "other"), None)
            .expect("token"),
    ));
    let (store, vault) = deps();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = lattice_regional_cache::App::build(
        cfg,
        lattice_regional_cache::Deps {
            clock: l.clock.clone(),
            store,
            vault,
            listener,
            audit: None,
        },
    )
    .await
    .expect_err("wrong id");
    assert!(err.to_string().contains("another id"), "{err}");
    l.shutdown().await;
}

#[tokio::test]
async fn a_malformed_csr_does_not_burn_the_join_token() {
    let (l, clock) = lattice().await;
    let mut anon = raw_cache_client(&l, &clock.shared(), l.caches[0].addr(), "eu", None);
    let token = l
        .join_token(&Lattice::agent_id("eu", "careful"), None)
        .expect("token");
    let s = anon
        .enrol(pb::EnrolAgentRequest {
            join_token: token.clone(),
            requested_id: String::new(),
            csr: vec![0x30, 0x03, 1, 2, 3],
            ..Default::default()
        })
        .await
        .expect_err("bad csr");
    assert_eq!(s.code(), Code::InvalidArgument);
    let csr = PrivateKey::generate_p256()
        .expect("k")
        .csr_der()
        .expect("csr");
    anon.enrol(pb::EnrolAgentRequest {
        join_token: token,
        requested_id: String::new(),
        csr,
        ..Default::default()
    })
    .await
    .expect("the token is still good");
    l.shutdown().await;
}

/// A cache whose enrolment is refused after its join token was redeemed
/// (it asks for a name another cache holds) keeps its one-time token: the
/// operator fixes the config and enrols with the same token.
#[tokio::test]
async fn a_cache_enrolment_refused_after_redemption_does_not_burn_the_token() {
    let (mut l, _clock) = lattice().await;
    let name = |n: &str| lattice_shared::id::HostName::parse(n).expect("name");
    l.add_cache_named(
        "eu",
        "a",
        l.join_token(&Lattice::cache_id("eu", "a"), None)
            .expect("token"),
        vec![name("cache-a.example.net")],
    )
    .await
    .expect("cache a");
    let token = l
        .join_token(&Lattice::cache_id("eu", "b"), None)
        .expect("token");
    let e = l
        .add_cache_named("eu", "b", token.clone(), vec![name("cache-a.example.net")])
        .await
        .expect_err("a name cache a holds");
    assert!(format!("{e:#}").contains("holds that name"), "{e:#}");
    l.add_cache_named("eu", "b", token, vec![name("cache-b.example.net")])
        .await
        .expect("the same token enrols once the name is fixed");
    l.shutdown().await;
}
