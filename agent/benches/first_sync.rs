//! Benchmark (issue 5 item 9): the first sync of 100 000 authorized entries to one agent.
//!
//! `cargo bench -p plinth-agent --bench first_sync` (release). `PLINTH_BENCH_ENTRIES=N` changes
//! the number of entries, `PLINTH_BENCH_PREFETCH=N` the agent's `x509_svid_prefetch_count`, and
//! `PLINTH_BENCH_BREAKDOWN=1` runs the agent at DEBUG and splits the sync into its steps (from
//! the agent's log).
//!
//! A plinth server runs in this process (one node: Raft, RocksDB, the TLS API); the entries are
//! created through its admin socket with `EntryService.BatchCreateEntry` (1000 per call), each
//! parented to the agent's SPIFFE ID with its own SPIFFE ID. Then the real `plinth-agent run`
//! binary starts as a separate process (so that its peak RSS, VmHWM in /proc/<pid>/status, is
//! its own) with the default cache settings (x509_svid_cache_max_size = prefetch = 1000) and an
//! admin socket. Times are measured:
//! - from spawning the agent until its admin socket reports a completed sync
//!   (`last_sync_success`), polled every 10 ms: node attestation, connecting, receiving and
//!   applying the full entry set, and signing the prefetched SVIDs;
//! - from the agent's own log: from "connected" (the TLS channel to the server is up; the entry
//!   stream opens right after) to "entries synced" (the first message applied, prefetched SVIDs
//!   included), which excludes process start and attestation.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plinth_agent::client::channel;
use plinth_api::server as pb;
use plinth_api::server::entry_service_client::EntryServiceClient;
use plinth_api::spire::agent::debug::v1::debug_client::DebugClient;
use plinth_api::spire::agent::debug::v1::GetInfoRequest;

const TARGET_SECS: f64 = 2.0;
const TARGET_RSS_MB: f64 = 300.0;
const BATCH: usize = 1000;

#[path = "../tests/server_env/mod.rs"]
mod server_env;
use server_env::bundle_and_token;

/// The one-node server of the agent tests.
fn server_config(dir: &Path) -> plinth_server::config::Config {
    server_env::server_config(dir, 0)
}

