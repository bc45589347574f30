//! A stream of `SyncDown` messages (events, pongs with checkpoints,
//! heartbeats, audit acks) as a cache reads them from the control plane.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lattice_regional_cache::fuzzing::sync_down(data);
});
