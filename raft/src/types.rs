//! The openraft type configuration and aliases.

use std::io::Cursor;

use plinth_storage::{Proposal, Response};

openraft::declare_raft_types!(
    /// plinth's Raft: commands are [`Proposal`]s, the state machine answers [`Response`]s, nodes
    /// are numbered and addressed by `host:port`.
    pub TypeConfig:
        D = Proposal,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A node ID (the Raft member number of a server).
pub type NodeId = u64;
/// The openraft instance.
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
