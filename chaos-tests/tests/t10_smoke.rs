#![allow(clippy::unwrap_used)]
//! The CI smoke run: a three-server cluster of real `plinth-server` processes on loopback,
//! three register clients, an append-only writer and a join-token racer, and every fault the
//! process mode has (kill -9 the leader, SIGSTOP the leader and a follower, add and remove a
//! member with a follower paused, restart all). Every check must pass, the report must be
//! complete, and no server process may outlive the run.

use std::path::PathBuf;
use std::process::Command;

use plinth_chaos::scenario::{self, ScenarioConfig};

/// The server binary: built by the workspace test run; built here if missing.
fn server_bin() -> PathBuf {
    if let Some(p) = plinth_chaos::find_server_bin() {
        return p;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "-p", "plinth-server", "--bin", "plinth-server"])
        .status()
        .unwrap();
    assert!(st.success(), "building plinth-server failed");
    plinth_chaos::find_server_bin().expect("plinth-server not found after building it")
}

fn alive(pid: u32, config: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(config))
        .unwrap_or(false)
}

/// Runs the scenario with the harness's log on the test's output, so that a failure shows how
/// far the run got. A run still going after four minutes is stopped here (its servers are
/// killed as the run is dropped) rather than by the test runner's time-out.
async fn run_with_watchdog(cfg: ScenarioConfig) -> plinth_chaos::report::Report {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("plinth_chaos=info"))
        .with_test_writer()
        .with_ansi(false)
        .try_init();
    match tokio::time::timeout(std::time::Duration::from_secs(240), scenario::run(cfg)).await {
        Ok(r) => r.unwrap(),
        Err(_) => panic!("the chaos run did not finish in 240 s; its log above shows where it was"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t10_smoke_every_fault_once() {
    let results = tempfile::tempdir().unwrap();
    let out = match std::env::var_os("PLINTH_CHAOS_RESULTS") {
        Some(d) => PathBuf::from(d),
        None => results.path().to_owned(),
    };
    let cfg = ScenarioConfig::smoke(server_bin(), out.clone());
    let report = run_with_watchdog(cfg).await;
    let summary = report.summary();
    println!("{summary}");
    assert!(report.passed(), "chaos checks failed:\n{summary}");

    // Every fault happened and was measured.
    let names: Vec<&str> = report.windows.iter().map(|w| w.fault.as_str()).collect();
    assert_eq!(
        names,
        [
            "kill-leader",
            "pause-leader",
            "pause-follower",
            "member-change",
            "restart-all"
        ]
    );
    assert!(report.windows.iter().all(|w| w.recovery_ms.is_some()));
    // The history is real: writes acknowledged in every phase, tokens raced, linearizability
    // checked on every key the clients touched.
    assert!(report.rows.iter().all(|r| r.acknowledged > 0), "{summary}");
    assert!(report.checks.tokens.tokens_raced > 0);
    assert_eq!(report.checks.linearizability.keys_checked, 12);
    assert!(report.checks.convergence.entries_per_node.len() == 3);

    // The report files.
    for f in ["report.json", "summary.md", "timeline.png", "history.jsonl"] {
        let p = out.join(f);
        assert!(
            std::fs::metadata(&p).unwrap().len() > 0,
            "{} empty",
            p.display()
        );
    }
    let png = std::fs::read(out.join("timeline.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // Nothing left running.
    assert!(report.processes.len() >= 4);
    for p in &report.processes {
        assert!(!alive(p.pid, &p.config), "server pid {} still runs", p.pid);
    }
}
