//! The replicated state machine on RocksDB ([`openraft::storage::RaftStateMachine`]).
//!
//! Applying a log entry is one atomic RocksDB batch (the command's changes, the global revision
//! and the applied log ID with membership; a command batch is applied one command per RocksDB
//! batch, see `plinth_storage::Store::apply`), written to RocksDB's memtables only, not to its
//! write-ahead log: the entries it applies are already durable in the Raft log on a quorum, so
//! a crash can only lose the batches applied since the last memtable flush (flushes are atomic
//! across column families, and each batch carries its applied log ID), and the restarted node
//! applies those entries again, deterministically, to the same revisions. Recording a snapshot
//! point persists the state first (`Store::persist_state`), so nothing is purged from the log
//! before the state it produced is on disk. Reads never see the gap: linearizable reads wait
//! for the applied index.
//!
//! The database is the snapshot. Building one (openraft asks every `snapshot_after_logs`
//! entries, to purge the log) only records a snapshot point: the applied log ID and membership,
//! with the state persisted, in a small file beside the database
//! (`Store::snapshot_put`); it no longer copies the state, which cost every server O(state)
//! each time (docs/benchmarks.md). Only when a snapshot is sent to a follower (or openraft
//! reads it at startup) is the state exported, from one RocksDB snapshot, so it is consistent
//! while apply goes on, with the applied log ID it was read at: never before the recorded
//! point, so the log it needs after it is still there. Both run on the blocking pool.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use plinth_storage::codec::{b64, decode, encode};
use plinth_storage::{Change, ChangeEvent, Response, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot, watch, Mutex};

use crate::types::{
    Entry, LogId, NodeId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

const T_SM: &str = "sm_meta";
const T_SNAP: &str = "snapshot";

/// How many change events a slow subscriber may fall behind before it sees `Lagged` and must
/// reload.
pub const CHANGE_CHANNEL_CAPACITY: usize = 4096;

/// The applied log ID and membership, stored with every applied entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

impl AppliedState {
    /// Decodes the applied state as the store keeps it; none recorded yet is the default.
    fn decode(bytes: Option<Vec<u8>>) -> Result<Self, plinth_storage::StorageError> {
        bytes.map_or_else(|| Ok(Self::default()), |b| decode(T_SM, &b))
    }
}

/// A snapshot as saved: its metadata (encoded apart) and the state export.
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// How builds before snapshot files saved a snapshot inside the database.
#[derive(Deserialize)]
struct LegacySnapshot {
    meta: SnapshotMeta,
    #[serde(with = "b64")]
    data: Vec<u8>,
}

fn sm_read(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(AnyError::new(&e)).into()
}

fn sm_write(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}

fn snap_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
}

/// The state machine. Build it with [`StateMachine::open`].
#[derive(Debug)]
pub struct StateMachine {
    store: Store,
    /// Entries are applied only once durable on this node ([`crate::leader_sync`]).
    leader_sync: Option<Arc<crate::leader_sync::LeaderSync>>,
    applied: AppliedState,
    changes: broadcast::Sender<ChangeEvent>,
    /// The revision of the last change that [`Change::affects_trust`], if watched
    /// ([`StateMachine::with_trust_watch`]).
    trust: Option<watch::Sender<u64>>,
    snapshots: Arc<SnapshotShared>,
    /// Dropped with the state machine, which tells [`StateMachine::with_close_signal`]'s
    /// receiver that this handle on the database is gone.
    _closed: Option<oneshot::Sender<()>>,
}

#[derive(Debug, Default)]
struct SnapshotShared {
    /// Serializes saving snapshots, so an older build never replaces a newer snapshot.
    lock: Mutex<()>,
    counter: AtomicU64,
}

impl StateMachine {
    /// Loads the applied state from `store`.
    pub fn open(
        store: Store,
        changes: broadcast::Sender<ChangeEvent>,
    ) -> Result<Self, plinth_storage::StorageError> {
        let applied = AppliedState::decode(store.applied_state()?)?;
        Ok(Self {
            store,
            leader_sync: None,
            applied,
            changes,
            trust: None,
            snapshots: Arc::default(),
            _closed: None,
        })
    }

    /// Also publishes the revision of each change that [`Change::affects_trust`] on `trust`:
    /// a watcher of those few changes is not woken by every applied write, as a subscriber
    /// of all changes is.
    pub fn with_trust_watch(mut self, trust: watch::Sender<u64>) -> Self {
        self.trust = Some(trust);
        self
    }

