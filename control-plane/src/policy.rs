//! Policy releases at the control plane: each push or rollback is validated,
//! tested, signed with the control plane's policy key and committed to the
//! event log, which streams it to every cache in order. The version history
//! is the log itself; the current engine also decides admin actions here.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lattice_shared::clock::{SharedClock, past_half_life};
use lattice_shared::id::SpiffeId;
use lattice_shared::pki::{Authority, PrivateKey, Profile};
use lattice_shared::policy::sign::PolicySigner;
use lattice_shared::policy::{self, AdminAction, AdminRequest, BundleFiles, Engine, PolicyError};
use lattice_shared::proto as pb;
use lattice_shared::seal::KeyVault;
use lattice_shared::store::{SharedStore, Write};
use prost::Message;

use crate::event_log::EventLog;
use crate::{Error, State};

const T_IDENTITY: &str = "identity";
const KEY_AAD: &str = "cp/policy-key";
/// Lifetime of the policy signing certificate; renewed at half-life (at start).
const SIGNER_TTL: Duration = Duration::from_secs(365 * 86400);

/// A release as the history lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub version: u64,
    pub bundle_sha256: Vec<u8>,
    pub released_at_unix_ms: i64,
    pub pushed_by: String,
    pub approved_by: String,
    pub message: String,
    pub rollback_of: u64,
    /// The event that carries it.
    pub seq: u64,
    pub policies: u32,
    pub tests_passed: u32,
}

#[derive(Debug)]
pub struct Policies {
    /// Replaced when its certificate is revoked (see `State::release_policy`).
    signer: RwLock<Arc<PolicySigner>>,
    /// Serialises releases, so versions are consecutive.
    release_lock: Mutex<()>,
    current: RwLock<Arc<Engine>>,
    versions: RwLock<Vec<Released>>,
}

impl From<PolicyError> for Error {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::Rejected(r) => Error::InvalidArgument(r.to_string()),
            PolicyError::Bundle(m) => Error::InvalidArgument(format!("bundle: {m}")),
            other => Error::Corrupt(other.to_string()),
        }
    }
}

fn version_info(
    seq: u64,
    release: &pb::PolicyRelease,
    engine: Option<&Engine>,
    tests: usize,
) -> Released {
    Released {
        version: release.version,
        bundle_sha256: release.bundle_sha256.clone(),
        released_at_unix_ms: release.released_at_unix_ms,
        pushed_by: release.pushed_by.clone(),
        approved_by: release.approved_by.clone(),
        message: release.message.clone(),
        rollback_of: release.rollback_of,
        seq,
        policies: engine
            .map(|e| u32::try_from(e.policy_count()).unwrap_or(u32::MAX))
            .unwrap_or(0),
        tests_passed: u32::try_from(tests).unwrap_or(u32::MAX),
    }
}

/// The stored policy signer, or a new one when there is none, it is past
/// half-life or `fresh` is asked for (its certificate was revoked).
pub fn load_or_create_signer(
    root: &Authority,
    id: &SpiffeId,
    clock: &SharedClock,
    store: &SharedStore,
    vault: &Arc<dyn KeyVault>,
    fresh: bool,
) -> Result<PolicySigner, Error> {
    if !fresh
        && let (Some(cert), Some(sealed)) = (
            store.get(T_IDENTITY, b"policy_cert")?,
            store.get(T_IDENTITY, b"policy_key")?,
        )
    {
        let info = lattice_shared::pki::inspect(&cert)?;
        if !past_half_life(clock.now(), info.not_before, info.not_after) {
            let key = PrivateKey::from_pkcs8(&vault.open(&sealed, KEY_AAD)?)?;
            return Ok(PolicySigner::new(key, cert));
        }
    }
    // A new key each time: releases signed by the old one stay verifiable
    // with the certificate they carry.
    let key = PrivateKey::generate_ed25519()?;
    let cert = root.issue(
        &key.csr_der()?,
        id,
        Profile::JwtSigning,
        clock.now(),
        SIGNER_TTL,
    )?;
    let sealed = vault.seal(&key.pkcs8_der(), KEY_AAD)?;
    store.apply(vec![
        Write {
            tree: T_IDENTITY,
            key: b"policy_cert".to_vec(),
            value: Some(cert.clone()),
        },
        Write {
            tree: T_IDENTITY,
            key: b"policy_key".to_vec(),
            value: Some(sealed),
        },
    ])?;
    tracing::info!("created the policy signing key");
    Ok(PolicySigner::new(key, cert))
}

