//! SPIFFE mTLS (feature `tls`): real TLS handshakes between configs built by `plinth_spiffe::tls`,
//! over in-memory duplex pipes (and loopback TCP for the openssl CLI).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use plinth_spiffe::key::{KeyError, SignatureScheme};
use plinth_spiffe::tls::{
    client_config, peer_spiffe_id, server_config, Authorizer, BundleHolder, BundleSource,
    ClientAuth, SpiffeClientCertVerifier, SpiffeServerCertVerifier, SvidHolder, SvidResolver,
    SvidSource, TlsError, ALPN_H2,
};
use plinth_spiffe::x509::{self_signed_ca, SvidRequest};
use plinth_spiffe::{
    Bundle, BundleSet, CaTemplate, KeyType, PrivateKey, Signer, SpiffeId, TrustDomain,
    X509Authority, X509Svid,
};
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, HandshakeKind, ProtocolVersion, ServerConfig};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

// ---------------------------------------------------------------------------------------------
// Fixtures

/// TLS checks validity against the system clock, so certificates are made around it (valid for
/// days either side; nothing here depends on how long a test takes).
fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);

/// The ring provider, named explicitly so no process-wide default is needed.
fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn key(kt: KeyType) -> Arc<PrivateKey> {
    Arc::new(PrivateKey::generate(kt).unwrap())
}

/// A self-signed root CA of `td_name` valid from yesterday for three days.
fn root_ca(td_name: &str, cn: &str) -> X509Authority {
    let k = key(KeyType::EcP256);
    let mut tmpl = CaTemplate::new(td(td_name), now() - time::Duration::days(1), 3 * DAY);
    tmpl.common_name = Some(cn.to_owned());
    let der = self_signed_ca(&tmpl, k.clone()).unwrap();
    X509Authority::new(der, vec![], k).unwrap()
}

/// An SVID for `spiffe_id` over `signer`'s key, issued at `at` for `ttl`.
fn svid_at(
    ca: &X509Authority,
    spiffe_id: &str,
    signer: &dyn Signer,
    at: OffsetDateTime,
    ttl: Duration,
) -> X509Svid {
    let spiffe_id = id(spiffe_id);
    ca.sign_svid(
        &SvidRequest {
            spiffe_id: &spiffe_id,
            public_key_spki: signer.public_key_spki(),
            ttl,
            dns_names: &[],
        },
        at,
    )
    .unwrap()
}

/// An SVID holder for `spiffe_id` with a fresh key of type `kt`, valid for an hour.
fn holder(ca: &X509Authority, spiffe_id: &str, kt: KeyType) -> Arc<SvidHolder> {
    let k = key(kt);
    let svid = svid_at(ca, spiffe_id, k.as_ref(), now(), HOUR);
    Arc::new(SvidHolder::new(&svid, k).unwrap())
}

fn bundles(cas: &[&X509Authority]) -> Arc<BundleHolder> {
    let mut set = BundleSet::new();
    for ca in cas {
        let mut b = set
            .get(ca.trust_domain())
            .cloned()
            .unwrap_or_else(|| Bundle::new(ca.trust_domain().clone()));
        b.add_x509_authority(ca.cert_der().to_vec()).unwrap();
        set.insert(b);
    }
    Arc::new(BundleHolder::new(set))
}

fn remove_authority(holder: &BundleHolder, ca: &X509Authority) {
    holder.update(|set| {
        let mut b = set.get(ca.trust_domain()).cloned().unwrap();
        assert!(b.remove_x509_authority(ca.cert_der()));
        set.insert(b);
    });
}

fn server_cfg(
    svid: Arc<dyn SvidSource>,
    bundles: Arc<dyn BundleSource>,
    authorizer: Authorizer,
    mode: ClientAuth,
) -> Arc<ServerConfig> {
    Arc::new(server_config(svid, bundles, authorizer, mode).unwrap())
}

