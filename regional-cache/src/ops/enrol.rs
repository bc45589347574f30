//! Agent certificates: enrolment with a one-time join token (redeemed at
//! the control plane) and renewal by an enrolled agent. Both are a policy
//! decision (`Enrol`, `IssueCertificate` on the region) before the leaf is
//! signed by this cache's intermediate CA.

use std::net::SocketAddr;
use std::time::Duration;

use lattice_shared::clock::unix_secs;
use lattice_shared::id::{Role, SpiffeId};
use lattice_shared::pki::{MAX_DER_LEN, Profile, inspect, sha256};
use lattice_shared::policy::AgentAction;

use crate::call::{AgentCall, AgentClaims, Decision};
use crate::{Error, Refused, State};

/// An agent's certificate chain as issued.
#[derive(Debug)]
pub(crate) struct Chain {
    pub leaf: Vec<u8>,
    pub intermediate: Vec<u8>,
    pub root: Vec<u8>,
    pub not_after_unix: i64,
}

/// An enrolment request, decoded.
#[derive(Debug)]
pub(crate) struct Enrol {
    pub join_token: String,
    pub csr: Vec<u8>,
    /// The id asked for (`None`: the one the token is bound to).
    pub requested_id: Option<SpiffeId>,
    pub claims: AgentClaims,
}

fn decision<'a>(state: &'a State, action: AgentAction, claims: &'a AgentClaims) -> Decision<'a> {
    Decision {
        action,
        resource: state.region.as_str(),
        ttl_secs: state.cfg.agent_cert_ttl_secs,
        scopes: &[],
        claims,
        delegation_depth: 0,
    }
}

/// Enrols an agent: policy first (so that a denial does not burn the
/// one-time token), then the token is redeemed at the control plane, then
/// the policy again for the id it is bound to. Returns the agent's id.
pub(crate) async fn enrol(
    state: &State,
    source: Option<SocketAddr>,
    request_id: String,
    r: Enrol,
) -> Result<(SpiffeId, Chain), Error> {
    let call =
        |agent: &SpiffeId| AgentCall::enrolling(state, agent.clone(), source, request_id.clone());
    let d = decision(state, AgentAction::Enrol, &r.claims);
    if let Some(want) = &r.requested_id {
        if want.region() != Some(&state.region) || want.role() != Role::Agent {
            return Err(Error::Denied(format!(
                "{want} cannot enrol here: this cache enrols agents of region {}",
                state.region
            )));
        }
        // The caller is not authenticated yet: the reason stays in our logs
        // and audit trail.
        call(want).authorize(&d).map_err(|e| match e {
            Error::Refused(Refused::Policy { version, .. }) if version != 0 => {
                Error::Denied("enrolment denied by policy; the join token was not used".into())
            }
            e => e,
        })?;
    }
    // A stale cache enrols no one (and burns no token): it cannot know that
    // neither the token nor the agent has been revoked. Nor does it issue
    // a certificate whose audit record it could not keep.
    let serial = state.identity().signing_serial.clone();
    state.replica.can_serve(&serial)?;
    state
        .outbox
        .accepting()
        .map_err(Refused::AuditUnavailable)?;
    // A malformed request must not burn the one-time token.
    lattice_shared::pki::check_csr(&r.csr)?;
    let token_hash = sha256(r.join_token.as_bytes());
    if state.replica.is_join_token_revoked(&token_hash) {
        return Err(Error::Denied("join token has been revoked".into()));
    }
    let requested = r
        .requested_id
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let agent = state.redeem_join_token(token_hash, &requested).await?;
    if state.replica.is_agent_revoked(&agent) {
        return Err(Error::Denied(format!("{agent} has been revoked")));
    }
    // Again for the id the token is bound to, under the release in force
    // now (a cached decision when nothing changed).
    let version = call(&agent).authorize(&d)?;
    let chain = issue_agent_cert(state, &agent, &r.csr)?;
    tracing::info!(agent_id = %agent, policy_version = version, "agent enrolled");
    Ok((agent, chain))
}

/// Renews an enrolled agent's certificate.
pub(crate) fn issue_certificate(
    call: AgentCall<'_>,
    csr: &[u8],
    claims: &AgentClaims,
) -> Result<Chain, Error> {
    let state = call.state;
    let call = call.on(state.region.as_str());
    call.serve()?;
    let version = call.authorize(&decision(call.state, AgentAction::IssueCertificate, claims))?;
    let chain = issue_agent_cert(call.state, &call.agent, csr)?;
    tracing::debug!(agent_id = %call.agent, policy_version = version, "agent certificate renewed");
    Ok(chain)
}

fn issue_agent_cert(state: &State, agent: &SpiffeId, csr: &[u8]) -> Result<Chain, Error> {
    if csr.is_empty() || csr.len() > MAX_DER_LEN {
        return Err(Error::InvalidArgument(format!(
            "csr must be 1..={MAX_DER_LEN} bytes"
        )));
    }
    let ident = state.identity();
    let leaf = ident.ca.issue(
        csr,
        agent,
        Profile::TlsClient,
        state.clock.now(),
        Duration::from_secs(state.cfg.agent_cert_ttl_secs),
    )?;
    let not_after_unix = inspect(&leaf).map(|i| unix_secs(i.not_after)).unwrap_or(0);
    metrics::counter!("lattice_cache_certificates_issued_total").increment(1);
    Ok(Chain {
        leaf,
        intermediate: ident.ca.cert_der().to_vec(),
        root: state.bundle.root_der().to_vec(),
        not_after_unix,
    })
}
