//! [`RaftNode`]: one plinth server's member of the Raft cluster, and the API the server calls:
//! writes forwarded to the leader, linearizable reads, membership changes and cluster status.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, SnapshotPolicy};
use plinth_storage::{ChangeEvent, Command, Response, Store};
use serde::{Deserialize, Serialize};
use tokio::net::TcpSocket;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

use crate::log_store::LogStore;
use crate::network::pb::raft_service_client::RaftServiceClient;
use crate::network::pb::raft_service_server::RaftServiceServer;
use crate::network::{
    connect, pack, unpack, ForwardError, MembershipOp, Network, NodeStatus, RaftGrpc,
    MAX_MESSAGE_BYTES,
};
use crate::proposer::{client_write_error, Proposer};
use crate::state_machine::{StateMachine, CHANGE_CHANNEL_CAPACITY};
use crate::types::{NodeId, Raft};

/// Longest pause between attempts while no leader is known; a pause ends as soon as this node
/// learns of a leader (see [`Inner::await_leader_change`]).
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Whether a leader replicates new entries while it syncs them, by default
/// ([`RaftConfig::parallel_leader_sync`]).
pub const DEFAULT_PARALLEL_LEADER_SYNC: bool = true;
/// Whether a leader reports a commit notice accepted without waiting for its answer, by
/// default ([`RaftConfig::pipeline_commit_notices`]).
pub const DEFAULT_PIPELINE_COMMIT_NOTICES: bool = true;
/// How long a leader holds a commit notice back for the next request to carry, by default
/// ([`RaftConfig::commit_notice_delay`]).
pub const DEFAULT_COMMIT_NOTICE_DELAY_US: u64 = 1000;
/// Default heartbeat interval (see [`RaftConfig::new`] for the rationale).
pub const DEFAULT_HEARTBEAT_MS: u64 = 70;
/// Default lower bound of the election timeout.
pub const DEFAULT_ELECTION_TIMEOUT_MIN_MS: u64 = 80;
/// Default upper bound of the election timeout, which openraft 0.9 also uses as the leader lease.
pub const DEFAULT_ELECTION_TIMEOUT_MAX_MS: u64 = 160;
/// Default number of applied log entries between two snapshots.
pub const DEFAULT_SNAPSHOT_AFTER_LOGS: u64 = 5000;
/// Default number of log entries kept after a snapshot.
pub const DEFAULT_LOGS_KEPT_AFTER_SNAPSHOT: u64 = 1000;

/// Configuration of one node. Build with [`RaftConfig::new`], adjust fields, then
/// [`RaftNode::start`] validates it.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    pub node_id: NodeId,
    /// Where to serve the peer gRPC API. Port 0 picks a free port (see [`RaftNode::addr`]).
    pub listen_addr: SocketAddr,
    /// `host:port` peers use to reach this node; defaults to the bound listen address.
    pub advertise_addr: Option<String>,
    /// The RocksDB directory (created 0700).
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many applied log entries since the last one.
    pub snapshot_after_logs: u64,
    /// Log entries kept after a snapshot (the rest is purged).
    pub logs_kept_after_snapshot: u64,
    /// How long a write, read or membership change may wait for the cluster.
    pub request_timeout: Duration,
    /// mTLS for every peer connection. Exactly one of this and `insecure_plaintext` is set.
    pub tls: Option<crate::tls::PeerTls>,
    /// Serve and dial peers over plain TCP, unauthenticated: only for tests and local
    /// development, and only when set explicitly.
    pub insecure_plaintext: bool,
    /// As leader, replicate new entries while this node syncs them, instead of after
    /// ([`crate::leader_sync`]). On by default: where a sync takes 0.3 ms it raised 1-client
    /// throughput by about a quarter with a p99 closer to etcd's; where it took 0.15 ms it
    /// gained 0-12% with a longer p99 in most pairs (docs/benchmarks.md). `false` is openraft
    /// 0.9's own order.
    pub parallel_leader_sync: bool,
    /// As leader, report the AppendEntries that only carries a new commit index to a follower
    /// (a *commit notice*, which openraft 0.9 sends after every commit) accepted without
    /// waiting for its answer, and hold it back for [`RaftConfig::commit_notice_delay`]: the
    /// next request to that follower carries the commit index anyway, so under load the notice
    /// is never sent. One sent is answered before the next request is (the conditions and why
    /// it is safe: `Peer::may_send_ahead` in `raft/src/network.rs`). On by default: with the
    /// 1 ms delay it took about a tenth of the servers' CPU per write off and raised 64-client
    /// throughput by a few percent (docs/benchmarks.md); `false` is openraft 0.9's own order.
    pub pipeline_commit_notices: bool,
    /// How long a commit notice is held back before it is sent (with
    /// [`RaftConfig::pipeline_commit_notices`]); zero sends it at once. At most the heartbeat
    /// interval: a heartbeat that moves the commit index on is held back too. A follower of
    /// an idle cluster learns of a commit this much later.
    pub commit_notice_delay: Duration,
}

