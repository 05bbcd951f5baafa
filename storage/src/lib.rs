//! plinth-storage: RocksDB column families for the Raft log and metadata and the replicated
//! state-machine tables (registration entries, agents, join tokens, bundles, federation
//! relationships, the CA journal), their indexes and snapshots.
//!
//! Owns: every use of RocksDB in plinth. Must not depend on: openraft, tonic, server, agent.
