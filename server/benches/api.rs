//! Server API benchmarks (issue 4), each beside its baseline measured in the same run:
//!
//! 1. X509-SVID issuance through the real gRPC API over mTLS: BatchNewX509Svid with 100 CSRs per
//!    call, server on one tokio worker thread, against the raw ECDSA P-256 sign rate of `ring`
//!    and the raw P-256 verify rate (a CSR's proof of possession costs one verify).
//! 2. Propagation: an entry created through server 1's admin socket until it arrives on an agent's
//!    authorized-entries stream attached to server 2 of a three-server cluster, 1000 entries.
//!
//! Run: `cargo bench -p plinth-server --bench api` (add `-- --entries N` to change item 2).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use plinth_api::server as pb;
use plinth_api::server::agent_service_client::AgentServiceClient;
use plinth_api::server::cluster_service_client::ClusterServiceClient;
use plinth_api::server::entry_service_client::EntryServiceClient;
use plinth_api::server::svid_service_client::SvidServiceClient;
use plinth_server::config::Config;
use plinth_server::run::{start, RunningServer};
use plinth_server::state::Replicated;
use plinth_spiffe::{Csr, KeyType, PrivateKey, SignatureScheme, Signer, SpiffeId};
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};

#[path = "../tests/common/mod.rs"]
mod common;
use common::tls_channel;

fn config(dir: &std::path::Path, node: u64, bootstrap: bool) -> Config {
    common::config(dir, node, bootstrap, common::JOIN_TOKEN)
}

/// Attests an agent through `server` and returns an mTLS channel authenticated as it, plus its ID.
async fn agent_channel(
    admin: &RunningServer,
    server: &RunningServer,
) -> (tonic::transport::Channel, String) {
    let admin_ch = plinth_server::cli::connect(&admin.admin_socket)
        .await
        .unwrap();
    let token = AgentServiceClient::new(admin_ch)
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl: 600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    let td = server.core.cfg.trust_domain.clone();
    let bundle = server
        .core
        .state
        .store()
        .get_bundle(&td)
        .unwrap()
        .unwrap()
        .to_bundle()
        .unwrap();
    let server_id = plinth_server::tls::server_spiffe_id(&td);
    let anon = tls_channel(server.tcp_addr, bundle.clone(), None, server_id.clone())
        .await
        .unwrap();
    let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let req = pb::AttestAgentRequest {
        step: Some(pb::attest_agent_request::Step::Params(
            pb::attest_agent_request::Params {
                data: Some(pb::AttestationData {
                    r#type: "join_token".into(),
                    payload: token.into_bytes(),
                }),
                csr: Csr::create(key.clone()).unwrap(),
            },
        )),
    };
    let msg = AgentServiceClient::new(anon)
        .attest_agent(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let Some(pb::attest_agent_response::Step::Result(r)) = msg.step else {
        panic!("attestation failed")
    };
    let s = r.svid.unwrap();
    let svid = plinth_spiffe::X509Svid {
        spiffe_id: SpiffeId::new(&s.spiffe_id).unwrap(),
        chain: s.cert_chain,
        not_after: time::OffsetDateTime::from_unix_timestamp(s.expires_at).unwrap(),
    };
    let ch = tls_channel(server.tcp_addr, bundle, Some((svid, key)), server_id)
        .await
        .unwrap();
    (ch, s.spiffe_id)
}

fn entry(i: usize, parent: &str) -> pb::Entry {
    pb::Entry {
        spiffe_id: format!("spiffe://example.org/bench/w{i}"),
        parent_id: parent.into(),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: format!("uid:{i}"),
        }],
        ..Default::default()
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn raw_rates(secs: f64) -> (f64, f64) {
    let k = PrivateKey::generate(KeyType::EcP256).unwrap();
    let msg = vec![7u8; 400];
    let sig = k.sign(SignatureScheme::EcdsaP256Sha256, &msg).unwrap();
    let info = plinth_spiffe::key::PublicKeyInfo::from_spki(k.public_key_spki()).unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        std::hint::black_box(k.sign(SignatureScheme::EcdsaP256Sha256, &msg).unwrap());
        n += 1;
    }
    let sign = n as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &info.raw)
            .verify(&msg, &sig)
            .unwrap();
        n += 1;
    }
    (sign, n as f64 / start.elapsed().as_secs_f64())
}

