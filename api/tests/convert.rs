//! Workload API messages to plinth-spiffe types: valid ones convert, lies are caught.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use plinth_api::convert::{trust_domain_from_id, x509_bundles, ConvertError, ReceivedX509Svid};
use plinth_api::workload::{JwtBundlesResponse, X509svid};
use plinth_spiffe::{
    Bundle, BundleSet, CaTemplate, JwtAuthority, KeyType, PrivateKey, Signer, SpiffeId,
    SvidRequest, TrustDomain, X509Authority,
};
use time::OffsetDateTime;

fn setup() -> (X509Authority, Vec<u8>) {
    let td = TrustDomain::new("example.org").unwrap();
    let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let now = OffsetDateTime::now_utc();
    let der = plinth_spiffe::x509::self_signed_ca(
        &CaTemplate::new(td, now, Duration::from_secs(3600)),
        key.clone(),
    )
    .unwrap();
    (X509Authority::new(der.clone(), vec![], key).unwrap(), der)
}

fn message(ca: &X509Authority, ca_der: &[u8], id: &str) -> X509svid {
    let spiffe_id = SpiffeId::new(id).unwrap();
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let svid = ca
        .sign_svid(
            &SvidRequest {
                spiffe_id: &spiffe_id,
                public_key_spki: key.public_key_spki(),
                ttl: Duration::from_secs(60),
                dns_names: &[],
            },
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    X509svid {
        spiffe_id: id.into(),
        x509_svid: svid.chain_der_concat(),
        x509_svid_key: key.to_pkcs8_der().to_vec(),
        bundle: ca_der.to_vec(),
        hint: "h".into(),
    }
}

#[test]
fn x509_svid_converts_and_lies_are_caught() {
    let (ca, ca_der) = setup();
    let m = message(&ca, &ca_der, "spiffe://example.org/w");
    let svid = ReceivedX509Svid::try_from(&m).unwrap();
    assert_eq!(svid.spiffe_id.as_str(), "spiffe://example.org/w");
    assert_eq!(svid.chain.len(), 1);
    assert_eq!(svid.bundle, vec![ca_der.clone()]);
    assert_eq!(svid.hint, "h");

    let mut lie = m.clone();
    lie.spiffe_id = "spiffe://example.org/admin".into();
    assert!(matches!(
        ReceivedX509Svid::try_from(&lie),
        Err(ConvertError::IdMismatch { .. })
    ));
    let mut bad_key = m.clone();
    bad_key.x509_svid_key = vec![1, 2, 3];
    assert!(matches!(
        ReceivedX509Svid::try_from(&bad_key),
        Err(ConvertError::PrivateKey(_))
    ));
    let mut empty = m.clone();
    empty.x509_svid.clear();
    assert!(ReceivedX509Svid::try_from(&empty).is_err());
    let mut no_bundle = m;
    no_bundle.bundle.clear();
    assert!(matches!(
        ReceivedX509Svid::try_from(&no_bundle),
        Err(ConvertError::NoCertificates { field: "bundle" })
    ));
}

#[test]
fn bundle_maps_convert_and_keys_must_be_trust_domain_ids() {
    let (_, ca_der) = setup();
    assert_eq!(
        trust_domain_from_id("spiffe://example.org").unwrap().name(),
        "example.org"
    );
    assert!(trust_domain_from_id("spiffe://example.org/path").is_err());
    assert!(trust_domain_from_id("example.org").is_err());

    let mut map = HashMap::new();
    map.insert("spiffe://example.org".to_string(), ca_der.clone());
    let set = x509_bundles(&map).unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    assert_eq!(
        set.get(&td).unwrap().x509_authorities(),
        std::slice::from_ref(&ca_der)
    );
    map.insert("spiffe://other.org/x".to_string(), ca_der);
    assert!(x509_bundles(&map).is_err());

    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let mut b = Bundle::new(td.clone());
    b.add_jwt_authority(JwtAuthority {
        key_id: "k1".into(),
        public_key_spki: key.public_key_spki().to_vec(),
    })
    .unwrap();
    let resp = JwtBundlesResponse {
        bundles: HashMap::from([(
            "spiffe://example.org".to_string(),
            b.to_jwks().unwrap().into_bytes(),
        )]),
    };
    let set = BundleSet::try_from(&resp).unwrap();
    assert_eq!(set.get(&td).unwrap().jwt_authorities()[0].key_id, "k1");
    let bad = JwtBundlesResponse {
        bundles: HashMap::from([("spiffe://example.org".to_string(), b"{}".to_vec())]),
    };
    assert!(matches!(
        BundleSet::try_from(&bad),
        Err(ConvertError::Bundle { .. })
    ));
}
