//! The `tls` configs under tonic, wired the way plinth's server and agent use them: gRPC over
//! loopback TCP with SPIFFE mTLS, the server learning the caller's SPIFFE ID from the request
//! extensions (tonic's `Connected`), the client connecting through `connect_with_connector`.
//! The gRPC service is the standard health service, so no generated code is needed here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use plinth_spiffe::tls::{
    client_config, peer_spiffe_id, server_config, Authorizer, BundleHolder, ClientAuth, SvidHolder,
};
use plinth_spiffe::x509::{self_signed_ca, SvidRequest};
use plinth_spiffe::{
    Bundle, BundleSet, CaTemplate, KeyType, PrivateKey, Signer, SpiffeId, TrustDomain,
    X509Authority,
};
use rustls::pki_types::ServerName;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{server::TlsStream, TlsAcceptor, TlsConnector};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The authenticated caller, as tonic puts it into every request's extensions.
#[derive(Clone, Debug)]
struct PeerId(Option<SpiffeId>);

/// A server-side TLS stream that tells tonic who the peer is.
struct SpiffeTls(TlsStream<TcpStream>);

impl Connected for SpiffeTls {
    type ConnectInfo = PeerId;

    fn connect_info(&self) -> PeerId {
        PeerId(peer_spiffe_id(self.0.get_ref().1).ok())
    }
}

impl AsyncRead for SpiffeTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SpiffeTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn svid(ca: &X509Authority, spiffe_id: &str) -> Arc<SvidHolder> {
    let k = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let spiffe_id = id(spiffe_id);
    let s = ca
        .sign_svid(
            &SvidRequest {
                spiffe_id: &spiffe_id,
                public_key_spki: k.public_key_spki(),
                ttl: Duration::from_secs(3600),
                dns_names: &[],
            },
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    Arc::new(SvidHolder::new(&s, k).unwrap())
}

/// Serves the health service with SPIFFE mTLS (optional client auth, so the interceptor decides)
/// and records the caller ID of every request. Returns the address.
async fn serve(
    server_svid: Arc<SvidHolder>,
    bundles: Arc<BundleHolder>,
    seen: Arc<Mutex<Vec<Option<SpiffeId>>>>,
) -> std::net::SocketAddr {
    let config = server_config(
        server_svid,
        bundles,
        Authorizer::member_of(TrustDomain::new("a.test").unwrap()),
        ClientAuth::Optional,
    )
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<SpiffeTls>>(16);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            // Handshakes run off the accept loop; a failed one just drops the connection.
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok(SpiffeTls(tls))).await;
                }
            });
        }
    });
    let (_reporter, health) = tonic_health::server::health_reporter();
    let health = InterceptedService::new(health, move |req: Request<()>| {
        let peer = req.extensions().get::<PeerId>().and_then(|p| p.0.clone());
        seen.lock().unwrap().push(peer.clone());
        match peer {
            Some(_) => Ok(req),
            None => Err(Status::unauthenticated("an X509-SVID is required")),
        }
    });
    tokio::spawn(
        Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx)),
    );
    addr
}

async fn channel(
    addr: std::net::SocketAddr,
    client_svid: Option<Arc<SvidHolder>>,
    bundles: Arc<BundleHolder>,
) -> Result<Channel, tonic::transport::Error> {
    let config = client_config(
        client_svid.map(|s| s as _),
        bundles,
        Authorizer::exact(id("spiffe://a.test/plinth/server")),
    )
    .unwrap();
    let connector = TlsConnector::from(Arc::new(config));
    Endpoint::try_from(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |uri: Uri| {
            let connector = connector.clone();
            async move {
                let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
                let tcp = TcpStream::connect(authority).await?;
                // SPIFFE verifiers ignore the name; it only has to be well formed.
                let name = ServerName::try_from("plinth-server").map_err(io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, io::Error>(TokioIo::new(tls))
            }
        }))
        .await
}

#[tokio::test]
async fn t10_grpc_over_spiffe_mtls_carries_the_caller_id() {
    let td = TrustDomain::new("a.test").unwrap();
    let k = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
    let tmpl = CaTemplate::new(
        td.clone(),
        OffsetDateTime::now_utc(),
        Duration::from_secs(86400),
    );
    let ca_der = self_signed_ca(&tmpl, k.clone()).unwrap();
    let ca = X509Authority::new(ca_der.clone(), vec![], k).unwrap();
    let mut bundle = Bundle::new(td);
    bundle.add_x509_authority(ca_der).unwrap();
    let mut set = BundleSet::new();
    set.insert(bundle);
    let bundles = Arc::new(BundleHolder::new(set));
    let seen = Arc::<Mutex<Vec<Option<SpiffeId>>>>::default();
    let addr = serve(
        svid(&ca, "spiffe://a.test/plinth/server"),
        bundles.clone(),
        seen.clone(),
    )
    .await;
    let check = HealthCheckRequest {
        service: String::new(),
    };

    // An agent with an SVID: the call succeeds and the server knows who called.
    let ch = channel(
        addr,
        Some(svid(&ca, "spiffe://a.test/plinth/agent/1")),
        bundles.clone(),
    )
    .await
    .unwrap();
    let resp = HealthClient::new(ch).check(check.clone()).await.unwrap();
    assert_eq!(
        resp.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // A caller without an SVID gets through TLS (optional client auth) but not the interceptor.
    let ch = channel(addr, None, bundles.clone()).await.unwrap();
    let status = HealthClient::new(ch).check(check).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    assert_eq!(
        *seen.lock().unwrap(),
        vec![Some(id("spiffe://a.test/plinth/agent/1")), None]
    );
}