fn main() {
    let entries: usize = std::env::args()
        .skip_while(|a| a != "--entries")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();

    // ---- 1. issuance on a single-node server, server runtime on one worker thread.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let single = server_rt
        .block_on(start(config(&dir.path().join("single"), 1, true)))
        .unwrap();
    let single = Arc::new(single);
    let (ch, agent_id) = {
        let s = single.clone();
        client_rt.block_on(async move { agent_channel(&s, &s).await })
    };
    let admin = client_rt
        .block_on(plinth_server::cli::connect(&single.admin_socket))
        .unwrap();
    let entry_id = client_rt.block_on(async {
        let r = EntryServiceClient::new(admin.clone())
            .batch_create_entry(pb::BatchCreateEntryRequest {
                entries: vec![entry(0, &agent_id)],
            })
            .await
            .unwrap()
            .into_inner();
        r.results[0].entry.clone().unwrap().id
    });
    // CSRs are made before timing: the agent's cost is not the server's.
    let batches = 30usize;
    let csrs: Vec<Vec<u8>> = (0..100)
        .map(|_| Csr::create(Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap())).unwrap())
        .collect();
    let (raw_sign, raw_verify) = raw_rates(2.0);
    let issued = client_rt.block_on(async {
        let mut c = SvidServiceClient::new(ch.clone());
        let req = pb::BatchNewX509SvidRequest {
            params: csrs
                .iter()
                .map(|csr| pb::NewX509SvidParams {
                    entry_id: entry_id.clone(),
                    csr: csr.clone(),
                })
                .collect(),
        };
        // Warm-up.
        c.batch_new_x509_svid(req.clone()).await.unwrap();
        let start = Instant::now();
        let mut n = 0usize;
        for _ in 0..batches {
            let r = c
                .batch_new_x509_svid(req.clone())
                .await
                .unwrap()
                .into_inner();
            n += r.results.iter().filter(|x| x.svid.is_some()).count();
        }
        n as f64 / start.elapsed().as_secs_f64()
    });
    let (raw_sign2, raw_verify2) = raw_rates(2.0);
    let raw_sign = (raw_sign + raw_sign2) / 2.0;
    let raw_verify = (raw_verify + raw_verify2) / 2.0;
    // One CSR verify plus one sign per SVID is the cryptographic floor of this API.
    let floor = 1.0 / (1.0 / raw_sign + 1.0 / raw_verify);
    println!("X509-SVID issuance through the gRPC API (BatchNewX509Svid, 100 CSRs per call, mTLS, server on 1 core)");
    println!("{:<48} {:>12} {:>10}", "operation", "ops/s/core", "vs sign");
    println!(
        "{:<48} {:>12.0} {:>9.1}%",
        "raw ECDSA P-256 sign (ring)", raw_sign, 100.0
    );
    println!(
        "{:<48} {:>12.0} {:>9.1}%",
        "raw ECDSA P-256 verify (ring)",
        raw_verify,
        100.0 * raw_verify / raw_sign
    );
    println!(
        "{:<48} {:>12.0} {:>9.1}%",
        "floor: 1 verify (CSR) + 1 sign per SVID",
        floor,
        100.0 * floor / raw_sign
    );
    println!(
        "{:<48} {:>12.0} {:>9.1}%",
        "BatchNewX509Svid over gRPC",
        issued,
        100.0 * issued / raw_sign
    );
    println!(
        "target: issuance >= 50% of raw sign rate: {} ({:.1}%; {:.1}% of the sign+verify floor)",
        if issued / raw_sign >= 0.5 {
            "met"
        } else {
            "NOT met"
        },
        100.0 * issued / raw_sign,
        100.0 * issued / floor
    );
    drop(ch);
    drop(admin);
    let single = Arc::try_unwrap(single).unwrap();
    server_rt.block_on(single.shutdown()).unwrap();

    // ---- 2. propagation across a three-server cluster.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let base = dir.path().join("cluster");
        let s1 = start(config(&base, 1, true)).await.unwrap();
        let s2 = start(config(&base, 2, false)).await.unwrap();
        let s3 = start(config(&base, 3, false)).await.unwrap();
        let a1 = plinth_server::cli::connect(&s1.admin_socket).await.unwrap();
        for s in [&s2, &s3] {
            ClusterServiceClient::new(a1.clone())
                .add_node(pb::AddNodeRequest {
                    node_id: s.core.state.node_id(),
                    address: s.core.state.node().addr().to_string(),
                    learner_only: false,
                })
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s2.core.ca.is_ready() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (ch2, agent_id) = agent_channel(&s1, &s2).await;
        let mut stream = EntryServiceClient::new(ch2)
            .sync_authorized_entries(pb::SyncAuthorizedEntriesRequest::default())
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert!(first.full);
        let mut admin = EntryServiceClient::new(a1.clone());
        let mut lat = Vec::with_capacity(entries);
        for i in 0..entries {
            let t0 = Instant::now();
            let r = admin
                .batch_create_entry(pb::BatchCreateEntryRequest {
                    entries: vec![entry(i + 1, &agent_id)],
                })
                .await
                .unwrap()
                .into_inner();
            let id = r.results[0].entry.clone().unwrap().id;
            loop {
                let m = stream.message().await.unwrap().unwrap();
                if m.upserted.iter().any(|e| e.id == id) {
                    break;
                }
            }
            lat.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!();
        println!("Propagation: entry created on server 1 -> on an agent stream attached to server 2 (3 servers, loopback, fsync on)");
        println!("{:<14} {:>10} {:>10} {:>10}", "entries", "p50 ms", "p99 ms", "max ms");
        println!(
            "{:<14} {:>10.2} {:>10.2} {:>10.2}",
            entries,
            pct(&lat, 0.50),
            pct(&lat, 0.99),
            lat[lat.len() - 1]
        );
        println!(
            "target: p99 < 100 ms: {} (SPIRE's design bound: 10 s of cache refresh)",
            if pct(&lat, 0.99) < 100.0 { "met" } else { "NOT met" }
        );
        drop(stream);
        drop(admin);
        drop(a1);
        for s in [s3, s2, s1] {
            s.shutdown().await.unwrap();
        }
    });
}
