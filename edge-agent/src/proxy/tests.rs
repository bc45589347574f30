//! The proxy end to end: a loopback upstream, a fake lease source and
//! raw HTTP/1.1 clients.

use super::scrub::{contains, find};
use super::*;
use futures::future::BoxFuture;
use http::header::HeaderMap;
use hyper::body::Frame;
use lattice_shared::clock::{Clock, FakeClock};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

/// Upper bound on any single network step in these tests (not a sleep).
const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "openai";

fn key(version: u64) -> String {
    format!("sk-live-{version}-Zq8XwP3mT7vR2nK9")
}

struct FakeSource {
    clock: FakeClock,
    ttl_secs: i64,
    leases: AtomicU64,
    refuse: Mutex<Option<String>>,
}

impl FakeSource {
    fn count(&self) -> u64 {
        self.leases.load(Ordering::SeqCst)
    }
}

impl SecretSource for FakeSource {
    fn lease<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<LeasedKey, LeaseError>> {
        Box::pin(async move {
            if let Some(m) = self.refuse.lock().expect("lock").clone() {
                return Err(m.into());
            }
            let v = self.leases.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(LeasedKey {
                value: Zeroizing::new(key(v).into_bytes()),
                fingerprint: format!("fp-{name}-{v}"),
                expires_at_unix: self.clock.now_unix() + self.ttl_secs,
                version: v,
            })
        })
    }
}

#[derive(Default)]
struct RecAudit(Mutex<Vec<ProxyEvent>>);

impl RecAudit {
    fn events(&self) -> Vec<ProxyEvent> {
        self.0.lock().expect("lock").clone()
    }
}

impl ProxyAudit for RecAudit {
    fn record(&self, e: ProxyEvent) {
        self.0.lock().expect("lock").push(e);
    }
}

#[derive(Clone)]
struct Seen {
    uri: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A loopback upstream that records what it receives and echoes the
/// `authorization` and `x-api-key` values back in a header and the body.
struct TestUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    accepted: Arc<AtomicUsize>,
}

impl TestUpstream {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn echo(req: Request<Incoming>, seen: Arc<Mutex<Vec<Seen>>>) -> Response<TestBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let sent: Vec<String> = ["authorization", "x-api-key"]
        .iter()
        .flat_map(|h| parts.headers.get_all(*h).iter())
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let sent = sent.join(",");
    seen.lock().expect("lock").push(Seen {
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body,
    });
    let text = format!("you sent: {sent} and again {sent}.");
    let mut b = Response::builder()
        .header("x-echo", sent.as_str())
        .header("x-other", "kept");
    let path = parts.uri.path();
    let body = if path.starts_with("/stream") {
        // Small chunks, so the key crosses chunk boundaries.
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = text
            .as_bytes()
            .chunks(5)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed()
    } else {
        if path.starts_with("/gzip") {
            b = b.header("content-encoding", "gzip");
        }
        b = b.header("content-length", text.len());
        Full::new(Bytes::from(text)).boxed()
    };
    b.body(body).expect("response")
}

async fn upstream(tls: Option<Arc<rustls::ServerConfig>>) -> TestUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (s, a) = (seen.clone(), accepted.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let (seen, tls) = (s.clone(), tls.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let seen = seen.clone();
                    async move { Ok::<_, Infallible>(echo(req, seen).await) }
                });
                let b = hyper::server::conn::http1::Builder::new();
                let _ = match tls {
                    Some(cfg) => {
                        let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await
                        else {
                            return;
                        };
                        b.serve_connection(TokioIo::new(s), svc).await
                    }
                    None => b.serve_connection(TokioIo::new(stream), svc).await,
                };
            });
        }
    });
    TestUpstream {
        addr,
        seen,
        accepted,
    }
}

