#![allow(clippy::unwrap_used)]
//! Every key manager and upstream authority runs the shared conformance suite, plus the checks
//! particular to it.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use plinth_spiffe::x509::self_signed_ca;
use plinth_spiffe::{CaTemplate, KeyType, PrivateKey, Signer, TrustDomain, X509Authority};
use plinth_upstream::conformance::{key_manager_suite, upstream_authority_suite};
use plinth_upstream::{
    DiskKeyManager, DiskUpstreamAuthority, KeyManager, KeyManagerError, MemoryKeyManager,
    UpstreamError,
};
use time::OffsetDateTime;

const TYPES: &[KeyType] = &[KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048];

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn t10_memory_key_manager_conforms() {
    key_manager_suite(&MemoryKeyManager::new(), TYPES);
}

#[test]
fn t11_disk_key_manager_conforms() {
    let dir = tempfile::tempdir().unwrap();
    key_manager_suite(
        &DiskKeyManager::open(dir.path().join("keys")).unwrap(),
        TYPES,
    );
}

#[test]
fn t12_disk_keys_survive_restart_with_tight_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let kdir = dir.path().join("keys");
    let spki = {
        let km = DiskKeyManager::open(&kdir).unwrap();
        km.generate_key("x509-CA-A", KeyType::EcP256)
            .unwrap()
            .public_key_spki()
            .to_vec()
    };
    assert_eq!(mode(&kdir), 0o700, "key directory is 0700");
    assert_eq!(
        mode(&kdir.join("x509-CA-A.key.pem")),
        0o600,
        "key file is 0600"
    );
    let km = DiskKeyManager::open(&kdir).unwrap();
    let k = km.get_key("x509-CA-A").unwrap().unwrap();
    assert_eq!(k.public_key_spki(), spki.as_slice());
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(&kdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["x509-CA-A.key.pem".to_string()]);
}

#[test]
fn t13_disk_tightens_loose_permissions_and_reports_corrupt_keys() {
    let dir = tempfile::tempdir().unwrap();
    let kdir = dir.path().join("keys");
    std::fs::create_dir(&kdir).unwrap();
    std::fs::set_permissions(&kdir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let k = PrivateKey::generate(KeyType::EcP256).unwrap();
    let f = kdir.join("loose.key.pem");
    std::fs::write(&f, k.to_pkcs8_pem()).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let km = DiskKeyManager::open(&kdir).unwrap();
    assert!(km.get_key("loose").unwrap().is_some());
    assert_eq!(mode(&kdir), 0o700);
    assert_eq!(mode(&f), 0o600);
    drop(km);
    std::fs::write(
        kdir.join("broken.key.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    match DiskKeyManager::open(&kdir) {
        Err(KeyManagerError::Corrupt { id, .. }) => assert_eq!(id, "broken"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn write_ca(
    dir: &std::path::Path,
    td: &str,
) -> (std::path::PathBuf, std::path::PathBuf, X509Authority) {
    let k = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let der = self_signed_ca(
        &CaTemplate::new(
            TrustDomain::new(td).unwrap(),
            now(),
            Duration::from_secs(86400),
        ),
        k.clone(),
    )
    .unwrap();
    let cert = dir.join(format!("{td}.crt.pem"));
    let key = dir.join(format!("{td}.key.pem"));
    std::fs::write(&cert, plinth_spiffe::pem::encode_certs(&[&der])).unwrap();
    std::fs::write(&key, k.to_pkcs8_pem()).unwrap();
    (cert, key, X509Authority::new(der, vec![], k).unwrap())
}

#[test]
fn t20_disk_upstream_with_self_signed_root_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = write_ca(dir.path(), "upstream.test");
    let ua = DiskUpstreamAuthority::open(&cert, &key, None).unwrap();
    upstream_authority_suite(&ua, now());
}

#[test]
fn t21_disk_upstream_with_intermediate_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let (root_cert, _, root) = write_ca(dir.path(), "root.test");
    let ik = PrivateKey::generate(KeyType::EcP256).unwrap();
    let inter = root
        .sign_ca(
            &CaTemplate::new(
                TrustDomain::new("upstream.test").unwrap(),
                now(),
                Duration::from_secs(7200),
            ),
            ik.public_key_spki(),
            now(),
        )
        .unwrap();
    let cert = dir.path().join("inter.crt.pem");
    let key = dir.path().join("inter.key.pem");
    std::fs::write(&cert, plinth_spiffe::pem::encode_certs(&[&inter])).unwrap();
    std::fs::write(&key, ik.to_pkcs8_pem()).unwrap();
    assert!(matches!(
        DiskUpstreamAuthority::open(&cert, &key, None),
        Err(UpstreamError::Config(_))
    ));
    let ua = DiskUpstreamAuthority::open(&cert, &key, Some(&root_cert)).unwrap();
    upstream_authority_suite(&ua, now());
}

#[test]
fn t22_disk_upstream_refuses_mismatched_key_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, _, _) = write_ca(dir.path(), "a.test");
    let (_, key_b, _) = write_ca(dir.path(), "b.test");
    match DiskUpstreamAuthority::open(&cert_a, &key_b, None) {
        Err(UpstreamError::BadFile { path, reason }) => {
            assert_eq!(path, key_b);
            assert!(reason.contains("does not match"), "{reason}");
        }
        other => panic!("expected BadFile, got {other:?}"),
    }
    assert!(matches!(
        DiskUpstreamAuthority::open(&dir.path().join("nope.pem"), &key_b, None),
        Err(UpstreamError::Read { .. })
    ));
}
