//! mTLS for the peer API.
//!
//! This crate does not know SPIFFE: the caller (the server) hands in rustls configurations whose
//! verifiers decide which peers are servers of the cluster and whose certificate resolvers keep
//! the node's own identity current. Every connection, inbound and outbound, runs a full handshake
//! with client authentication before any Raft message is read.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

/// Bounds of an [`accept`] loop.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// A client must finish its handshake within this (slow clients are cut off before they
    /// are authenticated).
    pub handshake_timeout: Duration,
    /// At most this many handshakes run at once; more wait in the accept queue.
    pub max_pending: usize,
}

/// The peer API's bounds.
const PEER_LIMITS: AcceptLimits = AcceptLimits {
    handshake_timeout: Duration::from_secs(5),
    max_pending: 64,
};

/// The TLS configurations of the peer API.
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// For the peer listener. It must require and verify a client certificate.
    pub server: Arc<rustls::ServerConfig>,
    /// For connections to peers (replication, forwarded writes, status). It must present this
    /// node's certificate and verify the peer's.
    pub client: Arc<rustls::ClientConfig>,
}

/// The name sent in SNI. Peers are identified by their certificate (the verifier), not by name.
const PEER_SERVER_NAME: &str = "plinth-server";

/// The peer API's accept loop: yields the handshaken connections as they are (tonic serves a
/// `TlsStream` directly, feature `tls-connect-info`).
pub(crate) fn accept_peers(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> mpsc::Receiver<Result<TlsStream<TcpStream>, io::Error>> {
    accept(
        listener,
        config,
        PEER_LIMITS,
        |stream| stream,
        std::future::pending(),
    )
}

/// Accepts TCP connections (with TCP_NODELAY: small gRPC frames must not wait for delayed
/// ACKs), runs their TLS handshakes within `limits`, and yields each established connection as
/// `wrap` makes it. Failed handshakes are logged at debug level and dropped. Ends (closing the
/// listener) when `stop` completes or the receiver is dropped (tonic drops it when it shuts
/// down). Also serves the server's TLS API.
pub fn accept<T, F, S>(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    limits: AcceptLimits,
    wrap: F,
    stop: S,
) -> mpsc::Receiver<Result<T, io::Error>>
where
    T: Send + 'static,
    F: Fn(TlsStream<TcpStream>) -> T + Send + Sync + 'static,
    S: std::future::Future<Output = ()> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_pending));
    let wrap = Arc::new(wrap);
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            let (sock, addr) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
                _ = &mut stop => return,
            };
            if let Err(e) = sock.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let wrap = wrap.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(sock)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(wrap(stream))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// Dials `addr` (`host:port`) and runs the client handshake.
pub(crate) async fn dial(
    addr: String,
    config: Arc<rustls::ClientConfig>,
) -> Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, io::Error> {
    let tcp = TcpStream::connect(addr.as_str()).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(PEER_SERVER_NAME)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = tokio::time::timeout(
        PEER_LIMITS.handshake_timeout,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    Ok(hyper_util::rt::TokioIo::new(tls))
}