struct Harness {
    addr: SocketAddr,
    audit: Arc<RecAudit>,
    source: Arc<FakeSource>,
    clock: FakeClock,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(cfg: ProxyConfig) -> Harness {
    let clock = FakeClock::new();
    let source = Arc::new(FakeSource {
        clock: clock.clone(),
        ttl_secs: 300,
        leases: AtomicU64::new(0),
        refuse: Mutex::new(None),
    });
    let audit = Arc::new(RecAudit::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let proxy =
        Proxy::build(Arc::new(cfg), source.clone(), audit.clone(), clock.shared()).expect("build");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(proxy.serve(listener, async {
        let _ = rx.await;
    }));
    Harness {
        addr,
        audit,
        source,
        clock,
        _stop: tx,
    }
}

fn plain_upstream(addr: SocketAddr, header: &str, template: &str) -> Upstream {
    Upstream {
        host: addr.to_string(),
        secret: SECRET.into(),
        header: header.into(),
        template: template.into(),
        tls: false,
        port: None,
    }
}

fn config(upstreams: Vec<Upstream>) -> ProxyConfig {
    ProxyConfig {
        upstreams,
        ..ProxyConfig::default()
    }
}

struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
    raw: Vec<u8>,
}

/// Sends raw request bytes and reads the whole answer (the request asks
/// the proxy to close the connection).
async fn call(addr: SocketAddr, req: &str) -> Reply {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("the proxy answered in time")
        .expect("read");
    let split = find(&raw, b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let rest = &raw[split + 4..];
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Reply {
        status,
        head,
        body,
        raw,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = find(b, b"\r\n").expect("chunk size line");
        let size = std::str::from_utf8(&b[..eol]).expect("utf8");
        let size =
            usize::from_str_radix(size.split(';').next().unwrap_or(""), 16).expect("chunk size");
        b = &b[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn get(host: &str, target: &str, extra: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
}

fn body_str(r: &Reply) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn own_uid() -> u32 {
    own_euid().expect("own uid")
}

#[tokio::test]
async fn injects_the_key_and_scrubs_it_from_the_response() {
    let up = upstream(None).await;
    let h = start(config(vec![plain_upstream(
        up.addr,
        "authorization",
        "Bearer {secret}",
    )]))
    .await;
    let host = up.addr.to_string();
    let r = call(
        h.addr,
        &get(
            &host,
            "/v1/echo?user=1",
            "Authorization: Bearer sk-client-supplied\r\nProxy-Authorization: Basic eA==\r\n\
             Connection: x-drop-me\r\nX-Drop-Me: 1\r\nX-Keep: 2\r\n",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", body_str(&r));

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    let auth: Vec<_> = seen[0].headers.get_all("authorization").iter().collect();
    assert_eq!(auth, vec![format!("Bearer {}", key(1)).as_str()]);
    assert_eq!(seen[0].uri, "/v1/echo?user=1");
    assert_eq!(seen[0].headers["host"], host.as_str());
    assert_eq!(seen[0].headers["accept-encoding"], "identity");
    assert_eq!(seen[0].headers["x-keep"], "2");
    for dropped in ["proxy-authorization", "x-drop-me"] {
        assert!(
            !seen[0].headers.contains_key(dropped),
            "{dropped} forwarded"
        );
    }

    let k = key(1);
    assert!(
        !contains(&r.raw, k.as_bytes()),
        "the key reached the client"
    );
    assert!(!contains(&r.raw, b"sk-client-supplied"));
    let head = r.head.to_ascii_lowercase();
    assert!(head.contains("x-echo: bearer [redacted]"), "{}", r.head);
    assert!(head.contains("x-other: kept"));
    assert!(head.contains("x-lattice-request-id: "));
    assert_eq!(
        body_str(&r),
        "you sent: Bearer [REDACTED] and again Bearer [REDACTED]."
    );

    let events = h.audit.events();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.kind, ProxyEventKind::Use);
    assert_eq!(e.kind.as_str(), "proxy_use");
    assert_eq!(e.resource, SECRET);
    assert_eq!(e.detail, format!("GET {host} /v1/echo"));
    assert_eq!(e.status, 200);
    assert_eq!(e.fingerprint.as_deref(), Some("fp-openai-1"));
    assert_eq!(e.key_version, Some(1));
    assert_eq!(e.local_caller, Some(own_uid()));
    assert!(head.contains(&format!("x-lattice-request-id: {}", e.request_id)));
    assert!(!format!("{e:?}").contains(&k));
}

#[tokio::test]
async fn absolute_form_x_api_key_and_a_streamed_body_split_across_chunks() {
    let up = upstream(None).await;
    let h = start(config(vec![plain_upstream(
        up.addr,
        "x-api-key",
        "{secret}",
    )]))
    .await;
    let host = up.addr.to_string();
    let r = call(
        h.addr,
        &get(
            &host,
            &format!("http://{host}/stream/v1"),
            "x-api-key: mine\r\nX-API-Key: mine-too\r\n",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", body_str(&r));
    let seen = up.seen();
    let sent: Vec<_> = seen[0].headers.get_all("x-api-key").iter().collect();
    assert_eq!(sent, vec![key(1).as_str()]);
    assert_eq!(seen[0].uri, "/stream/v1");
    assert!(!contains(&r.raw, key(1).as_bytes()));
    assert_eq!(body_str(&r), "you sent: [REDACTED] and again [REDACTED].");
}

#[tokio::test]
async fn post_body_is_forwarded_and_oversized_bodies_refused() {
    let up = upstream(None).await;
    let mut cfg = config(vec![plain_upstream(
        up.addr,
        "authorization",
        "Bearer {secret}",
    )]);
    cfg.max_request_body_bytes = 16;
    let h = start(cfg).await;
    let host = up.addr.to_string();
    let post = |body: &str| {
        format!(
            "POST /v1/x HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let r = call(h.addr, &post("{\"a\":1}")).await;
    assert_eq!(r.status, 200, "{}", body_str(&r));
    assert_eq!(up.seen()[0].body, Bytes::from_static(b"{\"a\":1}"));
    let r = call(h.addr, &post("0123456789abcdefXYZ")).await;
    assert_eq!(r.status, 413, "{}", body_str(&r));
    assert_eq!(up.seen().len(), 1);
}

#[tokio::test]
async fn compressed_responses_are_refused() {
    let up = upstream(None).await;
    let h = start(config(vec![plain_upstream(
        up.addr,
        "authorization",
        "Bearer {secret}",
    )]))
    .await;
    let r = call(h.addr, &get(&up.addr.to_string(), "/gzip", "")).await;
    assert_eq!(r.status, 502);
    assert!(
        body_str(&r).contains("content-encoding: gzip"),
        "{}",
        body_str(&r)
    );
    assert!(!contains(&r.raw, key(1).as_bytes()));
}

/// A CA, a certificate for `localhost` it signs, and a TLS server config.
fn test_pki() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "proxy test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server config");
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    (ca.pem(), Arc::new(server))
}

#[tokio::test]
async fn https_upstream_needs_a_trusted_certificate() {
    let (ca_pem, server) = test_pki();
    let up = upstream(Some(server)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_pem).expect("write");
    let u = Upstream {
        host: "localhost".into(),
        secret: SECRET.into(),
        header: "authorization".into(),
        template: "Bearer {secret}".into(),
        tls: true,
        port: Some(up.addr.port()),
    };
    let req = get("localhost", "http://localhost/v1/echo", "");

    let mut cfg = config(vec![u.clone()]);
    cfg.extra_ca = Some(ca_path);
    let h = start(cfg).await;
    let r = call(h.addr, &req).await;
    assert_eq!(r.status, 200, "{}", body_str(&r));
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {}", key(1)).as_str()
    );
    assert_eq!(
        seen[0].headers["host"],
        format!("localhost:{}", up.addr.port()).as_str()
    );
    assert!(!contains(&r.raw, key(1).as_bytes()));
    assert!(body_str(&r).contains("Bearer [REDACTED]"));

    // Without the extra CA the upstream's certificate is not trusted.
    let h = start(config(vec![u])).await;
    let r = call(h.addr, &req).await;
    assert_eq!(r.status, 502, "{}", body_str(&r));
    assert!(body_str(&r).contains("TLS handshake"), "{}", body_str(&r));
    assert_eq!(up.seen().len(), 1, "no request reached the upstream");
}

#[tokio::test]
async fn hosts_off_the_allowlist_and_connect_are_refused() {
    let up = upstream(None).await;
    let h = start(config(vec![Upstream {
        host: "api.example.com".into(),
        secret: SECRET.into(),
        header: "authorization".into(),
        template: "Bearer {secret}".into(),
        tls: true,
        port: None,
    }]))
    .await;
    let host = up.addr.to_string();
    let r = call(h.addr, &get(&host, "/v1/echo", "")).await;
    assert_eq!(r.status, 403);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("content-type: text/plain")
    );
    assert_eq!(
        body_str(&r),
        format!("lattice proxy: host {host} is not on this agent's allowlist of upstreams\n")
    );
    // Absolute form names the target; the Host header does not override it.
    let r = call(
        h.addr,
        &get("api.example.com", &format!("http://{host}/v1/echo"), ""),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 0, "upstream contacted");
    assert_eq!(h.source.count(), 0, "a key was leased");

    let r = call(
        h.addr,
        "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 405);
    assert!(body_str(&r).contains("CONNECT is not supported"));
    assert_eq!(h.source.count(), 0);
    let r = call(
        h.addr,
        "TRACE http://api.example.com/ HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 405, "TRACE would echo the key");
    assert_eq!(h.source.count(), 0);

    let events = h.audit.events();
    assert_eq!(events.len(), 4);
    assert!(events.iter().all(|e| e.kind == ProxyEventKind::Refused
        && e.kind.as_str() == "proxy_refused"
        && e.fingerprint.is_none()
        && e.local_caller == Some(own_uid())));
    assert_eq!(events[0].resource, host);
    assert_eq!(events[0].status, 403);
    assert_eq!(events[1].resource, host);
    assert_eq!(events[2].resource, "api.example.com:443");
    assert_eq!(events[2].status, 405);
}

#[tokio::test]
async fn lease_is_cached_until_shortly_before_it_expires() {
    let up = upstream(None).await;
    let h = start(config(vec![plain_upstream(
        up.addr,
        "authorization",
        "Bearer {secret}",
    )]))
    .await;
    let host = up.addr.to_string();
    let req = get(&host, "/v1/echo", "");
    for _ in 0..2 {
        assert_eq!(call(h.addr, &req).await.status, 200);
    }
    assert_eq!(h.source.count(), 1);
    // The lease lives 300 s and is renewed 30 s before it expires.
    h.clock.advance(Duration::from_secs(269));
    assert_eq!(call(h.addr, &req).await.status, 200);
    assert_eq!(h.source.count(), 1);
    h.clock.advance(Duration::from_secs(1));
    let r = call(h.addr, &req).await;
    assert_eq!(r.status, 200);
    assert_eq!(h.source.count(), 2);
    let seen: Vec<String> = up
        .seen()
        .iter()
        .map(|s| String::from_utf8_lossy(s.headers["authorization"].as_bytes()).into_owned())
        .collect();
    let (k1, k2) = (format!("Bearer {}", key(1)), format!("Bearer {}", key(2)));
    assert_eq!(seen, vec![k1.clone(), k1.clone(), k1, k2]);
    // The new key is scrubbed too.
    assert!(!contains(&r.raw, key(2).as_bytes()));
    assert!(body_str(&r).contains("[REDACTED]"));
}

#[tokio::test]
async fn refused_lease_is_503_with_the_cache_message() {
    let up = upstream(None).await;
    let h = start(config(vec![plain_upstream(
        up.addr,
        "authorization",
        "Bearer {secret}",
    )]))
    .await;
    *h.source.refuse.lock().expect("lock") = Some("policy denies openai\r\nX-Evil: 1".into());
    let r = call(h.addr, &get(&up.addr.to_string(), "/v1/echo", "")).await;
    assert_eq!(r.status, 503);
    let body = body_str(&r);
    assert!(body.contains("policy denies openai"), "{body}");
    assert!(!r.head.to_ascii_lowercase().contains("x-evil"));
    assert_eq!(up.accepted.load(Ordering::SeqCst), 0);
    let events = h.audit.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, ProxyEventKind::Refused);
    assert_eq!(events[0].resource, SECRET);
    assert_eq!(events[0].status, 503);
}

#[tokio::test]
async fn caller_uid_is_checked_against_the_allowed_list() {
    let up = upstream(None).await;
    let me = own_uid();
    let u = plain_upstream(up.addr, "authorization", "Bearer {secret}");
    let req = get(&up.addr.to_string(), "/v1/echo", "");

    let mut cfg = config(vec![u.clone()]);
    cfg.allowed_uids = vec![me];
    let h = start(cfg).await;
    assert_eq!(call(h.addr, &req).await.status, 200);

    let mut cfg = config(vec![u]);
    cfg.allowed_uids = vec![me.wrapping_add(1)];
    let h = start(cfg).await;
    let r = call(h.addr, &req).await;
    assert_eq!(r.status, 403);
    // The uid in the refusal came from the /proc lookup.
    assert_eq!(
        body_str(&r),
        format!("lattice proxy: local uid {me} is not allowed to use this proxy\n")
    );
    assert_eq!(h.source.count(), 0);
    assert_eq!(up.seen().len(), 1, "only the allowed caller got through");
    let events = h.audit.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, ProxyEventKind::Refused);
    assert_eq!(events[0].local_caller, Some(me));
}
