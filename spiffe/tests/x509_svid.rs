#![allow(clippy::unwrap_used)]
//! X509-SVID build and verification, with openssl as an independent checker.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use plinth_spiffe::bundle::Bundle;
use plinth_spiffe::x509::{self, verify_svid, X509Error};
use plinth_spiffe::{
    BundleSet, CaTemplate, Csr, KeyType, PrivateKey, Signer, SpiffeId, SvidRequest, X509Authority,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use time::OffsetDateTime;

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn bundle_of(ca: &X509Authority) -> Bundle {
    let mut b = Bundle::new(ca.trust_domain().clone());
    let root = ca.chain_after_leaf().last().cloned();
    b.add_x509_authority(root.unwrap_or_else(|| ca.cert_der().to_vec()))
        .unwrap();
    b
}

fn svid(ca: &X509Authority, spiffe_id: &SpiffeId, at: OffsetDateTime, ttl: u64) -> Vec<Vec<u8>> {
    let k = key(KeyType::EcP256);
    ca.sign_svid(
        &SvidRequest {
            spiffe_id,
            public_key_spki: k.public_key_spki(),
            ttl: Duration::from_secs(ttl),
            dns_names: &[],
        },
        at,
    )
    .unwrap()
    .chain
}

#[test]
fn t10_root_signed_svid_verifies() {
    let (ca, _) = root_ca("example.org");
    let wid = id("spiffe://example.org/workload");
    let chain = svid(&ca, &wid, now(), 3600);
    assert_eq!(chain.len(), 1, "a root-signed SVID carries only its leaf");
    let v = verify_svid(&chain, &bundle_of(&ca), now()).unwrap();
    assert_eq!(v.spiffe_id, wid);
    assert_eq!(x509::spiffe_id_of(&chain[0]).unwrap(), wid);
}

#[test]
fn t11_intermediate_chain_verifies() {
    let (root, _) = root_ca("example.org");
    let inter_key = key(KeyType::EcP384);
    let tmpl = CaTemplate::new(td("example.org"), now(), Duration::from_secs(7200));
    let inter_der = root
        .sign_ca(&tmpl, inter_key.public_key_spki(), now())
        .unwrap();
    let inter = X509Authority::new(inter_der.clone(), vec![], inter_key).unwrap();
    assert_eq!(inter.chain_after_leaf(), &[inter_der]);
    let chain = svid(&inter, &id("spiffe://example.org/w"), now(), 3600);
    assert_eq!(chain.len(), 2);
    let v = verify_svid(&chain, &bundle_of(&root), now()).unwrap();
    assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/w");
    // Without the intermediate there is no path.
    assert_eq!(
        verify_svid(&chain[..1], &bundle_of(&root), now()),
        Err(X509Error::NoPathToAuthority("example.org".into()))
    );
}

#[test]
fn t12_ttl_is_clamped_to_the_ca() {
    let (ca, _) = root_ca("example.org");
    let k = key(KeyType::EcP256);
    let s = ca
        .sign_svid(
            &SvidRequest {
                spiffe_id: &id("spiffe://example.org/w"),
                public_key_spki: k.public_key_spki(),
                ttl: Duration::from_secs(10 * 86400),
                dns_names: &[],
            },
            now(),
        )
        .unwrap();
    assert_eq!(s.not_after, ca.not_after(), "SVID never outlives its CA");
    assert_eq!(x509::cert_not_after(s.leaf()).unwrap(), ca.not_after());
    // Backdated as SPIRE backdates, and both ends print as SPIRE's CLI prints them.
    let (not_before, not_after) = x509::cert_validity(s.leaf()).unwrap();
    assert_eq!(not_before, now() - x509::BACKDATE);
    assert_eq!(not_after, ca.not_after());
    assert_eq!(
        x509::display_time(not_before),
        "2030-03-17 17:46:30 +0000 UTC"
    );
}

#[test]
fn t12_times_display_in_utc_whatever_their_offset() {
    let two_hours_east = time::UtcOffset::from_hms(2, 0, 0).unwrap();
    assert_eq!(x509::display_time(now()), "2030-03-17 17:46:40 +0000 UTC");
    assert_eq!(
        x509::display_time(now().to_offset(two_hours_east)),
        "2030-03-17 17:46:40 +0000 UTC"
    );
    assert_eq!(
        x509::display_time(OffsetDateTime::UNIX_EPOCH),
        "1970-01-01 00:00:00 +0000 UTC"
    );
}

#[test]
fn t13_validity_window_is_checked() {
    let (ca, _) = root_ca("example.org");
    let chain = svid(&ca, &id("spiffe://example.org/w"), now(), 60);
    let b = bundle_of(&ca);
    assert!(matches!(
        verify_svid(&chain, &b, now() + time::Duration::seconds(61)),
        Err(X509Error::Expired { index: 0, .. })
    ));
    // Backdated by 10 s, but no further.
    assert!(verify_svid(&chain, &b, now() - time::Duration::seconds(9)).is_ok());
    assert!(matches!(
        verify_svid(&chain, &b, now() - time::Duration::seconds(11)),
        Err(X509Error::NotYetValid { index: 0, .. })
    ));
}

#[test]
fn t14_only_the_svids_own_trust_domain_bundle_is_used() {
    let (ca_a, _) = root_ca("a.org");
    let (ca_b, _) = root_ca("b.org");
    let chain = svid(&ca_a, &id("spiffe://a.org/w"), now(), 3600);
    // b.org's bundle holding a.org's root must not make a.org SVIDs valid: the lookup is by the
    // SVID's trust domain, and a.org has no bundle in this set.
    let mut mixed = Bundle::new(ca_b.trust_domain().clone());
    mixed.add_x509_authority(ca_a.cert_der().to_vec()).unwrap();
    let mut set = BundleSet::new();
    set.insert(mixed);
    assert_eq!(
        verify_svid(&chain, &set, now()),
        Err(X509Error::NoBundle("a.org".into()))
    );
    // a.org's bundle holding only an unrelated root: no path.
    let mut wrong = Bundle::new(ca_a.trust_domain().clone());
    wrong.add_x509_authority(ca_b.cert_der().to_vec()).unwrap();
    assert_eq!(
        verify_svid(&chain, &wrong, now()),
        Err(X509Error::NoPathToAuthority("a.org".into()))
    );
}

#[test]
fn t15_ca_refuses_foreign_or_root_ids() {
    let (ca, _) = root_ca("example.org");
    let k = key(KeyType::EcP256);
    for bad in ["spiffe://other.org/w", "spiffe://example.org"] {
        let r = ca.sign_svid(
            &SvidRequest {
                spiffe_id: &id(bad),
                public_key_spki: k.public_key_spki(),
                ttl: Duration::from_secs(60),
                dns_names: &[],
            },
            now(),
        );
        assert!(matches!(r, Err(X509Error::BadSpiffeId(_))), "{bad}: {r:?}");
    }
    let r = ca.sign_svid(
        &SvidRequest {
            spiffe_id: &id("spiffe://example.org/w"),
            public_key_spki: k.public_key_spki(),
            ttl: Duration::from_secs(60),
            dns_names: &["bad name!".to_string()],
        },
        now(),
    );
    assert_eq!(r, Err(X509Error::BadDnsName("bad name!".into())));
    let late = ca.not_after() + time::Duration::seconds(1);
    assert!(matches!(
        ca.sign_svid(
            &SvidRequest {
                spiffe_id: &id("spiffe://example.org/w"),
                public_key_spki: k.public_key_spki(),
                ttl: Duration::from_secs(60),
                dns_names: &[],
            },
            late
        ),
        Err(X509Error::AuthorityExpired(_))
    ));
}

#[test]
fn t16_authority_rejects_a_key_that_is_not_the_certs() {
    let (ca, _) = root_ca("example.org");
    let other = key(KeyType::EcP256);
    assert_eq!(
        X509Authority::new(ca.cert_der().to_vec(), vec![], other).err(),
        Some(X509Error::KeyMismatch)
    );
}

#[test]
fn t17_dates_after_2049_use_generalized_time() {
    let late = OffsetDateTime::from_unix_timestamp(2_600_000_000).unwrap(); // 2052
    let k = key(KeyType::EcP256);
    let der = x509::self_signed_ca(
        &CaTemplate::new(td("example.org"), late, Duration::from_secs(86400)),
        k.clone(),
    )
    .unwrap();
    let ca = X509Authority::new(der, vec![], k).unwrap();
    let chain = svid(&ca, &id("spiffe://example.org/w"), late, 600);
    let v = verify_svid(&chain, &bundle_of(&ca), late).unwrap();
    assert_eq!(v.not_after, late + time::Duration::seconds(600));
}

#[test]
fn t20_csr_names_are_ignored_and_signature_checked() {
    // An attacker's CSR naming the server's ID (CVE-2021-27098): only its key is used.
    let kp = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(
        "spiffe://example.org/spire/server".try_into().unwrap(),
    )];
    let csr_der = p.serialize_request(&kp).unwrap().der().to_vec();
    let csr = Csr::parse(&csr_der).unwrap();
    let (ca, _) = root_ca("example.org");
    let entry_id = id("spiffe://example.org/workload");
    let s = ca
        .sign_svid(
            &SvidRequest {
                spiffe_id: &entry_id,
                public_key_spki: csr.public_key_spki(),
                ttl: Duration::from_secs(60),
                dns_names: &[],
            },
            now(),
        )
        .unwrap();
    assert_eq!(x509::spiffe_id_of(s.leaf()).unwrap(), entry_id);

    // Tampered CSR: signature no longer verifies.
    let mut bad = csr_der.clone();
    let n = bad.len();
    bad[n - 5] ^= 0x01;
    assert!(matches!(Csr::parse(&bad), Err(X509Error::BadCsr(_))));
    assert!(matches!(Csr::parse(b"junk"), Err(X509Error::BadCsr(_))));

    // A CSR made by the crate itself round-trips.
    let k = key(KeyType::EcP256);
    let own = Csr::create(k.clone()).unwrap();
    assert_eq!(
        Csr::parse(&own).unwrap().public_key_spki(),
        k.public_key_spki()
    );
}

