//! The agent's admin socket: SPIRE's agent Debug API (`spire.agent.debug.v1.Debug/GetInfo`)
//! on a Unix socket (`admin_socket_path`), for operators and `plinth-agent debug info`.
//!
//! Access is the socket's mode (0770: the agent's user and group); the directory is created 0750
//! when missing and, as for the Workload API socket, refused when others may write it. A stale
//! socket from an earlier run is replaced. Nothing here is secret: the agent SVID's chain (no
//! key), counts and times.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use plinth_api::spire::agent::debug::v1::debug_server::{Debug as DebugService, DebugServer};
use plinth_api::spire::agent::debug::v1::get_info_response::Cert;
use plinth_api::spire::agent::debug::v1::{GetInfoRequest, GetInfoResponse};
use plinth_api::spire::api::types::Spiffeid;
use plinth_spiffe::X509Svid;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::cache::IdentityCache;
use crate::endpoint::{self, EndpointError};
use crate::jwt::JwtSvidCache;

/// Mode of the admin socket: the agent's user and group.
pub const ADMIN_SOCKET_MODE: u32 = 0o770;
/// Mode of the admin socket's directory when the agent creates it.
pub const ADMIN_DIR_MODE: u32 = 0o750;

/// What the agent knows about itself, kept up to date by the run loop.
#[derive(Debug)]
pub struct AgentInfo {
    started: Instant,
    agent_svid: RwLock<Option<X509Svid>>,
    last_sync_success: Arc<AtomicI64>,
}

impl AgentInfo {
    /// `last_sync_success` is the sync's (Unix seconds; 0: never).
    pub fn new(last_sync_success: Arc<AtomicI64>) -> Self {
        Self {
            started: Instant::now(),
            agent_svid: RwLock::new(None),
            last_sync_success,
        }
    }

    /// The agent SVID in use from now on.
    pub fn set_agent_svid(&self, svid: &X509Svid) {
        *self.agent_svid.write().unwrap_or_else(|p| p.into_inner()) = Some(svid.clone());
    }

    fn agent_svid(&self) -> Option<X509Svid> {
        self.agent_svid
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The Debug service.
#[derive(Debug, Clone)]
pub struct DebugApi {
    info: Arc<AgentInfo>,
    cache: Arc<IdentityCache>,
    jwt: Arc<JwtSvidCache>,
}

/// SPIFFE ID, notAfter and subject of one certificate of the agent's chain. A CA certificate's
/// ID is its trust domain ID (empty path); a certificate without a SPIFFE URI SAN gets none.
fn describe(der: &[u8]) -> Result<Cert, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut id = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(rest) = uri.strip_prefix("spiffe://") {
                    let (td, path) = match rest.find('/') {
                        Some(i) => rest.split_at(i),
                        None => (rest, ""),
                    };
                    id = Some(Spiffeid {
                        trust_domain: td.to_owned(),
                        path: path.to_owned(),
                    });
                    break;
                }
            }
        }
    }
    Ok(Cert {
        id,
        expires_at: cert.validity().not_after.timestamp(),
        subject: cert.subject().to_string(),
    })
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

impl DebugApi {
    pub fn new(info: Arc<AgentInfo>, cache: Arc<IdentityCache>, jwt: Arc<JwtSvidCache>) -> Self {
        Self { info, cache, jwt }
    }

    /// The answer to GetInfo now.
    // `svids_count` is deprecated in SPIRE's proto, which still fills it for older clients.
    #[allow(deprecated)]
    pub fn info(&self) -> Result<GetInfoResponse, Status> {
        let svid_chain = match self.info.agent_svid() {
            Some(svid) => svid
                .chain
                .iter()
                .map(|der| describe(der))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Status::internal(format!("agent SVID: {e}")))?,
            None => Vec::new(),
        };
        let x509 = count(self.cache.state().svid_count());
        Ok(GetInfoResponse {
            svid_chain,
            uptime: i32::try_from(self.info.started.elapsed().as_secs()).unwrap_or(i32::MAX),
            svids_count: x509,
            last_sync_success: self.info.last_sync_success.load(Ordering::Relaxed),
            cached_x509_svids_count: x509,
            cached_jwt_svids_count: count(self.jwt.len()),
            cached_svidstore_x509_svids_count: 0,
        })
    }
}

#[tonic::async_trait]
impl DebugService for DebugApi {
    async fn get_info(
        &self,
        _request: Request<GetInfoRequest>,
    ) -> Result<Response<GetInfoResponse>, Status> {
        self.info().map(Response::new)
    }
}

/// Binds the admin socket (see the module docs for modes).
pub fn bind(path: &Path) -> Result<UnixListener, EndpointError> {
    endpoint::bind_socket(path, ADMIN_DIR_MODE, ADMIN_SOCKET_MODE)
}

/// Serves the Debug API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    api: DebugApi,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), EndpointError> {
    tonic::transport::Server::builder()
        .add_service(DebugServer::new(api))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use plinth_spiffe::{CaTemplate, KeyType, PrivateKey, Signer, SpiffeId, SvidRequest};
    use plinth_spiffe::{TrustDomain, X509Authority};
    use time::OffsetDateTime;

    use super::*;

    #[test]
    fn describes_the_leaf_and_the_ca() {
        let td = TrustDomain::new("example.org").unwrap();
        let now = OffsetDateTime::now_utc();
        let ca_key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        let tmpl = CaTemplate::new(td.clone(), now, Duration::from_secs(3600));
        let ca_der = plinth_spiffe::x509::self_signed_ca(&tmpl, ca_key.clone()).unwrap();
        let ca = X509Authority::new(ca_der.clone(), vec![], ca_key).unwrap();
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let id = SpiffeId::new("spiffe://example.org/spire/agent/join_token/x").unwrap();
        let svid = ca
            .sign_svid(
                &SvidRequest {
                    spiffe_id: &id,
                    public_key_spki: key.public_key_spki(),
                    ttl: Duration::from_secs(600),
                    dns_names: &[],
                },
                now,
            )
            .unwrap();
        let leaf = describe(svid.leaf()).unwrap();
        let leaf_id = leaf.id.unwrap();
        assert_eq!(leaf_id.trust_domain, "example.org");
        assert_eq!(leaf_id.path, "/spire/agent/join_token/x");
        assert_eq!(leaf.expires_at, svid.not_after.unix_timestamp());
        assert!(leaf.subject.contains("SPIRE"), "{}", leaf.subject);
        let ca = describe(&ca_der).unwrap();
        assert_eq!(ca.id.unwrap().path, "");
        assert!(describe(b"not a certificate").is_err());
    }
}
