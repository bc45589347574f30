//! The credential-injecting HTTP proxy: local AI-agent processes call
//! allowlisted upstream APIs through it, and it adds the upstream API key
//! (leased from the regional cache) on the way out, so the calling process
//! never holds a long-lived upstream key.
//!
//! # What it does
//! - Listens on a loopback address only. Each connection is attributed to a
//!   local uid by looking the TCP connection up in `/proc/net/tcp{,6}` (the
//!   listener is TCP, so `SO_PEERCRED` does not apply); callers whose uid is
//!   not allowed are answered 403, and a failed lookup refuses (fail closed).
//!   That lookup exists on Linux only: elsewhere every caller is refused.
//! - Routes by the target host of the request: the authority of an
//!   absolute-form request (`GET http://api.example.com/v1/x HTTP/1.1`, what a
//!   client configured with `HTTP_PROXY` sends) or else the `Host` header
//!   (origin-form, a client whose base URL is `http://127.0.0.1:PORT`). Hosts
//!   not configured as an [`Upstream`] are refused with 403 and never
//!   contacted.
//! - For an allowlisted host: leases the secret (cached until shortly before
//!   the lease expires, per the injected clock), drops every header the client
//!   sent under the upstream's key header name, sets that header from the
//!   template, forces `Accept-Encoding: identity`, and forwards the request
//!   over TLS (webpki roots plus an optional extra CA) unless the upstream is
//!   configured `tls = false`.
//! - Scrubs the key value from the response: header values, and the body as a
//!   stream (a tail of `len - 1` bytes is held back so a key straddling chunk
//!   boundaries is still caught); each occurrence becomes `[REDACTED]`. A
//!   response with a `Content-Encoding` other than identity is refused (502):
//!   a compressed body cannot be scrubbed.
//! - Records an audit event for every use (`proxy_use`) and refusal
//!   (`proxy_refused`), Prometheus metrics, and `tracing` logs; the key is
//!   never logged, formatted or audited (only its fingerprint).
//!
//! # Why plain HTTP on loopback, TLS to the upstream (and no `CONNECT`)
//! The client speaks plain HTTP to this proxy and the proxy opens TLS to the
//! upstream. `CONNECT` is refused with 405: tunnelling TLS through the proxy
//! would leave it blind to the request (no way to add the key), unless the
//! proxy terminated TLS with a local interception CA that the AI process
//! trusts. That CA would be a long-lived signing key on the device able to
//! impersonate any site to that process, and installing it means editing the
//! AI process's trust store. This design keeps that trust store untouched,
//! and no secret ever crosses the loopback link (the key exists only inside
//! this process and on the TLS link to the upstream). The cost: clients must
//! use `http://` URLs to the proxy (a base URL `http://127.0.0.1:PORT` plus
//! `Host`, or `HTTP_PROXY` with `http://` upstream URLs), and traffic between
//! the AI process and the proxy is readable by other local processes able to
//! sniff loopback (which could see prompts and answers, not the key).
//!
//! # Limits
//! Request head and body sizes, response body size, concurrent connections,
//! header-read, connect, response and body-idle timeouts are all bounded by
//! [`ProxyConfig`]. One upstream connection per request (no pooling);
//! response trailers are dropped; protocol upgrades are not forwarded.
//! Copies of the header value that hyper makes in its write buffer are not
//! zeroized; the copies this module owns are.
//!
//! # Parts
//! This module serves and routes requests; `config` holds the settings,
//! `source` the lease source, its cache and the audit types, `route` a
//! resolved upstream and a request's target, `scrub` and `body` the key's
//! removal from responses, and `peer_uid` the caller's uid.

mod body;
mod config;
mod peer_uid;
mod route;
mod scrub;
mod source;
#[cfg(test)]
mod tests;

pub use config::{ProxyConfig, Upstream};
pub use scrub::{Scrubber, scrub_all};
pub use source::{LeaseError, LeasedKey, ProxyAudit, ProxyEvent, ProxyEventKind, SecretSource};

