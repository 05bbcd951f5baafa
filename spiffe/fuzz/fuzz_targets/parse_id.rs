//! `cargo +nightly fuzz run parse_id` (from spiffe/): parsing never panics, and whatever parses
//! prints back byte for byte and re-parses to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use plinth_spiffe::SpiffeId;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(id) = SpiffeId::new(s) {
            assert_eq!(id.to_string(), s);
            assert_eq!(SpiffeId::new(id.as_str()).ok(), Some(id.clone()));
            assert_eq!(id.trust_domain().id_with_path(id.path()).ok(), Some(id));
        }
    }
});
