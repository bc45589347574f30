//! The cache's one `Error`, its typed refusals, and **the** mapping to a
//! gRPC `Status`: every status a unary handler returns is built here, so a
//! reader sees each code and message the cache can answer with in one place.

use lattice_shared::pki::PkiError;
use lattice_shared::seal::SealError;
use lattice_shared::store::StoreError;
use tonic::Status;

use crate::ops::token::MAX_DELEGATION_DEPTH;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("token signing key: {0}")]
    Token(#[from] lattice_shared::token::TokenError),
    #[error("control plane: {0}")]
    ControlPlane(String),
    #[error("stored identity is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "this cache is not enrolled and has no join token: set LATTICE_CACHE_JOIN_TOKEN (from `lattice join-token create --id ...`)"
    )]
    NeedsJoinToken,

    // What a caller is told (see `From<Error> for Status`).
    /// A request the cache refuses to serve; recorded by `AgentCall::refuse`.
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("{0}")]
    InvalidArgument(String),
    /// Not allowed, and not worth an audit record (wrong role or region,
    /// a revoked join token or caller certificate).
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Exhausted(String),
    /// An internal failure; the message is what the caller may see.
    #[error("{0}")]
    Internal(&'static str),
    /// The control plane refused a join token: its code and message go to
    /// the caller as they are.
    #[error("{message}")]
    Redeem { code: tonic::Code, message: String },
    /// The caller's certificate did not authenticate it
    /// (`lattice_shared::net::authenticated` builds that status).
    #[error("{0}")]
    Peer(Box<Status>),
}

/// Why a request was refused. `AgentCall::refuse` counts, logs and audits
/// each of these once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The audit record of what was asked could not be kept (writes fail,
    /// or the outbox is full): nothing is issued without one.
    #[error("{0}")]
    AuditUnavailable(String),
    /// Freshness older than L (`None`: never fresh).
    #[error(
        "stale: this cache cannot prove it holds every revocation older than {max_staleness_ms} ms (last fresh: {}); retry or use another cache",
        staleness_ms.map(|s| format!("{s} ms ago")).unwrap_or_else(|| "never".into())
    )]
    Stale {
        staleness_ms: Option<u64>,
        max_staleness_ms: u64,
    },
    /// The caller, its certificate or this cache (or its signing key).
    #[error("{0}")]
    Revoked(String),
    /// The policy in force denies it (`version` 0: no release yet).
    #[error("{reason}")]
    Policy { reason: String, version: u64 },
    /// The secret version asked for (or found) has been revoked.
    #[error("{0}")]
    SecretRevoked(String),
    /// `what` is past its grace window as the previous version.
    #[error("{0}: its grace window as the previous version has ended")]
    GraceOver(String),
    #[error("{0} is neither active nor previous")]
    Retired(String),
    #[error(
        "{what} is not held by this cache (unknown, not active, or not distributed to region {region})"
    )]
    Unknown { what: String, region: String },
    #[error("{0}: the envelope held here does not open; see cache logs")]
    Unopenable(String),
    /// Token exchange: the subject token does not verify.
    #[error("subject_token: {0}")]
    InvalidParent(String),
    #[error("the subject token was issued to {holder}, not to the caller {caller}")]
    NotHolder { holder: String, caller: String },
    #[error(
        "the subject token was issued by {issuer}, not this cache ({cache}): exchange a token from this cache"
    )]
    ForeignParent { issuer: String, cache: String },
    /// The parent token (or one it descends from) is revoked.
    #[error("{0}")]
    ParentRevoked(String),
    #[error(
        "scope {scope:?} is not among the parent token's scopes ({parent}): a delegated token can only narrow"
    )]
    Wider { scope: String, parent: String },
    #[error("a delegation chain is at most {MAX_DELEGATION_DEPTH} links long")]
    TooDeep,
}

