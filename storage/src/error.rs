//! Errors of the storage layer. Everything here is fatal for the node: the disk, the database or
//! a stored value is broken. Mistakes of a caller (a conflicting entry, a consumed join token) are
//! [`crate::CommandError`]s and never appear here.

use std::path::PathBuf;

/// A storage failure. A node that sees one must stop serving: its state can no longer be trusted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("column family {0} is missing")]
    MissingColumnFamily(&'static str),
    #[error(
        "stored value in {table} has format version {found}; this build reads up to {supported}"
    )]
    UnsupportedFormat {
        table: &'static str,
        found: u8,
        supported: u8,
    },
    #[error("stored value in {table} is corrupt: {reason}")]
    Corrupt { table: &'static str, reason: String },
    #[error("cannot encode value for {table}: {reason}")]
    Encode { table: &'static str, reason: String },
    #[error("snapshot data is malformed: {0}")]
    BadSnapshot(String),
}
