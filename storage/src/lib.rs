//! plinth-storage: RocksDB column families for the Raft log and metadata and the replicated
//! state-machine tables (registration entries, agents, join tokens, bundles, federation
//! relationships, the CA journal), their indexes and snapshots; and the deterministic
//! application of state-machine commands to those tables.
//!
//! Owns: every use of RocksDB in plinth. Must not depend on: openraft, tonic, tokio, server,
//! agent. Raft-specific values (log entries, vote, applied log ID, snapshot metadata) are opaque
//! byte strings here; plinth-raft encodes them with [`codec`].
//!
//! Errors: [`StorageError`] is fatal (disk, database, corrupt data); [`CommandError`] is a refused
//! command (the caller's mistake or a lost race) and changes nothing.

pub mod apply;
pub mod codec;
pub mod command;
pub mod entry_id;
mod error;
pub mod model;
pub mod store;
pub mod wal_presize;

pub use apply::Applied;
pub use command::{Change, ChangeEvent, Command, CommandError, Outcome, Proposal, Response};
pub use entry_id::EntryId;
pub use error::StorageError;
pub use model::{
    AttestedAgent, AuthorityKind, AuthorityPublic, AuthorityStatus, BundleEndpointProfile,
    CaAuthority, FederationRelationship, JoinToken, RegistrationEntry, SecretString, StoredBundle,
    StoredJwtAuthority,
};
pub use store::{create_private_dir, create_private_file, MetaKey, SnapshotFile, Store};