fn client_cfg(
    svid: Option<Arc<SvidHolder>>,
    bundles: Arc<dyn BundleSource>,
    authorizer: Authorizer,
) -> Arc<ClientConfig> {
    let svid = svid.map(|s| s as Arc<dyn SvidSource>);
    Arc::new(client_config(svid, bundles, authorizer).unwrap())
}

// ---------------------------------------------------------------------------------------------
// Running a handshake

/// What the server saw of an accepted connection.
#[derive(Debug)]
struct ServerSide {
    peer: Result<SpiffeId, TlsError>,
    alpn: Option<Vec<u8>>,
    kind: Option<HandshakeKind>,
}

/// What the client saw of a connection that completed and carried data.
#[derive(Debug)]
struct ClientSide {
    peer: SpiffeId,
    leaf: Vec<u8>,
    version: Option<ProtocolVersion>,
    kind: Option<HandshakeKind>,
}

#[derive(Debug)]
struct Outcome {
    server: io::Result<ServerSide>,
    client: io::Result<ClientSide>,
}

/// Runs one connection: the server accepts and writes `hello`; the client connects and reads
/// until the server closes. A TLS 1.3 client finishes its handshake before the server has
/// checked the client's certificate, so the read is what shows a rejection client-side.
async fn connect(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
    let (c_io, s_io) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server);
    let connector = TlsConnector::from(client);
    let server_task = async move {
        let mut tls = acceptor.accept(s_io).await?;
        let (_, conn) = tls.get_ref();
        let side = ServerSide {
            peer: peer_spiffe_id(conn),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            kind: conn.handshake_kind(),
        };
        tls.write_all(b"hello").await?;
        tls.shutdown().await?;
        Ok(side)
    };
    let client_task = async move {
        // The name is not checked by SPIFFE verifiers; any syntactically valid one works.
        let name = ServerName::try_from("plinth-server").unwrap();
        let mut tls = connector.connect(name, c_io).await?;
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await?;
        assert_eq!(got, b"hello");
        let (_, conn) = tls.get_ref();
        let certs = conn.peer_certificates().unwrap_or_default();
        Ok(ClientSide {
            peer: peer_spiffe_id(conn).map_err(io::Error::other)?,
            leaf: certs.first().map(|c| c.to_vec()).unwrap_or_default(),
            version: conn.protocol_version(),
            kind: conn.handshake_kind(),
        })
    };
    let (server, client) = tokio::join!(server_task, client_task);
    Outcome { server, client }
}

/// The rustls error inside an IO error from tokio-rustls.
fn tls_error(e: &io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a TLS error: {e:?}"))
}

/// The plinth error carried in a rustls certificate error.
fn plinth_error(e: &rustls::Error) -> TlsError {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => other
            .0
            .downcast_ref::<TlsError>()
            .cloned()
            .unwrap_or_else(|| panic!("not a plinth error: {e:?}")),
        other => panic!("expected a plinth certificate error, got {other:?}"),
    }
}

fn assert_rejected_by_server(o: &Outcome, want: &rustls::Error) {
    let err = o
        .server
        .as_ref()
        .expect_err("server must reject the client");
    assert_eq!(tls_error(err), want);
    assert!(
        o.client.is_err(),
        "client must not get data: {:?}",
        o.client
    );
}

// ---------------------------------------------------------------------------------------------
// Tests

struct Pair {
    ca: X509Authority,
    server_svid: Arc<SvidHolder>,
    client_svid: Arc<SvidHolder>,
    bundles: Arc<BundleHolder>,
}

const SERVER_ID: &str = "spiffe://a.test/plinth/server";
const AGENT_ID: &str = "spiffe://a.test/plinth/agent/x";

fn pair() -> Pair {
    let ca = root_ca("a.test", "a CA 1");
    Pair {
        server_svid: holder(&ca, SERVER_ID, KeyType::EcP256),
        client_svid: holder(&ca, AGENT_ID, KeyType::EcP256),
        bundles: bundles(&[&ca]),
        ca,
    }
}

