//! Admin calls on upstream secrets. Each is a Cedar decision (PutSecret,
//! RotateSecret on `Secret::"NAME"`; RotateKmsKey on the control plane); a
//! change under the two-person rule waits as a `PendingSecretChange`, a put
//! already encrypted (the value is never stored in clear, not even while it
//! waits).

use lattice_shared::id::check_secret_name;
use lattice_shared::policy::AdminAction;
use lattice_shared::proto as pb;

use super::gate::{Allowed, Caller, check_message};
use crate::api::{Service, blocking, encode};
use crate::secrets::{Origin, Staged, check_regions, check_value};
use crate::{Error, rotation};

/// What a secret change produced.
pub(crate) enum SecretOutcome {
    Version(pb::SecretVersionInfo),
    Versions(pb::SecretVersionsResponse),
    Deleted(pb::DeleteSecretResponse),
    Revoked(pb::RevokeResponse),
    Kms(pb::RotateKmsResponse),
}

impl SecretOutcome {
    pub(crate) fn into_approval(self) -> pb::approve_response::Result {
        use pb::approve_response::Result as R;
        match self {
            SecretOutcome::Version(v) => R::Secret(v),
            SecretOutcome::Versions(v) => R::Secret(
                v.versions
                    .into_iter()
                    .find(|i| i.state == "active")
                    .unwrap_or_default(),
            ),
            SecretOutcome::Deleted(d) => R::Revoke(pb::RevokeResponse {
                seq: d.seq,
                committed_at_unix_ms: 0,
            }),
            SecretOutcome::Revoked(r) => R::Revoke(r),
            SecretOutcome::Kms(k) => R::Kms(k),
        }
    }
}

pub(crate) fn action_of(op: &str) -> Option<AdminAction> {
    Some(match op {
        "put" | "delete" => AdminAction::PutSecret,
        "rollback" | "rekey" | "rotate" | "revoke-version" => AdminAction::RotateSecret,
        "kms-rotate" => AdminAction::RotateKmsKey,
        _ => return None,
    })
}

pub(crate) fn check_name(name: &str) -> Result<(), Error> {
    check_secret_name(name).map_err(Error::InvalidArgument)
}

impl Service {
    /// Gates a secret change; runs it when allowed outright.
    pub(crate) async fn secret_change(
        &self,
        c: &Caller,
        change: pb::PendingSecretChange,
        summary: String,
    ) -> Result<SecretOutcome, Error> {
        let action = action_of(&change.op)
            .ok_or_else(|| Error::InvalidArgument(format!("unknown op {:?}", change.op)))?;
        let resource = if action == AdminAction::RotateKmsKey {
            ""
        } else {
            change.name.as_str()
        };
        let allowed = self.gate(c, action, "", resource, &change, summary).await?;
        self.exec_secret(c, allowed, change).await
    }

    pub(crate) async fn exec_secret(
        &self,
        by: &Caller,
        allowed: Allowed,
        change: pb::PendingSecretChange,
    ) -> Result<SecretOutcome, Error> {
        let state = self.state.clone();
        let by_id = by.id.to_string();
        let approved_by = allowed
            .approved_by
            .as_ref()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let name = change.name.clone();
        if !matches!(change.op.as_str(), "rotate" | "kms-rotate")
            && self.state.rotators.is_running(&name)
        {
            return Err(Error::FailedPrecondition(format!(
                "a rotation of secret {name} is running; retry when it has finished"
            )));
        }
        match change.op.as_str() {
            "put" => {
                let staged: Staged = serde_json::from_slice(&change.staged_json)
                    .map_err(|e| Error::Internal(format!("staged secret: {e}")))?;
                let regions = change.regions.clone();
                blocking(move || {
                    let (rec, v) = state.commit_secret(
                        &name,
                        &regions,
                        staged,
                        Origin {
                            by: &by_id,
                            approved_by: &approved_by,
                            kind: "put",
                        },
                    )?;
                    let vr = rec
                        .versions
                        .get(&v)
                        .ok_or_else(|| Error::Corrupt("committed version missing".into()))?;
                    Ok(SecretOutcome::Version(encode::secret_version_info(
                        &state, &rec, vr,
                    )))
                })
                .await
            }
            "delete" => {
                blocking(move || {
                    let (seq, n) = state.delete_secret(&name)?;
                    Ok(SecretOutcome::Deleted(pb::DeleteSecretResponse {
                        seq,
                        versions_revoked: n,
                    }))
                })
                .await
            }
            "rollback" => {
                blocking(move || {
                    let rec = state.rollback_secret(&name, change.version)?;
                    Ok(SecretOutcome::Versions(encode::secret_versions(
                        &state, &rec,
                    )))
                })
                .await
            }
            "rekey" => {
                blocking(move || {
                    let rec = state.rekey_secret(&name)?;
                    Ok(SecretOutcome::Versions(encode::secret_versions(
                        &state, &rec,
                    )))
                })
                .await
            }
            "revoke-version" => {
                let (version, reason) = (change.version, change.reason.clone());
                blocking(move || {
                    let ev = state.revoke_secret_version(&name, version, &reason)?;
                    Ok(SecretOutcome::Revoked(pb::RevokeResponse {
                        seq: ev.seq,
                        committed_at_unix_ms: ev.committed_at_unix_ms,
                    }))
                })
                .await
            }
            "kms-rotate" => {
                blocking(move || {
                    let (kek_version, rewrapped) = state.rotate_kms()?;
                    Ok(SecretOutcome::Kms(pb::RotateKmsResponse {
                        kms: state.secrets.kms.describe(),
                        kek_version,
                        rewrapped,
                    }))
                })
                .await
            }
            "rotate" => {
                let v = rotation::rotate(&state, &name, &by_id, &approved_by, None).await?;
                blocking(move || {
                    let rec = state.secret_record(&name)?;
                    let vr = rec
                        .versions
                        .get(&v)
                        .ok_or_else(|| Error::Corrupt("rotated version missing".into()))?;
                    Ok(SecretOutcome::Version(encode::secret_version_info(
                        &state, &rec, vr,
                    )))
                })
                .await
            }
            other => Err(Error::InvalidArgument(format!("unknown op {other:?}"))),
        }
    }

    /// A put: validated and encrypted before anything else happens.
    pub(crate) async fn put_secret_change(
        &self,
        c: &Caller,
        r: pb::PutSecretRequest,
    ) -> Result<SecretOutcome, Error> {
        check_name(&r.name)?;
        check_message(&r.message)?;
        check_value(&r.value)?;
        let mut regions = r.regions.clone();
        regions.sort();
        regions.dedup();
        check_regions(&regions)?;
        // Refuse early a caller who could never put (not even approved):
        // staging costs a KMS call.
        self.may_ever(c, AdminAction::PutSecret, &r.name).await?;
        let state = self.state.clone();
        let (name, value) = (r.name.clone(), zeroize::Zeroizing::new(r.value));
        let staged = blocking(move || state.secrets.stage(&name, &value)).await?;
        let summary = format!(
            "put secret {} (fingerprint {}) for regions {}",
            r.name,
            staged.fingerprint,
            regions.join(",")
        );
        let change = pb::PendingSecretChange {
            op: "put".into(),
            name: r.name,
            regions,
            staged_json: serde_json::to_vec(&staged).map_err(|e| Error::Internal(e.to_string()))?,
            message: r.message,
            ..Default::default()
        };
        self.secret_change(c, change, summary).await
    }
}
