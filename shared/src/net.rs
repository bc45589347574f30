//! Serving and dialling gRPC over our own TLS: the accept loop (handshake
//! timeout, connection cap, TCP_NODELAY), the per-connection [`PeerInfo`]
//! that handlers read the caller's identity from, the guard that refuses
//! unauthenticated calls, and the client connector.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

pub use crate::admission::Admission;
use crate::clock::SharedClock;
use crate::id::SpiffeId;
use crate::limits;
use crate::pki::{CertInfo, inspect};

/// The verified identity of a peer, read once per connection.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub id: SpiffeId,
    pub cert: CertInfo,
    /// The intermediate that issued the peer's certificate (`None`: the root).
    pub issuer: Option<CertInfo>,
}

/// What handlers know about the connection a call came on.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// `Some` only when the peer presented a certificate that the TLS layer
    /// verified against the trust bundle and the scope rules.
    pub identity: Option<Arc<PeerIdentity>>,
}

/// The caller's verified identity, or `Unauthenticated`. Also refuses a
/// certificate that expired after the connection was made.
#[allow(clippy::result_large_err)]
pub fn authenticated<T>(
    req: &tonic::Request<T>,
    clock: &SharedClock,
) -> Result<Arc<PeerIdentity>, tonic::Status> {
    let ident = req
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.identity.clone())
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate is required"))?;
    let now: SystemTime = clock.now();
    if now > ident.cert.not_after {
        return Err(tonic::Status::unauthenticated(format!(
            "client certificate of {} has expired; renew or re-enrol",
            ident.id
        )));
    }
    Ok(ident)
}

pub fn peer_addr<T>(req: &tonic::Request<T>) -> Option<SocketAddr> {
    req.extensions().get::<PeerInfo>().and_then(|p| p.remote)
}

/// A TLS connection with its peer info, handed to tonic.
pub struct PeerStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    /// Counts this connection against the cap until tonic drops it.
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Resolves when the server gives up on graceful shutdown: every I/O
    /// then fails, so a connection to a silent peer cannot outlive it.
    killed: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl PeerStream {
    fn check_killed(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        self.killed
            .as_mut()
            .poll(cx)
            .is_ready()
            .then(|| std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "server stopped"))
    }
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.check_killed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.check_killed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.check_killed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn identity_of(conn: &rustls::ServerConnection) -> Option<Arc<PeerIdentity>> {
    let certs = conn.peer_certificates()?;
    // The verifier already checked these certificates; this only reads them.
    let cert = inspect(certs.first()?).ok()?;
    let issuer = match certs.get(1) {
        Some(der) => Some(inspect(der).ok()?),
        None => None,
    };
    let id = cert.id.clone()?;
    Some(Arc::new(PeerIdentity { id, cert, issuer }))
}

/// How long a connection without a client certificate (enrolment and the
/// public JWKS only) may live: nobody can hold a slot for long without
/// credentials. Their number is capped by [`Admission`].
pub const ANONYMOUS_MAX_AGE: Duration = limits::ANONYMOUS_MAX_AGE;

/// Accepts TCP connections, runs TLS handshakes off the accept loop (bounded
/// in time and, through the process's [`Admission`], in number overall and
/// per source) and yields ready connections.
/// `kill` turning true ends every connection at its next I/O.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    kill: tokio::sync::watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<Result<PeerStream, std::io::Error>> {
    tls_incoming_with(listener, tls, kill, Admission::process(), ANONYMOUS_MAX_AGE)
}

/// Counts a refused connection and logs why, at most once a second per
/// process (a flood must not become a log flood).
fn refused(remote: SocketAddr, why: &'static str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_LOG_SECS: AtomicU64 = AtomicU64::new(0);
    metrics::counter!("lattice_connections_refused_total", "reason" => why).increment(1);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if LAST_LOG_SECS.swap(now, Ordering::Relaxed) != now {
        tracing::warn!(peer = %remote, reason = why, "connection refused (logged at most once a second)");
    }
}

