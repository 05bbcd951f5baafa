//! mTLS for the peer API.
//!
//! This crate does not know SPIFFE: the caller (the server) hands in rustls configurations whose
//! verifiers decide which peers are servers of the cluster and whose certificate resolvers keep
//! the node's own identity current. Every connection, inbound and outbound, runs a full handshake
//! with client authentication before any Raft message is read.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// A peer must finish its handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many handshakes run at once; more wait in the accept queue.
const MAX_PENDING_HANDSHAKES: usize = 64;

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

/// An accepted, handshaken peer connection.
#[derive(Debug)]
pub(crate) struct PeerConn(TlsStream<TcpStream>);

impl Connected for PeerConn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for PeerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConn {
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

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Accepts peer connections and runs their handshakes (bounded, with a timeout); yields the
/// established ones. Failed handshakes are logged at debug level and dropped. Ends when the
/// receiver is dropped.
pub(crate) fn accept(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> mpsc::Receiver<Result<PeerConn, io::Error>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (tx, rx) = mpsc::channel(16);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (sock, addr) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a peer connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            // Small AppendEntries answers must not wait for delayed ACKs (Nagle).
            if let Err(e) = sock.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY on a peer connection");
            }
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(PeerConn(stream))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "peer TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(%addr, "peer TLS handshake timed out"),
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
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    Ok(hyper_util::rt::TokioIo::new(tls))
}
