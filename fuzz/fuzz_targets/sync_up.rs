//! What a cache sends up `Sync`: every `SyncUp` decodes or is refused, and
//! an audit batch's accepted records are stamped with their sender (the
//! control plane's ingest checks its own invariants and panics if one
//! fails).
#![no_main]
use lattice_shared::proto as pb;
use prost::Message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&hwm, rest)) = data.split_first() else {
        return;
    };
    if let Ok(up) = pb::SyncUp::decode(rest)
        && let Some(pb::sync_up::Msg::Audit(batch)) = up.msg
    {
        lattice_control_plane::fuzzing::audit_batch(u64::from(hwm % 8), &batch.encode_to_vec());
    }
});
