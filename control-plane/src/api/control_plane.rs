//! Handlers of the `ControlPlane` service, called by caches: enrolment and
//! renewal of a cache's certificates, agents' join tokens, the JWKS of all
//! caches' signing keys, and the `Sync` stream (served in `crate::sync`).

use lattice_shared::id::{Role, SpiffeId};
use lattice_shared::limits;
use lattice_shared::pki::{MAX_DER_LEN, inspect};
use lattice_shared::proto::{self as pb, control_plane_server::ControlPlane};
use tonic::{Request, Response, Status};

use super::{Service, blocking, require_role};
use crate::join::{self, Redemption};
use crate::registry::{CacheCsrs, Certify};
use crate::{CacheRecord, Error, State};

/// An X25519 public key, or none (a cache that does not take secrets).
fn check_hpke(key: &[u8]) -> Result<Vec<u8>, Error> {
    if !key.is_empty() && lattice_shared::envelope::check_public_key(key).is_err() {
        return Err(Error::InvalidArgument(
            "hpke_public_key must be a 32-byte X25519 public key".into(),
        ));
    }
    Ok(key.to_vec())
}

/// The three CSRs, each checked (before a join token is consumed).
fn check_csrs(csrs: Option<&pb::CacheCsrs>) -> Result<CacheCsrs, Error> {
    let csrs = csrs.ok_or_else(|| Error::InvalidArgument("csrs are required".into()))?;
    for (name, c) in [
        ("ca_csr", &csrs.ca_csr),
        ("tls_csr", &csrs.tls_csr),
        ("signing_csr", &csrs.signing_csr),
    ] {
        if c.is_empty() || c.len() > MAX_DER_LEN {
            return Err(Error::InvalidArgument(format!(
                "{name} must be 1..={MAX_DER_LEN} bytes"
            )));
        }
        // Checked before a join token is consumed.
        lattice_shared::pki::check_csr(c)
            .map_err(|e| Error::InvalidArgument(format!("{name}: {e}")))?;
    }
    let tls_names = lattice_shared::pki::requested_host_names(&csrs.tls_csr)
        .map_err(|e| Error::InvalidArgument(format!("tls_csr: {e}")))?;
    Ok(CacheCsrs {
        tls_names,
        ca_csr: csrs.ca_csr.clone(),
        tls_csr: csrs.tls_csr.clone(),
        signing_csr: csrs.signing_csr.clone(),
    })
}

fn certificates(state: &State, r: &CacheRecord) -> pb::CacheCertificates {
    pb::CacheCertificates {
        ca_cert: r.ca_cert.clone(),
        tls_cert: r.tls_cert.clone(),
        signing_cert: r.signing_certs.last().cloned().unwrap_or_default(),
        root_cert: state.root.cert_der().to_vec(),
        cache_id: r.id.to_string(),
    }
}

fn optional_id(s: &str) -> Result<Option<SpiffeId>, Error> {
    if s.is_empty() {
        return Ok(None);
    }
    SpiffeId::parse(s)
        .map(Some)
        .map_err(|e| Error::InvalidArgument(format!("requested_id: {e}")))
}

#[tonic::async_trait]
impl ControlPlane for Service {
    async fn enrol(
        &self,
        req: Request<pb::EnrolCacheRequest>,
    ) -> Result<Response<pb::EnrolCacheResponse>, Status> {
        let r = req.into_inner();
        if r.join_token.is_empty() || r.join_token.len() > limits::MAX_JOIN_TOKEN_LEN {
            return Err(Error::InvalidArgument("join_token is missing or too long".into()).into());
        }
        let requested = optional_id(&r.requested_id)?;
        let csrs = check_csrs(r.csrs.as_ref())?;
        let hpke = check_hpke(&r.hpke_public_key)?;
        let state = self.state.clone();
        let token_hash = join::token_hash(&r.join_token);
        let record = blocking(move || {
            let id = join::redeem(
                &state,
                Redemption {
                    token_hash,
                    role: Role::Cache,
                    region: None,
                    requested_id: requested.as_ref(),
                },
            )?;
            let record = match state.certify_cache(&id, &csrs, &hpke, Certify::Enrolment) {
                Ok(r) => r,
                Err(e) => {
                    // A refusal after redemption does not burn the token.
                    if let Err(u) = join::unredeem(&state, &token_hash) {
                        tracing::error!(cache_id = %id, error = %u, "giving the join token back failed");
                    }
                    return Err(e);
                }
            };
            tracing::info!(cache_id = %id, "cache enrolled; it holds no secret until a custodian grants custody (lattice grant-custody)");
            // Not a holder yet (custody is a custodian's decision); a cache
            // enrolled again under an id that held secrets stops holding
            // them. Best effort: the token is spent and the cache enrolled;
            // the next change (or restart) reconciles again.
            if let Err(e) = state.reconcile_secrets() {
                tracing::error!(cache_id = %id, error = %e, "sealing secrets to the new cache failed");
            }
            Ok(record)
        })
        .await?;
        Ok(Response::new(pb::EnrolCacheResponse {
            certificates: Some(certificates(&self.state, &record)),
        }))
    }

