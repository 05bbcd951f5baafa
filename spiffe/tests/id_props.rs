#![allow(clippy::unwrap_used)]
//! Property tests: every valid ID round-trips exactly; every class of invalid input is rejected.

use plinth_spiffe::{IdError, SpiffeId, TrustDomain};
use proptest::prelude::*;

fn td_name() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,40}"
}

fn segment() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,20}".prop_filter("no dot segments", |s| s != "." && s != "..")
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 0..6)
        .prop_map(|segs| segs.iter().map(|s| format!("/{s}")).collect::<String>())
}

proptest! {
    #[test]
    fn valid_ids_round_trip(td in td_name(), p in path()) {
        let s = format!("spiffe://{td}{p}");
        let id = SpiffeId::new(&s).unwrap();
        prop_assert_eq!(id.to_string(), s.clone());
        prop_assert_eq!(id.trust_domain_name(), td.as_str());
        prop_assert_eq!(id.path(), p.as_str());
        prop_assert_eq!(SpiffeId::new(id.as_str()).unwrap(), id);
        prop_assert_eq!(TrustDomain::new(&td).unwrap().to_string(), td);
    }

    #[test]
    fn uppercase_trust_domain_rejected(td in "[a-z0-9]{0,10}[A-Z][a-z0-9]{0,10}", p in path()) {
        let r = SpiffeId::new(&format!("spiffe://{td}{p}"));
        let is_bad_td_char = matches!(r, Err(IdError::BadTrustDomainChar { .. }));
        prop_assert!(is_bad_td_char);
    }

    #[test]
    fn dot_segments_rejected(td in td_name(), a in path(), dots in "\\.{1,2}", b in path()) {
        let r = SpiffeId::new(&format!("spiffe://{td}{a}/{dots}{b}"));
        prop_assert_eq!(r, Err(IdError::DotSegment));
    }

    #[test]
    fn empty_segments_rejected(td in td_name(), a in path(), b in path().prop_filter("nonempty", |p| !p.is_empty())) {
        let r = SpiffeId::new(&format!("spiffe://{td}{a}/{b}"));
        prop_assert_eq!(r, Err(IdError::EmptySegment));
    }

    #[test]
    fn trailing_slash_rejected(td in td_name(), p in path()) {
        let r = SpiffeId::new(&format!("spiffe://{td}{p}/"));
        prop_assert_eq!(r, Err(IdError::TrailingSlash));
    }

    #[test]
    fn percent_encoding_rejected(td in td_name(), p in path(), hex in "[0-9a-fA-F]{2}") {
        let r = SpiffeId::new(&format!("spiffe://{td}{p}/%{hex}"));
        let is_bad_path_char = matches!(r, Err(IdError::BadPathChar { found: '%', .. }));
        prop_assert!(is_bad_path_char);
    }

    #[test]
    fn query_fragment_port_userinfo_rejected(td in td_name(), p in path(), which in 0..4usize) {
        let s = match which {
            0 => format!("spiffe://{td}{p}?q=1"),
            1 => format!("spiffe://{td}{p}#f"),
            2 => format!("spiffe://{td}:443{p}"),
            _ => format!("spiffe://user@{td}{p}"),
        };
        prop_assert!(SpiffeId::new(&s).is_err());
    }

    #[test]
    fn wrong_scheme_rejected(scheme in "[a-zA-Z]{1,8}", td in td_name(), p in path()) {
        prop_assume!(scheme != "spiffe");
        let r = SpiffeId::new(&format!("{scheme}://{td}{p}"));
        prop_assert_eq!(r, Err(IdError::WrongScheme));
    }

    #[test]
    fn arbitrary_input_never_panics_and_accepted_input_round_trips(s in "\\PC{0,80}") {
        if let Ok(id) = SpiffeId::new(&s) {
            prop_assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn over_long_ids_rejected(td in td_name(), extra in 1usize..100) {
        let prefix = format!("spiffe://{td}/");
        let s = format!("{prefix}{}", "a".repeat(plinth_spiffe::id::MAX_SPIFFE_ID_LEN - prefix.len() + extra));
        let is_too_long = matches!(SpiffeId::new(&s), Err(IdError::TooLong { .. }));
        prop_assert!(is_too_long);
    }
}