use body::{ProxyBody, ScrubBody};
use peer_uid::{caller_uid, own_euid};
use route::{Route, Target, strip_hop_by_hop};
use scrub::scrub_headers;
use source::CachedLease;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use lattice_shared::clock::SharedClock;
use lattice_shared::limits::REQUEST_ID_HEADER;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

/// What replaces each occurrence of the key in a response.
pub const REDACTED: &[u8] = b"[REDACTED]";
/// The placeholder in [`Upstream::template`].
pub const SECRET_PLACEHOLDER: &str = "{secret}";
/// A cached lease is renewed this long before it expires (or at half its
/// remaining lifetime, if that is shorter).
pub const LEASE_REFRESH_MARGIN_SECS: i64 = 30;
/// Connections still open when `stop` resolves get this long to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Longest lease refusal message from the cache passed on to the client.
const MAX_REASON_LEN: usize = 300;
/// Longest path kept in an audit event's `detail`.
const MAX_AUDIT_PATH_LEN: usize = 256;

/// Metric names.
pub mod metric {
    /// Counter, label `outcome`.
    pub const REQUESTS: &str = "lattice_agent_proxy_requests_total";
    /// Histogram (seconds) until the response head, label `outcome`.
    pub const DURATION: &str = "lattice_agent_proxy_request_duration_seconds";
    /// Counter of leases taken from the cache, label `result`.
    pub const LEASES: &str = "lattice_agent_proxy_leases_total";
}

/// Errors building or starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy configuration: {0}")]
    Config(String),
    #[error("proxy listener: {0}")]
    Io(#[from] std::io::Error),
}

/// A built proxy: configuration checked, routes and TLS ready. Build it
/// before binding the port, so a bad configuration fails first.
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Arc<ProxyConfig>,
    routes: HashMap<String, Arc<Route>>,
    /// One slot a configured secret; the mutex makes concurrent requests
    /// wait for a single lease.
    leases: HashMap<String, tokio::sync::Mutex<Option<CachedLease>>>,
    tls: tokio_rustls::TlsConnector,
    source: Arc<dyn SecretSource>,
    audit: Arc<dyn ProxyAudit>,
    clock: SharedClock,
    allowed_uids: Vec<u32>,
}

impl Proxy {
    /// Checks `cfg`, reads the extra CA file and prepares the routes.
    pub fn build(
        cfg: Arc<ProxyConfig>,
        source: Arc<dyn SecretSource>,
        audit: Arc<dyn ProxyAudit>,
        clock: SharedClock,
    ) -> Result<Proxy, ProxyError> {
        cfg.validate().map_err(ProxyError::Config)?;
        let mut routes = HashMap::new();
        let mut leases = HashMap::new();
        for u in &cfg.upstreams {
            let r = Route::from_config(u).map_err(ProxyError::Config)?;
            if !r.tls && !is_loopback_name(&r.connect_host) {
                tracing::warn!(
                    upstream = %r.key,
                    "upstream configured with tls = false: its key crosses the network in clear text"
                );
            }
            leases
                .entry(r.secret.clone())
                .or_insert_with(|| tokio::sync::Mutex::new(None));
            routes.insert(r.key.clone(), Arc::new(r));
        }
        let allowed_uids = if cfg.allowed_uids.is_empty() {
            vec![own_euid().map_err(ProxyError::Config)?]
        } else {
            cfg.allowed_uids.clone()
        };
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&cfg)?));
        Ok(Proxy {
            inner: Arc::new(Inner {
                cfg,
                routes,
                leases,
                tls,
                source,
                audit,
                clock,
                allowed_uids,
            }),
        })
    }

    /// Serves `listener` (which must be bound to a loopback address) until
    /// `stop` resolves, then lets open connections finish their current
    /// request for up to [`SHUTDOWN_GRACE`].
    pub async fn serve(
        self,
        listener: TcpListener,
        stop: impl Future<Output = ()>,
    ) -> Result<(), ProxyError> {
        let local = listener.local_addr()?;
        if !local.ip().is_loopback() {
            return Err(ProxyError::Config(format!(
                "listener {local} is not on a loopback address"
            )));
        }
        tracing::info!(%local, upstreams = self.inner.routes.len(), "credential proxy listening");
        let slots = Arc::new(tokio::sync::Semaphore::new(self.inner.cfg.max_connections));
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let mut conns = tokio::task::JoinSet::new();
        tokio::pin!(stop);
        loop {
            // At the connection limit, stop accepting: the kernel backlog
            // holds the rest.
            let permit = tokio::select! {
                _ = &mut stop => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                _ = &mut stop => break,
                a = listener.accept() => a,
            };
            while conns.try_join_next().is_some() {}
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let inner = self.inner.clone();
            let shutdown = shutdown_rx.clone();
            conns.spawn(async move {
                inner.connection(stream, peer, local, shutdown).await;
                drop(permit);
            });
        }
        drop(listener);
        shutdown_tx.send_replace(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                open = conns.len(),
                "proxy connections still open after the grace period; closing them"
            );
            conns.abort_all();
        }
        Ok(())
    }
}

