#![allow(clippy::unwrap_used)]
//! Docker mode: the three servers in containers on a private network the test creates, the
//! image built from the server binary by `docker import` (nothing pulled). The leader, then a
//! follower, is disconnected from the network while clients keep calling every server's admin
//! socket (also the cut-off one's); then the leader hears nothing but still sends (a one-way
//! link), then it loses 20 % of its packets, then its container is killed. Every check must
//! pass, and no container or network of the run may remain. Needs root (iptables in the
//! containers' network namespaces through nsenter), as the rest of the CI does.

use std::process::Command;

use plinth_chaos::faults::Fault;
use plinth_chaos::scenario::{self, ScenarioConfig};
use plinth_chaos::testing::server_bin;

fn docker_names(kind: &[&str], format: &str, prefix: &str) -> String {
    let mut args: Vec<&str> = kind.to_vec();
    let filter = format!("name={prefix}");
    args.extend(["--filter", &filter, "--format", format]);
    let out = Command::new("docker").args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t30_docker_partitions() {
    assert!(
        plinth_chaos::docker::available(),
        "this test needs a Docker engine (the CI machine has one)"
    );
    let results = tempfile::tempdir().unwrap();
    let mut cfg = ScenarioConfig::smoke(server_bin().unwrap(), results.path().to_owned());
    cfg.cluster.docker = true;
    cfg.clients = 2;
    cfg.faults = vec![
        Fault::PartitionLeader,
        Fault::PartitionFollower,
        Fault::OneWayLeader,
        Fault::LossyLeader,
        Fault::KillLeader,
    ];
    let report = scenario::run(cfg).await.unwrap();
    let summary = report.summary();
    println!("{summary}");
    assert!(report.passed(), "chaos checks failed:\n{summary}");
    assert_eq!(report.mode, "docker");
    let names: Vec<&str> = report.windows.iter().map(|w| w.fault.as_str()).collect();
    assert_eq!(
        names,
        [
            "partition-leader",
            "partition-follower",
            "one-way-leader",
            "lossy-leader",
            "kill-leader"
        ]
    );
    assert!(report.rows.iter().all(|r| r.acknowledged > 0), "{summary}");

    let prefix = report.docker_prefix.clone().unwrap();
    assert_eq!(
        docker_names(&["ps", "-a"], "{{.Names}}", &prefix),
        "",
        "containers left"
    );
    assert_eq!(
        docker_names(&["network", "ls"], "{{.Name}}", &prefix),
        "",
        "network left"
    );
}
