//! Revocation orchestration: a revocation is checked as the caches will read
//! it back, committed durably to the event log, and followed by what it
//! implies (a revoked cache holds no more secrets; a revoked policy signer
//! is replaced and the policy in force re-signed).

use crate::{Error, State, policy};

impl State {
    /// Validates and commits a revocation; durable when this returns.
    pub fn revoke(
        &self,
        r: &lattice_shared::revocation::Revocation,
    ) -> Result<lattice_shared::proto::LatticeEvent, Error> {
        use lattice_shared::revocation::Target;
        // What the caches will read back from the log: refuse here what
        // they would refuse there.
        lattice_shared::revocation::Revocation::try_from(&lattice_shared::proto::Revocation::from(
            r,
        ))
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if let Target::SecretVersion { name, version } = &r.target {
            return self.revoke_secret_version(name, *version, &r.reason);
        }
        let foreign = match &r.target {
            Target::Agent(id) | Target::Cache(id) => Some(id),
            Target::SubjectBefore { subject, .. } => Some(subject),
            _ => None,
        };
        if let Some(id) = foreign
            && id.trust_domain() != &self.td
        {
            return Err(Error::InvalidArgument(format!(
                "{id} is not in trust domain {}",
                self.td
            )));
        }
        // "Everything issued before now" (cutoff 0) takes the commit time,
        // rounded up: everything issued up to this second is covered.
        let now_ms = self.clock.now_unix_ms();
        let resolved;
        let r = match &r.target {
            Target::SubjectBefore {
                subject,
                issued_before_unix: 0,
            } => {
                resolved = lattice_shared::revocation::Revocation {
                    target: Target::SubjectBefore {
                        subject: subject.clone(),
                        issued_before_unix: now_ms / 1000 + 1,
                    },
                    reason: r.reason.clone(),
                };
                &resolved
            }
            _ => r,
        };
        let ev = self.log.append_revocation(r, now_ms)?;
        metrics::counter!("lattice_cp_revocations_total").increment(1);
        tracing::info!(seq = ev.seq, target = %r.target, "revocation committed");
        if matches!(r.target, Target::Cache(_)) {
            // No longer a holder of any secret.
            self.reconcile_secrets()?;
        }
        // Revoking the policy signer must not leave the caches unable to take
        // any later release: re-sign the policy in force with a new key now.
        if self.ensure_policy_signer()? {
            let (info, files) = self.policy.get(&self.log, 0)?;
            self.policy.release(
                &self.log,
                &self.clock,
                policy::NewRelease {
                    files,
                    message: format!(
                        "v{} re-signed: the policy signing key was revoked",
                        info.version
                    ),
                    pushed_by: &self.id,
                    approved_by: None,
                    rollback_of: info.version,
                    lockout_check: None,
                    base_version: None,
                },
            )?;
        }
        Ok(ev)
    }
}
