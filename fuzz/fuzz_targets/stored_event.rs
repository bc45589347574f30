//! A cache's stored event log replayed at start-up from a damaged or
//! hostile data directory.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lattice_regional_cache::fuzzing::load_stored_event(data);
});
