//! End to end (issue 5 item 8): a real plinth server (in process: Raft, RocksDB, the TLS API) and
//! the real `plinth-agent run` binary, with workloads under their own UIDs (setpriv) and in this
//! process. Entries are managed through the server's admin socket, as `plinth-server entry ...`
//! does.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plinth_agent::client::connect;
use plinth_api::server as pb;
use plinth_api::server::agent_service_client::AgentServiceClient;
use plinth_api::server::entry_service_client::EntryServiceClient;
use plinth_api::workload::X509svidRequest;
use plinth_server::run::{start, RunningServer};
use plinth_spiffe::x509::{cert_not_after, split_der_concat};
use time::OffsetDateTime;
use tonic::transport::Channel;
use tonic::Code;

/// Generous bound for anything that should take well under a second.
const WAIT: Duration = Duration::from_secs(15);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

mod server_env;
use server_env::{agent_log, bundle_and_token, first_x509_answer, my_uid, server_config, wait_for};

/// A TCP relay between the agent and the server that the test can cut: the agent sees exactly
/// what a dead server looks like (connections reset, new ones closed at once).
struct Relay {
    port: u16,
    up: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, up_rx) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !*up_rx.borrow() {
                    continue; // dropped: closed at once
                }
                let mut down = up_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { port, up }
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

struct Setup {
    dir: tempfile::TempDir,
    port: u16,
    relay: Relay,
    /// Kept running for the whole test.
    _server: RunningServer,
    admin: Channel,
    agent: Option<Child>,
    agent_id: String,
    socket: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

async fn start_server(dir: &Path, port: u16) -> (RunningServer, Channel) {
    let server = start(server_config(dir, port)).await.unwrap();
    let admin = plinth_server::cli::connect(&server.admin_socket)
        .await
        .unwrap();
    (server, admin)
}

fn agent_config(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[agent]
trust_domain = "example.org"
# The first address has no server: the agent fails over to the second.
server_addresses = ["127.0.0.1:{dead}", "127.0.0.1:{port}"]
data_dir = "{d}/agent-data"
socket_path = "{d}/public/api.sock"
trust_bundle_path = "{d}/bundle.pem"
log_level = "DEBUG"

[node_attestor.join_token]

[workload_attestor.unix]
"#,
            dead = free_port(),
            d = dir.display()
        ),
    )
    .unwrap();
    path
}

/// Starts `plinth-agent run`, logging to `agent.log` in `dir`.
fn spawn_agent(dir: &Path, config: &Path, token: Option<&str>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_plinth-agent"));
    cmd.arg("run").arg("-config").arg(config);
    if let Some(t) = token {
        cmd.arg("-joinToken").arg(t);
    }
    cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap()
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    // Workloads under other UIDs must reach the socket (and the CLI copy) in here.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (server, admin) = start_server(dir.path(), 0).await;
    let token = bundle_and_token(&admin, &dir.path().join("bundle.pem"), 600).await;
    let relay = Relay::start(server.tcp_addr).await;
    let config = agent_config(dir.path(), relay.port);
    let agent = spawn_agent(dir.path(), &config, Some(&token));
    let socket = dir.path().join("public/api.sock");
    wait_for("the agent's socket", dir.path(), || socket.exists()).await;
    Setup {
        agent_id: format!("spiffe://example.org/spire/agent/join_token/{token}"),
        dir,
        port: relay.port,
        relay,
        _server: server,
        admin,
        agent: Some(agent),
        socket,
    }
}

fn entry(spiffe_id: &str, parent: &str, selector: &str, x509_ttl: i32) -> pb::Entry {
    let (t, v) = selector.split_once(':').unwrap();
    pb::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent.into(),
        selectors: vec![pb::Selector {
            r#type: t.into(),
            value: v.into(),
        }],
        x509_svid_ttl: x509_ttl,
        ..Default::default()
    }
}