pub fn tls_incoming_with(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    kill: tokio::sync::watch::Receiver<bool>,
    admission: Arc<Admission>,
    anonymous_max_age: Duration,
) -> tokio_stream::wrappers::ReceiverStream<Result<PeerStream, std::io::Error>> {
    let (tx, rx) = mpsc::channel(limits::ACCEPT_QUEUE);
    let acceptor = TlsAcceptor::from(tls);
    let mut stop = kill.clone();
    tokio::spawn(async move {
        loop {
            // Stop (and free the port) once the server has gone away.
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                _ = until_true(&mut stop) => return,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Typically EMFILE: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over a cap: the connection is closed at once (dropped here).
            let permit = match admission.connection() {
                Ok(p) => p,
                Err(r) => {
                    refused(remote, r.label());
                    continue;
                }
            };
            let handshake = match admission.handshake(remote.ip()) {
                Ok(h) => h,
                Err(r) => {
                    refused(remote, r.label());
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let mut kill = kill.clone();
            let admission = admission.clone();
            tokio::spawn(async move {
                // A handshake in flight must not keep a stopped server's
                // state (its TLS configuration) alive either.
                let hs = tokio::select! {
                    hs = tokio::time::timeout(limits::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => hs,
                    _ = until_true(&mut kill) => return,
                };
                drop(handshake);
                let tls = match hs {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        handshake_failed(remote, &e.to_string());
                        return;
                    }
                    Err(_) => {
                        handshake_failed(remote, "timed out");
                        return;
                    }
                };
                let identity = identity_of(tls.get_ref().1);
                let killed: Pin<Box<dyn Future<Output = ()> + Send>> = if identity.is_some() {
                    Box::pin(async move { until_true(&mut kill).await })
                } else {
                    let anon = match admission.anonymous(remote.ip()) {
                        Ok(a) => a,
                        Err(r) => {
                            refused(remote, r.label());
                            return;
                        }
                    };
                    // Its life counts from now, not from when tonic first
                    // polls it (it may wait in the accept queue).
                    let deadline = tokio::time::Instant::now() + anonymous_max_age;
                    Box::pin(async move {
                        let _anon = anon;
                        tokio::select! {
                            _ = until_true(&mut kill) => {}
                            _ = tokio::time::sleep_until(deadline) => {}
                        }
                    })
                };
                let info = PeerInfo {
                    remote: Some(remote),
                    identity,
                };
                let _ = tx
                    .send(Ok(PeerStream {
                        inner: tls,
                        info,
                        _permit: permit,
                        killed,
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Counts a failed handshake and logs its reason (a revoked or expired
/// client certificate, a wrong trust domain, a timeout), at most once a
/// second per process.
fn handshake_failed(remote: SocketAddr, why: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_LOG_SECS: AtomicU64 = AtomicU64::new(0);
    metrics::counter!("lattice_tls_handshake_failures_total").increment(1);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if LAST_LOG_SECS.swap(now, Ordering::Relaxed) != now {
        tracing::info!(peer = %remote, reason = why, "TLS handshake failed (logged at most once a second)");
    } else {
        tracing::debug!(peer = %remote, reason = why, "TLS handshake failed");
    }
}

// ---------------------------------------------------------------------------

/// Refuses every call without a verified client certificate, except the
/// paths listed as open (enrolment, the public JWKS document). A handler can
/// therefore never run for an anonymous caller by forgetting a check.
#[derive(Debug, Clone)]
pub struct AuthGuardLayer {
    open_paths: &'static [&'static str],
}

impl AuthGuardLayer {
    pub fn new(open_paths: &'static [&'static str]) -> Self {
        Self { open_paths }
    }
}

impl<S> tower::Layer<S> for AuthGuardLayer {
    type Service = AuthGuard<S>;
    fn layer(&self, inner: S) -> AuthGuard<S> {
        AuthGuard {
            inner,
            open_paths: self.open_paths,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthGuard<S> {
    inner: S,
    open_paths: &'static [&'static str],
}

impl<S, B, RB> tower::Service<http::Request<B>> for AuthGuard<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let open = self.open_paths.contains(&req.uri().path());
        let authed = req
            .extensions()
            .get::<PeerInfo>()
            .is_some_and(|p| p.identity.is_some());
        if open || authed {
            Box::pin(self.inner.call(req))
        } else {
            metrics::counter!("lattice_rpc_refused_total", "reason" => "unauthenticated")
                .increment(1);
            let resp = tonic::Status::unauthenticated(
                "a client certificate is required (only enrolment is open)",
            )
            .into_http::<RB>();
            Box::pin(async move { Ok(resp) })
        }
    }
}

// ---------------------------------------------------------------------------

/// A gRPC channel to `addr` over TLS with `tls`. It dials lazily (and again
/// after a failure), so a peer that is down now does not fail the caller's
/// start-up; calls fail with `Unavailable` meanwhile.
pub fn channel(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let connector = TlsConnector::from(tls);
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(limits::CONNECT_TIMEOUT)
        .timeout(limits::RPC_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(limits::HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(limits::HTTP2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri: http::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                // The name is not checked: servers are identified by their
                // SPIFFE id (see `tls::ExpectedServer`).
                let name = ServerName::try_from("lattice.invalid")
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })),
    )
}

/// Resolves once `rx` holds `true` (or its sender is gone). Unlike
/// `wait_for`, the returned future is `Send`.
pub async fn until_true(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        let done = *rx.borrow_and_update();
        if done || rx.changed().await.is_err() {
            return;
        }
    }
}

/// Stops a server task gracefully within a bound: its connections get a
/// second to finish, then every remaining one (a silent peer, say) is cut
/// through `kill` (see [`tls_incoming`]).
pub async fn stop_server(
    mut server: tokio::task::JoinHandle<()>,
    kill: &tokio::sync::watch::Sender<bool>,
) {
    if tokio::time::timeout(Duration::from_secs(1), &mut server)
        .await
        .is_err()
    {
        kill.send_replace(true);
        if tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }
    kill.send_replace(true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::id::TrustDomain;
    use crate::pki::{Authority, PrivateKey, Profile, TrustBundle};
    use crate::tls::{ExpectedServer, ReloadableCert};
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn anonymous_connections_are_capped_and_short_lived() {
        crate::tls::install_crypto_provider();
        let td = TrustDomain::new("t").expect("td");
        let now = std::time::SystemTime::now();
        let hour = Duration::from_secs(3600);
        let root = Authority::new_root(&td, PrivateKey::generate_p256().expect("k"), now, hour)
            .expect("root");
        let key = PrivateKey::generate_p256().expect("k");
        let id = SpiffeId::parse("spiffe://t/cp/main").expect("id");
        let cert = root
            .issue(
                &key.csr_der().expect("csr"),
                &id,
                Profile::TlsServerClient,
                now,
                hour,
            )
            .expect("cert");
        let bundle = Arc::new(TrustBundle::new(td, root.cert_der().to_vec()).expect("bundle"));
        let clock = SystemClock::shared();
        let server = crate::tls::server_config(
            bundle.clone(),
            clock.clone(),
            ReloadableCert::new(vec![cert], &key).expect("cert"),
            None,
        )
        .expect("server tls");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_kill, kill_rx) = tokio::sync::watch::channel(false);
        let mut limits = crate::admission::AdmissionLimits::for_fd_limit(1024);
        limits.max_anonymous = 1;
        let mut incoming = tls_incoming_with(
            listener,
            server,
            kill_rx,
            Admission::new(limits),
            Duration::from_millis(300),
        );
        let connector = TlsConnector::from(
            crate::tls::client_config(bundle, clock, ExpectedServer::ControlPlane, None)
                .expect("client tls"),
        );
        let connect = || async {
            let tcp = TcpStream::connect(addr).await.expect("tcp");
            connector
                .connect(ServerName::try_from("x").expect("name"), tcp)
                .await
                .expect("handshake")
        };

        let _first = connect().await;
        let mut served = incoming.next().await.expect("a connection").expect("ok");
        assert!(served.info.identity.is_none(), "anonymous");

        // Over the anonymous budget: the server drops the second one.
        let mut second = connect().await;
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .expect("closed");
        assert!(!matches!(r, Ok(n) if n > 0), "{r:?}");

        // The first one ends once its short life is over, though idle.
        let r = tokio::time::timeout(Duration::from_secs(5), served.read(&mut buf))
            .await
            .expect("ended");
        assert!(r.is_err(), "{r:?}");
    }
}
