#![allow(clippy::unwrap_used)]
//! x509pop node attestation through the real AttestAgent stream: chain to a configured CA, a
//! signature over a fresh server nonce, SPIRE's agent ID and selectors; and attack 5 (signed bytes
//! that differ from the parsed bytes), replayed responses and foreign keys, all refused.

use std::sync::Arc;
use std::time::Duration;

use plinth_api::server as pb;
use plinth_api::server::agent_service_client::AgentServiceClient;
use plinth_server::attest::x509pop_sign;
use plinth_server::config::Config;
use plinth_server::run::start;
use plinth_server::state::Replicated;
use plinth_spiffe::{CaTemplate, Csr, KeyType, PrivateKey, Signer, TrustDomain};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

struct Node {
    chain: Vec<Vec<u8>>,
    key: Arc<PrivateKey>,
}

/// A CA outside SPIFFE (the organisation's node PKI) and a node certificate under it, made with
/// rcgen: x509pop leaves are ordinary certificates.
fn node_pki(dir: &std::path::Path) -> (std::path::PathBuf, Node, Arc<PrivateKey>) {
    let now = time::OffsetDateTime::now_utc();
    let ca_key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let ca_der = plinth_spiffe::x509::self_signed_ca(
        &CaTemplate::new(
            TrustDomain::new("nodes.internal").unwrap(),
            now,
            Duration::from_secs(86400),
        ),
        ca_key.clone(),
    )
    .unwrap();
    let ca_kp = rcgen::KeyPair::try_from(ca_key.to_pkcs8_der()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der.as_slice().into(), ca_kp).unwrap();
    let node_key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let node_kp = rcgen::KeyPair::try_from(node_key.to_pkcs8_der()).unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["node1.example".to_string()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "node1");
    p.not_before = now - time::Duration::minutes(1);
    p.not_after = now + time::Duration::hours(1);
    let leaf = p.signed_by(&node_kp, &issuer).unwrap().der().to_vec();
    let path = dir.join("node-ca.pem");
    std::fs::write(&path, plinth_spiffe::pem::encode_certs(&[&ca_der])).unwrap();
    (
        path,
        Node {
            chain: vec![leaf],
            key: node_key,
        },
        ca_key,
    )
}

mod common;

fn config(dir: &std::path::Path, ca: &std::path::Path) -> Config {
    let x509pop = format!(
        "[node_attestor.x509pop]\nca_bundle_path = \"{}\"\n",
        ca.display()
    );
    common::config(dir, 1, true, &x509pop)
}

/// Runs an x509pop conversation; `respond` turns the nonce into the challenge response.
async fn x509pop(
    ch: &tonic::transport::Channel,
    payload: Vec<u8>,
    respond: impl FnOnce(&[u8]) -> Vec<u8>,
) -> Result<pb::attest_agent_response::Result, tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    let csr = Csr::create(Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap())).unwrap();
    tx.send(pb::AttestAgentRequest {
        step: Some(pb::attest_agent_request::Step::Params(
            pb::attest_agent_request::Params {
                data: Some(pb::AttestationData {
                    r#type: "x509pop".into(),
                    payload,
                }),
                csr,
            },
        )),
    })
    .await
    .unwrap();
    let mut stream = AgentServiceClient::new(ch.clone())
        .attest_agent(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let m = stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::internal("stream ended"))?;
    match m.step {
        Some(pb::attest_agent_response::Step::Challenge(nonce)) => {
            tx.send(pb::AttestAgentRequest {
                step: Some(pb::attest_agent_request::Step::ChallengeResponse(respond(
                    &nonce,
                ))),
            })
            .await
            .unwrap();
            match stream.message().await?.and_then(|m| m.step) {
                Some(pb::attest_agent_response::Step::Result(r)) => Ok(r),
                other => Err(tonic::Status::internal(format!("unexpected {other:?}"))),
            }
        }
        Some(pb::attest_agent_response::Step::Result(r)) => Ok(r),
        None => Err(tonic::Status::internal("empty message")),
    }
}

