//! The Raft log and vote on RocksDB ([`openraft::storage::RaftLogStorage`]).
//!
//! Every write (append, vote, committed index, truncate, purge) is synced to disk before it is
//! reported done, so nothing Raft acknowledged can be lost by a crash.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, LogState, OptionalSend, RaftLogReader, StorageIOError};
use plinth_storage::codec::{decode, encode};
use plinth_storage::{MetaKey, Store};

use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const T_LOG: &str = "raft_log";
const T_META: &str = "raft_meta";

/// The log store. Clones share the database.
#[derive(Debug, Clone)]
pub struct LogStore {
    store: Store,
}

impl LogStore {
    pub fn new(store: Store) -> Self {
        Self { store }
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
        self.store
            .log_range(start, end)
            .map_err(read_err)?
            .into_iter()
            .map(|(_, bytes)| decode::<Entry>(T_LOG, &bytes).map_err(read_err))
            .collect()
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
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.meta(MetaKey::Vote)
            .map_err(|e| StorageIOError::read_vote(AnyError::new(&e)).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = encode(T_META, &committed).map_err(write_err)?;
        self.store
            .meta_put(MetaKey::Committed, bytes)
            .map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
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
        let encoded = entries
            .into_iter()
            .map(|e| encode(T_LOG, &e).map(|bytes| (e.log_id.index, bytes)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(write_err)?;
        match self.store.log_append(encoded) {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.store
            .log_truncate_from(log_id.index)
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = encode(T_META, &log_id).map_err(write_err)?;
        self.store
            .log_purge_upto(log_id.index, bytes)
            .map_err(write_err)
    }
}