/// Builds a leaf with rcgen directly so that it can break SVID rules.
fn crafted_leaf(
    ca_key: &Arc<PrivateKey>,
    ca_der: &[u8],
    edit: impl FnOnce(&mut CertificateParams),
) -> Vec<u8> {
    let ca_kp = KeyPair::try_from(ca_key.to_pkcs8_der()).unwrap();
    let issuer = Issuer::from_ca_cert_der(&ca_der.into(), ca_kp).unwrap();
    let leaf_kp = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.not_before = now() - time::Duration::seconds(60);
    p.not_after = now() + time::Duration::seconds(3600);
    p.subject_alt_names = vec![SanType::URI("spiffe://example.org/w".try_into().unwrap())];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.is_ca = IsCa::ExplicitNoCa;
    edit(&mut p);
    p.signed_by(&leaf_kp, &issuer).unwrap().der().to_vec()
}

#[test]
fn t30_validator_rules_reject_bad_leaves() {
    let (ca, ca_key) = root_ca("example.org");
    let b = bundle_of(&ca);
    type Edit = Box<dyn FnOnce(&mut CertificateParams)>;
    let cases: Vec<(&str, Edit, X509Error)> = vec![
        (
            "cA=true",
            Box::new(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
            X509Error::LeafIsCa,
        ),
        (
            "keyCertSign",
            Box::new(|p| p.key_usages.push(KeyUsagePurpose::KeyCertSign)),
            X509Error::LeafKeyCertSign,
        ),
        (
            "cRLSign",
            Box::new(|p| p.key_usages.push(KeyUsagePurpose::CrlSign)),
            X509Error::LeafCrlSign,
        ),
        (
            "no key usage",
            Box::new(|p| p.key_usages.clear()),
            X509Error::MissingKeyUsage,
        ),
        (
            "no digitalSignature",
            Box::new(|p| p.key_usages = vec![KeyUsagePurpose::KeyAgreement]),
            X509Error::NoDigitalSignature,
        ),
        (
            "two URI SANs",
            Box::new(|p| {
                p.subject_alt_names
                    .push(SanType::URI("spiffe://example.org/x".try_into().unwrap()))
            }),
            X509Error::MultipleUriSans(2),
        ),
        (
            "no URI SAN",
            Box::new(|p| p.subject_alt_names = vec![SanType::DnsName("a.b".try_into().unwrap())]),
            X509Error::NoUriSan,
        ),
        (
            "non-canonical ID",
            Box::new(|p| {
                p.subject_alt_names = vec![SanType::URI(
                    "spiffe://example.org/a/../b".try_into().unwrap(),
                )]
            }),
            X509Error::BadSpiffeId(plinth_spiffe::IdError::DotSegment),
        ),
        (
            "root ID",
            Box::new(|p| {
                p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())]
            }),
            X509Error::BadSpiffeId(plinth_spiffe::IdError::RootIdNotAllowed {
                id: "spiffe://example.org".into(),
            }),
        ),
    ];
    for (name, edit, want) in cases {
        let leaf = crafted_leaf(&ca_key, ca.cert_der(), edit);
        assert_eq!(verify_svid(&[leaf], &b, now()), Err(want), "case {name}");
    }
    // And the unmodified crafted leaf passes, so the failures above are the edits'.
    let ok = crafted_leaf(&ca_key, ca.cert_der(), |_| {});
    assert!(verify_svid(&[ok], &b, now()).is_ok());
}

