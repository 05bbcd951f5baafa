//! Interoperability with the real PyPI `spiffe-tls` package (issue 5 item 7; see
//! tests/requirements.txt): a plinth server in process, the real `plinth-agent run` binary, and
//! three Python workloads under their own UIDs (setpriv) that take their SVIDs from the agent's
//! Workload API. The server workload authorizes one client SPIFFE ID: that client gets an answer,
//! the other is refused. The test fails, never skips, when python3 or the package is missing.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plinth_api::server as pb;
use plinth_api::server::entry_service_client::EntryServiceClient;
use plinth_server::run::{start, RunningServer};
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(15);
const SERVER_UID: u32 = 4601;
const GOOD_UID: u32 = 4602;
const BAD_UID: u32 = 4603;
const SERVER_ID: &str = "spiffe://example.org/tls/server";
const GOOD_ID: &str = "spiffe://example.org/tls/good-client";
const BAD_ID: &str = "spiffe://example.org/tls/other-client";

mod server_env;
use server_env::{agent_config, bundle_and_token, server_config};

struct Setup {
    dir: tempfile::TempDir,
    _server: RunningServer,
    admin: Channel,
    agent: Child,
    agent_id: String,
    socket: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

fn agent_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    // Workloads under other UIDs must reach the socket (and the CLI copy) in here.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = dir.path();
    let server = start(server_config(d, 0)).await.unwrap();
    let admin = plinth_server::cli::connect(&server.admin_socket)
        .await
        .unwrap();
    let token = bundle_and_token(&admin, &d.join("bundle.pem"), 600).await;
    let config = d.join("agent.toml");
    std::fs::write(&config, agent_config(d, server.tcp_addr, "")).unwrap();
    let log = std::fs::File::create(d.join("agent.log")).unwrap();
    let agent = Command::new(env!("CARGO_BIN_EXE_plinth-agent"))
        .arg("run")
        .arg("-config")
        .arg(&config)
        .arg("-joinToken")
        .arg(&token)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Setup {
        agent_id: format!("spiffe://example.org/spire/agent/join_token/{token}"),
        socket: d.join("public/api.sock"),
        dir,
        _server: server,
        admin,
        agent,
    }
}

async fn create(admin: &Channel, spiffe_id: &str, parent: &str, uid: u32) {
    let e = pb::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent.into(),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: format!("uid:{uid}"),
        }],
        ..Default::default()
    };
    let r = EntryServiceClient::new(admin.clone())
        .batch_create_entry(pb::BatchCreateEntryRequest { entries: vec![e] })
        .await
        .unwrap()
        .into_inner();
    let status = r.results[0].status.clone().unwrap();
    assert_eq!(status.code, 0, "{status:?}");
}

/// Runs `program` as `uid` (gid the same, no supplementary groups).
fn as_uid(uid: u32, program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups");
    // The interpreter may live under a private home (pyenv under /root in CI images): the
    // workload keeps only the right to read it. The agent attests the UID, which this leaves as
    // set above.
    c.arg("--inh-caps=+dac_read_search")
        .arg("--ambient-caps=+dac_read_search")
        .arg("--")
        .arg(program);
    c
}

/// The real interpreter behind `python3` (a pyenv shim is a script that other users can't run).
fn python() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 must be installed");
    assert!(out.status.success());
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// `spiffe_tls_peer.py ARGS` as `uid`, talking to the agent's Workload API.
fn peer(s: &Setup, py: &Path, uid: u32, args: &[&str]) -> Command {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/spiffe_tls_peer.py");
    let mut c = as_uid(uid, py);
    c.arg(script)
        .args(args)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", s.socket.display()),
        )
        .env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

/// Waits until `uid` gets its SVID from the agent (the CLI, copied where other users can run it).
async fn wait_for_svid(s: &Setup, uid: u32, id: &str) {
    let bin = s.dir.path().join("plinth-agent-cli");
    if !bin.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_plinth-agent"), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let sock = s.socket.to_str().unwrap().to_owned();
    let deadline = Instant::now() + WAIT;
    loop {
        let (bin, sock) = (bin.clone(), sock.clone());
        let out = tokio::task::spawn_blocking(move || {
            Command::new("setpriv")
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg("--")
                .arg(&bin)
                .args(["api", "fetch", "x509", "-socketPath", &sock])
                .output()
                .expect("setpriv (util-linux) must be installed")
        })
        .await
        .unwrap();
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(id) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "uid {uid} never got {id}: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent_log(s.dir.path())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn json_line(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t65_spiffe_tls_mtls_between_workloads_authorizes_one_peer_and_refuses_another() {
    let s = setup().await;
    create(&s.admin, SERVER_ID, &s.agent_id, SERVER_UID).await;
    create(&s.admin, GOOD_ID, &s.agent_id, GOOD_UID).await;
    create(&s.admin, BAD_ID, &s.agent_id, BAD_UID).await;
    for (uid, id) in [
        (SERVER_UID, SERVER_ID),
        (GOOD_UID, GOOD_ID),
        (BAD_UID, BAD_ID),
    ] {
        wait_for_svid(&s, uid, id).await;
    }
    let py = python();

    // The server workload: mTLS, only GOOD_ID authorized, two connections.
    let mut server = peer(&s, &py, SERVER_UID, &["server", GOOD_ID, "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let first = tokio::task::spawn_blocking(move || {
        let l = lines.next();
        (l, lines)
    })
    .await
    .unwrap();
    let (first, mut lines) = first;
    let Some(Ok(first)) = first else {
        let out = server.wait_with_output().unwrap();
        panic!(
            "the spiffe-tls server failed (pip install -r agent/tests/requirements.txt):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let hello = json_line(&first);
    assert_eq!(hello["id"], SERVER_ID, "the server's own SVID");
    let addr = format!("127.0.0.1:{}", hello["port"]);

    let run_client = |uid: u32| {
        let out = peer(&s, &py, uid, &["client", SERVER_ID, &addr])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the spiffe-tls client failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json_line(String::from_utf8_lossy(&out.stdout).trim())
    };
    // The authorized peer: the handshake succeeds both ways and the server answers.
    let good = tokio::task::block_in_place(|| run_client(GOOD_UID));
    assert_eq!(good["id"], GOOD_ID);
    assert_eq!(good["ok"], true, "{good}");
    assert_eq!(good["reply"], format!("hello {GOOD_ID}"));
    // Another workload of the same trust domain, with a valid SVID: refused by the server.
    let bad = tokio::task::block_in_place(|| run_client(BAD_UID));
    assert_eq!(bad["id"], BAD_ID);
    assert_eq!(bad["ok"], false, "{bad}");

    let (results, server) = tokio::task::spawn_blocking(move || {
        let results: Vec<String> = lines.by_ref().map_while(Result::ok).collect();
        (results, server.wait_with_output().unwrap())
    })
    .await
    .unwrap();
    assert!(
        server.status.success(),
        "{}",
        String::from_utf8_lossy(&server.stderr)
    );
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(json_line(&results[0])["accepted"], GOOD_ID);
    let refused = json_line(&results[1]);
    assert!(
        refused["refused"]
            .as_str()
            .is_some_and(|e| e.contains("certificate verify failed")),
        "{refused}"
    );
}