/// A `/proc/<pid>/status` field in MB (the kernel gives kB).
fn status_mb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Seconds since midnight (UTC) of the first log line containing `what`, from tracing's
/// `2026-11-23T16:41:37.123456Z` prefix.
fn log_time(log: &str, what: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(what))?;
    let stamp = line.split_whitespace().next()?;
    let clock = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = clock.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn field(log: &str, line_has: &str, key: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains(line_has))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n: usize = std::env::var("PLINTH_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    // PLINTH_BENCH_PREFETCH=N: x509_svid_prefetch_count (default: the agent's, 1000).
    let prefetch = std::env::var("PLINTH_BENCH_PREFETCH")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map(|n| format!("x509_svid_prefetch_count = {n}"))
        .unwrap_or_default();
    // PLINTH_BENCH_BREAKDOWN=1: agent log at DEBUG, and the sync split into its steps.
    let breakdown = std::env::var_os("PLINTH_BENCH_BREAKDOWN").is_some();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let d = dir.path();
    let server = plinth_server::run::start(server_config(d)).await.unwrap();
    let admin = plinth_server::cli::connect(&server.admin_socket)
        .await
        .unwrap();
    let token = bundle_and_token(&admin, &d.join("bundle.pem"), 3600).await;
    let agent_id = format!("spiffe://example.org/spire/agent/join_token/{token}");

    // The entries.
    let setup = Instant::now();
    let mut client = EntryServiceClient::new(admin.clone());
    for start in (0..n).step_by(BATCH) {
        let entries = (start..(start + BATCH).min(n))
            .map(|i| pb::Entry {
                spiffe_id: format!("spiffe://example.org/workload/{i}"),
                parent_id: agent_id.clone(),
                selectors: vec![pb::Selector {
                    r#type: "unix".into(),
                    value: format!("uid:{}", 100_000 + i),
                }],
                ..Default::default()
            })
            .collect();
        let r = client
            .batch_create_entry(pb::BatchCreateEntryRequest { entries })
            .await
            .unwrap()
            .into_inner();
        assert!(r
            .results
            .iter()
            .all(|x| x.status.as_ref().is_some_and(|s| s.code == 0)));
        if start % 10_000 == 0 {
            eprintln!(
                "created {} entries in {:.1} s",
                start + BATCH,
                setup.elapsed().as_secs_f64()
            );
        }
    }
    let setup_secs = setup.elapsed().as_secs_f64();
    eprintln!("created {n} entries in {setup_secs:.1} s");

    // The agent.
    let admin_socket = d.join("private/admin.sock");
    let config = d.join("agent.toml");
    let extra = format!(
        "admin_socket_path = \"{admin}\"\nlog_level = \"{level}\"\n{prefetch}",
        admin = admin_socket.display(),
        level = if breakdown { "DEBUG" } else { "INFO" },
    );
    std::fs::write(
        &config,
        server_env::agent_config(d, server.tcp_addr, &extra),
    )
    .unwrap();
    let log_path = d.join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let spawned = Instant::now();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_plinth-agent"))
        .args(["run", "-config"])
        .arg(&config)
        .args(["-joinToken", &token])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = agent.id();

    let deadline = Instant::now() + Duration::from_secs(600);
    let info = loop {
        if Instant::now() > deadline {
            let _ = agent.kill();
            panic!(
                "no completed sync within 600 s; agent log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        if let Ok(Some(status)) = agent.try_wait() {
            panic!(
                "the agent exited ({status}); log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        if admin_socket.exists() {
            let got = DebugClient::new(channel(&admin_socket).unwrap())
                .get_info(GetInfoRequest {})
                .await;
            if let Ok(info) = got {
                let info = info.into_inner();
                if info.last_sync_success != 0 {
                    break info;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let total = spawned.elapsed().as_secs_f64();
    // Let the agent settle, then read its peak.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hwm = status_mb(pid, "VmHWM:").unwrap_or(f64::NAN);
    let rss_now = status_mb(pid, "VmRSS:").unwrap_or(f64::NAN);
    let server_hwm = status_mb(std::process::id(), "VmHWM:").unwrap_or(f64::NAN);
    let _ = agent.kill();
    let _ = agent.wait();

    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let entries = field(&text, "entries synced", "entries").unwrap_or(0);
    let svids = field(&text, "entries synced", "svids").unwrap_or(0);
    let stream_secs = match (
        log_time(&text, "connected"),
        log_time(&text, "entries synced"),
    ) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    };

    let mark = |ok: bool| if ok { "met" } else { "NOT met" };
    println!();
    println!("First sync of {n} authorized entries to one agent");
    println!("(entries created with BatchCreateEntry x{BATCH}: {setup_secs:.1} s)");
    println!();
    println!("| measure | value | target | |");
    println!("|---|---:|---:|---|");
    println!("| entries in the agent's cache | {entries} | {n} | |");
    println!("| X509-SVIDs prefetched | {svids} | | |");
    println!(
        "| agent spawn -> sync complete (admin API) | {total:.2} s | < {TARGET_SECS} s | {} |",
        mark(total < TARGET_SECS)
    );
    println!("| \"connected\" -> \"entries synced\" (agent log) | {stream_secs:.2} s | | |");
    println!(
        "| agent peak RSS (VmHWM) | {hwm:.0} MB | < {TARGET_RSS_MB} MB | {} |",
        mark(hwm < TARGET_RSS_MB)
    );
    println!("| agent RSS after the sync (VmRSS) | {rss_now:.0} MB | | |");
    println!("| bench process (server) peak RSS | {server_hwm:.0} MB | | |");
    if breakdown {
        // How much of "received" is the agent's decoding: the same full set, listed from the
        // server, encoded and decoded here.
        let mut all = Vec::with_capacity(n);
        let mut page_token = String::new();
        loop {
            let page = EntryServiceClient::new(admin.clone())
                .max_decoding_message_size(256 * 1024 * 1024)
                .list_entries(pb::ListEntriesRequest {
                    page_token: page_token.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            all.extend(page.entries);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let msg = pb::SyncAuthorizedEntriesResponse {
            full: true,
            upserted: all,
            ..Default::default()
        };
        let bytes = prost::Message::encode_to_vec(&msg);
        let t = Instant::now();
        let decoded: pb::SyncAuthorizedEntriesResponse =
            prost::Message::decode(&bytes[..]).unwrap();
        let decode = t.elapsed().as_secs_f64();
        assert_eq!(decoded.upserted.len(), n);
        let decode_line = format!(
            "| - of which protobuf decoding of the {:.1} MB full set (measured apart) | {decode:.2} s | | |",
            bytes.len() as f64 / 1e6
        );
        let at = |what: &str| log_time(&text, what);
        let step = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.2} s", b - a),
            _ => "?".into(),
        };
        let (connected, received, fetching, fetched, synced) = (
            at("connected"),
            at("entry update from server"),
            at("fetching SVIDs"),
            at("SVIDs fetched"),
            at("entries synced"),
        );
        println!(
            "| - connected -> full set received and decoded | {} | | |",
            step(connected, received)
        );
        println!("{decode_line}");
        println!(
            "| - received -> entries converted, SVIDs planned | {} | | |",
            step(received, fetching)
        );
        println!(
            "| - keys made, SVIDs signed by the server (BatchNewX509Svid) | {} | | |",
            step(fetching, fetched)
        );
        println!(
            "| - cache updated and published | {} | | |",
            step(fetched, synced)
        );
    }
    println!(
        "| admin API: cached X509-SVIDs / last_sync_success | {} / {} | | |",
        info.cached_x509_svids_count, info.last_sync_success
    );
    drop(server);
}
