//! The Raft log and vote on RocksDB ([`openraft::storage::RaftLogStorage`]).
//!
//! Every write Raft relies on is synced to disk before it is reported done, so nothing Raft
//! acknowledged can be lost by a crash: vote, truncate and purge sync before returning; appended
//! entries are reported flushed (the [`LogFlushed`] callback, which is what lets Raft count them
//! toward a commit or answer a leader) only after an fsync that covers them. Appends use group
//! commit: each is written to RocksDB's write-ahead log unsynced and returns at once, and one
//! background sync then completes every append written before it started, so concurrent
//! writes share an fsync. On the established leader with parallel leader sync (the default),
//! the callback of its own entries comes before the sync, so that openraft 0.9 replicates them
//! while the leader syncs; what keeps such an entry from counting toward anything visible until
//! it is durable is in [`crate::leader_sync`]. The committed index is written unsynced, in the
//! same write as the next append's entries (at shutdown on its own): Raft does not need it
//! durable (a restarted node learns it again), and it reaches disk with the next log sync.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, LogState, OptionalSend, RaftLogReader, StorageIOError};
use plinth_storage::codec::{decode, encode};
use plinth_storage::{MetaKey, Store};

use crate::leader_sync::LeaderSync;
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};

const T_LOG: &str = "raft_log";
const T_META: &str = "raft_meta";

/// The log store. Clones share the database, the group-commit queue and the entry cache.
#[derive(Debug, Clone)]
pub struct LogStore {
    store: Store,
    flusher: Arc<Flusher>,
    cache: Arc<Mutex<EntryCache>>,
    /// This node's ID, when early callbacks are on ([`LogStore::with_leader_sync`]; their
    /// record is the flusher's).
    node_id: Option<NodeId>,
    /// The last vote saved or read.
    vote: Arc<Mutex<Option<Vote>>>,
    /// A committed index saved but not yet written: it goes into the next append's write
    /// ([`LogStore::write_committed`] writes it on its own, at shutdown).
    committed: Arc<Mutex<Option<Option<LogId>>>>,
}

/// Encoded bytes of log entries one AppendEntries carries at most (a single larger entry still
/// goes alone). openraft 0.9 bounds a message only by a count of entries (300), and after
/// group proposal an entry can hold 20 KB of commands: a 6 MB message took longer than the
/// AppendEntries deadline (the heartbeat interval). It also made a new leader slow to commit:
/// it probes each follower's log halfway through its unpurged log, and every probe carried
/// 300 entries the follower already had. With this bound a probe stays small and the search
/// converges in a few quick round trips.
pub const APPEND_BYTES: usize = 512 * 1024;

/// Bytes of encoded entries the cache holds at most.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// The newest appended entries, decoded. Right after an append, Raft reads the same entries
/// back twice (to replicate them and to apply them); without the cache each read decoded them
/// again from RocksDB, which was about a tenth of the leader's CPU under load. The cache mirrors
/// the log exactly for the indexes it holds: append, truncate and purge update it right after
/// the database, under one lock, and a read is served from it only if it holds the whole range.
#[derive(Debug, Default)]
struct EntryCache {
    entries: std::collections::BTreeMap<u64, (Entry, usize)>,
    bytes: usize,
}

