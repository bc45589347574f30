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
/// HTTP/2 PING on every connection, both ends, idle or not: a silently
/// dead TCP flow is found within interval + timeout and closed (a channel
/// then dials a new connection) instead of waiting for the kernel's TCP
/// timeout (minutes).
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Protocol constants: both ends of a link must agree on these, so each is
// defined here once and read by both.

/// How often a cache sends a heartbeat on an idle `WatchRevocations` stream.
pub const WATCH_HEARTBEAT: Duration = Duration::from_secs(1);
/// Heartbeats a follower may miss before it treats the stream as dead.
pub const WATCH_MISSED_HEARTBEATS: u32 = 3;
/// A `WatchRevocations` stream without a message for this long is dead: the
/// follower (edge agent, `shared::verifier`) drops it and reopens it.
pub const WATCH_SILENCE: Duration = WATCH_HEARTBEAT.saturating_mul(WATCH_MISSED_HEARTBEATS);
/// Jtis one `RevokeIssued` carries at most (the cache sends at most this
/// many, the control plane refuses more).
pub const MAX_REVOKE_BATCH: usize = 256;
/// Largest audit record a cache sends up (the control plane refuses larger).
pub const MAX_AUDIT_RECORD_BYTES: usize = 16 * 1024;
/// Request metadata (gRPC) and HTTP header naming a request in the audit
/// log; lowercase, as gRPC metadata keys must be.
pub const REQUEST_ID_HEADER: &str = "x-lattice-request-id";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_stream_is_dead_after_three_missed_heartbeats() {
        assert_eq!(WATCH_SILENCE, 3 * WATCH_HEARTBEAT);
        assert_eq!(WATCH_SILENCE, Duration::from_secs(3));
    }

    #[test]
    fn the_request_id_header_is_a_valid_lowercase_name() {
        let name = http::HeaderName::from_static(REQUEST_ID_HEADER);
        assert_eq!(name.as_str(), REQUEST_ID_HEADER);
        let key: tonic::metadata::MetadataKey<tonic::metadata::Ascii> =
            REQUEST_ID_HEADER.parse().expect("a gRPC metadata key");
        assert_eq!(key.as_str(), REQUEST_ID_HEADER);
    }

    #[test]
    fn one_audit_record_fits_in_one_message() {
        const { assert!(MAX_AUDIT_RECORD_BYTES < MAX_MESSAGE_BYTES) };
        const { assert!(MAX_REVOKE_BATCH > 0) };
    }
}
