#![allow(clippy::unwrap_used)]
//! Three servers in one process (each with its own RocksDB, Raft port, admin socket and CA):
//! membership through the admin API, writes through any server, per-server CAs in one bundle,
//! a ban committed on one server refused at once on another (attack 3), and leader loss.

use std::sync::Arc;
use std::time::{Duration, Instant};

use plinth_api::server as pb;
use plinth_api::server::agent_service_client::AgentServiceClient;
use plinth_api::server::cluster_service_client::ClusterServiceClient;
use plinth_api::server::entry_service_client::EntryServiceClient;
use plinth_api::server::svid_service_server::SvidService;
use plinth_server::api::{PeerSvid, Services};
use plinth_server::config::Config;
use plinth_server::run::{start, RunningServer};
use plinth_server::state::Replicated;
use plinth_spiffe::{Csr, KeyType, PrivateKey, SpiffeId};
use tonic::{Code, Request};

fn config(dir: &std::path::Path, node: u64, bootstrap: bool) -> Config {
    let text = format!(
        r#"
[server]
trust_domain = "example.org"
data_dir = "{d}/data{node}"
socket_path = "{d}/admin{node}/api.sock"
bind_address = "127.0.0.1"
bind_port = 0

[cluster]
node_id = {node}
bind_address = "127.0.0.1:0"
bootstrap = {bootstrap}
insecure_plaintext = true
election_timeout_min_ms = 300
election_timeout_max_ms = 600
heartbeat_interval_ms = 60

[key_manager]
type = "disk"
keys_path = "{d}/keys{node}"

[node_attestor.join_token]
"#,
        d = dir.display()
    );
    Config::parse(&text, false).unwrap()
}

async fn admin(s: &RunningServer) -> tonic::transport::Channel {
    plinth_server::cli::connect(&s.admin_socket).await.unwrap()
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

fn serial_hex(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    hex::encode(c.raw_serial())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t50_three_servers() {
    let dir = tempfile::tempdir().unwrap();
    let s1 = start(config(dir.path(), 1, true)).await.unwrap();
    let s2 = start(config(dir.path(), 2, false)).await.unwrap();
    let s3 = start(config(dir.path(), 3, false)).await.unwrap();
    let a1 = admin(&s1).await;
    for s in [&s2, &s3] {
        let addr = s.core.state.node().addr().to_string();
        ClusterServiceClient::new(a1.clone())
            .add_node(pb::AddNodeRequest {
                node_id: s.core.state.node_id(),
                address: addr,
                learner_only: false,
            })
            .await
            .unwrap();
    }
    let status = ClusterServiceClient::new(a1.clone())
        .status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.members.len(), 3);
    assert!(status.members.iter().all(|m| m.voter));
    assert_eq!(status.leader_id, 1);

    // Every server sets up its own CA; the one bundle holds all three.
    let td = s1.core.cfg.trust_domain.clone();
    for s in [&s1, &s2, &s3] {
        let core = s.core.clone();
        wait_until("every CA ready", || {
            let core = core.clone();
            async move { core.ca.is_ready() }
        })
        .await;
    }
    let store = s1.core.state.store();
    let b = store.get_bundle(&td).unwrap().unwrap();
    assert_eq!(
        b.x509_authorities.len(),
        3,
        "one X.509 authority per server"
    );
    assert_eq!(b.jwt_authorities.len(), 3);

    // A token made on server 1, an agent attested on server 3, an entry created on server 2.
    let a2 = admin(&s2).await;
    let a3 = admin(&s3).await;
    let tok = AgentServiceClient::new(a1.clone())
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl: 600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let req = pb::AttestAgentRequest {
        step: Some(pb::attest_agent_request::Step::Params(
            pb::attest_agent_request::Params {
                data: Some(pb::AttestationData {
                    r#type: "join_token".into(),
                    payload: tok.as_bytes().to_vec(),
                }),
                csr: Csr::create(key).unwrap(),
            },
        )),
    };
    let res = AgentServiceClient::new(a3.clone())
        .attest_agent(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let Some(pb::attest_agent_response::Step::Result(r)) = res.step else {
        panic!("no result")
    };
    let agent = r.svid.unwrap();
    let created = EntryServiceClient::new(a2.clone())
        .batch_create_entry(pb::BatchCreateEntryRequest {
            entries: vec![pb::Entry {
                spiffe_id: "spiffe://example.org/w".into(),
                parent_id: agent.spiffe_id.clone(),
                selectors: vec![pb::Selector {
                    r#type: "unix".into(),
                    value: "uid:1".into(),
                }],
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let entry = created.results[0].entry.clone().unwrap();
    // Visible at once (linearizable read) on every server.
    for ch in [&a1, &a2, &a3] {
        let n = EntryServiceClient::new(ch.clone())
            .count_entries(pb::CountEntriesRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .count;
        assert_eq!(n, 1);
    }

    // Attack 3: ban on server 1, then ask server 2 straight away.
    let peer = PeerSvid {
        spiffe_id: SpiffeId::new(&agent.spiffe_id).unwrap(),
        serial: serial_hex(&agent.cert_chain[0]),
    };
    let ask = |core| {
        let peer = peer.clone();
        let entry_id = entry.id.clone();
        async move {
            let mut r = Request::new(pb::BatchNewX509SvidRequest {
                params: vec![pb::NewX509SvidParams {
                    entry_id,
                    csr: Csr::create(Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap()))
                        .unwrap(),
                }],
            });
            r.extensions_mut().insert(peer);
            Services::new(core).svid().batch_new_x509_svid(r).await
        }
    };
    assert!(ask(s2.core.clone()).await.is_ok());
    AgentServiceClient::new(a1.clone())
        .ban_agent(pb::BanAgentRequest {
            spiffe_id: agent.spiffe_id.clone(),
        })
        .await
        .unwrap();
    let refused = ask(s2.core.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let refused = ask(s3.core.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Leader loss: server 1 stops; the others elect and keep committing.
    s1.shutdown().await.unwrap();
    let a2c = a2.clone();
    wait_until("a write after the leader stopped", || {
        let ch = a2c.clone();
        async move {
            let r = EntryServiceClient::new(ch)
                .batch_create_entry(pb::BatchCreateEntryRequest {
                    entries: vec![pb::Entry {
                        spiffe_id: "spiffe://example.org/after".into(),
                        parent_id: "spiffe://example.org/spire/agent/x".into(),
                        selectors: vec![pb::Selector {
                            r#type: "unix".into(),
                            value: "uid:2".into(),
                        }],
                        ..Default::default()
                    }],
                })
                .await;
            matches!(r, Ok(r) if r.get_ref().results[0].status.as_ref().is_some_and(|s| s.code == 0))
        }
    })
    .await;
    let n = EntryServiceClient::new(a3.clone())
        .count_entries(pb::CountEntriesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(n, 2, "no acknowledged entry lost");
    s2.shutdown().await.unwrap();
    s3.shutdown().await.unwrap();
}
