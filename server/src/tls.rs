//! The server's TCP listener: TLS 1.3 with the server's own X509-SVID
//! (`spiffe://<td>/spire/server`), client SVIDs optional at the TLS layer (agents attest before
//! they have one) and checked per RPC by the handlers. The peer's SPIFFE ID and serial travel to
//! the handlers as the connection's `ConnectInfo`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use plinth_spiffe::tls::{self, Authorizer, BundleHolder, ClientAuth, SvidHolder};
use plinth_spiffe::{BundleSet, KeyType, PrivateKey, SpiffeId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::api::{PeerSvid, ServerCore};
use crate::state::Replicated;

/// A TLS handshake must finish within this (slow clients are cut off before authentication).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many handshakes run at once; more wait in the accept queue.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// The peer as TLS authenticated it: `None` for a client without a certificate.
#[derive(Debug, Clone)]
pub struct TlsPeer(pub Option<PeerSvid>);

/// An accepted, handshaken connection.
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: TlsPeer,
}

impl Connected for TlsConn {
    type ConnectInfo = TlsPeer;
    fn connect_info(&self) -> TlsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

fn peer_of(stream: &TlsStream<TcpStream>) -> TlsPeer {
    let (_, conn) = stream.get_ref();
    let Some(certs) = conn.peer_certificates() else {
        return TlsPeer(None);
    };
    let Some(leaf) = certs.first() else {
        return TlsPeer(None);
    };
    let id = tls::spiffe_id_from_certs(certs).ok();
    use x509_parser::prelude::FromDer;
    let serial = x509_parser::certificate::X509Certificate::from_der(leaf.as_ref())
        .ok()
        .map(|(_, c)| hex::encode(c.raw_serial()));
    match (id, serial) {
        (Some(spiffe_id), Some(serial)) => TlsPeer(Some(PeerSvid { spiffe_id, serial })),
        _ => TlsPeer(None),
    }
}

/// The server's own SPIFFE ID.
pub fn server_spiffe_id(td: &plinth_spiffe::TrustDomain) -> SpiffeId {
    crate::authz::server_id(td)
}

/// Keeps the server's TLS identity and trust bundle current. The same SVID serves the TLS API
/// and the Raft peer API (see [`crate::peer`]).
#[derive(Debug)]
pub struct TlsIdentity {
    pub svid: Arc<SvidHolder>,
    pub bundles: Arc<BundleHolder>,
    /// When the SVID this server issued itself expires; `None` while it has none (an SVID
    /// restored from disk or a join kit is replaced as soon as the CA is up).
    not_after: std::sync::Mutex<Option<time::OffsetDateTime>>,
    /// Where each new SVID is saved for the next start (chain and key, 0600).
    persist: Option<std::path::PathBuf>,
}

impl TlsIdentity {
    /// An identity with nothing loaded yet.
    pub fn new() -> Self {
        Self {
            svid: Arc::new(SvidHolder::empty()),
            bundles: Arc::new(BundleHolder::new(BundleSet::new())),
            not_after: std::sync::Mutex::new(None),
            persist: None,
        }
    }

    /// Saves every SVID issued from now on to `path` (see [`crate::peer::PEER_SVID_FILE`]).
    pub fn persisting_to(mut self, path: std::path::PathBuf) -> Self {
        self.persist = Some(path);
        self
    }

    /// Presents `p` until this server issues its own SVID.
    pub fn install_peer_svid(&self, p: &crate::peer::PeerSvid) -> anyhow::Result<()> {
        self.svid
            .set(&p.svid, p.key.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Reloads the local trust bundle from the store.
    pub fn refresh_bundle<S: Replicated>(&self, core: &ServerCore<S>) {
        self.refresh_bundle_from(core.state.store(), &core.cfg.trust_domain);
    }

    /// Reloads the trust bundle of `td` from `store`; keeps the current one (e.g. a join kit's)
    /// while the store has none.
    pub fn refresh_bundle_from(
        &self,
        store: &plinth_storage::Store,
        td: &plinth_spiffe::TrustDomain,
    ) {
        if let Ok(Some(b)) = store.get_bundle(td) {
            if let Ok(bundle) = b.to_bundle() {
                let mut set = BundleSet::new();
                set.insert(bundle);
                self.bundles.set(set);
            }
        }
    }

    /// Issues a fresh server SVID when there is none or the current one passed half its life.
    pub fn rotate_svid<S: Replicated>(&self, core: &ServerCore<S>) -> Result<(), String> {
        let now = core.clock.now();
        let due = {
            let na = self.not_after.lock().unwrap_or_else(|p| p.into_inner());
            na.is_none_or(|na| now + (core.cfg.x509_svid_ttl / 2) >= na)
        };
        if !due {
            return Ok(());
        }
        let key = Arc::new(PrivateKey::generate(KeyType::EcP256).map_err(|e| e.to_string())?);
        let id = server_spiffe_id(&core.cfg.trust_domain);
        let svid = core
            .ca
            .sign_x509_svid(
                &id,
                plinth_spiffe::Signer::public_key_spki(key.as_ref()),
                core.cfg.x509_svid_ttl,
                &[],
            )
            .map_err(|e| e.to_string())?;
        self.svid
            .set(&svid, key.clone())
            .map_err(|e| e.to_string())?;
        *self.not_after.lock().unwrap_or_else(|p| p.into_inner()) = Some(svid.not_after);
        if let Some(path) = &self.persist {
            let p = crate::peer::PeerSvid { svid, key };
            if let Err(e) = p.save(path) {
                // Serving goes on; only a cold restart of the whole cluster needs the file.
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"),
                    "could not save the peer SVID");
            }
        }
        Ok(())
    }
}

impl Default for TlsIdentity {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps `identity` current: bundle on every bundle change, SVID at half-life.
pub async fn maintain<S: Replicated>(
    core: Arc<ServerCore<S>>,
    identity: Arc<TlsIdentity>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut trust = core.state.trust_changes();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        identity.refresh_bundle(&core);
        if core.ca.is_ready() {
            if let Err(e) = identity.rotate_svid(&core) {
                tracing::warn!(error = %e, "server SVID rotation failed; will retry");
            }
        }
        // Wait for a change that matters (bundle, authority, snapshot) or the tick. Other
        // applied changes do not wake this task at all (a wake per write on every server, for
        // nothing, measured in docs/benchmarks.md).
        tokio::select! {
            r = trust.changed() => if r.is_err() { return },
            _ = tick.tick() => {},
            _ = stop.changed() => return,
        }
    }
}

/// Accepts TCP connections, runs TLS handshakes (bounded, with a timeout) and yields the
/// established connections, with the peer's SVID, for tonic, until `stop` changes.
pub fn incoming(
    listener: TcpListener,
    identity: Arc<TlsIdentity>,
    trust_domain: plinth_spiffe::TrustDomain,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<mpsc::Receiver<Result<TlsConn, io::Error>>, tls::TlsError> {
    let config = tls::server_config(
        identity.svid.clone(),
        identity.bundles.clone(),
        Authorizer::member_of(trust_domain),
        ClientAuth::Optional,
    )?;
    Ok(plinth_raft::tls::accept(
        listener,
        Arc::new(config),
        plinth_raft::AcceptLimits {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_pending: MAX_PENDING_HANDSHAKES,
        },
        |stream| {
            let peer = peer_of(&stream);
            TlsConn { stream, peer }
        },
        async move {
            let _ = stop.changed().await;
        },
    ))
}
