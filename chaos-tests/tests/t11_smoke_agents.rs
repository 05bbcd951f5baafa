#![allow(clippy::unwrap_used)]
//! The smoke run with agents: two `plinth-agent` processes attested with join tokens, a
//! workload beside each looking at its X509-SVID and bundle four times a second, through
//! kill -9 of the leader, SIGSTOP of the leader and a restart of every server. Workloads must see
//! no error once they hold an SVID (agents serve from cache while servers are away), and the
//! bundle sequence each agent serves must never go down.

use std::path::PathBuf;
use std::process::Command;

use plinth_chaos::faults::Fault;
use plinth_chaos::scenario::{self, ScenarioConfig};

fn bin(find: fn() -> Option<PathBuf>, package: &str) -> PathBuf {
    if let Some(p) = find() {
        return p;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "-p", package, "--bin", package])
        .status()
        .unwrap();
    assert!(st.success(), "building {package} failed");
    find().unwrap_or_else(|| panic!("{package} not found after building it"))
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
async fn t11_smoke_agents_and_workloads() {
    let results = tempfile::tempdir().unwrap();
    let mut cfg = ScenarioConfig::smoke(
        bin(plinth_chaos::find_server_bin, "plinth-server"),
        results.path().to_owned(),
    );
    cfg.faults = vec![Fault::KillLeader, Fault::PauseLeader, Fault::RestartAll];
    cfg.clients = 2;
    cfg.agents = 2;
    cfg.agent_bin = Some(bin(plinth_chaos::find_agent_bin, "plinth-agent"));
    let report = run_with_watchdog(cfg).await;
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
        let alive = std::fs::read(format!("/proc/{}/cmdline", p.pid))
            .map(|c| String::from_utf8_lossy(&c).contains(&p.config))
            .unwrap_or(false);
        assert!(!alive, "pid {} still runs", p.pid);
    }
}
