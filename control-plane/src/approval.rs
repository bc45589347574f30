//! The two-person rule: an admin request that policy allows only with a
//! second admin's approval is stored here, durably, until another admin
//! approves it (which runs it) or it expires. Taking a request out is a
//! compare-and-swap, so one request runs at most once.

use std::time::Duration;

use lattice_shared::id::SpiffeId;
use lattice_shared::limits;
use lattice_shared::pki::CertInfo;
use lattice_shared::policy::{AdminAction, AdminAttributes, AdminRole};
use lattice_shared::serde_b64 as b64;
use lattice_shared::store::{JsonStore as _, SharedStore};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::Error;

const T_PENDING: &str = "pending";
/// Requests one admin may have waiting at once.
pub const MAX_PENDING_PER_ADMIN: usize = 16;
/// How long a request waits for its approval.
pub const APPROVAL_TTL: Duration = Duration::from_secs(3600);

/// A request waiting for a second admin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pending {
    pub id: String,
    pub action: AdminAction,
    pub requested_by: SpiffeId,
    pub roles: Vec<AdminRole>,
    pub regions: Vec<String>,
    pub target_region: String,
    pub resource: String,
    pub source_ip: std::net::IpAddr,
    /// The encoded request message, run as it was when approved.
    pub payload_b64: String,
    pub created_at_unix: i64,
    pub expires_at_unix: i64,
    pub summary: String,
    /// The policy version in force when it was asked.
    pub policy_version: u64,
    /// The requester's certificate: serial and validity, checked again when
    /// the request is approved.
    pub requester_serial: String,
    pub requester_not_before_unix: i64,
    pub requester_not_after_unix: i64,
}

impl Pending {
    pub fn payload(&self) -> Result<Vec<u8>, Error> {
        b64::decode(&self.payload_b64)
            .map_err(|e| Error::Corrupt(format!("pending request {}: {e}", self.id)))
    }
    pub fn requester_cert(&self) -> CertInfo {
        CertInfo {
            id: Some(self.requested_by.clone()),
            serial_hex: self.requester_serial.clone(),
            not_before: lattice_shared::clock::from_unix_secs(self.requester_not_before_unix),
            not_after: lattice_shared::clock::from_unix_secs(self.requester_not_after_unix),
            is_ca: false,
            sha256: [0; 32],
            eku_client_auth: true,
            eku_server_auth: false,
            org_unit: Some(self.attributes().to_org_unit()),
        }
    }

    pub fn attributes(&self) -> AdminAttributes {
        AdminAttributes {
            roles: self.roles.clone(),
            regions: self.regions.clone(),
        }
    }
}

/// What to store for a new pending request.
pub struct NewPending<'a> {
    pub action: AdminAction,
    pub policy_version: u64,
    pub requester_cert: &'a CertInfo,
    pub requested_by: &'a SpiffeId,
    pub attrs: &'a AdminAttributes,
    pub target_region: &'a str,
    pub resource: &'a str,
    pub source_ip: std::net::IpAddr,
    pub payload: Vec<u8>,
    pub summary: String,
    pub now_unix: i64,
}

pub fn create(store: &SharedStore, new: NewPending<'_>) -> Result<Pending, Error> {
    // Expired requests are dropped here, so the store stays bounded.
    let live = list(store, new.now_unix)?;
    if live.len() >= limits::MAX_PENDING_APPROVALS {
        return Err(Error::FailedPrecondition(format!(
            "{} requests already wait for approval; approve or let some expire first",
            live.len()
        )));
    }
    let own = live
        .iter()
        .filter(|p| &p.requested_by == new.requested_by)
        .count();
    if own >= MAX_PENDING_PER_ADMIN {
        return Err(Error::FailedPrecondition(format!(
            "{} already has {own} requests waiting for approval",
            new.requested_by
        )));
    }
    let mut raw = [0u8; 12];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| Error::Corrupt("rng".into()))?;
    let p = Pending {
        id: hex::encode(raw),
        action: new.action,
        requested_by: new.requested_by.clone(),
        roles: new.attrs.roles.clone(),
        regions: new.attrs.regions.clone(),
        target_region: new.target_region.to_string(),
        resource: new.resource.to_string(),
        source_ip: new.source_ip,
        payload_b64: b64::encode(&new.payload),
        created_at_unix: new.now_unix,
        expires_at_unix: new.now_unix + i64::try_from(APPROVAL_TTL.as_secs()).unwrap_or(3600),
        summary: new.summary,
        policy_version: new.policy_version,
        requester_serial: new.requester_cert.serial_hex.clone(),
        requester_not_before_unix: lattice_shared::clock::unix_secs(new.requester_cert.not_before),
        requester_not_after_unix: lattice_shared::clock::unix_secs(new.requester_cert.not_after),
    };
    store.put_json(T_PENDING, p.id.as_bytes(), &p)?;
    Ok(p)
}

/// Live requests, oldest first; expired ones are deleted on the way.
pub fn list(store: &SharedStore, now_unix: i64) -> Result<Vec<Pending>, Error> {
    let mut out = Vec::new();
    for (k, v) in store.scan_prefix(T_PENDING, b"", limits::MAX_PENDING_APPROVALS * 2)? {
        let p: Pending = serde_json::from_slice(&v).map_err(|e| Error::Corrupt(e.to_string()))?;
        if p.expires_at_unix <= now_unix {
            store.delete(T_PENDING, &k)?;
            continue;
        }
        out.push(p);
    }
    out.sort_by_key(|p| p.created_at_unix);
    Ok(out)
}

pub fn get(store: &SharedStore, id: &str, now_unix: i64) -> Result<(Pending, Vec<u8>), Error> {
    if id.is_empty() || id.len() > 64 {
        return Err(Error::InvalidArgument("request_id is malformed".into()));
    }
    let Some(raw) = store.get(T_PENDING, id.as_bytes())? else {
        return Err(Error::NotFound(format!(
            "no pending request {id:?} (approved already, expired, or never made)"
        )));
    };
    let p: Pending = serde_json::from_slice(&raw).map_err(|e| Error::Corrupt(e.to_string()))?;
    if p.expires_at_unix <= now_unix {
        store.delete(T_PENDING, id.as_bytes())?;
        return Err(Error::FailedPrecondition(format!(
            "request {id} expired unapproved; make it again"
        )));
    }
    Ok((p, raw))
}

/// Removes a request if it is still exactly `raw`; false if someone else
/// took it first.
pub fn take(store: &SharedStore, id: &str, raw: &[u8]) -> Result<bool, Error> {
    Ok(store.compare_and_swap(T_PENDING, id.as_bytes(), Some(raw), None)?)
}
