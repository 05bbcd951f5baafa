//! The RocksDB database: opening it, the Raft log and metadata, the typed state-machine tables and
//! their indexes, and snapshot export/import.

use std::fmt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use plinth_spiffe::{Selector, SpiffeId, TrustDomain};
use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, Direction, FlushOptions, IteratorMode,
    Options, ReadOptions, SliceTransform, WriteBatch, WriteOptions, DB,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{decode, encode};
use crate::model::{
    AttestedAgent, CaAuthority, FederationRelationship, JoinToken, RegistrationEntry, StoredBundle,
};
use crate::wal_presize::Presizer;
use crate::StorageError;

/// Raft log entries, keyed by big-endian index. Values are opaque to this crate.
pub const CF_RAFT_LOG: &str = "raft_log";
/// Raft metadata (vote, committed, last purged), keyed by [`MetaKey`].
pub const CF_RAFT_META: &str = "raft_meta";
/// The current snapshot (metadata and data) as built or installed last.
pub const CF_SNAPSHOT: &str = "snapshot";
/// State-machine metadata: the global revision and the Raft applied state.
pub const CF_SM_META: &str = "sm_meta";
pub const CF_ENTRIES: &str = "entries";
pub const CF_ENTRIES_BY_PARENT: &str = "entries_by_parent";
pub const CF_ENTRIES_BY_SPIFFE_ID: &str = "entries_by_spiffe_id";
pub const CF_ENTRIES_BY_SELECTOR: &str = "entries_by_selector";
pub const CF_AGENTS: &str = "agents";
pub const CF_JOIN_TOKENS: &str = "join_tokens";
pub const CF_BUNDLES: &str = "bundles";
pub const CF_FEDERATION: &str = "federation";
pub const CF_CA_JOURNAL: &str = "ca_journal";

/// The column families that make up the replicated state (and so a snapshot), in a fixed order:
/// a snapshot names a table by its position here, so only append to this list.
pub const STATE_CFS: [&str; 10] = [
    CF_SM_META,
    CF_ENTRIES,
    CF_ENTRIES_BY_PARENT,
    CF_ENTRIES_BY_SPIFFE_ID,
    CF_ENTRIES_BY_SELECTOR,
    CF_AGENTS,
    CF_JOIN_TOKENS,
    CF_BUNDLES,
    CF_FEDERATION,
    CF_CA_JOURNAL,
];

const SM_REVISION: &[u8] = b"revision";
const SM_APPLIED: &[u8] = b"applied";
/// How far a partly applied command batch got (see `Store::apply`).
pub(crate) const SM_BATCH_PROGRESS: &[u8] = b"batch_progress";
/// The last entry ID apply made (see `crate::entry_id`).
pub(crate) const SM_LAST_ENTRY_ID: &[u8] = b"last_entry_id";
const SNAPSHOT_CURRENT: &[u8] = b"current";
const SNAPSHOT_MAGIC: &[u8; 4] = b"PLSN";
const SNAPSHOT_VERSION: u8 = 1;
const SNAPSHOT_FILE_MAGIC: &[u8; 4] = b"PLSF";
const SNAPSHOT_FILE_VERSION: u8 = 1;
/// Bytes of a snapshot file written between two syncs.
const SNAPSHOT_SYNC_BYTES: usize = 4 * 1024 * 1024;

/// A saved snapshot: the caller's encoding of its metadata, and the state export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    pub meta: Vec<u8>,
    pub data: Vec<u8>,
}

/// Keys of the Raft metadata table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKey {
    Vote,
    Committed,
    LastPurged,
}

impl MetaKey {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            MetaKey::Vote => b"vote",
            MetaKey::Committed => b"committed",
            MetaKey::LastPurged => b"last_purged",
        }
    }
}

/// A handle on the database. Cheap to clone; all clones share one RocksDB instance.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    path: PathBuf,
    /// Bytes of state-machine batches written to the memtables since their last flush.
    unflushed: Arc<AtomicU64>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Creates (or truncates) `path` for writing, with mode 0600 from the first byte: for keys,
