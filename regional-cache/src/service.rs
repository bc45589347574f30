//! gRPC handlers of the `Cache` service, plus the public JWKS document at
//! `/.well-known/jwks.json` on the same port (HTTP/1.1 or HTTP/2).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use lattice_shared::clock::unix_secs;
use lattice_shared::id::{Role, SpiffeId};
use lattice_shared::limits;
use lattice_shared::net::{PeerIdentity, authenticated};
use lattice_shared::pki::{MAX_DER_LEN, PkiError, Profile, inspect, sha256};
use lattice_shared::proto::{self as pb, cache_server::Cache};
use lattice_shared::token::{Actor, Claims, Confirmation, MAX_TOKEN_LEN, TokenVerifier};
use ring::rand::{SecureRandom, SystemRandom};
use tonic::{Request, Response, Status};

use lattice_shared::net::peer_addr;
use lattice_shared::policy::{AgentAction, AgentRequest, MAX_JOB_TYPE, Posture, hour_and_weekday};

use crate::{AuditEvent, State};

pub(crate) const OPEN_PATHS: &[&str] = &["/lattice.v1.Cache/Enrol", "/.well-known/jwks.json"];

#[derive(Debug, Clone)]
pub(crate) struct Service {
    state: Arc<State>,
    rng: SystemRandom,
}

pub(crate) fn routes(state: Arc<State>) -> tonic::service::Routes {
    let svc = Service {
        state: state.clone(),
        rng: SystemRandom::new(),
    };
    let grpc = tonic::service::Routes::new(
        pb::cache_server::CacheServer::new(svc)
            .max_decoding_message_size(limits::MAX_MESSAGE_BYTES),
    );
    let router = grpc.into_axum_router().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let state = state.clone();
            async move {
                (
                    [
                        (http::header::CONTENT_TYPE, "application/jwk-set+json"),
                        (http::header::CACHE_CONTROL, "max-age=30"),
                    ],
                    state.jwks_json().as_str().to_owned(),
                )
            }
        }),
    );
    tonic::service::Routes::from(router)
}

fn pki_status(e: PkiError) -> Status {
    match e {
        PkiError::BadCsr | PkiError::UnsupportedKey | PkiError::TooLarge => {
            Status::invalid_argument(e.to_string())
        }
        PkiError::Scope(m) => Status::permission_denied(m),
        other => {
            tracing::error!(error = %other, "certificate issuance failed");
            Status::internal("certificate issuance failed; see cache logs")
        }
    }
}

#[allow(clippy::result_large_err)]
impl Service {
    /// The caller must be an agent of this cache's region.
    fn require_agent<T>(&self, req: &Request<T>) -> Result<Arc<PeerIdentity>, Status> {
        let peer = authenticated(req, &self.state.clock)?;
        if peer.id.role() != Role::Agent {
            return Err(Status::permission_denied(format!(
                "{} is not an agent",
                peer.id
            )));
        }
        if peer.id.region() != Some(&self.state.region) {
            metrics::counter!("lattice_cache_refusals_total", "reason" => "wrong_region")
                .increment(1);
            return Err(Status::permission_denied(format!(
                "{} belongs to another region; this cache serves region {}",
                peer.id, self.state.region
            )));
        }
        Ok(peer)
    }

    /// Any verified caller that is not revoked (a connection made before a
    /// revocation must not outlive it).
    fn authenticated_unrevoked<T>(&self, req: &Request<T>) -> Result<Arc<PeerIdentity>, Status> {
        let peer = authenticated(req, &self.state.clock)?;
        self.state
            .sync
            .check_cert(&peer.cert, peer.issuer.as_ref())
            .map_err(Status::permission_denied)?;
        Ok(peer)
    }

    /// Freshness and revocations: may this agent get a credential now?
    fn serve_check(&self, peer: &PeerIdentity, ctx: &Ctx) -> Result<(), Status> {
        use crate::sync::Refusal;
        let ident = self.state.identity();
        let refusal =
            match self
                .state
                .sync
                .check(&peer.cert, peer.issuer.as_ref(), &ident.signing_serial)
            {
                Ok(()) => return Ok(()),
                Err(r) => r,
            };
        let (reason, status) = match refusal {
            Refusal::Stale { staleness_ms } => (
                "stale",
                Status::unavailable(format!(
                    "stale: this cache cannot prove it holds every revocation older than {} ms (last fresh: {}); retry or use another cache",
                    self.state.sync.max_staleness().as_millis(),
                    staleness_ms
                        .map(|s| format!("{s} ms ago"))
                        .unwrap_or_else(|| "never".into())
                )),
            ),
            Refusal::Revoked(m) => ("revoked", Status::permission_denied(m)),
        };
        metrics::counter!("lattice_cache_refusals_total", "reason" => reason, "cache" => self.state.id.to_string())
            .increment(1);
        self.audit_refusal(&peer.id, reason, ctx);
        Err(status)
    }

