//! How the server reaches the replicated state: propose commands (any server; forwarded to the
//! leader), read the locally applied tables after a linearizable barrier, and subscribe to the
//! changes as they are applied.

use std::future::Future;

use plinth_storage::{ChangeEvent, Command, CommandError, Response, Store};
use tokio::sync::broadcast;

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
        }
    }
}

impl Replicated for LocalState {
    fn node_id(&self) -> u64 {
        self.node_id
    }

    async fn propose(&self, command: Command) -> Result<Response, StateError> {
        let mut idx = self.next_index.lock().unwrap_or_else(|p| p.into_inner());
        let proposal = plinth_storage::Proposal {
            now: self.clock.now().unix_timestamp(),
            command,
        };
        let applied = self
            .store
            .apply(*idx, Some(&proposal), &[])
            .map_err(|e| StateError::Fatal(e.to_string()))?;
        *idx += 1;
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
}