/// SVIDs and snapshots (the state holds join tokens).
pub fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Creates `path` (and parents) with mode 0700, and tightens it to 0700 if it already existed.
pub fn create_private_dir(path: &Path) -> Result<(), StorageError> {
    let err = |source| StorageError::DataDir {
        path: path.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

pub(crate) fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn key_u64(table: &'static str, key: &[u8]) -> Result<u64, StorageError> {
    let arr: [u8; 8] = key.try_into().map_err(|_| StorageError::Corrupt {
        table,
        reason: format!("key of {} bytes, expected 8", key.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// `a \0 b`: index keys. Neither SPIFFE IDs nor selectors can contain a NUL byte.
pub(crate) fn index_key(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len() + 1);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn sync_opts() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

/// Options of every column family. Apply looks up keys that mostly do not exist (is this entry
/// ID taken? is this token there?), so whole-key bloom filters, on disk and in the memtable,
/// answer those misses without reading data blocks.
fn table_options() -> Options {
    let mut block = BlockBasedOptions::default();
    block.set_bloom_filter(10.0, false);
    let mut o = Options::default();
    o.set_block_based_table_factory(&block);
    o.set_memtable_whole_key_filtering(true);
    o.set_memtable_prefix_bloom_ratio(0.05);
    o
}

/// How many bytes of state-machine batches the memtables take before they are flushed without
/// a snapshot point ([`Store::write_batch`]). RocksDB's own bound is a memtable of 64 MiB,
/// and its automatic flush (atomic) would flush the Raft log's memtable too.
pub const STATE_FLUSH_BYTES: u64 = 16 * 1024 * 1024;

/// The index tables: keys `value \0 entry ID` ([`index_key`]), read by value.
const INDEX_CFS: [&str; 3] = [
    CF_ENTRIES_BY_PARENT,
    CF_ENTRIES_BY_SPIFFE_ID,
    CF_ENTRIES_BY_SELECTOR,
];

/// The name RocksDB records with the prefix filters it builds. A table file written with
/// another extractor (or none, as before this one) is read without its prefix filter, so a
/// change of the function below needs a new name.
const INDEX_PREFIX_EXTRACTOR: &str = "plinth.index_value.v1";

/// The prefix of an index key: its value with the NUL that ends it. Every key of one value
/// shares it, and keys are sorted bytewise, so they are adjacent.
fn index_prefix(key: &[u8]) -> &[u8] {
    match key.iter().position(|&b| b == 0) {
        Some(end) => &key[..=end],
        None => key,
    }
}

/// Only keys with a NUL have an index prefix (every index key does).
fn has_index_prefix(key: &[u8]) -> bool {
    key.contains(&0)
}

/// Options of column family `name`. An index table also gets a prefix extractor: apply checks
/// every new entry for a conflicting one with the same SPIFFE ID (a scan of that value's
/// keys), and the value is mostly new. Without prefix filters that scan seeks in every memtable
/// and table file, a cost that grows with the state; with them, the memtables and files whose
/// filter says the value is absent are skipped (docs/benchmarks.md, "Prefix filters").
fn cf_options(name: &str) -> Options {
    let mut o = table_options();
    if INDEX_CFS.contains(&name) {
        o.set_prefix_extractor(SliceTransform::create(
            INDEX_PREFIX_EXTRACTOR,
            index_prefix,
            Some(has_index_prefix),
        ));
    }
    o
}

/// Read options for the keys of one index value: with [`cf_options`]' prefix extractor, the
/// iterator stops at the last key with the prefix it was sought to, and skips the memtables
/// and table files whose prefix filter rules the prefix out.
fn one_value() -> ReadOptions {
    let mut o = ReadOptions::default();
    o.set_prefix_same_as_start(true);
    o
}

/// Read options for a scan over a whole table, in key order whatever its prefix extractor.
fn whole_table() -> ReadOptions {
    let mut o = ReadOptions::default();
    o.set_total_order_seek(true);
    o
}

impl Store {
    /// Opens (or creates) the database in `path`, creating the directory 0700, and starts the
    /// thread that keeps its newest write-ahead log file presized ([`crate::wal_presize`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let path = path.as_ref().to_owned();
        create_private_dir(&path)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Memtable flushes and compactions write tens of MB; synced as they go, they never
        // leave a burst of dirty pages that the Raft log's fsync would wait behind (on ext4 a
        // file's fdatasync can wait for other files' data in the same journal commit).
        opts.set_bytes_per_sync(1024 * 1024);
        // The state machine's writes skip the write-ahead log (`Store::write_batch`); every
        // memtable flush then writes all column families at one point, so the state on disk is
        // always that of one applied log index.
        opts.set_atomic_flush(true);
        // Memtable flushes and compactions run at the lowest CPU priority (nice 19). On a
        // server with few cores, a burst of them (the state a heavy spell applied, flushed at
        // the next snapshot point) otherwise holds a core just when a Raft thread is woken for
        // the next message, and every write waits a little longer. At nice 19 they still use
        // every idle cycle; if the foreground kept all cores busy for long, full memtables
        // would stall writes until the flush ran, so they cannot fall behind for good. Their IO
        // keeps its normal class: an idle IO class could starve a flush behind the log's syncs.
        // Measured in docs/benchmarks.md ("Background jobs at nice 19").
        // (RocksDB's default environment is one per process, so this holds for every store
        // the process opens; lowering it again is a no-op.)
        let mut env = rocksdb::Env::new()?;
        env.lower_thread_pool_cpu_priority();
        env.lower_high_priority_thread_pool_cpu_priority();
        opts.set_env(&env);
        let cfs = [CF_RAFT_LOG, CF_RAFT_META, CF_SNAPSHOT]
            .into_iter()
            .chain(STATE_CFS)
            .map(|name| ColumnFamilyDescriptor::new(name, cf_options(name)));
        let db = Arc::new(DB::open_cf_descriptors(&opts, &path, cfs)?);
        Presizer::start(path.clone(), Arc::downgrade(&db));
        Ok(Self {
            db,
            path,
            unflushed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StorageError> {
        self.db
            .cf_handle(name)
            .ok_or(StorageError::MissingColumnFamily(name))
    }

    pub(crate) fn get_typed<T>(
        &self,
        table: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StorageError>
    where
        T: DeserializeOwned,
    {
        match self.db.get_pinned_cf(self.cf(table)?, key)? {
            Some(v) => decode(table, &v).map(Some),
            None => Ok(None),
        }
    }

    fn scan_typed<T>(&self, table: &'static str) -> Result<Vec<T>, StorageError>
    where
        T: DeserializeOwned,
    {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(self.cf(table)?, whole_table(), IteratorMode::Start)
        {
            let (_, v) = item?;
            out.push(decode(table, &v)?);
        }
        Ok(out)
    }

    /// Keys in `table` that start with `prefix \0`, with the prefix stripped.
    fn scan_index(&self, table: &'static str, prefix: &str) -> Result<Vec<String>, StorageError> {
        let p = index_key(prefix, "");
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(
            self.cf(table)?,
            one_value(),
            IteratorMode::From(&p, Direction::Forward),
        ) {
            let (k, _) = item?;
            let Some(rest) = k.strip_prefix(p.as_slice()) else {
                break;
            };
            let id = std::str::from_utf8(rest).map_err(|e| StorageError::Corrupt {
                table,
                reason: e.to_string(),
            })?;
            out.push(id.to_owned());
        }
        Ok(out)
    }

    // ---- Raft log and metadata -------------------------------------------------------------

    /// Appends (or overwrites) log entries and syncs them to disk before returning.
    pub fn log_append<I>(&self, entries: I) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = (u64, Vec<u8>)>,
    {
        self.log_write(entries, None, &sync_opts())
    }

    /// Appends (or overwrites) log entries in RocksDB's write-ahead log without syncing it: the
    /// entries are durable once a later [`Store::sync`] (or any synced write) returns, which
    /// covers every write that completed before it. For group commit: many appends, one fsync.
    pub fn log_append_unsynced<I>(&self, entries: I) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = (u64, Vec<u8>)>,
    {
        self.log_write(entries, None, &WriteOptions::default())
    }

    /// [`Store::log_append_unsynced`], with a Raft metadata value written in the same batch,
    /// after the entries: both are in the write-ahead log, or neither.
    pub fn log_append_unsynced_with_meta<I>(
        &self,
        entries: I,
        meta: (MetaKey, Vec<u8>),
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = (u64, Vec<u8>)>,
    {
        self.log_write(entries, Some(meta), &WriteOptions::default())
    }

    fn log_write<I>(
        &self,
        entries: I,
        meta: Option<(MetaKey, Vec<u8>)>,
        opts: &WriteOptions,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = (u64, Vec<u8>)>,
    {
        let cf = self.cf(CF_RAFT_LOG)?;
        let mut batch = WriteBatch::default();
        for (index, bytes) in entries {
            batch.put_cf(cf, u64_key(index), bytes);
        }
        if let Some((key, value)) = meta {
            batch.put_cf(self.cf(CF_RAFT_META)?, key.as_bytes(), value);
        }
        self.db.write_opt(batch, opts)?;
        Ok(())
    }

    /// Entries with `start <= index < end`, in order.
    pub fn log_range(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.log_scan(start, end, usize::MAX)
    }

    /// Entries from `start` (below `end`) whose encoded sizes add up to at most `max_bytes`,
    /// and always the first one if it exists: a bounded read for one replication message.
    pub fn log_range_limited(
        &self,
        start: u64,
        end: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.log_scan(start, Some(end), max_bytes)
    }

    /// Entries from `start` (below `end`, if given), stopping before the one that would take
    /// their sizes past `max_bytes` unless it is the first.
    fn log_scan(
        &self,
        start: u64,
        end: Option<u64>,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let from = u64_key(start);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in self.db.iterator_cf(
            self.cf(CF_RAFT_LOG)?,
            IteratorMode::From(&from, Direction::Forward),
        ) {
            let (k, v) = item?;
            let index = key_u64(CF_RAFT_LOG, &k)?;
            if end.is_some_and(|end| index >= end) {
                break;
            }
            bytes = bytes.saturating_add(v.len());
            if bytes > max_bytes && !out.is_empty() {
                break;
            }
            out.push((index, v.to_vec()));
        }
        Ok(out)
    }

    /// The entry with the highest index, if any.
    pub fn log_last(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        match self
            .db
            .iterator_cf(self.cf(CF_RAFT_LOG)?, IteratorMode::End)
            .next()
        {
            Some(item) => {
                let (k, v) = item?;
                Ok(Some((key_u64(CF_RAFT_LOG, &k)?, v.to_vec())))
            }
            None => Ok(None),
        }
    }

    /// Deletes every entry with index >= `from` (synced).
    pub fn log_truncate_from(&self, from: u64) -> Result<(), StorageError> {
        let cf = self.cf(CF_RAFT_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, u64_key(from), u64_key(u64::MAX));
        batch.delete_cf(cf, u64_key(u64::MAX));
        self.db.write_opt(batch, &sync_opts())?;
        Ok(())
    }

    /// Records `last_purged` and deletes every entry with index <= `upto`, atomically (synced).
    pub fn log_purge_upto(&self, upto: u64, last_purged: Vec<u8>) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_RAFT_META)?,
            MetaKey::LastPurged.as_bytes(),
            last_purged,
        );
        batch.delete_range_cf(
            self.cf(CF_RAFT_LOG)?,
            u64_key(0),
            u64_key(upto.saturating_add(1)),
        );
        self.db.write_opt(batch, &sync_opts())?;
        Ok(())
    }

    /// Reads a Raft metadata value.
    pub fn meta_get(&self, key: MetaKey) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get_cf(self.cf(CF_RAFT_META)?, key.as_bytes())?)
    }

    /// Writes a Raft metadata value, synced to disk before returning.
    pub fn meta_put(&self, key: MetaKey, value: Vec<u8>) -> Result<(), StorageError> {
        self.db
            .put_cf_opt(self.cf(CF_RAFT_META)?, key.as_bytes(), value, &sync_opts())?;
        Ok(())
    }

    /// Writes a Raft metadata value to the write-ahead log without syncing it; it becomes
    /// durable with the next [`Store::sync`] or synced write.
    pub fn meta_put_unsynced(&self, key: MetaKey, value: Vec<u8>) -> Result<(), StorageError> {
        self.db.put_cf_opt(
            self.cf(CF_RAFT_META)?,
            key.as_bytes(),
            value,
            &WriteOptions::default(),
        )?;
        Ok(())
    }

    /// Where [`Store::snapshot_put`] keeps the current snapshot: a file beside the database
    /// directory (`<dir>.snapshot`), so that writing one (the whole state, possibly hundreds of
    /// MB) never queues in front of RocksDB's writes; inside RocksDB, Raft's log appends waited
    /// behind it for seconds and the leader stopped answering heartbeats.
    pub fn snapshot_path(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".snapshot");
        self.path.with_file_name(name)
    }

    /// Opens the current snapshot file and reads its header and metadata, leaving the file at
    /// the start of the data.
    fn snapshot_open(&self) -> Result<Option<(std::fs::File, Vec<u8>)>, StorageError> {
        use std::io::Read;
        let path = self.snapshot_path();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StorageError::DataDir { path, source }
        };
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StorageError::DataDir { path, source }),
        };
        let bad = |reason: &str| StorageError::BadSnapshot(format!("{}: {reason}", path.display()));
        let size = f.metadata().map_err(io(&path))?.len();
        // Magic, version, metadata length.
        let mut head = [0u8; 13];
        if size < head.len() as u64 {
            return Err(bad("truncated"));
        }
        f.read_exact(&mut head).map_err(io(&path))?;
        if head[..4] != SNAPSHOT_FILE_MAGIC[..] {
            return Err(bad("not a plinth snapshot file"));
        }
        let version = head[4];
        if version != SNAPSHOT_FILE_VERSION {
            return Err(bad(&format!(
                "format version {version}; this build reads {SNAPSHOT_FILE_VERSION}"
            )));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&head[5..]);
        let len = u64::from_be_bytes(len);
        if len > size - head.len() as u64 {
            return Err(bad("truncated"));
        }
        let len = usize::try_from(len).map_err(|_| bad("bad length"))?;
        let mut meta = vec![0u8; len];
        f.read_exact(&mut meta).map_err(io(&path))?;
        Ok(Some((f, meta)))
    }

    /// The current snapshot's metadata only (without reading the state it carries).
    pub fn snapshot_meta(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.snapshot_open()?.map(|(_, meta)| meta))
    }

    /// The current snapshot, as saved by [`Store::snapshot_put`].
    pub fn snapshot_get(&self) -> Result<Option<SnapshotFile>, StorageError> {
        use std::io::Read;
        let Some((mut f, meta)) = self.snapshot_open()? else {
            return Ok(None);
        };
        let mut data = Vec::new();
        f.read_to_end(&mut data)
            .map_err(|source| StorageError::DataDir {
                path: self.snapshot_path(),
                source,
            })?;
        Ok(Some(SnapshotFile { meta, data }))
    }

    /// Replaces the current snapshot: written to a temporary file (0600: the state holds join
    /// tokens), synced, renamed over the old one, the directory synced. The caller first makes
    /// the state the snapshot names durable ([`Store::persist_state`], or the synced
    /// [`Store::import_state`]), so that it is on disk before Raft purges the log it came from.
    pub fn snapshot_put(&self, meta: &[u8], data: &[u8]) -> Result<(), StorageError> {
        use std::io::Write;
        let path = self.snapshot_path();
        let tmp = path.with_extension("snapshot.tmp");
        let err = |p: &Path| {
            let p = p.to_owned();
            move |source| StorageError::DataDir { path: p, source }
        };
        let mut f = create_private_file(&tmp).map_err(err(&tmp))?;
        let len = u64::try_from(meta.len()).unwrap_or(u64::MAX).to_be_bytes();
        f.write_all(SNAPSHOT_FILE_MAGIC)
            .and_then(|()| f.write_all(&[SNAPSHOT_FILE_VERSION]))
            .and_then(|()| f.write_all(&len))
            .and_then(|()| f.write_all(meta))
            .map_err(err(&tmp))?;
        // Synced a few MB at a time, for the same reason as RocksDB's `bytes_per_sync`: one
        // sync of hundreds of MB at the end stalled the Raft log's fsyncs behind it.
        for chunk in data.chunks(SNAPSHOT_SYNC_BYTES) {
            f.write_all(chunk)
                .and_then(|()| f.sync_data())
                .map_err(err(&tmp))?;
        }
        f.sync_all().map_err(err(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(err(&path))?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err(dir))?;
        }
        // A snapshot an earlier build saved inside the database is superseded by the file and
        // would only waste space (it is read only while no file exists).
        self.db.delete_cf(self.cf(CF_SNAPSHOT)?, SNAPSHOT_CURRENT)?;
        Ok(())
    }

    /// A snapshot saved inside the database by builds before snapshot files (read once after
    /// an upgrade, until the next snapshot is saved as a file).
    pub fn legacy_snapshot_get(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get_cf(self.cf(CF_SNAPSHOT)?, SNAPSHOT_CURRENT)?)
    }

    /// Syncs the write-ahead log: every Raft log and metadata write made before is durable
    /// afterwards. State-machine writes are not in the write-ahead log: see
    /// [`Store::persist_state`].
    pub fn sync(&self) -> Result<(), StorageError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// Makes the state machine durable as applied so far: one atomic flush of the state's
    /// column families' memtables to table files, waited for. (The Raft log and metadata are
    /// in the write-ahead log and need no flush.)
    ///
    /// Applied commands ([`Store::apply`]) are written to the memtables only, not to the
    /// write-ahead log: the Raft log already holds every command durably, so the log record of
    /// the state change would be a second copy of the same fact in every log sync (about two
    /// thirds of the bytes synced per write, docs/benchmarks.md). After a crash the state is
    /// that of the last flush, a consistent applied index (flushes are atomic across column
    /// families), and Raft applies the entries after it again from its log. So the log must
    /// keep them: before Raft purges the log up to a snapshot point, the state at that point is
    /// persisted with this call. A clean close flushes too.
    pub fn persist_state(&self) -> Result<(), StorageError> {
        self.flush_state(true)
    }

    /// One atomic flush of the state's column families' memtables, waited for or not.
    fn flush_state(&self, wait: bool) -> Result<(), StorageError> {
        let cfs = STATE_CFS
            .into_iter()
            .map(|name| self.cf(name))
            .collect::<Result<Vec<_>, _>>()?;
        self.unflushed.store(0, Ordering::Relaxed);
        let mut opts = FlushOptions::default();
        opts.set_wait(wait);
        self.db.flush_cfs_opt(&cfs, &opts)?;
        Ok(())
    }

    // ---- State-machine reads ---------------------------------------------------------------

    /// The global revision: +1 for every applied command that changed something.
    pub fn revision(&self) -> Result<u64, StorageError> {
        Ok(self.get_typed(CF_SM_META, SM_REVISION)?.unwrap_or(0))
    }

    /// The Raft applied state as last written by [`Store::apply`] (opaque to this crate).
    pub fn applied_state(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db.get_cf(self.cf(CF_SM_META)?, SM_APPLIED)?)
    }

    pub fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>, StorageError> {
        self.get_typed(CF_ENTRIES, id.as_bytes())
    }

    /// All entries, ordered by ID.
    pub fn list_entries(&self) -> Result<Vec<RegistrationEntry>, StorageError> {
        self.scan_typed(CF_ENTRIES)
    }

    fn entries_by_ids(&self, ids: Vec<String>) -> Result<Vec<RegistrationEntry>, StorageError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let entry = self.get_entry(&id)?.ok_or_else(|| StorageError::Corrupt {
                table: CF_ENTRIES,
                reason: format!("index names missing entry {id}"),
            })?;
            out.push(entry);
        }
        Ok(out)
    }

    /// Entries whose parent is `parent_id`.
    pub fn entries_by_parent(
        &self,
        parent_id: &SpiffeId,
    ) -> Result<Vec<RegistrationEntry>, StorageError> {
        let ids = self.scan_index(CF_ENTRIES_BY_PARENT, parent_id.as_str())?;
        self.entries_by_ids(ids)
    }

    /// Entries whose parent is any of `parents`, read with one index iterator (seeking to each
    /// parent in key order) rather than one iterator per parent.
    pub fn entries_by_parents(
        &self,
        parents: &[SpiffeId],
    ) -> Result<Vec<RegistrationEntry>, StorageError> {
        let mut sorted: Vec<&str> = parents.iter().map(SpiffeId::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut it = self
            .db
            .raw_iterator_cf_opt(self.cf(CF_ENTRIES_BY_PARENT)?, one_value());
        let mut ids = Vec::new();
        let mut prefix = Vec::new();
        for parent in sorted {
            prefix.clear();
            prefix.extend_from_slice(parent.as_bytes());
            prefix.push(0);
            it.seek(&prefix);
            while let Some(key) = it.key() {
                let Some(rest) = key.strip_prefix(prefix.as_slice()) else {
                    break;
                };
                let id = std::str::from_utf8(rest).map_err(|e| StorageError::Corrupt {
                    table: CF_ENTRIES_BY_PARENT,
                    reason: e.to_string(),
                })?;
                ids.push(id.to_owned());
                it.next();
            }
            it.status()?;
        }
        self.entries_by_ids(ids)
    }

    /// Entries that issue `spiffe_id`.
    pub fn entries_by_spiffe_id(
        &self,
        spiffe_id: &SpiffeId,
    ) -> Result<Vec<RegistrationEntry>, StorageError> {
        let ids = self.scan_index(CF_ENTRIES_BY_SPIFFE_ID, spiffe_id.as_str())?;
        self.entries_by_ids(ids)
    }

    /// Entries that have `selector` among their selectors.
    pub fn entries_by_selector(
        &self,
        selector: &Selector,
    ) -> Result<Vec<RegistrationEntry>, StorageError> {
        let ids = self.scan_index(CF_ENTRIES_BY_SELECTOR, &selector.to_string())?;
        self.entries_by_ids(ids)
    }

    pub fn get_agent(&self, spiffe_id: &SpiffeId) -> Result<Option<AttestedAgent>, StorageError> {
        self.get_typed(CF_AGENTS, spiffe_id.as_str().as_bytes())
    }

    pub fn list_agents(&self) -> Result<Vec<AttestedAgent>, StorageError> {
        self.scan_typed(CF_AGENTS)
    }

    pub fn get_join_token(&self, token: &str) -> Result<Option<JoinToken>, StorageError> {
        self.get_typed(CF_JOIN_TOKENS, token.as_bytes())
    }

    pub fn list_join_tokens(&self) -> Result<Vec<JoinToken>, StorageError> {
        self.scan_typed(CF_JOIN_TOKENS)
    }

    pub fn get_bundle(&self, td: &TrustDomain) -> Result<Option<StoredBundle>, StorageError> {
        self.get_typed(CF_BUNDLES, td.name().as_bytes())
    }

    /// Every bundle (the local one and federated ones), ordered by trust domain.
    pub fn list_bundles(&self) -> Result<Vec<StoredBundle>, StorageError> {
        self.scan_typed(CF_BUNDLES)
    }

    pub fn get_federation(
        &self,
        td: &TrustDomain,
    ) -> Result<Option<FederationRelationship>, StorageError> {
        self.get_typed(CF_FEDERATION, td.name().as_bytes())
    }

    pub fn list_federations(&self) -> Result<Vec<FederationRelationship>, StorageError> {
        self.scan_typed(CF_FEDERATION)
    }

    pub fn get_authority(&self, authority_id: &str) -> Result<Option<CaAuthority>, StorageError> {
        self.get_typed(CF_CA_JOURNAL, authority_id.as_bytes())
    }

    /// The whole CA journal, every node.
    pub fn list_authorities(&self) -> Result<Vec<CaAuthority>, StorageError> {
        self.scan_typed(CF_CA_JOURNAL)
    }

    // ---- Writes (used by apply) ------------------------------------------------------------

    /// Writes a state-machine change to the memtables only ([`Store::persist_state`]).
    ///
    /// Once the batches written since the last flush pass [`STATE_FLUSH_BYTES`], the state's
    /// memtables are flushed in the background (not waited for). A heavy spell of writes then
    /// flushes its own state as it goes, rather than leaving it all to the next snapshot point,
    /// which may come in a quiet spell after it (docs/benchmarks.md, "the state flushed at a
    /// size").
    pub(crate) fn write_batch(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let size = batch.size_in_bytes() as u64;
        let mut opts = WriteOptions::default();
        opts.disable_wal(true);
        self.db.write_opt(batch, &opts)?;
        if self.unflushed.fetch_add(size, Ordering::Relaxed) + size >= STATE_FLUSH_BYTES {
            self.flush_state(false)?;
        }
        Ok(())
    }

    pub(crate) fn put_typed<T>(
        &self,
        batch: &mut WriteBatch,
        table: &'static str,
        key: &[u8],
        value: &T,
    ) -> Result<(), StorageError>
    where
        T: Serialize,
    {
        batch.put_cf(self.cf(table)?, key, encode(table, value)?);
        Ok(())
    }

    pub(crate) fn put_raw(
        &self,
        batch: &mut WriteBatch,
        table: &'static str,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), StorageError> {
        batch.put_cf(self.cf(table)?, key, value);
        Ok(())
    }

    pub(crate) fn delete(
        &self,
        batch: &mut WriteBatch,
        table: &'static str,
        key: &[u8],
    ) -> Result<(), StorageError> {
        batch.delete_cf(self.cf(table)?, key);
        Ok(())
    }

    pub(crate) fn set_revision(
        &self,
        batch: &mut WriteBatch,
        revision: u64,
    ) -> Result<(), StorageError> {
        self.put_typed(batch, CF_SM_META, SM_REVISION, &revision)
    }

    pub(crate) fn set_applied(
        &self,
        batch: &mut WriteBatch,
        applied: &[u8],
    ) -> Result<(), StorageError> {
        self.put_raw(batch, CF_SM_META, SM_APPLIED, applied)
    }

    // ---- Snapshots -------------------------------------------------------------------------

    /// Serializes the whole replicated state from one consistent RocksDB snapshot. Returns the
    /// data and the applied state recorded in it.
    pub fn export_state(&self) -> Result<(Vec<u8>, Option<Vec<u8>>), StorageError> {
        let snap = self.db.snapshot();
        let mut out = Vec::new();
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.push(SNAPSHOT_VERSION);
        let mut applied = None;
        for (table_index, name) in STATE_CFS.iter().enumerate() {
            let cf = self.cf(name)?;
            for item in snap.iterator_cf_opt(cf, whole_table(), IteratorMode::Start) {
                let (k, v) = item?;
                if *name == CF_SM_META && &*k == SM_APPLIED {
                    applied = Some(v.to_vec());
                }
                let too_long = |_| StorageError::BadSnapshot(format!("record in {name} too large"));
                out.push(table_index as u8);
                out.extend_from_slice(&u32::try_from(k.len()).map_err(too_long)?.to_be_bytes());
                out.extend_from_slice(&k);
                out.extend_from_slice(&u32::try_from(v.len()).map_err(too_long)?.to_be_bytes());
                out.extend_from_slice(&v);
            }
        }
        Ok((out, applied))
    }

    /// Replaces the whole replicated state with `data` from [`Store::export_state`], atomically and
    /// synced. Returns the applied state recorded in it. On error nothing is changed.
    pub fn import_state(&self, data: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let records = parse_snapshot(data)?;
        // The import deletes every key it sees, in the write-ahead log. A delete applied since
        // the last flush is in memory only: without this flush, a crash would lose it and the
        // key it hides would come back from a table file, beside the imported state.
        self.persist_state()?;
        let mut batch = WriteBatch::default();
        for name in STATE_CFS {
            let cf = self.cf(name)?;
            for item in self
                .db
                .iterator_cf_opt(cf, whole_table(), IteratorMode::Start)
            {
                let (k, _) = item?;
                batch.delete_cf(cf, k);
            }
        }
        let mut applied = None;
        for (table_index, k, v) in records {
            let name = STATE_CFS[table_index];
            if name == CF_SM_META && k == SM_APPLIED {
                applied = Some(v.to_vec());
            }
            batch.put_cf(self.cf(name)?, k, v);
        }
        self.db.write_opt(batch, &sync_opts())?;
        Ok(applied)
    }
}

