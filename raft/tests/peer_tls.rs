//! The peer API over mTLS: nodes holding server SVIDs replicate and forward; a connection
//! without a certificate, with an SVID for another ID, or with one from a CA outside the bundle
//! reads nothing; a node whose certificate the leader refuses never receives the log.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use plinth_raft::{PeerTls, RaftConfig, RaftNode};
use plinth_spiffe::tls::{
    client_config, server_config, Authorizer, BundleHolder, BundleSource, ClientAuth, SvidHolder,
    SvidSource,
};
use plinth_spiffe::x509::{self_signed_ca, CaTemplate, SvidRequest, X509Authority};
use plinth_spiffe::{
    Bundle, BundleSet, KeyType, PrivateKey, Selectors, Signer, SpiffeId, TrustDomain,
};
use plinth_storage::{Command, RegistrationEntry};
use time::OffsetDateTime;

const SERVER_ID: &str = "spiffe://example.org/spire/server";

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn new_ca() -> X509Authority {
    let k = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let t = CaTemplate::new(
        td(),
        OffsetDateTime::now_utc(),
        Duration::from_secs(24 * 3600),
    );
    let der = self_signed_ca(&t, k.clone()).unwrap();
    X509Authority::new(der, vec![], k).unwrap()
}

/// An SVID for `id` from `ca`, in a holder.
fn svid(ca: &X509Authority, id: &str) -> Arc<SvidHolder> {
    let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let spiffe_id = SpiffeId::new(id).unwrap();
    let svid = ca
        .sign_svid(
            &SvidRequest {
                spiffe_id: &spiffe_id,
                public_key_spki: key.public_key_spki(),
                ttl: Duration::from_secs(3600),
                dns_names: &[],
            },
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    Arc::new(SvidHolder::new(&svid, key).unwrap())
}

fn bundle_of(ca: &X509Authority) -> Arc<BundleHolder> {
    let mut b = Bundle::new(td());
    b.add_x509_authority(ca.cert_der().to_vec()).unwrap();
    let mut set = BundleSet::new();
    set.insert(b);
    Arc::new(BundleHolder::new(set))
}

fn peer_tls(svid: Arc<SvidHolder>, bundles: Arc<BundleHolder>) -> PeerTls {
    let server_id = SpiffeId::new(SERVER_ID).unwrap();
    let source: Arc<dyn SvidSource> = svid;
    let b: Arc<dyn BundleSource> = bundles;
    PeerTls {
        server: Arc::new(
            server_config(
                source.clone(),
                b.clone(),
                Authorizer::exact(server_id.clone()),
                ClientAuth::Required,
            )
            .unwrap(),
        ),
        client: Arc::new(client_config(Some(source), b, Authorizer::exact(server_id)).unwrap()),
    }
}

async fn node(id: u64, addr: SocketAddr, dir: &std::path::Path, tls: PeerTls) -> RaftNode {
    let mut c = RaftConfig::new(id, addr, dir.join(format!("node{id}")));
    c.heartbeat_interval = Duration::from_millis(50);
    c.election_timeout_min = Duration::from_millis(300);
    c.election_timeout_max = Duration::from_millis(600);
    c.request_timeout = Duration::from_secs(3);
    c.tls = Some(tls);
    RaftNode::start(c).await.unwrap()
}

fn create(n: u32) -> Command {
    Command::EntryCreate {
        entry: RegistrationEntry::new(
            format!("entry-{n}"),
            SpiffeId::new(&format!("spiffe://example.org/w/{n}")).unwrap(),
            SpiffeId::new("spiffe://example.org/agent").unwrap(),
            Selectors::parse_all(&[format!("unix:uid:{n}")]).unwrap(),
        ),
    }
}

async fn entry_count(n: &RaftNode) -> usize {
    n.store().list_entries().unwrap().len()
}

/// Waits (bounded) until `n` has applied `want` entries.
async fn wait_entries(n: &RaftNode, want: usize) {
    for _ in 0..200 {
        if entry_count(n).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node {} never applied {want} entries", n.id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_servers_with_svids_replicate_and_forward_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca();
    let bundles = bundle_of(&ca);
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let mut nodes = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let tls = peer_tls(svid(&ca, SERVER_ID), bundles.clone());
        nodes.push(node(i as u64 + 1, *addr, dir.path(), tls).await);
    }
    nodes[0].bootstrap().await.unwrap();
    nodes[0]
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .current_leader(1, "bootstrap")
        .await
        .unwrap();
    for id in 2..=3u64 {
        let addr = addrs[(id - 1) as usize].to_string();
        nodes[0].add_learner(id, addr).await.unwrap();
        nodes[0].promote(id).await.unwrap();
    }
    // Written on a follower: forwarded to the leader over mTLS, replicated to all.
    nodes[2].write(create(1)).await.unwrap();
    nodes[1].write(create(2)).await.unwrap();
    for n in &nodes {
        wait_entries(n, 2).await;
    }
    let status = nodes[2].cluster_status().await;
    assert_eq!(status.members.len(), 3);
    assert!(
        status.members.iter().all(|m| m.status.is_some()),
        "every member answered the status call over mTLS: {status:?}"
    );
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_the_leader_refuses_a_peer_without_an_authorized_svid() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca();
    let bundles = bundle_of(&ca);
    let a1 = free_addr();
    let leader = node(
        1,
        a1,
        dir.path(),
        peer_tls(svid(&ca, SERVER_ID), bundles.clone()),
    )
    .await;
    leader.bootstrap().await.unwrap();
    leader
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .current_leader(1, "bootstrap")
        .await
        .unwrap();
    leader.write(create(1)).await.unwrap();

    // A workload's SVID from the right CA, and a server ID from a CA outside the bundle. Each
    // intruder trusts the real CA, so only the leader's check of the intruder can fail.
    let other_ca = new_ca();
    let intruders = [
        (2u64, svid(&ca, "spiffe://example.org/workload")),
        (3u64, svid(&other_ca, SERVER_ID)),
    ];
    let mut running = Vec::new();
    for (id, holder) in intruders {
        let addr = free_addr();
        let n = node(id, addr, dir.path(), peer_tls(holder, bundles.clone())).await;
        // The membership change itself commits on the leader alone; replication to the
        // intruder is what must fail.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            leader.add_learner(id, addr.to_string()),
        )
        .await;
        running.push(n);
    }
    // Give replication time it would need many times over; the intruders must hold nothing.
    leader.write(create(2)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let replication = leader.raft().metrics().borrow().replication.clone();
    let replication = replication.expect("node 1 leads");
    for n in &running {
        assert_eq!(entry_count(n).await, 0, "node {} received the log", n.id());
        assert_eq!(
            replication.get(&n.id()),
            Some(&None),
            "the leader matched log entries on node {}",
            n.id()
        );
    }
    for n in running {
        n.shutdown().await.unwrap();
    }
    leader.shutdown().await.unwrap();
}

/// The peer API's own framing, for a hand-made client.
#[derive(Clone, PartialEq, prost::Message)]
struct Payload {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
}

/// Calls `NodeStatus` on `addr` over TLS, presenting `svid` (or no certificate).
async fn node_status(
    addr: SocketAddr,
    svid: Option<Arc<SvidHolder>>,
    bundles: Arc<BundleHolder>,
) -> Result<(), String> {
    let source = svid.map(|s| s as Arc<dyn SvidSource>);
    let cfg = Arc::new(
        client_config(
            source,
            bundles,
            Authorizer::exact(SpiffeId::new(SERVER_ID).unwrap()),
        )
        .unwrap(),
    );
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let cfg = cfg.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("plinth-server").unwrap();
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let channel = tokio::time::timeout(
        Duration::from_secs(5),
        endpoint.connect_with_connector(connector),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| format!("connect: {e:?}"))?;
    call_status(channel).await
}

async fn call_status(channel: tonic::transport::Channel) -> Result<(), String> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| format!("ready: {e}"))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/plinth.raft.v1.RaftService/NodeStatus",
    );
    let codec = tonic_prost::ProstCodec::<Payload, Payload>::default();
    tokio::time::timeout(
        Duration::from_secs(5),
        grpc.unary(tonic::Request::new(Payload::default()), path, codec),
    )
    .await
    .map_err(|_| "call timed out".to_string())?
    .map(|_| ())
    .map_err(|s| format!("{s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_the_peer_listener_answers_only_authorized_servers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca();
    let bundles = bundle_of(&ca);
    let addr = free_addr();
    let n = node(
        1,
        addr,
        dir.path(),
        peer_tls(svid(&ca, SERVER_ID), bundles.clone()),
    )
    .await;
    n.bootstrap().await.unwrap();

    // Positive control: a server SVID from the bundle's CA gets an answer.
    node_status(addr, Some(svid(&ca, SERVER_ID)), bundles.clone())
        .await
        .unwrap();
    // No client certificate.
    let e = node_status(addr, None, bundles.clone()).await;
    assert!(e.is_err(), "a client without a certificate was answered");
    // A workload's SVID from the same CA.
    let e = node_status(
        addr,
        Some(svid(&ca, "spiffe://example.org/web")),
        bundles.clone(),
    )
    .await;
    assert!(e.is_err(), "a workload SVID was answered");
    // The servers' ID, signed by a CA outside the bundle.
    let e = node_status(addr, Some(svid(&new_ca(), SERVER_ID)), bundles).await;
    assert!(e.is_err(), "an SVID from a foreign CA was answered");
    // Plain HTTP/2 without TLS.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(
            call_status(ch).await.is_err(),
            "a plaintext client was answered"
        );
    }
    n.shutdown().await.unwrap();
}