/// The Raft timing setting that breaks a rule of [`timing_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimingFault {
    /// Zero, or not below the election timeout minimum: a follower that hears no heartbeat
    /// within its election timeout starts an election.
    HeartbeatInterval,
    /// Not below the election timeout maximum: servers draw their timeouts from that range so
    /// that they do not all stand at once.
    ElectionTimeoutMin,
    /// Above the heartbeat interval: a heartbeat that moves the commit index on is held back
    /// as long.
    CommitNoticeDelay,
}

/// The rules the Raft timings must keep together, checked in this order; the first one
/// broken, if any. One definition for [`RaftConfig::validate`] and for the server's config
/// file check, which words its errors with its own keys and units.
pub fn timing_fault(
    heartbeat_interval: Duration,
    election_timeout_min: Duration,
    election_timeout_max: Duration,
    commit_notice_delay: Duration,
) -> Option<TimingFault> {
    if heartbeat_interval.is_zero() || heartbeat_interval >= election_timeout_min {
        Some(TimingFault::HeartbeatInterval)
    } else if election_timeout_min >= election_timeout_max {
        Some(TimingFault::ElectionTimeoutMin)
    } else if commit_notice_delay > heartbeat_interval {
        Some(TimingFault::CommitNoticeDelay)
    } else {
        None
    }
}

impl RaftConfig {
    /// Defaults: 70 ms heartbeat, 80-160 ms election timeout, snapshot every 5000 entries,
    /// keep 1000, 5 s requests. Neither TLS nor plain TCP is chosen: set one.
    ///
    /// The timing is for servers on one LAN (round trips well under 1 ms). openraft 0.9 makes
    /// a follower that has heard from a leader wait its leader lease (`election_timeout_max`)
    /// plus its own election timeout before campaigning, so a follower campaigns only after
    /// 240-320 ms without any message from the leader (checked every 5 ms by the
    /// election watchdog, `raft/src/election.rs`), and a dead leader is replaced in about 300 ms
    /// (docs/benchmarks.md). openraft 0.9 also uses the heartbeat interval as the deadline of
    /// every AppendEntries: at 30 ms, a follower whose fsync waited behind a
    /// RocksDB flush missed it, the leader resent, and under sustained load writes stalled and
    /// followers started elections; 70 ms replaces a dead leader as fast (measured) with more
    /// than twice the margin. Across sites with tens of ms of round trip, raise all three
    /// (e.g. 100 ms heartbeat, 500-1000 ms election timeout).
    pub fn new(node_id: NodeId, listen_addr: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_id,
            listen_addr,
            advertise_addr: None,
            data_dir: data_dir.into(),
            heartbeat_interval: Duration::from_millis(DEFAULT_HEARTBEAT_MS),
            election_timeout_min: Duration::from_millis(DEFAULT_ELECTION_TIMEOUT_MIN_MS),
            election_timeout_max: Duration::from_millis(DEFAULT_ELECTION_TIMEOUT_MAX_MS),
            snapshot_after_logs: DEFAULT_SNAPSHOT_AFTER_LOGS,
            logs_kept_after_snapshot: DEFAULT_LOGS_KEPT_AFTER_SNAPSHOT,
            request_timeout: Duration::from_secs(5),
            tls: None,
            insecure_plaintext: false,
            parallel_leader_sync: DEFAULT_PARALLEL_LEADER_SYNC,
            pipeline_commit_notices: DEFAULT_PIPELINE_COMMIT_NOTICES,
            commit_notice_delay: Duration::from_micros(DEFAULT_COMMIT_NOTICE_DELAY_US),
        }
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), NodeError> {
        match (&self.tls, self.insecure_plaintext) {
            (None, false) => {
                return Err(NodeError::Config(
                    "peer connections need mTLS; set insecure_plaintext only to run over plain \
                     TCP for tests"
                        .into(),
                ))
            }
            (Some(_), true) => {
                return Err(NodeError::Config(
                    "peer mTLS and insecure_plaintext are both set; choose one".into(),
                ))
            }
            _ => {}
        }
        if let Some(fault) = timing_fault(
            self.heartbeat_interval,
            self.election_timeout_min,
            self.election_timeout_max,
            self.commit_notice_delay,
        ) {
            return Err(NodeError::Config(match fault {
                TimingFault::HeartbeatInterval => {
                    "heartbeat_interval must be non-zero and below election_timeout_min".into()
                }
                TimingFault::ElectionTimeoutMin => {
                    "election_timeout_min must be below election_timeout_max".into()
                }
                TimingFault::CommitNoticeDelay => format!(
                    "commit_notice_delay ({:?}) must not exceed heartbeat_interval ({:?}): a \
                     heartbeat that moves the commit index on is held back as long",
                    self.commit_notice_delay, self.heartbeat_interval
                ),
            }));
        }
        if self.snapshot_after_logs == 0 || self.request_timeout.is_zero() {
            return Err(NodeError::Config(
                "snapshot_after_logs and request_timeout must be non-zero".into(),
            ));
        }
        Ok(())
    }

    fn openraft(&self) -> Result<openraft::Config, NodeError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        openraft::Config {
            cluster_name: "plinth".into(),
            heartbeat_interval: ms(self.heartbeat_interval),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            install_snapshot_timeout: ms(self.request_timeout),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after_logs),
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            snapshot_max_chunk_size: 1024 * 1024,
            max_payload_entries: MAX_ENTRIES_PER_APPEND,
            ..Default::default()
        }
        .validate()
        .map_err(|e| NodeError::Config(e.to_string()))
    }
}

