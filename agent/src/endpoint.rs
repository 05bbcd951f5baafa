//! The Workload API endpoint: a Unix socket any local process may connect to (like SPIRE's
//! public socket), in a directory only the agent's user may write, served by tonic.
//!
//! Each accepted connection is pinned to its caller ([`Peer::from_stream`]) before any request is
//! read; a connection whose caller cannot be identified is still served, and each of its calls
//! fails with `Unavailable`.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;
use tonic::transport::Server;

use crate::attest::Peer;
use crate::h2_authority::AuthorityFix;
use crate::workload_api::{CallerInfo, WorkloadApi};

/// Mode of the directory holding the socket: others may enter, only the owner may write.
pub const SOCKET_DIR_MODE: u32 = 0o755;
/// Mode of the socket: every local process may connect.
pub const SOCKET_MODE: u32 = 0o777;

/// Concurrent HTTP/2 streams one connection may open (each open FetchX509SVID is one).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// Why the endpoint could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    #[error("socket path {0} has no parent directory")]
    NoParent(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket directory {0} is writable by group or others")]
    UnsafeDir(PathBuf),
    #[error("serving the Workload API: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> EndpointError + '_ {
    move |source| EndpointError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates the socket directory (0755) if needed, refuses a directory others can write (they
/// could swap the socket), removes a stale socket and binds a new one, world-connectable.
pub fn bind(socket_path: &Path) -> Result<UnixListener, EndpointError> {
    bind_socket(socket_path, SOCKET_DIR_MODE, SOCKET_MODE)
}

/// [`bind`] with other modes: the directory is created with `dir_mode` if missing, and the
/// socket gets `socket_mode`.
pub fn bind_socket(
    socket_path: &Path,
    dir_mode: u32,
    socket_mode: u32,
) -> Result<UnixListener, EndpointError> {
    let dir = socket_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| EndpointError::NoParent(socket_path.to_owned()))?;
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))
            .map_err(io_err(dir))?;
    }
    let meta = std::fs::metadata(dir).map_err(io_err(dir))?;
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(EndpointError::UnsafeDir(dir.to_owned()));
    }
    match std::fs::symlink_metadata(socket_path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(socket_path).map_err(io_err(socket_path))?
        }
        Ok(_) => return Err(EndpointError::NotASocket(socket_path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(socket_path)(e)),
    }
    let listener = UnixListener::bind(socket_path).map_err(io_err(socket_path))?;
    std::fs::set_permissions(socket_path, std::fs::Permissions::from_mode(socket_mode))
        .map_err(io_err(socket_path))?;
    Ok(listener)
}

/// An accepted connection and what we know about its caller. What the client sends passes
/// through [`AuthorityFix`] so that gRPC C-core clients are understood.
#[derive(Debug)]
pub struct PeerStream {
    inner: UnixStream,
    info: CallerInfo,
    fix: AuthorityFix,
    /// Rewritten client bytes not yet handed to h2, and how many of them were.
    pending: Vec<u8>,
    pending_pos: usize,
}

impl PeerStream {
    /// Pins the caller of a freshly accepted connection.
    pub fn new(inner: UnixStream) -> Self {
        let peer = Peer::from_stream(&inner);
        if let Err(e) = &peer {
            tracing::debug!(error = %e, "cannot identify Workload API caller");
        }
        Self {
            inner,
            info: CallerInfo(Arc::new(peer)),
            fix: AuthorityFix::new(),
            pending: Vec::new(),
            pending_pos: 0,
        }
    }
}

impl Connected for PeerStream {
    type ConnectInfo = CallerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pending_pos < this.pending.len() {
                let n = buf.remaining().min(this.pending.len() - this.pending_pos);
                buf.put_slice(&this.pending[this.pending_pos..this.pending_pos + n]);
                this.pending_pos += n;
                if this.pending_pos == this.pending.len() {
                    this.pending.clear();
                    this.pending_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; 16 * 1024];
            let mut raw_buf = ReadBuf::new(&mut raw);
            match Pin::new(&mut this.inner).poll_read(cx, &mut raw_buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = raw_buf.filled();
                    if got.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    this.fix.feed(got, &mut this.pending)?;
                }
            }
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepted connections, each pinned to its caller. Accept errors (e.g. out of file
/// descriptors) are logged and retried after a pause instead of ending the server.
fn incoming(
    listener: UnixListener,
) -> impl futures_util::Stream<Item = Result<PeerStream, io::Error>> {
    futures_util::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => return Some((Ok(PeerStream::new(stream)), listener)),
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a Workload API connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Serves the Workload API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    api: WorkloadApi,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), EndpointError> {
    Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(api.into_service())
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await?;
    Ok(())
}
