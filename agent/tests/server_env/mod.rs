//! A real plinth server in process (Raft, RocksDB, the TLS API, one node) and the real
//! `plinth-agent run` binary beside it, for end-to-end tests that need their own agent settings.
#![allow(dead_code, clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plinth_api::server as pb;
use plinth_api::server::agent_service_client::AgentServiceClient;
use plinth_api::server::bundle_service_client::BundleServiceClient;
use plinth_api::server::entry_service_client::EntryServiceClient;
use plinth_server::config::Config as ServerConfig;
use plinth_server::run::{start, RunningServer};
use tonic::transport::Channel;

/// Generous bound for anything that should take well under a second (a hang guard).
pub const WAIT: Duration = Duration::from_secs(20);

/// The log of the agent whose files are in `dir` (`agent.log`), or "" before it exists.
pub fn agent_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

/// Polls `f` until it holds; panics with the agent log in `dir` after [`WAIT`].
pub async fn wait_for<F: FnMut() -> bool>(what: &str, dir: &Path, mut f: F) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "timed out waiting for {what}\nagent log:\n{}",
        agent_log(dir)
    );
}

/// The first FetchX509SVID answer the agent at `socket` gives this process, within [`WAIT`].
pub async fn first_x509_answer(
    socket: &Path,
) -> Result<plinth_api::workload::X509svidResponse, tonic::Status> {
    let mut client = plinth_agent::client::connect(socket).unwrap();
    let mut stream = client
        .fetch_x509svid(plinth_api::workload::X509svidRequest {})
        .await?
        .into_inner();
    tokio::time::timeout(WAIT, stream.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no answer"))??
        .ok_or_else(|| tonic::Status::internal("stream ended"))
}

pub fn my_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// A one-node server config under `dir` with its TLS API on `port` (0: any free port), Raft
/// over plain TCP (one node, in process), disk keys and join tokens.
pub fn server_config(dir: &Path, port: u16) -> ServerConfig {
    let text = format!(
        r#"
[server]
trust_domain = "example.org"
data_dir = "{d}/server-data"
socket_path = "{d}/admin/api.sock"
bind_address = "127.0.0.1"
bind_port = {port}

[cluster]
node_id = 1
bind_address = "127.0.0.1:0"
insecure_plaintext = true
election_timeout_min_ms = 150
election_timeout_max_ms = 300
heartbeat_interval_ms = 50

[key_manager]
type = "disk"
keys_path = "{d}/server-keys"

[node_attestor.join_token]
"#,
        d = dir.display()
    );
    ServerConfig::parse(&text, false).unwrap()
}

/// Writes the server's trust bundle (PEM) to `bundle_path` for the agent's
/// `trust_bundle_path`, and returns a new join token valid for `ttl` seconds.
pub async fn bundle_and_token(admin: &Channel, bundle_path: &Path, ttl: i32) -> String {
    let bundle = BundleServiceClient::new(admin.clone())
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    std::fs::write(
        bundle_path,
        plinth_spiffe::pem::encode_certs(&bundle.x509_authorities),
    )
    .unwrap();
    AgentServiceClient::new(admin.clone())
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .value
}

/// An agent config for a server at `addr`, everything under `d` (data in `agent-data/`, the
/// Workload API socket `public/api.sock`, the trust bundle `bundle.pem`), join-token node
/// attestation and unix workload attestation; `agent_extra` is appended to the `[agent]`
/// section.
pub fn agent_config(d: &Path, addr: std::net::SocketAddr, agent_extra: &str) -> String {
    format!(
        r#"
[agent]
trust_domain = "example.org"
server_addresses = ["{addr}"]
data_dir = "{d}/agent-data"
socket_path = "{d}/public/api.sock"
trust_bundle_path = "{d}/bundle.pem"
{agent_extra}

[node_attestor.join_token]

[workload_attestor.unix]
"#,
        d = d.display()
    )
}

/// A server, its admin channel, and a join token for one agent.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub server: RunningServer,
    pub admin: Channel,
    pub token: String,
    pub agent_id: String,
    pub socket: PathBuf,
    pub agent: Option<Child>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

impl Env {
    /// Starts the server, writes its bundle to `bundle.pem` and makes a join token.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Workloads under other UIDs must reach the socket (and the CLI copy) in here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let server = start(server_config(dir.path(), 0)).await.unwrap();
        let admin = plinth_server::cli::connect(&server.admin_socket)
            .await
            .unwrap();
        let token = bundle_and_token(&admin, &dir.path().join("bundle.pem"), 600).await;
        let socket = dir.path().join("public/api.sock");
        Self {
            agent_id: format!("spiffe://example.org/spire/agent/join_token/{token}"),
            dir,
            server,
            admin,
            token,
            socket,
            agent: None,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `agent.toml` with `extra` appended to its `[agent]` section and starts the agent
    /// with the join token, logging to `agent.log`.
    pub fn spawn_agent(&mut self, extra: &str) {
        let d = self.dir.path();
        let config = d.join("agent.toml");
        let text = agent_config(
            d,
            self.server.tcp_addr,
            &format!("log_level = \"DEBUG\"\n{extra}"),
        );
        std::fs::write(&config, text).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("agent.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_plinth-agent"))
            .arg("run")
            .arg("-config")
            .arg(&config)
            .arg("-joinToken")
            .arg(&self.token)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(child);
    }

    pub fn agent_log(&self) -> String {
        agent_log(self.dir.path())
    }

    /// Polls `f` until it holds; panics with the agent log after [`WAIT`].
    pub async fn wait_for<F: FnMut() -> bool>(&self, what: &str, f: F) {
        wait_for(what, self.dir.path(), f).await;
    }

    /// Creates entries through the admin socket; each must succeed.
    pub async fn create(&self, entries: Vec<pb::Entry>) -> Vec<pb::Entry> {
        let r = EntryServiceClient::new(self.admin.clone())
            .batch_create_entry(pb::BatchCreateEntryRequest { entries })
            .await
            .unwrap()
            .into_inner();
        r.results
            .into_iter()
            .map(|res| {
                assert_eq!(res.status.as_ref().unwrap().code, 0, "{:?}", res.status);
                res.entry.unwrap()
            })
            .collect()
    }

    /// The CLI copied where other users can run it (the build directory is under /root).
    pub fn cli_copy(&self) -> PathBuf {
        let bin = self.dir.path().join("plinth-agent-cli");
        if !bin.exists() {
            std::fs::copy(env!("CARGO_BIN_EXE_plinth-agent"), &bin).unwrap();
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        bin
    }

    /// The CLI run as `uid` (gid the same, no supplementary groups).
    pub fn cli_as(&self, uid: u32, args: &[&str]) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg("--")
            .arg(self.cli_copy())
            .args(args);
        c
    }
}

/// An entry with a chosen ID (entries are served and prefetched in ID order).
pub fn entry(id: &str, spiffe_id: &str, parent: &str, selector: &str) -> pb::Entry {
    let (t, v) = selector.split_once(':').unwrap();
    pb::Entry {
        id: id.into(),
        spiffe_id: spiffe_id.into(),
        parent_id: parent.into(),
        selectors: vec![pb::Selector {
            r#type: t.into(),
            value: v.into(),
        }],
        ..Default::default()
    }
}
