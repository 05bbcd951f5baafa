#![allow(clippy::unwrap_used)]
//! A chaos run stopped by the test watchdog is an error that says so, and it leaves no server
//! running: dropping the run kills the cluster's processes.

use std::path::Path;
use std::time::Duration;

use plinth_chaos::scenario::ScenarioConfig;
use plinth_chaos::testing::{run_logged, runs_with, server_bin};

/// Processes whose command line mentions `dir`.
fn running_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| runs_with(*pid, &needle))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t13_a_run_past_its_limit_is_stopped_and_its_servers_killed() {
    // The cluster's directory goes under a temporary directory of this test's own (nextest
    // runs each test in a process of its own), so its servers can be told from other tests'.
    let tmp = tempfile::tempdir().unwrap();
    std::env::set_var("TMPDIR", tmp.path());
    let results = tmp.path().join("results");
    let cfg = ScenarioConfig::smoke(server_bin().unwrap(), results);
    // The smoke run takes about half a minute; the cluster is up within the first seconds.
    let seen = tokio::spawn({
        let dir = tmp.path().to_owned();
        async move {
            let mut most = 0;
            for _ in 0..70 {
                most = most.max(running_under(&dir).len());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            most
        }
    });
    let err = run_logged(cfg, Duration::from_secs(8)).await.unwrap_err();
    assert!(err.contains("did not finish in 8 s"), "{err}");
    // At least one server ran (all three within a second or two on an idle machine).
    assert!(seen.await.unwrap() >= 1, "no server ran during the run");
    assert!(
        running_under(tmp.path()).is_empty(),
        "servers outlived the stopped run: {:?}",
        running_under(tmp.path())
    );
}