impl Refused {
    /// The `reason` label of `lattice_cache_refusals_total`, for the
    /// refusals counted there.
    pub(crate) fn counted_as(&self) -> Option<&'static str> {
        match self {
            Refused::Stale { .. } => Some("stale"),
            Refused::Revoked(_) => Some("revoked"),
            Refused::Policy { .. } => Some("policy"),
            _ => None,
        }
    }

    /// The reason the audit record gives, for the refusals recorded there.
    pub(crate) fn audit_reason(&self) -> Option<String> {
        match self {
            Refused::Stale { .. } => Some("stale".into()),
            Refused::Revoked(_) => Some("revoked".into()),
            Refused::Policy { reason, .. } => Some(format!("policy: {reason}")),
            Refused::SecretRevoked(m) => Some(m.clone()),
            Refused::NotHolder { .. } => {
                Some("exchange: subject token issued to another agent".into())
            }
            Refused::ParentRevoked(m) => Some(format!("exchange: {m}")),
            Refused::Wider { .. } => Some("exchange: scope wider than the parent's".into()),
            _ => None,
        }
    }

    /// The `outcome` label of the operation's counter (`None`: not counted
    /// there). Stale and revoked callers count only where the operation says
    /// so (`Outcomes::unserved`).
    pub(crate) fn outcome(&self) -> Option<&'static str> {
        Some(match self {
            Refused::Stale { .. } | Refused::Revoked(_) | Refused::AuditUnavailable(_) => {
                "unavailable"
            }
            Refused::Policy { .. } => "denied",
            Refused::SecretRevoked(_) | Refused::ParentRevoked(_) => "revoked",
            Refused::GraceOver(_) | Refused::Retired(_) => "retired",
            Refused::Unknown { .. } => "unknown",
            Refused::Unopenable(_) => "corrupt",
            Refused::InvalidParent(_) => "invalid_parent",
            Refused::NotHolder { .. } => "not_holder",
            Refused::ForeignParent { .. } => "foreign_parent",
            Refused::Wider { .. } => "wider",
            Refused::TooDeep => "too_deep",
        })
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::Refused(r) => match r {
                Refused::Stale { .. } | Refused::AuditUnavailable(_) => Status::unavailable(msg),
                Refused::Policy { version: 0, .. } => Status::unavailable(
                    "this cache has received no policy release yet; retry or use another cache",
                ),
                Refused::InvalidParent(_) => Status::unauthenticated(msg),
                Refused::ForeignParent { .. } | Refused::GraceOver(_) | Refused::Retired(_) => {
                    Status::failed_precondition(msg)
                }
                Refused::Unknown { .. } => Status::not_found(msg),
                Refused::Unopenable(_) => Status::internal(msg),
                Refused::Revoked(_)
                | Refused::Policy { .. }
                | Refused::SecretRevoked(_)
                | Refused::NotHolder { .. }
                | Refused::ParentRevoked(_)
                | Refused::Wider { .. }
                | Refused::TooDeep => Status::permission_denied(msg),
            },
            Error::InvalidArgument(_) => Status::invalid_argument(msg),
            Error::Denied(_) => Status::permission_denied(msg),
            Error::Unavailable(_) => Status::unavailable(msg),
            Error::Exhausted(_) => Status::resource_exhausted(msg),
            Error::Internal(_) => Status::internal(msg),
            Error::Redeem { code, message } => Status::new(code, message),
            Error::Peer(s) => *s,
            Error::Pki(PkiError::BadCsr | PkiError::UnsupportedKey | PkiError::TooLarge) => {
                Status::invalid_argument(msg)
            }
            Error::Pki(PkiError::Scope(m)) => Status::permission_denied(m),
            Error::Pki(other) => {
                tracing::error!(error = %other, "certificate issuance failed");
                Status::internal("certificate issuance failed; see cache logs")
            }
            Error::Store(StoreError::Stopped) => Status::unavailable(
                "the cache's store stopped after a failed fsync: the outcome of this request \
                 is unknown; retry against a restarted cache",
            ),
            other => {
                tracing::error!(error = %other, "request failed");
                Status::internal("internal error; see cache logs")
            }
        }
    }
}
