//! Handlers of the `Admin` service. Each decodes its request, asks the
//! two-person-rule gate (`crate::admin::gate`), runs the effect
//! (`crate::admin::exec`, `crate::admin::secrets`) and encodes the answer.

use lattice_shared::clock::unix_secs;
use lattice_shared::id::SpiffeId;
use lattice_shared::pki::inspect;
use lattice_shared::policy::AdminAction;
use lattice_shared::proto::{self as pb, admin_server::Admin};
use tonic::{Request, Response, Status};

use super::{Service, blocking, encode};
use crate::admin::{
    SecretOutcome, bundle_of, check_message, check_name, join_token_action, parse_admin_request,
    parse_cache_id, parse_revocation, region_of, revocation_region,
};
use crate::{Error, approval, join};

#[tonic::async_trait]
impl Admin for Service {
    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        let id = SpiffeId::parse(&r.id).map_err(|e| Error::InvalidArgument(format!("id: {e}")))?;
        let summary = format!("create a join token for {id}");
        let allowed = self
            .gate(&c, join_token_action(&id), &region_of(&id), "", &r, summary)
            .await?;
        Ok(Response::new(
            self.exec_join_token(&c, allowed, id, r.ttl_secs).await?,
        ))
    }

    async fn grant_custody(
        &self,
        req: Request<pb::GrantCustodyRequest>,
    ) -> Result<Response<pb::GrantCustodyResponse>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        let id = parse_cache_id(&r.cache_id)?;
        let summary = format!(
            "grant {id} custody of the secrets of region {}",
            region_of(&id)
        );
        let allowed = self
            .gate(
                &c,
                AdminAction::HoldSecret,
                &region_of(&id),
                "",
                &r,
                summary,
            )
            .await?;
        Ok(Response::new(
            self.exec_grant_custody(&c, allowed, id).await?,
        ))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadStatus).await?;
        let state = self.state.clone();
        let (caches, outstanding) =
            blocking(move || Ok((state.caches()?, join::outstanding(&state)?))).await?;
        let now = self.state.clock.now_unix_ms();
        let revoked = self.state.log.revocations().clone();
        let caches: Vec<pb::CacheStatus> = caches
            .iter()
            .map(|c| {
                let ca = inspect(&c.ca_cert).ok();
                let link = self.state.links.get(&c.id).unwrap_or_default();
                pb::CacheStatus {
                    cache_id: c.id.to_string(),
                    region: region_of(&c.id),
                    enrolled_at_unix: c.enrolled_at_unix,
                    ca_not_after_unix: ca.as_ref().map(|i| unix_secs(i.not_after)).unwrap_or(0),
                    ca_serial: ca.map(|i| i.serial_hex).unwrap_or_default(),
                    acked_seq: link.acked,
                    last_contact_unix_ms: link.last_contact_ms,
                    connected: link.connected,
                    revoked: revoked.is_cache_revoked(&c.id),
                    policy_version: link.policy_version,
                    max_staleness_ms: link.max_staleness_ms,
                    custody: c.custody.name().to_string(),
                    // 0 means never fresh; a fresh cache reads at least 1.
                    staleness_ms: if link.fresh_at_ms == 0 {
                        0
                    } else {
                        u64::try_from(now - link.fresh_at_ms).unwrap_or(0).max(1)
                    },
                }
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            trust_domain: self.state.td.to_string(),
            caches,
            join_tokens_outstanding: outstanding,
            head_seq: self.state.log.head(),
            max_staleness_ms: 0,
            policy_version: self.state.policy.current().version(),
            policy_seq: self
                .state
                .policy
                .history()
                .last()
                .map(|v| v.seq)
                .unwrap_or(0),
        }))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        let rev = parse_revocation(r.revocation.as_ref())?;
        let summary = format!("revoke {}", rev.target);
        if let lattice_shared::revocation::Target::SecretVersion { name, version } = &rev.target {
            // A secret's custodians decide over its versions.
            let change = pb::PendingSecretChange {
                op: "revoke-version".into(),
                name: name.clone(),
                version: *version,
                reason: rev.reason.clone(),
                ..Default::default()
            };
            return match self.secret_change(&c, change, summary).await? {
                SecretOutcome::Revoked(r) => Ok(Response::new(r)),
                _ => Err(Error::Internal("unexpected outcome".into()).into()),
            };
        }
        let allowed = self
            .gate(
                &c,
                AdminAction::Revoke,
                &revocation_region(&rev),
                "",
                &r,
                summary,
            )
            .await?;
        Ok(Response::new(self.exec_revoke(&c, allowed, rev).await?))
    }

    async fn push_policy(
        &self,
        req: Request<pb::PushPolicyRequest>,
    ) -> Result<Response<pb::PolicyVersion>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        check_message(&r.message)?;
        let files = bundle_of(&r)?;
        let summary = format!(
            "push policy bundle sha256:{} ({} files): {}",
            hex::encode(files.sha256()),
            files.len(),
            r.message
        );
        // Only an admin who may push (perhaps with an approval) makes the
        // control plane compile and test a bundle.
        let may = crate::policy::may_act(
            &self.state.policy.current(),
            &self.admin_request(&c, AdminAction::PushPolicy, "", "", vec![]),
        );
        if !may {
            self.gate(&c, AdminAction::PushPolicy, "", "", &r, summary)
                .await?;
            return Err(Error::Denied("policy push denied".into()).into());
        }
        // Refuse a broken bundle before anyone is asked to approve it.
        let checked = files.clone();
        blocking(move || Ok(lattice_shared::policy::check(&checked, 0)?)).await?;
        let allowed = self
            .gate(&c, AdminAction::PushPolicy, "", "", &r, summary)
            .await?;
        Ok(Response::new(self.exec_push(&c, allowed, r).await?.into()))
    }

    async fn rollback_policy(
        &self,
        req: Request<pb::RollbackPolicyRequest>,
    ) -> Result<Response<pb::PolicyVersion>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        check_message(&r.message)?;
        if r.to_version == 0 {
            return Err(Error::InvalidArgument("to_version is required".into()).into());
        }
        {
            let state = self.state.clone();
            let v = r.to_version;
            blocking(move || state.policy.get(&state.log, v).map(|_| ())).await?;
        }
        let summary = format!(
            "roll policy back to version {}: {}",
            r.to_version, r.message
        );
        let allowed = self
            .gate(&c, AdminAction::RollbackPolicy, "", "", &r, summary)
            .await?;
        Ok(Response::new(
            self.exec_rollback(&c, allowed, r).await?.into(),
        ))
    }

    async fn policy_history(
        &self,
        req: Request<pb::PolicyHistoryRequest>,
    ) -> Result<Response<pb::PolicyHistoryResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadPolicy).await?;
        Ok(Response::new(pb::PolicyHistoryResponse {
            versions: self
                .state
                .policy
                .history()
                .into_iter()
                .map(Into::into)
                .collect(),
            current: self.state.policy.current().version(),
        }))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadPolicy).await?;
        let v = req.get_ref().version;
        let state = self.state.clone();
        let (info, files) = blocking(move || state.policy.get(&state.log, v)).await?;
        Ok(Response::new(pb::GetPolicyResponse {
            version: Some(info.into()),
            bundle: Some(files.to_proto()),
        }))
    }

    async fn approve(
        &self,
        req: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::ApproveResponse>, Status> {
        let approver = self.caller(&req)?;
        self.gate_read(&approver, AdminAction::Approve).await?;
        let id = req.into_inner().request_id;
        Ok(Response::new(Service::approve(self, &approver, id).await?))
    }

    async fn list_pending(
        &self,
        req: Request<pb::ListPendingRequest>,
    ) -> Result<Response<pb::ListPendingResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadStatus).await?;
        let state = self.state.clone();
        let now_unix = unix_secs(self.state.clock.now());
        let list = blocking(move || approval::list(&state.store, now_unix)).await?;
        Ok(Response::new(pb::ListPendingResponse {
            requests: list
                .into_iter()
                .map(|p| pb::PendingRequest {
                    request_id: p.id,
                    action: p.action.name().to_string(),
                    requested_by: p.requested_by.to_string(),
                    created_at_unix: p.created_at_unix,
                    expires_at_unix: p.expires_at_unix,
                    summary: p.summary,
                })
                .collect(),
        }))
    }

    async fn issue_admin_certificate(
        &self,
        req: Request<pb::IssueAdminCertificateRequest>,
    ) -> Result<Response<pb::IssueAdminCertificateResponse>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        let (id, attrs) = parse_admin_request(&r)?;
        let summary = format!(
            "issue an admin certificate to {id} ({})",
            attrs.to_org_unit()
        );
        let allowed = self
            .gate(&c, AdminAction::IssueAdminCertificate, "", "", &r, summary)
            .await?;
        Ok(Response::new(self.exec_issue_admin(&c, allowed, r).await?))
    }
    async fn put_secret(
        &self,
        req: Request<pb::PutSecretRequest>,
    ) -> Result<Response<pb::SecretVersionInfo>, Status> {
        let c = self.caller(&req)?;
        match self.put_secret_change(&c, req.into_inner()).await? {
            SecretOutcome::Version(v) => Ok(Response::new(v)),
            _ => Err(Error::Internal("unexpected outcome".into()).into()),
        }
    }

    async fn list_secrets(
        &self,
        req: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadStatus).await?;
        let state = self.state.clone();
        let secrets = blocking(move || {
            Ok(state
                .secret_records()?
                .iter()
                .filter(|r| !r.deleted)
                .map(encode::secret_summary)
                .collect())
        })
        .await?;
        Ok(Response::new(pb::ListSecretsResponse { secrets }))
    }

    async fn secret_versions(
        &self,
        req: Request<pb::SecretVersionsRequest>,
    ) -> Result<Response<pb::SecretVersionsResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadStatus).await?;
        let name = req.into_inner().name;
        check_name(&name)?;
        let state = self.state.clone();
        let resp = blocking(move || {
            let rec = state.secret_record(&name)?;
            Ok(encode::secret_versions(&state, &rec))
        })
        .await?;
        Ok(Response::new(resp))
    }

    async fn rollback_secret(
        &self,
        req: Request<pb::RollbackSecretRequest>,
    ) -> Result<Response<pb::SecretVersionsResponse>, Status> {
        self.simple_secret_change(req, "rollback").await
    }

    async fn delete_secret(
        &self,
        req: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let c = self.caller(&req)?;
        let name = req.into_inner().name;
        check_name(&name)?;
        let change = pb::PendingSecretChange {
            op: "delete".into(),
            name: name.clone(),
            ..Default::default()
        };
        match self
            .secret_change(&c, change, format!("delete secret {name}"))
            .await?
        {
            SecretOutcome::Deleted(d) => Ok(Response::new(d)),
            _ => Err(Error::Internal("unexpected outcome".into()).into()),
        }
    }

    async fn rekey_secret(
        &self,
        req: Request<pb::RekeySecretRequest>,
    ) -> Result<Response<pb::SecretVersionsResponse>, Status> {
        self.simple_secret_change(req, "rekey").await
    }

    type RotateSecretStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::RotationProgress, Status>>;

    async fn rotate_secret(
        &self,
        req: Request<pb::RotateSecretRequest>,
    ) -> Result<Response<Self::RotateSecretStream>, Status> {
        let c = self.caller(&req)?;
        let name = req.into_inner().name;
        check_name(&name)?;
        let change = pb::PendingSecretChange {
            op: "rotate".into(),
            name: name.clone(),
            ..Default::default()
        };
        let allowed = self
            .gate(
                &c,
                AdminAction::RotateSecret,
                "",
                &name,
                &change,
                format!("rotate secret {name}"),
            )
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (ptx, mut prx) = tokio::sync::mpsc::channel(16);
        let state = self.state.clone();
        let by = c.id.to_string();
        let approved = allowed
            .approved_by
            .map(|a| a.to_string())
            .unwrap_or_default();
        // The rotation runs to its end even if the caller goes away.
        tokio::spawn(async move {
            let forward = async {
                while let Some(p) = prx.recv().await {
                    let _ = tx.send(Ok(p)).await;
                }
            };
            let (result, ()) = tokio::join!(
                crate::rotation::rotate(&state, &name, &by, &approved, Some(ptx)),
                forward
            );
            if let Err(e) = result {
                let _ = tx.send(Err(Status::from(e))).await;
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    type WatchAlertsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::AlertEvent, Status>>;

    async fn watch_alerts(
        &self,
        req: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadAudit).await?;
        let mut alerts = self.state.alerts.subscribe();
        let mut stopping = self.state.stopping.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let a = tokio::select! {
                    _ = lattice_shared::net::until_true(&mut stopping) => return,
                    _ = tx.closed() => return,
                    a = alerts.recv() => a,
                };
                let msg = match a {
                    Ok(a) => Ok(pb::AlertEvent {
                        rule: a.rule,
                        subject: a.subject,
                        detail: a.detail,
                        at_unix_ms: a.at_unix_ms,
                        cache: a.cache,
                        action: a.action.name().into(),
                        secret: a.secret,
                    }),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        Err(Status::data_loss(format!(
                            "{n} alerts missed (too slow); they are in the audit log (kind alert)"
                        )))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let end = msg.is_err();
                if tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn audit_entries(
        &self,
        req: Request<pb::AuditEntriesRequest>,
    ) -> Result<Response<pb::AuditEntriesResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadAudit).await?;
        let r = req.into_inner();
        let state = self.state.clone();
        let (entries, tree_size) = blocking(move || {
            Ok((
                state.audit_log.entries(r.start, r.limit)?,
                state.audit_log.size(),
            ))
        })
        .await?;
        Ok(Response::new(pb::AuditEntriesResponse {
            entries,
            tree_size,
        }))
    }

    async fn audit_tree_heads(
        &self,
        req: Request<pb::AuditTreeHeadsRequest>,
    ) -> Result<Response<pb::AuditTreeHeadsResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadAudit).await?;
        let r = req.into_inner();
        let limit = if r.limit == 0 {
            crate::audit_log::MAX_PAGE
        } else {
            r.limit
        };
        let state = self.state.clone();
        let (heads, next) = blocking(move || state.audit_log.heads(r.start_size, limit)).await?;
        Ok(Response::new(pb::AuditTreeHeadsResponse {
            heads,
            next_start_size: next.unwrap_or(0),
        }))
    }

    async fn audit_proof(
        &self,
        req: Request<pb::AuditProofRequest>,
    ) -> Result<Response<pb::AuditProofResponse>, Status> {
        let c = self.caller(&req)?;
        self.gate_read(&c, AdminAction::ReadAudit).await?;
        let r = req.into_inner();
        let state = self.state.clone();
        let resp = blocking(move || {
            let log = &state.audit_log;
            let (size, head) = log.head(r.tree_size)?.ok_or_else(|| {
                Error::NotFound(format!("no signed tree head of size {}", r.tree_size))
            })?;
            if r.index >= size {
                return Err(Error::InvalidArgument(format!(
                    "entry {} is not in the tree head of size {size}",
                    r.index
                )));
            }
            let entry = log
                .entries(r.index, 1)?
                .into_iter()
                .next()
                .ok_or_else(|| Error::NotFound(format!("no entry {}", r.index)))?;
            let inclusion = log
                .inclusion(r.index, size)
                .ok_or_else(|| Error::Corrupt("inclusion proof".into()))?;
            let (consistency, first_head) = if r.first_size == 0 {
                (Vec::new(), None)
            } else {
                let (_, first) = log.head(r.first_size)?.ok_or_else(|| {
                    Error::NotFound(format!("no signed tree head of size {}", r.first_size))
                })?;
                if r.first_size > size {
                    return Err(Error::InvalidArgument(
                        "first_size is larger than the tree head's size".into(),
                    ));
                }
                let proof = log
                    .consistency(r.first_size, size)
                    .ok_or_else(|| Error::Corrupt("consistency proof".into()))?;
                (proof, Some(first))
            };
            Ok(pb::AuditProofResponse {
                entry: Some(entry),
                inclusion: inclusion.iter().map(|h| h.to_vec()).collect(),
                head: Some(head),
                consistency: consistency.iter().map(|h| h.to_vec()).collect(),
                first_head,
            })
        })
        .await?;
        Ok(Response::new(resp))
    }

    async fn rotate_kms(
        &self,
        req: Request<pb::RotateKmsRequest>,
    ) -> Result<Response<pb::RotateKmsResponse>, Status> {
        let c = self.caller(&req)?;
        let change = pb::PendingSecretChange {
            op: "kms-rotate".into(),
            ..Default::default()
        };
        match self
            .secret_change(&c, change, "rotate the KEK and rewrap every DEK".into())
            .await?
        {
            SecretOutcome::Kms(k) => Ok(Response::new(k)),
            _ => Err(Error::Internal("unexpected outcome".into()).into()),
        }
    }
}