/// Log entries one replication step sends at most (openraft's `max_payload_entries`, 300 by
/// default); [`crate::log_store::APPEND_BYTES`] bounds their bytes too. A new leader searches
/// each follower's log for the point where it matches, and every probe of that search carries
/// this many entries, all of which the follower usually has already: after a heavy load (20 KB
/// entries) 300 made a new leader send about 6 MB per probe before its first commit. 32 keeps a
/// probe small; in steady replication a message holds one to three entries, far below it.
pub const MAX_ENTRIES_PER_APPEND: u64 = 32;

/// Errors of [`RaftNode`]. [`NodeError::is_fatal`] tells which ones mean the node must stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("no leader is reachable; the cluster may be electing or lack a quorum")]
    NoLeader,
    #[error("the cluster did not answer in time; the outcome of a write is unknown")]
    Timeout,
    #[error("node {node} is unreachable: {reason}")]
    Unreachable { node: NodeId, reason: String },
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("the cluster is already initialized")]
    AlreadyInitialized,
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("storage failure: {0}")]
    Storage(#[from] plinth_storage::StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("raft failure: {0}")]
    Raft(String),
}

impl NodeError {
    /// True if the node can no longer be trusted to serve (storage or Raft core failed).
    pub fn is_fatal(&self) -> bool {
        matches!(self, NodeError::Storage(_) | NodeError::Raft(_))
    }
}

impl From<ForwardError> for NodeError {
    fn from(e: ForwardError) -> Self {
        match e {
            ForwardError::NotLeader { .. } => NodeError::NoLeader,
            ForwardError::Timeout => NodeError::Timeout,
            ForwardError::Membership(m) => NodeError::Membership(m),
            ForwardError::Failed(m) => NodeError::Raft(m),
        }
    }
}

/// A member of the cluster as seen from one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub node_id: NodeId,
    pub addr: String,
    pub voter: bool,
    /// The member's own view, or `None` if it did not answer.
    pub status: Option<NodeStatus>,
}

/// What `plinth-server cluster status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node_id: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub members: Vec<MemberStatus>,
}

/// State shared by the node handle and its gRPC service.
pub(crate) struct Inner {
    pub(crate) id: NodeId,
    pub(crate) raft: Raft,
    store: Store,
    config: RaftConfig,
    changes: broadcast::Sender<ChangeEvent>,
    /// See [`RaftNode::trust_changes`].
    trust: watch::Sender<u64>,
    flusher: Arc<crate::log_store::Flusher>,
    proposer: Proposer,
    /// When this node last heard from its leader (see [`crate::election`]).
    pub(crate) contact: Arc<crate::election::LeaderContact>,
    /// Connections for forwarded writes, reads and membership changes.
    peers: PeerClients,
    /// Set when the node stops: ends the AppendEntries streams it serves, which would otherwise
    /// keep the peer API's graceful shutdown waiting on the leader.
    pub(crate) stopping: tokio::sync::watch::Sender<bool>,
}

/// One client connection per peer for forwarding, opened on first use and kept: before, each
/// forwarded write dialed the leader afresh (a TCP and, between servers, an mTLS handshake per
/// write). A tonic channel reconnects by itself after the peer restarts; a peer whose address
/// changed in the membership gets a new one.
#[derive(Debug, Default)]
struct PeerClients {
    clients: std::sync::Mutex<std::collections::HashMap<NodeId, (String, PeerClient)>>,
}

type PeerClient = RaftServiceClient<tonic::transport::Channel>;

impl PeerClients {
    fn get(
        &self,
        node: NodeId,
        addr: &str,
        connect: impl FnOnce(&str) -> Result<PeerClient, String>,
    ) -> Result<PeerClient, String> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((known, client)) = clients.get(&node) {
            if known == addr {
                return Ok(client.clone());
            }
        }
        let client = connect(addr)?;
        clients.insert(node, (addr.to_owned(), client.clone()));
        Ok(client)
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("id", &self.id)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// Runs `command` if this node is the leader, stamping the leader's clock on it. Commands
    /// that arrive together share a log entry (see [`crate::proposer`]).
    pub(crate) async fn write_local(&self, command: Command) -> Result<Response, ForwardError> {
        match tokio::time::timeout(self.config.request_timeout, self.proposer.write(command)).await
        {
            Err(_) => Err(ForwardError::Timeout),
            Ok(r) => r,
        }
    }

