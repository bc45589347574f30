//! PEM text (root certificates, chains, credentials handed to the agent).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(certs) = lattice_shared::pem::parse_certs(data) {
        assert!(!certs.is_empty());
        for der in certs {
            let _ = lattice_shared::pki::inspect(&der);
        }
    }
});