async fn create(admin: &Channel, e: pb::Entry) -> pb::Entry {
    let r = EntryServiceClient::new(admin.clone())
        .batch_create_entry(pb::BatchCreateEntryRequest { entries: vec![e] })
        .await
        .unwrap()
        .into_inner();
    let res = r.results.into_iter().next().unwrap();
    assert_eq!(res.status.as_ref().unwrap().code, 0, "{:?}", res.status);
    res.entry.unwrap()
}

async fn update(admin: &Channel, e: pb::Entry) {
    let r = EntryServiceClient::new(admin.clone())
        .batch_update_entry(pb::BatchUpdateEntryRequest { entries: vec![e] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].status.as_ref().unwrap().code, 0);
}

async fn delete(admin: &Channel, id: &str) {
    let r = EntryServiceClient::new(admin.clone())
        .batch_delete_entry(pb::BatchDeleteEntryRequest {
            ids: vec![id.into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].status.as_ref().unwrap().code, 0);
}

/// The SPIFFE IDs and leaf expiries of one FetchX509SVID answer from this process.
async fn fetch_here(socket: &Path) -> Result<Vec<(String, OffsetDateTime)>, tonic::Status> {
    Ok(summary(&first_x509_answer(socket).await?))
}

/// Calls FetchX509SVID from this process until `done` accepts the answer, and returns it; fails
/// the test with the last answer and the agent's log after `limit`.
async fn fetch_until(
    socket: &Path,
    dir: &Path,
    limit: Duration,
    done: impl Fn(&Result<Vec<(String, OffsetDateTime)>, tonic::Status>) -> bool,
) -> Result<Vec<(String, OffsetDateTime)>, tonic::Status> {
    let deadline = Instant::now() + limit;
    loop {
        let r = fetch_here(socket).await;
        if done(&r) {
            return r;
        }
        if Instant::now() >= deadline {
            panic!("{r:?}\nagent log:\n{}", agent_log(dir));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn summary(msg: &plinth_api::workload::X509svidResponse) -> Vec<(String, OffsetDateTime)> {
    msg.svids
        .iter()
        .map(|s| {
            let chain = split_der_concat(&s.x509_svid).unwrap();
            (s.spiffe_id.clone(), cert_not_after(&chain[0]).unwrap())
        })
        .collect()
}

/// The CLI copied where other users can run it (the build directory is under /root).
fn cli_copy(dir: &Path) -> PathBuf {
    let bin = dir.join("plinth-agent-cli");
    if !bin.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_plinth-agent"), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

/// Runs the CLI as `uid` (gid the same, no supplementary groups).
fn cli_as(dir: &Path, uid: u32, args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(cli_copy(dir))
        .args(args);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t90_workloads_get_svids_that_follow_entry_changes_and_rotate() {
    let s = setup().await;
    let sock = s.socket.to_str().unwrap().to_owned();

    // (a) A workload under its own UID gets its SVID through the Workload API.
    let app = create(
        &s.admin,
        entry("spiffe://example.org/app", &s.agent_id, "unix:uid:4242", 0),
    )
    .await;
    let dir = s.dir.path().to_owned();
    let fetch = |uid: u32| {
        let (dir, sock) = (dir.clone(), sock.clone());
        move || {
            cli_as(&dir, uid, &["api", "fetch", "x509", "-socketPath", &sock])
                .output()
                .expect("setpriv (util-linux) must be installed")
        }
    };
    let deadline = Instant::now() + WAIT;
    let out = loop {
        let o = tokio::task::spawn_blocking(fetch(4242)).await.unwrap();
        if o.status.success() || Instant::now() > deadline {
            break o;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("spiffe://example.org/app\n"),
        "{stdout}\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent_log(&dir)
    );
    // Another UID gets nothing.
    let other = tokio::task::spawn_blocking(fetch(4343)).await.unwrap();
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("no identity issued"));

    // (b) Changing the entry's selectors removes the SVID from the workload's open stream.
    let mut watch = cli_as(&dir, 4242, &["api", "watch", "-socketPath", &sock])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let got_first = tokio::time::timeout(WAIT, async {
        while let Some(l) = rx.recv().await {
            if l.contains("spiffe://example.org/app") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(got_first, "the watch stream delivered the SVID");
    let mut moved = app.clone();
    moved.selectors[0].value = "uid:4243".into();
    update(&s.admin, moved).await;
    let status = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || watch.wait_with_output()),
    )
    .await
    .expect("the open stream ends once the workload has no identity")
    .unwrap()
    .unwrap();
    assert!(!status.status.success());
    assert!(
        String::from_utf8_lossy(&status.stderr).contains("no identity issued"),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    // (f) Rotation: an SVID with a 10 s TTL is replaced on the open stream before it expires.
    let me = create(
        &s.admin,
        entry(
            "spiffe://example.org/me",
            &s.agent_id,
            &format!("unix:uid:{}", my_uid()),
            10,
        ),
    )
    .await;
    let mut client = connect(&s.socket).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut stream = loop {
        match client.fetch_x509svid(X509svidRequest {}).await {
            Ok(st) => {
                let mut st = st.into_inner();
                match st.message().await {
                    Ok(Some(m)) if !summary(&m).is_empty() => break (st, summary(&m)),
                    _ => {}
                }
            }
            Err(e) if e.code() == Code::PermissionDenied && Instant::now() < deadline => {}
            Err(e) => panic!("{e}\nagent log:\n{}", agent_log(&dir)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let first_expiry = stream.1[0].1;
    let rotated = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let m = stream.0.message().await.unwrap().unwrap();
            let got = summary(&m);
            if got[0].1 != first_expiry {
                return (OffsetDateTime::now_utc(), got[0].1);
            }
        }
    })
    .await
    .expect("a rotated SVID arrives on the open stream");
    assert!(
        rotated.0 < first_expiry,
        "the new SVID came at {} but the old one expired at {first_expiry}",
        rotated.0
    );
    assert!(rotated.1 > first_expiry);

    // (c) Deleting the entry: the open stream ends, and the next fetch is PermissionDenied.
    delete(&s.admin, &me.id).await;
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match stream.0.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(e) => return Some(e.code()),
            }
        }
    })
    .await
    .expect("the stream ends after the deletion");
    assert_eq!(end, Some(Code::PermissionDenied));
    let next = fetch_here(&s.socket).await.unwrap_err();
    assert_eq!(next.code(), Code::PermissionDenied);
    assert_eq!(next.message(), "no identity issued");

    // The agent failed over from the dead first address and never logged a token.
    let log = agent_log(&dir);
    assert!(log.contains(&format!("127.0.0.1:{}", s.port)), "{log}");
    let token = s.agent_id.rsplit('/').next().unwrap();
    let leaks: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(token) && !l.contains(&s.agent_id))
        .collect();
    assert!(
        leaks.is_empty(),
        "the join token appears in the log: {leaks:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t91_cached_svids_survive_a_server_outage_and_an_agent_restart() {
    let mut s = setup().await;
    let me = create(
        &s.admin,
        entry(
            "spiffe://example.org/me",
            &s.agent_id,
            &format!("unix:uid:{}", my_uid()),
            0,
        ),
    )
    .await;
    let dir = s.dir.path().to_owned();
    let before = fetch_until(&s.socket, &dir, WAIT, |r| {
        r.as_ref().is_ok_and(|v| !v.is_empty())
    })
    .await
    .unwrap();
    assert_eq!(before[0].0, "spiffe://example.org/me");
    let svid_file = dir.join("agent-data/agent-svid.pem");
    let mode = std::fs::metadata(&svid_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the agent key file is private");
    let data_mode = std::fs::metadata(dir.join("agent-data"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(data_mode, 0o700);
    let stored = std::fs::read(&svid_file).unwrap();

    // (d) The server becomes unreachable (connections cut, new ones closed): the agent keeps
    // serving the cached SVID.
    s.relay.set_up(false);
    wait_for("the agent to notice the outage", &dir, || {
        agent_log(&dir).contains("serving from cache")
    })
    .await;
    let during = fetch_here(&s.socket).await.unwrap();
    assert_eq!(during, before, "same SVID, served from the cache");

    // (e) Restart the agent without any join token (a used one would be refused): it reuses the
    // agent SVID in its data dir.
    let mut old = s.agent.take().unwrap();
    old.kill().unwrap();
    old.wait().unwrap();
    s.relay.set_up(true);
    std::fs::remove_file(&s.socket).ok();
    let config = dir.join("agent.toml");
    s.agent = Some(spawn_agent(&dir, &config, None));
    wait_for("the restarted agent's socket", &dir, || s.socket.exists()).await;
    let after = fetch_until(&s.socket, &dir, WAIT, |r| {
        r.as_ref().is_ok_and(|v| !v.is_empty())
    })
    .await
    .unwrap();
    assert_eq!(after[0].0, "spiffe://example.org/me");
    assert!(agent_log(&dir).contains("reusing the agent SVID from the data dir"));
    assert_eq!(
        agent_log(&dir).matches("node attested").count(),
        1,
        "attested once, on the first start only"
    );
    assert_eq!(
        std::fs::read(&svid_file).unwrap(),
        stored,
        "same agent SVID"
    );
    let agents = AgentServiceClient::new(s.admin.clone())
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].spiffe_id, s.agent_id);

    // The server still pushes changes to the restarted agent.
    delete(&s.admin, &me.id).await;
    fetch_until(&s.socket, &dir, WAIT, |r| {
        r.as_ref()
            .is_err_and(|e| e.code() == Code::PermissionDenied)
    })
    .await
    .unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t93_a_reconnecting_agent_resumes_the_entry_stream_without_a_full_resync() {
    let s = setup().await;
    let me = create(
        &s.admin,
        entry(
            "spiffe://example.org/me",
            &s.agent_id,
            &format!("unix:uid:{}", my_uid()),
            0,
        ),
    )
    .await;
    // Held by the agent, served to another UID.
    create(
        &s.admin,
        entry(
            "spiffe://example.org/other",
            &s.agent_id,
            "unix:uid:4242",
            0,
        ),
    )
    .await;
    let dir = s.dir.path().to_owned();
    let ids =
        |v: &[(String, OffsetDateTime)]| v.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>();
    fetch_until(&s.socket, &dir, WAIT, |r| {
        r.as_ref()
            .is_ok_and(|v| ids(v) == ["spiffe://example.org/me"])
    })
    .await
    .unwrap();

    // The server is cut off; while the agent is away, its entries change.
    s.relay.set_up(false);
    wait_for("the agent to notice the outage", &dir, || {
        agent_log(&dir).contains("serving from cache")
    })
    .await;
    let resumes_before = agent_log(&dir).matches("resuming the entry stream").count();
    assert_eq!(resumes_before, 0, "no resume before the first reconnect");
    delete(&s.admin, &me.id).await;
    create(
        &s.admin,
        entry(
            "spiffe://example.org/added",
            &s.agent_id,
            &format!("unix:uid:{}", my_uid()),
            0,
        ),
    )
    .await;
    s.relay.set_up(true);

    // Back: the workload sees the changes made while the agent was away ...
    fetch_until(&s.socket, &dir, Duration::from_secs(60), |r| {
        r.as_ref()
            .is_ok_and(|v| ids(v) == ["spiffe://example.org/added"])
    })
    .await
    .unwrap();
    // ... which came as the difference from the two entries the agent held, not a full set.
    let log = agent_log(&dir);
    let resumed = log
        .find("resuming the entry stream")
        .unwrap_or_else(|| panic!("no resume in the agent log:\n{log}"));
    let after = &log[resumed..];
    assert!(after.lines().next().unwrap().contains("known=2"), "{after}");
    let updates: Vec<&str> = after
        .lines()
        .filter(|l| l.contains("entry update from server"))
        .collect();
    assert!(!updates.is_empty(), "{after}");
    assert!(
        updates.iter().all(|l| l.contains("full=false")),
        "{updates:?}"
    );
    assert!(
        updates[0].contains("upserted=1") && updates[0].contains("deleted=1"),
        "{updates:?}"
    );
}