    /// ReadIndex: confirms leadership with a quorum and returns the index a read must wait for.
    pub(crate) async fn read_index_local(&self) -> Result<u64, ForwardError> {
        match tokio::time::timeout(self.config.request_timeout, self.raft.ensure_linearizable())
            .await
        {
            Err(_) => Err(ForwardError::Timeout),
            Ok(Ok(log_id)) => Ok(log_id.map_or(0, |l| l.index)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(ForwardError::NotLeader {
                    leader: f.leader_id,
                })
            }
            // A leader that cannot reach a quorum (peers down or restarting) is not confirmed
            // as leader: retryable, like having no leader, and never fatal to this node.
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {
                Err(ForwardError::NotLeader { leader: None })
            }
            Ok(Err(RaftError::Fatal(f))) => Err(ForwardError::Failed(f.to_string())),
        }
    }

    pub(crate) async fn membership_local(&self, op: MembershipOp) -> Result<(), ForwardError> {
        let raft = &self.raft;
        // Checked on the leader only: its membership is the one the change applies to (a
        // follower's may be a moment behind; it forwards, and the leader checks).
        {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            if m.current_leader == Some(self.id) {
                check_membership_op(m.membership_config.membership(), &op)
                    .map_err(ForwardError::Membership)?;
            }
        }
        let fut = async move {
            match op {
                MembershipOp::AddLearner { node_id, addr } => {
                    raft.add_learner(node_id, BasicNode { addr }, true).await
                }
                MembershipOp::Promote { node_id } => {
                    raft.change_membership(
                        ChangeMembers::AddVoterIds(BTreeSet::from([node_id])),
                        false,
                    )
                    .await
                }
                MembershipOp::Remove { node_id } => {
                    let is_voter = raft
                        .metrics()
                        .borrow()
                        .membership_config
                        .membership()
                        .voter_ids()
                        .any(|v| v == node_id);
                    let change = if is_voter {
                        ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
                    } else {
                        ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
                    };
                    raft.change_membership(change, false).await
                }
            }
        };
        // Adding a learner waits for it to catch up, which can take a snapshot transfer.
        let limit = self.config.request_timeout * 6;
        match tokio::time::timeout(limit, fut).await {
            Err(_) => Err(ForwardError::Timeout),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(client_write_error(e)),
        }
    }

    pub(crate) fn node_status(&self) -> NodeStatus {
        let m = self.raft.metrics().borrow().clone();
        let (log_syncs, log_sync_micros) = self.flusher.sync_stats();
        NodeStatus {
            node_id: self.id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            revision: self.store.revision().unwrap_or_default(),
            log_syncs,
            log_sync_micros,
        }
    }

    /// Waits (at most [`RETRY_PAUSE`]) until this node's view of the leader differs from
    /// `seen`, the leader named by the attempt that just failed (`None` during an election).
    /// Retrying on the change instead of after a fixed pause saves up to a whole pause per
    /// election (measured: part of the leader-failover time).
    async fn await_leader_change(&self, seen: Option<NodeId>) {
        let mut metrics = self.raft.metrics();
        let changed = metrics.wait_for(|m| m.current_leader.is_some() && m.current_leader != seen);
        let _ = tokio::time::timeout(RETRY_PAUSE, changed).await;
    }

    /// Waits (at most the request timeout) until this node's membership shows `op` done. A
    /// follower that forwarded a change learns of it with the leader's next append; until then
    /// its status would still show the cluster as it was, and a caller retrying on that view
    /// would be refused (the node is no longer a member).
    async fn await_membership_shows(&self, op: &MembershipOp) {
        let mut metrics = self.raft.metrics();
        let shown = metrics.wait_for(|m| {
            let membership = m.membership_config.membership();
            match op {
                MembershipOp::AddLearner { node_id, .. } => membership.get_node(node_id).is_some(),
                MembershipOp::Promote { node_id } => membership.voter_ids().any(|v| v == *node_id),
                MembershipOp::Remove { node_id } => membership.get_node(node_id).is_none(),
            }
        });
        if tokio::time::timeout(self.config.request_timeout, shown)
            .await
            .is_err()
        {
            tracing::debug!(
                ?op,
                "the leader made the change; this node has not seen it yet"
            );
        }
    }

    fn peer_client(
        &self,
        node: NodeId,
    ) -> Result<RaftServiceClient<tonic::transport::Channel>, NodeError> {
        let addr = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&node)
            .map(|n| n.addr.clone())
            .ok_or(NodeError::NoLeader)?;
        self.peers
            .get(node, &addr, |addr| {
                connect(addr, self.config.tls.as_ref().map(|t| &t.client))
            })
            .map_err(|reason| NodeError::Unreachable { node, reason })
    }
}

/// Sends `req` to `node` with `rpc` and decodes its `Result<T, ForwardError>` answer.
async fn forward<Req, T, F, Fut>(
    inner: &Inner,
    node: NodeId,
    req: &Req,
    limit: Duration,
    rpc: F,
) -> Result<Result<T, ForwardError>, NodeError>
where
    Req: Serialize,
    T: serde::de::DeserializeOwned,
    F: FnOnce(RaftServiceClient<tonic::transport::Channel>, crate::network::pb::Payload) -> Fut,
    Fut: std::future::Future<
        Output = Result<tonic::Response<crate::network::pb::Payload>, tonic::Status>,
    >,
{
    let client = inner.peer_client(node)?;
    let payload = pack(req).map_err(|s| NodeError::Raft(s.message().to_owned()))?;
    let unreachable = |reason: String| NodeError::Unreachable { node, reason };
    let reply = tokio::time::timeout(limit, rpc(client, payload))
        .await
        .map_err(|_| NodeError::Timeout)?
        .map_err(|s| unreachable(s.to_string()))?;
    unpack(reply.get_ref()).map_err(|s| unreachable(s.to_string()))
}

