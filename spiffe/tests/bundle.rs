#![allow(clippy::unwrap_used)]
//! SPIFFE bundle (JWK Set) encoding and decoding.

mod common;

use common::*;
use plinth_spiffe::bundle::{Bundle, BundleError, JwtAuthority};
use plinth_spiffe::{KeyType, Signer};
use serde_json::{json, Value};

fn sample() -> Bundle {
    let (ca, _) = root_ca("example.org");
    let jk = key(KeyType::EcP256);
    let rk = openssl_rsa_key(2048);
    let mut b = Bundle::new(td("example.org"));
    b.add_x509_authority(ca.cert_der().to_vec()).unwrap();
    b.add_jwt_authority(JwtAuthority {
        key_id: "ec".into(),
        public_key_spki: jk.public_key_spki().to_vec(),
    })
    .unwrap();
    b.add_jwt_authority(JwtAuthority {
        key_id: "rsa".into(),
        public_key_spki: rk.public_key_spki().to_vec(),
    })
    .unwrap();
    b.set_sequence_number(7);
    b.set_refresh_hint_secs(Some(300));
    b
}

#[test]
fn t10_roundtrip_and_shape() {
    let b = sample();
    let doc = b.to_jwks().unwrap();
    let v: Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(v["spiffe_sequence"], 7);
    assert_eq!(v["spiffe_refresh_hint"], 300);
    let keys = v["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3);
    assert_eq!(keys[0]["use"], "x509-svid");
    assert_eq!(keys[0]["kty"], "EC");
    assert_eq!(keys[0]["x5c"].as_array().unwrap().len(), 1);
    assert!(
        keys[0].get("kid").is_none(),
        "x509 authorities carry no kid"
    );
    assert_eq!(keys[1]["use"], "jwt-svid");
    assert_eq!(keys[1]["kid"], "ec");
    assert_eq!(keys[2]["kty"], "RSA");
    let back = Bundle::from_jwks(td("example.org"), doc.as_bytes()).unwrap();
    assert_eq!(back, b);
}

#[test]
fn t11_unknown_use_and_kty_are_ignored() {
    let mut v: Value = serde_json::from_str(&sample().to_jwks().unwrap()).unwrap();
    let keys = v["keys"].as_array_mut().unwrap();
    keys.push(json!({"use": "something-new", "kty": "EC"}));
    keys.push(json!({"use": "jwt-svid", "kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "AA"}));
    keys.push(json!({"kty": "EC"}));
    let b = Bundle::from_jwks(td("example.org"), v.to_string().as_bytes()).unwrap();
    assert_eq!(b.x509_authorities().len(), 1);
    assert_eq!(b.jwt_authorities().len(), 2);
}

#[test]
fn t12_empty_keys_is_valid_and_missing_keys_is_not() {
    let b = Bundle::from_jwks(td("example.org"), br#"{"keys":[]}"#).unwrap();
    assert!(b.x509_authorities().is_empty());
    assert_eq!(
        Bundle::from_jwks(td("example.org"), br#"{"spiffe_sequence":1}"#),
        Err(BundleError::MissingKeys)
    );
}

#[test]
fn t13_malformed_documents_are_errors() {
    let td = || td("example.org");
    assert!(matches!(
        Bundle::from_jwks(td(), b"not json"),
        Err(BundleError::NotJson(_))
    ));
    assert!(matches!(
        Bundle::from_jwks(td(), b"[]"),
        Err(BundleError::NotJson(_))
    ));
    assert_eq!(
        Bundle::from_jwks(td(), br#"{"keys":[1]}"#),
        Err(BundleError::KeyNotObject { index: 0 })
    );
    assert_eq!(
        Bundle::from_jwks(td(), br#"{"keys":[],"spiffe_sequence":-1}"#),
        Err(BundleError::BadNumber {
            member: "spiffe_sequence"
        })
    );
    let mut v: Value = serde_json::from_str(&sample().to_jwks().unwrap()).unwrap();
    let cert = v["keys"][0]["x5c"][0].clone();
    v["keys"][0]["x5c"] = json!([cert.clone(), cert]);
    assert_eq!(
        Bundle::from_jwks(td(), v.to_string().as_bytes()),
        Err(BundleError::X5cCount { index: 0, found: 2 })
    );
    let mut v: Value = serde_json::from_str(&sample().to_jwks().unwrap()).unwrap();
    v["keys"][0]["x5c"] = json!(["bm90IGEgY2VydA=="]);
    assert!(matches!(
        Bundle::from_jwks(td(), v.to_string().as_bytes()),
        Err(BundleError::BadCertificate { index: 0, .. })
    ));
    let mut v: Value = serde_json::from_str(&sample().to_jwks().unwrap()).unwrap();
    v["keys"][0]["x"] = v["keys"][1]["x"].clone();
    v["keys"][0]["y"] = v["keys"][1]["y"].clone();
    assert_eq!(
        Bundle::from_jwks(td(), v.to_string().as_bytes()),
        Err(BundleError::X5cKeyMismatch { index: 0 })
    );
    let mut v: Value = serde_json::from_str(&sample().to_jwks().unwrap()).unwrap();
    v["keys"][1].as_object_mut().unwrap().remove("kid");
    assert_eq!(
        Bundle::from_jwks(td(), v.to_string().as_bytes()),
        Err(BundleError::MissingKid { index: 1 })
    );
    let mut v: Value = serde_json::from_str(&sample().to_jwks().unwrap()).unwrap();
    v["keys"][2]["kid"] = json!("ec");
    assert_eq!(
        Bundle::from_jwks(td(), v.to_string().as_bytes()),
        Err(BundleError::DuplicateKid { kid: "ec".into() })
    );
    let huge = vec![b' '; plinth_spiffe::bundle::MAX_BUNDLE_LEN + 1];
    assert!(matches!(
        Bundle::from_jwks(td(), &huge),
        Err(BundleError::TooLarge(_))
    ));
}

#[test]
fn t14_pem_output_parses_back() {
    let b = sample();
    let pem = b.x509_pem();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
    let certs = plinth_spiffe::pem::parse_all(&pem, "CERTIFICATE").unwrap();
    assert_eq!(certs, b.x509_authorities());
}

#[test]
fn t15_authority_edits() {
    let mut b = sample();
    let cert = b.x509_authorities()[0].clone();
    assert!(
        !b.add_x509_authority(cert.clone()).unwrap(),
        "duplicate add is a no-op"
    );
    assert!(b.remove_x509_authority(&cert));
    assert!(!b.remove_x509_authority(&cert));
    let other = key(KeyType::EcP256);
    assert_eq!(
        b.add_jwt_authority(JwtAuthority {
            key_id: "ec".into(),
            public_key_spki: other.public_key_spki().to_vec()
        }),
        Err(BundleError::DuplicateKid { kid: "ec".into() })
    );
    assert!(b.remove_jwt_authority("ec"));
    assert!(b.add_x509_authority(b"junk".to_vec()).is_err());
}
