//! The admin trail: every admin decision at the control plane (allowed,
//! denied, parked for a second admin, approved), written durably before the
//! caller learns the outcome. Both admins of a two-person action are in the
//! approval's record. Not yet tamper-evident: the audit log work chains
//! these records (and the caches' issuance records) into a Merkle log.

use lattice_shared::store::SharedStore;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::Error;

const T_ADMIN_AUDIT: &str = "admin_audit";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Allowed,
    Denied,
    Pending,
    Approved,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRecord {
    pub at_unix_ms: i64,
    pub action: String,
    pub admin: String,
    pub outcome: Outcome,
    /// The second admin of an approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub policy_version: u64,
    /// The policies that determined the decision.
    #[serde(default)]
    pub policies: Vec<String>,
    /// What was asked, without secrets (never a token or a key).
    pub summary: String,
}

/// Appends a record durably; keys sort by time.
pub fn record(store: &SharedStore, r: &AdminRecord) -> Result<(), Error> {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&r.at_unix_ms.to_be_bytes());
    let mut rnd = [0u8; 8];
    SystemRandom::new()
        .fill(&mut rnd)
        .map_err(|_| Error::Corrupt("rng".into()))?;
    key.extend_from_slice(&rnd);
    let bytes = serde_json::to_vec(r).map_err(|e| Error::Corrupt(e.to_string()))?;
    store.put(T_ADMIN_AUDIT, &key, &bytes)?;
    Ok(())
}

/// The oldest `limit` records, in time order.
pub fn list(store: &SharedStore, limit: usize) -> Result<Vec<AdminRecord>, Error> {
    store
        .scan_prefix(T_ADMIN_AUDIT, b"", limit)?
        .into_iter()
        .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| Error::Corrupt(e.to_string())))
        .collect()
}
