//! Benchmark (issue 5 item 9): FetchX509SVID answered from the cache over the Unix socket,
//! workload attestation included (every call is attested: SO_PEERCRED, /proc, unix selectors),
//! with 1 and 64 concurrent clients; prints p50/p99 per call.
//!
//! `cargo run --release -p plinth-agent --example bench_fetch [calls_per_client]`
//!
//! Each client holds its own connection and opens one stream per call, reading its first
//! message (what a client that fetches once does).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use plinth_agent::attest::unix::UnixAttestor;
use plinth_agent::cache::{Entry, Identity, IdentityCache};
use plinth_agent::client::connect;
use plinth_agent::endpoint;
use plinth_agent::jwt::{JwtSvidCache, LocalJwtSource, SystemClock};
use plinth_agent::workload_api::WorkloadApi;
use plinth_api::workload::X509svidRequest;
use plinth_spiffe::{
    Bundle, CaTemplate, KeyType, PrivateKey, Selectors, Signer, SpiffeId, SvidRequest, TrustDomain,
    X509Authority,
};
use time::OffsetDateTime;

fn uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn run(socket: &std::path::Path, clients: usize, calls: usize) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let socket = socket.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&socket).unwrap();
            // Warm the connection up.
            client
                .fetch_x509svid(X509svidRequest {})
                .await
                .unwrap()
                .into_inner()
                .message()
                .await
                .unwrap();
            let mut lat = Vec::with_capacity(calls);
            for _ in 0..calls {
                let t = Instant::now();
                let m = client
                    .fetch_x509svid(X509svidRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .message()
                    .await
                    .unwrap()
                    .unwrap();
                lat.push(t.elapsed());
                assert_eq!(m.svids.len(), 1);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let td = TrustDomain::new("example.org").unwrap();
    let now = OffsetDateTime::now_utc();
    let ca_key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let der = plinth_spiffe::x509::self_signed_ca(
        &CaTemplate::new(td.clone(), now, Duration::from_secs(86400)),
        ca_key.clone(),
    )
    .unwrap();
    let ca = X509Authority::new(der.clone(), vec![], ca_key.clone()).unwrap();
    let mut bundle = Bundle::new(td);
    bundle.add_x509_authority(der).unwrap();
    let cache = Arc::new(IdentityCache::new(bundle));
    let id = SpiffeId::new("spiffe://example.org/bench").unwrap();
    let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let svid = ca
        .sign_svid(
            &SvidRequest {
                spiffe_id: &id,
                public_key_spki: key.public_key_spki(),
                ttl: Duration::from_secs(3600),
                dns_names: &[],
            },
            now,
        )
        .unwrap();
    cache
        .put_identity(Identity {
            entry: Entry {
                id: "bench".into(),
                spiffe_id: id,
                selectors: Selectors::parse_all(&[format!("unix:uid:{}", uid())]).unwrap(),
                federates_with: vec![],
                hint: String::new(),
            },
            svid,
            private_key: key,
        })
        .unwrap();
    let clock = Arc::new(SystemClock);
    let jwt = Arc::new(JwtSvidCache::new(
        Arc::new(LocalJwtSource::new(
            ca_key,
            "k",
            Duration::from_secs(300),
            clock.clone(),
        )),
        clock.clone(),
    ));
    let api = WorkloadApi::new(cache, jwt, vec![Arc::new(UnixAttestor::default())], clock);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("public/api.sock");
    let listener = endpoint::bind(&socket).unwrap();
    tokio::spawn(endpoint::serve(listener, api, std::future::pending()));

    println!("| clients | calls | p50 | p99 | calls/s |");
    println!("|---:|---:|---:|---:|---:|");
    for clients in [1usize, 64] {
        let per = (calls / clients).max(50);
        let t = Instant::now();
        let lat = run(&socket, clients, per).await;
        let rate = lat.len() as f64 / t.elapsed().as_secs_f64();
        println!(
            "| {clients} | {} | {:.0} µs | {:.0} µs | {rate:.0} |",
            lat.len(),
            percentile(&lat, 0.5).as_secs_f64() * 1e6,
            percentile(&lat, 0.99).as_secs_f64() * 1e6,
        );
    }
}
