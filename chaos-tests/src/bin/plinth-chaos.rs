//! `plinth-chaos`: brings up a plinth cluster as local processes, drives clients, injects
//! faults, checks the history and writes a report (JSON, summary table, PNG) into a results
//! directory. Exits 0 when every check passed, 1 when one failed, 2 when the run broke.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use plinth_chaos::faults::Fault;
use plinth_chaos::scenario::{self, ScenarioConfig};

#[derive(Debug, Parser)]
#[command(
    name = "plinth-chaos",
    version,
    about = "Chaos runs against a plinth cluster"
)]
struct Args {
    /// Where the report goes (report.json, summary.md, timeline.png, history.jsonl, logs/).
    #[arg(long, default_value = "chaos-results")]
    results: PathBuf,
    /// The plinth-server binary (default: $PLINTH_SERVER_BIN, or next to this binary).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Long mode: repeat the faults until this many seconds passed (e.g. 600).
    #[arg(long)]
    duration: Option<u64>,
    /// Faults to inject, in order (comma-separated): kill-leader, pause-leader,
    /// pause-follower, member-change, restart-all, snapshot-install (default in long mode);
    /// with --docker also partition-leader, partition-follower, lossy-leader,
    /// one-way-leader.
    /// Default: all that the mode allows.
    #[arg(long, value_delimiter = ',')]
    faults: Vec<Fault>,
    /// Register clients.
    #[arg(long, default_value_t = 3)]
    clients: usize,
    /// Seconds each fault lasts before it heals.
    #[arg(long, default_value_t = 3)]
    hold: u64,
    /// Seconds of load between faults.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// The stated recovery bound in seconds: a write commits this soon after a fault.
    #[arg(long, default_value_t = 20)]
    recovery_bound: u64,
    /// Agents to run beside the servers, each with a workload watching its SVID and bundle
    /// (0: none). Needs the plinth-agent binary (--agent-bin, $PLINTH_AGENT_BIN, or next to
    /// this binary).
    #[arg(long, default_value_t = 2)]
    agents: usize,
    /// The plinth-agent binary.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Only re-render summary.md and timeline.png of the report in --results (no run).
    #[arg(long)]
    render: bool,
    /// Run the servers in containers on a private Docker network (the image is built from
    /// the server binary; nothing is pulled). Adds the partition faults to the default list.
    #[arg(long)]
    docker: bool,
}

async fn real_main() -> anyhow::Result<bool> {
    let a = Args::parse();
    if a.render {
        let r = plinth_chaos::report::Report::read(&a.results)?;
        r.write(&a.results)?;
        print!("{}", r.summary());
        return Ok(r.passed());
    }
    let bin = a
        .server_bin
        .or_else(plinth_chaos::find_server_bin)
        .context("no plinth-server binary: pass --server-bin or set PLINTH_SERVER_BIN")?;
    let mut cfg = ScenarioConfig::smoke(bin, a.results.clone());
    cfg.cluster.docker = a.docker;
    if a.docker {
        cfg.faults.extend(Fault::DOCKER);
    }
    if a.duration.is_some() {
        cfg.faults.extend(Fault::LONG);
    }
    if !a.faults.is_empty() {
        cfg.faults = a.faults;
    }
    if let Some(f) = cfg.faults.iter().find(|f| f.needs_docker() && !a.docker) {
        anyhow::bail!("fault {} needs --docker", f.name());
    }
    cfg.duration = a.duration.map(Duration::from_secs);
    cfg.clients = a.clients.max(1);
    cfg.hold = Duration::from_secs(a.hold);
    cfg.settle = Duration::from_secs(a.settle);
    cfg.recovery_bound = Duration::from_secs(a.recovery_bound);
    cfg.agents = a.agents;
    if a.agents > 0 {
        cfg.agent_bin = Some(
            a.agent_bin
                .or_else(plinth_chaos::find_agent_bin)
                .context("no plinth-agent binary: pass --agent-bin, or --agents 0")?,
        );
    }
    // Ctrl-C / SIGTERM: drop the run, which kills every server process it started.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let report = tokio::select! {
        r = scenario::run(cfg) => r?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; servers stopped"),
        _ = term.recv() => anyhow::bail!("terminated; servers stopped"),
    };
    print!("{}", report.summary());
    println!("\nreport: {}", a.results.display());
    Ok(report.passed())
}

#[tokio::main]
async fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match real_main().await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::exit(2);
        }
    }
}
