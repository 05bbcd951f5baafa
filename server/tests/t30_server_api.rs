#![allow(clippy::unwrap_used)]
//! A real single-node server (Raft on RocksDB, admin socket) driven through its gRPC API, with the
//! attacks of reliability.md that reach the server: each is refused with a clear error and
//! changes nothing.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use plinth_api::server as pb;
use plinth_api::server::agent_service_client::AgentServiceClient;
use plinth_api::server::entry_service_client::EntryServiceClient;
use plinth_api::server::entry_service_server::EntryService;
use plinth_api::server::svid_service_server::SvidService;
use plinth_server::api::{PeerSvid, Services};
use plinth_server::config::Config;
use plinth_server::run::{start, RunningServer};
use plinth_server::state::Replicated;
use plinth_spiffe::{x509, Csr, KeyType, PrivateKey, SpiffeId};
use tonic::{Code, Request};

struct Harness {
    dir: tempfile::TempDir,
    server: RunningServer,
}

fn config(dir: &std::path::Path) -> Config {
    let text = format!(
        r#"
[server]
trust_domain = "example.org"
data_dir = "{d}/data"
socket_path = "{d}/admin/api.sock"
bind_port = 0

[cluster]
node_id = 1
bind_address = "127.0.0.1:0"
insecure_plaintext = true
election_timeout_min_ms = 150
election_timeout_max_ms = 300
heartbeat_interval_ms = 50

[key_manager]
type = "disk"
keys_path = "{d}/keys"

[node_attestor.join_token]
"#,
        d = dir.display()
    );
    Config::parse(&text, false).unwrap()
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await.unwrap();
    Harness { dir, server }
}

async fn admin_channel(h: &Harness) -> tonic::transport::Channel {
    plinth_server::cli::connect(&h.server.admin_socket)
        .await
        .unwrap()
}

fn entry(spiffe_id: &str, parent: &str, selector: (&str, &str)) -> pb::Entry {
    pb::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent.into(),
        selectors: vec![pb::Selector {
            r#type: selector.0.into(),
            value: selector.1.into(),
        }],
        ..Default::default()
    }
}

async fn create(ch: &tonic::transport::Channel, e: pb::Entry) -> Result<pb::Entry, (i32, String)> {
    let r = EntryServiceClient::new(ch.clone())
        .batch_create_entry(pb::BatchCreateEntryRequest { entries: vec![e] })
        .await
        .unwrap()
        .into_inner();
    let res = r.results.into_iter().next().unwrap();
    let st = res.status.unwrap();
    if st.code == 0 {
        Ok(res.entry.unwrap())
    } else {
        Err((st.code, st.message))
    }
}

async fn count(ch: &tonic::transport::Channel) -> i32 {
    EntryServiceClient::new(ch.clone())
        .count_entries(pb::CountEntriesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .count
}

/// Attests an agent with a join token over the real gRPC stream; returns its SVID and key.
async fn attest(
    ch: &tonic::transport::Channel,
    token: &str,
) -> Result<(pb::X509Svid, Arc<PrivateKey>), tonic::Status> {
    let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let csr = Csr::create(key.clone()).unwrap();
    let req = pb::AttestAgentRequest {
        step: Some(pb::attest_agent_request::Step::Params(
            pb::attest_agent_request::Params {
                data: Some(pb::AttestationData {
                    r#type: "join_token".into(),
                    payload: token.as_bytes().to_vec(),
                }),
                csr,
            },
        )),
    };
    let mut stream = AgentServiceClient::new(ch.clone())
        .attest_agent(tokio_stream::iter(vec![req]))
        .await?
        .into_inner();
    let msg = stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::internal("stream ended"))?;
    match msg.step {
        Some(pb::attest_agent_response::Step::Result(r)) => Ok((r.svid.unwrap(), key)),
        other => Err(tonic::Status::internal(format!("unexpected {other:?}"))),
    }
}

async fn token(ch: &tonic::transport::Channel) -> String {
    AgentServiceClient::new(ch.clone())
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl: 600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .value
}

fn as_peer<T>(msg: T, svid: &pb::X509Svid) -> Request<T> {
    let mut r = Request::new(msg);
    r.extensions_mut().insert(PeerSvid {
        spiffe_id: SpiffeId::new(&svid.spiffe_id).unwrap(),
        serial: hex::encode(serial_of(&svid.cert_chain[0])),
    });
    r
}

fn serial_of(der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::FromDer;
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    c.raw_serial().to_vec()
}