fn is_loopback_name(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

fn client_tls(cfg: &ProxyConfig) -> Result<rustls::ClientConfig, ProxyError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = &cfg.extra_ca {
        let certs = lattice_shared::pem::read_certs(path)
            .map_err(|e| ProxyError::Config(format!("proxy.extra_ca: {e}")))?;
        for der in certs {
            roots.add(CertificateDer::from(der)).map_err(|e| {
                ProxyError::Config(format!("proxy.extra_ca {}: {e}", path.display()))
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxyError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// The caller as far as this connection is concerned.
#[derive(Clone)]
enum Caller {
    Allowed(u32),
    Refused { uid: Option<u32>, reason: String },
}

impl Caller {
    fn uid(&self) -> Option<u32> {
        match self {
            Caller::Allowed(u) => Some(*u),
            Caller::Refused { uid, .. } => *uid,
        }
    }
}

/// How a request ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Forwarded,
    CallerRefused,
    HostRefused,
    ConnectRefused,
    BadRequest,
    TooLarge,
    LeaseRefused,
    UpstreamError,
    UpstreamTimeout,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::CallerRefused => "caller_refused",
            Outcome::HostRefused => "host_refused",
            Outcome::ConnectRefused => "connect_refused",
            Outcome::BadRequest => "bad_request",
            Outcome::TooLarge => "too_large",
            Outcome::LeaseRefused => "lease_refused",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
        }
    }
}

/// Fields common to the audit events of one request.
struct RequestCtx {
    request_id: String,
    caller: Option<u32>,
    detail: String,
}

impl Inner {
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let _ = stream.set_nodelay(true);
        let caller = match caller_uid(peer, local).await {
            Ok(uid) if self.allowed_uids.contains(&uid) => Caller::Allowed(uid),
            Ok(uid) => {
                tracing::warn!(%peer, uid, "proxy connection from a uid that is not allowed");
                Caller::Refused {
                    uid: Some(uid),
                    reason: format!("local uid {uid} is not allowed to use this proxy"),
                }
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "could not identify the process behind a proxy connection; refusing it");
                Caller::Refused {
                    uid: None,
                    reason: "the calling process could not be identified".into(),
                }
            }
        };
        let refused = matches!(caller, Caller::Refused { .. });
        let me = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let me = me.clone();
            let caller = caller.clone();
            async move { Ok::<_, Infallible>(me.handle(req, caller).await) }
        });
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(self.cfg.header_read_timeout_secs))
            .max_header_size(self.cfg.max_request_head_bytes)
            .max_headers(self.cfg.max_request_headers)
            .keep_alive(!refused);
        let conn = b.serve_connection(TokioIo::new(stream), svc);
        tokio::pin!(conn);
        let done = tokio::select! {
            r = conn.as_mut() => Some(r),
            _ = shutdown.wait_for(|s| *s) => None,
        };
        let r = match done {
            Some(r) => r,
            None => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "proxy connection ended with an error");
        }
    }

    async fn handle(&self, req: Request<Incoming>, caller: Caller) -> Response<ProxyBody> {
        let started = Instant::now();
        let request_id = new_request_id();
        let span = tracing::info_span!("proxy", request_id = %request_id, caller = ?caller.uid());
        let (mut resp, outcome) =
            tracing::Instrument::instrument(self.route(req, caller, &request_id), span).await;
        let labels = [("outcome", outcome.as_str())];
        metrics::counter!(metric::REQUESTS, &labels).increment(1);
        metrics::histogram!(metric::DURATION, &labels).record(started.elapsed().as_secs_f64());
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            resp.headers_mut()
                .insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
        }
        resp
    }

    fn refuse(
        &self,
        ctx: &RequestCtx,
        resource: &str,
        status: StatusCode,
        reason: &str,
        outcome: Outcome,
    ) -> (Response<ProxyBody>, Outcome) {
        tracing::info!(
            resource,
            status = status.as_u16(),
            reason,
            "proxy request refused"
        );
        self.audit.record(ProxyEvent {
            kind: ProxyEventKind::Refused,
            resource: resource.to_owned(),
            detail: ctx.detail.clone(),
            reason: reason.to_owned(),
            status: status.as_u16(),
            fingerprint: None,
            key_version: None,
            local_caller: ctx.caller,
            request_id: ctx.request_id.clone(),
            at_unix_ms: self.clock.now_unix_ms(),
        });
        (plain(status, reason), outcome)
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        caller: Caller,
        request_id: &str,
    ) -> (Response<ProxyBody>, Outcome) {
        let target = Target::of(&req);
        let host_for_audit = match &target {
            Ok(t) => t.key.clone(),
            Err(_) => req
                .uri()
                .authority()
                .map(|a| a.as_str().to_ascii_lowercase())
                .unwrap_or_default(),
        };
        let path = truncate(req.uri().path(), MAX_AUDIT_PATH_LEN).to_owned();
        let ctx = RequestCtx {
            request_id: request_id.to_owned(),
            caller: caller.uid(),
            detail: format!("{} {} {}", req.method(), host_for_audit, path),
        };
        if let Caller::Refused { reason, .. } = &caller {
            return self.refuse(
                &ctx,
                &host_for_audit,
                StatusCode::FORBIDDEN,
                reason,
                Outcome::CallerRefused,
            );
        }
        if req.method() == Method::TRACE {
            return self.refuse(
                &ctx,
                &host_for_audit,
                StatusCode::METHOD_NOT_ALLOWED,
                "TRACE is not forwarded: the upstream would echo the injected key",
                Outcome::ConnectRefused,
            );
        }
        if req.method() == Method::CONNECT {
            return self.refuse(
                &ctx,
                &host_for_audit,
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported: a tunnel would hide the request from the proxy, which \
                 must add the API key itself. Use a plain http:// URL to the upstream through this \
                 proxy (HTTP_PROXY, or base URL http://127.0.0.1:PORT with a Host header); the \
                 proxy opens TLS to the upstream",
                Outcome::ConnectRefused,
            );
        }
        let target = match target {
            Ok(t) => t,
            Err(msg) => return (plain(StatusCode::BAD_REQUEST, &msg), Outcome::BadRequest),
        };
        let Some(route) = self.routes.get(&target.key).cloned() else {
            return self.refuse(
                &ctx,
                &target.key,
                StatusCode::FORBIDDEN,
                &format!(
                    "host {} is not on this agent's allowlist of upstreams",
                    target.key
                ),
                Outcome::HostRefused,
            );
        };

        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, self.cfg.max_request_body_bytes)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return (
                    plain(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &format!(
                            "request body larger than {} bytes",
                            self.cfg.max_request_body_bytes
                        ),
                    ),
                    Outcome::TooLarge,
                );
            }
            Err(e) => {
                return (
                    plain(
                        StatusCode::BAD_REQUEST,
                        &format!("could not read the request body: {e}"),
                    ),
                    Outcome::BadRequest,
                );
            }
        };

        let key = match self.lease(&route.secret).await {
            Ok(k) => k,
            Err(msg) => {
                return self.refuse(
                    &ctx,
                    &route.secret,
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!(
                        "no key for {}: the regional cache refused the lease of secret {}: {}",
                        route.key,
                        route.secret,
                        sanitise(&msg)
                    ),
                    Outcome::LeaseRefused,
                );
            }
        };
        let auth = match route.header_value(&key.value) {
            Ok(v) => v,
            Err(msg) => {
                return self.refuse(
                    &ctx,
                    &route.secret,
                    StatusCode::SERVICE_UNAVAILABLE,
                    &msg,
                    Outcome::LeaseRefused,
                );
            }
        };

        let mut out = Request::new(Full::new(body.clone()));
        *out.method_mut() = parts.method.clone();
        *out.uri_mut() = Uri::from(target.path_and_query);
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        // Range requests could fetch an echoed key in pieces the scrubber
        // never sees whole: always ask for the whole body.
        for h in [
            header::HOST,
            header::CONTENT_LENGTH,
            header::EXPECT,
            header::ACCEPT_ENCODING,
            header::RANGE,
            header::IF_RANGE,
        ] {
            headers.remove(h);
        }
        headers.remove(HeaderName::from_static(REQUEST_ID_HEADER));
        // Whatever the client put under the key's header name goes; only the
        // injected value is sent.
        headers.remove(&route.header);
        headers.insert(&route.header, auth);
        headers.insert(header::HOST, route.host_header.clone());
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        if !body.is_empty() || !matches!(parts.method, Method::GET | Method::HEAD) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        *out.headers_mut() = headers;

        let sent = self.exchange(&route, out).await;
        let (status, result) = match sent {
            Ok(resp) => match self.response(resp, &parts.method, &key) {
                Ok(r) => (r.status(), Ok(r)),
                Err(msg) => (
                    StatusCode::BAD_GATEWAY,
                    Err((StatusCode::BAD_GATEWAY, msg, Outcome::UpstreamError)),
                ),
            },
            Err((code, msg, outcome)) => (code, Err((code, msg, outcome))),
        };
        self.audit.record(ProxyEvent {
            kind: ProxyEventKind::Use,
            resource: route.secret.clone(),
            detail: ctx.detail.clone(),
            reason: String::new(),
            status: status.as_u16(),
            fingerprint: Some(key.fingerprint.clone()),
            key_version: Some(key.version),
            local_caller: ctx.caller,
            request_id: ctx.request_id.clone(),
            at_unix_ms: self.clock.now_unix_ms(),
        });
        match result {
            Ok(r) => {
                tracing::info!(
                    upstream = %route.key,
                    secret = %route.secret,
                    fingerprint = %key.fingerprint,
                    method = %parts.method,
                    path = %path,
                    status = status.as_u16(),
                    "proxied with an injected key"
                );
                (r, Outcome::Forwarded)
            }
            Err((code, msg, outcome)) => {
                // The message comes from our own I/O and TLS errors; scrub it
                // anyway, it is cheap.
                let msg =
                    String::from_utf8_lossy(&scrub_all(&key.value, msg.as_bytes())).into_owned();
                tracing::warn!(upstream = %route.key, error = %msg, "upstream request failed");
                (
                    plain(code, &format!("upstream {}: {msg}", route.key)),
                    outcome,
                )
            }
        }
    }

    /// Sends `req` on a new connection to the upstream and waits for the
    /// response head.
    async fn exchange(
        &self,
        route: &Route,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, (StatusCode, String, Outcome)> {
        let connect_timeout = Duration::from_secs(self.cfg.connect_timeout_secs);
        let connect = async {
            let tcp = TcpStream::connect((route.connect_host.as_str(), route.port))
                .await
                .map_err(|e| format!("connect to port {}: {e}", route.port))?;
            let _ = tcp.set_nodelay(true);
            if route.tls {
                let tls = self
                    .tls
                    .connect(route.server_name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                handshake(tls).await
            } else {
                handshake(tcp).await
            }
        };
        let mut sender = match tokio::time::timeout(connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err((StatusCode::BAD_GATEWAY, e, Outcome::UpstreamError)),
            Err(_) => {
                return Err((
                    StatusCode::BAD_GATEWAY,
                    format!("no connection within {}s", self.cfg.connect_timeout_secs),
                    Outcome::UpstreamTimeout,
                ));
            }
        };
        let response_timeout = Duration::from_secs(self.cfg.response_timeout_secs);
        match tokio::time::timeout(response_timeout, sender.send_request(req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err((
                StatusCode::BAD_GATEWAY,
                format!("request failed: {e}"),
                Outcome::UpstreamError,
            )),
            Err(_) => Err((
                StatusCode::GATEWAY_TIMEOUT,
                format!("no response within {}s", self.cfg.response_timeout_secs),
                Outcome::UpstreamTimeout,
            )),
        }
    }

    /// The upstream response as returned to the client: hop-by-hop headers
    /// dropped, the key scrubbed from headers and body.
    fn response(
        &self,
        resp: Response<Incoming>,
        method: &Method,
        key: &LeasedKey,
    ) -> Result<Response<ProxyBody>, String> {
        let (mut parts, body) = resp.into_parts();
        // hyper writes a custom reason phrase from the extensions, unscrubbed.
        parts.extensions.clear();
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(
                "the upstream switched protocols, which this proxy does not forward".into(),
            );
        }
        if let Some(enc) = parts.headers.get(header::CONTENT_ENCODING)
            && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            return Err(format!(
                "the upstream sent an encoded body (content-encoding: {}) that cannot be \
                 checked for the key; refused",
                String::from_utf8_lossy(&scrub_all(&key.value, enc.as_bytes()))
            ));
        }
        strip_hop_by_hop(&mut parts.headers);
        parts.headers = scrub_headers(&key.value, parts.headers);
        let bodiless = *method == Method::HEAD
            || parts.status.is_informational()
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED;
        let body = if bodiless {
            ProxyBody::empty()
        } else {
            // Scrubbing changes the length; the body goes out chunked.
            parts.headers.remove(header::CONTENT_LENGTH);
            ProxyBody::Scrub(Box::new(ScrubBody {
                inner: body,
                scrubber: Scrubber::new(&key.value),
                received: 0,
                max: self.cfg.max_response_body_bytes,
                idle: Duration::from_secs(self.cfg.body_idle_timeout_secs),
                idle_timer: Box::pin(tokio::time::sleep(Duration::from_secs(
                    self.cfg.body_idle_timeout_secs,
                ))),
                done: false,
            }))
        };
        Ok(Response::from_parts(parts, body))
    }
}

