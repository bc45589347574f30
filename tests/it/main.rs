//! The integration tests, as modules of one binary so the workspace is linked
//! once (`cargo test --test it`; one module: `cargo test --test it foundation::`).
//! `tests/metrics.rs` stays a binary of its own: the metrics recorder is
//! process-wide, and other modules' lattices would write into it.

mod adversary;
mod agent_runtime;
mod audit;
mod common;
mod config_keys;
mod crash;
mod foundation;
mod policy;
mod processes;
mod recovery;
mod revocation;
mod runbooks;
mod scenario;
mod secrets;
mod verifier;
