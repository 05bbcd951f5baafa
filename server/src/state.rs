//! How the server reaches the replicated state: propose commands (any server; forwarded to the
//! leader), read the locally applied tables after a linearizable barrier, and subscribe to the
//! changes as they are applied.

use std::future::Future;

use plinth_storage::{ChangeEvent, Command, CommandError, Response, Store};
use tokio::sync::{broadcast, watch};

/// Why a proposal or a read barrier failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The command was applied and refused (the caller's mistake or a lost race).
    #[error(transparent)]
    Refused(#[from] CommandError),
    /// No leader could be reached, or this node cannot serve right now; retryable.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// A membership change the cluster refused (a node that is no member, an ID or address
    /// already taken); nothing changed. Not retryable as it is.
    #[error("{0}")]
    Rejected(String),
    /// Local storage failed; this node must stop serving.
    #[error("storage failure: {0}")]
    Fatal(String),
}

/// The replicated state as the server uses it.
pub trait Replicated: Send + Sync + 'static {
    /// This server's node ID.
    fn node_id(&self) -> u64;
    /// Commits `command` through Raft (from any node) and returns the state machine's response.
    /// A refused command comes back as `Err(StateError::Refused)`.
    fn propose(
        &self,
        command: Command,
    ) -> impl Future<Output = Result<Response, StateError>> + Send;
    /// Returns once this node has applied everything committed before the call (ReadIndex), so
    /// that reads of [`Replicated::store`] after it are linearizable.
    fn linearizable(&self) -> impl Future<Output = Result<(), StateError>> + Send;
    /// The locally applied tables.
    fn store(&self) -> &Store;
    /// Applied changes, in order.
    fn subscribe(&self) -> broadcast::Receiver<ChangeEvent>;
    /// The revision of the last applied change that `Change::affects_trust` (bundles, CA
    /// authorities, a snapshot installed): it changes on those only, so its watchers are not
    /// woken by every other write, as subscribers of all changes are.
    fn trust_changes(&self) -> watch::Receiver<u64>;
    /// Leader, term and members as this node sees them.
    fn cluster_status(&self) -> impl Future<Output = ClusterView> + Send;
    /// Adds a server (as a learner, then a voter unless `learner_only`).
    fn add_node(
        &self,
        node_id: u64,
        address: String,
        learner_only: bool,
    ) -> impl Future<Output = Result<(), StateError>> + Send;
    /// Removes a server from the cluster.
    fn remove_node(&self, node_id: u64) -> impl Future<Output = Result<(), StateError>> + Send;
}

/// One member as `cluster status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub node_id: u64,
    pub address: String,
    pub voter: bool,
    /// The member's applied log index, if it answered.
    pub applied_index: Option<u64>,
    /// The member's Raft log syncs since it started and their total time in microseconds, if
    /// it answered (none without Raft).
    pub log_syncs: Option<(u64, u64)>,
}

/// The cluster as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    pub node_id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub members: Vec<MemberView>,
}

/// Turns a response into its outcome, refusals into errors.
pub fn outcome(r: Response) -> Result<plinth_storage::Outcome, StateError> {
    r.result.map_err(StateError::Refused)
}

/// Applies commands straight to a local store, in call order, with no replication. For tests of
/// server logic that is not about consensus; the server binary always goes through Raft.
#[derive(Debug)]
pub struct LocalState {
    node_id: u64,
    store: Store,
    clock: std::sync::Arc<dyn crate::clock::Clock>,
    next_index: std::sync::Mutex<u64>,
    changes: broadcast::Sender<ChangeEvent>,
    trust: watch::Sender<u64>,
}

impl LocalState {
    /// Wraps an open store.
    pub fn new(node_id: u64, store: Store, clock: std::sync::Arc<dyn crate::clock::Clock>) -> Self {
        let (changes, _) = broadcast::channel(4096);
        Self {
            node_id,
            store,
            clock,
            next_index: std::sync::Mutex::new(1),
            changes,
            trust: watch::channel(0).0,
        }
    }
}

impl Replicated for LocalState {
    fn node_id(&self) -> u64 {
        self.node_id
    }

