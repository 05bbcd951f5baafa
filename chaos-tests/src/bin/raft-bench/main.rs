//! raft-bench: plinth's 3-server cluster against a 3-member etcd cluster (the baseline), both
//! on loopback with every write synced to disk, driven in the same run with the same value size
//! and the same client concurrency; then leader failover times for plinth (kill -9 the leader,
//! time to the first write committed through a survivor).
//!
//! ```sh
//! cargo build --release -p plinth-server -p plinth-chaos
//! /root/.cache/plinth-target/release/raft-bench --seconds 10 --failover-trials 20
//! ```
//!
//! Results are printed as Markdown tables (the form docs/benchmarks.md records).

mod etcd;
mod plinth;
mod procs;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tokio::sync::Mutex;

#[derive(Debug, Parser)]
#[command(about = "plinth's Raft cluster against etcd: write throughput, latency, failover")]
struct Args {
    /// The plinth-server binary (default: next to this one, i.e. the same build profile).
    #[arg(long)]
    plinth_bin: Option<PathBuf>,
    /// The etcd server binary (Debian: `apt-get install etcd-server`).
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd_bin: PathBuf,
    /// Measured seconds per (system, concurrency) cell, after one second of warm-up.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Bytes per write: the encoded registration entry for plinth, the value for etcd.
    #[arg(long, default_value_t = 300)]
    value_size: usize,
    /// Client counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
    /// Times to measure every (concurrency, system) cell, alternating plinth and etcd; the
    /// verdict pools all rounds, so a slow spell of a shared machine weighs on both systems.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Leader kill -9 trials (0 skips the failover measurement).
    #[arg(long, default_value_t = 10)]
    failover_trials: usize,
    /// plinth's election timeout range and heartbeat for the whole run, in ms. The defaults
    /// are plinth-server's (`plinth_raft::node::DEFAULT_*`).
    #[arg(long, default_value_t = 80)]
    election_min_ms: u64,
    #[arg(long, default_value_t = 160)]
    election_max_ms: u64,
    #[arg(long, default_value_t = 70)]
    heartbeat_ms: u64,
    /// plinth's `[cluster] snapshot_after_logs` and `logs_kept_after_snapshot` (defaults:
    /// plinth-server's).
    #[arg(long, default_value_t = 5000)]
    snapshot_after_logs: u64,
    #[arg(long, default_value_t = 1000)]
    logs_kept_after_snapshot: u64,
    /// Threads each server runs its code on: plinth's `[server] worker_threads` and etcd's
    /// `GOMAXPROCS`, the same for both (default: the host's CPUs divided among the three
    /// servers, at least 1).
    #[arg(long)]
    threads_per_server: Option<usize>,
    /// Skip the etcd baseline.
    #[arg(long)]
    no_etcd: bool,
    /// Where the data directories go (on the disk under test; not a tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    work_dir: PathBuf,
    /// Send plinth's writes to a follower, which forwards each to the leader (etcd's clients
    /// still talk to its leader).
    #[arg(long)]
    via_follower: bool,
    /// Run plinth's leader with serial leader sync: it syncs new entries before it replicates
    /// them (`[cluster] parallel_leader_sync = false`; parallel is the default), to measure the
    /// difference.
    #[arg(long)]
    serial_leader_sync: bool,
    /// Make plinth's leader wait for the answer to each commit notice (the AppendEntries that
    /// only moves a follower's commit index on) before the next entries, as openraft 0.9 does
    /// (`[cluster] pipeline_commit_notices = false`; by default it holds notices back, see
    /// `--commit-notice-delay-us`), to measure the difference.
    #[arg(long)]
    wait_for_commit_notices: bool,
    /// plinth's `[cluster] commit_notice_delay_us`: how long a commit notice is held back for
    /// the next request to carry; 0 sends it at once without waiting for its answer (default:
    /// plinth-server's).
    #[arg(long, default_value_t = 1000)]
    commit_notice_delay_us: u64,
    /// Keep the work directory (data and each server's log) after the run, and print its path.
    #[arg(long)]
    keep_work_dir: bool,
    /// Which system runs first in each (round, concurrency) pair of cells: `plinth-first`,
    /// `etcd-first`, or `alternate` (plinth first in rounds 1, 3, ..., etcd first in rounds 2,
    /// 4, ...), to see whether a cell's place in the run moves its figures.
    #[arg(long, value_enum, default_value_t = Order::PlinthFirst)]
    order: Order,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Order {
    PlinthFirst,
    EtcdFirst,
    Alternate,
}

impl Order {
    /// Whether etcd's cell comes before plinth's in round `r` (0-based).
    fn etcd_first(self, r: usize) -> bool {
        match self {
            Order::PlinthFirst => false,
            Order::EtcdFirst => true,
            Order::Alternate => r % 2 == 1,
        }
    }
}

/// One client's connection to one system.
#[derive(Debug)]
enum Client {
    Plinth(plinth::Writer),
    Etcd(etcd::Writer),
}

impl Client {
    async fn write(&mut self, seq: u64) -> Result<(), String> {
        match self {
            Client::Plinth(w) => w.write(seq).await,
            Client::Etcd(w) => w.write(seq).await,
        }
    }
}

/// What one cell of the table measured.
#[derive(Debug, Default)]
struct Stats {
    /// Writes sent in the whole cell, warm-up included.
    sent: u64,
    ops: usize,
    errors: usize,
    seconds: f64,
    latencies: Vec<Duration>,
    /// CPU time the system's three server processes used over the whole cell (warm-up
    /// included, as `sent` is).
    cpu: Duration,
    /// Their threads' voluntary context switches over the cell (`procs::Proc::voluntary_switches`).
    switches: u64,
    /// Bytes the three server processes caused to be written to storage over the cell
    /// (`procs::Proc::disk_written`).
    disk_written: u64,
    /// The log syncs (fsyncs of the write-ahead log) of the three servers over the cell, and
    /// their total time in microseconds, as each system reports them.
    syncs: u64,
    sync_micros: u64,
}

impl Stats {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.seconds
    }