/// How long shutdown waits for the state-machine worker to let go of the database.
const SM_CLOSE_WAIT: Duration = Duration::from_secs(10);

/// One node of the cluster. Dropping it without [`RaftNode::shutdown`] leaves tasks running
/// until the runtime ends.
#[derive(Debug)]
pub struct RaftNode {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop_server: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    /// The election watchdog ([`crate::election`]).
    watchdog: tokio::task::AbortHandle,
    /// Sends a held-back commit index on ([`crate::leader_sync`]).
    commit_pusher: Option<tokio::task::AbortHandle>,
    /// Completes when openraft's state-machine worker has dropped the state machine, and with
    /// it its handle on the database ([`StateMachine::with_close_signal`]).
    sm_closed: Option<oneshot::Receiver<()>>,
    /// The log store openraft runs on, to write its last committed index at shutdown.
    log: LogStore,
}

impl RaftNode {
    /// Opens the store, starts Raft and serves the peer API. A node that was a member before
    /// resumes from its RocksDB state; a new node waits to be bootstrapped or added.
    pub async fn start(config: RaftConfig) -> Result<Self, NodeError> {
        config.validate()?;
        let raft_config = Arc::new(config.openraft()?);
        let store = Store::open(&config.data_dir)?;
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        let (trust, _) = watch::channel(0);
        let mut sm =
            StateMachine::open(store.clone(), changes.clone())?.with_trust_watch(trust.clone());
        let mut log_store = LogStore::new(store.clone());
        let leader_sync = config
            .parallel_leader_sync
            .then(|| Arc::new(crate::leader_sync::LeaderSync::default()));
        if let Some(sync) = &leader_sync {
            log_store = log_store.with_leader_sync(config.node_id, sync.clone());
            sm = sm.with_leader_sync(sync.clone());
        }
        let (sm, sm_closed) = sm.with_close_signal();
        let flusher = log_store.flusher();
        let network = Network {
            tls: config.tls.as_ref().map(|t| t.client.clone()),
            leader_sync: leader_sync.clone(),
            pipeline_commit_notices: config.pipeline_commit_notices,
            commit_notice_delay: config.commit_notice_delay,
        };
        let log = log_store.clone();
        let raft = Raft::new(config.node_id, raft_config, network, log_store, sm)
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;

        let listen = config.listen_addr;
        let listen_err = |source| NodeError::Listen {
            addr: listen,
            source,
        };
        let socket = if listen.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(listen_err)?;
        socket.set_reuseaddr(true).map_err(listen_err)?;
        socket.bind(listen).map_err(listen_err)?;
        let listener = socket.listen(1024).map_err(listen_err)?;
        let addr = listener.local_addr().map_err(listen_err)?;

        let proposer = Proposer::new(raft.clone());
        let contact = Arc::new(crate::election::LeaderContact::new());
        let watchdog = tokio::spawn(crate::election::watch(
            raft.clone(),
            contact.clone(),
            config.election_timeout_min,
            config.election_timeout_max,
        ))
        .abort_handle();
        // A commit index held back from the followers reaches them with a heartbeat as soon as
        // the leader's sync releases it (openraft would otherwise send it with the next write
        // or heartbeat interval).
        let commit_pusher = leader_sync.map(|sync| {
            let raft = raft.clone();
            tokio::spawn(async move {
                while sync.watch().await {
                    if raft.trigger().heartbeat().await.is_err() {
                        break;
                    }
                }
            })
            .abort_handle()
        });
        let inner = Arc::new(Inner {
            id: config.node_id,
            raft,
            store,
            config,
            changes,
            trust,
            flusher,
            proposer,
            contact,
            peers: PeerClients::default(),
            stopping: tokio::sync::watch::channel(false).0,
        });
        let service = RaftServiceServer::new(RaftGrpc {
            inner: inner.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stop_rx.await;
        };
        let builder = tonic::transport::Server::builder().add_service(service);
        let server = match inner.config.tls.as_ref() {
            Some(tls) => {
                let conns = crate::tls::accept_peers(listener, tls.server.clone());
                tokio::spawn(builder.serve_with_incoming_shutdown(
                    tokio_stream::wrappers::ReceiverStream::new(conns),
                    shutdown,
                ))
            }
            None => {
                // Peers' AppendEntries answers are small writes: without TCP_NODELAY, Nagle
                // holds one back until the peer's delayed ACK (~40 ms), which stalled every
                // replication round.
                let incoming = TcpListenerStream::new(listener).map(|conn| {
                    conn.inspect(|s| {
                        if let Err(e) = s.set_nodelay(true) {
                            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a peer connection");
                        }
                    })
                });
                tokio::spawn(builder.serve_with_incoming_shutdown(incoming, shutdown))
            }
        };
        Ok(Self {
            inner,
            addr,
            stop_server: Some(stop_tx),
            server: Some(server),
            watchdog,
            commit_pusher,
            sm_closed: Some(sm_closed),
            log,
        })
    }

    /// This node's ID.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The bound address of the peer API.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address peers should use for this node.
    pub fn advertise_addr(&self) -> String {
        self.inner
            .config
            .advertise_addr
            .clone()
            .unwrap_or_else(|| self.addr.to_string())
    }

    /// The local store. Reads straight from it may be stale; use [`RaftNode::read`] for anything
    /// that decides security (bans, token consumption, authorization).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The openraft handle, for metrics and tests.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Applied changes, in log order, as they become durable on this node. A subscriber that
    /// falls more than [`CHANGE_CHANNEL_CAPACITY`] events behind gets `Lagged` and must reload;
    /// a `Change::Reset` (snapshot installed) also means reload.
    pub fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.inner.changes.subscribe()
    }

