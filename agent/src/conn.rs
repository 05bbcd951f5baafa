//! Connections to the servers: gRPC over TLS, the server checked against the trust bundle and
//! required to be `spiffe://<td>/spire/server`, the agent presenting its SVID once it has one.
//! Servers are tried in turn starting with the last one that worked, so the agent fails over
//! when one is down.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use plinth_spiffe::tls::{client_config, Authorizer, BundleHolder, SvidHolder, SvidSource};
use plinth_spiffe::{SpiffeId, TrustDomain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct};
use tonic::transport::{Channel, Endpoint};

/// How long one connection attempt (TCP + TLS + HTTP/2) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why no server could be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("no server reachable: {0}")]
    Unreachable(String),
}

/// The SPIFFE ID every plinth (and SPIRE) server presents.
pub fn server_id(td: &TrustDomain) -> Result<SpiffeId, ConnectError> {
    td.id_from_segments(&["spire", "server"])
        .map_err(|e| ConnectError::Tls(e.to_string()))
}

/// Dials the configured servers.
#[derive(Debug)]
pub struct Connector {
    addresses: Vec<String>,
    /// The index to try first: the last server that answered.
    next: AtomicUsize,
    server_id: SpiffeId,
    bundles: Arc<BundleHolder>,
    svid: Arc<SvidHolder>,
}

/// An open connection and the server it goes to.
#[derive(Debug, Clone)]
pub struct Connection {
    pub channel: Channel,
    pub address: String,
}

impl Connector {
    /// `bundles` holds this trust domain's bundle (updated as it rotates); `svid` the agent SVID
    /// (empty before attestation: then no client certificate is sent).
    pub fn new(
        addresses: Vec<String>,
        td: &TrustDomain,
        bundles: Arc<BundleHolder>,
        svid: Arc<SvidHolder>,
    ) -> Result<Self, ConnectError> {
        Ok(Self {
            addresses,
            next: AtomicUsize::new(0),
            server_id: server_id(td)?,
            bundles,
            svid,
        })
    }

    pub fn bundles(&self) -> &Arc<BundleHolder> {
        &self.bundles
    }

    pub fn svid(&self) -> &Arc<SvidHolder> {
        &self.svid
    }

    /// Moves on to the next server (after a failure on an open connection).
    pub fn fail_over(&self, from: &str) {
        if let Some(i) = self.addresses.iter().position(|a| a == from) {
            let _ = self.next.compare_exchange(
                i,
                (i + 1) % self.addresses.len(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }

    /// Connects to the first server that answers, checking it against the bundle.
    pub async fn connect(&self) -> Result<Connection, ConnectError> {
        let source: Arc<dyn SvidSource> = self.svid.clone();
        let cfg = client_config(
            Some(source),
            self.bundles.clone(),
            Authorizer::exact(self.server_id.clone()),
        )
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
        self.connect_with(Arc::new(cfg)).await
    }

    /// Connects without checking the server's certificate beyond its SPIFFE ID: the insecure
    /// bootstrap, used once to attest when no trust bundle was configured.
    pub async fn connect_insecure(&self) -> Result<Connection, ConnectError> {
        let verifier = InsecureServerVerifier {
            expected: self.server_id.clone(),
            provider: rustls::crypto::ring::default_provider(),
        };
        let mut cfg =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| ConnectError::Tls(e.to_string()))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
        cfg.resumption = rustls::client::Resumption::disabled();
        cfg.alpn_protocols = vec![plinth_spiffe::tls::ALPN_H2.to_vec()];
        self.connect_with(Arc::new(cfg)).await
    }

    async fn connect_with(&self, cfg: Arc<ClientConfig>) -> Result<Connection, ConnectError> {
        let n = self.addresses.len();
        let start = self.next.load(Ordering::SeqCst) % n.max(1);
        let mut errors = Vec::new();
        for k in 0..n {
            let i = (start + k) % n;
            let address = self.addresses[i].clone();
            match tokio::time::timeout(CONNECT_TIMEOUT, dial(&address, cfg.clone())).await {
                Ok(Ok(channel)) => {
                    self.next.store(i, Ordering::SeqCst);
                    return Ok(Connection { channel, address });
                }
                Ok(Err(e)) => errors.push(format!("{address}: {e}")),
                Err(_) => errors.push(format!("{address}: timed out")),
            }
        }
        Err(ConnectError::Unreachable(errors.join("; ")))
    }
}

/// A gRPC channel over TLS to `address`; reconnects to the same address if the connection drops.
async fn dial(address: &str, cfg: Arc<ClientConfig>) -> Result<Channel, String> {
    let addr = address.to_owned();
    let endpoint = Endpoint::from_static("http://plinth-server")
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let (addr, cfg) = (addr.clone(), cfg.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
                tcp.set_nodelay(true)?;
                // The name is not checked (the SPIFFE verifier checks the SVID instead).
                let name = ServerName::try_from("plinth-server")
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| {
            use std::error::Error;
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            msg
        })
}

/// Accepts any certificate chain whose leaf names the expected server (checks the handshake
/// signatures, so the peer holds the leaf's key). Trust on first use; only for
/// `insecure_bootstrap`.
#[derive(Debug)]
struct InsecureServerVerifier {
    expected: SpiffeId,
    provider: rustls::crypto::CryptoProvider,
}

impl ServerCertVerifier for InsecureServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = plinth_spiffe::x509::spiffe_id_of(end_entity.as_ref())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if id != self.expected {
            return Err(rustls::Error::General(format!(
                "server presented {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
