//! Issue 5: the bounded SVID cache with a real server (a workload whose SVID was not prefetched
//! still gets it; the cache keeps to its maximum by evicting the least recently used SVID), and
//! the admin socket's Debug API reporting what the agent holds.
#![allow(clippy::unwrap_used)]

mod server_env;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use plinth_agent::client::{channel, connect};
use plinth_api::spire::agent::debug::v1::debug_client::DebugClient;
use plinth_api::spire::agent::debug::v1::{GetInfoRequest, GetInfoResponse};
use plinth_api::workload::JwtsvidRequest;
use server_env::{entry, first_x509_answer, my_uid, Env};
use time::OffsetDateTime;

async fn get_info(socket: &Path) -> GetInfoResponse {
    DebugClient::new(channel(socket).unwrap())
        .get_info(GetInfoRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The SPIFFE IDs of the first FetchX509SVID answer to this process.
async fn fetch_ids(socket: &Path) -> Result<Vec<String>, tonic::Status> {
    let msg = first_x509_answer(socket).await?;
    Ok(msg.svids.into_iter().map(|s| s.spiffe_id).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t92_lru_cache_serves_unprefetched_svids_and_admin_socket_reports_them() {
    let mut env = Env::start().await;
    let agent_id = env.agent_id.clone();
    // Four entries for this agent; IDs chosen so that prefetch (in entry-ID order) takes the two
    // other workloads' entries and not this process's, which sorts last.
    env.create(vec![
        entry(
            "a-other",
            "spiffe://example.org/other-a",
            &agent_id,
            "unix:uid:5001",
        ),
        entry(
            "b-other",
            "spiffe://example.org/other-b",
            &agent_id,
            "unix:uid:5002",
        ),
        entry(
            "c-other",
            "spiffe://example.org/other-c",
            &agent_id,
            "unix:uid:5003",
        ),
        entry(
            "z-me",
            "spiffe://example.org/me",
            &agent_id,
            &format!("unix:uid:{}", my_uid()),
        ),
    ])
    .await;

    // A stale socket where the admin socket goes: the agent replaces it.
    let admin_dir = env.path().join("private");
    std::fs::create_dir(&admin_dir).unwrap();
    std::fs::set_permissions(&admin_dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    let admin = admin_dir.join("admin.sock");
    drop(std::os::unix::net::UnixListener::bind(&admin).unwrap());
    assert!(std::fs::symlink_metadata(&admin)
        .unwrap()
        .file_type()
        .is_socket());

    let started = OffsetDateTime::now_utc().unix_timestamp();
    env.spawn_agent(&format!(
        "x509_svid_cache_max_size = 2\nx509_svid_prefetch_count = 2\nadmin_socket_path = \"{}\"",
        admin.display()
    ));
    env.wait_for("the first sync", || {
        env.agent_log().contains("entries synced")
    })
    .await;

    // Every entry is held, but only the two prefetched SVIDs.
    let log = env.agent_log();
    assert!(log.contains("entries=4 svids=2"), "{log}");
    let info = get_info(&admin).await;
    assert_eq!(info.cached_x509_svids_count, 2);
    // Deprecated in SPIRE's proto, still filled as SPIRE does.
    #[allow(deprecated)]
    let svids_count = info.svids_count;
    assert_eq!(svids_count, 2);
    assert_eq!(info.cached_jwt_svids_count, 0);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (started..=now).contains(&info.last_sync_success),
        "{info:?}"
    );
    assert!(info.uptime >= 0 && i64::from(info.uptime) <= now - started + 1);
    let leaf = &info.svid_chain[0];
    let leaf_id = leaf.id.as_ref().unwrap();
    assert_eq!(
        format!("spiffe://{}{}", leaf_id.trust_domain, leaf_id.path),
        agent_id
    );
    assert!(leaf.expires_at > now, "{info:?}");
    assert!(leaf.subject.contains("SPIRE"), "{info:?}");
    let mode = std::fs::metadata(&admin).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o770,
        "the admin socket is for the agent's user and group"
    );

    // This process's entry was not prefetched: the Workload API waits while the agent gets the
    // SVID from the server, then answers with it.
    assert_eq!(
        fetch_ids(&env.socket).await.unwrap(),
        ["spiffe://example.org/me"]
    );
    assert!(env.agent_log().contains("waiting for X509-SVIDs"));
    // Three SVIDs would exceed the maximum: the least recently used unsubscribed one went.
    let info = get_info(&admin).await;
    assert_eq!(info.cached_x509_svids_count, 2, "{}", env.agent_log());
    // A JWT-SVID for it shows up in the JWT count.
    let mut client = connect(&env.socket).unwrap();
    client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(get_info(&admin).await.cached_jwt_svids_count, 1);

    // Another workload (another UID) whose SVID was evicted or never fetched gets it too; the
    // cache stays at its maximum.
    let sock = env.socket.to_str().unwrap().to_owned();
    for uid in [5001u32, 5003] {
        let cmd = env.cli_as(
            uid,
            &[
                "api",
                "fetch",
                "x509",
                "-socketPath",
                &sock,
                "-timeout",
                "20",
            ],
        );
        let out = tokio::task::spawn_blocking(move || {
            let mut cmd = cmd;
            cmd.output()
                .expect("setpriv (util-linux) must be installed")
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let want = if uid == 5001 { "other-a" } else { "other-c" };
        assert!(
            out.status.success() && stdout.contains(&format!("spiffe://example.org/{want}\n")),
            "uid {uid}: {stdout}\n{}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            env.agent_log()
        );
        assert_eq!(get_info(&admin).await.cached_x509_svids_count, 2);
    }

    // This process again: served, whether still cached or fetched once more.
    assert_eq!(
        fetch_ids(&env.socket).await.unwrap(),
        ["spiffe://example.org/me"]
    );

    // The CLI reads the admin socket, pretty and as JSON.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_plinth-agent"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let admin_s = admin.to_str().unwrap();
    let json: serde_json::Value = serde_json::from_str(&cli(&[
        "debug",
        "info",
        "-socketPath",
        admin_s,
        "-output",
        "json",
    ]))
    .unwrap();
    assert_eq!(json["cached_x509_svids_count"], 2);
    assert_eq!(json["svid_chain"][0]["id"]["trust_domain"], "example.org");
    assert!(json["last_sync_success"].as_i64().unwrap() >= started);
    let pretty = cli(&["debug", "info", "-socketPath", admin_s]);
    assert!(pretty.contains("Cached X509-SVIDs:\t2"), "{pretty}");
    assert!(pretty.contains(&agent_id), "{pretty}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_plinth-agent"))
        .args(["debug", "info", "-socketPath", admin_s, "-output", "xml"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid output format"));

    // The agent is still running.
    assert!(env.agent.as_mut().unwrap().try_wait().unwrap().is_none());
}
