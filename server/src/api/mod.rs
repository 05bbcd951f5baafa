//! The gRPC APIs. Protobuf types stay in this module: handlers convert them to plinth types at
//! the edge, and every error becomes a `tonic::Status` in [`status`] and its siblings.

mod agent;
mod authority;
mod bundle;
mod cluster;
mod convert;
mod entry;
mod svid;

pub use entry::SYNC_PART_BYTES;

use std::sync::Arc;

use plinth_api::server as pb;
use plinth_spiffe::SpiffeId;
use plinth_storage::{AttestedAgent, Command, CommandError};
use tonic::{Request, Status};

use crate::ca::{CaError, CaManager};
use crate::clock::Clock;
use crate::config::Config;
use crate::state::{Replicated, StateError};

pub use convert::{entry_from_proto, entry_to_proto};

/// The peer's X509-SVID, as the TLS transport established it. The transport inserts it into
/// each request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSvid {
    pub spiffe_id: SpiffeId,
    /// Hex serial number of the presented leaf certificate.
    pub serial: String,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Over the admin Unix socket: a local administrator.
    LocalAdmin,
    /// Over mTLS with an X509-SVID.
    Peer(PeerSvid),
    /// Over TLS without a client certificate.
    Anonymous,
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct ServerCore<S> {
    pub cfg: Arc<Config>,
    pub state: Arc<S>,
    pub ca: Arc<CaManager<S>>,
    pub clock: Arc<dyn Clock>,
    pub x509pop: Option<crate::attest::X509PopVerifier>,
}

impl<S: Replicated> ServerCore<S> {
    /// Who made `req`.
    pub fn caller<T>(req: &Request<T>) -> Caller {
        if let Some(p) = req.extensions().get::<PeerSvid>() {
            return Caller::Peer(p.clone());
        }
        if let Some(crate::tls::TlsPeer(p)) = req.extensions().get::<crate::tls::TlsPeer>() {
            return match p {
                Some(p) => Caller::Peer(p.clone()),
                None => Caller::Anonymous,
            };
        }
        if req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .is_some()
        {
            return Caller::LocalAdmin;
        }
        Caller::Anonymous
    }

    /// Admits local admins, SVIDs in `admin_ids`, and SVIDs issued from an entry marked admin
    /// (read linearizably, so an admin flag removed on any server counts at once).
    pub async fn require_admin<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let caller = Self::caller(req);
        match &caller {
            Caller::LocalAdmin => Ok(caller),
            Caller::Peer(p) => {
                if self.cfg.admin_ids.contains(&p.spiffe_id) {
                    return Ok(caller);
                }
                self.state.linearizable().await.map_err(state_status)?;
                let admin_entry = self
                    .state
                    .store()
                    .entries_by_spiffe_id(&p.spiffe_id)
                    .map_err(fatal)?
                    .iter()
                    .any(|e| e.admin);
                if admin_entry {
                    Ok(caller)
                } else {
                    Err(Status::permission_denied(format!(
                        "caller {} is not an admin",
                        p.spiffe_id
                    )))
                }
            }
            Caller::Anonymous => Err(Status::permission_denied(
                "an admin X509-SVID or the admin socket is required",
            )),
        }
    }

    /// Admits an attested, unbanned agent presenting its current SVID. Reads are linearizable,
    /// so a ban committed anywhere is seen here (reliability attack 3).
    pub async fn require_agent<T>(&self, req: &Request<T>) -> Result<AttestedAgent, Status> {
        let Caller::Peer(p) = Self::caller(req) else {
            return Err(Status::unauthenticated("an agent X509-SVID is required"));
        };
        self.state.linearizable().await.map_err(state_status)?;
        let agent = self.check_agent(&p)?;
        if agent.is_pending_serial(&p.serial) {
            // First use of a renewed SVID: from now on the previous one is refused (SPIRE's
            // "new serial" activation).
            let r = self
                .state
                .propose(Command::AgentActivateSerial {
                    spiffe_id: agent.spiffe_id.clone(),
                    serial: p.serial.to_lowercase(),
                })
                .await
                .map_err(state_status)?;
            if let Ok(plinth_storage::Outcome::Agent { agent }) = r.result {
                return Ok(agent);
            }
        }
        Ok(agent)
    }

    /// The agent check without the barrier (after one was taken).
    pub fn check_agent(&self, p: &PeerSvid) -> Result<AttestedAgent, Status> {
        let agent = self
            .state
            .store()
            .get_agent(&p.spiffe_id)
            .map_err(fatal)?
            .ok_or_else(|| {
                Status::permission_denied(format!("{} is not an attested agent", p.spiffe_id))
            })?;
        if agent.banned {
            return Err(Status::permission_denied(format!(
                "agent {} is banned",
                p.spiffe_id
            )));
        }
        if !agent.accepts_serial(&p.serial) {
            return Err(Status::permission_denied(format!(
                "agent {} presented an SVID that is no longer current",
                p.spiffe_id
            )));
        }
        Ok(agent)
    }

    /// Now, Unix seconds.
    pub fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }
}

/// A storage failure: this node cannot serve.
pub(crate) fn fatal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "storage failure");
    Status::internal(format!("storage failure: {e}"))
}

