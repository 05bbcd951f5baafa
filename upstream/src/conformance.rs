//! Conformance suites every [`KeyManager`] and [`UpstreamAuthority`] implementation runs in its
//! tests, so that they all keep the same contract. Failures panic with a message naming the rule.

use std::sync::Arc;
use std::time::Duration;

use plinth_spiffe::x509::{self, verify_svid};
use plinth_spiffe::{
    Bundle, Csr, KeyType, PrivateKey, SignatureScheme, Signer, SpiffeId, TrustDomain,
};
use ring::signature::{self, UnparsedPublicKey};
use time::OffsetDateTime;

use crate::authority::UpstreamAuthority;
use crate::key_manager::KeyManager;

fn verify(signer: &dyn Signer, msg: &[u8], sig: &[u8]) -> bool {
    let Ok(info) = plinth_spiffe::key::PublicKeyInfo::from_spki(signer.public_key_spki()) else {
        return false;
    };
    let alg: &dyn signature::VerificationAlgorithm = match info.key_type {
        KeyType::EcP256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyType::EcP384 => &signature::ECDSA_P384_SHA384_ASN1,
        KeyType::Rsa2048 | KeyType::Rsa4096 => &signature::RSA_PKCS1_2048_8192_SHA256,
    };
    UnparsedPublicKey::new(alg, &info.raw)
        .verify(msg, sig)
        .is_ok()
}

/// Runs the key manager contract against `km`, which must start empty. `key_types` lists the
/// types to exercise (RSA generation is slow in debug builds; include at least one EC type).
pub fn key_manager_suite(km: &dyn KeyManager, key_types: &[KeyType]) {
    match km.get_key("absent") {
        Ok(None) => {}
        other => panic!(
            "{}: get_key of an unknown ID must be Ok(None), got {other:?}",
            km.name()
        ),
    }
    assert!(
        km.generate_key("../escape", KeyType::EcP256).is_err(),
        "{}: key IDs with path separators must be refused",
        km.name()
    );
    for (i, kt) in key_types.iter().enumerate() {
        let id = format!("key-{i}");
        let k = match km.generate_key(&id, *kt) {
            Ok(k) => k,
            Err(e) => panic!("{}: generate {kt}: {e}", km.name()),
        };
        assert_eq!(
            k.key_type(),
            *kt,
            "{}: generated key has the asked type",
            km.name()
        );
        let msg = b"plinth conformance";
        let sig = match k.sign(kt.x509_scheme(), msg) {
            Ok(s) => s,
            Err(e) => panic!("{}: sign with {kt}: {e}", km.name()),
        };
        assert!(
            verify(k.as_ref(), msg, &sig),
            "{}: {kt} signature verifies",
            km.name()
        );
        let got = match km.get_key(&id) {
            Ok(Some(g)) => g,
            other => panic!("{}: get_key after generate: {other:?}", km.name()),
        };
        assert_eq!(
            got.public_key_spki(),
            k.public_key_spki(),
            "{}: get_key returns the generated key",
            km.name()
        );
        assert!(
            k.sign(SignatureScheme::EcdsaP384Sha384, msg).is_err() || *kt == KeyType::EcP384,
            "{}: a key refuses a scheme of another key type",
            km.name()
        );
    }
    // Regenerating under an ID replaces the key.
    let first = key_types.first().copied().unwrap_or(KeyType::EcP256);
    let before = km
        .get_key("key-0")
        .ok()
        .flatten()
        .map(|k| k.public_key_spki().to_vec());
    let after = match km.generate_key("key-0", first) {
        Ok(k) => k.public_key_spki().to_vec(),
        Err(e) => panic!("{}: regenerate: {e}", km.name()),
    };
    assert_ne!(
        before,
        Some(after.clone()),
        "{}: regenerate makes a new key",
        km.name()
    );
    let listed = match km.get_keys() {
        Ok(l) => l,
        Err(e) => panic!("{}: get_keys: {e}", km.name()),
    };
    assert_eq!(
        listed.len(),
        key_types.len().max(1),
        "{}: one key per ID",
        km.name()
    );
    assert_eq!(listed[0].0, "key-0");
    assert_eq!(listed[0].1.public_key_spki(), after.as_slice());
}

/// Runs the upstream authority contract: a minted CA chains to the returned roots, carries the
/// trust domain ID, is a CA, and can sign X509-SVIDs that verify against those roots.
pub fn upstream_authority_suite(ua: &dyn UpstreamAuthority, now: OffsetDateTime) {
    let td = match TrustDomain::new("conformance.test") {
        Ok(td) => td,
        Err(e) => panic!("{e}"),
    };
    let key = match PrivateKey::generate(KeyType::EcP256) {
        Ok(k) => Arc::new(k),
        Err(e) => panic!("{e}"),
    };
    let csr = match Csr::create(key.clone()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert!(
        ua.mint_x509_ca(b"not a csr", &td, Duration::from_secs(3600), now)
            .is_err(),
        "{}: a malformed CSR is refused",
        ua.name()
    );
    let minted = match ua.mint_x509_ca(&csr, &td, Duration::from_secs(3600), now) {
        Ok(m) => m,
        Err(e) => panic!("{}: mint: {e}", ua.name()),
    };
    assert!(
        !minted.upstream_roots.is_empty(),
        "{}: roots returned",
        ua.name()
    );
    let ca_cert = minted.ca_chain[0].clone();
    assert_eq!(
        x509::cert_public_key_spki(&ca_cert).ok().as_deref(),
        Some(key.public_key_spki()),
        "{}: the CA certifies the CSR's key",
        ua.name()
    );
    let not_after = x509::cert_not_after(&ca_cert).unwrap_or(now);
    assert!(
        not_after <= now + time::Duration::seconds(3600),
        "{}: the CA does not outlive the asked TTL",
        ua.name()
    );
    let ca = match x509::X509Authority::new(ca_cert, minted.ca_chain[1..].to_vec(), key) {
        Ok(ca) => ca,
        Err(e) => panic!("{}: minted CA is not usable: {e}", ua.name()),
    };
    assert_eq!(
        ca.trust_domain(),
        &td,
        "{}: CA names the trust domain",
        ua.name()
    );
    let leaf_key = match PrivateKey::generate(KeyType::EcP256) {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    };
    let id = match SpiffeId::new("spiffe://conformance.test/w") {
        Ok(id) => id,
        Err(e) => panic!("{e}"),
    };
    let svid = match ca.sign_svid(
        &x509::SvidRequest {
            spiffe_id: &id,
            public_key_spki: leaf_key.public_key_spki(),
            ttl: Duration::from_secs(60),
            dns_names: &[],
        },
        now,
    ) {
        Ok(s) => s,
        Err(e) => panic!("{}: signing under the minted CA: {e}", ua.name()),
    };
    let mut bundle = Bundle::new(td);
    for r in &minted.upstream_roots {
        if let Err(e) = bundle.add_x509_authority(r.clone()) {
            panic!("{}: root is not a certificate: {e}", ua.name());
        }
    }
    if let Err(e) = verify_svid(&svid.chain, &bundle, now) {
        panic!(
            "{}: SVID under the minted CA does not chain to the roots: {e}",
            ua.name()
        );
    }
}
