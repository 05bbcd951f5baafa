//! Signing throughput, one core: the raw ECDSA P-256 sign rate of `ring` beside the X509-SVID
//! build+sign rate and the ES256 JWT-SVID mint rate, measured in the same run.
//!
//! Run: `cargo bench -p plinth-spiffe --bench signing` (add `-- --secs N` for longer runs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plinth_spiffe::x509::self_signed_ca;
use plinth_spiffe::{
    jwt, CaTemplate, JwtSvidParams, KeyType, PrivateKey, SignatureScheme, Signer, SpiffeId,
    SvidRequest, TrustDomain, X509Authority,
};
use time::OffsetDateTime;

/// Runs each closure in turn for `slice` at a time until each has had `secs` seconds in all,
/// so that load from other processes falls on every row alike. Returns ops/s per closure.
fn rates(secs: f64, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    let slice = Duration::from_millis(100);
    for f in fs.iter_mut() {
        let warm = Instant::now();
        while warm.elapsed() < slice {
            f();
        }
    }
    let mut ops = vec![0u64; fs.len()];
    let mut spent = vec![0f64; fs.len()];
    while spent[0] < secs {
        for (i, f) in fs.iter_mut().enumerate() {
            let start = Instant::now();
            while start.elapsed() < slice {
                for _ in 0..16 {
                    f();
                }
                ops[i] += 16;
            }
            spent[i] += start.elapsed().as_secs_f64();
        }
    }
    ops.iter().zip(&spent).map(|(n, s)| *n as f64 / s).collect()
}

fn main() {
    let secs = std::env::args()
        .skip_while(|a| a != "--secs")
        .nth(1)
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    let now = OffsetDateTime::now_utc();
    let td = TrustDomain::new("example.org").unwrap();
    let ca_key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let ca_der = self_signed_ca(
        &CaTemplate::new(td.clone(), now, Duration::from_secs(86400)),
        ca_key.clone(),
    )
    .unwrap();
    let ca = X509Authority::new(ca_der, vec![], ca_key.clone()).unwrap();
    let leaf_key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let id = SpiffeId::new("spiffe://example.org/ns/prod/sa/web").unwrap();

    // The raw rate signs a message the size of a typical SVID's TBSCertificate.
    let probe = ca
        .sign_svid(
            &SvidRequest {
                spiffe_id: &id,
                public_key_spki: leaf_key.public_key_spki(),
                ttl: Duration::from_secs(3600),
                dns_names: &[],
            },
            now,
        )
        .unwrap();
    let msg = vec![0x5au8; probe.leaf().len().saturating_sub(80)];

    let mut raw_op = || {
        black_box(
            ca_key
                .sign(SignatureScheme::EcdsaP256Sha256, black_box(&msg))
                .unwrap(),
        );
    };
    let mut x509_op = || {
        black_box(
            ca.sign_svid(
                &SvidRequest {
                    spiffe_id: &id,
                    public_key_spki: leaf_key.public_key_spki(),
                    ttl: Duration::from_secs(3600),
                    dns_names: &[],
                },
                now,
            )
            .unwrap(),
        );
    };
    let aud = vec!["spiffe://example.org/db".to_string()];
    let mut jwt_op = || {
        black_box(
            jwt::mint(
                ca_key.as_ref(),
                &JwtSvidParams {
                    subject: &id,
                    audience: &aud,
                    ttl: Duration::from_secs(300),
                    key_id: "kid",
                    alg: None,
                },
                now,
            )
            .unwrap(),
        );
    };
    let r = rates(secs, &mut [&mut raw_op, &mut x509_op, &mut jwt_op]);
    let (raw, x509, jwt_rate) = (r[0], r[1], r[2]);

    println!("plinth-spiffe signing benchmark (1 thread, {secs} s per row, rows interleaved, message {} bytes)", msg.len());
    println!("{:<42} {:>12} {:>10}", "operation", "ops/s/core", "vs raw");
    println!(
        "{:<42} {:>12.0} {:>9.1}%",
        "raw ECDSA P-256 sign (ring)", raw, 100.0
    );
    println!(
        "{:<42} {:>12.0} {:>9.1}%",
        "X509-SVID build + sign (plinth + ring)",
        x509,
        100.0 * x509 / raw
    );
    println!(
        "{:<42} {:>12.0} {:>9.1}%",
        "JWT-SVID ES256 mint",
        jwt_rate,
        100.0 * jwt_rate / raw
    );
    let ok = x509 / raw >= 0.80;
    println!(
        "target: X509-SVID >= 80% of raw sign rate: {} ({:.1}%)",
        if ok { "met" } else { "NOT met" },
        100.0 * x509 / raw
    );
}
