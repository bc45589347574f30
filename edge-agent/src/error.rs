//! The agent's one error type, and the one mapping from it to the gRPC
//! status a local process sees on the Workload API.

use lattice_shared::pki::PkiError;
use lattice_shared::seal::SealError;
use lattice_shared::store::StoreError;
use tonic::Status;

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
    #[error("cache refused: {message} ({code:?})")]
    Refused { code: tonic::Code, message: String },
    #[error("cache unreachable: {0}")]
    Transport(String),
    #[error("stored identity is corrupt: {0}")]
    Corrupt(String),
    #[error("this agent has been revoked; enrol again with a new join token")]
    Revoked,
    #[error(
        "this agent is not enrolled and has no join token: set LATTICE_AGENT_JOIN_TOKEN (from `lattice join-token create --id ...`)"
    )]
    NeedsJoinToken,
    /// A Workload API connection without the kernel's peer credentials.
    #[error("no peer credentials on this connection")]
    NoPeerCredentials,
    /// A local request the agent will not even look at.
    #[error("{0}")]
    InvalidArgument(String),
    /// A local caller not allowed what it asked (`workload.allow`, a token
    /// it does not hold).
    #[error("{0}")]
    Denied(String),
    /// The agent is stopping: open watches end.
    #[error("the agent is stopping")]
    Stopping,
    /// A watcher read the agent's events too slowly and missed some.
    #[error("fell behind the agent's events; watch again")]
    FellBehind,
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Refused {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

/// What a local process sees: the cache's own refusal as it came, the
/// agent's refusals with their code, and internals only in the agent's log.
impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::Refused { code, message } => Status::new(code, message),
            Error::Revoked | Error::Denied(_) => Status::permission_denied(e.to_string()),
            Error::Transport(m) => Status::unavailable(format!("no cache reachable: {m}")),
            Error::NoPeerCredentials => Status::unauthenticated(e.to_string()),
            Error::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
            Error::Stopping => Status::unavailable(e.to_string()),
            Error::FellBehind => Status::aborted(e.to_string()),
            other => {
                tracing::warn!(error = %other, "workload request failed");
                Status::internal("the agent could not serve this request; see its logs")
            }
        }
    }
}
