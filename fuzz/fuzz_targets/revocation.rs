//! A revocation from protobuf: decoded, applied to a set, and checked
//! against the kinds of subject a verifier asks about.
#![no_main]
use lattice_shared::proto as pb;
use lattice_shared::revocation::{Revocation, RevocationSet};
use prost::Message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(wire) = pb::Revocation::decode(data) else {
        return;
    };
    let Ok(r) = Revocation::try_from(&wire) else {
        return;
    };
    // What is accepted goes back to the wire and means the same.
    let again = pb::Revocation::from(&r);
    let r2 = Revocation::try_from(&again).expect("a revocation round-trips");
    assert_eq!(format!("{r:?}"), format!("{r2:?}"));
    let mut set = RevocationSet::default();
    set.apply(&r);
    let _ = set.is_jti_revoked("j1");
});