fn csr_naming(id: &str) -> Vec<u8> {
    // An attacker's CSR that names an identity in its SAN.
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    p.serialize_request(&kp).unwrap().der().to_vec()
}

#[tokio::test]
async fn t10_entries_tokens_attestation_and_svids() {
    let h = harness().await;
    let ch = admin_channel(&h).await;
    let t = token(&ch).await;
    let (agent_svid, _) = attest(&ch, &t).await.unwrap();
    let agent_id = format!("spiffe://example.org/spire/agent/join_token/{t}");
    assert_eq!(agent_svid.spiffe_id, agent_id);
    let e = create(
        &ch,
        entry("spiffe://example.org/web", &agent_id, ("unix", "uid:1000")),
    )
    .await
    .unwrap();
    let services = Services::new(h.server.core.clone());
    let r = services
        .svid()
        .batch_new_x509_svid(as_peer(
            pb::BatchNewX509SvidRequest {
                params: vec![pb::NewX509SvidParams {
                    entry_id: e.id.clone(),
                    csr: csr_naming("spiffe://example.org/spire/server"),
                }],
            },
            &agent_svid,
        ))
        .await
        .unwrap()
        .into_inner();
    let svid = r.results[0].svid.clone().unwrap();
    // Attack 1 (CVE-2021-27098): the ID comes from the entry, not the CSR.
    assert_eq!(svid.spiffe_id, "spiffe://example.org/web");
    assert_eq!(
        x509::spiffe_id_of(&svid.cert_chain[0]).unwrap().as_str(),
        "spiffe://example.org/web"
    );
    // The SVID verifies against the served bundle.
    let bundle = h
        .server
        .core
        .state
        .store()
        .get_bundle(&h.server.core.cfg.trust_domain)
        .unwrap()
        .unwrap()
        .to_bundle()
        .unwrap();
    x509::verify_svid(&svid.cert_chain, &bundle, time::OffsetDateTime::now_utc()).unwrap();
    drop(h.dir);
}