    /// Asks the policy in force; returns the deciding version, or the
    /// refusal naming the policies that determined it.
    #[allow(clippy::too_many_arguments)]
    fn policy_check(
        &self,
        agent: &SpiffeId,
        action: AgentAction,
        resource: &str,
        source: Option<std::net::SocketAddr>,
        ttl_secs: u64,
        scopes: &[String],
        claims: Option<&pb::AgentClaims>,
        delegation_depth: u32,
        ctx: &Ctx,
    ) -> Result<u64, Status> {
        let outcome = self.decide(
            agent,
            action,
            resource,
            source,
            ttl_secs,
            scopes,
            claims,
            delegation_depth,
        )?;
        if outcome.allowed {
            return Ok(outcome.version);
        }
        self.refuse_by_policy(agent, action, resource, &outcome, ctx)
    }

    /// The policy's decision, without recording it.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        agent: &SpiffeId,
        action: AgentAction,
        resource: &str,
        source: Option<std::net::SocketAddr>,
        ttl_secs: u64,
        scopes: &[String],
        claims: Option<&pb::AgentClaims>,
        delegation_depth: u32,
    ) -> Result<lattice_shared::policy::Outcome, Status> {
        let (posture, job_type) = match claims {
            Some(c) => {
                let posture = c
                    .posture
                    .as_ref()
                    .map(Posture::from_proto)
                    .transpose()
                    .map_err(Status::invalid_argument)?
                    .unwrap_or_default();
                if c.job_type.len() > MAX_JOB_TYPE || c.job_type.chars().any(char::is_control) {
                    return Err(Status::invalid_argument(format!(
                        "claims.job_type must be at most {MAX_JOB_TYPE} printable bytes"
                    )));
                }
                (posture, c.job_type.clone())
            }
            None => (Posture::default(), String::new()),
        };
        let (hour_utc, weekday) = hour_and_weekday(self.state.clock.now());
        let outcome = self.state.authorizer.authorize(&AgentRequest {
            principal: agent.clone(),
            action,
            resource: resource.to_string(),
            region: self.state.region.to_string(),
            source_ip: source
                .map(|a| a.ip())
                .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])),
            ttl_secs,
            // A set: one cache key for every order and repetition.
            scopes: {
                let mut s = scopes.to_vec();
                s.sort_unstable();
                s.dedup();
                s
            },
            posture,
            job_type,
            hour_utc,
            weekday,
            delegation_depth,
        });
        Ok(outcome)
    }

    /// Records a policy denial and returns its status.
    fn refuse_by_policy(
        &self,
        agent: &SpiffeId,
        action: AgentAction,
        resource: &str,
        outcome: &lattice_shared::policy::Outcome,
        ctx: &Ctx,
    ) -> Result<u64, Status> {
        let reason = outcome.denial();
        metrics::counter!("lattice_cache_refusals_total", "reason" => "policy", "cache" => self.state.id.to_string())
            .increment(1);
        tracing::info!(agent_id = %agent, action = action.name(), %resource, policy_version = outcome.version, %reason, "denied by policy");
        self.audit(AuditEvent::Refused {
            cache: self.state.id.clone(),
            agent: agent.clone(),
            source: ctx.source.clone(),
            request_id: ctx.request_id.clone(),
            action: ctx.action.to_owned(),
            resource: ctx.resource.clone(),
            reason: format!("policy: {reason}"),
            at_unix_ms: self.state.now_ms(),
            policy_version: outcome.version,
        });
        if outcome.version == 0 {
            return Err(Status::unavailable(
                "this cache has received no policy release yet; retry or use another cache",
            ));
        }
        Err(Status::permission_denied(reason))
    }

    /// May `agent` enrol at this cache (its region) with `claims`?
    fn enrol_decision(
        &self,
        agent: &SpiffeId,
        source: Option<std::net::SocketAddr>,
        claims: Option<&pb::AgentClaims>,
        request_id: &str,
    ) -> Result<u64, Status> {
        let region = self.state.region.as_str();
        let ctx = Ctx::new(request_id, source, AgentAction::Enrol.name(), region);
        self.policy_check(
            agent,
            AgentAction::Enrol,
            region,
            source,
            self.state.cfg.agent_cert_ttl_secs,
            &[],
            claims,
            0,
            &ctx,
        )
    }

    /// A refusal that is not a policy decision (those record themselves).
    fn audit_refusal(&self, agent: &SpiffeId, reason: &str, ctx: &Ctx) {
        self.audit(AuditEvent::Refused {
            cache: self.state.id.clone(),
            agent: agent.clone(),
            source: ctx.source.clone(),
            request_id: ctx.request_id.clone(),
            action: ctx.action.to_owned(),
            resource: ctx.resource.clone(),
            reason: reason.to_string(),
            at_unix_ms: self.state.now_ms(),
            policy_version: self.state.policy.version(),
        });
    }

    fn audit(&self, e: AuditEvent) {
        self.state
            .outbox
            .record(e.to_record(self.state.region.as_str()));
        if let Some(sink) = &self.state.audit {
            sink.record(e);
        }
    }

    fn issue_agent_cert(
        &self,
        agent: &SpiffeId,
        csr: &[u8],
    ) -> Result<pb::CertificateChain, Status> {
        if csr.is_empty() || csr.len() > MAX_DER_LEN {
            return Err(Status::invalid_argument(format!(
                "csr must be 1..={MAX_DER_LEN} bytes"
            )));
        }
        let ident = self.state.identity();
        let leaf = ident
            .ca
            .issue(
                csr,
                agent,
                Profile::TlsClient,
                self.state.clock.now(),
                Duration::from_secs(self.state.cfg.agent_cert_ttl_secs),
            )
            .map_err(pki_status)?;
        let not_after = inspect(&leaf).map(|i| unix_secs(i.not_after)).unwrap_or(0);
        metrics::counter!("lattice_cache_certificates_issued_total").increment(1);
        Ok(pb::CertificateChain {
            leaf,
            intermediate: ident.ca.cert_der().to_vec(),
            root: self.state.bundle.root_der().to_vec(),
            not_after_unix: not_after,
        })
    }

    /// The caller's `x-lattice-request-id` when it is a sane id, else a
    /// new one: it ties the audit record to the caller's own logs.
    fn request_id<T>(&self, req: &Request<T>) -> Result<String, Status> {
        if let Some(v) = req
            .metadata()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= 64
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            })
        {
            return Ok(v.to_owned());
        }
        self.random_id()
    }

    fn random_id(&self) -> Result<String, Status> {
        let mut b = [0u8; 16];
        self.rng
            .fill(&mut b)
            .map_err(|_| Status::internal("random number generator failed"))?;
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
    }
}

