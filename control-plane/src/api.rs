//! The gRPC layer: the `ControlPlane` service (for caches, in
//! `api::control_plane`) and the `Admin` service (for operators, in
//! `api::admin`). Handlers decode a request, call an operation and encode
//! its answer; errors become statuses in one place (`crate::error`).
//! Callers are identified only by their verified certificate; the `Enrol`
//! call alone is open.

mod admin;
mod control_plane;

use std::sync::Arc;

use lattice_shared::id::Role;
use lattice_shared::net::{PeerIdentity, authenticated};
use tonic::Request;

use crate::{Error, State};

/// Paths served without a client certificate.
pub(crate) const OPEN_PATHS: &[&str] = &["/lattice.v1.ControlPlane/Enrol"];

#[derive(Debug, Clone)]
pub(crate) struct Service {
    pub state: Arc<State>,
}

/// The verified peer of `req`, if it has `role` and is not revoked.
pub(crate) fn require_role<T>(
    state: &State,
    req: &Request<T>,
    role: Role,
) -> Result<Arc<PeerIdentity>, Error> {
    let peer = authenticated(req, &state.clock)
        .map_err(|s| Error::Unauthenticated(s.message().to_string()))?;
    if peer.id.role() != role {
        return Err(Error::Denied(format!(
            "{} may not call this; it is for a {role}",
            peer.id
        )));
    }
    // A connection made before a revocation must not outlive it.
    let issuer = peer.issuer.as_ref();
    state
        .log
        .revocations()
        .check_cert(&peer.cert, issuer)
        .map_err(Error::Denied)?;
    Ok(peer)
}

/// Runs blocking store or crypto work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::Internal("worker failed".into()))?
}

/// Wire forms of the control plane's answers.
pub(crate) mod encode {
    use lattice_shared::proto as pb;

    use crate::State;
    use crate::policy::Released;
    use crate::secrets::{SecretRecord, VersionRecord};

    pub(crate) fn secret_summary(rec: &SecretRecord) -> pb::SecretSummary {
        pb::SecretSummary {
            name: rec.name.clone(),
            active: rec.active,
            previous: rec.previous,
            regions: rec.regions.clone(),
            versions: u32::try_from(rec.versions.len()).unwrap_or(u32::MAX),
            holders: rec
                .published
                .as_ref()
                .map(|p| p.holders.clone())
                .unwrap_or_default(),
            deleted: rec.deleted,
            last_rotated_unix: rec.last_rotated_unix,
        }
    }

    pub(crate) fn secret_version_info(
        state: &State,
        rec: &SecretRecord,
        v: &VersionRecord,
    ) -> pb::SecretVersionInfo {
        pb::SecretVersionInfo {
            name: rec.name.clone(),
            version: v.version,
            state: state.version_state(rec, v).into(),
            created_at_unix: v.created_at_unix,
            created_by: v.created_by.clone(),
            approved_by: v.approved_by.clone(),
            fingerprint: v.fingerprint.clone(),
            kek_version: v.wrapped_dek.as_ref().map_or(0, |w| w.kek_version),
            origin: v.origin.clone(),
            previous_until_unix: if v.version == rec.previous {
                rec.previous_until_unix
            } else {
                0
            },
        }
    }

    pub(crate) fn secret_versions(state: &State, rec: &SecretRecord) -> pb::SecretVersionsResponse {
        pb::SecretVersionsResponse {
            summary: Some(secret_summary(rec)),
            versions: rec
                .versions
                .values()
                .map(|v| secret_version_info(state, rec, v))
                .collect(),
        }
    }

    impl From<Released> for pb::PolicyVersion {
        fn from(r: Released) -> Self {
            pb::PolicyVersion {
                version: r.version,
                bundle_sha256: r.bundle_sha256,
                released_at_unix_ms: r.released_at_unix_ms,
                pushed_by: r.pushed_by,
                approved_by: r.approved_by,
                message: r.message,
                rollback_of: r.rollback_of,
                seq: r.seq,
                policies: r.policies,
                tests_passed: r.tests_passed,
            }
        }
    }
}
