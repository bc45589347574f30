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

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use lattice_shared::clock::SharedClock;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use zeroize::Zeroizing;

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
const MAX_UPSTREAMS: usize = 256;
const MAX_NAME_LEN: usize = 256;
const REQUEST_ID_HEADER: &str = "x-lattice-request-id";

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

fn yes() -> bool {
    true
}

/// One allowlisted upstream and how its key is injected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// The host clients name, as in a request's authority or `Host` header:
    /// `api.openai.com`, or `host:port`. Matched case-insensitively; port 80
    /// (the default of the `http://` URLs clients use) may be omitted.
    pub host: String,
    /// Name of the secret leased from the regional cache.
    pub secret: String,
    /// Header carrying the key, e.g. `authorization` or `x-api-key`. Any
    /// value the client sent under this name is dropped.
    pub header: String,
    /// Header value with one `{secret}`, e.g. `Bearer {secret}`.
    pub template: String,
    /// TLS to the upstream (default). `false` sends the key in clear text:
    /// only for loopback test servers and trusted internal plain-HTTP links.
    #[serde(default = "yes")]
    pub tls: bool,
    /// Port to connect to; default the port in `host`, else 443 with TLS and
    /// 80 without.
    #[serde(default)]
    pub port: Option<u16>,
}

/// Proxy settings. Defaults serve `lattice dev`: loopback port 8089, the
/// agent's own uid only, no upstream (every host refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Must be a loopback address.
    pub listen: SocketAddr,
    pub upstreams: Vec<Upstream>,
    /// PEM file of extra CA certificates trusted for upstreams, besides the
    /// webpki (Mozilla) roots: for private upstreams and tests.
    pub extra_ca: Option<PathBuf>,
    /// Local uids allowed to use the proxy; empty: the agent's own uid only.
    pub allowed_uids: Vec<u32>,
    /// Request line plus headers (431 beyond).
    pub max_request_head_bytes: usize,
    pub max_request_headers: usize,
    /// Request bodies are read whole before the key is leased (413 beyond).
    pub max_request_body_bytes: usize,
    /// Response bodies are streamed; a longer one is cut off.
    pub max_response_body_bytes: u64,
    pub max_connections: usize,
    /// Also bounds how long an idle keep-alive connection stays open.
    pub header_read_timeout_secs: u64,
    /// TCP connect plus TLS handshake to the upstream (502 beyond).
    pub connect_timeout_secs: u64,
    /// From sending the request to the upstream's response head (504 beyond).
    pub response_timeout_secs: u64,
    /// Longest pause between two chunks of an upstream response body.
    pub body_idle_timeout_secs: u64,
    /// Longest wait for a lease from the cache (503 beyond).
    pub lease_timeout_secs: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8089)),
            upstreams: Vec::new(),
            extra_ca: None,
            allowed_uids: Vec::new(),
            max_request_head_bytes: 16 * 1024,
            max_request_headers: 100,
            max_request_body_bytes: 8 * 1024 * 1024,
            max_response_body_bytes: 256 * 1024 * 1024,
            max_connections: 256,
            header_read_timeout_secs: 30,
            connect_timeout_secs: 10,
            response_timeout_secs: 300,
            body_idle_timeout_secs: 120,
            lease_timeout_secs: 15,
        }
    }
}

impl ProxyConfig {
    /// Checks everything that can be checked without I/O.
    pub fn validate(&self) -> Result<(), String> {
        if !self.listen.ip().is_loopback() {
            return Err(format!(
                "proxy.listen: {} is not a loopback address; the proxy must not be reachable from other machines",
                self.listen
            ));
        }
        if self.upstreams.len() > MAX_UPSTREAMS {
            return Err(format!(
                "proxy.upstreams: at most {MAX_UPSTREAMS} upstreams"
            ));
        }
        let positive = [
            ("max_request_head_bytes", self.max_request_head_bytes as u64),
            ("max_request_headers", self.max_request_headers as u64),
            ("max_request_body_bytes", self.max_request_body_bytes as u64),
            ("max_response_body_bytes", self.max_response_body_bytes),
            ("max_connections", self.max_connections as u64),
            ("header_read_timeout_secs", self.header_read_timeout_secs),
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("response_timeout_secs", self.response_timeout_secs),
            ("body_idle_timeout_secs", self.body_idle_timeout_secs),
            ("lease_timeout_secs", self.lease_timeout_secs),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("proxy.{name} must be greater than 0"));
            }
        }
        let mut seen = HashMap::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let route = Route::from_config(u).map_err(|e| format!("proxy.upstreams[{i}]: {e}"))?;
            if let Some(j) = seen.insert(route.key.clone(), i) {
                return Err(format!(
                    "proxy.upstreams[{i}]: host {:?} is also upstream [{j}]; hosts must be unique",
                    route.key
                ));
            }
        }
        Ok(())
    }
}