/// One snapshot record: table position in [`STATE_CFS`], key, value.
type Record<'a> = (usize, &'a [u8], &'a [u8]);

fn parse_snapshot(data: &[u8]) -> Result<Vec<Record<'_>>, StorageError> {
    let bad = |m: &str| StorageError::BadSnapshot(m.to_owned());
    let rest = data
        .strip_prefix(SNAPSHOT_MAGIC.as_slice())
        .ok_or_else(|| bad("missing magic"))?;
    let (&version, mut rest) = rest.split_first().ok_or_else(|| bad("missing version"))?;
    if version != SNAPSHOT_VERSION {
        return Err(StorageError::BadSnapshot(format!(
            "snapshot format version {version}; this build reads {SNAPSHOT_VERSION}"
        )));
    }
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if rest.len() < n {
            return None;
        }
        let (a, b) = rest.split_at(n);
        *rest = b;
        Some(a)
    }
    fn take_len(rest: &mut &[u8]) -> Option<usize> {
        let b: [u8; 4] = take(rest, 4)?.try_into().ok()?;
        usize::try_from(u32::from_be_bytes(b)).ok()
    }
    let mut out = Vec::new();
    while let Some((&table_index, r)) = rest.split_first() {
        rest = r;
        if usize::from(table_index) >= STATE_CFS.len() {
            return Err(StorageError::BadSnapshot(format!(
                "unknown table {table_index}"
            )));
        }
        let klen = take_len(&mut rest).ok_or_else(|| bad("truncated key length"))?;
        let k = take(&mut rest, klen).ok_or_else(|| bad("truncated key"))?;
        let vlen = take_len(&mut rest).ok_or_else(|| bad("truncated value length"))?;
        let v = take(&mut rest, vlen).ok_or_else(|| bad("truncated value"))?;
        out.push((usize::from(table_index), k, v));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
impl Store {
    /// What a power cut leaves: a copy of the store's files, taken while it is open, in a new
    /// temporary directory.
    pub(crate) fn copy_files_while_open(&self) -> tempfile::TempDir {
        let copy = tempfile::tempdir().unwrap();
        for item in std::fs::read_dir(&self.path).unwrap() {
            let item = item.unwrap();
            std::fs::copy(item.path(), copy.path().join(item.file_name())).unwrap();
        }
        copy
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn the_first_snapshot_file_removes_a_snapshot_saved_in_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .db
            .put_cf(store.cf(CF_SNAPSHOT).unwrap(), SNAPSHOT_CURRENT, b"old")
            .unwrap();
        assert_eq!(store.legacy_snapshot_get().unwrap(), Some(b"old".to_vec()));
        store.snapshot_put(b"meta", b"data").unwrap();
        assert_eq!(store.legacy_snapshot_get().unwrap(), None);
        let file = store.snapshot_get().unwrap().unwrap();
        assert_eq!((file.meta, file.data), (b"meta".to_vec(), b"data".to_vec()));
    }

    #[test]
    fn an_index_key_s_prefix_is_its_value_with_the_nul() {
        assert_eq!(index_prefix(b"spiffe://a/b\0id1"), b"spiffe://a/b\0");
        assert_eq!(index_prefix(b"spiffe://a/b\0"), b"spiffe://a/b\0");
        assert_eq!(index_prefix(b"\0id"), b"\0");
        // A prefix is its own prefix, as RocksDB requires.
        let p = index_prefix(b"unix:uid:1\0e1");
        assert_eq!(index_prefix(p), p);
        assert!(has_index_prefix(b"v\0id"));
        assert!(!has_index_prefix(b"no-nul"));
        assert_eq!(index_prefix(b"no-nul"), b"no-nul");
    }

    /// A scan of a value no table file holds reads no block of any of them: the prefix
    /// filters rule every file out. Table files that hold the value are still read.
    #[test]
    fn index_scans_skip_table_files_without_the_value() {
        use rocksdb::perf::{set_perf_stats, PerfContext, PerfMetric, PerfStatsLevel};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cf = store.cf(CF_ENTRIES_BY_SPIFFE_ID).unwrap();
        // Three files: a fourth would set off a compaction of level 0 (RocksDB's default
        // trigger), which merges them.
        for file in 0..3 {
            // Every file spans the same range of values, so a value that none of them holds
            // still falls inside each one's range.
            for i in 0..50 {
                let key = index_key(&format!("spiffe://td/w/{i:03}/{file}"), "id");
                store.db.put_cf(cf, key, b"").unwrap();
            }
            store.persist_state().unwrap();
        }
        assert_eq!(
            store
                .db
                .property_int_value_cf(cf, "rocksdb.num-files-at-level0")
                .unwrap(),
            Some(3)
        );
        set_perf_stats(PerfStatsLevel::EnableCount);
        let mut ctx = PerfContext::default();

        ctx.reset();
        assert!(store
            .scan_index(CF_ENTRIES_BY_SPIFFE_ID, "spiffe://td/w/025/9")
            .unwrap()
            .is_empty());
        let absent_reads =
            ctx.metric(PerfMetric::BlockReadCount) + ctx.metric(PerfMetric::BlockCacheHitCount);
        let ruled_out = ctx.metric(PerfMetric::BloomSstMissCount);

        ctx.reset();
        assert_eq!(
            store
                .scan_index(CF_ENTRIES_BY_SPIFFE_ID, "spiffe://td/w/007/2")
                .unwrap(),
            ["id"]
        );
        let present_reads =
            ctx.metric(PerfMetric::BlockReadCount) + ctx.metric(PerfMetric::BlockCacheHitCount);
        set_perf_stats(PerfStatsLevel::Disable);

        assert_eq!(absent_reads, 0, "blocks read for an absent value");
        assert_eq!(ruled_out, 3, "table files ruled out by their prefix filter");
        assert!(present_reads > 0, "the file with the value was not read");
    }

    /// Table files of column family `name`.
    fn table_files(store: &Store, name: &str) -> usize {
        store
            .db
            .live_files()
            .unwrap()
            .iter()
            .filter(|f| f.column_family_name == name)
            .count()
    }

    #[test]
    fn state_batches_past_the_bound_are_flushed_without_a_snapshot_point() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.log_append([(1, b"entry".to_vec())]).unwrap();
        let cf = store.cf(CF_ENTRIES).unwrap();
        let value = vec![b'x'; 64 * 1024];
        let mut key = 0u32;
        let mut put = |store: &Store| {
            let mut batch = WriteBatch::default();
            batch.put_cf(cf, key.to_be_bytes(), &value);
            key += 1;
            store.write_batch(batch).unwrap();
        };
        // Just under the bound: nothing is flushed.
        let per_batch = (value.len() + 64) as u64;
        for _ in 0..(STATE_FLUSH_BYTES / per_batch - 2) {
            put(&store);
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(table_files(&store, CF_ENTRIES), 0);
        // Past it: the state's memtables are flushed in the background, the log's are not.
        for _ in 0..4 {
            put(&store);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while table_files(&store, CF_ENTRIES) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no table file after the bound"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(table_files(&store, CF_RAFT_LOG), 0);
        // The count starts again after the flush.
        assert!(store.unflushed.load(Ordering::Relaxed) < 4 * per_batch);
        // Every key is still there.
        for k in 0..key {
            assert!(store.db.get_cf(cf, k.to_be_bytes()).unwrap().is_some());
        }
    }

    /// The nice value of each of this process's threads named `name`.
    fn nice_of_threads(name: &str) -> Vec<i64> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let task = task.unwrap().path();
            let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
                continue;
            };
            if comm.trim() != name {
                continue;
            }
            out.push(nice_in_stat(&task.join("stat")));
        }
        out
    }

    /// The nice value in a thread's `stat` file: the 17th field after the command name (which
    /// is in parentheses and may hold spaces), the 19th in all.
    fn nice_in_stat(path: &Path) -> i64 {
        let stat = std::fs::read_to_string(path).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 1..];
        rest.split_whitespace().nth(16).unwrap().parse().unwrap()
    }

    fn own_nice() -> i64 {
        nice_in_stat(Path::new("/proc/thread-self/stat"))
    }

    #[test]
    fn flushes_and_compactions_run_at_nice_19() {
        let nice_before = own_nice();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cf = store.cf(CF_ENTRIES).unwrap();
        store.db.put_cf(cf, b"a", b"1").unwrap();
        // A flush runs on the high-priority pool, a manual compaction on the low one.
        store.persist_state().unwrap();
        store.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        // A pool thread lowers its own priority before the first job it runs.
        for name in ["rocksdb:high", "rocksdb:low"] {
            let nices = nice_of_threads(name);
            assert!(
                nices.contains(&19),
                "{name} threads' nice values: {nices:?}"
            );
        }
        // The caller's own thread is not touched.
        assert_eq!(own_nice(), nice_before);
    }
}
