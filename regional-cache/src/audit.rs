//! The audit trail as the cache writes it: what happened ([`AuditEvent`],
//! never a token or a secret value), the record forwarded to the control
//! plane ([`AuditEvent::to_record`]) and the optional in-process sink.

use lattice_shared::id::SpiffeId;

use crate::outbox::Ticket;
use crate::{AuditMode, Error, Refused};

/// What the cache did, for the audit trail. Never carries a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditEvent {
    Issued {
        cache: SpiffeId,
        agent: SpiffeId,
        /// The caller's address as the cache saw it ("" if unknown).
        source: String,
        /// The request's id (the caller's `x-lattice-request-id`, or one
        /// the cache made), also returned in the response's metadata.
        request_id: String,
        jti: String,
        audience: String,
        at_unix_ms: i64,
        /// The policy release that allowed it.
        policy_version: u64,
    },
    /// A secret served: the keyed fingerprint names the value, never shows it.
    Leased {
        cache: SpiffeId,
        agent: SpiffeId,
        /// The caller's address as the cache saw it ("" if unknown).
        source: String,
        /// The request's id (the caller's `x-lattice-request-id`, or one
        /// the cache made), also returned in the response's metadata.
        request_id: String,
        secret: String,
        version: u64,
        lease_id: String,
        fingerprint: String,
        expires_at_unix: i64,
        at_unix_ms: i64,
        policy_version: u64,
    },
    Refused {
        cache: SpiffeId,
        agent: SpiffeId,
        /// The caller's address as the cache saw it ("" if unknown).
        source: String,
        /// The request's id (as for `Issued`).
        request_id: String,
        /// What was asked (`MintToken`, `LeaseSecret`, …) and of what (an
        /// audience, a secret name, a region).
        action: String,
        resource: String,
        reason: String,
        at_unix_ms: i64,
        /// The policy release in force (that denied it, for a policy denial).
        policy_version: u64,
    },
    /// A token delegated to a sub-agent by token exchange.
    Delegated {
        cache: SpiffeId,
        agent: SpiffeId,
        /// The caller's address as the cache saw it ("" if unknown).
        source: String,
        /// The request's id (the caller's `x-lattice-request-id`, or one
        /// the cache made), also returned in the response's metadata.
        request_id: String,
        jti: String,
        parent_jti: String,
        actor: String,
        audience: String,
        depth: u32,
        at_unix_ms: i64,
        policy_version: u64,
    },
    /// An event the agent recorded itself (its proxy's use of a key), as
    /// reported by the authenticated agent.
    Reported {
        cache: SpiffeId,
        agent: SpiffeId,
        kind: String,
        resource: String,
        detail: String,
        fingerprint: String,
        local_caller: String,
        request_id: String,
        /// As the agent says.
        at_unix_ms: i64,
        /// When the cache received it.
        received_at_unix_ms: i64,
    },
}