    /// A receiver that completes once this state machine is dropped. openraft runs the state
    /// machine on a worker task that its shutdown does not wait for, and the state machine
    /// holds the database open: a node reopened in the same process waits for this first.
    pub fn with_close_signal(mut self) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        self._closed = Some(tx);
        (self, rx)
    }

    /// Applies an entry only once no early-reported append of the leader's holds it unsynced.
    pub fn with_leader_sync(mut self, sync: Arc<crate::leader_sync::LeaderSync>) -> Self {
        self.leader_sync = Some(sync);
        self
    }

    fn publish(&self, events: Vec<ChangeEvent>) {
        if let (Some(trust), Some(revision)) =
            (&self.trust, ChangeEvent::last_trust_revision(&events))
        {
            trust.send_replace(revision);
        }
        for e in events {
            // No subscribers is fine.
            let _ = self.changes.send(e);
        }
    }
}

/// Builds snapshots from a consistent view of the database.
#[derive(Debug)]
pub struct SnapshotBuilder {
    store: Store,
    shared: Arc<SnapshotShared>,
}

fn current_snapshot(store: &Store) -> Result<Option<StoredSnapshot>, StorageError> {
    if let Some(file) = store.snapshot_get().map_err(sm_read)? {
        let meta = decode(T_SNAP, &file.meta).map_err(sm_read)?;
        return Ok(Some(StoredSnapshot {
            meta,
            data: file.data,
        }));
    }
    store
        .legacy_snapshot_get()
        .map_err(sm_read)?
        .map(|bytes| {
            decode::<LegacySnapshot>(T_SNAP, &bytes)
                .map(|l| StoredSnapshot {
                    meta: l.meta,
                    data: l.data,
                })
                .map_err(sm_read)
        })
        .transpose()
}

/// The current snapshot's metadata, without reading its data from a snapshot file.
fn current_snapshot_meta(store: &Store) -> Result<Option<SnapshotMeta>, StorageError> {
    match store.snapshot_meta().map_err(sm_read)? {
        Some(meta) => Ok(Some(decode(T_SNAP, &meta).map_err(sm_read)?)),
        None => Ok(current_snapshot(store)?.map(|s| s.meta)),
    }
}

fn save_snapshot(store: &Store, snap: &StoredSnapshot) -> Result<(), StorageError> {
    let meta = encode(T_SNAP, &snap.meta).map_err(snap_err)?;
    store.snapshot_put(&meta, &snap.data).map_err(snap_err)
}

/// Runs `f` on Tokio's blocking pool. Snapshots read, encode and write the whole state (tens
/// or hundreds of MB): done on a runtime worker, that blocked the worker for long enough that
/// Raft heartbeats and AppendEntries answers missed their deadline and followers started
/// elections under load (found with `raft-bench --rounds`).
async fn blocking<T, F>(f: F) -> Result<T, StorageError>
where
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        StorageError::from(StorageIOError::<NodeId>::read_state_machine(
            AnyError::error(format!("snapshot task failed: {e}")),
        ))
    })?
}

fn build_stored_snapshot(store: &Store, n: u64) -> Result<StoredSnapshot, StorageError> {
    let (data, applied) = store.export_state().map_err(sm_read)?;
    let applied = AppliedState::decode(applied).map_err(sm_read)?;
    let meta = snapshot_meta(applied, n);
    Ok(StoredSnapshot { meta, data })
}

fn snapshot_meta(applied: AppliedState, n: u64) -> SnapshotMeta {
    let snapshot_id = match applied.last_applied {
        Some(id) => format!("{}-{}-{}-{n}", id.leader_id, id.index, std::process::id()),
        None => format!("none-{}-{n}", std::process::id()),
    };
    SnapshotMeta {
        last_log_id: applied.last_applied,
        last_membership: applied.membership,
        snapshot_id,
    }
}

/// Records a snapshot point: the state applied now, made durable (`Store::persist_state`), so
/// that openraft may purge the log up to it. The state itself is not copied: the database
/// is the snapshot, exported only when one is sent ([`StateMachine::get_current_snapshot`]).
fn record_snapshot_point(store: &Store, n: u64) -> Result<SnapshotMeta, StorageError> {
    let applied = AppliedState::decode(store.applied_state().map_err(sm_read)?).map_err(sm_read)?;
    store.persist_state().map_err(sm_write)?;
    Ok(snapshot_meta(applied, n))
}

