//! The Workload API: gRPC on a Unix domain socket for the AI-agent
//! processes of this device.
//!
//! A caller is identified by the kernel, not by anything it says: the uid
//! and gid of the connecting process (`SO_PEERCRED`) are matched against
//! `workload.allow`. Processes get short-lived tokens, delegated tokens for
//! their sub-agents and the public certificate chain; the agent's private
//! key and upstream keys are never served here. `Watch` pushes renewals and
//! revocations so a process never keeps using a dead credential.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lattice_shared::proto::{self as pb, workload_server::Workload};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::{Agent, AgentEvent, Error, ServedToken, TokenKey};

/// Largest message on the socket, either way.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most rules in `workload.allow`.
pub const MAX_RULES: usize = 64;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadConfig {
    /// The socket (default: `DATA_DIR/workload.sock`).
    pub socket: Option<PathBuf>,
    /// Who may call, by uid or gid. Empty: only processes running as the
    /// agent's own user, for every audience.
    pub allow: Vec<WorkloadRule>,
    /// Do not serve the Workload API at all.
    pub disabled: bool,
}

/// One allowance: processes of `uid` and/or of primary group `gid` (both
/// must match when both are given) may obtain tokens for `audiences`
/// (`"*"`: any) and delegate them when `delegate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadRule {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    #[serde(default = "any_audience")]
    pub audiences: Vec<String>,
    #[serde(default = "yes")]
    pub delegate: bool,
}

fn any_audience() -> Vec<String> {
    vec!["*".into()]
}
fn yes() -> bool {
    true
}

impl WorkloadRule {
    /// The agent's own user, any audience.
    pub fn own_user() -> Self {
        Self {
            uid: Some(effective_uid()),
            gid: None,
            audiences: any_audience(),
            delegate: true,
        }
    }

    /// Both `uid` and `gid` must match when both are given. `gid` is the
    /// caller's primary group (what `SO_PEERCRED` reports).
    fn matches(&self, uid: u32, gid: u32) -> bool {
        match (self.uid, self.gid) {
            (Some(u), Some(g)) => u == uid && g == gid,
            (Some(u), None) => u == uid,
            (None, Some(g)) => g == gid,
            (None, None) => false,
        }
    }

    fn allows_audience(&self, audience: &str) -> bool {
        self.audiences.iter().any(|a| a == "*" || a == audience)
    }
}

/// The uid this process runs as.
pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

impl WorkloadConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.allow.len() > MAX_RULES {
            return Err(format!("at most {MAX_RULES} allow rules"));
        }
        for (i, r) in self.allow.iter().enumerate() {
            if r.uid.is_none() && r.gid.is_none() {
                return Err(format!("allow[{i}] names neither uid nor gid"));
            }
            if r.audiences.is_empty() {
                return Err(format!(
                    "allow[{i}] lists no audience (use [\"*\"] for any)"
                ));
            }
        }
        Ok(())
    }

    /// The rules in force (the default when none are configured).
    pub fn rules(&self) -> Vec<WorkloadRule> {
        if self.allow.is_empty() {
            vec![WorkloadRule::own_user()]
        } else {
            self.allow.clone()
        }
    }

    pub fn socket_path(&self, data_dir: &Path) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| data_dir.join("workload.sock"))
    }
}

/// The caller's credentials, from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {} gid {}", self.uid, self.gid)?;
        if let Some(p) = self.pid {
            write!(f, " pid {p}")?;
        }
        Ok(())
    }
}

fn caller<T>(req: &Request<T>) -> Result<Caller, Error> {
    let cred = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .ok_or(Error::NoPeerCredentials)?;
    Ok(Caller {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    })
}

fn token_msg(t: &ServedToken) -> pb::WorkloadToken {
    pb::WorkloadToken {
        token: t.token.as_str().to_owned(),
        jti: t.jti.clone(),
        expires_at_unix: t.expires_at_unix,
        audience: t.audience.clone(),
        delegation_depth: t.delegation_depth,
    }
}

fn cert_msg(agent: &Agent) -> pb::WorkloadCertificate {
    let c = agent.chain();
    pb::WorkloadCertificate {
        agent_id: agent.id.to_string(),
        leaf: c.leaf,
        intermediate: c.intermediate,
        root: c.root,
        not_after_unix: lattice_shared::clock::unix_secs(c.info.not_after),
    }
}

fn check_audience(a: &str) -> Result<(), Error> {
    if a.is_empty()
        || a.len() > lattice_shared::limits::MAX_AUDIENCE_LEN
        || a.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(Error::InvalidArgument(format!(
            "audience must be 1..={} printable characters without spaces",
            lattice_shared::limits::MAX_AUDIENCE_LEN
        )));
    }
    Ok(())
}

