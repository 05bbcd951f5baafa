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
    /// Raft log syncs since the node started, and their total time in microseconds (absent,
    /// so 0, from a server that predates them).
    #[serde(default)]
    pub log_syncs: u64,
    #[serde(default)]
    pub log_sync_micros: u64,
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
    /// Report commit notices accepted without waiting for their answers
    /// ([`Peer::may_send_ahead`]).
    pub(crate) pipeline_commit_notices: bool,
    /// How long such a notice is held back for the next request to carry.
    pub(crate) commit_notice_delay: Duration,
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
    /// Report commit notices accepted without waiting for their answers
    /// ([`Peer::may_send_ahead`]).
    pipeline_notices: bool,
    /// How long such a notice is held back before it is sent ([`Peer::hold_back`]).
    notice_delay: Duration,
}

/// An AppendEntries stream to one peer: requests go in `tx`, answers come back on `rx` in order.
#[derive(Debug)]
struct AppendStream {
    tx: mpsc::Sender<Payload>,
    rx: tonic::Streaming<Payload>,
    /// The first unread answer belongs to a commit notice sent ahead (already reported as
    /// accepted); it must be read, and be `Success`, before the next request's own answer.
    owed: bool,
    /// The last request the peer answered on this stream, if it answered `Success`.
    acked: Option<Acked>,
    /// A commit notice held back, shared with the timer that sends it if no request comes
    /// first ([`Peer::hold_back`]).
    held: Arc<std::sync::Mutex<HeldNotice>>,
}

/// A commit notice reported accepted and held back: the next request carries its commit index,
/// so it is dropped then, unless its timer sent it first.
#[derive(Debug, Default)]
struct HeldNotice {
    /// The notice, until the timer sends it or the next request drops it.
    payload: Option<Payload>,
    /// The timer sent it: its answer is owed before the next request's.
    sent: bool,
}