fn sha1_hex(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der);
    hex::encode(d.as_ref())
}

#[tokio::test]
async fn t31_x509pop_attestation_and_attack5() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_path, node, _ca_key) = node_pki(dir.path());
    let server = start(config(dir.path(), &ca_path)).await.unwrap();
    let ch = plinth_server::cli::connect(&server.admin_socket)
        .await
        .unwrap();
    let payload: Vec<u8> = node.chain.concat();

    // Success: SPIRE's agent ID and selectors.
    let key = node.key.clone();
    let r = x509pop(&ch, payload.clone(), |n| {
        x509pop_sign(key.as_ref(), n).unwrap()
    })
    .await
    .unwrap();
    let svid = r.svid.unwrap();
    assert_eq!(
        svid.spiffe_id,
        format!(
            "spiffe://example.org/spire/agent/x509pop/{}",
            sha1_hex(&node.chain[0])
        )
    );
    assert!(r.reattestable);
    let agent = server
        .core
        .state
        .store()
        .get_agent(&plinth_spiffe::SpiffeId::new(&svid.spiffe_id).unwrap())
        .unwrap()
        .unwrap();
    let sel: Vec<String> = agent.selectors.iter().map(|s| s.to_string()).collect();
    assert!(
        sel.contains(&"x509pop:subject:cn:node1".to_string()),
        "{sel:?}"
    );
    assert!(
        sel.contains(&"x509pop:san:dns:node1.example".to_string()),
        "{sel:?}"
    );
    assert!(
        sel.iter().any(|s| s.starts_with("x509pop:ca:fingerprint:")),
        "{sel:?}"
    );

    let agents_before = server.core.state.store().list_agents().unwrap().len();

    // Attack 5: bytes inside the signed TBS changed after signing.
    let mut tampered = node.chain[0].clone();
    let pos = tampered.len() / 2;
    tampered[pos] ^= 0x01;
    let key = node.key.clone();
    let e = x509pop(&ch, tampered, |n| x509pop_sign(key.as_ref(), n).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Attack 5: trailing bytes after the certificate (parsed bytes != signed bytes).
    let mut trailing = payload.clone();
    trailing.extend_from_slice(&[0x30, 0x03, 0x02, 0x01, 0x00]);
    let key = node.key.clone();
    let e = x509pop(&ch, trailing, |n| x509pop_sign(key.as_ref(), n).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // A response signed by a key that is not the certificate's.
    let other = PrivateKey::generate(KeyType::EcP256).unwrap();
    let e = x509pop(&ch, payload.clone(), |n| x509pop_sign(&other, n).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("signature"), "{}", e.message());

    // A replayed response: signed over an earlier nonce.
    let key = node.key.clone();
    let stale = x509pop_sign(key.as_ref(), b"an earlier nonce that is not this one").unwrap();
    let e = x509pop(&ch, payload.clone(), |_| stale.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // A certificate from a CA the server does not trust.
    std::fs::create_dir_all(dir.path().join("x")).unwrap();
    let (_, stranger, _) = node_pki(&dir.path().join("x"));
    let skey = stranger.key.clone();
    let e = x509pop(&ch, stranger.chain.concat(), |n| {
        x509pop_sign(skey.as_ref(), n).unwrap()
    })
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("configured CA"), "{}", e.message());

    // join_token is not configured on this server.
    let csr = Csr::create(Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap())).unwrap();
    let e = AgentServiceClient::new(ch.clone())
        .attest_agent(tokio_stream::iter(vec![pb::AttestAgentRequest {
            step: Some(pb::attest_agent_request::Step::Params(
                pb::attest_agent_request::Params {
                    data: Some(pb::AttestationData {
                        r#type: "join_token".into(),
                        payload: b"tok".to_vec(),
                    }),
                    csr,
                },
            )),
        }]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    assert_eq!(
        server.core.state.store().list_agents().unwrap().len(),
        agents_before,
        "refused attestations changed nothing"
    );
    let _ = node.key.public_key_spki();
    server.shutdown().await.unwrap();
}
