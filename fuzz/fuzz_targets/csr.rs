//! A certificate signing request from an agent or a cache: checked, its
//! requested names read, and, when accepted, issued by a real authority.
#![no_main]
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use lattice_shared::id::{SpiffeId, TrustDomain};
use lattice_shared::pki::{self, Authority, PrivateKey, Profile};

static ROOT: LazyLock<Authority> = LazyLock::new(|| {
    let td = TrustDomain::new("fuzz.test").expect("trust domain");
    let key = PrivateKey::generate_p256().expect("key");
    Authority::new_root(&td, key, SystemTime::now(), Duration::from_secs(3600)).expect("root")
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = pki::inspect(data);
    let _ = pki::host_names(data);
    let _ = pki::requested_host_names(data);
    if pki::check_csr(data).is_ok() {
        let id = SpiffeId::parse("spiffe://fuzz.test/cache/eu/c1").expect("id");
        let cert = ROOT
            .issue(
                data,
                &id,
                Profile::TlsServerClient,
                SystemTime::now(),
                Duration::from_secs(60),
            )
            .expect("an accepted CSR is issued");
        let info = pki::inspect(&cert).expect("an issued certificate reads back");
        assert_eq!(info.id.as_ref(), Some(&id));
    }
});