#[tokio::test]
async fn t10_mutual_auth_in_one_trust_domain() {
    let p = pair();
    let server = server_cfg(
        p.server_svid.clone(),
        p.bundles.clone(),
        Authorizer::member_of(td("a.test")),
        ClientAuth::Required,
    );
    let client = client_cfg(
        Some(p.client_svid.clone()),
        p.bundles.clone(),
        Authorizer::exact(id(SERVER_ID)),
    );
    let o = connect(server, client).await;
    let s = o.server.unwrap();
    let c = o.client.unwrap();
    assert_eq!(s.peer.unwrap(), id(AGENT_ID));
    assert_eq!(c.peer, id(SERVER_ID));
    assert_eq!(s.alpn.as_deref(), Some(ALPN_H2));
    assert_eq!(c.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(c.kind, Some(HandshakeKind::Full));
}

#[tokio::test]
async fn t20_client_from_another_trust_domain_is_rejected() {
    let p = pair();
    let other = root_ca("b.test", "b CA");
    let foreign = holder(&other, "spiffe://b.test/agent", KeyType::EcP256);
    let client = client_cfg(Some(foreign), p.bundles.clone(), Authorizer::any());

    // The server has no bundle for b.test: the chain has nothing to verify against.
    let server = server_cfg(
        p.server_svid.clone(),
        p.bundles.clone(),
        Authorizer::any(),
        ClientAuth::Required,
    );
    let o = connect(server, client.clone()).await;
    assert_rejected_by_server(
        &o,
        &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
    );

    // Federated with b.test, so the chain verifies, but only a.test members are authorized.
    let federated = bundles(&[&p.ca, &other]);
    let server = server_cfg(
        p.server_svid.clone(),
        federated,
        Authorizer::member_of(td("a.test")),
        ClientAuth::Required,
    );
    let o = connect(server, client).await;
    let err = o.server.as_ref().unwrap_err();
    assert_eq!(
        plinth_error(tls_error(err)),
        TlsError::Unauthorized(id("spiffe://b.test/agent"))
    );
    assert!(o.client.is_err());
}

#[tokio::test]
async fn t21_expired_client_svid_is_rejected() {
    let p = pair();
    let k = key(KeyType::EcP256);
    // Issued two hours ago for one hour.
    let old = svid_at(
        &p.ca,
        AGENT_ID,
        k.as_ref(),
        now() - time::Duration::hours(2),
        HOUR,
    );
    let expired = Arc::new(SvidHolder::new(&old, k).unwrap());
    let server = server_cfg(
        p.server_svid.clone(),
        p.bundles.clone(),
        Authorizer::any(),
        ClientAuth::Required,
    );
    let client = client_cfg(Some(expired), p.bundles.clone(), Authorizer::any());
    let o = connect(server, client).await;
    assert_rejected_by_server(
        &o,
        &rustls::Error::InvalidCertificate(CertificateError::Expired),
    );
}

#[tokio::test]
async fn t22_client_id_not_authorized_is_rejected() {
    let p = pair();
    let client = client_cfg(
        Some(p.client_svid.clone()),
        p.bundles.clone(),
        Authorizer::any(),
    );
    let cases = [
        Authorizer::exact(id("spiffe://a.test/admin")),
        Authorizer::one_of([id("spiffe://a.test/admin"), id("spiffe://a.test/ops")]),
        Authorizer::member_of(td("c.test")),
        Authorizer::predicate(|id| id.path().starts_with("/admin/")),
    ];
    for authorizer in cases {
        let server = server_cfg(
            p.server_svid.clone(),
            p.bundles.clone(),
            authorizer.clone(),
            ClientAuth::Required,
        );
        let o = connect(server, client.clone()).await;
        let err = o.server.as_ref().expect_err("must be rejected");
        assert_eq!(
            plinth_error(tls_error(err)),
            TlsError::Unauthorized(id(AGENT_ID)),
            "{authorizer:?}"
        );
        assert!(o.client.is_err());
    }
    // The same forms accept the right ID.
    let cases = [
        Authorizer::exact(id(AGENT_ID)),
        Authorizer::one_of([id("spiffe://a.test/admin"), id(AGENT_ID)]),
        Authorizer::predicate(|id| id.path().starts_with("/plinth/agent/")),
    ];
    for authorizer in cases {
        let server = server_cfg(
            p.server_svid.clone(),
            p.bundles.clone(),
            authorizer,
            ClientAuth::Required,
        );
        let o = connect(server, client.clone()).await;
        assert_eq!(o.server.unwrap().peer.unwrap(), id(AGENT_ID));
    }
}

#[tokio::test]
async fn t23_required_client_auth_rejects_a_client_without_svid() {
    let p = pair();
    let server = server_cfg(
        p.server_svid.clone(),
        p.bundles.clone(),
        Authorizer::any(),
        ClientAuth::Required,
    );
    // No source at all, and a source that holds no SVID yet.
    for svid in [None, Some(Arc::new(SvidHolder::empty()))] {
        let client = client_cfg(svid, p.bundles.clone(), Authorizer::any());
        let o = connect(server.clone(), client).await;
        assert_rejected_by_server(&o, &rustls::Error::NoCertificatesPresented);
    }
}

#[tokio::test]
async fn t30_client_rejects_a_server_with_an_unexpected_id() {
    let p = pair();
    let server = server_cfg(
        p.server_svid.clone(),
        p.bundles.clone(),
        Authorizer::any(),
        ClientAuth::Required,
    );
    let client = client_cfg(
        Some(p.client_svid.clone()),
        p.bundles.clone(),
        Authorizer::exact(id("spiffe://a.test/plinth/other-server")),
    );
    let o = connect(server, client).await;
    let err = o.client.as_ref().unwrap_err();
    assert_eq!(
        plinth_error(tls_error(err)),
        TlsError::Unauthorized(id(SERVER_ID))
    );
    assert!(o.server.is_err());
}

#[tokio::test]
async fn t31_client_rejects_a_server_outside_its_bundles() {
    let p = pair();
    let other = root_ca("a.test", "impostor CA");
    // Same trust domain name, but a CA the client does not trust.
    let impostor = holder(&other, SERVER_ID, KeyType::EcP256);
    let server = server_cfg(
        impostor,
        bundles(&[&p.ca]),
        Authorizer::any(),
        ClientAuth::Required,
    );
    let client = client_cfg(
        Some(p.client_svid.clone()),
        p.bundles.clone(),
        Authorizer::exact(id(SERVER_ID)),
    );
    let o = connect(server, client).await;
    let err = o.client.as_ref().unwrap_err();
    assert_eq!(
        tls_error(err),
        &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[tokio::test]
async fn t40_optional_client_auth_admits_a_client_without_certificate() {
    let p = pair();
    let server = server_cfg(
        p.server_svid.clone(),
        p.bundles.clone(),
        Authorizer::member_of(td("a.test")),
        ClientAuth::Optional,
    );
    let anonymous = client_cfg(None, p.bundles.clone(), Authorizer::exact(id(SERVER_ID)));
    let o = connect(server.clone(), anonymous).await;
    assert_eq!(o.client.unwrap().peer, id(SERVER_ID));
    assert_eq!(o.server.unwrap().peer, Err(TlsError::NoPeerCertificate));

    // A client that does present an SVID is still checked.
    let o = connect(
        server.clone(),
        client_cfg(
            Some(p.client_svid.clone()),
            p.bundles.clone(),
            Authorizer::any(),
        ),
    )
    .await;
    assert_eq!(o.server.unwrap().peer.unwrap(), id(AGENT_ID));
    let other = root_ca("b.test", "b CA");
    let foreign = holder(&other, "spiffe://b.test/agent", KeyType::EcP256);
    let o = connect(
        server,
        client_cfg(Some(foreign), p.bundles.clone(), Authorizer::any()),
    )
    .await;
    assert_rejected_by_server(
        &o,
        &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
    );
}

#[tokio::test]
async fn t41_bundle_endpoint_mode_does_not_ask_for_a_certificate() {
    let p = pair();
    // A bundle endpoint (https_spiffe) trusts no client bundles at all.
    let server = server_cfg(
        p.server_svid.clone(),
        Arc::new(BundleHolder::new(BundleSet::new())),
        Authorizer::any(),
        ClientAuth::NotRequested,
    );
    // A client that has an SVID is not asked for it, so it is not refused for being unknown.
    let client = client_cfg(
        Some(p.client_svid.clone()),
        p.bundles.clone(),
        Authorizer::exact(id(SERVER_ID)),
    );
    let o = connect(server, client).await;
    assert_eq!(o.client.unwrap().peer, id(SERVER_ID));
    assert_eq!(o.server.unwrap().peer, Err(TlsError::NoPeerCertificate));
}

#[tokio::test]
async fn t50_rotated_server_svid_is_presented_on_new_handshakes() {
    let p = pair();
    let server = server_cfg(
        p.server_svid.clone(),
        p.bundles.clone(),
        Authorizer::any(),
        ClientAuth::Required,
    );
    let client = client_cfg(
        Some(p.client_svid.clone()),
        p.bundles.clone(),
        Authorizer::exact(id(SERVER_ID)),
    );
    let first = connect(server.clone(), client.clone())
        .await
        .client
        .unwrap();

    // Rotation: a new key and a new SVID from a new CA that was added to the bundle first.
    let ca2 = root_ca("a.test", "a CA 2");
    p.bundles.update(|set| {
        let mut b = set.get(&td("a.test")).cloned().unwrap();
        b.add_x509_authority(ca2.cert_der().to_vec()).unwrap();
        set.insert(b);
    });
    let k = key(KeyType::EcP256);
    let rotated = svid_at(&ca2, SERVER_ID, k.as_ref(), now(), HOUR);
    p.server_svid.set(&rotated, k).unwrap();

    let second = connect(server, client).await.client.unwrap();
    assert_ne!(first.leaf, second.leaf);
    assert_eq!(second.leaf, rotated.leaf());
    assert_eq!(second.peer, id(SERVER_ID));
}

/// Attack 7: after an authority leaves the bundle, nothing it signed is accepted again, even by a
/// client that would like to resume a session established while it was trusted.
#[tokio::test]
async fn t60_removed_authority_fails_reconnects_on_the_server_side() {
    let old_ca = root_ca("a.test", "a CA old");
    let new_ca = root_ca("a.test", "a CA new");
    let server_bundles = bundles(&[&old_ca, &new_ca]);
    let server_svid = holder(&new_ca, SERVER_ID, KeyType::EcP256);
    let client_svid = holder(&old_ca, AGENT_ID, KeyType::EcP256);
    let server = server_cfg(
        server_svid,
        server_bundles.clone(),
        Authorizer::any(),
        ClientAuth::Required,
    );

    // A client that would resume if it could, over TLS 1.3 and over TLS 1.2.
    let resuming: Vec<Arc<ClientConfig>> = [&rustls::version::TLS13, &rustls::version::TLS12]
        .into_iter()
        .map(|version| {
            let mut c = ClientConfig::builder_with_provider(ring())
                .with_protocol_versions(&[version])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SpiffeServerCertVerifier::new(
                    bundles(&[&new_ca]),
                    Authorizer::exact(id(SERVER_ID)),
                )))
                .with_client_cert_resolver(Arc::new(SvidResolver::new(client_svid.clone())));
            c.resumption = Resumption::in_memory_sessions(16);
            Arc::new(c)
        })
        .collect();

    for client in &resuming {
        for _ in 0..2 {
            let o = connect(server.clone(), client.clone()).await;
            let c = o.client.unwrap();
            // The server hands out nothing to resume with, so every handshake is a full one.
            assert_eq!(c.kind, Some(HandshakeKind::Full));
            assert_eq!(o.server.unwrap().peer.unwrap(), id(AGENT_ID));
        }
    }

    remove_authority(&server_bundles, &old_ca);
    for client in &resuming {
        let o = connect(server.clone(), client.clone()).await;
        assert_rejected_by_server(
            &o,
            &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
    }
}

#[tokio::test]
async fn t61_removed_authority_fails_reconnects_on_the_client_side() {
    let old_ca = root_ca("a.test", "a CA old");
    let new_ca = root_ca("a.test", "a CA new");
    let client_bundles = bundles(&[&old_ca, &new_ca]);
    let server = server_cfg(
        holder(&old_ca, SERVER_ID, KeyType::EcP256),
        bundles(&[&new_ca]),
        Authorizer::any(),
        ClientAuth::Required,
    );
    let client = client_cfg(
        Some(holder(&new_ca, AGENT_ID, KeyType::EcP256)),
        client_bundles.clone(),
        Authorizer::exact(id(SERVER_ID)),
    );
    assert_eq!(
        connect(server.clone(), client.clone())
            .await
            .client
            .unwrap()
            .peer,
        id(SERVER_ID)
    );

    remove_authority(&client_bundles, &old_ca);
    let o = connect(server, client).await;
    let err = o.client.as_ref().unwrap_err();
    assert_eq!(
        tls_error(err),
        &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

/// The control for t60: with rustls's own session defaults a resumed session is accepted after
/// the client's authority left the server's bundle. This is why the builders turn them off.
#[tokio::test]
async fn t62_control_default_session_cache_would_skip_validation() {
    let old_ca = root_ca("a.test", "a CA old");
    let new_ca = root_ca("a.test", "a CA new");
    let server_bundles = bundles(&[&old_ca, &new_ca]);
    let mut server = server_config(
        holder(&new_ca, SERVER_ID, KeyType::EcP256),
        server_bundles.clone(),
        Authorizer::any(),
        ClientAuth::Required,
    )
    .unwrap();
    server.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
    server.send_tls13_tickets = 2;
    let server = Arc::new(server);
    let mut client = client_config(
        Some(holder(&old_ca, AGENT_ID, KeyType::EcP256)),
        bundles(&[&new_ca]),
        Authorizer::any(),
    )
    .unwrap();
    client.resumption = Resumption::in_memory_sessions(16);
    let client = Arc::new(client);

    assert_eq!(
        connect(server.clone(), client.clone())
            .await
            .client
            .unwrap()
            .kind,
        Some(HandshakeKind::Full)
    );
    remove_authority(&server_bundles, &old_ca);
    let o = connect(server, client).await;
    let s = o.server.unwrap();
    assert_eq!(s.kind, Some(HandshakeKind::Resumed));
    assert_eq!(s.peer.unwrap(), id(AGENT_ID));
}

/// A plinth [`Signer`] standing in for an HSM: it counts the signatures it makes.
#[derive(Debug)]
struct CountingSigner {
    inner: Arc<PrivateKey>,
    signed: AtomicUsize,
}

impl Signer for CountingSigner {
    fn key_type(&self) -> KeyType {
        self.inner.key_type()
    }

    fn public_key_spki(&self) -> &[u8] {
        self.inner.public_key_spki()
    }

    fn sign(&self, scheme: SignatureScheme, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.signed.fetch_add(1, Ordering::SeqCst);
        self.inner.sign(scheme, msg)
    }
}

fn counting(inner: Arc<PrivateKey>) -> Arc<CountingSigner> {
    Arc::new(CountingSigner {
        inner,
        signed: AtomicUsize::new(0),
    })
}

#[tokio::test]
async fn t70_p384_and_rsa_keys_sign_through_the_signer_trait() {
    let ca = root_ca("a.test", "a CA");
    let server_key = counting(key(KeyType::EcP384));
    let client_key = counting(common::openssl_rsa_key(2048));
    let server_svid = svid_at(&ca, SERVER_ID, server_key.as_ref(), now(), HOUR);
    let client_svid = svid_at(&ca, AGENT_ID, client_key.as_ref(), now(), HOUR);
    let server_holder = Arc::new(SvidHolder::new(&server_svid, server_key.clone()).unwrap());
    let client_holder = Arc::new(SvidHolder::new(&client_svid, client_key.clone()).unwrap());
    let b = bundles(&[&ca]);

    // TLS 1.3 (the builders' choice against each other).
    let server = server_cfg(
        server_holder.clone(),
        b.clone(),
        Authorizer::any(),
        ClientAuth::Required,
    );
    let client = client_cfg(Some(client_holder.clone()), b.clone(), Authorizer::any());
    let o = connect(server.clone(), client).await;
    assert_eq!(o.server.unwrap().peer.unwrap(), id(AGENT_ID));
    let c = o.client.unwrap();
    assert_eq!(c.peer, id(SERVER_ID));
    assert_eq!(c.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(server_key.signed.load(Ordering::SeqCst), 1);
    assert_eq!(client_key.signed.load(Ordering::SeqCst), 1);

    // TLS 1.2, whose signatures go through verify_tls12_signature.
    let tls12 = ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerCertVerifier::new(
            b.clone(),
            Authorizer::exact(id(SERVER_ID)),
        )))
        .with_client_cert_resolver(Arc::new(SvidResolver::new(client_holder)));
    let o = connect(server, Arc::new(tls12)).await;
    assert_eq!(o.server.unwrap().peer.unwrap(), id(AGENT_ID));
    let c = o.client.unwrap();
    assert_eq!(c.version, Some(ProtocolVersion::TLSv1_2));
    assert_eq!(server_key.signed.load(Ordering::SeqCst), 2);
    assert_eq!(client_key.signed.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn t71_server_side_verifier_type_works_with_a_hand_built_config() {
    // The verifier types are usable without the builders (e.g. TLS 1.2 only).
    let p = pair();
    let server = ServerConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_client_cert_verifier(Arc::new(SpiffeClientCertVerifier::new(
            p.bundles.clone(),
            Authorizer::exact(id(AGENT_ID)),
            ClientAuth::Required,
        )))
        .with_cert_resolver(Arc::new(SvidResolver::new(p.server_svid.clone())));
    let client = client_cfg(
        Some(p.client_svid.clone()),
        p.bundles.clone(),
        Authorizer::any(),
    );
    let o = connect(Arc::new(server), client).await;
    assert_eq!(o.server.unwrap().peer.unwrap(), id(AGENT_ID));
    assert_eq!(o.client.unwrap().version, Some(ProtocolVersion::TLSv1_2));
}

#[test]
fn t80_svid_holder_refuses_a_signer_that_does_not_match_the_leaf() {
    let ca = root_ca("a.test", "a CA");
    let k = key(KeyType::EcP256);
    let svid = svid_at(&ca, AGENT_ID, k.as_ref(), now(), HOUR);
    let h = SvidHolder::new(&svid, k).unwrap();
    assert_eq!(h.spiffe_id(), Some(id(AGENT_ID)));
    let before = h.current_svid().unwrap();

    let stranger = key(KeyType::EcP256);
    let other = svid_at(&ca, "spiffe://a.test/other", stranger.as_ref(), now(), HOUR);
    assert_eq!(
        h.set(&other, key(KeyType::EcP256)).unwrap_err(),
        TlsError::KeyMismatch
    );
    // The old SVID stays in place.
    assert_eq!(h.spiffe_id(), Some(id(AGENT_ID)));
    assert_eq!(h.current_svid().unwrap().cert, before.cert);

    let empty = X509Svid {
        chain: vec![],
        ..svid
    };
    assert_eq!(
        SvidHolder::new(&empty, stranger).unwrap_err(),
        TlsError::EmptySvid
    );
    h.clear();
    assert!(h.current_svid().is_none());
}

#[test]
fn t81_authorizer_forms() {
    let a = id("spiffe://a.test/x/y");
    assert!(Authorizer::any().allows(&a));
    assert!(Authorizer::member_of(td("a.test")).allows(&a));
    assert!(!Authorizer::member_of(td("b.test")).allows(&a));
    assert!(Authorizer::exact(a.clone()).allows(&a));
    assert!(!Authorizer::exact(id("spiffe://a.test/x")).allows(&a));
    assert!(Authorizer::one_of([id("spiffe://a.test/z"), a.clone()]).allows(&a));
    assert!(!Authorizer::one_of([]).allows(&a));
    assert!(Authorizer::predicate(|i| i.path() == "/x/y").allows(&a));
    assert_eq!(
        format!("{:?}", Authorizer::predicate(|_| true)),
        "Predicate(..)"
    );
}

/// Runs `openssl s_client` against a server built by `server_config` on loopback TCP; returns
/// what the server saw and openssl's output.
async fn openssl_client(
    server: Arc<ServerConfig>,
    args: Vec<String>,
) -> (io::Result<ServerSide>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server);
    let server_task = async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let (_, conn) = tls.get_ref();
        let side = ServerSide {
            peer: peer_spiffe_id(conn),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            kind: conn.handshake_kind(),
        };
        // openssl may already have closed (its stdin is empty); the handshake is what counts.
        let _ = tls.write_all(b"hello\n").await;
        Ok(side)
    };
    let client_task = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("openssl")
            .arg("s_client")
            .arg("-connect")
            .arg(addr.to_string())
            .args(["-tls1_3", "-alpn", "h2", "-verify_return_error"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl must be installed (see README)");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        text
    });
    let (server, client) = tokio::join!(server_task, client_task);
    (server, client.unwrap())
}

#[tokio::test]
async fn t90_openssl_s_client_against_the_server_config() {
    let p = pair();
    let dir = tempfile::tempdir().unwrap();
    let ca = common::write(
        dir.path(),
        "ca.pem",
        plinth_spiffe::pem::encode_certs(&[p.ca.cert_der().to_vec()]),
    );
    let k = key(KeyType::EcP256);
    let svid = svid_at(&p.ca, AGENT_ID, k.as_ref(), now(), HOUR);
    let chain = common::write(dir.path(), "svid.pem", svid.chain_pem());
    let key_file = common::write(dir.path(), "svid.key", k.to_pkcs8_pem());
    let server = server_cfg(
        p.server_svid.clone(),
        p.bundles.clone(),
        Authorizer::member_of(td("a.test")),
        ClientAuth::Required,
    );
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();

    // openssl checks our server's SVID chain with its own X.509 rules, and presents a client SVID.
    let (seen, text) = openssl_client(
        server.clone(),
        vec![
            "-CAfile".into(),
            path(&ca),
            "-cert".into(),
            path(&chain),
            "-key".into(),
            path(&key_file),
        ],
    )
    .await;
    let seen = seen.unwrap_or_else(|e| panic!("server: {e}; openssl said:\n{text}"));
    assert_eq!(seen.peer.unwrap(), id(AGENT_ID));
    assert_eq!(seen.alpn.as_deref(), Some(ALPN_H2));
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("ALPN protocol: h2"), "{text}");

    // Without a certificate the server refuses it.
    let (seen, text) = openssl_client(server, vec!["-CAfile".into(), path(&ca)]).await;
    let err = seen.expect_err("a client without a certificate must be refused");
    assert_eq!(
        tls_error(&err),
        &rustls::Error::NoCertificatesPresented,
        "{text}"
    );
}
