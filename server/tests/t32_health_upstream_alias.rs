#![allow(clippy::unwrap_used)]
//! Health endpoints (HTTP /live and /ready, gRPC health), a CA signed by a disk upstream
//! authority, and authorization through node aliases.

use std::sync::Arc;
use std::time::Duration;

use plinth_api::server as pb;
use plinth_api::server::agent_service_client::AgentServiceClient;
use plinth_api::server::entry_service_client::EntryServiceClient;
use plinth_api::server::svid_service_server::SvidService;
use plinth_server::api::{PeerSvid, Services};
use plinth_server::run::start;
use plinth_server::state::Replicated;
use plinth_spiffe::{x509, CaTemplate, Csr, KeyType, PrivateKey, SpiffeId, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get(port: u16, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

mod common;

#[tokio::test]
async fn t32_health_upstream_ca_and_node_alias() {
    let dir = tempfile::tempdir().unwrap();
    // An upstream CA on disk (the organisation's root).
    let up_key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let up_der = x509::self_signed_ca(
        &CaTemplate::new(
            TrustDomain::new("example.org").unwrap(),
            time::OffsetDateTime::now_utc(),
            Duration::from_secs(7 * 86400),
        ),
        up_key.clone(),
    )
    .unwrap();
    let cert = dir.path().join("up.crt.pem");
    let key = dir.path().join("up.key.pem");
    std::fs::write(&cert, plinth_spiffe::pem::encode_certs(&[&up_der])).unwrap();
    std::fs::write(&key, up_key.to_pkcs8_pem()).unwrap();
    let port = free_port();
    let sections = format!(
        r#"
[upstream_authority]
type = "disk"
cert_file_path = "{cert}"
key_file_path = "{key}"

[node_attestor.join_token]

[health_checks]
listener_enabled = true
bind_address = "127.0.0.1"
bind_port = {port}
"#,
        cert = cert.display(),
        key = key.display(),
    );
    let server = start(common::config(dir.path(), 1, true, &sections))
        .await
        .unwrap();

    // HTTP health.
    let live = http_get(port, "/live").await;
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    let ready = http_get(port, "/ready").await;
    assert!(
        ready.starts_with("HTTP/1.1 200") && ready.contains("\"ready\":true"),
        "{ready}"
    );
    assert!(http_get(port, "/nope").await.starts_with("HTTP/1.1 404"));

    // gRPC health over the admin socket.
    let ch = plinth_server::cli::connect(&server.admin_socket)
        .await
        .unwrap();
    let mut serving = false;
    for _ in 0..50 {
        let r = tonic_health::pb::health_client::HealthClient::new(ch.clone())
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        if r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serving, "gRPC health reports SERVING");

    // The bundle holds the upstream root; the plinth CA is an intermediate under it.
    let td = server.core.cfg.trust_domain.clone();
    let stored = server.core.state.store().get_bundle(&td).unwrap().unwrap();
    assert!(
        stored.x509_authorities.contains(&up_der),
        "upstream root published"
    );
    let ca = server.core.ca.active_x509().unwrap();
    assert_eq!(
        ca.chain_after_leaf().len(),
        1,
        "leaves carry the intermediate"
    );
    let mut root_only = plinth_spiffe::Bundle::new(td.clone());
    root_only.add_x509_authority(up_der.clone()).unwrap();

    // Node alias: an entry under the server maps the agent's selectors to an alias ID; entries
    // parented to the alias are authorized to every agent with those selectors.
    let t = AgentServiceClient::new(ch.clone())
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl: 60,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    let agent_key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let res = AgentServiceClient::new(ch.clone())
        .attest_agent(tokio_stream::iter(vec![pb::AttestAgentRequest {
            step: Some(pb::attest_agent_request::Step::Params(
                pb::attest_agent_request::Params {
                    data: Some(pb::AttestationData {
                        r#type: "join_token".into(),
                        payload: t.as_bytes().to_vec(),
                    }),
                    csr: Csr::create(agent_key).unwrap(),
                },
            )),
        }]))
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
    // Agent SVID chains to the upstream root through the plinth intermediate.
    x509::verify_svid(
        &agent.cert_chain,
        &root_only,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let mk = |spiffe_id: &str, parent: &str, sel: (&str, &str)| pb::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent.into(),
        selectors: vec![pb::Selector {
            r#type: sel.0.into(),
            value: sel.1.into(),
        }],
        ..Default::default()
    };
    // Join-token agents have no selectors, so alias them by the selector the token's alias entry
    // uses; here: an alias for "spiffe_id:<agent>".
    let alias = "spiffe://example.org/cluster/web-nodes";
    let created = EntryServiceClient::new(ch.clone())
        .batch_create_entry(pb::BatchCreateEntryRequest {
            entries: vec![
                mk(
                    alias,
                    "spiffe://example.org/spire/server",
                    ("join_token", "never-matches"),
                ),
                mk("spiffe://example.org/via-alias", alias, ("unix", "uid:1")),
                mk(
                    "spiffe://example.org/direct",
                    &agent.spiffe_id,
                    ("unix", "uid:2"),
                ),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = created
        .results
        .iter()
        .map(|r| r.entry.clone().unwrap().id)
        .collect();
    let svid_for = |entry_id: String| {
        let mut req = tonic::Request::new(pb::BatchNewX509SvidRequest {
            params: vec![pb::NewX509SvidParams {
                entry_id,
                csr: Csr::create(Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap())).unwrap(),
            }],
        });
        req.extensions_mut().insert(PeerSvid {
            spiffe_id: SpiffeId::new(&agent.spiffe_id).unwrap(),
            serial: {
                use x509_parser::prelude::FromDer;
                let (_, c) =
                    x509_parser::certificate::X509Certificate::from_der(&agent.cert_chain[0])
                        .unwrap();
                hex::encode(c.raw_serial())
            },
        });
        let core = server.core.clone();
        async move {
            Services::new(core)
                .svid()
                .batch_new_x509_svid(req)
                .await
                .unwrap()
                .into_inner()
                .results[0]
                .status
                .clone()
                .unwrap()
                .code
        }
    };
    assert_eq!(svid_for(ids[2].clone()).await, 0, "parented to the agent");
    assert_ne!(
        svid_for(ids[1].clone()).await,
        0,
        "alias selectors do not match this agent"
    );
    // Aliases that do match an agent's selectors are covered in t21_authz.
    server.shutdown().await.unwrap();
}
