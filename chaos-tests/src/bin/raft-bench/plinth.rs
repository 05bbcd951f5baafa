//! plinth's side: three `plinth-server` processes on 127.0.0.1-3, and a client that creates one
//! registration entry per `BatchCreateEntry` call over a server's admin Unix socket.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyper_util::rt::TokioIo;
use plinth_api::server as pb;
use plinth_api::server::cluster_service_client::ClusterServiceClient;
use plinth_api::server::entry_service_client::EntryServiceClient;
use prost::Message;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::procs::{free_port, Proc};

/// Bound on one client call.
const CALL_LIMIT: Duration = Duration::from_secs(10);
/// Bound on the cluster reaching a state (started, leader agreed, caught up).
const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// Raft timing for every server of the run.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    pub heartbeat_ms: u64,
    pub snapshot_after_logs: u64,
    pub logs_kept_after_snapshot: u64,
    pub parallel_leader_sync: bool,
    pub pipeline_commit_notices: bool,
    pub commit_notice_delay_us: u64,
    /// `[server] worker_threads` of each server.
    pub worker_threads: usize,
}

#[derive(Debug)]
struct Node {
    id: u64,
    raft_addr: String,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Node {
    fn socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }
}

/// Three servers; dropping it kills them.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    nodes: Vec<Node>,
    /// Print each failover trial's kill and first commit as UTC times, to line up with the
    /// servers' logs.
    pub verbose: bool,
}

/// The time of day in UTC (HH:MM:SS.ffffff), as the servers' logs print it.
fn now_utc() -> String {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = since.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since.subsec_micros()
    )
}

/// Connects to a server's admin socket.
pub async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    let path = socket.to_owned();
    let ch = tokio::time::timeout(
        CALL_LIMIT,
        Endpoint::try_from("http://plinth.admin")?.connect_with_connector(tower::service_fn(
            move |_| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            },
        )),
    )
    .await
    .context("connecting to the admin socket: timeout")??;
    Ok(ch)
}

async fn status(socket: &Path) -> anyhow::Result<pb::ClusterStatusResponse> {
    let ch = connect(socket).await?;
    let r = tokio::time::timeout(
        CALL_LIMIT,
        ClusterServiceClient::new(ch).status(pb::ClusterStatusRequest {}),
    )
    .await
    .context("cluster status: timeout")??;
    Ok(r.into_inner())
}