/// Request metadata (and response metadata) naming the request in the
/// audit log.
pub const REQUEST_ID_HEADER: &str = "x-lattice-request-id";

/// Answers with the request id in the metadata.
fn with_request_id<T>(body: T, id: &str) -> Response<T> {
    let mut r = Response::new(body);
    if let Ok(v) = id.parse() {
        r.metadata_mut().insert(REQUEST_ID_HEADER, v);
    }
    r
}

/// Longest `act` chain, whatever the policy says.
pub const MAX_DELEGATION_DEPTH: usize = 8;
const MAX_ACTOR_LEN: usize = 64;
/// Reported events an agent may send per window.
const REPORT_QUOTA: usize = 2000;
const REPORT_WINDOW_SECS: u64 = 10;
/// Events one `ReportAudit` call may carry.
pub const MAX_REPORTED_EVENTS: usize = 256;

fn valid_actor(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= MAX_ACTOR_LEN
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// How often a revocation watch carries a heartbeat when nothing happens.
pub const WATCH_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

fn valid_scope(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= limits::MAX_SCOPE_LEN
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

#[tonic::async_trait]
impl Cache for Service {
    async fn enrol(
        &self,
        req: Request<pb::EnrolAgentRequest>,
    ) -> Result<Response<pb::EnrolAgentResponse>, Status> {
        let source = peer_addr(&req);
        let request_id = self.request_id(&req)?;
        let r = req.into_inner();
        if r.join_token.is_empty() || r.join_token.len() > limits::MAX_JOIN_TOKEN_LEN {
            return Err(Status::invalid_argument(
                "join_token is missing or too long",
            ));
        }
        if r.csr.is_empty() || r.csr.len() > MAX_DER_LEN {
            return Err(Status::invalid_argument(format!(
                "csr must be 1..={MAX_DER_LEN} bytes"
            )));
        }
        if !r.requested_id.is_empty() {
            let want = SpiffeId::parse(&r.requested_id)
                .map_err(|e| Status::invalid_argument(format!("requested_id: {e}")))?;
            if want.region() != Some(&self.state.region) || want.role() != Role::Agent {
                return Err(Status::permission_denied(format!(
                    "{want} cannot enrol here: this cache enrols agents of region {}",
                    self.state.region
                )));
            }
            // Policy first, so that a denial does not burn the one-time
            // token. The caller is not authenticated yet: the reason stays
            // in our logs and audit trail.
            self.enrol_decision(&want, source, r.claims.as_ref(), &request_id)
                .map_err(|s| match s.code() {
                    tonic::Code::PermissionDenied => Status::permission_denied(
                        "enrolment denied by policy; the join token was not used",
                    ),
                    _ => s,
                })?;
        }
        // A malformed request must not burn the one-time token.
        lattice_shared::pki::check_csr(&r.csr).map_err(pki_status)?;
        let token_hash = sha256(r.join_token.as_bytes());
        if self.state.sync.is_join_token_revoked(&token_hash) {
            return Err(Status::permission_denied("join token has been revoked"));
        }
        // The token is redeemed at the control plane (exactly once, bound to
        // this cache's region); only its hash leaves this process.
        let resp = self
            .state
            .cp
            .clone()
            .redeem_join_token(pb::RedeemJoinTokenRequest {
                token_sha256: token_hash.to_vec(),
                requested_id: r.requested_id.clone(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
                | tonic::Code::InvalidArgument => Status::new(s.code(), s.message().to_owned()),
                _ => {
                    tracing::warn!(error = %s, "control plane unreachable for enrolment");
                    Status::unavailable(
                        "the control plane is unreachable; enrolment needs it, retry later",
                    )
                }
            })?
            .into_inner();
        let agent = SpiffeId::parse(&resp.agent_id)
            .map_err(|_| Status::internal("control plane returned a malformed id"))?;
        if self.state.sync.is_agent_revoked(&agent) {
            return Err(Status::permission_denied(format!(
                "{agent} has been revoked"
            )));
        }
        // Again for the id the token is bound to, under the release in force
        // now (a cached decision when nothing changed).
        let version = self.enrol_decision(&agent, source, r.claims.as_ref(), &request_id)?;
        let chain = self.issue_agent_cert(&agent, &r.csr)?;
        tracing::info!(agent_id = %agent, policy_version = version, "agent enrolled");
        Ok(Response::new(pb::EnrolAgentResponse {
            agent_id: agent.to_string(),
            chain: Some(chain),
        }))
    }

    async fn issue_certificate(
        &self,
        req: Request<pb::IssueCertificateRequest>,
    ) -> Result<Response<pb::IssueCertificateResponse>, Status> {
        let peer = self.require_agent(&req)?;
        let ctx = Ctx::new(
            &self.request_id(&req)?,
            peer_addr(&req),
            AgentAction::IssueCertificate.name(),
            self.state.region.as_str(),
        );
        self.serve_check(&peer, &ctx)?;
        let version = self.policy_check(
            &peer.id,
            AgentAction::IssueCertificate,
            self.state.region.as_str(),
            peer_addr(&req),
            self.state.cfg.agent_cert_ttl_secs,
            &[],
            req.get_ref().claims.as_ref(),
            0,
            &ctx,
        )?;
        let chain = self.issue_agent_cert(&peer.id, &req.get_ref().csr)?;
        tracing::debug!(agent_id = %peer.id, policy_version = version, "agent certificate renewed");
        Ok(Response::new(pb::IssueCertificateResponse {
            chain: Some(chain),
        }))
    }

    async fn mint_token(
        &self,
        req: Request<pb::MintTokenRequest>,
    ) -> Result<Response<pb::MintTokenResponse>, Status> {
        let started = Instant::now();
        let peer = self.require_agent(&req)?;
        let source = peer_addr(&req);
        let request_id = self.request_id(&req)?;
        let r = req.into_inner();
        let cfg = &self.state.cfg;
        if r.audience.is_empty()
            || r.audience.len() > limits::MAX_AUDIENCE_LEN
            || !valid_scope(&r.audience)
        {
            return Err(Status::invalid_argument(format!(
                "audience must be 1..={} printable characters without spaces",
                limits::MAX_AUDIENCE_LEN
            )));
        }
        if r.scopes.len() > limits::MAX_SCOPES || !r.scopes.iter().all(|s| valid_scope(s)) {
            return Err(Status::invalid_argument(format!(
                "at most {} scopes of 1..={} printable characters without spaces",
                limits::MAX_SCOPES,
                limits::MAX_SCOPE_LEN
            )));
        }
        let ttl_secs = if r.ttl_secs == 0 {
            cfg.token_default_ttl_secs
        } else {
            r.ttl_secs
        };
        if ttl_secs > cfg.token_max_ttl_secs {
            return Err(Status::invalid_argument(format!(
                "requested ttl {ttl_secs}s exceeds this cache's maximum of {}s",
                cfg.token_max_ttl_secs
            )));
        }
        let ctx = Ctx::new(
            &request_id,
            source,
            AgentAction::MintToken.name(),
            &r.audience,
        );
        self.serve_check(&peer, &ctx)?;
        let policy_version = self
            .policy_check(
                &peer.id,
                AgentAction::MintToken,
                &r.audience,
                source,
                ttl_secs,
                &r.scopes,
                r.claims.as_ref(),
                0,
                &ctx,
            )
            .inspect_err(|_| {
                metrics::counter!("lattice_cache_mint_total", "outcome" => "denied").increment(1);
            })?;
        let now = unix_secs(self.state.clock.now());
        // A token never outlives the certificate it is bound to.
        let exp = (now + i64::try_from(ttl_secs).unwrap_or(0)).min(unix_secs(peer.cert.not_after));
        let jti = self.random_id()?;
        let ident = self.state.identity();
        let claims = Claims {
            iss: self.state.id.to_string(),
            sub: peer.id.to_string(),
            aud: r.audience,
            scope: r.scopes.join(" "),
            jti: jti.clone(),
            iat: now,
            nbf: now,
            exp,
            cnf: Some(Confirmation {
                x5t_s256: peer.cert.thumbprint_b64(),
            }),
            act: None,
            parent_jtis: Vec::new(),
        };
        let token = ident
            .signer
            .sign(&claims)
            .map_err(|_| Status::internal("token signing failed"))?;
        metrics::counter!("lattice_cache_mint_total", "outcome" => "issued").increment(1);
        self.state.issued.record(
            &peer.id,
            r.claims.as_ref(),
            crate::issued::IssuedToken {
                jti: jti.clone(),
                action: AgentAction::MintToken,
                audience: claims.aud.clone(),
                scopes: r.scopes.clone(),
                exp_unix: exp,
                depth: 0,
            },
        );
        self.audit(AuditEvent::Issued {
            cache: self.state.id.clone(),
            agent: peer.id.clone(),
            source: source.map(|a| a.ip().to_string()).unwrap_or_default(),
            request_id: request_id.clone(),
            jti: jti.clone(),
            audience: claims.aud.clone(),
            at_unix_ms: self.state.now_ms(),
            policy_version,
        });
        metrics::histogram!("lattice_cache_mint_seconds").record(started.elapsed().as_secs_f64());
        Ok(with_request_id(
            pb::MintTokenResponse {
                token,
                jti,
                expires_at_unix: exp,
                kid: ident.signer.kid().to_owned(),
                policy_version,
            },
            &request_id,
        ))
    }

    async fn lease_secret(
        &self,
        req: Request<pb::LeaseSecretRequest>,
    ) -> Result<Response<pb::LeaseSecretResponse>, Status> {
        use crate::secrets::Lookup;
        let started = Instant::now();
        let peer = self.require_agent(&req)?;
        let source = peer_addr(&req);
        let request_id = self.request_id(&req)?;
        let r = req.into_inner();
        let cfg = &self.state.cfg;
        lattice_shared::envelope::check_secret_name(&r.name).map_err(Status::invalid_argument)?;
        let ttl_secs = if r.ttl_secs == 0 {
            cfg.lease_default_ttl_secs
        } else {
            r.ttl_secs
        };
        if ttl_secs > cfg.lease_max_ttl_secs {
            return Err(Status::invalid_argument(format!(
                "requested lease ttl {ttl_secs}s exceeds this cache's maximum of {}s",
                cfg.lease_max_ttl_secs
            )));
        }
        let refused = |reason: &'static str| {
            metrics::counter!("lattice_cache_lease_total", "outcome" => reason).increment(1);
        };
        let ctx = Ctx::new(
            &request_id,
            source,
            AgentAction::LeaseSecret.name(),
            &r.name,
        );
        self.serve_check(&peer, &ctx)
            .inspect_err(|_| refused("unavailable"))?;
        let policy_version = self
            .policy_check(
                &peer.id,
                AgentAction::LeaseSecret,
                &r.name,
                source,
                ttl_secs,
                &[],
                r.claims.as_ref(),
                0,
                &ctx,
            )
            .inspect_err(|_| refused("denied"))?;
        let now = unix_secs(self.state.clock.now());
        if r.version != 0
            && self
                .state
                .sync
                .is_secret_version_revoked(&r.name, r.version)
        {
            refused("revoked");
            let reason = format!("secret {} version {} has been revoked", r.name, r.version);
            self.audit_refusal(&peer.id, &reason, &ctx);
            return Err(Status::permission_denied(reason));
        }
        let (found, sealed) = self.state.sync.secrets.lookup(&r.name, r.version, now);
        let what = |v: u64| {
            if v == 0 {
                format!("secret {}", r.name)
            } else {
                format!("secret {} version {v}", r.name)
            }
        };
        let (version, grace_until, sealed) = match (found, sealed) {
            (Lookup::Found(v, until), Some(s)) => (v, until, s),
            (Lookup::GraceOver(v), _) => {
                refused("retired");
                return Err(Status::failed_precondition(format!(
                    "{}: its grace window as the previous version has ended",
                    what(v)
                )));
            }
            (Lookup::Retired(v), _) => {
                refused("retired");
                return Err(Status::failed_precondition(format!(
                    "{} is neither active nor previous",
                    what(v)
                )));
            }
            _ => {
                refused("unknown");
                return Err(Status::not_found(format!(
                    "{} is not held by this cache (unknown, not active, or not distributed to region {})",
                    what(r.version),
                    self.state.region
                )));
            }
        };
        if self.state.sync.is_secret_version_revoked(&r.name, version) {
            refused("revoked");
            let reason = format!("{} has been revoked", what(version));
            self.audit_refusal(&peer.id, &reason, &ctx);
            return Err(Status::permission_denied(reason));
        }
        let me = self.state.id.to_string();
        let value = crate::secrets::open(&self.state.hpke, &me, &r.name, version, &sealed, now)
            .map_err(|e| {
                refused("corrupt");
                tracing::error!(secret = %r.name, version, error = %e, "a stored envelope does not open");
                Status::internal(format!("{}: the envelope held here does not open; see cache logs", what(version)))
            })?;
        let mut exp = now + i64::try_from(ttl_secs).unwrap_or(0);
        if let Some(until) = grace_until {
            exp = exp.min(until);
        }
        let lease_id = self.random_id()?;
        metrics::counter!("lattice_cache_lease_total", "outcome" => "leased").increment(1);
        tracing::info!(agent_id = %peer.id, secret = %r.name, version, lease_id = %lease_id, fingerprint = %sealed.fingerprint, policy_version, "secret leased");
        self.audit(AuditEvent::Leased {
            cache: self.state.id.clone(),
            agent: peer.id.clone(),
            source: source.map(|a| a.ip().to_string()).unwrap_or_default(),
            request_id: request_id.clone(),
            secret: r.name.clone(),
            version,
            lease_id: lease_id.clone(),
            fingerprint: sealed.fingerprint.clone(),
            expires_at_unix: exp,
            at_unix_ms: self.state.now_ms(),
            policy_version,
        });
        metrics::histogram!("lattice_cache_lease_seconds").record(started.elapsed().as_secs_f64());
        // The response buffer is tonic's from here; our copy is zeroized.
        Ok(with_request_id(
            pb::LeaseSecretResponse {
                value: value.to_vec(),
                lease_id,
                version,
                expires_at_unix: exp,
                policy_version,
                fingerprint: sealed.fingerprint.clone(),
            },
            &request_id,
        ))
    }

    async fn jwks(
        &self,
        req: Request<pb::JwksRequest>,
    ) -> Result<Response<pb::JwksResponse>, Status> {
        self.authenticated_unrevoked(&req)?;
        Ok(Response::new(pb::JwksResponse {
            jwks_json: self.state.jwks_json().as_str().to_owned(),
        }))
    }

    type WatchRevocationsStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::RevocationNotice, Status>>;

    async fn watch_revocations(
        &self,
        req: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        self.authenticated_unrevoked(&req)?;
        let after = req.get_ref().after_seq;
        // Subscribe before reading the backlog so that nothing falls between.
        let mut live = self.state.sync.subscribe_notices();
        let state = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut stop_all = self.state.stopping.clone();
        let task = async move {
            let notice = |seq: u64, r: pb::Revocation| pb::RevocationNotice {
                seq,
                revocation: Some(r),
                cache_staleness_ms: state.sync.staleness_ms().unwrap_or(u64::MAX),
            };
            let mut last = after;
            loop {
                let st = state.clone();
                let from = last;
                let batch = match tokio::task::spawn_blocking(move || {
                    crate::sync::revocations_after(&st.store, from, 256)
                })
                .await
                {
                    Ok(Ok(b)) => b,
                    _ => {
                        let _ = tx
                            .send(Err(Status::internal("reading revocations failed")))
                            .await;
                        return;
                    }
                };
                let (batch, n, scanned_to) = batch;
                for (seq, r) in batch {
                    if tx.send(Ok(notice(seq, r))).await.is_err() {
                        return;
                    }
                }
                last = scanned_to;
                if n < 256 {
                    break;
                }
            }
            let mut stopping = state.stopping.clone();
            let mut heartbeat = tokio::time::interval(WATCH_HEARTBEAT);
            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let next = tokio::select! {
                    // Queued revocations go before a heartbeat, so that a
                    // heartbeat never vouches for one still queued behind it.
                    biased;
                    n = live.recv() => n,
                    _ = lattice_shared::net::until_true(&mut stopping) => {
                        let _ = tx.send(Err(Status::unavailable("cache stopping"))).await;
                        return;
                    }
                    _ = heartbeat.tick() => {
                        // No revocation: tells followers how fresh this cache is.
                        let beat = pb::RevocationNotice {
                            seq: last,
                            revocation: None,
                            cache_staleness_ms: state.sync.staleness_ms().unwrap_or(u64::MAX),
                        };
                        if tx.send(Ok(beat)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                match next {
                    Ok((seq, r)) if seq > last => {
                        last = seq;
                        if tx.send(Ok(notice(seq, r))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx
                            .send(Err(Status::aborted(format!(
                                "fell behind; resume after {last}"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        };
        // Ends with the cache even when blocked on a reader that reads nothing.
        tokio::spawn(async move {
            tokio::select! {
                _ = task => {}
                _ = lattice_shared::net::until_true(&mut stop_all) => {}
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn exchange_token(
        &self,
        req: Request<pb::ExchangeTokenRequest>,
    ) -> Result<Response<pb::ExchangeTokenResponse>, Status> {
        let started = Instant::now();
        let peer = self.require_agent(&req)?;
        let source = peer_addr(&req);
        let request_id = self.request_id(&req)?;
        let r = req.into_inner();
        let cfg = &self.state.cfg;
        if r.subject_token.is_empty() || r.subject_token.len() > MAX_TOKEN_LEN {
            return Err(Status::invalid_argument(format!(
                "subject_token must be a JWT of at most {MAX_TOKEN_LEN} bytes"
            )));
        }
        if !valid_actor(&r.actor) {
            return Err(Status::invalid_argument(format!(
                "actor must be 1..={MAX_ACTOR_LEN} characters of A-Z a-z 0-9 . _ -"
            )));
        }
        if r.scopes.is_empty()
            || r.scopes.len() > limits::MAX_SCOPES
            || !r.scopes.iter().all(|s| valid_scope(s))
        {
            return Err(Status::invalid_argument(format!(
                "1..={} scopes of 1..={} printable characters without spaces (a delegated token needs at least one)",
                limits::MAX_SCOPES,
                limits::MAX_SCOPE_LEN
            )));
        }
        if r.ttl_secs > cfg.token_max_ttl_secs {
            return Err(Status::invalid_argument(format!(
                "requested ttl {}s exceeds this cache's maximum of {}s",
                r.ttl_secs, cfg.token_max_ttl_secs
            )));
        }
        // The resource is the parent's audience, known once it verifies.
        let mut ctx = Ctx::new(&request_id, source, AgentAction::ExchangeToken.name(), "");
        self.serve_check(&peer, &ctx)?;
        let refused = |reason: &'static str, status: Status| {
            metrics::counter!("lattice_cache_exchange_total", "outcome" => reason).increment(1);
            status
        };
        // The parent must be a valid lattice token issued to the caller.
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&self.state.jwks_json())
            .map_err(|_| Status::internal("JWKS unreadable"))?;
        let parent = TokenVerifier::new(jwks, self.state.bundle.clone(), self.state.clock.clone())
            .verify_any_audience(&r.subject_token)
            .map_err(|e| {
                refused(
                    "invalid_parent",
                    Status::unauthenticated(format!("subject_token: {e}")),
                )
            })?;
        ctx.resource = parent.aud.clone();
        if parent.sub != peer.id.as_str() {
            self.audit_refusal(
                &peer.id,
                "exchange: subject token issued to another agent",
                &ctx,
            );
            return Err(refused(
                "not_holder",
                Status::permission_denied(format!(
                    "the subject token was issued to {}, not to the caller {}",
                    parent.sub, peer.id
                )),
            ));
        }
        if parent.iss != self.state.id.as_str() {
            // A child carries only its own issuer: delegating another
            // cache's token would let the child outlive that cache's
            // revocation. The agent asks its current cache for a new parent.
            return Err(refused(
                "foreign_parent",
                Status::failed_precondition(format!(
                    "the subject token was issued by {}, not this cache ({}): exchange a token from this cache",
                    parent.iss, self.state.id
                )),
            ));
        }
        if let Err(m) = self.state.sync.check_token(&parent) {
            self.audit_refusal(&peer.id, &format!("exchange: {m}"), &ctx);
            return Err(refused("revoked", Status::permission_denied(m)));
        }
        let allowed = parent.scopes();
        if let Some(wider) = r.scopes.iter().find(|s| !allowed.contains(&s.as_str())) {
            self.audit_refusal(&peer.id, "exchange: scope wider than the parent's", &ctx);
            return Err(refused(
                "wider",
                Status::permission_denied(format!(
                    "scope {wider:?} is not among the parent token's scopes ({}): a delegated token can only narrow",
                    parent.scope
                )),
            ));
        }
        let depth = parent.delegation_depth() + 1;
        if depth > MAX_DELEGATION_DEPTH {
            return Err(refused(
                "too_deep",
                Status::permission_denied(format!(
                    "a delegation chain is at most {MAX_DELEGATION_DEPTH} links long"
                )),
            ));
        }
        let depth = u32::try_from(depth).unwrap_or(u32::MAX);
        let now = unix_secs(self.state.clock.now());
        let exp = if r.ttl_secs == 0 {
            parent.exp
        } else {
            (now + i64::try_from(r.ttl_secs).unwrap_or(i64::MAX)).min(parent.exp)
        };
        let ttl_secs = u64::try_from(exp - now).unwrap_or(0);
        let policy_version = self
            .policy_check(
                &peer.id,
                AgentAction::ExchangeToken,
                &parent.aud,
                source,
                ttl_secs,
                &r.scopes,
                r.claims.as_ref(),
                depth,
                &ctx,
            )
            .inspect_err(|_| {
                metrics::counter!("lattice_cache_exchange_total", "outcome" => "denied")
                    .increment(1);
            })?;
        let jti = self.random_id()?;
        let ident = self.state.identity();
        let mut parent_jtis = parent.parent_jtis.clone();
        parent_jtis.push(parent.jti.clone());
        let actor = format!("{}/{}", peer.id, r.actor);
        let claims = Claims {
            iss: self.state.id.to_string(),
            sub: parent.sub.clone(),
            aud: parent.aud.clone(),
            scope: r.scopes.join(" "),
            jti: jti.clone(),
            iat: now,
            nbf: now,
            exp,
            // The sub-agent does not hold the agent's key: no binding.
            cnf: None,
            act: Some(Actor {
                sub: actor.clone(),
                act: parent.act.clone().map(Box::new),
            }),
            parent_jtis,
        };
        let token = ident
            .signer
            .sign(&claims)
            .map_err(|_| Status::internal("token signing failed"))?;
        metrics::counter!("lattice_cache_exchange_total", "outcome" => "issued").increment(1);
        self.state.issued.record(
            &peer.id,
            r.claims.as_ref(),
            crate::issued::IssuedToken {
                jti: jti.clone(),
                action: AgentAction::ExchangeToken,
                audience: claims.aud.clone(),
                scopes: r.scopes.clone(),
                exp_unix: exp,
                depth,
            },
        );
        self.audit(AuditEvent::Delegated {
            cache: self.state.id.clone(),
            agent: peer.id.clone(),
            source: source.map(|a| a.ip().to_string()).unwrap_or_default(),
            request_id: request_id.clone(),
            jti: jti.clone(),
            parent_jti: parent.jti.clone(),
            actor,
            audience: claims.aud.clone(),
            depth,
            at_unix_ms: self.state.now_ms(),
            policy_version,
        });
        metrics::histogram!("lattice_cache_exchange_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(with_request_id(
            pb::ExchangeTokenResponse {
                token,
                jti,
                expires_at_unix: exp,
                kid: ident.signer.kid().to_owned(),
                policy_version,
                depth,
                issued_token_type: "urn:ietf:params:oauth:token-type:jwt".into(),
            },
            &request_id,
        ))
    }

    async fn report_audit(
        &self,
        req: Request<pb::ReportAuditRequest>,
    ) -> Result<Response<pb::ReportAuditResponse>, Status> {
        let peer = self.require_agent(&req)?;
        self.state
            .sync
            .check_cert(&peer.cert, peer.issuer.as_ref())
            .map_err(Status::permission_denied)?;
        let r = req.into_inner();
        if r.events.len() > MAX_REPORTED_EVENTS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_REPORTED_EVENTS} events per report"
            )));
        }
        let bounded = |name: &str, v: &str, max: usize| -> Result<(), Status> {
            if v.len() > max || v.chars().any(char::is_control) {
                return Err(Status::invalid_argument(format!(
                    "{name} must be at most {max} printable bytes"
                )));
            }
            Ok(())
        };
        for e in &r.events {
            if !matches!(e.kind.as_str(), "proxy_use" | "proxy_refused") {
                return Err(Status::invalid_argument(format!(
                    "unknown event kind {:?} (proxy_use, proxy_refused)",
                    e.kind
                )));
            }
            bounded("resource", &e.resource, 256)?;
            bounded("detail", &e.detail, 512)?;
            bounded("fingerprint", &e.fingerprint, 128)?;
            bounded("local_caller", &e.local_caller, 64)?;
            bounded("request_id", &e.request_id, 64)?;
        }
        let n = r.events.len();
        // At most REPORT_QUOTA events per agent per REPORT_WINDOW: an agent
        // cannot flood the outbox its cache's own records go through.
        {
            let window = self.state.clock.monotonic().as_secs() / REPORT_WINDOW_SECS;
            let slot = self.state.report_quota.get_with(peer.id.clone(), || {
                Arc::new(std::sync::Mutex::new((window, 0)))
            });
            let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
            if g.0 != window {
                *g = (window, 0);
            }
            if g.1 + n > REPORT_QUOTA {
                metrics::counter!("lattice_cache_reported_events_refused_total")
                    .increment(n as u64);
                return Err(Status::resource_exhausted(format!(
                    "at most {REPORT_QUOTA} reported events per {REPORT_WINDOW_SECS} s per agent; retry later"
                )));
            }
            g.1 += n;
        }
        let received = self.state.now_ms();
        for e in r.events {
            self.audit(AuditEvent::Reported {
                cache: self.state.id.clone(),
                agent: peer.id.clone(),
                kind: e.kind,
                resource: e.resource,
                detail: e.detail,
                fingerprint: e.fingerprint,
                local_caller: e.local_caller,
                request_id: e.request_id,
                at_unix_ms: e.at_unix_ms,
                received_at_unix_ms: received,
            });
        }
        metrics::counter!("lattice_cache_reported_events_total").increment(n as u64);
        Ok(Response::new(pb::ReportAuditResponse {
            accepted: u32::try_from(n).unwrap_or(u32::MAX),
        }))
    }

    async fn report_claims(
        &self,
        req: Request<pb::ReportClaimsRequest>,
    ) -> Result<Response<pb::ReportClaimsResponse>, Status> {
        let peer = self.require_agent(&req)?;
        let source = peer_addr(&req);
        let ctx = Ctx::new(&self.request_id(&req)?, source, "ReportClaims", "");
        self.serve_check(&peer, &ctx)?;
        let claims = req.into_inner().claims.unwrap_or_default();
        let now = unix_secs(self.state.clock.now());
        let (changed, live) = self.state.issued.update_claims(&peer.id, &claims, now);
        let mut revoked = Vec::new();
        let mut version = self.state.policy.version();
        if changed {
            for t in &live {
                let ttl = u64::try_from(t.exp_unix - now).unwrap_or(0);
                let outcome = self.decide(
                    &peer.id,
                    t.action,
                    &t.audience,
                    source,
                    ttl,
                    &t.scopes,
                    Some(&claims),
                    t.depth,
                )?;
                version = outcome.version;
                if !outcome.allowed {
                    revoked.push(t.jti.clone());
                }
            }
        }
        if !revoked.is_empty() {
            let reason = format!(
                "{}: claims changed; policy v{version} no longer allows these tokens",
                peer.id
            );
            self.state.issued.forget(&peer.id, &revoked);
            self.state.issued.request_revocation(&revoked, &reason);
            metrics::counter!("lattice_cache_posture_revocations_total")
                .increment(revoked.len() as u64);
            tracing::warn!(agent_id = %peer.id, tokens = revoked.len(), policy_version = version, "claims changed: revoking tokens the policy no longer allows");
            self.audit_refusal(
                &peer.id,
                &format!(
                    "claims changed: {} live token(s) no longer allowed, revocation requested",
                    revoked.len()
                ),
                &ctx,
            );
        }
        Ok(Response::new(pb::ReportClaimsResponse {
            revoked_jtis: revoked,
            policy_version: version,
        }))
    }

    async fn ping(
        &self,
        req: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        self.authenticated_unrevoked(&req)?;
        let r = req.into_inner();
        if r.payload.len() > limits::MAX_PING_PAYLOAD {
            return Err(Status::invalid_argument("payload too large"));
        }
        let serving = self
            .state
            .sync
            .staleness_ms()
            .is_some_and(|s| u128::from(s) <= self.state.sync.max_staleness().as_millis());
        Ok(Response::new(pb::PingResponse {
            payload: r.payload,
            serving,
        }))
    }
}

/// Who asked, from where, for what: what a refusal record carries besides
/// the caller's id, so that a denial can be traced like an issuance.
#[derive(Debug, Clone)]
struct Ctx {
    request_id: String,
    source: String,
    action: &'static str,
    resource: String,
}

impl Ctx {
    fn new(
        request_id: &str,
        source: Option<std::net::SocketAddr>,
        action: &'static str,
        resource: &str,
    ) -> Self {
        Self {
            request_id: request_id.to_owned(),
            source: source.map(|a| a.ip().to_string()).unwrap_or_default(),
            action,
            resource: resource.to_owned(),
        }
    }
}