impl AppendStream {
    fn held(&self) -> std::sync::MutexGuard<'_, HeldNotice> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A request the peer accepted: the leader's vote, the last log ID the peer then held from
/// this leader (its matching point), and the highest commit index sent since.
#[derive(Debug)]
struct Acked {
    vote: crate::types::Vote,
    last: Option<crate::types::LogId>,
    commit: Option<crate::types::LogId>,
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
            pipeline_notices: self.pipeline_commit_notices,
            notice_delay: self.commit_notice_delay,
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
    /// reads its answer, after the answer owed to a commit notice sent ahead if there is one.
    /// The stream is kept for the next call only after its own answer was read.
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
                AppendStream {
                    tx,
                    rx: answers,
                    owed: false,
                    acked: None,
                    held: Arc::default(),
                }
            }
        };
        if stream.tx.send(payload).await.is_err() {
            return Err(Status::unavailable("the append stream to the peer closed"));
        }
        if stream.owed {
            let answer = next_answer(&mut stream.rx).await?;
            let notice: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = unpack(&answer)?;
            match notice {
                Ok(AppendEntriesResponse::Success) => stream.owed = false,
                // The peer holds a higher vote, so that is this request's answer as well. The
                // stream is dropped with the request's own answer unread.
                Ok(AppendEntriesResponse::HigherVote(_)) => return Ok(answer),
                other => {
                    return Err(Status::aborted(format!(
                        "node {} did not accept the commit notice sent ahead ({other:?}); \
                         the request is to be resent",
                        self.target
                    )))
                }
            }
        }
        let answer = next_answer(&mut stream.rx).await?;
        self.stream = Some(stream);
        Ok(answer)
    }

    /// Whether `req` is a commit notice that may be reported accepted at once, and then held
    /// back ([`Peer::hold_back`]) or sent with its answer read before the next request's: an
    /// AppendEntries without entries that only moves the commit index on, from the same
    /// leader, right after the peer accepted all before it on the kept stream, with no answer
    /// owed.
    ///
    /// openraft 0.9's replication task sends such a notice after each commit and waits for its
    /// answer before it sends the next entries: a round trip, and the follower's work on a
    /// message, per commit and follower. Held back, it is dropped when the next request comes
    /// first, since that request carries a commit index at least as high (the replication
    /// task's commit index only grows, and a new leader gets new clients); under load that is
    /// every notice (docs/benchmarks.md). A notice that is never sent costs nothing but time:
    /// the commit index only ever needs to reach a follower eventually, and every later
    /// request, heartbeats included, carries it.
    ///
    /// Reporting it accepted early changes nothing openraft 0.9.25 relies on (the version is
    /// pinned for this): for a request without entries, a `Success` moves no matching index and
    /// only records the time, which feeds nothing but the `millis_since_quorum_ack` metric. A
    /// refusal still counts, one request later: the next request reads the notice's answer
    /// first; a `HigherVote` becomes its own answer, and anything else but `Success` fails it,
    /// so openraft sends it again and gets the peer's own answer to it. Leadership checks
    /// (`ensure_linearizable`) are never reported early: openraft sends each on a new client,
    /// which holds no accepted request.
    fn may_send_ahead(&self, req: &AppendEntriesRequest<TypeConfig>) -> bool {
        let Some(stream) = &self.stream else {
            return false;
        };
        let Some(acked) = &stream.acked else {
            return false;
        };
        self.pipeline_notices
            && !stream.owed
            && req.entries.is_empty()
            && acked.vote == req.vote
            && acked.last == req.prev_log_id
            && req.leader_commit > acked.commit
    }

    /// Holds commit notice `payload` back on `stream`, reported accepted: the next request
    /// drops it ([`Peer::settle_held_back`]), unless `delay` passes first and a timer sends it.
    fn hold_back(stream: &AppendStream, payload: Payload, delay: Duration) {
        stream.held().payload = Some(payload);
        let shared = stream.held.clone();
        let tx = stream.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut held = shared.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = held.payload.take() {
                // The stream is idle (no request is sent while a notice is held), so this
                // fails only if the stream is gone; the commit index then goes with the next
                // request on a new one.
                held.sent = tx.try_send(p).is_ok();
            }
        });
    }

    /// Before a request: drops the commit notice held back on the stream, which this request
    /// makes redundant, or, if its timer sent it, records its answer as owed.
    fn settle_held_back(&mut self) {
        if let Some(stream) = self.stream.as_mut() {
            let sent = {
                let mut held = stream.held();
                held.payload = None;
                std::mem::take(&mut held.sent)
            };
            if sent {
                stream.owed = true;
            }
        }
    }

    async fn append(
        &mut self,
        req: &AppendEntriesRequest<TypeConfig>,
        ttl: Duration,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        if !self.unary_only {
            let mut payload = pack(req).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
            self.settle_held_back();
            if self.may_send_ahead(req) {
                if let Some(stream) = self.stream.as_mut() {
                    // Held back, or sent at once with its answer owed.
                    let accepted = if self.notice_delay.is_zero() {
                        stream.tx.try_send(payload).map(|()| stream.owed = true)
                    } else {
                        Self::hold_back(stream, payload, self.notice_delay);
                        Ok(())
                    };
                    match accepted {
                        Ok(()) => {
                            if let Some(acked) = stream.acked.as_mut() {
                                acked.commit = req.leader_commit;
                            }
                            return Ok(AppendEntriesResponse::Success);
                        }
                        Err(mpsc::error::TrySendError::Full(p)) => payload = p,
                        Err(mpsc::error::TrySendError::Closed(p)) => {
                            self.stream = None;
                            payload = p;
                        }
                    }
                }
            }
            let reply = tokio::time::timeout(ttl, self.append_streamed(payload)).await;
            match &reply {
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                    tracing::info!(
                        target = self.target,
                        "peer serves no AppendEntries stream; sending one call per AppendEntries"
                    );
                    self.unary_only = true;
                }
                _ => {
                    let r = self.finish(reply, ttl);
                    if let Some(stream) = self.stream.as_mut() {
                        stream.acked =
                            matches!(r, Ok(AppendEntriesResponse::Success)).then(|| Acked {
                                vote: req.vote,
                                last: req.entries.last().map(|e| e.log_id).or(req.prev_log_id),
                                commit: req.leader_commit,
                            });
                    }
                    return r;
                }
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

/// The next answer on an AppendEntries stream; its end is an error.
async fn next_answer(rx: &mut tonic::Streaming<Payload>) -> Result<Payload, Status> {
    rx.message()
        .await?
        .ok_or_else(|| Status::unavailable("the peer ended the append stream"))
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

/// The answers a follower sends back on an AppendEntries stream.
type AnswerStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Payload, Status>> + Send + 'static>>;

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
        tracing::trace!(bytes = payload.data.len(), "append_entries received");
        let req: AppendEntriesRequest<TypeConfig> = unpack(payload)?;
        self.heard(&req.vote);
        let answer = self.inner.raft.append_entries(req).await;
        tracing::trace!("append_entries answered");
        pack(&answer)
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

    type AppendEntriesStreamStream = AnswerStream;

    /// Answers a leader's AppendEntries stream one request at a time, in order, until the
    /// leader closes it, a request cannot be read, or this node stops.
    ///
    /// The answers are computed where they are sent: the stream of answers reads the next
    /// request and hands it to Raft when the HTTP/2 stream asks for its next message, so a
    /// request reaches Raft and its answer reaches the wire without a hand-off to a task of
    /// its own (one thread wake fewer per AppendEntries; docs/benchmarks.md).
    async fn append_entries_stream(
        &self,
        request: Request<tonic::Streaming<Payload>>,
    ) -> Result<tonic::Response<Self::AppendEntriesStreamStream>, Status> {
        use futures::StreamExt as _;
        let requests = request.into_inner();
        let mut stopping = self.inner.stopping.subscribe();
        let stopped = async move {
            let _ = stopping.wait_for(|s| *s).await;
        };
        // The state: the requests, this node, and whether the last answer was an error (the
        // stream ends after it).
        let answers = futures::stream::unfold(
            (requests, self.clone(), false),
            |(mut requests, this, failed)| async move {
                if failed {
                    return None;
                }
                let Ok(Some(payload)) = requests.message().await else {
                    return None;
                };
                let answer = this.append_one(&payload).await;
                let failed = answer.is_err();
                Some((answer, (requests, this, failed)))
            },
        )
        .take_until(stopped);
        Ok(tonic::Response::new(Box::pin(answers)))
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
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use openraft::{CommittedLeaderId, Vote};
    use pb::raft_service_server::{RaftService, RaftServiceServer};
    use tokio::sync::watch;

    use super::*;
    use crate::types::LogId;

    type Answer = Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>;

    /// A peer that answers AppendEntries by a script: the stream's requests take the scripted
    /// answers in turn, each after its delay, then `Success`; unary calls get `Success`. With
    /// `streams: false` it serves no stream. While `hold` is true, answers wait.
    #[derive(Clone)]
    struct Scripted {
        streams: bool,
        answers: Arc<Mutex<VecDeque<(Duration, Answer)>>>,
        hold: Arc<watch::Sender<bool>>,
        unary_calls: Arc<AtomicUsize>,
        streams_opened: Arc<AtomicUsize>,
        stream_requests: Arc<AtomicUsize>,
        stream_answers: Arc<AtomicUsize>,
    }

    fn success() -> Answer {
        Ok(AppendEntriesResponse::Success)
    }

    fn higher_vote() -> Answer {
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
            self.streams_opened.fetch_add(1, Ordering::SeqCst);
            let mut requests = request.into_inner();
            let (tx, rx) = mpsc::channel(4);
            let this = self.clone();
            tokio::spawn(async move {
                while let Ok(Some(_)) = requests.message().await {
                    this.stream_requests.fetch_add(1, Ordering::SeqCst);
                    let next = this.answers.lock().unwrap().pop_front();
                    let (late, answer) = next.unwrap_or((Duration::ZERO, success()));
                    tokio::time::sleep(late).await;
                    let _ = this.hold.subscribe().wait_for(|held| !*held).await;
                    this.stream_answers.fetch_add(1, Ordering::SeqCst);
                    if tx.send(pack(&answer)).await.is_err() {
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

    fn scripted(streams: bool, answers: Vec<(Duration, Answer)>) -> Scripted {
        Scripted {
            streams,
            answers: Arc::new(Mutex::new(answers.into())),
            hold: Arc::new(watch::channel(false).0),
            unary_calls: Arc::default(),
            streams_opened: Arc::default(),
            stream_requests: Arc::default(),
            stream_answers: Arc::default(),
        }
    }

    fn count(n: &AtomicUsize) -> usize {
        n.load(Ordering::SeqCst)
    }

    /// A peer for node 2, as a replication task gets it: commit notices reported accepted
    /// early or not, and held back for `delay` (zero: sent at once).
    async fn peer_with(addr: &str, pipeline_commit_notices: bool, delay: Duration) -> Peer {
        let mut network = Network {
            pipeline_commit_notices,
            commit_notice_delay: delay,
            ..Network::default()
        };
        network.new_client(2, &BasicNode::new(addr)).await
    }

    /// Serves `server` and connects a peer to it that reports commit notices accepted early
    /// and holds them back for `delay`; with a 2 s deadline per call.
    async fn connect(server: &Scripted, delay: Duration) -> (Peer, RPCOption) {
        let addr = serve(server.clone()).await;
        let p = peer_with(&addr, true, delay).await;
        (p, RPCOption::new(Duration::from_secs(2)))
    }

    /// An AppendEntries without entries at log index 7 of leader 1 in term 3, carrying commit
    /// index `commit`.
    fn empty_append(commit: Option<u64>) -> AppendEntriesRequest<TypeConfig> {
        let log_id = |index| LogId::new(CommittedLeaderId::new(3, 1), index);
        AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(log_id(7)),
            leader_commit: commit.map(log_id),
            entries: vec![],
        }
    }

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        empty_append(None)
    }

    /// Waits (bounded) until `n` reaches `want`.
    async fn until(n: &AtomicUsize, want: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while count(n) < want {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("count stayed at {} below {want}", count(n)));
    }

    #[tokio::test]
    async fn a_dropped_call_never_lends_its_late_answer_to_the_next() {
        let server = scripted(true, vec![(Duration::from_millis(400), higher_vote())]);
        let addr = serve(server.clone()).await;
        let mut p = peer_with(&addr, true, Duration::ZERO).await;
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
        assert_eq!(count(&server.stream_requests), 3);
        assert_eq!(count(&server.unary_calls), 0, "all went on streams");
    }

    #[tokio::test]
    async fn a_stream_carries_answers_in_order_on_one_stream() {
        let server = scripted(true, vec![(Duration::ZERO, higher_vote())]);
        let (mut p, ttl) = connect(&server, Duration::ZERO).await;
        let first = p.append_entries(heartbeat(), ttl.clone()).await.unwrap();
        assert!(matches!(first, AppendEntriesResponse::HigherVote(_)));
        for _ in 0..5 {
            let r = p.append_entries(heartbeat(), ttl.clone()).await.unwrap();
            assert_eq!(r, AppendEntriesResponse::Success);
        }
        // Only the first request on a stream gets the HigherVote: all six went on one stream.
        assert_eq!(count(&server.stream_requests), 6);
        assert_eq!(count(&server.streams_opened), 1);
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_one_call_per_append() {
        let server = scripted(false, vec![]);
        let (mut p, ttl) = connect(&server, Duration::ZERO).await;
        for commit in [None, Some(8), Some(9)] {
            let r = p.append_entries(empty_append(commit), ttl.clone()).await;
            assert_eq!(r.unwrap(), AppendEntriesResponse::Success);
        }
        assert!(p.unary_only);
        assert_eq!(count(&server.unary_calls), 3, "no commit notice went ahead");
    }

    #[tokio::test]
    async fn a_commit_notice_goes_ahead_and_its_answer_is_read_before_the_next() {
        let server = scripted(true, notice_then_next_answers());
        let (mut p, ttl) = connect(&server, Duration::ZERO).await;
        let r = p.append_entries(heartbeat(), ttl.clone()).await.unwrap();
        assert_eq!(r, AppendEntriesResponse::Success);
        // The peer now holds its answers back: the notice is reported accepted once sent.
        server.hold.send_replace(true);
        let r = p.append_entries(empty_append(Some(8)), ttl.clone()).await;
        assert_eq!(r.unwrap(), AppendEntriesResponse::Success);
        until(&server.stream_requests, 2).await;
        assert_eq!(
            count(&server.stream_answers),
            1,
            "the notice is not answered yet"
        );
        // The next request (a heartbeat: the commit index has not moved) waits for both answers.
        next_waits_for_the_notice_answer(p, &server, ttl).await;
    }

    /// The peer's answers to a first request, a notice and the next request: the last is a
    /// higher vote, so that the next request getting the notice's answer instead would show.
    fn notice_then_next_answers() -> Vec<(Duration, Answer)> {
        vec![
            (Duration::ZERO, success()),
            (Duration::ZERO, success()),
            (Duration::ZERO, higher_vote()),
        ]
    }

    /// With the notice sent on `p` and the peer holding its answers back, the next request
    /// (a heartbeat) waits until the peer answered both the notice and it, on the one stream,
    /// and gets its own answer ([`notice_then_next_answers`]).
    async fn next_waits_for_the_notice_answer(mut p: Peer, server: &Scripted, ttl: RPCOption) {
        let next = tokio::spawn(async move {
            let r = p.append_entries(empty_append(Some(8)), ttl).await;
            (p, r)
        });
        // The peer reads the next request only after it answered the notice; give the call
        // time to finish wrongly, then let the peer answer.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!next.is_finished(), "answered before the peer answered");
        assert_eq!(count(&server.stream_answers), 1);
        server.hold.send_replace(false);
        let (p, r) = next.await.unwrap();
        assert_eq!(r.unwrap(), higher_vote().unwrap());
        assert_eq!(count(&server.stream_requests), 3);
        assert_eq!(count(&server.stream_answers), 3);
        assert_eq!(count(&server.streams_opened), 1);
        assert!(p.stream.as_ref().is_some_and(|s| !s.owed));
    }

    #[tokio::test]
    async fn a_refused_notice_fails_the_next_request_which_then_gets_its_own_answer() {
        let conflict: Answer = Ok(AppendEntriesResponse::Conflict);
        let server = scripted(
            true,
            vec![
                (Duration::ZERO, success()),
                (Duration::ZERO, conflict),
                (Duration::ZERO, success()),
            ],
        );
        let (mut p, ttl) = connect(&server, Duration::ZERO).await;
        p.append_entries(heartbeat(), ttl.clone()).await.unwrap();
        let notice = p.append_entries(empty_append(Some(8)), ttl.clone()).await;
        assert_eq!(notice.unwrap(), AppendEntriesResponse::Success);
        next_fails_then_goes_on_a_new_stream(&mut p, &server, &ttl).await;
        // A notice right after goes ahead again.
        assert!(p.stream.as_ref().is_some_and(|s| s.acked.is_some()));
        let r = p.append_entries(empty_append(Some(9)), ttl).await;
        assert_eq!(r.unwrap(), AppendEntriesResponse::Success);
        assert!(p.stream.as_ref().is_some_and(|s| s.owed));
    }

    #[tokio::test]
    async fn a_held_back_notice_is_dropped_when_the_next_request_comes_first() {
        let server = scripted(true, vec![]);
        let (mut p, ttl) = connect(&server, Duration::from_secs(30)).await;
        p.append_entries(heartbeat(), ttl.clone()).await.unwrap();
        let r = p.append_entries(empty_append(Some(8)), ttl.clone()).await;
        assert_eq!(r.unwrap(), AppendEntriesResponse::Success);
        assert_eq!(count(&server.stream_requests), 1, "the notice is held back");
        // The next request carries the commit index: the notice is never sent.
        let r = p.append_entries(empty_append(Some(8)), ttl).await;
        assert_eq!(r.unwrap(), AppendEntriesResponse::Success);
        assert_eq!(count(&server.stream_requests), 2);
        assert_eq!(count(&server.stream_answers), 2);
        let stream = p.stream.as_ref().unwrap();
        assert!(!stream.owed && stream.held().payload.is_none());
    }

    #[tokio::test]
    async fn a_held_back_notice_is_sent_after_the_delay_and_answered_before_the_next() {
        let server = scripted(true, notice_then_next_answers());
        let (mut p, ttl) = connect(&server, Duration::from_millis(20)).await;
        p.append_entries(heartbeat(), ttl.clone()).await.unwrap();
        server.hold.send_replace(true);
        let r = p.append_entries(empty_append(Some(8)), ttl.clone()).await;
        assert_eq!(r.unwrap(), AppendEntriesResponse::Success);
        // No next request comes: the timer sends the notice.
        until(&server.stream_requests, 2).await;
        // The next request waits for the notice's answer, then gets its own.
        next_waits_for_the_notice_answer(p, &server, ttl).await;
    }

    #[tokio::test]
    async fn a_held_back_notice_refused_when_sent_fails_the_next_request() {
        let conflict: Answer = Ok(AppendEntriesResponse::Conflict);
        let server = scripted(
            true,
            vec![(Duration::ZERO, success()), (Duration::ZERO, conflict)],
        );
        let (mut p, ttl) = connect(&server, Duration::from_millis(20)).await;
        p.append_entries(heartbeat(), ttl.clone()).await.unwrap();
        let r = p.append_entries(empty_append(Some(8)), ttl.clone()).await;
        assert_eq!(r.unwrap(), AppendEntriesResponse::Success);
        until(&server.stream_answers, 2).await;
        next_fails_then_goes_on_a_new_stream(&mut p, &server, &ttl).await;
    }

    /// With a notice on `p` that the peer refused, the next request fails; resent, it goes on
    /// a new stream and gets the peer's own answer.
    async fn next_fails_then_goes_on_a_new_stream(
        p: &mut Peer,
        server: &Scripted,
        ttl: &RPCOption,
    ) {
        let next = p.append_entries(empty_append(Some(8)), ttl.clone()).await;
        let Err(RPCError::Network(e)) = next else {
            panic!("the refusal fails the next request: {next:?}")
        };
        assert!(e.to_string().contains("commit notice"), "{e}");
        let r = p.append_entries(empty_append(Some(8)), ttl.clone()).await;
        assert_eq!(r.unwrap(), AppendEntriesResponse::Success);
        assert_eq!(count(&server.streams_opened), 2);
    }

    /// A peer whose first request was accepted and whose second (a commit notice) is answered
    /// with a higher vote.
    async fn accepted_then_higher_vote(pipeline_commit_notices: bool) -> (Peer, RPCOption) {
        let server = scripted(
            true,
            vec![(Duration::ZERO, success()), (Duration::ZERO, higher_vote())],
        );
        let addr = serve(server).await;
        let mut p = peer_with(&addr, pipeline_commit_notices, Duration::ZERO).await;
        let ttl = RPCOption::new(Duration::from_secs(2));
        p.append_entries(heartbeat(), ttl.clone()).await.unwrap();
        (p, ttl)
    }

    #[tokio::test]
    async fn a_higher_vote_on_a_notice_is_the_next_requests_answer() {
        let (mut p, ttl) = accepted_then_higher_vote(true).await;
        let notice = p.append_entries(empty_append(Some(8)), ttl.clone()).await;
        assert_eq!(notice.unwrap(), AppendEntriesResponse::Success);
        let next = p.append_entries(empty_append(Some(8)), ttl).await.unwrap();
        assert!(
            matches!(next, AppendEntriesResponse::HigherVote(_)),
            "{next:?}"
        );
        assert!(p.stream.is_none(), "the stream went with its unread answer");
    }

    #[tokio::test]
    async fn a_new_client_or_a_changed_log_waits_for_the_answer() {
        // A leadership check is sent on a new client: its answer is always the peer's own.
        let server = scripted(true, vec![(Duration::ZERO, higher_vote())]);
        let (mut p, ttl) = connect(&server, Duration::ZERO).await;
        let r = p.append_entries(empty_append(Some(8)), ttl.clone()).await;
        assert!(matches!(r.unwrap(), AppendEntriesResponse::HigherVote(_)));
        // Notices at another log index or from another leader than the one accepted wait too.
        p.append_entries(empty_append(Some(8)), ttl.clone())
            .await
            .unwrap();
        let mut moved = empty_append(Some(9));
        moved.prev_log_id = Some(LogId::new(CommittedLeaderId::new(3, 1), 9));
        let mut other_leader = empty_append(Some(9));
        other_leader.vote = Vote::new_committed(4, 3);
        for req in [moved, other_leader] {
            server
                .answers
                .lock()
                .unwrap()
                .push_back((Duration::ZERO, higher_vote()));
            let r = p.append_entries(req, ttl.clone()).await.unwrap();
            assert!(matches!(r, AppendEntriesResponse::HigherVote(_)), "{r:?}");
            p.append_entries(empty_append(Some(8)), ttl.clone())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn with_pipelining_off_a_notice_waits_for_its_answer() {
        let (mut p, ttl) = accepted_then_higher_vote(false).await;
        let r = p.append_entries(empty_append(Some(8)), ttl).await.unwrap();
        assert!(matches!(r, AppendEntriesResponse::HigherVote(_)), "{r:?}");
    }
}
