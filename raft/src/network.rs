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
use tokio::sync::mpsc;
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
    /// The open AppendEntries stream, if any ([`Peer::append_streamed`]). A call takes it out
    /// and puts it back only once it read its answer, so a call dropped halfway (on a timeout)
    /// drops the stream with it: its late answer is never read as the next request's.
    stream: Option<AppendStream>,
    /// The peer does not serve the stream (an older server): AppendEntries go one call each.
    unary_only: bool,
}

/// An AppendEntries stream to one peer: requests go in `tx`, answers come back on `rx` in order.
#[derive(Debug)]
struct AppendStream {
    tx: mpsc::Sender<Payload>,
    rx: tonic::Streaming<Payload>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            client: connect(&node.addr, self.tls.as_ref()),
            leader_sync: self.leader_sync.clone(),
            stream: None,
            unary_only: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

type RpcResult<Resp, E> = Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Peer {
    fn client(&self) -> Result<RaftServiceClient<Channel>, Status> {
        self.client.clone().map_err(Status::unavailable)
    }

    async fn call<Req, Resp, E, F, Fut>(
        &mut self,
        req: &Req,
        ttl: Duration,
        rpc: F,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftServiceClient<Channel>, Payload) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Payload>, Status>>,
    {
        let payload = pack(req).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        let client = self.client();
        let reply = tokio::time::timeout(ttl, async move {
            rpc(client?, payload).await.map(tonic::Response::into_inner)
        })
        .await;
        self.finish(reply, ttl)
    }

    /// Turns a transport outcome into openraft's: a timeout or a failed call is a network
    /// error (an unavailable peer is unreachable), else the peer's own answer.
    fn finish<Resp, E>(
        &self,
        reply: Result<Result<Payload, Status>, tokio::time::error::Elapsed>,
        ttl: Duration,
    ) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let reply = match reply {
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
            Ok(Ok(reply)) => reply,
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            unpack(&reply).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// Sends one AppendEntries on the peer's stream, opening one first if none is kept, and
    /// reads its answer. The stream is kept for the next call only after a read answer.
    async fn append_streamed(&mut self, payload: Payload) -> Result<Payload, Status> {
        let mut stream = match self.stream.take() {
            Some(stream) => stream,
            None => {
                let (tx, rx) = mpsc::channel(1);
                let answers = self
                    .client()?
                    .append_entries_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                AppendStream { tx, rx: answers }
            }
        };
        if stream.tx.send(payload).await.is_err() {
            return Err(Status::unavailable("the append stream to the peer closed"));
        }
        match stream.rx.message().await? {
            Some(answer) => {
                self.stream = Some(stream);
                Ok(answer)
            }
            None => Err(Status::unavailable("the peer ended the append stream")),
        }
    }

    async fn append<Resp, E>(
        &mut self,
        req: &AppendEntriesRequest<TypeConfig>,
        ttl: Duration,
    ) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        if !self.unary_only {
            let payload = pack(req).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
            let reply = tokio::time::timeout(ttl, self.append_streamed(payload)).await;
            match &reply {
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                    tracing::info!(
                        target = self.target,
                        "peer serves no AppendEntries stream; sending one call per AppendEntries"
                    );
                    self.unary_only = true;
                }
                _ => return self.finish(reply, ttl),
            }
        }
        self.call(
            req,
            ttl,
            |mut c, p| async move { c.append_entries(p).await },
        )
        .await
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
        let r = self.append(&rpc, option.hard_ttl()).await;
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

    /// One AppendEntries, from a unary call or a stream: this node's Raft's answer, packed.
    async fn append_one(&self, payload: &Payload) -> Result<Payload, Status> {
        let req: AppendEntriesRequest<TypeConfig> = unpack(payload)?;
        self.heard(&req.vote);
        pack(&self.inner.raft.append_entries(req).await)
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
        self.append_one(request.get_ref())
            .await
            .map(tonic::Response::new)
    }

    type AppendEntriesStreamStream =
        tokio_stream::wrappers::ReceiverStream<Result<Payload, Status>>;

    /// Answers a leader's AppendEntries stream one request at a time, in order, until the
    /// leader closes it, a request cannot be read, or this node stops.
    async fn append_entries_stream(
        &self,
        request: Request<tonic::Streaming<Payload>>,
    ) -> Result<tonic::Response<Self::AppendEntriesStreamStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        let mut stopping = self.inner.stopping.subscribe();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = stopping.wait_for(|s| *s) => break,
                    next = requests.message() => next,
                };
                let Ok(Some(payload)) = next else { break };
                let answer = this.append_one(&payload).await;
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use openraft::{CommittedLeaderId, Vote};
    use pb::raft_service_server::{RaftService, RaftServiceServer};

    use super::*;

    /// A peer that answers AppendEntries by a script: `Success`, except that on the stream the
    /// first answer is `HigherVote` and comes late; with `streams: false` it serves no stream.
    #[derive(Clone)]
    struct Scripted {
        streams: bool,
        late: Duration,
        unary_calls: Arc<AtomicUsize>,
        stream_requests: Arc<AtomicUsize>,
    }

