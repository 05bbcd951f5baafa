//! plinth-api: the `.proto` files plinth speaks (the SPIFFE Workload API and the plinth server API)
//! and the tonic/prost code generated from them, committed so that a build needs no `protoc`.
//!
//! Owns: wire types only. Domain code converts to `plinth-spiffe` types at the edge with `TryFrom`.
//! Must not depend on: storage, raft, upstream, server, agent.

pub mod convert;
pub mod workload;

/// The plinth server API (`proto/plinth_server.proto`), modelled on SPIRE's server API.
pub mod server {
    #![allow(missing_docs, clippy::all, missing_debug_implementations)]
    include!("gen/plinth.server.v1.rs");
}
