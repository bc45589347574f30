//! A policy bundle from protobuf (as pushed by an admin and carried in a
//! release to every cache): read and compiled.
#![no_main]
use lattice_shared::policy::{BundleFiles, Engine};
use lattice_shared::proto as pb;
use prost::Message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(wire) = pb::PolicyBundleFiles::decode(data) else {
        return;
    };
    let Ok(files) = BundleFiles::from_proto(&wire) else {
        return;
    };
    let _ = Engine::compile(&files, 1);
});