/// A leased upstream key. The value is zeroized on drop and never shown by
/// `Debug`.
pub struct LeasedKey {
    pub value: Zeroizing<Vec<u8>>,
    pub fingerprint: String,
    pub expires_at_unix: i64,
    pub version: u64,
}

impl std::fmt::Debug for LeasedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasedKey")
            .field("value", &"[REDACTED]")
            .field("fingerprint", &self.fingerprint)
            .field("expires_at_unix", &self.expires_at_unix)
            .field("version", &self.version)
            .finish()
    }
}

/// Where upstream keys come from: the regional cache in production.
pub trait SecretSource: Send + Sync + 'static {
    /// Leases the active version of secret `name`. The error is a message fit
    /// for the calling process (it is returned in a 503 body).
    fn lease<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<LeasedKey, LeaseError>>;

    /// Changes whenever leases taken before may no longer be used (a
    /// secret version was revoked, the agent's posture changed): the proxy
    /// then drops its cached leases and leases again.
    fn generation(&self) -> u64 {
        0
    }
}

/// Why a lease failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseError {
    pub message: String,
    /// The source could not be reached (a current lease may still be used
    /// until it expires); otherwise it refused, and nothing is used.
    pub unreachable: bool,
}

impl From<String> for LeaseError {
    fn from(message: String) -> Self {
        Self {
            message,
            unreachable: false,
        }
    }
}

/// The agent leases from the cache of its region.
impl SecretSource for crate::Agent {
    fn lease<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<LeasedKey, LeaseError>> {
        Box::pin(async move {
            let l = self.lease_secret(name, 0, None).await.map_err(|e| {
                let unreachable = matches!(
                    &e,
                    crate::Error::Transport(_)
                        | crate::Error::Refused {
                            code: tonic::Code::Unavailable | tonic::Code::DeadlineExceeded,
                            ..
                        }
                );
                LeaseError {
                    message: e.to_string(),
                    unreachable,
                }
            })?;
            Ok(LeasedKey {
                value: l.value,
                fingerprint: l.fingerprint,
                expires_at_unix: l.expires_at_unix,
                version: l.version,
            })
        })
    }

    fn generation(&self) -> u64 {
        self.lease_generation()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ProxyEventKind {
    #[serde(rename = "proxy_use")]
    Use,
    #[serde(rename = "proxy_refused")]
    Refused,
}

impl ProxyEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyEventKind::Use => "proxy_use",
            ProxyEventKind::Refused => "proxy_refused",
        }
    }
}

/// One audited use or refusal. Never carries the key, only its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyEvent {
    pub kind: ProxyEventKind,
    /// The secret name for a use or a refused lease; the requested host
    /// otherwise (empty if the request named none).
    pub resource: String,
    /// `METHOD host /path`, without the query string.
    pub detail: String,
    /// Why it was refused; empty for a use.
    pub reason: String,
    /// The status returned to the caller.
    pub status: u16,
    pub fingerprint: Option<String>,
    pub key_version: Option<u64>,
    /// The calling process's uid, when known.
    pub local_caller: Option<u32>,
    pub request_id: String,
    pub at_unix_ms: i64,
}

/// Receives audit events; must not block.
pub trait ProxyAudit: Send + Sync + 'static {
    fn record(&self, e: ProxyEvent);
}

/// Builds the proxy from `cfg` and serves `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    cfg: Arc<ProxyConfig>,
    source: Arc<dyn SecretSource>,
    audit: Arc<dyn ProxyAudit>,
    clock: SharedClock,
    stop: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    Proxy::build(cfg, source, audit, clock)?
        .serve(listener, stop)
        .await
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

struct CachedLease {
    key: Arc<LeasedKey>,
    refresh_at_unix: i64,
    /// The source's generation when leased.
    generation: u64,
}

