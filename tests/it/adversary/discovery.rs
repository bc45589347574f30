//! A standard JWT library configured for one cache (its discovery document
//! and the per-issuer JWKS it names) refuses another cache's tokens; the
//! documents are fetched with curl trusting only `root.crt` (no `-k`).

use super::*;

/// `curl --cacert root.crt URL`, or `None` when curl is not installed. It
/// runs off the test's runtime, which also drives the lattice.
async fn curl(root: &Path, url: &str) -> Option<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "20", "--cacert"])
        .arg(root)
        .arg(url);
    let out = match tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("curl task")
    {
        Ok(o) => o,
        Err(_) => {
            assert!(
                std::env::var("LATTICE_REQUIRE_CURL").as_deref() != Ok("1"),
                "curl is not installed (Debian package curl) and LATTICE_REQUIRE_CURL=1"
            );
            eprintln!("skipped: curl is not installed (Debian package curl)");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "curl --cacert root.crt {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).expect("utf-8"))
}

#[tokio::test]
async fn one_caches_discovery_document_refuses_another_caches_tokens() {
    let (l, _clock) = lattice_with(spec()).await;
    let root = l.root_pem();
    let eu = l.caches[0].addr();
    let base = format!("https://{eu}");
    let Some(_all) = curl(&root, &format!("{base}/.well-known/jwks.json")).await else {
        return l.shutdown().await;
    };
    let doc: serde_json::Value = serde_json::from_str(
        &curl(&root, &format!("{base}/.well-known/openid-configuration"))
            .await
            .expect("curl"),
    )
    .expect("discovery JSON");
    assert_eq!(doc["issuer"], l.caches[0].id().as_str());
    let jwks_uri = doc["jwks_uri"].as_str().expect("jwks_uri");
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(&curl(&root, jwks_uri).await.expect("curl")).expect("JWKS");

    // What a relying party does with a standard library: the key named by
    // `kid` in this issuer's JWKS, the issuer pinned.
    let check = |token: &str| -> Result<(), String> {
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|e| e.to_string())?
            .kid
            .ok_or("no kid")?;
        let jwk = jwks.find(&kid).ok_or("kid not in this issuer's JWKS")?;
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        v.set_audience(&[AUDIENCE]);
        v.set_issuer(&[l.caches[0].id().as_str()]);
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let own = l.agents[A]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("eu mint");
    check(&own.token).expect("the eu cache's own token verifies");
    let other = l.agents[B]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("us mint");
    let e = check(&other.token).expect_err("a us token is refused");
    assert!(e.contains("not in this issuer's JWKS"), "{e}");
    l.shutdown().await;
}

/// The same with PyJWT's `PyJWKClient`, a client no one here wrote. Python
/// is `$LATTICE_PYTHON` (default `python3`); without PyJWT the test skips
/// with a message, or fails when `LATTICE_REQUIRE_PYTHON=1` (as in CI).
#[tokio::test]
async fn pyjwt_with_one_caches_discovery_document_refuses_another_caches_tokens() {
    let python = std::env::var("LATTICE_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_pyjwt = Command::new(&python)
        .args(["-c", "import jwt, cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_pyjwt {
        assert!(
            std::env::var("LATTICE_REQUIRE_PYTHON").as_deref() != Ok("1"),
            "{python} lacks PyJWT (pip install pyjwt cryptography) and LATTICE_REQUIRE_PYTHON=1"
        );
        eprintln!("skipped: {python} lacks the Python packages pyjwt and cryptography");
        return;
    }
    let (l, _clock) = lattice_with(spec()).await;
    let own = l.agents[A]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("eu mint");
    let other = l.agents[B]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("us mint");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/pyjwt_per_issuer.py");
    let mut cmd = Command::new(&python);
    cmd.arg(script)
        .arg(format!(
            "https://{}/.well-known/openid-configuration",
            l.caches[0].addr()
        ))
        .arg(l.root_pem())
        .args([AUDIENCE, own.token.as_str(), other.token.as_str()]);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("python task")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("own: verified"), "{stdout}");
    assert!(stdout.contains("other: refused"), "{stdout}");
    l.shutdown().await;
}