async fn handshake<IO>(
    io: IO,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    // Ends when the response body is consumed or dropped.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

fn plain(status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let body = format!("lattice proxy: {msg}\n");
    let mut r = Response::new(ProxyBody::Full(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        r.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
    }
    r
}

/// A message from elsewhere, made safe for a one-line plain-text body.
fn sanitise(msg: &str) -> String {
    let clean: String = msg
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    truncate(&clean, MAX_REASON_LEN).to_owned()
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn new_request_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 12];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // Only a correlation id: fall back to the time.
        let nanos = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return format!("t{nanos:x}");
    }
    hex::encode(b)
}

/// The proxy's parsers of untrusted input, for the fuzz targets in `fuzz/`
/// (not an API).
#[doc(hidden)]
pub mod fuzzing {
    use std::net::SocketAddr;

    /// Where a request would be routed (`host[:port]` and path), or why not.
    pub fn request_target<B>(req: &http::Request<B>) -> Result<(String, String), String> {
        super::route::Target::of(req).map(|t| (t.key, t.path_and_query.to_string()))
    }

    /// The uid owning the socket `sock` -> `remote` in a `/proc/net/tcp`
    /// table.
    #[cfg(target_os = "linux")]
    pub fn socket_owner(table: &str, sock: SocketAddr, remote: SocketAddr) -> Option<u32> {
        super::peer_uid::socket_owner(table, sock, remote)
    }
}