/// Requests that name only a secret.
trait NamedSecret {
    fn name(&self) -> &str;
}
impl NamedSecret for pb::RollbackSecretRequest {
    fn name(&self) -> &str {
        &self.name
    }
}
impl NamedSecret for pb::RekeySecretRequest {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Service {
    async fn simple_secret_change<T: NamedSecret>(
        &self,
        req: Request<T>,
        op: &str,
    ) -> Result<Response<pb::SecretVersionsResponse>, Status> {
        let c = self.caller(&req)?;
        let name = req.get_ref().name().to_string();
        check_name(&name)?;
        let mut change = pb::PendingSecretChange {
            op: op.into(),
            name: name.clone(),
            ..Default::default()
        };
        let mut summary = format!("{op} secret {name}");
        if op == "rollback" {
            // Pin the version being restored: an approval runs what was asked.
            let state = self.state.clone();
            let n = name.clone();
            let rec = blocking(move || state.secret_record(&n)).await?;
            change.version = rec.previous;
            summary = format!("roll secret {name} back to version {}", rec.previous);
        }
        match self.secret_change(&c, change, summary).await? {
            SecretOutcome::Versions(v) => Ok(Response::new(v)),
            _ => Err(Error::Internal("unexpected outcome".into()).into()),
        }
    }
}
