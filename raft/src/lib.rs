//! plinth-raft: the openraft type configuration, the replicated state machine (commands applied
//! to plinth-storage), the tonic network between servers, membership, leader forwarding and
//! linearizable reads.
//!
//! Owns: every use of openraft in plinth. Must not depend on: rocksdb directly, server, agent.
//! The commands themselves and their deterministic application live in plinth-storage
//! ([`plinth_storage::Command`], [`plinth_storage::Store::apply`]) so they are testable without
//! Raft; this crate orders them.

// openraft's StorageError and RaftError are large (>200 bytes) and fixed by its traits; boxing
// them at every internal helper would only add conversions.
#![allow(clippy::result_large_err)]

mod election;
pub mod leader_sync;
pub mod log_store;
pub mod network;
pub mod node;
mod proposer;
pub mod state_machine;
pub mod tls;
pub mod types;

pub use log_store::LogStore;
pub use network::{ForwardError, MembershipOp, NodeStatus};
pub use node::{
    timing_fault, ClusterStatus, MemberStatus, NodeError, RaftConfig, RaftNode, TimingFault,
};
pub use state_machine::StateMachine;
pub use tls::{AcceptLimits, PeerTls};
pub use types::{NodeId, TypeConfig};
