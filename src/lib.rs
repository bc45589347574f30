//! The `lattice` operator crate: the in-process lattice harness (used by
//! `lattice dev`, the integration tests and the benchmarks), the admin client
//! and the load commands.

pub mod admin;
pub mod bench;
pub mod dev;
pub mod faults;
pub mod harness;