/// What a release is made of.
pub struct NewRelease<'a> {
    pub files: BundleFiles,
    pub message: String,
    pub pushed_by: &'a SpiffeId,
    pub approved_by: Option<&'a SpiffeId>,
    pub rollback_of: u64,
    /// The pusher's own request to push again: the new bundle must still
    /// allow it (at most with an approval), so no push can lock out policy.
    pub lockout_check: Option<AdminRequest>,
    /// The version the change was asked against: refused if another release
    /// came in between (an approval must not overwrite what it never saw).
    pub base_version: Option<u64>,
}

impl Policies {
    /// Opens the policy state from the releases in the log; a log without
    /// any gets the default bundle as version 1.
    pub fn open(
        root: &Authority,
        id: &SpiffeId,
        clock: &SharedClock,
        store: &SharedStore,
        vault: &Arc<dyn KeyVault>,
        log: &EventLog,
        released: Vec<u64>,
    ) -> Result<Self, Error> {
        let signer = load_or_create_signer(root, id, clock, store, vault, false)?;
        let mut versions = Vec::with_capacity(released.len());
        // One release in memory at a time; the newest is kept.
        let mut last: Option<pb::PolicyRelease> = None;
        for &seq in &released {
            let signed = log.policy_at(seq)?;
            let release = pb::PolicyRelease::decode(signed.release.as_slice())
                .map_err(|e| Error::Corrupt(format!("policy release at {seq}: {e}")))?;
            versions.push(version_info(seq, &release, None, 0));
            last = Some(release);
        }
        let engine = match &last {
            Some(r) => {
                let files = BundleFiles::from_proto(r.bundle.as_ref().ok_or_else(|| {
                    Error::Corrupt(format!("release {} has no bundle", r.version))
                })?)?;
                Engine::compile(&files, r.version)?
            }
            None => Engine::compile(&policy::default_bundle(), 0)?,
        };
        let this = Self {
            signer: RwLock::new(Arc::new(signer)),
            release_lock: Mutex::new(()),
            current: RwLock::new(Arc::new(engine)),
            versions: RwLock::new(versions),
        };
        if last.is_none() {
            this.release(
                log,
                clock,
                NewRelease {
                    files: policy::default_bundle(),
                    message: "default bundle".into(),
                    pushed_by: id,
                    approved_by: None,
                    rollback_of: 0,
                    lockout_check: None,
                    base_version: None,
                },
            )?;
        }
        Ok(this)
    }

    /// The certificate of the signing key in force.
    pub fn signer_cert(&self) -> Vec<u8> {
        self.signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .cert_der()
            .to_vec()
    }

    /// The signing key in force (it also signs the audit log's tree heads).
    pub fn signer(&self) -> Arc<PolicySigner> {
        self.signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn replace_signer(&self, signer: PolicySigner) {
        *self.signer.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(signer);
    }

    pub fn current(&self) -> Arc<Engine> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn history(&self) -> Vec<Released> {
        self.versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A version's metadata and files (`0`: the current one).
    pub fn get(&self, log: &EventLog, version: u64) -> Result<(Released, BundleFiles), Error> {
        let info = {
            let versions = self.versions.read().unwrap_or_else(|p| p.into_inner());
            let found = if version == 0 {
                versions.last()
            } else {
                versions.iter().find(|r| r.version == version)
            };
            found
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("no policy version {version}")))?
        };
        let ev = log
            .get(info.seq)?
            .ok_or_else(|| Error::Corrupt(format!("event {} is missing", info.seq)))?;
        let Some(pb::lattice_event::Body::Policy(signed)) = ev.body else {
            return Err(Error::Corrupt(format!(
                "event {} is not a policy release",
                info.seq
            )));
        };
        let release = pb::PolicyRelease::decode(signed.release.as_slice())
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let files = BundleFiles::from_proto(release.bundle.as_ref().ok_or_else(|| {
            Error::Corrupt(format!("release {} has no bundle", release.version))
        })?)?;
        Ok((info, files))
    }