#[test]
fn t31_garbage_is_an_error_not_a_panic() {
    let (ca, _) = root_ca("example.org");
    let b = bundle_of(&ca);
    let empty: [Vec<u8>; 0] = [];
    assert_eq!(verify_svid(&empty, &b, now()), Err(X509Error::EmptyChain));
    assert!(matches!(
        verify_svid(&[b"\x30\x03\x02\x01\x00".to_vec()], &b, now()),
        Err(X509Error::Parse { index: 0, .. })
    ));
    let mut chain = svid(&ca, &id("spiffe://example.org/w"), now(), 60);
    chain[0].push(0);
    assert!(matches!(
        verify_svid(&chain, &b, now()),
        Err(X509Error::Parse { index: 0, .. })
    ));
    let long: Vec<Vec<u8>> = vec![vec![0u8; 4]; 9];
    assert_eq!(
        verify_svid(&long, &b, now()),
        Err(X509Error::ChainTooLong(9))
    );
    // Tampered signature.
    let mut chain = svid(&ca, &id("spiffe://example.org/w"), now(), 60);
    let n = chain[0].len();
    chain[0][n - 3] ^= 0x55;
    assert!(verify_svid(&chain, &b, now()).is_err());
}

#[test]
fn t32_split_concatenated_der() {
    let (root, _) = root_ca("example.org");
    let inter_key = key(KeyType::EcP256);
    let tmpl = CaTemplate::new(td("example.org"), now(), Duration::from_secs(7200));
    let inter_der = root
        .sign_ca(&tmpl, inter_key.public_key_spki(), now())
        .unwrap();
    let inter = X509Authority::new(inter_der, vec![], inter_key).unwrap();
    let chain = svid(&inter, &id("spiffe://example.org/w"), now(), 60);
    assert_eq!(x509::split_der_concat(&chain.concat()).unwrap(), chain);
    assert!(x509::split_der_concat(&chain.concat()[..10]).is_err());
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl must be installed (see README)");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn t40_openssl_verifies_chain_and_shows_extensions() {
    let wall = OffsetDateTime::now_utc();
    let root_key = key(KeyType::EcP256);
    let root_der = x509::self_signed_ca(
        &CaTemplate::new(td("example.org"), wall, Duration::from_secs(86400)),
        root_key.clone(),
    )
    .unwrap();
    let root = X509Authority::new(root_der.clone(), vec![], root_key).unwrap();
    let inter_key = key(KeyType::EcP256);
    let inter_der = root
        .sign_ca(
            &CaTemplate::new(td("example.org"), wall, Duration::from_secs(7200)),
            inter_key.public_key_spki(),
            wall,
        )
        .unwrap();
    let inter = X509Authority::new(inter_der.clone(), vec![], inter_key).unwrap();
    let leaf_key = key(KeyType::EcP256);
    let s = inter
        .sign_svid(
            &SvidRequest {
                spiffe_id: &id("spiffe://example.org/ns/prod/sa/web"),
                public_key_spki: leaf_key.public_key_spki(),
                ttl: Duration::from_secs(3600),
                dns_names: &["web.example.org".to_string()],
            },
            wall,
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundle_pem = write(
        dir.path(),
        "bundle.pem",
        plinth_spiffe::pem::encode_certs(&[&root_der]),
    );
    let inter_pem = write(
        dir.path(),
        "inter.pem",
        plinth_spiffe::pem::encode_certs(&[&inter_der]),
    );
    let leaf_pem = write(
        dir.path(),
        "leaf.pem",
        plinth_spiffe::pem::encode_certs(&[s.leaf()]),
    );
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        bundle_pem.to_str().unwrap(),
        "-untrusted",
        inter_pem.to_str().unwrap(),
        leaf_pem.to_str().unwrap(),
    ]);
    assert!(ok, "openssl verify failed: {out}");
    assert!(out.contains(": OK"), "{out}");

    let (ok, text) = openssl(&["x509", "-in", leaf_pem.to_str().unwrap(), "-noout", "-text"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("URI:spiffe://example.org/ns/prod/sa/web"),
        "{text}"
    );
    assert!(text.contains("DNS:web.example.org"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("X509v3 Key Usage: critical"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );

    let (ok, text) = openssl(&[
        "x509",
        "-in",
        bundle_pem.to_str().unwrap(),
        "-noout",
        "-text",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("Certificate Sign"), "{text}");
    assert!(text.contains("URI:spiffe://example.org\n"), "{text}");

    // openssl refuses the chain against an unrelated bundle, as we do.
    let (other, _) = root_ca("example.org");
    let other_pem = write(
        dir.path(),
        "other.pem",
        plinth_spiffe::pem::encode_certs(&[other.cert_der()]),
    );
    let (ok, _) = openssl(&[
        "verify",
        "-CAfile",
        other_pem.to_str().unwrap(),
        "-untrusted",
        inter_pem.to_str().unwrap(),
        leaf_pem.to_str().unwrap(),
    ]);
    assert!(!ok);
}

#[test]
fn t41_rsa_ca_signs_and_openssl_agrees() {
    let wall = OffsetDateTime::now_utc();
    let root_key = openssl_rsa_key(2048);
    assert_eq!(root_key.key_type(), KeyType::Rsa2048);
    let root_der = x509::self_signed_ca(
        &CaTemplate::new(td("example.org"), wall, Duration::from_secs(86400)),
        root_key.clone(),
    )
    .unwrap();
    let root = X509Authority::new(root_der.clone(), vec![], root_key).unwrap();
    let leaf_key = key(KeyType::EcP384);
    let s = root
        .sign_svid(
            &SvidRequest {
                spiffe_id: &id("spiffe://example.org/rsa"),
                public_key_spki: leaf_key.public_key_spki(),
                ttl: Duration::from_secs(60),
                dns_names: &[],
            },
            wall,
        )
        .unwrap();
    let mut b = Bundle::new(td("example.org"));
    b.add_x509_authority(root_der.clone()).unwrap();
    verify_svid(&s.chain, &b, wall).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = write(
        dir.path(),
        "ca.pem",
        plinth_spiffe::pem::encode_certs(&[&root_der]),
    );
    let leaf = write(dir.path(), "leaf.pem", s.chain_pem());
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        ca.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
}