    fn success() -> Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        Ok(AppendEntriesResponse::Success)
    }

    fn higher_vote() -> Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        Ok(AppendEntriesResponse::HigherVote(Vote::new_committed(9, 2)))
    }

    #[tonic::async_trait]
    impl RaftService for Scripted {
        type AppendEntriesStreamStream =
            tokio_stream::wrappers::ReceiverStream<Result<Payload, Status>>;

        async fn append_entries(
            &self,
            _request: Request<Payload>,
        ) -> Result<tonic::Response<Payload>, Status> {
            self.unary_calls.fetch_add(1, Ordering::SeqCst);
            reply(&success())
        }

        async fn append_entries_stream(
            &self,
            request: Request<tonic::Streaming<Payload>>,
        ) -> Result<tonic::Response<Self::AppendEntriesStreamStream>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("no stream here"));
            }
            let mut requests = request.into_inner();
            let (tx, rx) = mpsc::channel(4);
            let this = self.clone();
            tokio::spawn(async move {
                while let Ok(Some(_)) = requests.message().await {
                    let n = this.stream_requests.fetch_add(1, Ordering::SeqCst);
                    let answer = if n == 0 {
                        tokio::time::sleep(this.late).await;
                        pack(&higher_vote())
                    } else {
                        pack(&success())
                    };
                    if tx.send(answer).await.is_err() {
                        break;
                    }
                }
            });
            Ok(tonic::Response::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
        }

        async fn vote(&self, _: Request<Payload>) -> Result<tonic::Response<Payload>, Status> {
            Err(Status::unimplemented("vote"))
        }
        async fn install_snapshot(
            &self,
            _: Request<Payload>,
        ) -> Result<tonic::Response<Payload>, Status> {
            Err(Status::unimplemented("install_snapshot"))
        }
        async fn client_write(
            &self,
            _: Request<Payload>,
        ) -> Result<tonic::Response<Payload>, Status> {
            Err(Status::unimplemented("client_write"))
        }
        async fn read_index(
            &self,
            _: Request<Payload>,
        ) -> Result<tonic::Response<Payload>, Status> {
            Err(Status::unimplemented("read_index"))
        }
        async fn change_membership(
            &self,
            _: Request<Payload>,
        ) -> Result<tonic::Response<Payload>, Status> {
            Err(Status::unimplemented("change_membership"))
        }
        async fn node_status(
            &self,
            _: Request<Payload>,
        ) -> Result<tonic::Response<Payload>, Status> {
            Err(Status::unimplemented("node_status"))
        }
    }

    async fn serve(peer: Scripted) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftServiceServer::new(peer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    fn scripted(streams: bool, late: Duration) -> Scripted {
        Scripted {
            streams,
            late,
            unary_calls: Arc::default(),
            stream_requests: Arc::default(),
        }
    }

    async fn peer(addr: &str) -> Peer {
        let mut network = Network::default();
        network.new_client(2, &BasicNode::new(addr)).await
    }

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 7)),
            leader_commit: None,
            entries: vec![],
        }
    }

    use crate::types::LogId;

    #[tokio::test]
    async fn a_dropped_call_never_lends_its_late_answer_to_the_next() {
        let server = scripted(true, Duration::from_millis(400));
        let addr = serve(server.clone()).await;
        let mut p = peer(&addr).await;
        let ttl = RPCOption::new(Duration::from_millis(150));
        let first = p.append_entries(heartbeat(), ttl.clone()).await;
        assert!(
            matches!(first, Err(RPCError::Network(_))),
            "the first answer comes after the deadline: {first:?}"
        );
        // The late HigherVote is still on its way down the old stream; the next call must not
        // take it for its own answer.
        let second = p.append_entries(heartbeat(), ttl.clone()).await.unwrap();
        assert_eq!(second, AppendEntriesResponse::Success);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let third = p.append_entries(heartbeat(), ttl).await.unwrap();
        assert_eq!(third, AppendEntriesResponse::Success);
        assert_eq!(server.stream_requests.load(Ordering::SeqCst), 3);
        assert_eq!(
            server.unary_calls.load(Ordering::SeqCst),
            0,
            "all went on streams"
        );
    }

    #[tokio::test]
    async fn a_stream_carries_answers_in_order_on_one_stream() {
        let server = scripted(true, Duration::ZERO);
        let addr = serve(server.clone()).await;
        let mut p = peer(&addr).await;
        let ttl = RPCOption::new(Duration::from_secs(2));
        let first = p.append_entries(heartbeat(), ttl.clone()).await.unwrap();
        assert!(matches!(first, AppendEntriesResponse::HigherVote(_)));
        for _ in 0..5 {
            let r = p.append_entries(heartbeat(), ttl.clone()).await.unwrap();
            assert_eq!(r, AppendEntriesResponse::Success);
        }
        // Only the first request on a stream gets the HigherVote: all six went on one stream.
        assert_eq!(server.stream_requests.load(Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_one_call_per_append() {
        let server = scripted(false, Duration::ZERO);
        let addr = serve(server.clone()).await;
        let mut p = peer(&addr).await;
        let ttl = RPCOption::new(Duration::from_secs(2));
        for _ in 0..3 {
            let r = p.append_entries(heartbeat(), ttl.clone()).await.unwrap();
            assert_eq!(r, AppendEntriesResponse::Success);
        }
        assert!(p.unary_only);
        assert_eq!(server.unary_calls.load(Ordering::SeqCst), 3);
    }
}
