//! The admin trail: every admin decision at the control plane (allowed,
//! denied, parked for a second admin, approved), written durably to the
//! tamper-evident audit log (`audit_log`) before the caller learns the
//! outcome. Both admins of a two-person action are in the approval's record.

use serde::{Deserialize, Serialize};

use crate::{Error, State};

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

/// An audit log leaf, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Admin(AdminRecord),
}

/// Appends an admin record durably to the audit log.
pub(crate) fn record(state: &State, r: &AdminRecord) -> Result<(), Error> {
    state.audit(&Record::Admin(r.clone())).map(|_| ())
}

/// The oldest `limit` admin records, in log order.
pub(crate) fn list(state: &State, limit: u32) -> Result<Vec<AdminRecord>, Error> {
    let mut out = Vec::new();
    for e in state.audit_log.entries(0, limit)? {
        let v: serde_json::Value = serde_json::from_slice(&e.record)
            .map_err(|e| Error::Corrupt(format!("audit record: {e}")))?;
        if v.get("kind").and_then(|k| k.as_str()) != Some("admin") {
            continue; // caches' records
        }
        match serde_json::from_value(v) {
            Ok(Record::Admin(r)) => out.push(r),
            Err(e) => return Err(Error::Corrupt(format!("audit record: {e}"))),
        }
    }
    Ok(out)
}