    async fn propose(&self, command: Command) -> Result<Response, StateError> {
        let mut idx = self.next_index.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.now();
        let now_ms = i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
        let proposal = plinth_storage::Proposal::at_millis(now_ms, command);
        let applied = self
            .store
            .apply(*idx, Some(&proposal), &[])
            .map_err(|e| StateError::Fatal(e.to_string()))?;
        *idx += 1;
        if let Some(revision) = ChangeEvent::last_trust_revision(&applied.changes) {
            self.trust.send_replace(revision);
        }
        for c in applied.changes {
            let _ = self.changes.send(c);
        }
        match applied.response.result {
            Ok(_) => Ok(applied.response),
            Err(e) => Err(StateError::Refused(e)),
        }
    }

    async fn linearizable(&self) -> Result<(), StateError> {
        Ok(())
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.changes.subscribe()
    }

    fn trust_changes(&self) -> watch::Receiver<u64> {
        self.trust.subscribe()
    }

    async fn cluster_status(&self) -> ClusterView {
        let applied = *self.next_index.lock().unwrap_or_else(|p| p.into_inner()) - 1;
        ClusterView {
            node_id: self.node_id,
            leader: Some(self.node_id),
            term: 1,
            members: vec![MemberView {
                node_id: self.node_id,
                address: String::new(),
                voter: true,
                applied_index: Some(applied),
                log_syncs: None,
            }],
        }
    }

    async fn add_node(&self, _: u64, _: String, _: bool) -> Result<(), StateError> {
        Err(StateError::Unavailable(
            "this state is not replicated; membership changes need a Raft cluster".into(),
        ))
    }

    async fn remove_node(&self, _: u64) -> Result<(), StateError> {
        Err(StateError::Unavailable(
            "this state is not replicated; membership changes need a Raft cluster".into(),
        ))
    }
}

/// The replicated state of a real server: a Raft node.
#[derive(Debug)]
pub struct RaftState {
    node: plinth_raft::RaftNode,
}

impl RaftState {
    /// Wraps a started node.
    pub fn new(node: plinth_raft::RaftNode) -> Self {
        Self { node }
    }

    /// The Raft node.
    pub fn node(&self) -> &plinth_raft::RaftNode {
        &self.node
    }

    /// Stops Raft and closes the store.
    pub async fn shutdown(self) -> Result<(), StateError> {
        self.node.shutdown().await.map_err(node_err)
    }
}

fn node_err(e: plinth_raft::NodeError) -> StateError {
    if let plinth_raft::NodeError::Membership(m) = e {
        StateError::Rejected(format!("membership change refused: {m}"))
    } else if e.is_fatal() {
        StateError::Fatal(e.to_string())
    } else {
        StateError::Unavailable(e.to_string())
    }
}

impl Replicated for RaftState {
    fn node_id(&self) -> u64 {
        self.node.id()
    }

    async fn propose(&self, command: Command) -> Result<Response, StateError> {
        let r = self.node.write(command).await.map_err(node_err)?;
        match r.result {
            Ok(_) => Ok(r),
            Err(e) => Err(StateError::Refused(e)),
        }
    }

    async fn linearizable(&self) -> Result<(), StateError> {
        self.node.linearizable_barrier().await.map_err(node_err)
    }

    fn store(&self) -> &Store {
        self.node.store()
    }

    fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.node.subscribe()
    }

    fn trust_changes(&self) -> watch::Receiver<u64> {
        self.node.trust_changes()
    }

    async fn cluster_status(&self) -> ClusterView {
        let s = self.node.cluster_status().await;
        ClusterView {
            node_id: s.node_id,
            leader: s.leader,
            term: s.term,
            members: s
                .members
                .into_iter()
                .map(|m| MemberView {
                    node_id: m.node_id,
                    address: m.addr,
                    voter: m.voter,
                    applied_index: m.status.as_ref().and_then(|st| st.applied_index),
                    log_syncs: m.status.map(|st| (st.log_syncs, st.log_sync_micros)),
                })
                .collect(),
        }
    }

    async fn add_node(
        &self,
        node_id: u64,
        address: String,
        learner_only: bool,
    ) -> Result<(), StateError> {
        self.node
            .add_learner(node_id, address)
            .await
            .map_err(node_err)?;
        if !learner_only {
            self.node.promote(node_id).await.map_err(node_err)?;
        }
        Ok(())
    }

    async fn remove_node(&self, node_id: u64) -> Result<(), StateError> {
        self.node.remove(node_id).await.map_err(node_err)
    }
}
