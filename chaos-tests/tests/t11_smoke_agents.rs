#![allow(clippy::unwrap_used)]
//! The smoke run with agents: two `plinth-agent` processes attested with join tokens, a
//! workload beside each looking at its X509-SVID and bundle four times a second, through
//! kill -9 of the leader, SIGSTOP of the leader and a restart of every server. Workloads must see
//! no error once they hold an SVID (agents serve from cache while servers are away), and the
//! bundle sequence each agent serves must never go down.

use std::time::Duration;

use plinth_chaos::faults::Fault;
use plinth_chaos::scenario::ScenarioConfig;
use plinth_chaos::testing::{built_bin, run_logged, runs_with, server_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t11_smoke_agents_and_workloads() {
    let results = tempfile::tempdir().unwrap();
    let mut cfg = ScenarioConfig::smoke(server_bin().unwrap(), results.path().to_owned());
    cfg.faults = vec![Fault::KillLeader, Fault::PauseLeader, Fault::RestartAll];
    cfg.clients = 2;
    cfg.agents = 2;
    cfg.agent_bin = Some(built_bin(plinth_chaos::find_agent_bin, "plinth-agent").unwrap());
    let report = run_logged(cfg, Duration::from_secs(240)).await.unwrap();
    let summary = report.summary();
    println!("{summary}");
    assert!(report.passed(), "chaos checks failed:\n{summary}");
    let w = &report.checks.workloads;
    assert_eq!(w.agents, 2);
    assert!(w.looks > 20, "{summary}");
    assert_eq!(w.errors, 0);
    assert!(w.sequences_seen > 0, "no bundle sequence seen:\n{summary}");
    assert!(w.sequence_regressions.is_empty());
    // Both agents and every server are gone.
    assert!(report.processes.len() >= 5);
    for p in &report.processes {
        assert!(!runs_with(p.pid, &p.config), "pid {} still runs", p.pid);
    }
}