#[derive(Debug)]
pub struct WorkloadService {
    agent: Arc<Agent>,
    rules: Arc<Vec<WorkloadRule>>,
    /// Turns true when the server stops: open watches end.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl WorkloadService {
    pub fn new(
        agent: Arc<Agent>,
        cfg: &WorkloadConfig,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            agent,
            rules: Arc::new(cfg.rules()),
            stopping,
        }
    }

    /// The caller, if some rule lets it do this.
    fn authorize<T>(
        &self,
        req: &Request<T>,
        audience: Option<&str>,
        delegate: bool,
    ) -> Result<Caller, Error> {
        let who = caller(req)?;
        let ok = self.rules.iter().any(|r| {
            r.matches(who.uid, who.gid)
                && audience.is_none_or(|a| r.allows_audience(a))
                && (!delegate || r.delegate)
        });
        if !ok {
            metrics::counter!("lattice_agent_workload_refusals_total").increment(1);
            tracing::warn!(caller = %who, audience = audience.unwrap_or(""), delegate, "workload caller refused");
            let what = match (audience, delegate) {
                (Some(a), true) => format!("to delegate tokens for {a}"),
                (Some(a), false) => format!("tokens for {a}"),
                (None, _) => "this agent's Workload API".to_string(),
            };
            return Err(Error::Denied(format!(
                "{who} is not allowed {what} by workload.allow"
            )));
        }
        Ok(who)
    }
}

type WatchStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::WorkloadUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Workload for WorkloadService {
    async fn fetch_token(
        &self,
        req: Request<pb::WorkloadTokenRequest>,
    ) -> Result<Response<pb::WorkloadToken>, Status> {
        check_audience(&req.get_ref().audience)?;
        let who = self.authorize(&req, Some(&req.get_ref().audience), false)?;
        let r = req.into_inner();
        let key = TokenKey::new(&r.audience, &r.scopes, r.ttl_secs);
        let t = self.agent.token_for(&key).await?;
        tracing::info!(caller = %who, audience = %key.audience, jti = %t.jti, "token served");
        metrics::counter!("lattice_agent_workload_tokens_total").increment(1);
        Ok(Response::new(token_msg(&t)))
    }

    async fn delegate(
        &self,
        req: Request<pb::WorkloadDelegateRequest>,
    ) -> Result<Response<pb::WorkloadToken>, Status> {
        if req.get_ref().subject_token.len() > lattice_shared::token::MAX_TOKEN_LEN {
            return Err(Error::InvalidArgument("subject_token is too long".into()).into());
        }
        // Authorized before the token is looked up, and one answer for a
        // token not held and one held for an audience this caller may not
        // use: the socket must not tell a caller which tokens are held.
        self.authorize(&req, None, true)?;
        let held = self.agent.held_audience(&req.get_ref().subject_token);
        let (audience, who) = match held.map(|a| (self.authorize(&req, Some(&a), true), a)) {
            Some((Ok(who), audience)) => (audience, who),
            _ => return Err(Error::Denied(crate::tokens::NOT_HELD.into()).into()),
        };
        let r = req.into_inner();
        let ttl = (r.ttl_secs > 0).then(|| std::time::Duration::from_secs(r.ttl_secs));
        let t = self
            .agent
            .delegate(&r.subject_token, &r.actor, &r.scopes, ttl)
            .await?;
        tracing::info!(caller = %who, audience = %audience, actor = %r.actor, jti = %t.jti, depth = t.delegation_depth, "token delegated");
        Ok(Response::new(token_msg(&t)))
    }

    async fn fetch_certificate(
        &self,
        req: Request<pb::WorkloadCertificateRequest>,
    ) -> Result<Response<pb::WorkloadCertificate>, Status> {
        self.authorize(&req, None, false)?;
        if self.agent.is_revoked() {
            return Err(Error::Revoked.into());
        }
        Ok(Response::new(cert_msg(&self.agent)))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WorkloadWatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let audience = req.get_ref().audience.clone();
        if !audience.is_empty() {
            check_audience(&audience)?;
        }
        let who = self.authorize(
            &req,
            (!audience.is_empty()).then_some(audience.as_str()),
            false,
        )?;
        if self.agent.is_revoked() {
            return Err(Error::Revoked.into());
        }
        let r = req.into_inner();
        let agent = self.agent.clone();
        let mut stopping = self.stopping.clone();
        // Subscribe before the first token so that nothing falls between.
        let mut events = agent.subscribe();
        let key = (!audience.is_empty()).then(|| TokenKey::new(&r.audience, &r.scopes, 0));
        let first = match &key {
            Some(k) => Some(agent.token_for(k).await?),
            None => None,
        };
        let guard = key.clone().map(|k| agent.keep(k));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::WorkloadUpdate, Status>>(16);
        let update = |u: pb::workload_update::Update| pb::WorkloadUpdate { update: Some(u) };
        tracing::info!(caller = %who, audience = %audience, "watch opened");
        tokio::spawn(async move {
            let _keep = guard;
            let mut served: std::collections::HashSet<String> = Default::default();
            let _ = tx
                .send(Ok(update(pb::workload_update::Update::Certificate(
                    cert_msg(&agent),
                ))))
                .await;
            if let Some(t) = first {
                served.insert(t.jti.clone());
                let _ = tx
                    .send(Ok(update(pb::workload_update::Update::Token(token_msg(
                        &t,
                    )))))
                    .await;
            }
            loop {
                let ev = tokio::select! {
                    // Events first: an identity revocation is told before
                    // the runtime's stop closes the stream.
                    biased;
                    ev = events.recv() => ev,
                    _ = tx.closed() => return,
                    _ = lattice_shared::net::until_true(&mut stopping) => {
                        let _ = tx.send(Err(Error::Stopping.into())).await;
                        return;
                    }
                };
                let msg = match ev {
                    Ok(AgentEvent::CertificateRenewed) => {
                        pb::workload_update::Update::Certificate(cert_msg(&agent))
                    }
                    Ok(AgentEvent::TokenRenewed(k)) if Some(&k) == key.as_ref() => {
                        match agent.token_for(&k).await {
                            Ok(t) => {
                                served.insert(t.jti.clone());
                                pb::workload_update::Update::Token(token_msg(&t))
                            }
                            Err(_) => continue,
                        }
                    }
                    Ok(AgentEvent::TokenRevoked { jti }) if served.remove(&jti) => {
                        pb::workload_update::Update::RevokedJti(jti)
                    }
                    Ok(AgentEvent::IdentityRevoked(why)) => {
                        let _ = tx
                            .send(Ok(update(pb::workload_update::Update::IdentityRevoked(
                                why,
                            ))))
                            .await;
                        return;
                    }
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(Err(Error::FellBehind.into())).await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(update(msg))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Serves the Workload API on `path` until `stop` resolves, then removes
/// the socket. A stale socket file from an earlier run is replaced; any
/// other file there is an error.
pub async fn serve(
    agent: Arc<Agent>,
    cfg: &WorkloadConfig,
    path: &Path,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::Config(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .map_err(|e| Error::Config(format!("removing stale {}: {e}", path.display())))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Config(format!("creating {}: {e}", dir.display())))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| Error::Config(format!("binding {}: {e}", path.display())))?;
    // Only the agent's user may connect unless rules admit others; the
    // kernel's peer credentials decide in every case.
    let own = effective_uid();
    let others = cfg.rules().iter().any(|r| r.uid != Some(own));
    let mode = if others { 0o666 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::Config(format!("chmod {}: {e}", path.display())))?;
    tracing::info!(socket = %path.display(), "workload API listening");
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let svc = pb::workload_server::WorkloadServer::new(WorkloadService::new(agent, cfg, stopping))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    if let Some(r) = ready {
        let _ = r.send(());
    }
    let served = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(32)
        .add_service(svc)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            async move {
                stop.await;
                stopping_tx.send_replace(true);
            },
        )
        .await;
    let _ = std::fs::remove_file(path);
    served.map_err(|e| Error::Transport(e.to_string()))
}

/// A client of the Workload API at `path` (for `lattice-agent` commands,
/// tests and local programs).
pub async fn connect(
    path: &Path,
) -> Result<pb::workload_client::WorkloadClient<tonic::transport::Channel>, Error> {
    let path = path.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://workload.invalid")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .map_err(|e| Error::Transport(e.to_string()))?;
    Ok(pb::workload_client::WorkloadClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_uid_or_gid_and_audience() {
        let r = WorkloadRule {
            uid: Some(1000),
            gid: None,
            audiences: vec!["https://a".into()],
            delegate: false,
        };
        assert!(r.matches(1000, 5));
        assert!(
            !r.matches(1001, 1000),
            "a gid equal to the uid is not the uid"
        );
        assert!(r.allows_audience("https://a"));
        assert!(!r.allows_audience("https://b"));
        let g = WorkloadRule {
            uid: None,
            gid: Some(100),
            audiences: any_audience(),
            delegate: true,
        };
        assert!(g.matches(4242, 100) && g.allows_audience("anything"));
        let both = WorkloadRule {
            uid: Some(1000),
            gid: Some(100),
            audiences: any_audience(),
            delegate: true,
        };
        assert!(both.matches(1000, 100));
        assert!(
            !both.matches(1000, 5) && !both.matches(7, 100),
            "both must match"
        );
    }

    #[test]
    fn config_is_checked() {
        let mut c = WorkloadConfig::default();
        assert!(c.validate().is_ok());
        assert_eq!(c.rules(), vec![WorkloadRule::own_user()]);
        c.allow.push(WorkloadRule {
            uid: None,
            gid: None,
            audiences: any_audience(),
            delegate: true,
        });
        assert!(
            c.validate()
                .expect_err("no principal")
                .contains("neither uid nor gid")
        );
        c.allow[0].uid = Some(1);
        c.allow[0].audiences.clear();
        assert!(
            c.validate()
                .expect_err("no audience")
                .contains("no audience")
        );
    }
}