impl AuditEvent {
    /// The record forwarded to the control plane's audit log (JSON; never
    /// a token or a secret value). The control plane adds which cache sent it.
    pub fn to_record(&self, region: &str) -> Vec<u8> {
        /// One per minted token: written straight from borrowed fields
        /// rather than through a JSON tree (a third of the record's cost).
        #[derive(serde::Serialize)]
        struct IssuedRecord<'a> {
            kind: &'static str,
            agent: &'a str,
            jti: &'a str,
            source: &'a str,
            request_id: &'a str,
            audience: &'a str,
            at_unix_ms: i64,
            policy_version: u64,
            region: &'a str,
            decision: &'static str,
        }
        let v = match self {
            AuditEvent::Issued {
                agent,
                source,
                request_id,
                jti,
                audience,
                at_unix_ms,
                policy_version,
                ..
            } => {
                return serde_json::to_vec(&IssuedRecord {
                    kind: "issued",
                    agent: agent.as_str(),
                    jti,
                    source,
                    request_id,
                    audience,
                    at_unix_ms: *at_unix_ms,
                    policy_version: *policy_version,
                    region,
                    decision: "allow",
                })
                // Strings and numbers only: serializing cannot fail.
                .unwrap_or_default();
            }
            AuditEvent::Leased {
                agent,
                source,
                request_id,
                secret,
                version,
                lease_id,
                fingerprint,
                expires_at_unix,
                at_unix_ms,
                policy_version,
                ..
            } => serde_json::json!({
                "kind": "leased", "agent": agent.as_str(), "secret": secret, "source": source, "request_id": request_id,
                "version": version, "lease_id": lease_id, "fingerprint": fingerprint,
                "expires_at_unix": expires_at_unix, "at_unix_ms": at_unix_ms,
                "policy_version": policy_version, "region": region,
                "decision": "allow",
            }),
            AuditEvent::Refused {
                agent,
                source,
                request_id,
                action,
                resource,
                reason,
                at_unix_ms,
                policy_version,
                ..
            } => serde_json::json!({
                "kind": "refused", "agent": agent.as_str(), "reason": reason,
                "source": source, "request_id": request_id,
                "action": action, "resource": resource,
                "at_unix_ms": at_unix_ms, "policy_version": policy_version,
                "region": region, "decision": "deny",
            }),
            AuditEvent::Delegated {
                agent,
                source,
                request_id,
                jti,
                parent_jti,
                actor,
                audience,
                depth,
                at_unix_ms,
                policy_version,
                ..
            } => serde_json::json!({
                "kind": "delegated", "agent": agent.as_str(), "jti": jti, "source": source, "request_id": request_id,
                "parent_jti": parent_jti, "actor": actor, "audience": audience,
                "depth": depth, "at_unix_ms": at_unix_ms,
                "policy_version": policy_version, "region": region,
                "decision": "allow",
            }),
            AuditEvent::Reported {
                agent,
                kind,
                resource,
                detail,
                fingerprint,
                local_caller,
                request_id,
                at_unix_ms,
                received_at_unix_ms,
                ..
            } => serde_json::json!({
                "kind": kind, "agent": agent.as_str(), "resource": resource,
                "detail": detail, "fingerprint": fingerprint,
                "local_caller": local_caller, "request_id": request_id,
                "reported_at_unix_ms": at_unix_ms,
                "at_unix_ms": received_at_unix_ms, "region": region,
                "decision": if kind == "proxy_refused" { "deny" } else { "allow" },
                "reported_by": "agent",
            }),
        };
        v.to_string().into_bytes()
    }
}

/// Longest an answer waits for its audit record to be durable before the
/// cache refuses it (`UNAVAILABLE`; the record may still become durable:
/// the log then shows an issuance the caller never received).
const DURABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub trait AuditSink: Send + Sync + std::fmt::Debug + 'static {
    fn record(&self, event: AuditEvent);
}

impl crate::State {
    /// Into the outbox (on its way to the control plane) and the sink.
    /// `None`: the outbox dropped it (counted and logged there).
    pub(crate) fn audit(&self, e: AuditEvent) -> Option<Ticket> {
        let ticket = self.outbox.record(e.to_record(self.region.as_str()));
        if let Some(sink) = &self.audit {
            sink.record(e);
        }
        ticket
    }

    /// Returns once the record of an issuance is durable, as the audit mode
    /// asks: the answer that hands a credential out waits for it.
    pub(crate) async fn audited(&self, ticket: Option<Ticket>) -> Result<(), Error> {
        if self.cfg.audit_mode == AuditMode::CommitDelay {
            return Ok(());
        }
        let Some(ticket) = ticket else {
            return Err(Error::Refused(Refused::AuditUnavailable(
                "audit unavailable: the audit record could not be queued".into(),
            )));
        };
        self.outbox
            .wait_durable(ticket, DURABLE_WAIT)
            .await
            .map_err(|e| Error::Refused(Refused::AuditUnavailable(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_record_carries_every_field() {
        let e = AuditEvent::Issued {
            cache: SpiffeId::parse("spiffe://t/cache/eu/c1").expect("id"),
            agent: SpiffeId::parse("spiffe://t/agent/eu/a").expect("id"),
            source: "10.0.0.7".into(),
            request_id: "req-\"1\"".into(),
            jti: "j1".into(),
            audience: "https://api.example.com".into(),
            at_unix_ms: 1_700_000_000_123,
            policy_version: 4,
        };
        let v: serde_json::Value = serde_json::from_slice(&e.to_record("eu")).expect("JSON");
        assert_eq!(
            v,
            serde_json::json!({
                "kind": "issued", "agent": "spiffe://t/agent/eu/a", "jti": "j1",
                "source": "10.0.0.7", "request_id": "req-\"1\"",
                "audience": "https://api.example.com", "at_unix_ms": 1_700_000_000_123_i64,
                "policy_version": 4, "region": "eu", "decision": "allow",
            })
        );
    }
}