impl Cluster {
    /// Starts node 1 (bootstrap), adds nodes 2 and 3 through its admin socket.
    pub async fn start(bin: &Path, root: &Path, t: Timing) -> anyhow::Result<Self> {
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            let ip = format!("127.0.0.{id}");
            let raft_addr = format!("{ip}:{}", free_port(&ip)?);
            let dir = root.join(format!("n{id}"));
            std::fs::create_dir_all(&dir)?;
            let config = format!(
                r#"
[server]
trust_domain = "example.org"
data_dir = "{d}/data"
socket_path = "{d}/admin.sock"
bind_address = "{ip}"
bind_port = 0
log_level = "warn"
worker_threads = {wt}

[cluster]
node_id = {id}
bind_address = "{raft_addr}"
advertise_address = "{raft_addr}"
bootstrap = {bootstrap}
insecure_plaintext = true
election_timeout_min_ms = {emin}
election_timeout_max_ms = {emax}
heartbeat_interval_ms = {hb}
snapshot_after_logs = {snap}
logs_kept_after_snapshot = {kept}
parallel_leader_sync = {pls}
pipeline_commit_notices = {pcn}
commit_notice_delay_us = {cnd}

[key_manager]
type = "disk"
keys_path = "{d}/keys"

[node_attestor.join_token]
"#,
                d = dir.display(),
                bootstrap = id == 1,
                emin = t.election_min_ms,
                emax = t.election_max_ms,
                hb = t.heartbeat_ms,
                snap = t.snapshot_after_logs,
                kept = t.logs_kept_after_snapshot,
                pls = t.parallel_leader_sync,
                pcn = t.pipeline_commit_notices,
                cnd = t.commit_notice_delay_us,
                wt = t.worker_threads,
            );
            std::fs::write(dir.join("server.toml"), config)?;
            nodes.push(Node {
                id,
                raft_addr,
                dir,
                proc: None,
            });
        }
        let mut c = Self {
            bin: bin.to_owned(),
            nodes,
            verbose: false,
        };
        c.spawn(1)?;
        let s1 = c.socket(1);
        wait_for("node 1 to lead", || async {
            status(&s1).await.ok().filter(|s| s.leader_id == 1)
        })
        .await?;
        for id in 2..=3 {
            c.spawn(id)?;
            let sock = c.socket(id);
            wait_for("a joining node's socket", || async {
                status(&sock).await.ok()
            })
            .await?;
            let addr = c.nodes[(id - 1) as usize].raft_addr.clone();
            let ch = connect(&s1).await?;
            tokio::time::timeout(
                WAIT_LIMIT,
                ClusterServiceClient::new(ch).add_node(pb::AddNodeRequest {
                    node_id: id,
                    address: addr,
                    learner_only: false,
                }),
            )
            .await
            .context("adding a node: timeout")??;
        }
        c.leader().await?;
        Ok(c)
    }

    fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let n = &mut self.nodes[(id - 1) as usize];
        let mut cmd = Command::new(&self.bin);
        cmd.args(["run", "-config"]).arg(n.dir.join("server.toml"));
        n.proc = Some(Proc::spawn(&mut cmd, &n.dir.join("server.log"))?);
        Ok(())
    }

    /// CPU time and context switches the three servers have used so far.
    pub fn usage(&self) -> crate::procs::Usage {
        crate::procs::usage(self.nodes.iter().filter_map(|n| n.proc.as_ref()))
    }

    /// The Raft log syncs of all members so far and their total time in microseconds, as
    /// server `via` reports them in its cluster status.
    pub async fn log_syncs(&self, via: u64) -> anyhow::Result<(u64, u64)> {
        let st = status(&self.socket(via)).await?;
        Ok(st.members.iter().fold((0, 0), |(n, us), m| {
            (n + m.log_syncs, us + m.log_sync_micros)
        }))
    }

    pub fn socket(&self, id: u64) -> PathBuf {
        self.nodes[(id - 1) as usize].socket()
    }

    /// The applied Raft log index of server `id`.
    pub async fn applied_index(&self, id: u64) -> anyhow::Result<u64> {
        Ok(status(&self.socket(id)).await?.applied_index)
    }

    /// Waits until all three servers name the same leader and have applied the same index.
    pub async fn leader(&self) -> anyhow::Result<u64> {
        let socks: Vec<PathBuf> = self.nodes.iter().map(Node::socket).collect();
        wait_for("an agreed leader with every node caught up", || async {
            let mut leader = None;
            let mut applied = None;
            for s in &socks {
                let st = status(s).await.ok()?;
                if st.leader_id == 0
                    || leader.is_some_and(|l| l != st.leader_id)
                    || applied.is_some_and(|a| a != st.applied_index)
                    || st.members.iter().filter(|m| m.voter).count() != 3
                {
                    return None;
                }
                leader = Some(st.leader_id);
                applied = Some(st.applied_index);
            }
            leader
        })
        .await
    }

    /// kill -9 the leader; time until a write through a survivor is acknowledged. Then restart
    /// the killed server and wait until it has caught up.
    /// A server other than `leader`.
    pub fn follower_of(&self, leader: u64) -> anyhow::Result<u64> {
        self.nodes
            .iter()
            .map(|n| n.id)
            .find(|id| *id != leader)
            .context("no follower")
    }

    pub async fn failover_trial(&mut self, trial: usize) -> anyhow::Result<Duration> {
        let leader = self.leader().await?;
        let survivor = self.follower_of(leader)?;
        let mut w = Writer::connect(&self.socket(survivor), 1000 + trial, 0, 300).await?;
        w.write(0)
            .await
            .map_err(|e| anyhow::anyhow!("write before the kill: {e}"))?;
        let killed = Instant::now();
        if self.verbose {
            println!("  trial {trial}: killing node {leader} at {}", now_utc());
        }
        if let Some(p) = self.nodes[(leader - 1) as usize].proc.as_mut() {
            p.kill9();
        }
        let mut seq = 1;
        let took = loop {
            if w.write(seq).await.is_ok() {
                let took = killed.elapsed();
                if self.verbose {
                    println!("  trial {trial}: write committed at {}", now_utc());
                }
                break took;
            }
            seq += 1;
            if killed.elapsed() > WAIT_LIMIT {
                bail!("no write committed within {WAIT_LIMIT:?} of killing the leader");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        self.spawn(leader)?;
        self.leader().await?;
        Ok(took)
    }
}

async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One client: creates entries `spiffe://example.org/bench/<run>/<client>/<seq>`, each padded
/// (through its hint) so that the encoded entry is `size` bytes.
#[derive(Debug)]
pub struct Writer {
    client: EntryServiceClient<Channel>,
    prefix: String,
    hint: String,
}

impl Writer {
    pub async fn connect(
        socket: &Path,
        run: usize,
        client: usize,
        size: usize,
    ) -> anyhow::Result<Self> {
        let ch = connect(socket).await?;
        let mut w = Self {
            client: EntryServiceClient::new(ch),
            prefix: format!("spiffe://example.org/bench/r{run}/c{client}/"),
            hint: String::new(),
        };
        // Pad through the hint up to the size (sequence numbers have a fixed width, so every
        // entry of this client encodes to the same length).
        while w.entry(0).encoded_len() < size && w.hint.len() < 1024 {
            w.hint.push('x');
        }
        Ok(w)
    }

    fn entry(&self, seq: u64) -> pb::Entry {
        pb::Entry {
            spiffe_id: format!("{}{seq:010}", self.prefix),
            parent_id: "spiffe://example.org/spire/agent/bench".into(),
            selectors: vec![pb::Selector {
                r#type: "unix".into(),
                value: "uid:1000".into(),
            }],
            hint: self.hint.clone(),
            ..Default::default()
        }
    }

    /// One acknowledged create, or why not.
    pub async fn write(&mut self, seq: u64) -> Result<(), String> {
        let req = pb::BatchCreateEntryRequest {
            entries: vec![self.entry(seq)],
        };
        let r = tokio::time::timeout(CALL_LIMIT, self.client.batch_create_entry(req))
            .await
            .map_err(|_| "timeout".to_owned())?
            .map_err(|s| s.to_string())?;
        match r
            .into_inner()
            .results
            .first()
            .and_then(|r| r.status.as_ref())
        {
            Some(s) if s.code == 0 => Ok(()),
            Some(s) => Err(format!("item status {}: {}", s.code, s.message)),
            None => Err("no result".into()),
        }
    }
}
