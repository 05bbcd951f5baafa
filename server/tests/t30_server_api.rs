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
use plinth_server::state::Replicated;
use plinth_spiffe::{x509, Csr, KeyType, PrivateKey, SpiffeId};
use tonic::{Code, Request};

mod common;
use common::{tls_channel, Harness, JOIN_TOKEN};

async fn harness() -> Harness {
    common::single(JOIN_TOKEN).await
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

/// Opens the authorized-entries stream as agent `a`.
async fn sync_stream(
    h: &Harness,
    req: pb::SyncAuthorizedEntriesRequest,
    a: &pb::X509Svid,
) -> impl futures::Stream<Item = Result<pb::SyncAuthorizedEntriesResponse, tonic::Status>> + Unpin {
    let stream = Services::new(h.server.core.clone())
        .entry()
        .sync_authorized_entries(as_peer(req, a))
        .await
        .unwrap()
        .into_inner();
    Box::pin(stream)
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
async fn t11_batch_create_answers_each_entry_in_order() {
    let h = harness().await;
    let ch = admin_channel(&h).await;
    let parent = "spiffe://example.org/spire/agent/x";
    let mut entries: Vec<pb::Entry> = (0..1200)
        .map(|i| {
            entry(
                &format!("spiffe://example.org/w/{i}"),
                parent,
                ("unix", "uid:1"),
            )
        })
        .collect();
    // A duplicate of entry 3 (same mapping), a malformed ID and one in the second chunk.
    entries.insert(
        4,
        entry("spiffe://example.org/w/3", parent, ("unix", "uid:1")),
    );
    entries.insert(
        5,
        entry("spiffe://example.org/bad//path", parent, ("unix", "uid:1")),
    );
    entries.push(entry(
        "spiffe://example.org/w/700",
        parent,
        ("unix", "uid:1"),
    ));
    // The servers' own identity is never a workload's.
    entries.push(entry(
        "spiffe://example.org/spire/server",
        parent,
        ("unix", "uid:1"),
    ));
    let r = EntryServiceClient::new(ch.clone())
        .batch_create_entry(pb::BatchCreateEntryRequest {
            entries: entries.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), entries.len());
    let codes: Vec<i32> = r
        .results
        .iter()
        .map(|x| x.status.as_ref().unwrap().code)
        .collect();
    let already_exists = tonic::Code::AlreadyExists as i32;
    let invalid = tonic::Code::InvalidArgument as i32;
    assert_eq!(codes[4], already_exists);
    assert_eq!(codes[5], invalid);
    assert_eq!(codes[codes.len() - 2], already_exists);
    assert_eq!(*codes.last().unwrap(), invalid);
    assert!(r
        .results
        .last()
        .unwrap()
        .status
        .as_ref()
        .unwrap()
        .message
        .contains("reserved"));
    assert_eq!(codes.iter().filter(|c| **c == 0).count(), 1200);
    let mut last_id = String::new();
    for (res, sent) in r.results.iter().zip(&entries) {
        if let Some(e) = &res.entry {
            assert_eq!(e.spiffe_id, sent.spiffe_id, "results keep request order");
            // Apply numbered them in request order (version 7 UUIDs, plinth_storage::entry_id).
            assert!(plinth_storage::EntryId::parse(&e.id).is_some(), "{}", e.id);
            assert!(e.id > last_id, "{} after {last_id}", e.id);
            last_id.clone_from(&e.id);
        }
    }
    assert_eq!(count(&ch).await, 1200);
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
    let renew = |svid: &pb::X509Svid| {
        let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        let r = as_peer(
            pb::RenewAgentRequest {
                csr: Csr::create(key).unwrap(),
            },
            svid,
        );
        let agent = services.agent();
        async move {
            plinth_api::server::agent_service_server::AgentService::renew_agent(&agent, r).await
        }
    };
    // A renewal whose answer is lost: the agent still holds only its old SVID, which stays
    // accepted until a renewed one is used, so it can renew again (SPIRE's new-serial rule).
    let lost = renew(&a).await.unwrap().into_inner().svid.unwrap();
    assert!(services.svid().batch_new_x509_svid(req(&a)).await.is_ok());
    let renewed = renew(&a).await.unwrap().into_inner().svid.unwrap();
    // Only the latest renewal is pending: the lost one is refused.
    let err = services
        .svid()
        .batch_new_x509_svid(req(&lost))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The first use of the renewed SVID activates it; from then on the old one is refused.
    assert!(services
        .svid()
        .batch_new_x509_svid(req(&renewed))
        .await
        .is_ok());
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
    assert!(renew(&a).await.is_err(), "the replaced SVID renewed");
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
            pb::SyncAuthorizedEntriesRequest::default(),
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

fn to_svid(p: &pb::X509Svid) -> plinth_spiffe::X509Svid {
    plinth_spiffe::X509Svid {
        spiffe_id: SpiffeId::new(&p.spiffe_id).unwrap(),
        chain: p.cert_chain.clone(),
        not_after: time::OffsetDateTime::from_unix_timestamp(p.expires_at).unwrap(),
    }
}

#[tokio::test]
async fn t40_agents_over_mtls() {
    use plinth_api::server::svid_service_client::SvidServiceClient;
    let h = harness().await;
    let admin = admin_channel(&h).await;
    let td = h.server.core.cfg.trust_domain.clone();
    let bundle = h
        .server
        .core
        .state
        .store()
        .get_bundle(&td)
        .unwrap()
        .unwrap()
        .to_bundle()
        .unwrap();
    let server_id = plinth_server::tls::server_spiffe_id(&td);
    let addr = h.server.tcp_addr;

    // Attestation without a client certificate.
    let anon = tls_channel(addr, bundle.clone(), None, server_id.clone())
        .await
        .unwrap();
    let t = token(&admin).await;
    let (agent, key) = attest(&anon, &t).await.unwrap();
    // Anonymous callers get no admin rights over TLS.
    let e = EntryServiceClient::new(anon.clone())
        .count_entries(pb::CountEntriesRequest { filter: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let api_entry = create(
        &admin,
        entry(
            "spiffe://example.org/api",
            &agent.spiffe_id,
            ("unix", "uid:7"),
        ),
    )
    .await
    .unwrap();
    let authed = tls_channel(
        addr,
        bundle.clone(),
        Some((to_svid(&agent), key)),
        server_id.clone(),
    )
    .await
    .unwrap();
    let wk = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let r = SvidServiceClient::new(authed.clone())
        .batch_new_x509_svid(pb::BatchNewX509SvidRequest {
            params: vec![pb::NewX509SvidParams {
                entry_id: api_entry.id.clone(),
                csr: Csr::create(wk).unwrap(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.results[0].svid.as_ref().unwrap().spiffe_id,
        "spiffe://example.org/api"
    );

    // The sync stream pushes the full set, then a new entry as it is committed.
    let mut stream =
        plinth_api::server::entry_service_client::EntryServiceClient::new(authed.clone())
            .sync_authorized_entries(pb::SyncAuthorizedEntriesRequest::default())
            .await
            .unwrap()
            .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.full);
    assert_eq!(first.upserted.len(), 1);
    assert!(first.bundle.is_some());
    let e2 = create(
        &admin,
        entry(
            "spiffe://example.org/api2",
            &agent.spiffe_id,
            ("unix", "uid:8"),
        ),
    )
    .await
    .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!next.full);
    assert_eq!(next.upserted.len(), 1);
    assert_eq!(next.upserted[0].id, e2.id);
    EntryServiceClient::new(admin.clone())
        .batch_delete_entry(pb::BatchDeleteEntryRequest {
            ids: vec![e2.id.clone()],
        })
        .await
        .unwrap();
    let del = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(del.deleted_ids, vec![e2.id]);

    // A client SVID from another trust domain fails the handshake.
    let other_key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let other_td = plinth_spiffe::TrustDomain::new("evil.org").unwrap();
    let other_ca_der = plinth_spiffe::x509::self_signed_ca(
        &plinth_spiffe::CaTemplate::new(
            other_td,
            time::OffsetDateTime::now_utc(),
            Duration::from_secs(3600),
        ),
        other_key.clone(),
    )
    .unwrap();
    let other_ca = plinth_spiffe::X509Authority::new(other_ca_der, vec![], other_key).unwrap();
    let lk = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let evil = other_ca
        .sign_svid(
            &plinth_spiffe::SvidRequest {
                spiffe_id: &SpiffeId::new("spiffe://evil.org/agent").unwrap(),
                public_key_spki: plinth_spiffe::Signer::public_key_spki(lk.as_ref()),
                ttl: Duration::from_secs(600),
                dns_names: &[],
            },
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    let evil_ch = tls_channel(addr, bundle.clone(), Some((evil, lk)), server_id.clone()).await;
    let refused = match evil_ch {
        Err(_) => true,
        Ok(ch) => SvidServiceClient::new(ch)
            .batch_new_x509_svid(pb::BatchNewX509SvidRequest { params: vec![] })
            .await
            .is_err(),
    };
    assert!(refused, "a foreign SVID must not get through");

    // The agent refuses a server that is not the expected one.
    let wrong = tls_channel(
        addr,
        bundle,
        None,
        SpiffeId::new("spiffe://example.org/not-server").unwrap(),
    )
    .await;
    let wrong_refused = match wrong {
        Err(_) => true,
        Ok(ch) => attest(&ch, &token(&admin).await).await.is_err(),
    };
    assert!(wrong_refused);
}

#[tokio::test]
async fn t41_sync_resumes_from_what_the_agent_holds() {
    use futures::StreamExt;
    let h = harness().await;
    let ch = admin_channel(&h).await;
    let (a, _) = attest(&ch, &token(&ch).await).await.unwrap();
    let kept = create(
        &ch,
        entry("spiffe://example.org/kept", &a.spiffe_id, ("unix", "uid:1")),
    )
    .await
    .unwrap();
    let changed = create(
        &ch,
        entry(
            "spiffe://example.org/changed",
            &a.spiffe_id,
            ("unix", "uid:2"),
        ),
    )
    .await
    .unwrap();
    let gone = create(
        &ch,
        entry("spiffe://example.org/gone", &a.spiffe_id, ("unix", "uid:3")),
    )
    .await
    .unwrap();
    // The agent held these three at their current revisions, then disconnected.
    let known: Vec<pb::EntryRevision> = [&kept, &changed, &gone]
        .iter()
        .map(|e| pb::EntryRevision {
            id: e.id.clone(),
            revision: e.revision,
        })
        .collect();
    // While it was away: one changed, one deleted, one added.
    let mut upd = changed.clone();
    upd.selectors[0].value = "uid:22".into();
    EntryServiceClient::new(ch.clone())
        .batch_update_entry(pb::BatchUpdateEntryRequest { entries: vec![upd] })
        .await
        .unwrap();
    EntryServiceClient::new(ch.clone())
        .batch_delete_entry(pb::BatchDeleteEntryRequest {
            ids: vec![gone.id.clone()],
        })
        .await
        .unwrap();
    let added = create(
        &ch,
        entry(
            "spiffe://example.org/added",
            &a.spiffe_id,
            ("unix", "uid:4"),
        ),
    )
    .await
    .unwrap();
    let mut stream = sync_stream(
        &h,
        pb::SyncAuthorizedEntriesRequest {
            from_revision: gone.revision,
            known,
        },
        &a,
    )
    .await;
    let first = stream.next().await.unwrap().unwrap();
    assert!(
        !first.full,
        "a resuming agent gets the difference, not a full set"
    );
    let mut up: Vec<String> = first.upserted.iter().map(|e| e.id.clone()).collect();
    up.sort();
    let mut want = vec![changed.id.clone(), added.id.clone()];
    want.sort();
    assert_eq!(up, want);
    assert_eq!(first.deleted_ids, vec![gone.id]);
    assert!(first.bundle.is_some());
    // A fresh agent (nothing known) gets the full set.
    let mut stream = sync_stream(&h, pb::SyncAuthorizedEntriesRequest::default(), &a).await;
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.full);
    assert_eq!(first.upserted.len(), 3);
}

#[tokio::test]
async fn t42_sync_pushes_federated_bundles_including_their_removal() {
    use futures::StreamExt;
    use plinth_api::server::bundle_service_client::BundleServiceClient;
    let h = harness().await;
    let ch = admin_channel(&h).await;
    let (a, _) = attest(&ch, &token(&ch).await).await.unwrap();
    // A foreign trust domain's bundle, and an entry that federates with it.
    let fk = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let fca = plinth_spiffe::x509::self_signed_ca(
        &plinth_spiffe::CaTemplate::new(
            plinth_spiffe::TrustDomain::new("partner.org").unwrap(),
            time::OffsetDateTime::now_utc(),
            Duration::from_secs(3600),
        ),
        fk,
    )
    .unwrap();
    BundleServiceClient::new(ch.clone())
        .set_federated_bundle(pb::SetFederatedBundleRequest {
            bundle: Some(pb::Bundle {
                trust_domain: "partner.org".into(),
                x509_authorities: vec![fca],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let mut e = entry("spiffe://example.org/fed", &a.spiffe_id, ("unix", "uid:1"));
    e.federates_with = vec!["partner.org".into()];
    create(&ch, e).await.unwrap();
    let mut stream = sync_stream(&h, pb::SyncAuthorizedEntriesRequest::default(), &a).await;
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.federated_bundles_changed);
    assert_eq!(first.federated_bundles.len(), 1);
    assert_eq!(first.federated_bundles[0].trust_domain, "partner.org");
    BundleServiceClient::new(ch.clone())
        .delete_federated_bundle(pb::DeleteFederatedBundleRequest {
            trust_domain: "partner.org".into(),
        })
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        next.federated_bundles_changed,
        "removal is an explicit change"
    );
    assert!(next.federated_bundles.is_empty());
}

#[tokio::test]
async fn t43_a_large_first_sync_comes_in_bounded_parts_that_add_up_to_the_full_set() {
    use futures::StreamExt;
    use plinth_server::api::SYNC_PART_BYTES;
    use prost::Message;
    let h = harness().await;
    let ch = admin_channel(&h).await;
    let (a, _) = attest(&ch, &token(&ch).await).await.unwrap();
    // 1 000 entries of about 2.5 KB each (40 DNS names): a full set of about 2.5 MB.
    const N: usize = 1000;
    for batch in 0..4 {
        let entries = (0..N / 4)
            .map(|i| {
                let n = batch * N / 4 + i;
                let mut e = entry(
                    &format!("spiffe://example.org/w{n}"),
                    &a.spiffe_id,
                    ("unix", &format!("uid:{n}")),
                );
                e.dns_names = (0..40)
                    .map(|d| format!("name-{d:02}.workload-{n:05}.a-long-namespace.example.org"))
                    .collect();
                e
            })
            .collect();
        let r = EntryServiceClient::new(ch.clone())
            .batch_create_entry(pb::BatchCreateEntryRequest { entries })
            .await
            .unwrap()
            .into_inner();
        assert!(r
            .results
            .iter()
            .all(|x| x.status.as_ref().unwrap().code == 0));
    }
    let mut stream = sync_stream(&h, pb::SyncAuthorizedEntriesRequest::default(), &a).await;
    let mut parts = Vec::new();
    loop {
        let p = stream.next().await.unwrap().unwrap();
        let more = p.more;
        parts.push(p);
        if !more {
            break;
        }
    }
    assert!(parts.len() >= 3, "{} parts", parts.len());
    let revision = parts[0].revision;
    let mut ids = std::collections::BTreeSet::new();
    for (i, p) in parts.iter().enumerate() {
        assert!(p.full, "every part says the update is a full set");
        assert_eq!(p.revision, revision, "every part is of the same update");
        assert_eq!(
            p.bundle.is_some(),
            i == 0,
            "the bundle rides in the first part"
        );
        let entry_bytes: usize = p.upserted.iter().map(|e| e.encoded_len()).sum();
        assert!(
            entry_bytes <= SYNC_PART_BYTES,
            "part {i}: {entry_bytes} bytes of entries"
        );
        assert!(p.encoded_len() < 2 * SYNC_PART_BYTES);
        for e in &p.upserted {
            assert!(ids.insert(e.id.clone()), "entry {} sent twice", e.id);
        }
    }
    assert_eq!(ids.len(), N, "the parts add up to the full set");

    // A later change is one small message, not split.
    let extra = create(
        &ch,
        entry(
            "spiffe://example.org/extra",
            &a.spiffe_id,
            ("unix", "uid:x"),
        ),
    )
    .await
    .unwrap();
    let next = stream.next().await.unwrap().unwrap();
    assert!(!next.full && !next.more);
    assert_eq!(next.upserted.len(), 1);
    assert_eq!(next.upserted[0].id, extra.id);
}