/// An upstream, resolved for use.
struct Route {
    /// Normalised host the client names (lowercase, `:80` dropped).
    key: String,
    /// Host to connect to and verify, without brackets.
    connect_host: String,
    port: u16,
    tls: bool,
    server_name: ServerName<'static>,
    host_header: HeaderValue,
    secret: String,
    header: HeaderName,
    prefix: String,
    suffix: String,
}

/// Headers that belong to one hop; never forwarded either way.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Header names the key may not be injected as.
const RESERVED_KEY_HEADERS: [&str; 6] = [
    "host",
    "content-length",
    "content-type",
    "accept-encoding",
    "expect",
    REQUEST_ID_HEADER,
];

impl Route {
    fn from_config(u: &Upstream) -> Result<Route, String> {
        let auth: Authority = u
            .host
            .parse()
            .map_err(|e| format!("host {:?}: {e}", u.host))?;
        if u.host.contains('@') || auth.host().is_empty() {
            return Err(format!("host {:?}: expected `name` or `name:port`", u.host));
        }
        if auth.port_u16() == Some(0) || u.port == Some(0) {
            return Err(format!("host {:?}: port 0", u.host));
        }
        let key = normalise_authority(&auth, 80);
        let connect_host = auth
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = u
            .port
            .or(auth.port_u16())
            .unwrap_or(if u.tls { 443 } else { 80 });
        let server_name = ServerName::try_from(connect_host.clone())
            .map_err(|e| format!("host {:?}: not a valid TLS server name: {e}", u.host))?;
        let default_port = if u.tls { 443 } else { 80 };
        let host_header = if port == default_port {
            auth.host().to_ascii_lowercase()
        } else {
            format!("{}:{port}", auth.host().to_ascii_lowercase())
        };
        let host_header =
            HeaderValue::from_str(&host_header).map_err(|e| format!("host {:?}: {e}", u.host))?;

        if u.secret.is_empty()
            || u.secret.len() > MAX_NAME_LEN
            || u.secret.chars().any(char::is_control)
        {
            return Err(format!(
                "secret: expected a name of 1 to {MAX_NAME_LEN} printable characters"
            ));
        }
        let header = HeaderName::from_bytes(u.header.as_bytes())
            .map_err(|_| format!("header {:?} is not a valid header name", u.header))?;
        if HOP_BY_HOP.contains(&header.as_str()) || RESERVED_KEY_HEADERS.contains(&header.as_str())
        {
            return Err(format!(
                "header {:?} cannot carry a key (hop-by-hop or managed by the proxy)",
                u.header
            ));
        }
        let parts: Vec<&str> = u.template.split(SECRET_PLACEHOLDER).collect();
        let [prefix, suffix] = parts.as_slice() else {
            return Err(format!(
                "template {:?} must contain {SECRET_PLACEHOLDER} exactly once",
                u.template
            ));
        };
        if HeaderValue::from_str(&format!("{prefix}x{suffix}")).is_err() {
            return Err(format!(
                "template {:?} has characters not allowed in a header value",
                u.template
            ));
        }
        Ok(Route {
            key,
            connect_host,
            port,
            tls: u.tls,
            server_name,
            host_header,
            secret: u.secret.clone(),
            header,
            prefix: (*prefix).to_owned(),
            suffix: (*suffix).to_owned(),
        })
    }

    /// The template with the key in it, in memory that is zeroized once the
    /// header value is dropped.
    fn header_value(&self, key: &[u8]) -> Result<HeaderValue, String> {
        let mut v = Zeroizing::new(Vec::with_capacity(
            self.prefix.len() + key.len() + self.suffix.len(),
        ));
        v.extend_from_slice(self.prefix.as_bytes());
        v.extend_from_slice(key);
        v.extend_from_slice(self.suffix.as_bytes());
        // `from_maybe_shared` keeps this `Bytes` (no copy), whose owner
        // zeroizes on drop. The error names no value.
        let mut hv = HeaderValue::from_maybe_shared(Bytes::from_owner(v))
            .map_err(|_| "the leased key is not valid in an HTTP header".to_owned())?;
        hv.set_sensitive(true);
        Ok(hv)
    }
}

