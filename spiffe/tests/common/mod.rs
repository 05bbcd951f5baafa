//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use plinth_spiffe::{CaTemplate, KeyType, PrivateKey, Signer, TrustDomain, X509Authority};
use time::OffsetDateTime;

pub fn now() -> OffsetDateTime {
    // A fixed instant keeps tests independent of the wall clock.
    OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap()
}

pub fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

pub fn key(kt: KeyType) -> Arc<PrivateKey> {
    Arc::new(PrivateKey::generate(kt).unwrap())
}

/// A self-signed root CA for `td` valid for a day from `now()`.
pub fn root_ca(td_name: &str) -> (X509Authority, Arc<PrivateKey>) {
    let k = key(KeyType::EcP256);
    let tmpl = CaTemplate::new(td(td_name), now(), Duration::from_secs(86400));
    let der = plinth_spiffe::x509::self_signed_ca(&tmpl, k.clone()).unwrap();
    (X509Authority::new(der, vec![], k.clone()).unwrap(), k)
}

/// An RSA key made by the openssl CLI (ring cannot generate RSA keys).
pub fn openssl_rsa_key(bits: u32) -> Arc<PrivateKey> {
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt"])
        .arg(format!("rsa_keygen_bits:{bits}"))
        .output()
        .expect("openssl must be installed (see README)");
    assert!(out.status.success(), "openssl genpkey failed");
    // genpkey's PEM output is PKCS#8 ("PRIVATE KEY"); its DER output would be PKCS#1.
    Arc::new(PrivateKey::from_pkcs8_pem(&String::from_utf8(out.stdout).unwrap()).unwrap())
}

pub fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

pub fn spki_of(k: &dyn Signer) -> Vec<u8> {
    k.public_key_spki().to_vec()
}