impl EntryCache {
    fn insert(&mut self, index: u64, entry: Entry, size: usize) {
        if let Some((_, old)) = self.entries.insert(index, (entry, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
        while self.bytes > CACHE_BYTES {
            let Some((_, (_, size))) = self.entries.pop_first() else {
                break;
            };
            self.bytes -= size;
        }
    }

    /// Drops every index in `range`.
    fn remove(&mut self, range: impl RangeBounds<u64>) {
        let doomed: Vec<u64> = self.entries.range(range).map(|(i, _)| *i).collect();
        for i in doomed {
            if let Some((_, size)) = self.entries.remove(&i) {
                self.bytes -= size;
            }
        }
    }

    /// The entries `start..end`, if every one of them is here.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        self.get_limited(start, end, usize::MAX)
    }

    /// The longest run of entries from `start` (below `end`) whose encoded sizes add up to at
    /// most `max_bytes`, and at least one entry, if every entry of that run is here.
    fn get_limited(&self, start: u64, end: u64, max_bytes: usize) -> Option<Vec<Entry>> {
        if start >= end {
            return Some(Vec::new());
        }
        let mut found = Vec::new();
        let mut bytes = 0usize;
        for (expected, (index, (e, size))) in (start..end).zip(self.entries.range(start..end)) {
            if *index != expected {
                return None;
            }
            bytes = bytes.saturating_add(*size);
            if bytes > max_bytes && !found.is_empty() {
                return Some(found);
            }
            found.push(e.clone());
        }
        (found.len() as u64 == end - start).then_some(found)
    }
}

/// Group commit of appended entries: callbacks of appends already written to the WAL wait here
/// for the next sync.
#[derive(Default)]
pub(crate) struct Flusher {
    queue: Mutex<FlushQueue>,
    /// Sync tasks started and not yet finished (each holds a handle on the database).
    active: AtomicUsize,
    /// A stalled disk, for tests and fault injection: syncs wait while it is set.
    stalled: Mutex<bool>,
    resume: std::sync::Condvar,
    /// Where early-reported appends are recorded and released by each sync.
    leader_sync: Option<Arc<LeaderSync>>,
    /// The last sync took longer than [`INLINE_SYNC_LIMIT`]: syncs go to the sync task, so a
    /// slow disk does not hold a runtime thread.
    slow: AtomicBool,
    /// Log syncs done since the node started, and their total time in microseconds
    /// ([`Flusher::sync_stats`]).
    syncs: AtomicU64,
    sync_micros: AtomicU64,
}

/// The longest a sync may have taken for the next to run on the caller's thread
/// ([`Flusher::sync_or_submit`]).
const INLINE_SYNC_LIMIT: Duration = Duration::from_millis(1);

/// What waits for the next sync: an append's callback, or an early-reported append's ticket
/// ([`LeaderSync::begin`]).
enum Waiter {
    Callback(LogFlushed<TypeConfig>),
    Early(u64),
}

#[derive(Default)]
struct FlushQueue {
    pending: Vec<Waiter>,
    /// A sync task is running and will take `pending` before it stops.
    running: bool,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher")
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Flusher {
    fn lock(&self) -> std::sync::MutexGuard<'_, FlushQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the callback of an append that is already in the WAL; starts a sync task unless
    /// one is running (it will pick this callback up).
    fn submit(self: &Arc<Self>, store: &Store, waiter: Waiter) {
        let start = {
            let mut q = self.lock();
            q.pending.push(waiter);
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            self.active.fetch_add(1, Ordering::SeqCst);
            let me = self.clone();
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                me.run(store);
                me.active.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }

    /// Completes the callback of an append that is already in the WAL: synced right here, on
    /// the caller's thread, when no sync task is running, the disk is not stalled and the last
    /// sync was quick ([`INLINE_SYNC_LIMIT`]), else queued for the sync task.
    ///
    /// openraft 0.9's core waits for each append's callback before it does anything else
    /// (`append_to_log`), so a queued callback never had company to share a sync with: handing
    /// it to a sync thread and back only cost two thread wakes per append (docs/benchmarks.md).
    /// Appends reported early ([`LeaderSync`]) still go to the sync task, which is what lets
    /// the leader's sync overlap replication.
    fn sync_or_submit(self: &Arc<Self>, store: &Store, callback: LogFlushed<TypeConfig>) {
        if !self.may_sync_inline() {
            return self.submit(store, Waiter::Callback(callback));
        }
        let r = self.timed_sync(store);
        callback.log_io_completed(r.map_err(std::io::Error::other));
    }

    /// Whether a sync may run on the caller's thread now ([`Flusher::sync_or_submit`]).
    fn may_sync_inline(&self) -> bool {
        let running = self.lock().running;
        !running
            && !self.slow.load(Ordering::Relaxed)
            && !*self.stalled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Syncs the WAL, recording whether it was slow and how long it took.
    fn timed_sync(&self, store: &Store) -> Result<(), String> {
        let started = Instant::now();
        let r = store.sync().map_err(|e| e.to_string());
        let took = started.elapsed();
        self.slow.store(took > INLINE_SYNC_LIMIT, Ordering::Relaxed);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if let Err(e) = &r {
            tracing::error!(error = %e, "raft log sync failed");
        }
        r
    }

    /// Syncs and completes queued callbacks until the queue is empty. Every callback taken was
    /// queued after its write returned, so the sync that follows covers it.
    fn run(&self, store: Store) {
        loop {
            let batch = {
                let mut q = self.lock();
                if q.pending.is_empty() {
                    q.running = false;
                    return;
                }
                std::mem::take(&mut q.pending)
            };
            {
                let mut stalled = self.stalled.lock().unwrap_or_else(|p| p.into_inner());
                while *stalled {
                    stalled = self.resume.wait(stalled).unwrap_or_else(|p| p.into_inner());
                }
            }
            let r = self.timed_sync(&store);
            let mut tickets = Vec::new();
            for w in batch {
                match w {
                    Waiter::Callback(cb) => {
                        cb.log_io_completed(r.clone().map_err(std::io::Error::other))
                    }
                    Waiter::Early(t) => tickets.push(t),
                }
            }
            if let Some(sync) = &self.leader_sync {
                sync.synced(&tickets, r.is_ok());
            }
        }
    }

    /// The log syncs done since the node started and their total time in microseconds, failed
    /// ones included. Two readings give the mean sync time between them: the disk's share of
    /// every write, as etcd's `etcd_disk_wal_fsync_duration_seconds` gives it for etcd.
    pub(crate) fn sync_stats(&self) -> (u64, u64) {
        (
            self.syncs.load(Ordering::Relaxed),
            self.sync_micros.load(Ordering::Relaxed),
        )
    }

    /// Makes log syncs wait (a stalled disk) until called again with `false`.
    pub(crate) fn stall(&self, on: bool) {
        *self.stalled.lock().unwrap_or_else(|p| p.into_inner()) = on;
        self.resume.notify_all();
    }

    /// Waits (bounded) until no sync task holds the database, so that it can be reopened.
    pub(crate) async fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl LogStore {
    /// A log store whose every append is reported flushed only after its sync.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            flusher: Arc::default(),
            cache: Arc::default(),
            node_id: None,
            vote: Arc::default(),
            committed: Arc::default(),
        }
    }

    /// Reports the appends of node `node_id`'s own entries, while it is the established
    /// leader, flushed before their sync, recording them in `sync` ([`crate::leader_sync`]).
    /// Call it on a new store, before it is cloned: it gives the store its own flusher.
    pub fn with_leader_sync(mut self, node_id: NodeId, sync: Arc<LeaderSync>) -> Self {
        self.node_id = Some(node_id);
        self.flusher = Arc::new(Flusher {
            leader_sync: Some(sync),
            ..Flusher::default()
        });
        self
    }

    fn set_vote(&self, vote: Option<Vote>) {
        *self.vote.lock().unwrap_or_else(|p| p.into_inner()) = vote;
    }

    /// The leader sync to record an append of `entries` in, if it may be reported early: this
    /// node is the established leader of the entries' term and none is a membership change.
    fn early(&self, entries: &[(u64, usize, Entry)]) -> Option<&Arc<LeaderSync>> {
        let (me, sync) = (self.node_id?, self.flusher.leader_sync.as_ref()?);
        let vote = (*self.vote.lock().unwrap_or_else(|p| p.into_inner()))?;
        if !vote.is_committed() || vote.leader_id().voted_for() != Some(me) {
            return None;
        }
        entries
            .iter()
            .all(|(_, _, e)| {
                e.log_id.leader_id == *vote.leader_id()
                    && !matches!(e.payload, openraft::EntryPayload::Membership(_))
            })
            .then_some(sync)
    }

    /// The log ID of the entry at `index`, from the cache, the log or the purge point; `None`
    /// if it cannot be found.
    fn log_id_at(&self, cache: &EntryCache, index: u64) -> Option<LogId> {
        if let Some((e, _)) = cache.entries.get(&index) {
            return Some(e.log_id);
        }
        if let Ok(rows) = self.store.log_range(index, Some(index + 1)) {
            if let Some(e) = decode_entries(rows).ok()?.pop() {
                return Some(e.log_id);
            }
        }
        let purged: LogId = self.meta(MetaKey::LastPurged).ok()??;
        (purged.index == index).then_some(purged)
    }

    fn pending_committed(&self) -> std::sync::MutexGuard<'_, Option<Option<LogId>>> {
        self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a committed index saved since the last append, if any (unsynced, like every
    /// write of it). For shutdown: otherwise it waits for the next append to carry it.
    pub fn write_committed(&self) -> Result<(), plinth_storage::StorageError> {
        let Some(committed) = self.pending_committed().take() else {
            return Ok(());
        };
        let bytes = encode(T_META, &committed)?;
        self.store.meta_put_unsynced(MetaKey::Committed, bytes)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The group-commit queue, to wait for its syncs at shutdown.
    pub(crate) fn flusher(&self) -> Arc<Flusher> {
        self.flusher.clone()
    }

    fn meta<T>(&self, key: MetaKey) -> Result<Option<T>, plinth_storage::StorageError>
    where
        T: serde::de::DeserializeOwned,
    {
        self.store
            .meta_get(key)?
            .map(|bytes| decode(T_META, &bytes))
            .transpose()
    }
}

/// Decodes log rows read from RocksDB.
fn decode_entries(rows: Vec<(u64, Vec<u8>)>) -> Result<Vec<Entry>, StorageError> {
    rows.into_iter()
        .map(|(_, bytes)| decode::<Entry>(T_LOG, &bytes).map_err(read_err))
        .collect()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB>(&mut self, range: RB) -> Result<Vec<Entry>, StorageError>
    where
        RB: RangeBounds<u64> + Clone + Debug + OptionalSend,
    {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => Some(x.saturating_add(1)),
            Bound::Excluded(x) => Some(*x),
            Bound::Unbounded => None,
        };
        if let Some(end) = end {
            if let Some(hit) = self.cache().get(start, end) {
                return Ok(hit);
            }
        }
        decode_entries(self.store.log_range(start, end).map_err(read_err)?)
    }

    /// Entries from `start` (below `end`) up to [`APPEND_BYTES`] of encoded size, and at least
    /// one: what openraft puts in one AppendEntries.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        tracing::trace!(start, end, "log read for replication");
        self.read_limited(start, end, APPEND_BYTES)
    }
}

impl LogStore {
    fn read_limited(
        &self,
        start: u64,
        end: u64,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        if let Some(hit) = self.cache().get_limited(start, end, max_bytes) {
            return Ok(hit);
        }
        decode_entries(
            self.store
                .log_range_limited(start, end, max_bytes)
                .map_err(read_err)?,
        )
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.meta(MetaKey::LastPurged).map_err(read_err)?;
        let last = match self.store.log_last().map_err(read_err)? {
            Some((_, bytes)) => Some(decode::<Entry>(T_LOG, &bytes).map_err(read_err)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let bytes =
            encode(T_META, vote).map_err(|e| StorageIOError::write_vote(AnyError::new(&e)))?;
        self.store
            .meta_put(MetaKey::Vote, bytes)
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)))?;
        self.set_vote(Some(*vote));
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        let vote: Option<Vote> = self
            .meta(MetaKey::Vote)
            .map_err(|e| StorageIOError::read_vote(AnyError::new(&e)))?;
        self.set_vote(vote);
        Ok(vote)
    }

    /// Kept in memory until the next append writes it in the same batch as its entries (or
    /// [`LogStore::write_committed`] does). openraft saves the committed index right before
    /// it hands newly committed entries to the state machine, so a write of its own here sat
    /// in every client write's path on the leader; the saved index is only where a restart
    /// starts re-applying, and one that lags is caught up from the leader.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        *self.pending_committed() = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        if let Some(committed) = *self.pending_committed() {
            return Ok(committed);
        }
        Ok(self
            .meta::<Option<LogId>>(MetaKey::Committed)
            .map_err(read_err)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        tracing::trace!("log append start");
        let mut encoded = Vec::new();
        let mut decoded = Vec::new();
        for e in entries {
            let index = e.log_id.index;
            let bytes = encode(T_LOG, &e).map_err(write_err)?;
            decoded.push((index, bytes.len(), e));
            encoded.push((index, bytes));
        }
        // One lock around the write and the cache update keeps the two in the same order.
        let mut cache = self.cache();
        // The leader sync to record the append in, its first index and the log ID before it.
        let early = self
            .early(&decoded)
            .zip(decoded.first().map(|(first, _, _)| *first))
            .and_then(|(sync, first)| {
                let prev = match first.checked_sub(1) {
                    None => None,
                    Some(p) => Some(self.log_id_at(&cache, p)?),
                };
                Some((sync, first, prev))
            });
        // Cleared only once written: the core saves and appends one after the other, so
        // nothing saves a newer index between this read and the clear.
        let committed = *self.pending_committed();
        let written = match committed
            .map(|c| encode(T_META, &c))
            .transpose()
            .map_err(write_err)?
        {
            Some(bytes) => self
                .store
                .log_append_unsynced_with_meta(encoded, (MetaKey::Committed, bytes)),
            None => self.store.log_append_unsynced(encoded),
        };
        if written.is_ok() && committed.is_some() {
            *self.pending_committed() = None;
        }
        match written {
            Ok(()) => {
                tracing::trace!("log append in the WAL");
                for (index, size, entry) in decoded {
                    cache.insert(index, entry, size);
                }
                drop(cache);
                let ticket = early.and_then(|(sync, first, prev)| sync.begin(first, prev));
                match ticket {
                    Some(t) => {
                        // Recorded as pending first: nothing applies it before its sync.
                        callback.log_io_completed(Ok(()));
                        self.flusher.submit(&self.store, Waiter::Early(t));
                    }
                    None => self.flusher.sync_or_submit(&self.store, callback),
                }
                // With the replication and proposer lines, a write's timeline
                // (RUST_LOG=plinth_raft=trace, docs/benchmarks.md).
                tracing::trace!("log append written");
                Ok(())
            }
            Err(e) => {
                drop(cache);
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut cache = self.cache();
        // Dropped from the cache even if the write fails: a later read then goes to the disk.
        cache.remove(log_id.index..);
        self.store
            .log_truncate_from(log_id.index)
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = encode(T_META, &log_id).map_err(write_err)?;
        let mut cache = self.cache();
        cache.remove(..=log_id.index);
        self.store
            .log_purge_upto(log_id.index, bytes)
            .map_err(write_err)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[tokio::test]
    async fn the_committed_index_is_written_with_the_next_append_or_on_its_own_at_shutdown() {
        use openraft::storage::RaftLogStorageExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let stored = |store: &Store| {
            store
                .meta_get(MetaKey::Committed)
                .unwrap()
                .map(|b| decode::<Option<LogId>>(T_META, &b).unwrap())
        };
        {
            let store = Store::open(&db).unwrap();
            let mut log = LogStore::new(store.clone());
            log.blocking_append((1..=3).map(entry)).await.unwrap();
            log.save_committed(Some(entry(2).log_id)).await.unwrap();
            assert_eq!(stored(&store), None, "not a write of its own");
            assert_eq!(log.read_committed().await.unwrap(), Some(entry(2).log_id));

            log.blocking_append((4..=4).map(entry)).await.unwrap();
            assert_eq!(
                stored(&store),
                Some(Some(entry(2).log_id)),
                "went with the append"
            );
            assert_eq!(log.read_committed().await.unwrap(), Some(entry(2).log_id));

            log.save_committed(Some(entry(4).log_id)).await.unwrap();
            log.write_committed().unwrap();
            assert_eq!(stored(&store), Some(Some(entry(4).log_id)));
            log.write_committed().unwrap();
            store.sync().unwrap();
        }
        let mut log = LogStore::new(Store::open(&db).unwrap());
        assert_eq!(log.read_committed().await.unwrap(), Some(entry(4).log_id));
        let logs = log.try_get_log_entries(1..5).await.unwrap();
        assert_eq!(logs.len(), 4);
    }

    fn indexes(v: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        v.map(|v| v.into_iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn syncs_run_inline_only_while_they_are_quick_and_nothing_else_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("db")).unwrap();
        let f = Flusher::default();
        assert!(f.may_sync_inline());
        f.timed_sync(&store).unwrap();
        f.slow.store(true, Ordering::Relaxed);
        assert!(!f.may_sync_inline(), "the last sync was slow");
        f.slow.store(false, Ordering::Relaxed);
        f.stall(true);
        assert!(
            !f.may_sync_inline(),
            "a stalled disk goes through the sync task"
        );
        f.stall(false);
        f.lock().running = true;
        assert!(!f.may_sync_inline(), "a sync task is running");
        f.lock().running = false;
        assert!(f.may_sync_inline());
    }

    #[test]
    fn the_cache_serves_only_whole_ranges_and_follows_truncate_and_purge() {
        let mut c = EntryCache::default();
        for i in 1..=5 {
            c.insert(i, entry(i), 10);
        }
        assert_eq!(indexes(c.get(2, 5)), Some(vec![2, 3, 4]));
        assert_eq!(indexes(c.get(4, 7)), None, "6 was never appended");
        c.remove(4..);
        assert_eq!(indexes(c.get(3, 5)), None, "truncated");
        c.remove(..=2);
        assert_eq!(indexes(c.get(2, 4)), None, "purged");
        assert_eq!(indexes(c.get(3, 4)), Some(vec![3]));
        assert_eq!(c.bytes, 10);
        // Re-appending an index replaces it without counting it twice.
        c.insert(3, entry(3), 30);
        assert_eq!(c.bytes, 30);
    }

    #[test]
    fn the_cache_serves_a_byte_limited_run_of_at_least_one_entry() {
        let mut c = EntryCache::default();
        for i in 1..=5 {
            c.insert(i, entry(i), 10);
        }
        assert_eq!(indexes(c.get_limited(2, 6, 25)), Some(vec![2, 3]));
        assert_eq!(indexes(c.get_limited(2, 6, 30)), Some(vec![2, 3, 4]));
        assert_eq!(
            indexes(c.get_limited(2, 6, 5)),
            Some(vec![2]),
            "one entry always goes"
        );
        assert_eq!(
            indexes(c.get_limited(4, 9, 1000)),
            None,
            "6.. was never appended"
        );
        assert_eq!(
            indexes(c.get_limited(4, 9, 15)),
            Some(vec![4]),
            "cut before the gap"
        );
        c.remove(3..=3);
        assert_eq!(
            indexes(c.get_limited(2, 6, 1000)),
            None,
            "a hole is never skipped"
        );
        assert_eq!(indexes(c.get_limited(5, 5, 10)), Some(vec![]));
    }

    /// A limited read is a prefix of the full read, bounded by encoded bytes, whether it is
    /// served from the cache or from RocksDB.
    #[test]
    fn a_limited_read_is_a_byte_bounded_prefix_from_cache_or_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = LogStore::new(store.clone());
        let encoded: Vec<(u64, Vec<u8>)> = (1..=20)
            .map(|i| (i, encode(T_LOG, &entry(i)).unwrap()))
            .collect();
        let size = encoded[0].1.len();
        store.log_append(encoded.clone()).unwrap();
        let read = |log: &LogStore, start, end, max| {
            log.read_limited(start, end, max)
                .unwrap()
                .into_iter()
                .map(|e| e.log_id.index)
                .collect::<Vec<_>>()
        };
        // From RocksDB (the cache is empty).
        assert_eq!(read(&log, 3, 21, 4 * size), vec![3, 4, 5, 6]);
        assert_eq!(read(&log, 3, 21, 4 * size + size / 2), vec![3, 4, 5, 6]);
        assert_eq!(read(&log, 3, 5, 100 * size), vec![3, 4]);
        assert_eq!(read(&log, 3, 21, 1), vec![3]);
        assert_eq!(read(&log, 21, 30, 1), Vec::<u64>::new());
        // From the cache, with the same answers: the entries are gone from RocksDB.
        for (i, bytes) in &encoded {
            log.cache().insert(*i, entry(*i), bytes.len());
        }
        store.log_truncate_from(1).unwrap();
        assert_eq!(store.log_range(1, None).unwrap(), vec![]);
        assert_eq!(read(&log, 3, 21, 4 * size), vec![3, 4, 5, 6]);
        assert_eq!(read(&log, 3, 5, 100 * size), vec![3, 4]);
        assert_eq!(read(&log, 3, 21, 1), vec![3]);
    }

    #[test]
    fn the_cache_drops_the_oldest_entries_beyond_its_budget() {
        let mut c = EntryCache::default();
        let size = CACHE_BYTES / 4;
        for i in 1..=6 {
            c.insert(i, entry(i), size);
        }
        assert_eq!(c.bytes, 4 * size);
        assert_eq!(indexes(c.get(1, 3)), None);
        assert_eq!(indexes(c.get(3, 7)), Some(vec![3, 4, 5, 6]));
    }
}
