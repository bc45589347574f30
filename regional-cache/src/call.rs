//! One agent request in flight ([`AgentCall`]): who asked, from where, for
//! what. It authenticates the caller, asks whether the cache may serve it
//! (freshness, revocations) and what the policy decides — both without side
//! effects — and records each outcome **once**: [`AgentCall::refuse`] counts,
//! logs and audits a refusal, [`AgentCall::finish`] a success.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use lattice_shared::id::{Role, SpiffeId};
use lattice_shared::limits::REQUEST_ID_HEADER;
use lattice_shared::net::{PeerIdentity, authenticated};
use lattice_shared::policy::{AgentAction, AgentRequest, Outcome, hour_and_weekday};
use lattice_shared::posture::{MAX_JOB_TYPE, Posture};
use ring::rand::{SecureRandom, SystemRandom};

use crate::outbox::Ticket;
use crate::{AuditEvent, Error, Refused, State};

/// The caller must be an agent of this cache's region.
pub(crate) fn require_agent<T>(
    state: &State,
    req: &tonic::Request<T>,
) -> Result<Arc<PeerIdentity>, Error> {
    let peer = authenticated(req, &state.clock).map_err(|s| Error::Peer(Box::new(s)))?;
    if peer.id.role() != Role::Agent {
        return Err(Error::Denied(format!("{} is not an agent", peer.id)));
    }
    if peer.id.region() != Some(&state.region) {
        metrics::counter!("lattice_cache_refusals_total", "reason" => "wrong_region").increment(1);
        return Err(Error::Denied(format!(
            "{} belongs to another region; this cache serves region {}",
            peer.id, state.region
        )));
    }
    Ok(peer)
}

/// Any verified caller that is not revoked (a connection made before a
/// revocation must not outlive it).
pub(crate) fn require_unrevoked<T>(
    state: &State,
    req: &tonic::Request<T>,
) -> Result<Arc<PeerIdentity>, Error> {
    let peer = authenticated(req, &state.clock).map_err(|s| Error::Peer(Box::new(s)))?;
    state
        .replica
        .check_cert(&peer.cert, peer.issuer.as_ref())
        .map_err(Error::Denied)?;
    Ok(peer)
}

/// The caller's `x-lattice-request-id` when it is a sane id, else a new
/// one: it ties the audit record to the caller's own logs.
pub(crate) fn request_id<T>(req: &tonic::Request<T>) -> Result<String, Error> {
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
    random_id()
}

/// 128 random bits, URL-safe base64 (request ids, jtis, lease ids).
pub(crate) fn random_id() -> Result<String, Error> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Error::Internal("random number generator failed"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// What an agent says about itself (posture, job type), decoded at the
/// edge. A malformed claim is kept as the refusal it causes when a decision
/// needs it, so that the order of checks stays what callers see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AgentClaims {
    /// `None`: no posture sent.
    posture: Option<Result<Posture, String>>,
    job_type: String,
}

impl AgentClaims {
    /// `posture`: `None` when none was sent, else as decoded.
    pub(crate) fn new(posture: Option<Result<Posture, String>>, job_type: String) -> Self {
        Self { posture, job_type }
    }

    /// The posture and job type a decision sees.
    fn context(&self) -> Result<(Posture, String), Error> {
        let posture = self
            .posture
            .clone()
            .transpose()
            .map_err(Error::InvalidArgument)?
            .unwrap_or_default();
        if self.job_type.len() > MAX_JOB_TYPE || self.job_type.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(format!(
                "claims.job_type must be at most {MAX_JOB_TYPE} printable bytes"
            )));
        }
        Ok((posture, self.job_type.clone()))
    }
}

/// What the policy is asked about, besides who asks and from where.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decision<'a> {
    pub action: AgentAction,
    pub resource: &'a str,
    pub ttl_secs: u64,
    pub scopes: &'a [String],
    pub claims: &'a AgentClaims,
    pub delegation_depth: u32,
}

/// An operation's own counter (`outcome` label) and latency histogram.
#[derive(Debug)]
pub(crate) struct Outcomes {
    pub counter: &'static str,
    /// The `outcome` of a success.
    pub success: &'static str,
    pub histogram: &'static str,
    /// Whether stale and revoked callers count (as `unavailable`).
    pub unserved: bool,
}

/// One agent request: see the module doc.
#[derive(Debug)]
pub(crate) struct AgentCall<'a> {
    pub state: &'a State,
    /// Who the request is about: the caller, or (enrolment) the id it asks for.
    pub agent: SpiffeId,
    /// The authenticated caller (`None` while enrolling).
    pub peer: Option<Arc<PeerIdentity>>,
    pub source: Option<SocketAddr>,
    pub request_id: String,
    /// What was asked (`MintToken`, `LeaseSecret`, …) and of what (an
    /// audience, a secret name, a region).
    pub action: &'static str,
    pub resource: String,
    outcomes: Option<&'static Outcomes>,
    started: Instant,
}

impl<'a> AgentCall<'a> {
    /// An authenticated agent's request (see [`require_agent`]).
    pub(crate) fn authenticate<T>(
        state: &'a State,
        req: &tonic::Request<T>,
        action: &'static str,
        outcomes: Option<&'static Outcomes>,
    ) -> Result<Self, Error> {
        let started = Instant::now();
        let peer = require_agent(state, req)?;
        Ok(Self {
            state,
            agent: peer.id.clone(),
            peer: Some(peer),
            source: lattice_shared::net::peer_addr(req),
            request_id: request_id(req)?,
            action,
            resource: String::new(),
            outcomes,
            started,
        })
    }

