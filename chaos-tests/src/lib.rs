//! plinth-chaos: the harness that starts plinth clusters (processes, network namespaces or
//! containers), injects faults, records client histories and checks invariants.
//!
//! Must not depend on: plinth-server, plinth-raft, plinth-storage (it drives the cluster over the
//! wire, as a user would).

pub mod linearizability;
