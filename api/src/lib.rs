//! plinth-api: the `.proto` files plinth speaks (the SPIFFE Workload API, the plinth server API and
//! SPIRE's agent Debug API)
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

/// SPIRE's wire types that plinth serves unchanged (`proto/spire/`), under their SPIRE packages.
pub mod spire {
    /// `spire.api.types`.
    pub mod api {
        pub mod types {
            #![allow(missing_docs, clippy::all, missing_debug_implementations)]
            include!("gen/spire.api.types.rs");
        }
    }

    /// `spire.agent.*`: the agent's admin APIs.
    pub mod agent {
        pub mod debug {
            /// `spire.agent.debug.v1`: the Debug service (`GetInfo`).
            pub mod v1 {
                #![allow(missing_docs, clippy::all, missing_debug_implementations)]
                include!("gen/spire.agent.debug.v1.rs");
            }
        }
    }
}