    async fn renew_ca(
        &self,
        req: Request<pb::RenewCaRequest>,
    ) -> Result<Response<pb::RenewCaResponse>, Status> {
        let peer = require_role(&self.state, &req, Role::Cache)?;
        let csrs = check_csrs(req.get_ref().csrs.as_ref())?;
        let hpke = check_hpke(&req.get_ref().hpke_public_key)?;
        let state = self.state.clone();
        let record = blocking(move || {
            let Some(record) = state.cache_record(&peer.id)? else {
                return Err(Error::NotFound(format!("{} is not enrolled", peer.id)));
            };
            // Renewal is for the second half of a CA's life, or at once when
            // the CA or newest signing certificate was revoked (the cache can
            // issue nothing verifiable until it renews); other calls would
            // let a cache grow its record and every JWKS.
            let ca = inspect(&record.ca_cert)?;
            let revoked = {
                let revocations = state.log.revocations();
                let signing = record.signing_certs.last().map(|c| inspect(c)).transpose()?;
                revocations.is_serial_revoked(&ca.serial_hex)
                    || signing.is_some_and(|s| revocations.is_serial_revoked(&s.serial_hex))
            };
            if !revoked
                && !lattice_shared::clock::past_half_life(
                    state.clock.now(),
                    ca.not_before,
                    ca.not_after,
                )
            {
                return Err(Error::FailedPrecondition(format!(
                    "{} may renew only past half-life of its CA certificate, or once its CA or \
                     signing certificate is revoked",
                    peer.id
                )));
            }
            let old_key = record.hpke_public_key.clone();
            let record = state.certify_cache(&peer.id, &csrs, &hpke, Certify::Renewal)?;
            if record.hpke_public_key != old_key
                && let Err(e) = state.reconcile_secrets()
            {
                tracing::error!(cache_id = %peer.id, error = %e, "sealing secrets to the renewed cache failed");
            }
            Ok(record)
        })
        .await?;
        tracing::info!(cache_id = %record.id, "cache certificates renewed");
        Ok(Response::new(pb::RenewCaResponse {
            certificates: Some(certificates(&self.state, &record)),
        }))
    }

    async fn redeem_join_token(
        &self,
        req: Request<pb::RedeemJoinTokenRequest>,
    ) -> Result<Response<pb::RedeemJoinTokenResponse>, Status> {
        let peer = require_role(&self.state, &req, Role::Cache)?;
        let r = req.into_inner();
        let token_hash: [u8; 32] = r
            .token_sha256
            .as_slice()
            .try_into()
            .map_err(|_| Error::InvalidArgument("token_sha256 must be 32 bytes".into()))?;
        let requested = optional_id(&r.requested_id)?;
        let state = self.state.clone();
        let id = blocking(move || {
            let region = peer.id.region().cloned();
            join::redeem(
                &state,
                Redemption {
                    token_hash,
                    role: Role::Agent,
                    region: region.as_ref(),
                    requested_id: requested.as_ref(),
                },
            )
        })
        .await?;
        Ok(Response::new(pb::RedeemJoinTokenResponse {
            agent_id: id.to_string(),
        }))
    }

    async fn jwks(
        &self,
        req: Request<pb::JwksRequest>,
    ) -> Result<Response<pb::JwksResponse>, Status> {
        require_role(&self.state, &req, Role::Cache)?;
        let state = self.state.clone();
        let json = blocking(move || {
            let caches = state.caches()?;
            let revoked = state.log.revocations().clone();
            let set = lattice_shared::token::jwks_from_certs(
                caches
                    .iter()
                    .filter(|c| !revoked.is_cache_revoked(&c.id))
                    .flat_map(|c| c.signing_certs.iter().map(Vec::as_slice))
                    .filter(|der| {
                        inspect(der).is_ok_and(|i| !revoked.is_serial_revoked(&i.serial_hex))
                    }),
                state.clock.now(),
            );
            serde_json::to_string(&set).map_err(|e| Error::Corrupt(e.to_string()))
        })
        .await?;
        Ok(Response::new(pb::JwksResponse { jwks_json: json }))
    }

    type SyncStream = crate::sync::SyncStream;

    async fn sync(
        &self,
        req: Request<tonic::Streaming<pb::SyncUp>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let peer = require_role(&self.state, &req, Role::Cache)?;
        let enrolled = {
            let state = self.state.clone();
            let id = peer.id.clone();
            blocking(move || state.cache_record(&id)).await?
        };
        if enrolled.is_none() {
            return Err(Error::NotFound(format!("{} is not enrolled", peer.id)).into());
        }
        let stream =
            crate::sync::open(self.state.clone(), peer.id.clone(), req.into_inner()).await?;
        Ok(Response::new(stream))
    }
}