#[tokio::test]
async fn t20_attack1_unauthorized_entry_is_refused() {
    let h = harness().await;
    let ch = admin_channel(&h).await;
    let (a1, _) = attest(&ch, &token(&ch).await).await.unwrap();
    let (a2, _) = attest(&ch, &token(&ch).await).await.unwrap();
    let e2 = create(
        &ch,
        entry("spiffe://example.org/db", &a2.spiffe_id, ("unix", "uid:5")),
    )
    .await
    .unwrap();
    let services = Services::new(h.server.core.clone());
    let r = services
        .svid()
        .batch_new_x509_svid(as_peer(
            pb::BatchNewX509SvidRequest {
                params: vec![pb::NewX509SvidParams {
                    entry_id: e2.id.clone(),
                    csr: csr_naming("spiffe://example.org/db"),
                }],
            },
            &a1,
        ))
        .await
        .unwrap()
        .into_inner();
    let st = r.results[0].status.clone().unwrap();
    assert_eq!(st.code, Code::PermissionDenied as i32);
    assert!(st.message.contains("not authorized"), "{}", st.message);
    assert!(r.results[0].svid.is_none());
    // JWT too.
    let e = services
        .svid()
        .new_jwt_svid(as_peer(
            pb::NewJwtSvidRequest {
                entry_id: e2.id,
                audience: vec!["x".into()],
            },
            &a1,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn t21_attack2_non_canonical_ids_are_rejected_not_normalised() {
    let h = harness().await;
    let ch = admin_channel(&h).await;
    let before = count(&ch).await;
    for bad in [
        "spiffe://example.org/a/../b",
        "spiffe://example.org/%2e%2e/b",
        "spiffe://example.org//b",
        "spiffe://example.org/b/",
        "spiffe://EXAMPLE.org/b",
        "spiffe://other.org/b",
        &format!("spiffe://example.org/{}", "a".repeat(2100)),
    ] {
        let (code, msg) = create(
            &ch,
            entry(bad, "spiffe://example.org/agent", ("unix", "uid:1")),
        )
        .await
        .unwrap_err();
        assert_eq!(code, Code::InvalidArgument as i32, "{bad}: {msg}");
        assert!(msg.starts_with("invalid spiffe_id"), "{msg}");
    }
    assert_eq!(count(&ch).await, before, "nothing was stored");
}

#[tokio::test]
async fn t22_attack3_banned_and_stale_agents_are_refused() {
    let h = harness().await;
    let ch = admin_channel(&h).await;
    let (a, _) = attest(&ch, &token(&ch).await).await.unwrap();
    let e = create(
        &ch,
        entry("spiffe://example.org/w", &a.spiffe_id, ("unix", "uid:1")),
    )
    .await
    .unwrap();
    let services = Services::new(h.server.core.clone());
    let req = |svid: &pb::X509Svid| {
        as_peer(
            pb::BatchNewX509SvidRequest {
                params: vec![pb::NewX509SvidParams {
                    entry_id: e.id.clone(),
                    csr: csr_naming("spiffe://example.org/w"),
                }],
            },
            svid,
        )
    };
    assert!(services.svid().batch_new_x509_svid(req(&a)).await.is_ok());
    // Renew: the old SVID is no longer accepted.
    let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let renewed = plinth_api::server::agent_service_server::AgentService::renew_agent(
        &services.agent(),
        as_peer(
            pb::RenewAgentRequest {
                csr: Csr::create(key).unwrap(),
            },
            &a,
        ),
    )
    .await
    .unwrap()
    .into_inner()
    .svid
    .unwrap();
    let stale = services
        .svid()
        .batch_new_x509_svid(req(&a))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::PermissionDenied);
    assert!(
        stale.message().contains("no longer current"),
        "{}",
        stale.message()
    );
    assert!(services
        .svid()
        .batch_new_x509_svid(req(&renewed))
        .await
        .is_ok());
    // Ban: refused everywhere, including the sync stream and re-attestation.
    AgentServiceClient::new(ch.clone())
        .ban_agent(pb::BanAgentRequest {
            spiffe_id: a.spiffe_id.clone(),
        })
        .await
        .unwrap();
    let banned = services
        .svid()
        .batch_new_x509_svid(req(&renewed))
        .await
        .unwrap_err();
    assert_eq!(banned.code(), Code::PermissionDenied);
    assert!(banned.message().contains("banned"), "{}", banned.message());
    let sync = services
        .entry()
        .sync_authorized_entries(as_peer(
            pb::SyncAuthorizedEntriesRequest { from_revision: 0 },
            &renewed,
        ))
        .await;
    assert_eq!(sync.err().map(|s| s.code()), Some(Code::PermissionDenied));
}

#[tokio::test]
async fn t23_attack4_racing_attestations_with_one_token() {
    let h = harness().await;
    let ch = admin_channel(&h).await;
    let t = token(&ch).await;
    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let ch = ch.clone();
            let t = t.clone();
            tokio::spawn(async move { attest(&ch, &t).await })
        })
        .collect();
    let mut wins = 0;
    let mut losses = 0;
    for a in attempts {
        match a.await.unwrap() {
            Ok(_) => wins += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
                assert!(s.message().contains("join token"), "{}", s.message());
                losses += 1;
            }
        }
    }
    assert_eq!((wins, losses), (1, 7), "exactly one attestation wins");
    let agents = AgentServiceClient::new(ch.clone())
        .count_agents(pb::CountAgentsRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(agents, 1);
    // A made-up token fails the same way, without revealing anything.
    let e = attest(&ch, "not-a-real-token").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn t24_attack9_private_files() {
    let h = harness().await;
    let mode = |p: std::path::PathBuf| std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(h.dir.path().join("data")), 0o700);
    assert_eq!(mode(h.dir.path().join("data/raft")), 0o700);
    assert_eq!(mode(h.dir.path().join("keys")), 0o700);
    for f in std::fs::read_dir(h.dir.path().join("keys")).unwrap() {
        assert_eq!(mode(f.unwrap().path()), 0o600);
    }
    assert_eq!(mode(h.server.admin_socket.clone()), 0o770);
}

#[tokio::test]
async fn t25_non_admins_are_refused() {
    let h = harness().await;
    let ch = admin_channel(&h).await;
    let (a, _) = attest(&ch, &token(&ch).await).await.unwrap();
    let services = Services::new(h.server.core.clone());
    // An agent SVID is not an admin SVID.
    let e = services
        .entry()
        .batch_create_entry(as_peer(
            pb::BatchCreateEntryRequest {
                entries: vec![entry(
                    "spiffe://example.org/x",
                    &a.spiffe_id,
                    ("unix", "uid:1"),
                )],
            },
            &a,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Nor is an anonymous caller.
    let e = services
        .entry()
        .count_entries(Request::new(pb::CountEntriesRequest { filter: None }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    tokio::time::sleep(Duration::from_millis(1)).await;
}
