//! Secret leases: a policy decision (`LeaseSecret` on the name), then the
//! version held here (active, or previous within its grace window) is opened
//! with this cache's HPKE key and handed out for at most its lease TTL.

use lattice_shared::clock::unix_secs;
use lattice_shared::policy::AgentAction;
use zeroize::Zeroizing;

use crate::call::{AgentCall, AgentClaims, Decision, Outcomes, random_id};
use crate::outbox::Ticket;
use crate::secrets::Lookup;
use crate::{AuditEvent, Error, Refused};

pub(crate) static LEASE: Outcomes = Outcomes {
    counter: "lattice_cache_lease_total",
    success: "leased",
    histogram: "lattice_cache_lease_seconds",
    unserved: true,
};

/// A lease request, decoded and within this cache's limits.
#[derive(Debug)]
pub(crate) struct LeaseRequest {
    /// A valid secret name.
    pub name: String,
    /// 0: the active version.
    pub version: u64,
    /// The default already applied.
    pub ttl_secs: u64,
    pub claims: AgentClaims,
}

/// A secret as leased. The value is zeroized when dropped.
#[derive(Debug)]
pub(crate) struct Lease {
    pub value: Zeroizing<Vec<u8>>,
    pub lease_id: String,
    pub version: u64,
    pub expires_at_unix: i64,
    pub policy_version: u64,
    pub fingerprint: String,
    /// Its audit record's place: answered once it is durable.
    pub audit: Option<Ticket>,
}

pub(crate) fn lease(call: AgentCall<'_>, r: LeaseRequest) -> Result<Lease, Error> {
    let call = call.on(&r.name);
    call.serve()?;
    let policy_version = call.authorize(&Decision {
        action: AgentAction::LeaseSecret,
        resource: &r.name,
        ttl_secs: r.ttl_secs,
        scopes: &[],
        claims: &r.claims,
        delegation_depth: 0,
    })?;
    let state = call.state;
    let now = unix_secs(state.clock.now());
    if r.version != 0 && state.replica.is_secret_version_revoked(&r.name, r.version) {
        return Err(call.refuse(Refused::SecretRevoked(format!(
            "secret {} version {} has been revoked",
            r.name, r.version
        ))));
    }
    let (found, sealed) = state.replica.secrets.lookup(&r.name, r.version, now);
    let what = |v: u64| {
        if v == 0 {
            format!("secret {}", r.name)
        } else {
            format!("secret {} version {v}", r.name)
        }
    };
    let (version, grace_until, sealed) = match (found, sealed) {
        (Lookup::Found(v, until), Some(s)) => (v, until, s),
        (Lookup::GraceOver(v), _) => return Err(call.refuse(Refused::GraceOver(what(v)))),
        (Lookup::Retired(v), _) => return Err(call.refuse(Refused::Retired(what(v)))),
        _ => {
            return Err(call.refuse(Refused::Unknown {
                what: what(r.version),
                region: state.region.to_string(),
            }));
        }
    };
    if state.replica.is_secret_version_revoked(&r.name, version) {
        return Err(call.refuse(Refused::SecretRevoked(format!(
            "{} has been revoked",
            what(version)
        ))));
    }
    let me = state.id.to_string();
    let value = crate::secrets::open(&state.hpke, &me, &r.name, version, &sealed, now).map_err(
        |e| {
            tracing::error!(secret = %r.name, version, error = %e, "a stored envelope does not open");
            call.refuse(Refused::Unopenable(what(version)))
        },
    )?;
    let mut exp = now + i64::try_from(r.ttl_secs).unwrap_or(0);
    if let Some(until) = grace_until {
        exp = exp.min(until);
    }
    let lease_id = random_id()?;
    call.count_success();
    tracing::info!(agent_id = %call.agent, secret = %r.name, version, lease_id = %lease_id, fingerprint = %sealed.fingerprint, policy_version, "secret leased");
    let audit = call.finish(AuditEvent::Leased {
        cache: state.id.clone(),
        agent: call.agent.clone(),
        source: call.source_ip(),
        request_id: call.request_id.clone(),
        secret: r.name.clone(),
        version,
        lease_id: lease_id.clone(),
        fingerprint: sealed.fingerprint.clone(),
        expires_at_unix: exp,
        at_unix_ms: state.clock.now_unix_ms(),
        policy_version,
    });
    Ok(Lease {
        value,
        lease_id,
        version,
        expires_at_unix: exp,
        policy_version,
        fingerprint: sealed.fingerprint.clone(),
        audit,
    })
}
