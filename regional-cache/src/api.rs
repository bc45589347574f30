//! The wire: gRPC handlers of the `Cache` service and the public JWKS
//! document at `/.well-known/jwks.json` on the same port (HTTP/1.1 or
//! HTTP/2). Each handler authenticates, decodes the request into an
//! operation's typed input (the bounds checks of the wire), calls the
//! operation and encodes its answer; errors become a `Status` in `error.rs`.

use std::sync::Arc;

use lattice_shared::id::SpiffeId;
use lattice_shared::limits;
use lattice_shared::net::peer_addr;
use lattice_shared::pki::MAX_DER_LEN;
use lattice_shared::policy::AgentAction;
use lattice_shared::posture::Posture;
use lattice_shared::proto::{self as pb, cache_server::Cache};
use lattice_shared::token::MAX_TOKEN_LEN;
use tonic::{Request, Response, Status};

use crate::call::{AgentCall, AgentClaims, request_id, require_agent, require_unrevoked};
use crate::config::Config;
use crate::ops::{enrol, lease, report, token};
use crate::replica::Replica;
use crate::{Error, State};

/// Where this cache's own keys are published (its discovery document's
/// `jwks_uri`), beside the lattice-wide `/.well-known/jwks.json`.
pub(crate) const ISSUER_JWKS_PATH: &str = "/.well-known/issuer-jwks.json";
const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
const JWKS_PATH: &str = "/.well-known/jwks.json";
pub(crate) const OPEN_PATHS: &[&str] = &[
    "/lattice.v1.Cache/Enrol",
    JWKS_PATH,
    ISSUER_JWKS_PATH,
    DISCOVERY_PATH,
];

const MAX_ACTOR_LEN: usize = 64;
/// Events one `ReportAudit` call may carry.
const MAX_REPORTED_EVENTS: usize = 256;

#[derive(Debug, Clone)]
pub(crate) struct Service {
    state: Arc<State>,
}

/// The gRPC service and the public documents: the lattice-wide JWKS, this
/// cache's own JWKS and its discovery document (`port`: where it listens).
pub(crate) fn routes(state: Arc<State>, port: u16) -> tonic::service::Routes {
    let svc = Service {
        state: state.clone(),
    };
    let grpc = tonic::service::Routes::new(
        pb::cache_server::CacheServer::new(svc)
            .max_decoding_message_size(limits::MAX_MESSAGE_BYTES),
    );
    let document = |content_type: &'static str, body: Arc<dyn Fn() -> String + Send + Sync>| {
        axum::routing::get(move || {
            let body = body();
            async move {
                (
                    [
                        (http::header::CONTENT_TYPE, content_type),
                        (http::header::CACHE_CONTROL, "max-age=30"),
                    ],
                    body,
                )
            }
        })
    };
    let jwks = "application/jwk-set+json";
    let (all, mine) = (state.clone(), state.clone());
    let discovery = state.discovery_json(port);
    let router = grpc
        .into_axum_router()
        .route(
            JWKS_PATH,
            document(jwks, Arc::new(move || all.jwks_json().as_str().to_owned())),
        )
        .route(
            ISSUER_JWKS_PATH,
            document(
                jwks,
                Arc::new(move || mine.issuer_jwks_json().as_str().to_owned()),
            ),
        )
        .route(
            DISCOVERY_PATH,
            document("application/json", Arc::new(move || discovery.clone())),
        );
    tonic::service::Routes::from(router)
}

/// What `Ping` answers as `serving`: the freshness and self-revocation
/// check a mint starts with.
pub(crate) fn ping_serving(replica: &Replica, signer_serial: &str) -> bool {
    replica.can_serve(signer_serial).is_ok()
}

/// Answers with the request id in the metadata.
fn with_request_id<T>(body: T, id: &str) -> Response<T> {
    let mut r = Response::new(body);
    if let Ok(v) = id.parse() {
        r.metadata_mut().insert(limits::REQUEST_ID_HEADER, v);
    }
    r
}

fn chain(c: enrol::Chain) -> pb::CertificateChain {
    pb::CertificateChain {
        leaf: c.leaf,
        intermediate: c.intermediate,
        root: c.root,
        not_after_unix: c.not_after_unix,
    }
}

