//! plinth-raft: the openraft type configuration, the replicated state machine (commands applied
//! to plinth-storage), the tonic network between servers, membership, leader forwarding and
//! linearizable reads.
//!
//! Owns: every use of openraft in plinth. Must not depend on: rocksdb directly, server, agent.
