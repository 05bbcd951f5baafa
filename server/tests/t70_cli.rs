#![allow(clippy::unwrap_used)]
//! The `plinth-server` command line against a running server: SPIRE's subcommands and flags,
//! pretty and JSON output, and errors as one clear line with a non-zero exit.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use plinth_server::config::Config;
use plinth_server::run::start;

const BIN: &str = env!("CARGO_BIN_EXE_plinth-server");

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn cli(args: &[&str]) -> Out {
    let o = Command::new(BIN).args(args).output().unwrap();
    Out {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

mod common;

fn config_text(dir: &std::path::Path) -> String {
    common::config_text(dir, 1, true, common::JOIN_TOKEN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t70_cli_against_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path());
    let cfg_path = dir.path().join("server.toml");
    std::fs::write(&cfg_path, &text).unwrap();
    let server = start(Config::parse(&text, false).unwrap()).await.unwrap();
    let sock = server.admin_socket.to_str().unwrap().to_owned();
    let run = move |args: &[&str]| {
        let mut v: Vec<&str> = args.to_vec();
        v.extend_from_slice(&["-socketPath", sock.as_str()]);
        cli(&v)
    };

    let o = tokio::task::spawn_blocking(move || {
        let v = cli(&["validate", "-config", cfg_path.to_str().unwrap()]);
        assert!(v.ok, "{}", v.stderr);
        assert!(v.stdout.contains("Configuration is valid."));
        let bad = cfg_path.with_file_name("bad.toml");
        std::fs::write(
            &bad,
            std::fs::read_to_string(&cfg_path)
                .unwrap()
                .replace("data_dir", "datadir"),
        )
        .unwrap();
        let v = cli(&["validate", "-config", bad.to_str().unwrap()]);
        assert!(!v.ok);
        assert!(
            v.stderr.contains("datadir"),
            "unknown key named: {}",
            v.stderr
        );
        assert_eq!(v.stderr.trim().lines().count(), 1, "{}", v.stderr);
        // Raft timings that could only fail once Raft starts are refused here, by key.
        let slow = cfg_path.with_file_name("slow-heartbeat.toml");
        let text = std::fs::read_to_string(&cfg_path).unwrap();
        assert!(text.contains("heartbeat_interval_ms = 50\n"), "{text}");
        std::fs::write(
            &slow,
            text.replace(
                "heartbeat_interval_ms = 50\n",
                "heartbeat_interval_ms = 150\n",
            ),
        )
        .unwrap();
        let s = cli(&["validate", "-config", slow.to_str().unwrap()]);
        assert!(!s.ok, "{}", s.stdout);
        assert!(
            s.stderr.contains("cluster.heartbeat_interval_ms"),
            "{}",
            s.stderr
        );
        v
    })
    .await
    .unwrap();
    assert!(o.stderr.starts_with("Error:"), "{}", o.stderr);

    let out = tokio::task::spawn_blocking(move || {
        let mut log = Vec::new();
        // entry create, pretty.
        let o = run(&[
            "entry",
            "create",
            "-spiffeID",
            "spiffe://example.org/web",
            "-parentID",
            "spiffe://example.org/spire/agent/join_token/abc",
            "-selector",
            "unix:uid:1000",
            "-selector",
            "unix:gid:1000",
            "-dns",
            "web.example.org",
            "-x509SVIDTTL",
            "600",
        ]);
        assert!(o.ok, "{}", o.stderr);
        for want in [
            "Entry ID",
            "SPIFFE ID        : spiffe://example.org/web",
            "Selector         : unix:gid:1000",
            "X509-SVID TTL    : 600",
            "JWT-SVID TTL     : default",
            "DNS name         : web.example.org",
        ] {
            assert!(o.stdout.contains(want), "missing {want:?} in {}", o.stdout);
        }
        let id = o
            .stdout
            .lines()
            .next()
            .unwrap()
            .split(": ")
            .nth(1)
            .unwrap()
            .trim()
            .to_owned();
        // The same mapping again: refused, one line, non-zero.
        let o = run(&[
            "entry",
            "create",
            "-spiffeID",
            "spiffe://example.org/web",
            "-parentID",
            "spiffe://example.org/spire/agent/join_token/abc",
            "-selector",
            "unix:uid:1000",
            "-selector",
            "unix:gid:1000",
        ]);
        assert!(!o.ok);
        assert_eq!(o.stderr.trim().lines().count(), 1, "{}", o.stderr);
        assert!(o.stderr.contains("already exists"), "{}", o.stderr);
        // Bad input.
        let o = run(&[
            "entry",
            "create",
            "-spiffeID",
            "spiffe://example.org/a/../b",
            "-parentID",
            "spiffe://example.org/p",
            "-selector",
            "unix:uid:1",
        ]);
        assert!(!o.ok && o.stderr.contains("dot segments"), "{}", o.stderr);
        let o = run(&[
            "entry",
            "create",
            "-spiffeID",
            "spiffe://example.org/x",
            "-parentID",
            "spiffe://example.org/p",
        ]);
        assert!(
            !o.ok && o.stderr.contains("at least one selector"),
            "{}",
            o.stderr
        );
        let o = run(&[
            "entry",
            "create",
            "-spiffeID",
            "spiffe://example.org/x",
            "-parentID",
            "spiffe://example.org/p",
            "-selector",
            "nocolon",
        ]);
        assert!(!o.ok && o.stderr.contains("type:value"), "{}", o.stderr);
        // show/json/count/update/delete.
        let o = run(&["entry", "show", "-output", "json"]);
        assert!(o.ok, "{}", o.stderr);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["entries"].as_array().unwrap().len(), 1);
        assert_eq!(v["entries"][0]["x509_svid_ttl"], 600);
        let o = run(&["entry", "show", "-selector", "unix:uid:1000"]);
        assert!(o.stdout.contains("Found 1 entry"), "{}", o.stdout);
        let o = run(&["entry", "show", "-selector", "unix:uid:9"]);
        assert!(o.stdout.contains("Found 0 entries"), "{}", o.stdout);
        let o = run(&["entry", "count"]);
        assert_eq!(o.stdout.trim(), "1 registration entry");
        let o = run(&[
            "entry",
            "update",
            "-entryID",
            &id,
            "-spiffeID",
            "spiffe://example.org/web2",
            "-parentID",
            "spiffe://example.org/spire/agent/join_token/abc",
            "-selector",
            "unix:uid:1000",
            "-entryExpiry",
            "4102444800",
        ]);
        assert!(
            o.ok && o.stdout.contains("spiffe://example.org/web2"),
            "{}{}",
            o.stdout,
            o.stderr
        );
        // Times print as SPIRE prints them (Go's time in UTC), not as Unix seconds.
        assert!(
            o.stdout
                .contains("Expiration time  : 2100-01-01 00:00:00 +0000 UTC"),
            "{}",
            o.stdout
        );
        let o = run(&["entry", "delete", "-entryID", &id]);
        assert!(o.ok && o.stdout.contains(&id), "{}", o.stderr);
        let o = run(&["entry", "delete", "-entryID", &id]);
        assert!(!o.ok && o.stderr.contains("not found"), "{}", o.stderr);
        // tokens, agents.
        let o = run(&["token", "generate", "-ttl", "60"]);
        assert!(o.ok && o.stdout.starts_with("Token: "), "{}", o.stderr);
        let o = run(&["agent", "list"]);
        assert!(
            o.ok && o.stdout.contains("Found 0 attested agents"),
            "{}",
            o.stdout
        );
        let o = run(&[
            "agent",
            "ban",
            "-spiffeID",
            "spiffe://example.org/spire/agent/join_token/none",
        ]);
        assert!(!o.ok && o.stderr.contains("not found"), "{}", o.stderr);
        // bundles.
        let o = run(&["bundle", "show"]);
        assert!(
            o.ok && o.stdout.starts_with("-----BEGIN CERTIFICATE-----"),
            "{}",
            o.stderr
        );
        let o = run(&["bundle", "show", "-format", "spiffe"]);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        assert!(v["keys"].as_array().unwrap().len() >= 2);
        assert!(v["spiffe_sequence"].as_u64().unwrap() >= 2);
        let o = run(&["bundle", "show", "-format", "der"]);
        assert!(
            !o.ok && o.stderr.contains("use pem or spiffe"),
            "{}",
            o.stderr
        );
        // local authority: forced rotation.
        let o = run(&["localauthority", "x509", "prepare"]);
        assert!(
            o.ok && o.stdout.contains("Prepared x509 authority"),
            "{}",
            o.stderr
        );
        let o = run(&["localauthority", "x509", "activate"]);
        assert!(
            o.ok && o.stdout.contains("Activated x509 authority"),
            "{}",
            o.stderr
        );
        let o = run(&["localauthority", "x509", "show"]);
        assert!(
            o.stdout.contains("Active authority") && o.stdout.contains("Old authority"),
            "{}",
            o.stdout
        );
        // mint.
        let mint_dir = tempfile::tempdir().unwrap();
        let o = run(&[
            "x509",
            "mint",
            "-spiffeID",
            "spiffe://example.org/minted",
            "-write",
            mint_dir.path().to_str().unwrap(),
        ]);
        assert!(o.ok, "{}", o.stderr);
        let mode = std::fs::metadata(mint_dir.path().join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let chain = std::fs::read_to_string(mint_dir.path().join("svid.pem")).unwrap();
        assert!(chain.contains("BEGIN CERTIFICATE"));
        let o = run(&[
            "jwt",
            "mint",
            "-spiffeID",
            "spiffe://example.org/minted",
            "-audience",
            "db",
        ]);
        assert!(
            o.ok && o.stdout.trim().split('.').count() == 3,
            "{}",
            o.stderr
        );
        let o = run(&["jwt", "mint", "-spiffeID", "spiffe://example.org/minted"]);
        assert!(!o.ok && o.stderr.contains("audience"), "{}", o.stderr);
        // cluster and health.
        let o = run(&["cluster", "status"]);
        assert!(o.ok && o.stdout.contains("Leader    : 1"), "{}", o.stdout);
        // The node synced its Raft log for the writes above: its mean sync time is shown.
        assert!(
            o.stdout.contains(", log sync ") && o.stdout.contains(" ms mean"),
            "{}",
            o.stdout
        );
        let o = run(&["cluster", "status", "-output", "json"]);
        assert!(o.ok, "{}", o.stderr);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        let me = &v["members"][0];
        assert!(me["log_syncs"].as_u64().unwrap() >= 1, "{v}");
        assert!(me["log_sync_micros"].as_u64().is_some(), "{v}");
        let o = run(&["healthcheck"]);
        assert!(
            o.ok && o.stdout.contains("Server is healthy."),
            "{}",
            o.stderr
        );
        log.push(o.stdout);
        log
    })
    .await
    .unwrap();
    assert_eq!(out.len(), 1);

    // A wrong socket path: one clear line.
    let o = cli(&["entry", "count", "-socketPath", "/nonexistent/api.sock"]);
    assert!(!o.ok);
    assert!(o.stderr.contains("does not exist"), "{}", o.stderr);
    assert_eq!(o.stderr.trim().lines().count(), 1);
    server.shutdown().await.unwrap();
}
