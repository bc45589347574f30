//! Tokens: mint (for the caller, bound to its certificate) and exchange
//! (a narrower token for a sub-agent, delegated from one this cache minted).
//! Both end in the one issuing path, [`issue_token`]: claims → sign →
//! bookkeeping for re-evaluation → audit → latency.

use lattice_shared::clock::unix_secs;
use lattice_shared::policy::AgentAction;
use lattice_shared::token::{Actor, Claims, Confirmation, TokenVerifier};

use crate::call::{AgentCall, AgentClaims, Decision, Outcomes, random_id};
use crate::issued::IssuedToken;
use crate::outbox::Ticket;
use crate::{AuditEvent, Error, Refused};

/// Longest `act` chain, whatever the policy says.
pub(crate) const MAX_DELEGATION_DEPTH: usize = 8;

pub(crate) static MINT: Outcomes = Outcomes {
    counter: "lattice_cache_mint_total",
    success: "issued",
    histogram: "lattice_cache_mint_seconds",
    unserved: false,
};
pub(crate) static EXCHANGE: Outcomes = Outcomes {
    counter: "lattice_cache_exchange_total",
    success: "issued",
    histogram: "lattice_cache_exchange_seconds",
    unserved: false,
};

/// A mint request, decoded and within this cache's limits.
#[derive(Debug)]
pub(crate) struct Mint {
    pub audience: String,
    pub scopes: Vec<String>,
    /// The default already applied.
    pub ttl_secs: u64,
    pub claims: AgentClaims,
}

/// A token-exchange request, decoded and within this cache's limits.
#[derive(Debug)]
pub(crate) struct Exchange {
    pub subject_token: String,
    /// The sub-agent's name (`A-Z a-z 0-9 . _ -`).
    pub actor: String,
    /// At least one.
    pub scopes: Vec<String>,
    /// 0: as long as the parent.
    pub ttl_secs: u64,
    pub claims: AgentClaims,
}

/// A token as issued.
#[derive(Debug)]
pub(crate) struct Token {
    pub token: String,
    pub jti: String,
    pub expires_at_unix: i64,
    pub kid: String,
    pub policy_version: u64,
    pub depth: u32,
    /// Its audit record's place: answered once it is durable.
    pub audit: Option<Ticket>,
}

