#![allow(clippy::unwrap_used)]
//! The CI smoke run: a three-server cluster of real `plinth-server` processes on loopback,
//! three register clients, an append-only writer and a join-token racer, and every fault the
//! process mode has (kill -9 the leader, SIGSTOP the leader and a follower, add and remove a
//! member with a follower paused, restart all). Every check must pass, the report must be
//! complete, and no server process may outlive the run.

use std::path::PathBuf;
use std::time::Duration;

use plinth_chaos::scenario::ScenarioConfig;
use plinth_chaos::testing::{run_logged, runs_with, server_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t10_smoke_every_fault_once() {
    let results = tempfile::tempdir().unwrap();
    let out = match std::env::var_os("PLINTH_CHAOS_RESULTS") {
        Some(d) => PathBuf::from(d),
        None => results.path().to_owned(),
    };
    let cfg = ScenarioConfig::smoke(server_bin().unwrap(), out.clone());
    let report = run_logged(cfg, Duration::from_secs(240)).await.unwrap();
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
        assert!(
            !runs_with(p.pid, &p.config),
            "server pid {} still runs",
            p.pid
        );
    }
}
