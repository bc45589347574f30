//! An `EventBatch` from the control plane on `Sync`, applied by a cache:
//! revocations, policy releases and secret events decoded and enforced.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lattice_regional_cache::fuzzing::apply_event_batch(data);
});
