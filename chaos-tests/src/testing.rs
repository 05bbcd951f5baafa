//! Helpers for the harness's own tests: the binaries under test, and a scenario run that logs
//! and is bounded.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::report::Report;
use crate::scenario::{self, ScenarioConfig};

/// The binary of `package` (a workspace binary named like its package), found by `find`; built
/// with `cargo build` first if it is missing (a test run of one package only builds that one).
pub fn built_bin(find: fn() -> Option<PathBuf>, package: &str) -> Result<PathBuf, String> {
    if let Some(p) = find() {
        return Ok(p);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "-p", package, "--bin", package])
        .status()
        .map_err(|e| format!("running cargo build -p {package}: {e}"))?;
    if !st.success() {
        return Err(format!("building {package} failed ({st})"));
    }
    find().ok_or_else(|| format!("{package} not found after building it"))
}

/// `plinth-server`, built if missing.
pub fn server_bin() -> Result<PathBuf, String> {
    built_bin(crate::find_server_bin, "plinth-server")
}

/// Whether process `pid` runs with `needle` in its command line (a pid the kernel has given to
/// another program since does not count).
pub fn runs_with(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

/// Runs the scenario with the harness's log on the test's output, so that a failure shows how
/// far the run got. A run still going after `limit` is stopped (its servers are killed as the
/// run is dropped) and reported as an error, before the test runner's own time-out.
pub async fn run_logged(cfg: ScenarioConfig, limit: Duration) -> Result<Report, String> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("plinth_chaos=info"))
        .with_test_writer()
        .with_ansi(false)
        .try_init();
    match tokio::time::timeout(limit, scenario::run(cfg)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the chaos run did not finish in {} s; its log above shows where it was",
            limit.as_secs()
        )),
    }
}
