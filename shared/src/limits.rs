//! Limits on everything a peer can influence: sizes, counts, durations.

use std::time::Duration;

/// Largest decoded gRPC message a server accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest policy bundle (all files together), and largest Admin request
/// (a policy bundle and its envelope).
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;
pub const MAX_ADMIN_MESSAGE_BYTES: usize = MAX_BUNDLE_BYTES + 64 * 1024;
/// Largest event batch the control plane sends (at least one event is sent
/// whatever its size), and the largest sync message a cache accepts.
pub const MAX_SYNC_BATCH_BYTES: usize = 2 * 1024 * 1024;
pub const MAX_SYNC_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Outstanding admin requests waiting for a second admin, and their life.
pub const MAX_PENDING_APPROVALS: usize = 1000;
/// Largest join token accepted.
pub const MAX_JOIN_TOKEN_LEN: usize = 128;
/// Audience length and count of scopes in a token request.
pub const MAX_AUDIENCE_LEN: usize = 256;
pub const MAX_SCOPES: usize = 16;
pub const MAX_SCOPE_LEN: usize = 128;
/// Largest echo payload of `Ping`.
pub const MAX_PING_PAYLOAD: usize = 4096;

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const RPC_TIMEOUT: Duration = Duration::from_secs(15);
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections without a client certificate (enrolment, JWKS), and their life.
pub const MAX_ANONYMOUS_CONNECTIONS: usize = 256;
pub const ANONYMOUS_MAX_AGE: Duration = Duration::from_secs(30);
pub const ACCEPT_QUEUE: usize = 128;
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