    /// Server CPU time per write sent, in ms: what a write costs the three servers together,
    /// which a busy host's stalls distort far less than the rate.
    fn cpu_per_write(&self) -> f64 {
        self.cpu.as_secs_f64() * 1000.0 / self.sent.max(1) as f64
    }

    /// Server threads' voluntary context switches per write sent: the thread hand-offs a write
    /// costs the three servers, which the host's load hardly moves at all.
    fn switches_per_write(&self) -> f64 {
        self.switches as f64 / self.sent.max(1) as f64
    }

    /// KB written to storage per write sent: the log, the state and their tables as each
    /// system lays them out (what both compete for on one disk).
    fn disk_kb_per_write(&self) -> f64 {
        self.disk_written as f64 / 1024.0 / self.sent.max(1) as f64
    }

    /// The mean time of one log sync over the cell, in ms: the disk's share of a write, which
    /// is the same for both systems on a shared disk unless one syncs differently.
    fn sync_ms(&self) -> f64 {
        self.sync_micros as f64 / 1000.0 / self.syncs.max(1) as f64
    }

    /// All rounds of one cell as one measurement (`None` if there were none).
    fn pooled<'a>(rounds: impl Iterator<Item = &'a Stats>) -> Option<Stats> {
        let mut all = Stats::default();
        let mut any = false;
        for s in rounds {
            any = true;
            all.sent += s.sent;
            all.ops += s.ops;
            all.errors += s.errors;
            all.seconds += s.seconds;
            all.cpu += s.cpu;
            all.switches += s.switches;
            all.disk_written += s.disk_written;
            all.syncs += s.syncs;
            all.sync_micros += s.sync_micros;
            all.latencies.extend_from_slice(&s.latencies);
        }
        all.latencies.sort();
        any.then_some(all)
    }
}

/// The `q` quantile (0..=1) of sorted samples, nearest rank.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// [`run_load`], with what the servers used meanwhile (`usage` reads their total so far).
async fn run_load_used(
    clients: Vec<Client>,
    seconds: u64,
    usage: impl Fn() -> procs::Usage,
) -> Stats {
    let before = usage();
    let mut s = run_load(clients, seconds).await;
    let used = usage().since(before);
    (s.cpu, s.switches, s.disk_written) = (used.cpu, used.switches, used.disk_written);
    s
}