/// Saves `meta` as the current snapshot point unless a newer one is saved already.
fn save_snapshot_point(store: &Store, meta: &SnapshotMeta) -> Result<(), StorageError> {
    let newer_exists =
        current_snapshot_meta(store)?.is_some_and(|cur| cur.last_log_id > meta.last_log_id);
    if !newer_exists {
        save_snapshot(
            store,
            &StoredSnapshot {
                meta: meta.clone(),
                data: Vec::new(),
            },
        )?;
    }
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// Records the snapshot point only (see `record_snapshot_point`); openraft uses just the
    /// metadata of what this returns, to purge the log. The data it returns is empty.
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let n = self.shared.counter.fetch_add(1, Ordering::Relaxed);
        let _guard = self.shared.lock.lock().await;
        let store = self.store.clone();
        let meta = blocking(move || {
            let meta = record_snapshot_point(&store, n)?;
            save_snapshot_point(&store, &meta)?;
            Ok(meta)
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        // Tasks already woken go first. On a follower, the AppendEntries answer and this apply
        // (of what the request committed) become ready together on the thread that synced the
        // log. Without the yield, system-call traces showed that thread waking the other
        // runtime worker and the answer leaving from there, 24-50 µs later on a 2-CPU VM.
        // Yielding once lets the answer go first (docs/benchmarks.md: 1-client writes +4%).
        tokio::task::yield_now().await;
        if let (Some(sync), Some(last)) = (&self.leader_sync, entries.last()) {
            let last = last.log_id;
            sync.wait_durable(last.index)
                .await
                .map_err(|e| StorageIOError::apply(last, AnyError::new(&e)))?;
        }
        let mut responses = Vec::new();
        let mut events = Vec::new();
        for entry in entries {
            self.applied.last_applied = Some(entry.log_id);
            let proposal = match entry.payload {
                EntryPayload::Blank => None,
                EntryPayload::Normal(p) => Some(p),
                EntryPayload::Membership(m) => {
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    None
                }
            };
            let applied_bytes = encode(T_SM, &self.applied).map_err(sm_write)?;
            let applied = self
                .store
                .apply(entry.log_id.index, proposal.as_ref(), &applied_bytes)
                .map_err(|e| StorageIOError::apply(entry.log_id, AnyError::new(&e)))?;
            if let (Some(p), Err(e)) = (&proposal, &applied.response.result) {
                tracing::debug!(index = entry.log_id.index, command = p.command.name(), error = %e, "command refused");
            }
            responses.push(applied.response);
            events.extend(applied.changes);
        }
        self.publish(events);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            shared: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let bytes = data.len();
        let _guard = self.snapshots.lock.lock().await;
        let store = self.store.clone();
        let applied = blocking(move || store.import_state(&data).map_err(snap_err)).await?;
        let applied = AppliedState::decode(applied).map_err(snap_err)?;
        if applied.last_applied != meta.last_log_id {
            return Err(StorageIOError::write_snapshot(
                Some(meta.signature()),
                AnyError::error(format!(
                    "snapshot data is applied up to {:?} but its metadata says {:?}",
                    applied.last_applied, meta.last_log_id
                )),
            )
            .into());
        }
        self.applied = AppliedState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let store = self.store.clone();
        let point = meta.clone();
        blocking(move || save_snapshot_point(&store, &point)).await?;
        tracing::info!(
            last_log_index = meta.last_log_id.map_or(0, |l| l.index),
            bytes,
            "installed a snapshot from the leader"
        );
        let revision = self.store.revision().map_err(sm_read)?;
        self.publish(vec![ChangeEvent {
            revision,
            log_index: meta.last_log_id.map_or(0, |l| l.index),
            change: Change::Reset,
        }]);
        Ok(())
    }

    /// `None` until a snapshot point was recorded (built or installed); then the state as
    /// applied now, exported from one RocksDB snapshot, with its own applied log ID: at or
    /// after the point, so the log it needs was not purged.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let store = self.store.clone();
        let n = self.snapshots.counter.fetch_add(1, Ordering::Relaxed);
        Ok(blocking(move || {
            let Some(point) = current_snapshot_meta(&store)? else {
                return Ok(None);
            };
            let mut s = build_stored_snapshot(&store, n)?;
            // Nothing applied since the point: the same state, so the same snapshot.
            if s.meta.last_log_id == point.last_log_id {
                s.meta.snapshot_id = point.snapshot_id;
            }
            Ok(Some(s))
        })
        .await?
        .map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