    /// Validates, tests, signs and commits a release; it is in force here
    /// and streaming to the caches when this returns.
    pub fn release(
        &self,
        log: &EventLog,
        clock: &SharedClock,
        new: NewRelease<'_>,
    ) -> Result<Released, Error> {
        let _guard = self.release_lock.lock().unwrap_or_else(|p| p.into_inner());
        let version = self
            .versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .map(|r| r.version)
            .unwrap_or(0)
            + 1;
        if let Some(base) = new.base_version
            && base + 1 != version
        {
            return Err(Error::FailedPrecondition(format!(
                "policy changed since this was asked (version {base} then, {} now); review the change and make it again",
                version - 1
            )));
        }
        let (engine, tests) = policy::check(&new.files, version)?;
        if let Some(req) = &new.lockout_check
            && !may_act(&engine, req)
        {
            return Err(Error::InvalidArgument(format!(
                "bundle refused: under it {} could no longer push policy, even with an approval; \
                 a bundle must keep a way to change policy",
                req.principal
            )));
        }
        let now_ms = clock.now_unix_ms();
        let release = pb::PolicyRelease {
            version,
            bundle: Some(new.files.to_proto()),
            bundle_sha256: new.files.sha256().to_vec(),
            released_at_unix_ms: now_ms,
            pushed_by: new.pushed_by.to_string(),
            approved_by: new.approved_by.map(|a| a.to_string()).unwrap_or_default(),
            message: new.message,
            rollback_of: new.rollback_of,
        };
        let signer = self
            .signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let signed = signer.sign(&release)?;
        let ev = log.append_policy(signed, now_ms)?;
        let info = version_info(ev.seq, &release, Some(&engine), tests.passed.len());
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(engine);
        self.versions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(info.clone());
        metrics::gauge!("lattice_cp_policy_version").set(version as f64);
        tracing::info!(
            version,
            seq = ev.seq,
            pushed_by = %release.pushed_by,
            approved_by = %release.approved_by,
            rollback_of = release.rollback_of,
            sha256 = %hex::encode(&release.bundle_sha256),
            "policy released"
        );
        Ok(info)
    }
}

/// Is `req` allowed, or would it be with one approval by another admin who
/// may approve?
pub fn may_act(engine: &Engine, req: &AdminRequest) -> bool {
    if engine.decide_admin(req).allowed {
        return true;
    }
    let approved = with_any_approval(req);
    let Some(approver) = approved.approvals.first() else {
        return false;
    };
    let approve = AdminRequest {
        principal: approver.admin.clone(),
        roles: approver.roles.clone(),
        regions: req.regions.clone(),
        action: AdminAction::Approve,
        approvals: vec![],
        grant: Default::default(),
        ..req.clone()
    };
    engine.decide_admin(&approved).allowed && engine.decide_admin(&approve).allowed
}

/// `req` as if another admin holding every role had approved it.
pub fn with_any_approval(req: &AdminRequest) -> AdminRequest {
    let mut r = req.clone();
    if let Ok(other) = SpiffeId::new(
        req.principal.trust_domain(),
        lattice_shared::id::Role::Admin,
        None,
        "any-approver",
    ) {
        r.approvals = vec![policy::Approval {
            admin: other,
            roles: policy::AdminRole::ALL.to_vec(),
        }];
    }
    r
}

/// The request to push again that the lockout check evaluates.
pub fn push_again(req: &AdminRequest) -> AdminRequest {
    AdminRequest {
        action: AdminAction::PushPolicy,
        approvals: vec![],
        grant: Default::default(),
        ..req.clone()
    }
}

impl State {
    /// Releases policy, first replacing the signing key if its certificate
    /// has been revoked (caches refuse releases it signs).
    pub fn release_policy(&self, new: NewRelease<'_>) -> Result<Released, Error> {
        self.ensure_policy_signer()?;
        self.policy.release(&self.log, &self.clock, new)
    }

    /// True when a new signing key was made.
    pub(crate) fn ensure_policy_signer(&self) -> Result<bool, Error> {
        let info = lattice_shared::pki::inspect(&self.policy.signer_cert())?;
        if self.log.revocations().check_cert(&info, None).is_ok() {
            return Ok(false);
        }
        let signer = load_or_create_signer(
            &self.root,
            &self.id,
            &self.clock,
            &self.store,
            &self.vault,
            true,
        )?;
        self.policy.replace_signer(signer);
        self.checkpoints.reset();
        tracing::warn!(revoked_serial = %info.serial_hex, "policy signing certificate revoked; made a new signing key");
        Ok(true)
    }
}