/// `host[:port]` in lowercase, without the port when it is `default_port`.
fn normalise_authority(a: &Authority, default_port: u16) -> String {
    let host = a.host().to_ascii_lowercase();
    match a.port_u16() {
        Some(p) if p != default_port => format!("{host}:{p}"),
        _ => host,
    }
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

    fn now_unix_ms(&self) -> i64 {
        self.clock
            .now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
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
            at_unix_ms: self.now_unix_ms(),
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
            at_unix_ms: self.now_unix_ms(),
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

    /// The cached lease of `secret`, or a new one when it is due for renewal.
    /// A failed renewal keeps using a lease that has not yet expired.
    async fn lease(&self, secret: &str) -> Result<Arc<LeasedKey>, String> {
        let Some(slot) = self.leases.get(secret) else {
            return Err(format!("secret {secret} is not configured"));
        };
        let mut cached = slot.lock().await;
        let now = self.clock.now_unix();
        let generation = self.source.generation();
        if let Some(c) = cached.as_ref()
            && now < c.refresh_at_unix
            && c.generation == generation
        {
            return Ok(c.key.clone());
        }
        let timeout = Duration::from_secs(self.cfg.lease_timeout_secs);
        let leased = match tokio::time::timeout(timeout, self.source.lease(secret)).await {
            Ok(r) => r,
            Err(_) => Err(LeaseError {
                message: format!("no answer within {}s", self.cfg.lease_timeout_secs),
                unreachable: true,
            }),
        };
        let leased = leased.and_then(|k| {
            if k.value.is_empty() {
                Err(LeaseError::from("the leased value is empty".to_owned()))
            } else if k.expires_at_unix <= now {
                Err(LeaseError::from("the lease had already expired".to_owned()))
            } else {
                Ok(k)
            }
        });
        match leased {
            Ok(k) => {
                metrics::counter!(metric::LEASES, "result" => "ok").increment(1);
                let margin = LEASE_REFRESH_MARGIN_SECS.min((k.expires_at_unix - now) / 2);
                tracing::info!(secret, fingerprint = %k.fingerprint, version = k.version, expires_at_unix = k.expires_at_unix, "leased upstream key");
                let key = Arc::new(k);
                *cached = Some(CachedLease {
                    refresh_at_unix: key.expires_at_unix - margin,
                    key: key.clone(),
                    generation,
                });
                Ok(key)
            }
            Err(e) => {
                metrics::counter!(metric::LEASES, "result" => "error").increment(1);
                match cached.as_ref() {
                    // Only when the cache cannot be reached: a refusal
                    // (revoked, denied) stops the key at once.
                    Some(c)
                        if e.unreachable
                            && now < c.key.expires_at_unix
                            && c.generation == generation =>
                    {
                        tracing::warn!(secret, error = %e.message, "lease renewal failed; using the current lease until it expires");
                        Ok(c.key.clone())
                    }
                    _ => {
                        *cached = None;
                        tracing::warn!(secret, error = %e.message, "lease refused");
                        Err(e.message)
                    }
                }
            }
        }
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

/// Where a request is going.
struct Target {
    key: String,
    path_and_query: PathAndQuery,
}

impl Target {
    fn of<B>(req: &Request<B>) -> Result<Target, String> {
        let uri = req.uri();
        let (auth, default_port) = match uri.authority() {
            Some(a) => {
                let default_port = match uri.scheme_str() {
                    Some("http") | None => 80,
                    Some("https") => 443,
                    Some(s) => return Err(format!("unsupported scheme {s:?}")),
                };
                (a.clone(), default_port)
            }
            None => {
                let mut hosts = req.headers().get_all(header::HOST).iter();
                let (Some(h), None) = (hosts.next(), hosts.next()) else {
                    return Err(
                        "expected exactly one Host header (or an absolute-form request)".into(),
                    );
                };
                let a = Authority::try_from(h.as_bytes())
                    .map_err(|_| "the Host header is not a valid host".to_owned())?;
                (a, 80)
            }
        };
        if auth.as_str().contains('@') || auth.host().is_empty() {
            return Err("the target host is not valid".into());
        }
        let path_and_query = match uri.path_and_query() {
            Some(p) if p.as_str().starts_with('/') => p.clone(),
            None => PathAndQuery::from_static("/"),
            Some(_) => return Err("expected an origin-form or absolute-form request target".into()),
        };
        Ok(Target {
            key: normalise_authority(&auth, default_port),
            path_and_query,
        })
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

/// `headers` with the key replaced in every value; a header whose name
/// contains the key is dropped.
fn scrub_headers(key: &[u8], headers: HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    let mut name = None;
    for (n, v) in headers {
        // `None` repeats the previous name (multi-valued headers).
        if let Some(n) = n {
            name = Some(n);
        }
        let Some(n) = name.clone() else { continue };
        if contains(n.as_str().as_bytes(), key) {
            continue;
        }
        if contains(v.as_bytes(), key) {
            let scrubbed = scrub_all(key, v.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&scrubbed) {
                out.append(n, v);
            }
        } else {
            out.append(n, v);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `data` with every occurrence of `key` replaced by [`REDACTED`].
pub fn scrub_all(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut s = Scrubber::new(key);
    let mut out = s.push(data).to_vec();
    out.extend_from_slice(&s.finish());
    out
}

/// Replaces a secret in a byte stream cut into arbitrary chunks. It holds
/// back the last `len - 1` bytes of what it has seen (a possible start of
/// the secret) until the next chunk or [`Scrubber::finish`].
pub struct Scrubber {
    needle: Zeroizing<Vec<u8>>,
    tail: Zeroizing<Vec<u8>>,
}

impl Scrubber {
    pub fn new(secret: &[u8]) -> Scrubber {
        Scrubber {
            needle: Zeroizing::new(secret.to_vec()),
            tail: Zeroizing::new(Vec::new()),
        }
    }

    /// Takes the next chunk; returns what can be emitted safely.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        let n = self.needle.len();
        if n == 0 {
            return Bytes::copy_from_slice(chunk);
        }
        let mut buf = Zeroizing::new(Vec::with_capacity(self.tail.len() + chunk.len()));
        buf.extend_from_slice(&self.tail);
        buf.extend_from_slice(chunk);
        self.tail.clear();
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        while let Some(pos) = find(&buf[i..], &self.needle) {
            out.extend_from_slice(&buf[i..i + pos]);
            out.extend_from_slice(REDACTED);
            i += pos + n;
        }
        // Any match starting before `keep_from` would have ended inside
        // `buf` and been found; the rest may be the start of one.
        let keep_from = buf.len().saturating_sub(n - 1).max(i);
        out.extend_from_slice(&buf[i..keep_from]);
        self.tail.extend_from_slice(&buf[keep_from..]);
        Bytes::from(out)
    }

    /// The held-back bytes, at the end of the stream.
    pub fn finish(&mut self) -> Bytes {
        let rest = Bytes::copy_from_slice(&self.tail);
        self.tail.clear();
        rest
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response bodies of the proxy.
enum ProxyBody {
    Full(Full<Bytes>),
    Scrub(Box<ScrubBody>),
}

impl ProxyBody {
    fn empty() -> Self {
        ProxyBody::Full(Full::new(Bytes::new()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(f) => match Pin::new(f).poll_frame(cx) {
                Poll::Ready(Some(Ok(fr))) => Poll::Ready(Some(Ok(fr))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            ProxyBody::Scrub(s) => Pin::new(s.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(f) => f.is_end_stream(),
            ProxyBody::Scrub(s) => s.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(f) => f.size_hint(),
            ProxyBody::Scrub(_) => SizeHint::default(),
        }
    }
}

/// An upstream response body with the key scrubbed out, bounded in size and
/// in idle time.
struct ScrubBody {
    inner: Incoming,
    scrubber: Scrubber,
    received: u64,
    max: u64,
    idle: Duration,
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl Body for ScrubBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.idle_timer.as_mut().reset(deadline);
                    // Trailers are dropped: the request asked for none (`te`
                    // is not forwarded).
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    this.received = this.received.saturating_add(data.len() as u64);
                    if this.received > this.max {
                        this.done = true;
                        return Poll::Ready(Some(Err(format!(
                            "upstream response body larger than {} bytes",
                            this.max
                        )
                        .into())));
                    }
                    let out = this.scrubber.push(&data);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let rest = this.scrubber.finish();
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                Poll::Pending => {
                    if this.idle_timer.as_mut().poll(cx).is_ready() {
                        this.done = true;
                        return Poll::Ready(Some(Err("upstream response body stalled".into())));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
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

/// This process's effective uid.
fn own_euid() -> Result<u32, String> {
    Ok(crate::workload::effective_uid())
}

/// The uid owning the client end of the loopback connection `peer` →
/// `local`, from the kernel's socket tables.
async fn caller_uid(peer: SocketAddr, local: SocketAddr) -> Result<u32, String> {
    let (v4, v6) = tokio::join!(
        tokio::fs::read_to_string("/proc/net/tcp"),
        tokio::fs::read_to_string("/proc/net/tcp6"),
    );
    if v4.is_err() && v6.is_err() {
        return Err(format!(
            "cannot read /proc/net/tcp: {}",
            v4.err().map(|e| e.to_string()).unwrap_or_default()
        ));
    }
    for table in [v4, v6].into_iter().flatten() {
        if let Some(uid) = socket_owner(&table, peer, local) {
            return Ok(uid);
        }
    }
    Err(format!(
        "no socket {peer} -> {local} in /proc/net/tcp{{,6}}"
    ))
}

/// Finds the socket whose local address is `sock` and remote address `remote`
/// in a `/proc/net/tcp` or `/proc/net/tcp6` table, and returns its uid.
fn socket_owner(table: &str, sock: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (sock, remote) = (canon(sock), canon(remote));
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let l = canon(parse_proc_addr(f.get(1)?)?);
        let r = canon(parse_proc_addr(f.get(2)?)?);
        if l == sock && r == remote {
            f.get(7)?.parse().ok()
        } else {
            None
        }
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits then `:PORT` (IPv6). The kernel
/// prints each 32-bit word of the address as a native-endian integer.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut b = [0u8; 16];
            for (i, chunk) in b.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_shared::clock::{Clock, FakeClock};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        let proxy = Proxy::build(Arc::new(cfg), source.clone(), audit.clone(), clock.shared())
            .expect("build");
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
            let size = usize::from_str_radix(size.split(';').next().unwrap_or(""), 16)
                .expect("chunk size");
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

    #[tokio::test]
    async fn proc_lookup_finds_the_uid_of_the_client_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(server_addr).await.expect("connect");
        let (_server, peer) = listener.accept().await.expect("accept");
        assert_eq!(peer, client.local_addr().expect("addr"));
        assert_eq!(caller_uid(peer, server_addr).await, Ok(own_uid()));
        // A connection that does not exist is not attributed to anyone.
        let ghost = SocketAddr::from(([127, 0, 0, 1], 1));
        assert!(caller_uid(ghost, server_addr).await.is_err());
    }

    #[test]
    fn proc_tables_parse() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F99 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1001        0 1 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:C350 0100007F:1F99 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0000000000000000 20 4 30 10 -1\n";
        let proxy = SocketAddr::from(([127, 0, 0, 1], 0x1F99));
        let client = SocketAddr::from(([127, 0, 0, 1], 0xC350));
        assert_eq!(socket_owner(v4, client, proxy), Some(1000));
        assert_eq!(socket_owner(v4, proxy, client), Some(1001));
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000001000000:C350 00000000000000000000000001000000:1F99 01 00000000:00000000 00:00000000 00000000  1234        0 3 1\n";
        let proxy6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 0x1F99));
        let client6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 0xC350));
        if cfg!(target_endian = "little") {
            assert_eq!(socket_owner(v6, client6, proxy6), Some(1234));
        }
        assert_eq!(socket_owner(v6, client, proxy), None);
    }

    #[test]
    fn scrubber_catches_the_key_across_chunk_boundaries() {
        let k = b"sk-ABCDEFGH";
        let text = b"aa sk-ABCDEFGH bb sk-ABCDsk-ABCDEFGHsk-ABCDEFGH sk-ABCDEFG";
        let want = b"aa [REDACTED] bb sk-ABCD[REDACTED][REDACTED] sk-ABCDEFG".to_vec();
        assert_eq!(scrub_all(k, text), want);
        // Every chunk size, including 1-byte chunks.
        for size in 1..=text.len() {
            let mut s = Scrubber::new(k);
            let mut out = Vec::new();
            for c in text.chunks(size) {
                let emitted = s.push(c);
                assert!(!contains(&emitted, k));
                out.extend_from_slice(&emitted);
            }
            out.extend_from_slice(&s.finish());
            assert_eq!(out, want, "chunk size {size}");
        }
        // Every split of the key between two chunks.
        let text = b"xx sk-ABCDEFGH yy";
        for cut in 0..=text.len() {
            let mut s = Scrubber::new(k);
            let mut out = s.push(&text[..cut]).to_vec();
            out.extend_from_slice(&s.push(&text[cut..]));
            out.extend_from_slice(&s.finish());
            assert_eq!(out, b"xx [REDACTED] yy".to_vec(), "cut at {cut}");
        }
        // At most len-1 (here 10) bytes are held back.
        let mut s = Scrubber::new(k);
        assert_eq!(&s.push(b"0123456789abcdef")[..], b"012345");
        assert_eq!(&s.finish()[..], b"6789abcdef");
    }

    #[test]
    fn scrubber_handles_self_overlapping_keys() {
        assert_eq!(
            scrub_all(b"aab", b"aaab aab"),
            b"a[REDACTED] [REDACTED]".to_vec()
        );
        let mut s = Scrubber::new(b"aab");
        let mut out = Vec::new();
        for c in b"aaaab".chunks(1) {
            out.extend_from_slice(&s.push(c));
        }
        out.extend_from_slice(&s.finish());
        assert_eq!(out, b"aa[REDACTED]".to_vec());
    }

    #[test]
    fn headers_are_scrubbed() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("Bearer sk-1 ok"));
        h.append("x-a", HeaderValue::from_static("clean"));
        h.append("x-b", HeaderValue::from_static("sk-1"));
        let out = scrub_headers(b"sk-1", h);
        let a: Vec<_> = out.get_all("x-a").iter().collect();
        assert_eq!(a, vec!["Bearer [REDACTED] ok", "clean"]);
        assert_eq!(out["x-b"], "[REDACTED]");
    }

    #[test]
    fn config_validation() {
        let ok = Upstream {
            host: "api.example.com".into(),
            secret: SECRET.into(),
            header: "authorization".into(),
            template: "Bearer {secret}".into(),
            tls: true,
            port: None,
        };
        assert_eq!(config(vec![ok.clone()]).validate(), Ok(()));
        let bad = |f: &dyn Fn(&mut ProxyConfig), want: &str| {
            let mut c = config(vec![ok.clone()]);
            f(&mut c);
            let e = c.validate().expect_err("invalid");
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        };
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].template = "Bearer".into(),
            "exactly once",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].template = "{secret}{secret}".into(),
            "exactly once",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].template = "a\n{secret}".into(),
            "template",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].header = "bad header".into(),
            "valid header name",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].header = "Host".into(),
            "cannot carry a key",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].host = "".into(),
            "host",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].host = "u@api.example.com".into(),
            "host",
        );
        bad(
            &|c: &mut ProxyConfig| c.upstreams[0].secret = "".into(),
            "secret",
        );
        bad(
            &|c: &mut ProxyConfig| {
                let mut dup = ok.clone();
                dup.host = "API.example.com:80".into();
                c.upstreams.push(dup);
            },
            "unique",
        );
        bad(
            &|c: &mut ProxyConfig| c.listen = SocketAddr::from(([0, 0, 0, 0], 8089)),
            "loopback",
        );
        bad(
            &|c: &mut ProxyConfig| c.max_connections = 0,
            "max_connections",
        );
        let d = ProxyConfig::default();
        assert_eq!(d.listen, SocketAddr::from(([127, 0, 0, 1], 8089)));
        assert!(d.validate().is_ok());
        // `tls` defaults to true when read from a file.
        let u: Upstream = serde_json::from_str(
            r#"{"host":"a.example","secret":"s","header":"x-api-key","template":"{secret}"}"#,
        )
        .expect("parse");
        assert!(u.tls);
        assert_eq!(u.port, None);
    }

    #[test]
    fn header_value_is_built_from_the_template() {
        let mut u = plain_upstream(
            SocketAddr::from(([127, 0, 0, 1], 9)),
            "x-api-key",
            "k={secret};",
        );
        let r = Route::from_config(&u).expect("route");
        let v = r.header_value(b"abc").expect("value");
        assert_eq!(v, "k=abc;");
        assert!(v.is_sensitive());
        assert!(format!("{v:?}").contains("Sensitive"));
        assert!(r.header_value(b"a\r\nb").is_err());
        u.tls = true;
        let r = Route::from_config(&u).expect("route");
        assert_eq!(r.port, 9);
        assert_eq!(r.host_header, "127.0.0.1:9");
    }

    #[test]
    fn leased_key_debug_hides_the_value() {
        let k = LeasedKey {
            value: Zeroizing::new(b"sk-very-secret".to_vec()),
            fingerprint: "fp".into(),
            expires_at_unix: 1,
            version: 2,
        };
        let d = format!("{k:?}");
        assert!(!d.contains("sk-very-secret"));
        assert!(d.contains("fp"));
    }
}