/// Maps the state layer's errors to gRPC statuses.
pub(crate) fn state_status(e: StateError) -> Status {
    match e {
        StateError::Refused(c) => command_status(c),
        StateError::Unavailable(m) => Status::unavailable(m),
        StateError::Rejected(m) => Status::failed_precondition(m),
        StateError::Fatal(m) => fatal(m),
    }
}

/// Maps a refused command to the gRPC status SPIRE would use.
pub(crate) fn command_status(e: CommandError) -> Status {
    let msg = e.to_string();
    match e {
        CommandError::EntryNotFound { .. }
        | CommandError::AgentNotFound { .. }
        | CommandError::BundleNotFound { .. }
        | CommandError::FederationNotFound { .. }
        | CommandError::AuthorityNotFound { .. } => Status::not_found(msg),
        CommandError::EntryIdExists { .. }
        | CommandError::EntryConflict { .. }
        | CommandError::JoinTokenExists
        | CommandError::FederationExists { .. }
        | CommandError::AuthorityExists { .. } => Status::already_exists(msg),
        CommandError::AgentBanned { .. } | CommandError::AgentSerialMismatch { .. } => {
            Status::permission_denied(msg)
        }
        CommandError::JoinTokenNotFound | CommandError::JoinTokenExpired => {
            Status::permission_denied(format!("failed to attest: {msg}"))
        }
        CommandError::EntryRevisionMismatch { .. }
        | CommandError::BundleSequenceRegressed { .. }
        | CommandError::AuthorityWrongStatus { .. } => Status::failed_precondition(msg),
        _ => Status::invalid_argument(msg),
    }
}

pub(crate) fn ca_status(e: CaError) -> Status {
    match e {
        CaError::State(s) => state_status(s),
        CaError::NothingPrepared(_) | CaError::UnknownAuthority(_) => {
            Status::failed_precondition(e.to_string())
        }
        CaError::X509(_) | CaError::Jwt(_) => Status::invalid_argument(e.to_string()),
        CaError::NoActiveAuthority(_) | CaError::Upstream(_) => Status::unavailable(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

/// The per-item status of a batch result.
pub(crate) fn item_ok() -> Option<pb::ItemStatus> {
    Some(pb::ItemStatus {
        code: 0,
        message: "OK".into(),
    })
}

pub(crate) fn item_err(s: &Status) -> Option<pb::ItemStatus> {
    Some(pb::ItemStatus {
        code: s.code() as i32,
        message: s.message().to_owned(),
    })
}

/// All services of one server, ready to be added to a tonic router.
#[derive(Debug)]
pub struct Services<S> {
    core: Arc<ServerCore<S>>,
}

impl<S: Replicated> Services<S> {
    /// Services over `core`.
    pub fn new(core: Arc<ServerCore<S>>) -> Self {
        Self { core }
    }

    /// A tonic router with every service, plus the standard gRPC health service (`""` is
    /// SERVING while this server has a leader and an active CA). Must be called within a Tokio
    /// runtime: a task keeps the health status current until the router is dropped.
    pub fn router(&self) -> tonic::transport::server::Router {
        let c = &self.core;
        let (reporter, health) = tonic_health::server::health_reporter();
        let watched = Arc::downgrade(c);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let Some(core) = watched.upgrade() else {
                    return;
                };
                let ready = crate::health::is_ready(&core).await;
                drop(core);
                if last != Some(ready) {
                    let status = if ready {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    reporter.set_service_status("", status).await;
                    last = Some(ready);
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(
                pb::entry_service_server::EntryServiceServer::new(entry::EntryApi(c.clone()))
                    .max_decoding_message_size(entry::MAX_REQUEST_BYTES),
            )
            .add_service(pb::agent_service_server::AgentServiceServer::new(
                agent::AgentApi(c.clone()),
            ))
            .add_service(pb::svid_service_server::SvidServiceServer::new(
                svid::SvidApi(c.clone()),
            ))
            .add_service(pb::bundle_service_server::BundleServiceServer::new(
                bundle::BundleApi(c.clone()),
            ))
            .add_service(
                pb::local_authority_service_server::LocalAuthorityServiceServer::new(
                    authority::AuthorityApi(c.clone()),
                ),
            )
            .add_service(pb::cluster_service_server::ClusterServiceServer::new(
                cluster::ClusterApi(c.clone()),
            ))
    }

    /// The entry service alone (tests call handlers directly).
    pub fn entry(&self) -> impl pb::entry_service_server::EntryService {
        entry::EntryApi(self.core.clone())
    }

    /// The agent service alone.
    pub fn agent(&self) -> impl pb::agent_service_server::AgentService {
        agent::AgentApi(self.core.clone())
    }

    /// The SVID service alone.
    pub fn svid(&self) -> impl pb::svid_service_server::SvidService {
        svid::SvidApi(self.core.clone())
    }

    /// The bundle service alone.
    pub fn bundle(&self) -> impl pb::bundle_service_server::BundleService {
        bundle::BundleApi(self.core.clone())
    }

    /// The local authority service alone.
    pub fn authority(&self) -> impl pb::local_authority_service_server::LocalAuthorityService {
        authority::AuthorityApi(self.core.clone())
    }
}
