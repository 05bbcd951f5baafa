//! plinth-api: the `.proto` files plinth speaks (the SPIFFE Workload API and the plinth server API)
//! and the tonic/prost code generated from them, committed so that a build needs no `protoc`.
//!
//! Owns: wire types only. Domain code converts to `plinth-spiffe` types at the edge with `TryFrom`.
//! Must not depend on: storage, raft, upstream, server, agent.

pub mod convert;
pub mod workload;
