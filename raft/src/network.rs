//! The gRPC transport between plinth servers: the client side openraft replicates through
//! ([`Network`]), the server side that feeds a node's Raft ([`RaftGrpc`]), and the wire types of
//! the requests a follower forwards to the leader.
//!
//! Payloads are the serde encoding of openraft's own types, wrapped in a one-field protobuf
//! message (see `proto/plinth_raft.proto`). Connections run over mTLS ([`crate::PeerTls`]);
//! plain TCP only with [`crate::RaftConfig::insecure_plaintext`] set explicitly (tests).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use plinth_storage::codec::{decode, encode};
use plinth_storage::Command;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::node::Inner;
use crate::types::{NodeId, TypeConfig};

#[allow(clippy::all, clippy::unwrap_used, missing_debug_implementations)] // generated code
pub(crate) mod pb {
    include!("gen/plinth.raft.v1.rs");
}

use pb::raft_service_client::RaftServiceClient;
use pb::Payload;

/// Largest message accepted or sent between servers (snapshot chunks are far smaller).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
const T_RPC: &str = "raft_rpc";

/// How long the leader waits before retrying a peer it could not reach (openraft's default is
/// 500 ms). It must stay well below what a restarted server waits before campaigning (the
/// leader lease plus an election timeout: 240 ms at the defaults): a server restarted after a
/// crash that hears nothing from the leader by then starts an election it cannot win (its log
/// is behind) but whose higher term still deposes the healthy leader (openraft 0.9 has no
/// PreVote), and the node keeps a "seen a greater log" flag that doubles its next election
/// delay. Measured with 500 ms: every restart in `raft-bench` caused such an election.
/// Retrying a refused connection every 50 ms costs next to nothing.
const PEER_RETRY_BACKOFF: Duration = Duration::from_millis(50);

/// Why a request forwarded to the leader failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("timed out waiting for the cluster")]
    Timeout,
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("{0}")]
    Failed(String),
}

/// A membership change, run on the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipOp {
    AddLearner { node_id: NodeId, addr: String },
    Promote { node_id: NodeId },
    Remove { node_id: NodeId },
}

/// One node's own view of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: NodeId,
    /// `Leader`, `Follower`, `Candidate`, `Learner` or `Shutdown`.
    pub state: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// The state machine's global revision.
    pub revision: u64,
}

pub(crate) fn pack<T>(value: &T) -> Result<Payload, Status>
where
    T: Serialize + ?Sized,
{
    encode(T_RPC, value)
        .map(|data| Payload { data })
        .map_err(|e| Status::internal(e.to_string()))
}

