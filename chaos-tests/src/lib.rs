//! plinth-chaos: the harness that starts plinth clusters (processes, network namespaces or
//! containers), injects faults, records client histories and checks invariants.
//!
//! Must not depend on: plinth-server, plinth-raft, plinth-storage (it drives the cluster over the
//! wire, as a user would).

pub mod cluster;
pub mod docker;
pub mod faults;
pub mod history;
pub mod linearizability;
pub mod report;
pub mod scenario;
pub mod testing;
pub mod workload;

/// Finds the `plinth-server` binary: `$PLINTH_SERVER_BIN`, else next to the running executable
/// (the cargo target dir, where test binaries live one level further down in `deps/`).
pub fn find_server_bin() -> Option<std::path::PathBuf> {
    find_bin("PLINTH_SERVER_BIN", "plinth-server")
}

/// Finds the `plinth-agent` binary (`$PLINTH_AGENT_BIN`, else as [`find_server_bin`]).
pub fn find_agent_bin() -> Option<std::path::PathBuf> {
    find_bin("PLINTH_AGENT_BIN", "plinth-agent")
}

fn find_bin(env: &str, name: &str) -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(p.into());
    }
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent();
    for _ in 0..3 {
        let d = dir?;
        let cand = d.join(name);
        if cand.is_file() {
            return Some(cand);
        }
        dir = d.parent();
    }
    None
}