/// Runs every client in a loop for `warm + measured`; counts the writes that started after the
/// warm-up and were acknowledged.
async fn run_load(clients: Vec<Client>, seconds: u64) -> Stats {
    let warm = Duration::from_secs(1);
    let measured = Duration::from_secs(seconds);
    let start = Instant::now();
    let from = start + warm;
    let until = from + measured;
    let stats = Arc::new(Mutex::new(Stats::default()));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let stats = stats.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0usize;
                let mut seq = 0u64;
                loop {
                    let t = Instant::now();
                    if t >= until {
                        break;
                    }
                    let r = c.write(seq).await;
                    seq += 1;
                    if t < from {
                        continue;
                    }
                    match r {
                        Ok(()) => lat.push(t.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                let mut s = stats.lock().await;
                s.sent += seq;
                s.ops += lat.len();
                s.errors += errors;
                s.latencies.extend(lat);
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let end = Instant::now();
    let mut s = std::mem::take(&mut *stats.lock().await);
    s.seconds = end.duration_since(from).as_secs_f64();
    s.latencies.sort();
    s
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plinth_bin = match &args.plinth_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating this binary")?
            .with_file_name("plinth-server"),
    };
    anyhow::ensure!(
        plinth_bin.exists(),
        "{} not found (cargo build --release -p plinth-server)",
        plinth_bin.display()
    );
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("creating {}", args.work_dir.display()))?;
    let mut dir = tempfile::Builder::new()
        .prefix("raft-bench-")
        .tempdir_in(&args.work_dir)
        .context("creating the work directory")?;
    // Kept directories are left for the reader: the servers' logs are in plinth/n*/server.log.
    if args.keep_work_dir {
        dir.disable_cleanup(true);
        println!("work directory (kept): {}", dir.path().display());
    }
    let threads = match args.threads_per_server {
        Some(0) => anyhow::bail!("--threads-per-server must be at least 1"),
        Some(n) => n,
        None => (std::thread::available_parallelism().map_or(1, |n| n.get()) / 3).max(1),
    };
    let timing = plinth::Timing {
        election_min_ms: args.election_min_ms,
        election_max_ms: args.election_max_ms,
        heartbeat_ms: args.heartbeat_ms,
        snapshot_after_logs: args.snapshot_after_logs,
        logs_kept_after_snapshot: args.logs_kept_after_snapshot,
        parallel_leader_sync: !args.serial_leader_sync,
        pipeline_commit_notices: !args.wait_for_commit_notices,
        commit_notice_delay_us: args.commit_notice_delay_us,
        worker_threads: threads,
    };

    eprintln!(
        "starting plinth (3 processes) and etcd (3 members), {threads} thread(s) per server ..."
    );
    let mut pc = plinth::Cluster::start(&plinth_bin, &dir.path().join("plinth"), timing).await?;
    pc.verbose = args.keep_work_dir;
    let ec = if args.no_etcd {
        None
    } else {
        Some(etcd::Cluster::start(&args.etcd_bin, &dir.path().join("etcd"), threads).await?)
    };

    println!();
    println!("threads per server: {threads} (plinth's worker_threads, etcd's GOMAXPROCS)");
    println!(
        "| clients | system | writes/s | p50 ms | p99 ms | errors | server CPU ms/write | \
         server thread switches/write | log sync ms (mean) | disk KB written/write |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut results = Vec::new();
    let mut batching = Vec::new();
    let cells = args.concurrency.len();
    for r in 0..args.rounds {
        for (i, &n) in args.concurrency.iter().enumerate() {
            // Unique per cell, so no two cells write the same keys.
            let cell = r * cells + i;
            let systems = if args.order.etcd_first(r) {
                ["etcd", "plinth"]
            } else {
                ["plinth", "etcd"]
            };
            for system in systems {
                if system == "plinth" {
                    let leader = pc.leader().await?;
                    let target = if args.via_follower {
                        pc.follower_of(leader)?
                    } else {
                        leader
                    };
                    let mut clients = Vec::new();
                    for c in 0..n {
                        let w =
                            plinth::Writer::connect(&pc.socket(target), cell, c, args.value_size)
                                .await?;
                        clients.push(Client::Plinth(w));
                    }
                    let before = pc.applied_index(leader).await?;
                    let syncs = pc.log_syncs(leader).await?;
                    let mut s = run_load_used(clients, args.seconds, || pc.usage()).await;
                    let entries = pc.applied_index(leader).await?.saturating_sub(before);
                    (s.syncs, s.sync_micros) = since(pc.log_syncs(leader).await?, syncs);
                    print_row(n, "plinth", &s);
                    batching.push((n, s.sent, entries));
                    results.push(("plinth", n, s));
                } else if let Some(ec) = &ec {
                    let endpoint = ec.leader_endpoint().await?;
                    let mut clients = Vec::new();
                    for c in 0..n {
                        let w = etcd::Writer::connect(&endpoint, cell, c, args.value_size).await?;
                        clients.push(Client::Etcd(w));
                    }
                    let syncs = ec.wal_fsyncs().await?;
                    let mut s = run_load_used(clients, args.seconds, || ec.usage()).await;
                    (s.syncs, s.sync_micros) = since(ec.wal_fsyncs().await?, syncs);
                    print_row(n, "etcd", &s);
                    results.push(("etcd", n, s));
                }
            }
        }
    }
    println!();
    for (n, sent, entries) in batching {
        println!(
            "plinth, {n} client(s): {sent} writes in {entries} log entries ({:.1} writes per entry)",
            sent as f64 / entries.max(1) as f64
        );
    }
    if ec.is_some() {
        println!();
        for &n in &args.concurrency {
            let get = |sys: &str| {
                Stats::pooled(
                    results
                        .iter()
                        .filter(|(s, c, _)| *s == sys && *c == n)
                        .map(|(_, _, st)| st),
                )
            };
            if let (Some(p), Some(e)) = (get("plinth"), get("etcd")) {
                let p99p = quantile(&p.latencies, 0.99);
                let p99e = quantile(&e.latencies, 0.99);
                let met = p.rate() >= e.rate() && p99p <= p99e;
                println!(
                    "{n} client(s), {} round(s) pooled: plinth {:.0} vs etcd {:.0} writes/s, \
                     throughput {:.2}x, p99 {} ms vs {} ms: target {}; server CPU per write \
                     {:.3} vs {:.3} ms, thread switches per write {:.1} vs {:.1}, log sync \
                     {:.3} vs {:.3} ms mean, disk written per write {:.1} vs {:.1} KB",
                    args.rounds,
                    p.rate(),
                    e.rate(),
                    p.rate() / e.rate(),
                    ms(p99p),
                    ms(p99e),
                    if met { "met" } else { "NOT met" },
                    p.cpu_per_write(),
                    e.cpu_per_write(),
                    p.switches_per_write(),
                    e.switches_per_write(),
                    p.sync_ms(),
                    e.sync_ms(),
                    p.disk_kb_per_write(),
                    e.disk_kb_per_write()
                );
            }
        }
    }
    drop(ec);

    if args.failover_trials > 0 {
        println!();
        println!(
            "plinth leader failover, {} trials (election timeout {}-{} ms, heartbeat {} ms):",
            args.failover_trials, args.election_min_ms, args.election_max_ms, args.heartbeat_ms
        );
        let mut times = Vec::new();
        for trial in 0..args.failover_trials {
            let t = pc.failover_trial(trial).await?;
            eprintln!("  trial {trial}: {} ms", ms(t));
            times.push(t);
        }
        times.sort();
        let p50 = quantile(&times, 0.5);
        let p99 = quantile(&times, 0.99);
        println!(
            "| trials | min ms | p50 ms | p99 ms | max ms |\n|---:|---:|---:|---:|---:|\n| {} | {} | {} | {} | {} |",
            times.len(),
            ms(times[0]),
            ms(p50),
            ms(p99),
            ms(times[times.len() - 1])
        );
        println!(
            "target p50 < 400 ms: {}; p99 < 1000 ms: {}",
            if p50 < Duration::from_millis(400) {
                "met"
            } else {
                "NOT met"
            },
            if p99 < Duration::from_secs(1) {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    Ok(())
}

fn print_row(n: usize, system: &str, s: &Stats) {
    println!(
        "| {n} | {system} | {:.0} | {} | {} | {} | {:.3} | {:.1} | {:.3} | {:.1} |",
        s.rate(),
        ms(quantile(&s.latencies, 0.5)),
        ms(quantile(&s.latencies, 0.99)),
        s.errors,
        s.cpu_per_write(),
        s.switches_per_write(),
        s.sync_ms(),
        s.disk_kb_per_write()
    );
}

/// The syncs and their microseconds between two readings (a server restarted in between
/// counts from zero again, which gives zero here rather than a wrapped figure).
fn since(after: (u64, u64), before: (u64, u64)) -> (u64, u64) {
    (
        after.0.saturating_sub(before.0),
        after.1.saturating_sub(before.1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn order_puts_etcd_first_as_named() {
        for r in 0..4 {
            assert!(!Order::PlinthFirst.etcd_first(r));
            assert!(Order::EtcdFirst.etcd_first(r));
        }
        // Alternate: round 1 (r = 0) plinth first, round 2 etcd first, and so on.
        let alternate: Vec<bool> = (0..4).map(|r| Order::Alternate.etcd_first(r)).collect();
        assert_eq!(alternate, [false, true, false, true]);
    }

    #[test]
    fn order_parses_its_cli_names() {
        for (name, want) in [
            ("plinth-first", Order::PlinthFirst),
            ("etcd-first", Order::EtcdFirst),
            ("alternate", Order::Alternate),
        ] {
            assert_eq!(Order::from_str(name, false), Ok(want));
        }
        assert!(Order::from_str("random", false).is_err());
    }

    #[test]
    fn disk_kb_per_write_divides_bytes_by_writes() {
        let s = Stats {
            sent: 4,
            disk_written: 8 * 1024,
            ..Stats::default()
        };
        assert_eq!(s.disk_kb_per_write(), 2.0);
        let pooled = Stats::pooled([&s, &s].into_iter()).expect("two rounds");
        assert_eq!(pooled.disk_written, 16 * 1024);
        assert_eq!(pooled.disk_kb_per_write(), 2.0);
    }
}
