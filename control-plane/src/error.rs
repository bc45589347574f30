//! The control plane's one error type and **the one** mapping to a gRPC
//! status: every handler returns `Error`; the wire code and message are
//! chosen here, and internals are logged here, never handed to the peer.

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
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("KMS: {0}")]
    Kms(String),
    /// A change parked for a second admin (FAILED_PRECONDITION, with the
    /// request id in the `lattice-approval-id` metadata).
    #[error("{message}")]
    Pending { message: String, request_id: String },
    /// A failure whose message is safe to show the peer as is.
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// The data directory does not hold what its installation record
    /// vouches for (a start-up refusal).
    #[error("{0}")]
    Install(String),
}

impl From<lattice_shared::install::InstallError> for Error {
    fn from(e: lattice_shared::install::InstallError) -> Self {
        Error::Install(e.to_string())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::Denied(m) => Status::permission_denied(m),
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::Pending {
                message,
                request_id,
            } => {
                let mut status = Status::failed_precondition(message);
                if let Ok(v) = request_id.parse() {
                    status.metadata_mut().insert("lattice-approval-id", v);
                }
                status
            }
            Error::Internal(m) => Status::internal(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::Kms(m) => {
                tracing::error!(error = %m, "KMS call failed");
                Status::unavailable("the KMS is unavailable; see control-plane logs")
            }
            Error::Pki(
                e @ (PkiError::BadCsr
                | PkiError::UnsupportedKey
                | PkiError::TooLarge
                | PkiError::BadName(_)
                | PkiError::Scope(_)),
            ) => Status::invalid_argument(e.to_string()),
            Error::Store(StoreError::Stopped) => Status::unavailable(
                "the control-plane's store stopped after a failed fsync: the outcome of this request \
                 is unknown; retry against a restarted control-plane",
            ),
            other => {
                // Internals stay in our logs, not in the peer's hands.
                tracing::error!(error = %other, "control-plane request failed");
                Status::internal("internal error; see control-plane logs")
            }
        }
    }
}
