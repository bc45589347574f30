//! The `lattice-cache` binary: help, and a bad configuration exits 64 before binding.

include!("../../tests/support/cli_cases.rs");

cli_cases!(
    env!("CARGO_BIN_EXE_lattice-cache"),
    "LATTICE_CACHE_",
    &[] as &[&str]
);