/// The claims as sent (none: none reported).
fn claims(c: Option<&pb::AgentClaims>) -> AgentClaims {
    match c {
        Some(c) => AgentClaims::new(
            c.posture.as_ref().map(Posture::from_proto),
            c.job_type.clone(),
        ),
        None => AgentClaims::new(None, String::new()),
    }
}

fn valid_actor(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= MAX_ACTOR_LEN
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn valid_scope(s: &str) -> bool {
    valid_word(s, limits::MAX_SCOPE_LEN)
}

/// 1..=`max` printable ASCII characters, no space, quote or backslash (they
/// go into token claims and audit records verbatim).
fn valid_word(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

fn decode_enrol(r: pb::EnrolAgentRequest) -> Result<enrol::Enrol, Error> {
    if r.join_token.is_empty() || r.join_token.len() > limits::MAX_JOIN_TOKEN_LEN {
        return Err(Error::InvalidArgument(
            "join_token is missing or too long".into(),
        ));
    }
    if r.csr.is_empty() || r.csr.len() > MAX_DER_LEN {
        return Err(Error::InvalidArgument(format!(
            "csr must be 1..={MAX_DER_LEN} bytes"
        )));
    }
    let requested_id = if r.requested_id.is_empty() {
        None
    } else {
        Some(
            SpiffeId::parse(&r.requested_id)
                .map_err(|e| Error::InvalidArgument(format!("requested_id: {e}")))?,
        )
    };
    Ok(enrol::Enrol {
        claims: claims(r.claims.as_ref()),
        join_token: r.join_token,
        csr: r.csr,
        requested_id,
    })
}

fn decode_mint(r: pb::MintTokenRequest, cfg: &Config) -> Result<token::Mint, Error> {
    if !valid_word(&r.audience, limits::MAX_AUDIENCE_LEN) {
        return Err(Error::InvalidArgument(format!(
            "audience must be 1..={} printable characters without spaces",
            limits::MAX_AUDIENCE_LEN
        )));
    }
    if r.scopes.len() > limits::MAX_SCOPES || !r.scopes.iter().all(|s| valid_scope(s)) {
        return Err(Error::InvalidArgument(format!(
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
        return Err(Error::InvalidArgument(format!(
            "requested ttl {ttl_secs}s exceeds this cache's maximum of {}s",
            cfg.token_max_ttl_secs
        )));
    }
    Ok(token::Mint {
        claims: claims(r.claims.as_ref()),
        audience: r.audience,
        scopes: r.scopes,
        ttl_secs,
    })
}

fn decode_exchange(r: pb::ExchangeTokenRequest, cfg: &Config) -> Result<token::Exchange, Error> {
    if r.subject_token.is_empty() || r.subject_token.len() > MAX_TOKEN_LEN {
        return Err(Error::InvalidArgument(format!(
            "subject_token must be a JWT of at most {MAX_TOKEN_LEN} bytes"
        )));
    }
    if !valid_actor(&r.actor) {
        return Err(Error::InvalidArgument(format!(
            "actor must be 1..={MAX_ACTOR_LEN} characters of A-Z a-z 0-9 . _ -"
        )));
    }
    if r.scopes.is_empty()
        || r.scopes.len() > limits::MAX_SCOPES
        || !r.scopes.iter().all(|s| valid_scope(s))
    {
        return Err(Error::InvalidArgument(format!(
            "1..={} scopes of 1..={} printable characters without spaces (a delegated token needs at least one)",
            limits::MAX_SCOPES,
            limits::MAX_SCOPE_LEN
        )));
    }
    if r.ttl_secs > cfg.token_max_ttl_secs {
        return Err(Error::InvalidArgument(format!(
            "requested ttl {}s exceeds this cache's maximum of {}s",
            r.ttl_secs, cfg.token_max_ttl_secs
        )));
    }
    Ok(token::Exchange {
        claims: claims(r.claims.as_ref()),
        subject_token: r.subject_token,
        actor: r.actor,
        scopes: r.scopes,
        ttl_secs: r.ttl_secs,
    })
}

fn decode_lease(r: pb::LeaseSecretRequest, cfg: &Config) -> Result<lease::LeaseRequest, Error> {
    lattice_shared::id::check_secret_name(&r.name).map_err(Error::InvalidArgument)?;
    let ttl_secs = if r.ttl_secs == 0 {
        cfg.lease_default_ttl_secs
    } else {
        r.ttl_secs
    };
    if ttl_secs > cfg.lease_max_ttl_secs {
        return Err(Error::InvalidArgument(format!(
            "requested lease ttl {ttl_secs}s exceeds this cache's maximum of {}s",
            cfg.lease_max_ttl_secs
        )));
    }
    Ok(lease::LeaseRequest {
        claims: claims(r.claims.as_ref()),
        name: r.name,
        version: r.version,
        ttl_secs,
    })
}

fn decode_reported(r: pb::ReportAuditRequest) -> Result<Vec<report::Reported>, Error> {
    if r.events.len() > MAX_REPORTED_EVENTS {
        return Err(Error::InvalidArgument(format!(
            "at most {MAX_REPORTED_EVENTS} events per report"
        )));
    }
    let bounded = |name: &str, v: &str, max: usize| -> Result<(), Error> {
        if v.len() > max || v.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(format!(
                "{name} must be at most {max} printable bytes"
            )));
        }
        Ok(())
    };
    for e in &r.events {
        if !matches!(e.kind.as_str(), "proxy_use" | "proxy_refused") {
            return Err(Error::InvalidArgument(format!(
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
    Ok(r.events
        .into_iter()
        .map(|e| report::Reported {
            kind: e.kind,
            resource: e.resource,
            detail: e.detail,
            fingerprint: e.fingerprint,
            local_caller: e.local_caller,
            request_id: e.request_id,
            at_unix_ms: e.at_unix_ms,
        })
        .collect())
}

#[tonic::async_trait]
impl Cache for Service {
    async fn enrol(
        &self,
        req: Request<pb::EnrolAgentRequest>,
    ) -> Result<Response<pb::EnrolAgentResponse>, Status> {
        let source = peer_addr(&req);
        let request_id = request_id(&req)?;
        let input = decode_enrol(req.into_inner())?;
        let (agent, c) = enrol::enrol(&self.state, source, request_id, input).await?;
        Ok(Response::new(pb::EnrolAgentResponse {
            agent_id: agent.to_string(),
            chain: Some(chain(c)),
        }))
    }

    async fn issue_certificate(
        &self,
        req: Request<pb::IssueCertificateRequest>,
    ) -> Result<Response<pb::IssueCertificateResponse>, Status> {
        let call = AgentCall::authenticate(
            &self.state,
            &req,
            AgentAction::IssueCertificate.name(),
            None,
        )?;
        let r = req.into_inner();
        let c = enrol::issue_certificate(call, &r.csr, &claims(r.claims.as_ref()))?;
        Ok(Response::new(pb::IssueCertificateResponse {
            chain: Some(chain(c)),
        }))
    }

    async fn mint_token(
        &self,
        req: Request<pb::MintTokenRequest>,
    ) -> Result<Response<pb::MintTokenResponse>, Status> {
        let call = AgentCall::authenticate(
            &self.state,
            &req,
            AgentAction::MintToken.name(),
            Some(&token::MINT),
        )?;
        let request_id = call.request_id.clone();
        let input = decode_mint(req.into_inner(), &self.state.cfg)?;
        let t = token::mint(call, input)?;
        self.state.audited(t.audit).await?;
        Ok(with_request_id(
            pb::MintTokenResponse {
                token: t.token,
                jti: t.jti,
                expires_at_unix: t.expires_at_unix,
                kid: t.kid,
                policy_version: t.policy_version,
            },
            &request_id,
        ))
    }

    async fn lease_secret(
        &self,
        req: Request<pb::LeaseSecretRequest>,
    ) -> Result<Response<pb::LeaseSecretResponse>, Status> {
        let call = AgentCall::authenticate(
            &self.state,
            &req,
            AgentAction::LeaseSecret.name(),
            Some(&lease::LEASE),
        )?;
        let request_id = call.request_id.clone();
        let input = decode_lease(req.into_inner(), &self.state.cfg)?;
        let l = lease::lease(call, input)?;
        self.state.audited(l.audit).await?;
        // The response buffer is tonic's from here; our copy is zeroized.
        Ok(with_request_id(
            pb::LeaseSecretResponse {
                value: l.value.to_vec(),
                lease_id: l.lease_id,
                version: l.version,
                expires_at_unix: l.expires_at_unix,
                policy_version: l.policy_version,
                fingerprint: l.fingerprint,
            },
            &request_id,
        ))
    }

    async fn jwks(
        &self,
        req: Request<pb::JwksRequest>,
    ) -> Result<Response<pb::JwksResponse>, Status> {
        require_unrevoked(&self.state, &req)?;
        Ok(Response::new(pb::JwksResponse {
            jwks_json: self.state.jwks_json().as_str().to_owned(),
        }))
    }

    type WatchRevocationsStream = crate::watch::Notices;

    async fn watch_revocations(
        &self,
        req: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let peer = require_unrevoked(&self.state, &req)?;
        let slot = crate::watch::admit(&self.state, &peer.id)?;
        let after = req.get_ref().after_seq;
        Ok(Response::new(crate::watch::watch(
            self.state.clone(),
            after,
            slot,
        )))
    }

    async fn exchange_token(
        &self,
        req: Request<pb::ExchangeTokenRequest>,
    ) -> Result<Response<pb::ExchangeTokenResponse>, Status> {
        let call = AgentCall::authenticate(
            &self.state,
            &req,
            AgentAction::ExchangeToken.name(),
            Some(&token::EXCHANGE),
        )?;
        let request_id = call.request_id.clone();
        let input = decode_exchange(req.into_inner(), &self.state.cfg)?;
        let t = token::exchange(call, input)?;
        self.state.audited(t.audit).await?;
        Ok(with_request_id(
            pb::ExchangeTokenResponse {
                token: t.token,
                jti: t.jti,
                expires_at_unix: t.expires_at_unix,
                kid: t.kid,
                policy_version: t.policy_version,
                depth: t.depth,
                issued_token_type: "urn:ietf:params:oauth:token-type:jwt".into(),
            },
            &request_id,
        ))
    }

    async fn report_audit(
        &self,
        req: Request<pb::ReportAuditRequest>,
    ) -> Result<Response<pb::ReportAuditResponse>, Status> {
        let peer = require_agent(&self.state, &req)?;
        self.state
            .replica
            .check_cert(&peer.cert, peer.issuer.as_ref())
            .map_err(Error::Denied)?;
        let events = decode_reported(req.into_inner())?;
        let (n, last) = report::report_audit(&self.state, &peer.id, events)?;
        if n > 0 {
            self.state.audited(last).await?;
        }
        Ok(Response::new(pb::ReportAuditResponse {
            accepted: u32::try_from(n).unwrap_or(u32::MAX),
        }))
    }

    async fn report_claims(
        &self,
        req: Request<pb::ReportClaimsRequest>,
    ) -> Result<Response<pb::ReportClaimsResponse>, Status> {
        let call = AgentCall::authenticate(&self.state, &req, "ReportClaims", None)?;
        let claims = claims(Some(&req.into_inner().claims.unwrap_or_default()));
        let (revoked_jtis, policy_version) = report::report_claims(call, claims)?;
        Ok(Response::new(pb::ReportClaimsResponse {
            revoked_jtis,
            policy_version,
        }))
    }

    async fn ping(
        &self,
        req: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        require_unrevoked(&self.state, &req)?;
        let r = req.into_inner();
        if r.payload.len() > limits::MAX_PING_PAYLOAD {
            return Err(Error::InvalidArgument("payload too large".into()).into());
        }
        let serving = ping_serving(&self.state.replica, &self.state.identity().signing_serial);
        Ok(Response::new(pb::PingResponse {
            payload: r.payload,
            serving,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mint(audience: &str) -> pb::MintTokenRequest {
        pb::MintTokenRequest {
            audience: audience.into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_audience_is_accepted_up_to_the_length_its_message_names() {
        let cfg = Config::default();
        let longest = format!("https://{}", "a".repeat(limits::MAX_AUDIENCE_LEN - 8));
        assert!(decode_mint(mint(&longest), &cfg).is_ok());
        let over = format!("{longest}a");
        let Err(Error::InvalidArgument(m)) = decode_mint(mint(&over), &cfg) else {
            panic!("an audience over the limit is refused");
        };
        assert!(m.contains(&limits::MAX_AUDIENCE_LEN.to_string()), "{m}");
        assert!(decode_mint(mint("has space"), &cfg).is_err());
    }
}