pub(crate) fn mint(call: AgentCall<'_>, r: Mint) -> Result<Token, Error> {
    let call = call.on(&r.audience);
    call.serve()?;
    let policy_version = call.authorize(&Decision {
        action: AgentAction::MintToken,
        resource: &r.audience,
        ttl_secs: r.ttl_secs,
        scopes: &r.scopes,
        claims: &r.claims,
        delegation_depth: 0,
    })?;
    let peer = call.peer()?;
    let state = call.state;
    let now = unix_secs(state.clock.now());
    // A token never outlives the certificate it is bound to.
    let exp = (now + i64::try_from(r.ttl_secs).unwrap_or(0)).min(unix_secs(peer.cert.not_after));
    let jti = random_id()?;
    let claims = Claims {
        iss: state.id.to_string(),
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
    let event = AuditEvent::Issued {
        cache: state.id.clone(),
        agent: call.agent.clone(),
        source: call.source_ip(),
        request_id: call.request_id.clone(),
        jti,
        audience: claims.aud.clone(),
        at_unix_ms: state.clock.now_unix_ms(),
        policy_version,
    };
    issue_token(
        &call,
        Issue {
            claims,
            action: AgentAction::MintToken,
            scopes: r.scopes,
            depth: 0,
            agent_claims: &r.claims,
            policy_version,
            event,
        },
    )
}

pub(crate) fn exchange(mut call: AgentCall<'_>, r: Exchange) -> Result<Token, Error> {
    // The resource is the parent's audience, known once it verifies.
    call.serve()?;
    let state = call.state;
    let peer = call.peer()?;
    // The parent must be a valid lattice token issued to the caller.
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(&state.jwks_json()).map_err(|_| Error::Internal("JWKS unreadable"))?;
    let parent = TokenVerifier::new(jwks, state.bundle.clone(), state.clock.clone())
        .verify_any_audience(&r.subject_token)
        .map_err(|e| call.refuse(Refused::InvalidParent(e.to_string())))?;
    call.resource = parent.aud.clone();
    if parent.sub != peer.id.as_str() {
        return Err(call.refuse(Refused::NotHolder {
            holder: parent.sub.clone(),
            caller: peer.id.to_string(),
        }));
    }
    if parent.iss != state.id.as_str() {
        // A child carries only its own issuer: delegating another cache's
        // token would let the child outlive that cache's revocation. The
        // agent asks its current cache for a new parent.
        return Err(call.refuse(Refused::ForeignParent {
            issuer: parent.iss.clone(),
            cache: state.id.to_string(),
        }));
    }
    // Confined like every token a verifier accepts: this cache speaks only
    // for agents of its region (and the parent's actors with it).
    lattice_shared::token::check_confinement(&parent, &state.id)
        .map_err(|e| call.refuse(Refused::InvalidParent(e.to_string())))?;
    if let Err(m) = state.replica.check_token(&parent) {
        return Err(call.refuse(Refused::ParentRevoked(m.to_string())));
    }
    let allowed = parent.scopes();
    if let Some(wider) = r.scopes.iter().find(|s| !allowed.contains(&s.as_str())) {
        return Err(call.refuse(Refused::Wider {
            scope: wider.clone(),
            parent: parent.scope.clone(),
        }));
    }
    let depth = parent.delegation_depth() + 1;
    if depth > MAX_DELEGATION_DEPTH {
        return Err(call.refuse(Refused::TooDeep));
    }
    let depth = u32::try_from(depth).unwrap_or(u32::MAX);
    let now = unix_secs(state.clock.now());
    let exp = if r.ttl_secs == 0 {
        parent.exp
    } else {
        (now + i64::try_from(r.ttl_secs).unwrap_or(i64::MAX)).min(parent.exp)
    };
    let policy_version = call.authorize(&Decision {
        action: AgentAction::ExchangeToken,
        resource: &parent.aud,
        ttl_secs: u64::try_from(exp - now).unwrap_or(0),
        scopes: &r.scopes,
        claims: &r.claims,
        delegation_depth: depth,
    })?;
    let jti = random_id()?;
    let mut parent_jtis = parent.parent_jtis.clone();
    parent_jtis.push(parent.jti.clone());
    let actor = format!("{}/{}", peer.id, r.actor);
    let claims = Claims {
        iss: state.id.to_string(),
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
    let event = AuditEvent::Delegated {
        cache: state.id.clone(),
        agent: peer.id.clone(),
        source: call.source_ip(),
        request_id: call.request_id.clone(),
        jti,
        parent_jti: parent.jti.clone(),
        actor,
        audience: claims.aud.clone(),
        depth,
        at_unix_ms: state.clock.now_unix_ms(),
        policy_version,
    };
    issue_token(
        &call,
        Issue {
            claims,
            action: AgentAction::ExchangeToken,
            scopes: r.scopes,
            depth,
            agent_claims: &r.claims,
            policy_version,
            event,
        },
    )
}

/// What [`issue_token`] signs and records.
struct Issue<'a> {
    claims: Claims,
    action: AgentAction,
    scopes: Vec<String>,
    depth: u32,
    /// The claims the agent asked with (kept for re-evaluation).
    agent_claims: &'a AgentClaims,
    policy_version: u64,
    event: AuditEvent,
}

/// The one issuing path: sign, note the live token (re-decided when the
/// agent's claims change), audit, and time it.
fn issue_token(call: &AgentCall<'_>, i: Issue<'_>) -> Result<Token, Error> {
    let state = call.state;
    let ident = state.identity();
    let token = ident
        .signer
        .sign(&i.claims)
        .map_err(|_| Error::Internal("token signing failed"))?;
    call.count_success();
    state.issued.record(
        &call.agent,
        i.agent_claims,
        IssuedToken {
            jti: i.claims.jti.clone(),
            action: i.action,
            audience: i.claims.aud,
            scopes: i.scopes,
            exp_unix: i.claims.exp,
            depth: i.depth,
        },
    );
    let audit = call.finish(i.event);
    Ok(Token {
        token,
        jti: i.claims.jti,
        expires_at_unix: i.claims.exp,
        kid: ident.signer.kid().to_owned(),
        policy_version: i.policy_version,
        depth: i.depth,
        audit,
    })
}
