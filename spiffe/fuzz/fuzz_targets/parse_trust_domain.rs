//! `cargo +nightly fuzz run parse_trust_domain` (from spiffe/): never panics; accepted names
//! round-trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use plinth_spiffe::TrustDomain;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(td) = TrustDomain::new(s) {
            let name = s.strip_prefix("spiffe://").unwrap_or(s);
            assert_eq!(td.name(), name);
            assert_eq!(TrustDomain::new(&td.id_string()).ok(), Some(td));
        }
    }
});