pub(crate) fn unpack<T>(payload: &Payload) -> Result<T, Status>
where
    T: DeserializeOwned,
{
    decode(T_RPC, &payload.data).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A lazily connecting client to `addr` (`host:port`): over mTLS with `tls`, else plain TCP.
pub(crate) fn connect(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<RaftServiceClient<Channel>, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true);
    let channel = match tls {
        None => endpoint.connect_lazy(),
        Some(cfg) => {
            let (addr, cfg) = (addr.to_owned(), cfg.clone());
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                crate::tls::dial(addr.clone(), cfg.clone())
            }))
        }
    };
    Ok(RaftServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Creates a [`Peer`] per replication target.
#[derive(Debug, Clone, Default)]
pub struct Network {
    /// The client side of the peer mTLS; `None` for plain TCP.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// Holds the commit index sent to followers below the leader's unsynced entries.
    pub(crate) leader_sync: Option<Arc<crate::leader_sync::LeaderSync>>,
}

/// The connection to one peer.
#[derive(Debug)]
pub struct Peer {
    target: NodeId,
    client: Result<RaftServiceClient<Channel>, String>,
    leader_sync: Option<Arc<crate::leader_sync::LeaderSync>>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            client: connect(&node.addr, self.tls.as_ref()),
            leader_sync: self.leader_sync.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl Peer {
    async fn call<Req, Resp, E, F, Fut>(
        &mut self,
        req: &Req,
        ttl: Duration,
        rpc: F,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftServiceClient<Channel>, Payload) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Payload>, Status>>,
    {
        let client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Msg(e.clone())))),
        };
        let payload = pack(req).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        let reply = match tokio::time::timeout(ttl, rpc(client, payload)).await {
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(&Msg(format!(
                    "no answer from node {} within {ttl:?}",
                    self.target
                )))))
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)))
            }
            Ok(Err(status)) => return Err(RPCError::Network(NetworkError::new(&status))),
            Ok(Ok(reply)) => reply.into_inner(),
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            unpack(&reply).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(PEER_RETRY_BACKOFF))
    }

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        if let Some(sync) = &self.leader_sync {
            rpc.leader_commit = sync.clamp_commit(rpc.leader_commit);
        }
        let started = std::time::Instant::now();
        let prev = rpc.prev_log_id.map(|l| l.index);
        let entries = rpc.entries.len();
        tracing::trace!(target = self.target, entries, "append_entries send");
        let r = self
            .call(&rpc, option.hard_ttl(), |mut c, p| async move {
                c.append_entries(p).await
            })
            .await;
        // For reading a replication timeline (RUST_LOG=plinth_raft::network=trace).
        tracing::trace!(
            target = self.target,
            prev = ?prev,
            entries,
            took_us = started.elapsed().as_micros() as u64,
            result = ?r.as_ref().map_err(|e| e.to_string()),
            "append_entries"
        );
        r
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(&rpc, option.hard_ttl(), |mut c, p| async move {
            c.install_snapshot(p).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(&rpc, option.hard_ttl(), |mut c, p| async move {
            c.vote(p).await
        })
        .await
    }
}

/// The gRPC service a node serves to its peers.
#[derive(Debug, Clone)]
pub(crate) struct RaftGrpc {
    pub(crate) inner: Arc<Inner>,
}

impl RaftGrpc {
    /// Records a leader's request as contact for the election watchdog.
    fn heard(&self, vote: &crate::types::Vote) {
        let current = self.inner.raft.server_metrics().borrow().vote;
        self.inner.contact.heard(vote, &current);
    }
}

fn reply<T>(value: &T) -> Result<tonic::Response<Payload>, Status>
where
    T: Serialize,
{
    pack(value).map(tonic::Response::new)
}

#[tonic::async_trait]
impl pb::raft_service_server::RaftService for RaftGrpc {
    async fn append_entries(
        &self,
        request: Request<Payload>,
    ) -> Result<tonic::Response<Payload>, Status> {
        let req: AppendEntriesRequest<TypeConfig> = unpack(request.get_ref())?;
        self.heard(&req.vote);
        reply(&self.inner.raft.append_entries(req).await)
    }

    async fn vote(&self, request: Request<Payload>) -> Result<tonic::Response<Payload>, Status> {
        let req: VoteRequest<NodeId> = unpack(request.get_ref())?;
        reply(&self.inner.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<Payload>,
    ) -> Result<tonic::Response<Payload>, Status> {
        let req: InstallSnapshotRequest<TypeConfig> = unpack(request.get_ref())?;
        self.heard(&req.vote);
        reply(&self.inner.raft.install_snapshot(req).await)
    }

    async fn client_write(
        &self,
        request: Request<Payload>,
    ) -> Result<tonic::Response<Payload>, Status> {
        let command: Command = unpack(request.get_ref())?;
        reply(&self.inner.write_local(command).await)
    }

    async fn read_index(
        &self,
        _request: Request<Payload>,
    ) -> Result<tonic::Response<Payload>, Status> {
        reply(&self.inner.read_index_local().await)
    }

    async fn change_membership(
        &self,
        request: Request<Payload>,
    ) -> Result<tonic::Response<Payload>, Status> {
        let op: MembershipOp = unpack(request.get_ref())?;
        reply(&self.inner.membership_local(op).await)
    }

    async fn node_status(
        &self,
        _request: Request<Payload>,
    ) -> Result<tonic::Response<Payload>, Status> {
        reply(&self.inner.node_status())
    }
}