    /// An enrolment: the caller proves nothing yet but its join token.
    pub(crate) fn enrolling(
        state: &'a State,
        agent: SpiffeId,
        source: Option<SocketAddr>,
        request_id: String,
    ) -> Self {
        Self {
            state,
            agent,
            peer: None,
            source,
            request_id,
            action: AgentAction::Enrol.name(),
            resource: state.region.to_string(),
            outcomes: None,
            started: Instant::now(),
        }
    }

    pub(crate) fn on(mut self, resource: &str) -> Self {
        self.resource = resource.to_owned();
        self
    }

    /// The caller's certificate (an authenticated call).
    pub(crate) fn peer(&self) -> Result<Arc<PeerIdentity>, Error> {
        self.peer
            .clone()
            .ok_or(Error::Internal("the caller is not authenticated"))
    }

    /// The caller's address as recorded ("" if unknown).
    pub(crate) fn source_ip(&self) -> String {
        self.source.map(|a| a.ip().to_string()).unwrap_or_default()
    }

    /// May this cache serve the caller now: fresh, neither it nor the
    /// caller revoked, and its audit outbox taking records? No side effects.
    pub(crate) fn can_serve(&self) -> Result<(), Refused> {
        let peer = self
            .peer
            .as_deref()
            .ok_or_else(|| Refused::Revoked("the caller is not authenticated".into()))?;
        let ident = self.state.identity();
        self.state
            .replica
            .can_serve_to(&peer.cert, peer.issuer.as_ref(), &ident.signing_serial)?;
        self.state
            .outbox
            .accepting()
            .map_err(Refused::AuditUnavailable)
    }

    /// [`Self::can_serve`], a refusal recorded.
    pub(crate) fn serve(&self) -> Result<(), Error> {
        self.can_serve().map_err(|r| self.refuse(r))
    }

    /// The policy's decision for this caller, without recording it.
    pub(crate) fn decide(&self, d: &Decision<'_>) -> Result<Outcome, Error> {
        let (posture, job_type) = d.claims.context()?;
        let (hour_utc, weekday) = hour_and_weekday(self.state.clock.now());
        Ok(self.state.policy.authorize(&AgentRequest {
            principal: self.agent.clone(),
            action: d.action,
            resource: d.resource.to_string(),
            region: self.state.region.to_string(),
            source_ip: self
                .source
                .map(|a| a.ip())
                .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])),
            ttl_secs: d.ttl_secs,
            // A set: one cache key for every order and repetition.
            scopes: {
                let mut s = d.scopes.to_vec();
                s.sort_unstable();
                s.dedup();
                s
            },
            posture,
            job_type,
            hour_utc,
            weekday,
            delegation_depth: d.delegation_depth,
        }))
    }

    /// Asks the policy in force; returns the deciding version, or records
    /// the refusal naming the policies that determined it.
    pub(crate) fn authorize(&self, d: &Decision<'_>) -> Result<u64, Error> {
        let outcome = self.decide(d).inspect_err(|_| self.count("denied"))?;
        if outcome.allowed {
            return Ok(outcome.version);
        }
        Err(self.refuse(Refused::Policy {
            reason: outcome.denial(),
            version: outcome.version,
        }))
    }

    /// The one place a refusal is recorded: the refusal counter, the
    /// operation's outcome counter, the log line and the audit record, each
    /// as far as the refusal is counted there.
    pub(crate) fn refuse(&self, r: Refused) -> Error {
        if let Some(reason) = r.counted_as() {
            metrics::counter!("lattice_cache_refusals_total", "reason" => reason, "cache" => self.state.id.to_string())
                .increment(1);
        }
        if let Some(label) = r.outcome() {
            let unserved = matches!(r, Refused::Stale { .. } | Refused::Revoked(_));
            if !unserved || self.outcomes.is_some_and(|o| o.unserved) {
                self.count(label);
            }
        }
        let version = match &r {
            Refused::Policy { reason, version } => {
                tracing::info!(agent_id = %self.agent, action = self.action, resource = %self.resource, policy_version = version, %reason, "denied by policy");
                *version
            }
            _ => self.state.policy.version(),
        };
        if let Some(reason) = r.audit_reason() {
            // A refusal hands nothing out: its answer does not wait.
            let _ = self.state.audit(self.refusal_record(reason, version));
        }
        Error::Refused(r)
    }

    /// A refusal's audit record.
    pub(crate) fn refusal_record(&self, reason: String, policy_version: u64) -> AuditEvent {
        AuditEvent::Refused {
            cache: self.state.id.clone(),
            agent: self.agent.clone(),
            source: self.source_ip(),
            request_id: self.request_id.clone(),
            action: self.action.to_owned(),
            resource: self.resource.clone(),
            reason,
            at_unix_ms: self.state.clock.now_unix_ms(),
            policy_version,
        }
    }

    /// The one place a success is recorded: the audit record, then the
    /// operation's latency. The answer waits on the ticket
    /// ([`crate::State::audited`]).
    pub(crate) fn finish(&self, event: AuditEvent) -> Option<Ticket> {
        let ticket = self.state.audit(event);
        if let Some(o) = self.outcomes {
            metrics::histogram!(o.histogram).record(self.started.elapsed().as_secs_f64());
        }
        ticket
    }

    /// Counts a success in the operation's counter (before its bookkeeping).
    pub(crate) fn count_success(&self) {
        if let Some(o) = self.outcomes {
            self.count(o.success);
        }
    }

    fn count(&self, label: &'static str) {
        if let Some(o) = self.outcomes {
            metrics::counter!(o.counter, "outcome" => label).increment(1);
        }
    }
}