    /// The revision of the last applied change that `Change::affects_trust` (bundles, CA
    /// authorities, a snapshot installed); 0 until there is one. Changes when such a change is
    /// applied, and no other: for watchers that only care about those.
    pub fn trust_changes(&self) -> watch::Receiver<u64> {
        self.inner.trust.subscribe()
    }

    /// Makes this node the first member of a new cluster.
    pub async fn bootstrap(&self) -> Result<(), NodeError> {
        let members = BTreeMap::from([(
            self.id(),
            BasicNode {
                addr: self.advertise_addr(),
            },
        )]);
        match self.inner.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                Err(NodeError::AlreadyInitialized)
            }
            Err(e) => Err(NodeError::Raft(e.to_string())),
        }
    }

    /// Proposes `command` through Raft, on the leader (forwarded if this node is not it), and
    /// returns the state machine's answer once committed and applied on the leader. A refused
    /// command is `Ok` with `response.result` an `Err(CommandError)`.
    ///
    /// `Err(Timeout)` or `Err(Unreachable)` mean the outcome is unknown: the command may still
    /// commit. Commands carry their own IDs (entry ID, token), so a retry is refused rather than
    /// applied twice.
    pub async fn write(&self, command: Command) -> Result<Response, NodeError> {
        let deadline = Instant::now() + self.inner.config.request_timeout;
        loop {
            let leader = match self.inner.write_local(command.clone()).await {
                Ok(r) => return Ok(r),
                Err(ForwardError::NotLeader { leader }) => leader,
                Err(e) => return Err(e.into()),
            };
            if let Some(leader) = leader.filter(|l| *l != self.id()) {
                let limit = self.inner.config.request_timeout + Duration::from_secs(1);
                match forward(
                    &self.inner,
                    leader,
                    &command,
                    limit,
                    |mut c, p| async move { c.client_write(p).await },
                )
                .await?
                {
                    Ok(r) => return Ok(r),
                    Err(ForwardError::NotLeader { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if Instant::now() >= deadline {
                return Err(NodeError::NoLeader);
            }
            self.inner.await_leader_change(leader).await;
        }
    }

    /// Waits until this node's state machine reflects every write committed before the call
    /// (ReadIndex through the leader). Afterwards, reads from [`RaftNode::store`] are
    /// linearizable. Fails (never serves stale) when no quorum confirms the leader.
    pub async fn linearizable_barrier(&self) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.inner.config.request_timeout;
        loop {
            let leader = match self.inner.read_index_local().await {
                // On the leader, ensure_linearizable already waited for apply.
                Ok(_) => return Ok(()),
                Err(ForwardError::NotLeader { leader }) => leader,
                Err(e) => return Err(e.into()),
            };
            if let Some(leader) = leader.filter(|l| *l != self.id()) {
                let limit = self.inner.config.request_timeout + Duration::from_secs(1);
                match forward::<_, u64, _, _>(
                    &self.inner,
                    leader,
                    &(),
                    limit,
                    |mut c, p| async move { c.read_index(p).await },
                )
                .await?
                {
                    Ok(index) => {
                        let remaining = deadline.saturating_duration_since(Instant::now());
                        return self
                            .inner
                            .raft
                            .wait(Some(remaining.max(Duration::from_millis(1))))
                            .applied_index_at_least(Some(index), "linearizable read")
                            .await
                            .map(|_| ())
                            .map_err(|_| NodeError::Timeout);
                    }
                    Err(ForwardError::NotLeader { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if Instant::now() >= deadline {
                return Err(NodeError::NoLeader);
            }
            self.inner.await_leader_change(leader).await;
        }
    }

    /// A linearizable read: [`RaftNode::linearizable_barrier`], then `f` on the local store.
    pub async fn read<T, F>(&self, f: F) -> Result<T, NodeError>
    where
        F: FnOnce(&Store) -> Result<T, plinth_storage::StorageError>,
    {
        self.linearizable_barrier().await?;
        Ok(f(&self.inner.store)?)
    }

    async fn membership(&self, op: MembershipOp) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.inner.config.request_timeout;
        loop {
            let leader = match self.inner.membership_local(op.clone()).await {
                Ok(()) => return Ok(()),
                Err(ForwardError::NotLeader { leader }) => leader,
                Err(e) => return Err(e.into()),
            };
            if let Some(leader) = leader.filter(|l| *l != self.id()) {
                let limit = self.inner.config.request_timeout * 6 + Duration::from_secs(1);
                match forward(&self.inner, leader, &op, limit, |mut c, p| async move {
                    c.change_membership(p).await
                })
                .await?
                {
                    Ok(()) => {
                        self.inner.await_membership_shows(&op).await;
                        return Ok(());
                    }
                    Err(ForwardError::NotLeader { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if Instant::now() >= deadline {
                return Err(NodeError::NoLeader);
            }
            self.inner.await_leader_change(leader).await;
        }
    }

    /// Adds `node_id` at `addr` as a learner and waits until it has caught up with the log.
    pub async fn add_learner(
        &self,
        node_id: NodeId,
        addr: impl Into<String>,
    ) -> Result<(), NodeError> {
        self.membership(MembershipOp::AddLearner {
            node_id,
            addr: addr.into(),
        })
        .await
    }

    /// Makes a learner a voter (joint consensus under the hood).
    pub async fn promote(&self, node_id: NodeId) -> Result<(), NodeError> {
        self.membership(MembershipOp::Promote { node_id }).await
    }

    /// Removes a voter or learner from the cluster.
    pub async fn remove(&self, node_id: NodeId) -> Result<(), NodeError> {
        self.membership(MembershipOp::Remove { node_id }).await
    }

    /// This node's own view (no network).
    pub fn node_status(&self) -> NodeStatus {
        self.inner.node_status()
    }

    /// Leader, term and members, with each reachable member's own applied index.
    pub async fn cluster_status(&self) -> ClusterStatus {
        let m = self.inner.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut members = Vec::new();
        for (id, node) in membership.nodes() {
            let status = if *id == self.id() {
                Some(self.inner.node_status())
            } else {
                forward_status(
                    &node.addr,
                    self.inner.config.tls.as_ref().map(|t| &t.client),
                )
                .await
            };
            members.push(MemberStatus {
                node_id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
                status,
            });
        }
        ClusterStatus {
            node_id: self.id(),
            leader: m.current_leader,
            term: m.current_term,
            members,
        }
    }

    /// Fault injection: while `on`, this node's Raft log syncs wait, as on a stalled disk
    /// (appends are still written; nothing waiting for their sync completes).
    pub fn stall_log_sync(&self, on: bool) {
        self.inner.flusher.stall(on);
    }

    /// Stops Raft and the peer API, and closes the store.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        self.watchdog.abort();
        if let Some(p) = &self.commit_pusher {
            p.abort();
        }
        let raft = self.inner.raft.clone();
        raft.shutdown()
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        // A log sync may still be running; it holds the database open.
        self.inner.flusher.wait_idle().await;
        if let Err(e) = self.log.write_committed() {
            tracing::warn!(error = %e, "writing the committed index at shutdown failed");
        }
        // So may the state-machine worker, which openraft's shutdown does not wait for: a node
        // reopened at once in the same process would find the database locked. Bounded, so a
        // worker that never ends cannot hold shutdown up.
        if let Some(closed) = self.sm_closed.take() {
            if tokio::time::timeout(SM_CLOSE_WAIT, closed).await.is_err() {
                tracing::warn!("the state machine was still open when shutdown went on");
            }
        }
        self.inner.stopping.send_replace(true);
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            match server.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(NodeError::Raft(format!("peer API: {e}"))),
                Err(e) => return Err(NodeError::Raft(format!("peer API task: {e}"))),
            }
        }
        Ok(())
    }
}

async fn forward_status(addr: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Option<NodeStatus> {
    let mut client = connect(addr, tls).ok()?;
    let payload = pack(&()).ok()?;
    let reply = tokio::time::timeout(Duration::from_secs(1), client.node_status(payload))
        .await
        .ok()?
        .ok()?;
    unpack(reply.get_ref()).ok()
}

/// Refuses a membership change that openraft would take silently as something else: adding an
/// ID that is already a member at another address (openraft keeps the old address), adding an
/// address another member already has, and removing or promoting an ID that is not a member.
/// Adding a member again at its own address is allowed, so a retried `cluster add` succeeds.
fn check_membership_op(
    membership: &openraft::Membership<NodeId, BasicNode>,
    op: &MembershipOp,
) -> Result<(), String> {
    let addr_of = |id: NodeId| membership.get_node(&id).map(|n| n.addr.as_str());
    match op {
        MembershipOp::AddLearner { node_id, addr } => {
            if let Some(have) = addr_of(*node_id).filter(|have| *have != addr) {
                return Err(format!(
                    "node {node_id} is already a member at {have}; remove it first to give it \
                     another address"
                ));
            }
            if let Some((other, _)) = membership
                .nodes()
                .find(|(id, n)| **id != *node_id && n.addr == *addr)
            {
                return Err(format!("address {addr} is already node {other}'s"));
            }
        }
        MembershipOp::Promote { node_id } | MembershipOp::Remove { node_id } => {
            if addr_of(*node_id).is_none() {
                return Err(format!("node {node_id} is not a member of the cluster"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn timing_faults_name_the_first_rule_broken_and_validate_refuses_each() {
        use TimingFault::{CommitNoticeDelay, ElectionTimeoutMin, HeartbeatInterval};
        let ms = Duration::from_millis;
        // (heartbeat ms, election min ms, election max ms, commit notice delay µs) -> fault
        let cases = [
            ((70, 80, 160, 1_000), None),
            ((70, 80, 160, 70_000), None),
            ((0, 80, 160, 0), Some(HeartbeatInterval)),
            ((80, 80, 160, 0), Some(HeartbeatInterval)),
            ((70, 160, 160, 0), Some(ElectionTimeoutMin)),
            ((70, 80, 160, 70_001), Some(CommitNoticeDelay)),
            // Several broken: the heartbeat first, then the election range.
            ((0, 160, 160, 1_000), Some(HeartbeatInterval)),
            ((70, 160, 80, 71_000), Some(ElectionTimeoutMin)),
        ];
        for ((hb, min, max, delay), want) in cases {
            let got = timing_fault(ms(hb), ms(min), ms(max), Duration::from_micros(delay));
            assert_eq!(got, want, "{hb} {min}-{max} {delay}");
        }

        let mut cfg = RaftConfig::new(1, "127.0.0.1:7001".parse().unwrap(), "/nonexistent");
        cfg.insecure_plaintext = true;
        cfg.validate().unwrap();
        let refused = |f: &dyn Fn(&mut RaftConfig)| {
            let mut c = cfg.clone();
            f(&mut c);
            match c.validate() {
                Err(NodeError::Config(m)) => m,
                other => panic!("not refused: {other:?}"),
            }
        };
        assert!(refused(&|c| c.heartbeat_interval = ms(80)).starts_with("heartbeat_interval"));
        assert!(refused(&|c| c.election_timeout_max = ms(80)).starts_with("election_timeout_min"));
        assert!(refused(&|c| c.commit_notice_delay = ms(71)).starts_with("commit_notice_delay"));
    }

    #[tokio::test]
    async fn a_forwarding_connection_is_reused_until_the_peer_moves() {
        let peers = PeerClients::default();
        let dials = std::cell::Cell::new(0);
        let dial = |addr: &str| {
            dials.set(dials.get() + 1);
            connect(addr, None)
        };
        peers.get(2, "127.0.0.2:7001", dial).unwrap();
        peers.get(2, "127.0.0.2:7001", dial).unwrap();
        peers.get(3, "127.0.0.3:7001", dial).unwrap();
        assert_eq!(dials.get(), 2, "one connection per peer");
        peers.get(2, "127.0.0.9:7001", dial).unwrap();
        assert_eq!(dials.get(), 3, "a moved peer is dialed at its new address");
        peers.get(2, "127.0.0.9:7001", dial).unwrap();
        assert_eq!(dials.get(), 3);
        let failed = peers.get(4, "not an address", |_| Err("bad".into()));
        assert!(failed.is_err());
        assert!(!peers.clients.lock().unwrap().contains_key(&4));
    }

    #[test]
    fn membership_changes_that_openraft_would_misread_are_refused() {
        let node = |addr: &str| BasicNode { addr: addr.into() };
        let m = openraft::Membership::new(
            vec![BTreeSet::from([1, 2])],
            BTreeMap::from([
                (1, node("127.0.0.1:1")),
                (2, node("127.0.0.2:1")),
                (3, node("127.0.0.3:1")),
            ]),
        );
        let add = |id: NodeId, addr: &str| MembershipOp::AddLearner {
            node_id: id,
            addr: addr.into(),
        };
        // A new node at a new address; a member again at its own address (a retry).
        assert_eq!(check_membership_op(&m, &add(4, "127.0.0.4:1")), Ok(()));
        assert_eq!(check_membership_op(&m, &add(3, "127.0.0.3:1")), Ok(()));
        assert_eq!(
            check_membership_op(&m, &add(2, "127.0.0.9:1")),
            Err(
                "node 2 is already a member at 127.0.0.2:1; remove it first to give it \
                 another address"
                    .into()
            )
        );
        assert_eq!(
            check_membership_op(&m, &add(4, "127.0.0.2:1")),
            Err("address 127.0.0.2:1 is already node 2's".into())
        );
        // Voters and learners can be removed and learners promoted; others are no members.
        for id in [2, 3] {
            assert_eq!(
                check_membership_op(&m, &MembershipOp::Remove { node_id: id }),
                Ok(())
            );
        }
        assert_eq!(
            check_membership_op(&m, &MembershipOp::Promote { node_id: 3 }),
            Ok(())
        );
        for op in [
            MembershipOp::Remove { node_id: 9 },
            MembershipOp::Promote { node_id: 9 },
        ] {
            assert_eq!(
                check_membership_op(&m, &op),
                Err("node 9 is not a member of the cluster".into())
            );
        }
    }
}
