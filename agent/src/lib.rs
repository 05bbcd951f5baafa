//! plinth-agent: node attestors, workload attestors, sync with the server, the SVID cache and
//! rotation, the SPIFFE Workload API, and the `plinth-agent` binary.
//!
//! Must not depend on: plinth-server, plinth-raft, plinth-storage (the agent talks to servers only
//! over the wire).
