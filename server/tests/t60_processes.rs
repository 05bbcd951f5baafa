#![allow(clippy::unwrap_used)]
//! Three real `plinth-server` processes, each on its own loopback address (127.0.0.1-3) with its
//! own data directory, and the faults of issue 3 item 6 done to them with signals: kill -9 of the
//! leader under a write load, a restarted node catching up, SIGSTOP/SIGCONT of the leader, a
//! restart of every node at once, writes to a minority, and a fourth server that joins through
//! `plinth-server cluster add` after a log purge (so by snapshot) and leaves by `cluster remove`.
//!
//! The oracle everywhere: a write the client saw acknowledged is present afterwards, on every
//! node, with the ID it was acknowledged with; nothing appears that no client sent; and every node
//! ends with the same entries. Timeouts here only keep a broken build from hanging; no test
//! asserts how fast anything happens (the failover figures are in the benchmark,
//! `chaos-tests/src/bin/raft-bench.rs`).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plinth_api::server as pb;
use plinth_api::server::cluster_service_client::ClusterServiceClient;
use plinth_api::server::entry_service_client::EntryServiceClient;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_plinth-server");
/// Bound on any single client call, so that a call into a stopped process cannot hang a test.
/// Above the server's own 5 s request timeout.
const CALL_LIMIT: Duration = Duration::from_secs(12);
/// Bound on waiting for a cluster-wide condition.
const WAIT_LIMIT: Duration = Duration::from_secs(40);
const PARENT: &str = "spiffe://example.org/spire/agent/t60";

/// One server process. Dropping it kills the process (SIGKILL also ends a stopped process), so
/// a failing test leaves nothing running.
#[derive(Debug)]
struct Node {
    id: u64,
    ip: String,
    raft_port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Peers over mTLS (else plain TCP), and the join kit this node starts from, if any.
    mtls: bool,
    kit: Option<PathBuf>,
    /// More `[cluster]` keys, one a line.
    cluster_extra: String,
}

impl Node {
    fn new(root: &Path, id: u64) -> Self {
        let ip = format!("127.0.0.{id}");
        // A free port on this node's own address; the server binds it with SO_REUSEADDR, and a
        // restart reuses it (it is the address the other members know this node by).
        let raft_port = std::net::TcpListener::bind((ip.as_str(), 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = root.join(format!("n{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let node = Self {
            id,
            ip,
            raft_port,
            dir,
            child: None,
            mtls: false,
            kit: None,
            cluster_extra: String::new(),
        };
        node.write_config();
        node
    }

    /// Adds `[cluster]` keys to this node's config.
    fn with_cluster_keys(mut self, keys: &str) -> Self {
        self.cluster_extra = keys.to_owned();
        self.write_config();
        self
    }

    /// Switches this node to mTLS between servers, starting from the join kit in `kit` (a
    /// directory written by `plinth-server x509 mint -write`).
    fn use_mtls(&mut self, kit: Option<PathBuf>) {
        self.mtls = true;
        self.kit = kit;
        self.write_config();
    }

    fn raft_addr(&self) -> String {
        format!("{}:{}", self.ip, self.raft_port)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("admin").join("api.sock")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("server.toml")
    }

    fn write_config(&self) {
        let peer = match (&self.mtls, &self.kit) {
            (false, _) => "insecure_plaintext = true".to_owned(),
            (true, None) => String::new(),
            (true, Some(k)) => format!(
                "bootstrap_svid_path = \"{k}/svid.pem\"\nbootstrap_key_path = \"{k}/key.pem\"\n\
                 trust_bundle_path = \"{k}/bundle.pem\"",
                k = k.display()
            ),
        };
        let text = format!(
            r#"
[server]
trust_domain = "example.org"
data_dir = "{d}/data"
socket_path = "{sock}"
bind_address = "{ip}"
bind_port = 0
log_level = "info"

[cluster]
node_id = {id}
bind_address = "{raft}"
advertise_address = "{raft}"
bootstrap = {bootstrap}
{peer}
election_timeout_min_ms = 500
election_timeout_max_ms = 1000
heartbeat_interval_ms = 100
{extra}

[key_manager]
type = "disk"
keys_path = "{d}/keys"

[node_attestor.join_token]
"#,
            d = self.dir.display(),
            sock = self.socket().display(),
            ip = self.ip,
            id = self.id,
            raft = self.raft_addr(),
            bootstrap = self.id == 1,
            extra = self.cluster_extra,
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Starts the process (again, after a kill: same config, same data directory).
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let mut tries = 0;
        let child = loop {
            let r = Command::new(BIN)
                .args(["run", "-config"])
                .arg(self.config_path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log.try_clone().unwrap())
                .spawn();
            match r {
                // A concurrent `cargo build` in the shared target directory may be relinking
                // the binary right now.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                r => break r.unwrap(),
            }
        };
        self.child = Some(child);
    }

    /// Starts the process and waits until its admin socket answers (a joining node has no
    /// leader yet, so only that).
    async fn spawn_and_wait_admin(&mut self) {
        self.spawn();
        let sock = self.socket();
        wait_for(&format!("node {}'s admin socket", self.id), || {
            let sock = sock.clone();
            async move { status(&sock).await.ok() }
        })
        .await;
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is running").id()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} node {}", self.id);
    }

    /// SIGSTOP: the process stays, its sockets stay open, it answers nothing.
    fn stop(&self) {
        self.signal("STOP");
    }

    fn resume(&self) {
        self.signal("CONT");
    }

    /// kill -9, and reap it.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- node {} log (tail) ---\n{}", self.id, self.log_tail());
        }
        self.kill9();
    }
}

/// Three nodes on 127.0.0.1-3 in one temporary directory (removed after the processes).
#[derive(Debug)]
struct Cluster {
    nodes: Vec<Node>,
    root: tempfile::TempDir,
}

/// What a client saw for one write.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Acknowledged, with the entry ID the server gave.
    Acked(String),
    /// The call failed or timed out, or the item came back with an error: not acknowledged
    /// (it may still have committed).
    NotAcked(String),
}

async fn bounded<T, E: std::fmt::Display>(
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_LIMIT, f).await {
        Err(_) => Err("client timeout".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(v)) => Ok(v),
    }
}

async fn channel(socket: &Path) -> Result<Channel, String> {
    bounded(plinth_server::cli::connect(socket)).await
}

/// Creates one entry with SPIFFE ID `.../t60/<name>` through the node at `socket`.
async fn create(socket: &Path, name: &str) -> Outcome {
    let ch = match channel(socket).await {
        Ok(ch) => ch,
        Err(e) => return Outcome::NotAcked(e),
    };
    let req = pb::BatchCreateEntryRequest {
        entries: vec![pb::Entry {
            spiffe_id: format!("spiffe://example.org/t60/{name}"),
            parent_id: PARENT.into(),
            selectors: vec![pb::Selector {
                r#type: "unix".into(),
                value: "uid:1000".into(),
            }],
            ..Default::default()
        }],
    };
    match bounded(EntryServiceClient::new(ch).batch_create_entry(req)).await {
        Err(e) => Outcome::NotAcked(e),
        Ok(r) => {
            let r = r.into_inner().results.into_iter().next().unwrap();
            let status = r.status.unwrap();
            if status.code == 0 {
                Outcome::Acked(r.entry.unwrap().id)
            } else {
                Outcome::NotAcked(format!("item status {}: {}", status.code, status.message))
            }
        }
    }
}

/// Every entry (linearizable read on that node), as SPIFFE ID path name -> entry ID.
async fn list(socket: &Path) -> Result<BTreeMap<String, String>, String> {
    let ch = channel(socket).await?;
    let mut client = EntryServiceClient::new(ch);
    let mut out = BTreeMap::new();
    let mut token = String::new();
    loop {
        let r = bounded(client.list_entries(pb::ListEntriesRequest {
            filter: None,
            page_size: 0,
            page_token: token,
        }))
        .await?
        .into_inner();
        for e in r.entries {
            let name = e
                .spiffe_id
                .strip_prefix("spiffe://example.org/t60/")
                .unwrap_or(&e.spiffe_id)
                .to_owned();
            assert!(
                out.insert(name.clone(), e.id).is_none(),
                "two entries for {name}"
            );
        }
        if r.next_page_token.is_empty() {
            return Ok(out);
        }
        token = r.next_page_token;
    }
}

async fn status(socket: &Path) -> Result<pb::ClusterStatusResponse, String> {
    let ch = channel(socket).await?;
    Ok(
        bounded(ClusterServiceClient::new(ch).status(pb::ClusterStatusRequest {}))
            .await?
            .into_inner(),
    )
}

/// `plinth-server x509 mint -spiffeID <id> -write <kit>` against the node at `socket`.
fn mint(socket: &Path, id: &str, kit: &Path) {
    let out = Command::new(BIN)
        .args(["x509", "mint", "-spiffeID", id, "-write"])
        .arg(kit)
        .arg("-socketPath")
        .arg(socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "x509 mint: {out:?}");
}

async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Cluster {
    /// Starts node 1 (bootstrap), then nodes 2 and 3, added as voters through node 1's admin
    /// socket, and waits until all three agree on a leader. Raft over plain TCP.
    async fn start() -> Self {
        Self::start_opts(false, "").await
    }

    /// Like [`Cluster::start`], with mTLS between servers: nodes 2 and 3 join with a kit that
    /// `plinth-server x509 mint` made on node 1.
    async fn start_mtls() -> Self {
        Self::start_opts(true, "").await
    }

    /// Like [`Cluster::start`] (with mTLS if `mtls`), each node with the `[cluster]` keys in
    /// `cluster_keys`.
    async fn start_opts(mtls: bool, cluster_keys: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes: Vec<Node> = (1..=3)
            .map(|id| Node::new(dir.path(), id).with_cluster_keys(cluster_keys))
            .collect();
        if mtls {
            nodes[0].use_mtls(None);
        }
        nodes[0].spawn();
        let s1 = nodes[0].socket();
        wait_for("node 1 to lead its new cluster", || {
            let s1 = s1.clone();
            async move { status(&s1).await.ok().filter(|s| s.leader_id == 1) }
        })
        .await;
        for node in &mut nodes[1..] {
            if mtls {
                let kit = node.dir.join("kit");
                mint(&s1, "spiffe://example.org/spire/server", &kit);
                node.use_mtls(Some(kit));
            }
            node.spawn_and_wait_admin().await;
            let ch = channel(&s1).await.unwrap();
            bounded(ClusterServiceClient::new(ch).add_node(pb::AddNodeRequest {
                node_id: node.id,
                address: node.raft_addr(),
                learner_only: false,
            }))
            .await
            .unwrap();
        }
        let c = Self { nodes, root: dir };
        c.wait_leader(&[1, 2, 3]).await;
        c
    }

    fn node(&self, id: u64) -> &Node {
        &self.nodes[usize::try_from(id - 1).unwrap()]
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[usize::try_from(id - 1).unwrap()]
    }

    fn socket(&self, id: u64) -> PathBuf {
        self.node(id).socket()
    }

    /// Waits until every node in `ids` names the same leader, one of `ids`, with three voters;
    /// returns it.
    async fn wait_leader(&self, ids: &[u64]) -> u64 {
        self.wait_leader_of(ids, 3).await
    }

    /// Like [`Cluster::wait_leader`], with `voters` voters.
    async fn wait_leader_of(&self, ids: &[u64], voters: usize) -> u64 {
        let socks: Vec<PathBuf> = ids.iter().map(|id| self.socket(*id)).collect();
        let ids = ids.to_vec();
        wait_for("an agreed leader", || {
            let socks = socks.clone();
            let ids = ids.clone();
            async move {
                let mut leader = None;
                for s in &socks {
                    let st = status(s).await.ok()?;
                    if st.members.iter().filter(|m| m.voter).count() != voters
                        || !ids.contains(&st.leader_id)
                        || leader.is_some_and(|l| l != st.leader_id)
                    {
                        return None;
                    }
                    leader = Some(st.leader_id);
                }
                leader
            }
        })
        .await
    }

    /// Writes `<prefix><i>` for i in 0..n through nodes 1, 2, 3 in turn, each of which must be
    /// acknowledged.
    async fn write_acked(&self, prefix: &str, n: u64) -> History {
        let mut history = History::default();
        for i in 0..n {
            history
                .write_acked(&self.socket(i % 3 + 1), &format!("{prefix}{i}"))
                .await;
        }
        history
    }

    /// Waits until the nodes in `ids` all answer a linearizable list with the same entries,
    /// and returns them.
    async fn converged(&self, ids: &[u64]) -> BTreeMap<String, String> {
        let socks: Vec<PathBuf> = ids.iter().map(|id| self.socket(*id)).collect();
        wait_for("every node to hold the same entries", || {
            let socks = socks.clone();
            async move {
                let first = list(&socks[0]).await.ok()?;
                for s in &socks[1..] {
                    if list(s).await.ok()? != first {
                        return None;
                    }
                }
                Some(first)
            }
        })
        .await
    }
}

/// Writes that one or more clients made, by name.
#[derive(Debug, Default)]
struct History {
    acked: BTreeMap<String, String>,
    not_acked: BTreeMap<String, String>,
}

impl History {
    fn record(&mut self, name: String, o: Outcome) {
        match o {
            Outcome::Acked(id) => {
                self.acked.insert(name, id);
            }
            Outcome::NotAcked(why) => {
                self.not_acked.insert(name, why);
            }
        }
    }

    /// Writes `name` through the node at `socket`; it must be acknowledged.
    async fn write_acked(&mut self, socket: &Path, name: &str) {
        let o = create(socket, name).await;
        assert!(matches!(o, Outcome::Acked(_)), "{name}: {o:?}");
        self.record(name.to_owned(), o);
    }

    /// The oracle: every acknowledged write is in `state` with the acknowledged ID, and
    /// everything in `state` was sent by a client.
    fn check(&self, node: u64, state: &BTreeMap<String, String>) {
        for (name, id) in &self.acked {
            assert_eq!(
                state.get(name),
                Some(id),
                "node {node}: acknowledged write {name} lost (acked {} writes, state has {})",
                self.acked.len(),
                state.len()
            );
        }
        for name in state.keys() {
            assert!(
                self.acked.contains_key(name) || self.not_acked.contains_key(name),
                "node {node}: entry {name} that no client wrote"
            );
        }
    }
}

/// Clients writing in a loop through the given sockets until stopped.
struct Writers {
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(clients: usize, socks: Vec<PathBuf>, prefix: &str) -> Self {
        let history = Arc::new(Mutex::new(History::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|c| {
                let history = history.clone();
                let stop = stop.clone();
                let socks = socks.clone();
                let prefix = prefix.to_owned();
                tokio::spawn(async move {
                    let mut seq = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let name = format!("{prefix}-{c}-{seq}");
                        let o = create(&socks[(c + seq) % socks.len()], &name).await;
                        let failed = matches!(o, Outcome::NotAcked(_));
                        history.lock().unwrap().record(name, o);
                        seq += 1;
                        if failed {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            })
            .collect();
        Self {
            history,
            stop,
            tasks,
        }
    }

    fn acked(&self) -> usize {
        self.history.lock().unwrap().acked.len()
    }

    async fn wait_acked(&self, n: usize, what: &str) {
        wait_for(what, || {
            let ok = self.acked() >= n;
            async move { ok.then_some(()) }
        })
        .await;
    }

    async fn finish(self) -> History {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.history).unwrap().into_inner().unwrap()
    }
}

fn others(leader: u64) -> Vec<u64> {
    (1..=3).filter(|i| *i != leader).collect()
}

/// (a) kill -9 the leader while four clients write through the followers: a new leader commits,
/// and every acknowledged write is on both survivors. (b) The killed node, restarted, catches up
/// with the same entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t60_kill9_leader_under_writes_then_restart_catches_up() {
    let mut c = Cluster::start().await;
    let leader = c.wait_leader(&[1, 2, 3]).await;
    let survivors = others(leader);
    let w = Writers::start(4, survivors.iter().map(|i| c.socket(*i)).collect(), "kill9");
    w.wait_acked(20, "writes before the kill").await;
    c.node_mut(leader).kill9();
    let at_kill = w.acked();
    w.wait_acked(at_kill + 40, "writes committed by a new leader")
        .await;
    let history = w.finish().await;

    let new_leader = c.wait_leader(&survivors).await;
    assert_ne!(new_leader, leader);
    let state = c.converged(&survivors).await;
    for id in &survivors {
        history.check(*id, &state);
    }

    // (b) The old leader comes back from its own data directory and catches up.
    c.node_mut(leader).spawn();
    let all = c.converged(&[1, 2, 3]).await;
    assert_eq!(
        all, state,
        "the restarted node holds the survivors' entries"
    );
    history.check(leader, &all);
    // It also takes new writes, and so does everyone else.
    let mut after = History::default();
    for id in 1..=3 {
        after
            .write_acked(&c.socket(id), &format!("after-restart-{id}"))
            .await;
    }
    let all = c.converged(&[1, 2, 3]).await;
    for (name, id) in &after.acked {
        assert_eq!(all.get(name), Some(id));
    }
}

/// (c) SIGSTOP the leader past the election timeout: the others elect a leader and keep
/// committing. Writes sent to the old leader while it is stopped are served once it resumes:
/// each is either acknowledged and then on every node, or not acknowledged. The old leader
/// steps down to the new term.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t60_sigstop_leader_is_fenced_after_sigcont() {
    let c = Cluster::start().await;
    let old = c.wait_leader(&[1, 2, 3]).await;
    let old_term = status(&c.socket(old)).await.unwrap().term;
    let mut history = History::default();
    for i in 0..5 {
        history
            .write_acked(&c.socket(old), &format!("before-{i}"))
            .await;
    }

    c.node(old).stop();
    let rest = others(old);
    let w = Writers::start(2, rest.iter().map(|i| c.socket(*i)).collect(), "stopped");
    w.wait_acked(
        20,
        "writes through the majority while the leader is stopped",
    )
    .await;
    // Writes to the stopped leader queue up in its socket; they are read when it resumes,
    // before it has heard of the new term.
    let queued: Vec<_> = (0..4)
        .map(|i| {
            let sock = c.socket(old);
            tokio::spawn(async move {
                let name = format!("to-old-leader-{i}");
                let o = create(&sock, &name).await;
                (name, o)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.node(old).resume();
    // And more right after it resumed.
    let mut late = Vec::new();
    for i in 0..4 {
        let name = format!("after-cont-{i}");
        let o = create(&c.socket(old), &name).await;
        late.push((name, o));
    }
    for q in queued {
        let (name, o) = q.await.unwrap();
        history.record(name, o);
    }
    for (name, o) in late {
        history.record(name, o);
    }
    let during = w.finish().await;
    history.acked.extend(during.acked);
    history.not_acked.extend(during.not_acked);

    let to_old: Vec<_> = history
        .acked
        .keys()
        .chain(history.not_acked.keys())
        .filter(|n| n.starts_with("to-old") || n.starts_with("after-cont"))
        .collect();
    eprintln!(
        "writes sent to the old leader around SIGCONT: {}, acknowledged: {}",
        to_old.len(),
        to_old
            .iter()
            .filter(|n| history.acked.contains_key(**n))
            .count()
    );
    let leader = c.wait_leader(&[1, 2, 3]).await;
    let st = status(&c.socket(old)).await.unwrap();
    assert!(
        st.term > old_term,
        "the old leader moved to the new term ({} -> {})",
        old_term,
        st.term
    );
    assert_eq!(st.leader_id, leader);
    let state = c.converged(&[1, 2, 3]).await;
    for id in 1..=3 {
        history.check(id, &state);
    }
}

/// (d) Every node killed at once and started again: each holds the same entries as before,
/// with the same revisions, and a deleted entry stays deleted. Compared through the CLI's
/// `entry show -output json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t60_restart_all_nodes_at_once_keeps_identical_state() {
    let mut c = Cluster::start().await;
    let history = c.write_acked("e", 30).await;
    let deleted: Vec<String> = (0..10)
        .map(|i| history.acked[&format!("e{i}")].clone())
        .collect();
    for (i, id) in deleted.iter().enumerate() {
        let ch = channel(&c.socket(i as u64 % 3 + 1)).await.unwrap();
        let r = bounded(EntryServiceClient::new(ch).batch_delete_entry(
            pb::BatchDeleteEntryRequest {
                ids: vec![id.clone()],
            },
        ))
        .await
        .unwrap()
        .into_inner();
        assert_eq!(r.results[0].status.as_ref().unwrap().code, 0, "delete {id}");
    }
    let before = show_json(&c.socket(1)).await;
    assert_eq!(before.len(), 20);

    for n in &mut c.nodes {
        n.kill9();
    }
    for n in &mut c.nodes {
        n.spawn();
    }
    c.wait_leader(&[1, 2, 3]).await;
    let want = before.len();
    for id in 1..=3 {
        let sock = c.socket(id);
        let after = wait_for("entry show after the restart", || {
            let sock = sock.clone();
            async move {
                let v = show_json(&sock).await;
                (v.len() == want).then_some(v)
            }
        })
        .await;
        assert_eq!(after, before, "node {id} after restarting every node");
        for d in &deleted {
            assert!(
                after.iter().all(|e| e["id"] != d.as_str()),
                "deleted entry {d} came back on node {id}"
            );
        }
    }
}

/// `plinth-server entry show -output json` against `socket`; retried until it succeeds.
async fn show_json(socket: &Path) -> Vec<serde_json::Value> {
    let socket = socket.to_owned();
    wait_for("plinth-server entry show", || {
        let socket = socket.clone();
        async move {
            let out = tokio::process::Command::new(BIN)
                .args(["entry", "show", "-output", "json", "-socketPath"])
                .arg(&socket)
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(CALL_LIMIT, out).await.ok()?.ok()?;
            if !out.status.success() {
                return None;
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            Some(v["entries"].as_array().unwrap().clone())
        }
    })
    .await
}

/// (e) A write to a minority is not acknowledged, and after healing it is on every node or on
/// none. Twice: the leader cut off by SIGSTOP of both followers (it cannot commit, and must not
/// serve a linearizable read either), and a lone follower after kill -9 of the other two.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t60_write_to_minority_is_not_acknowledged() {
    let mut c = Cluster::start().await;
    let mut history = History::default();
    let leader = c.wait_leader(&[1, 2, 3]).await;
    for i in 0..3 {
        history
            .write_acked(&c.socket(leader), &format!("majority-{i}"))
            .await;
    }

    // 1. The leader alone: both followers stopped.
    let followers = others(leader);
    for f in &followers {
        c.node(*f).stop();
    }
    let o = create(&c.socket(leader), "minority-leader").await;
    assert!(
        matches!(o, Outcome::NotAcked(_)),
        "a leader without a quorum acknowledged a write: {o:?}"
    );
    history.record("minority-leader".into(), o);
    assert!(
        list(&c.socket(leader)).await.is_err(),
        "a leader without a quorum served a linearizable read"
    );
    for f in &followers {
        c.node(*f).resume();
    }
    let state = c.converged(&[1, 2, 3]).await;
    history.check(0, &state);

    // 2. A follower alone: the leader and the other follower killed.
    let leader = c.wait_leader(&[1, 2, 3]).await;
    let lone = others(leader)[0];
    let gone: Vec<u64> = others(lone);
    for g in &gone {
        c.node_mut(*g).kill9();
    }
    let o = create(&c.socket(lone), "minority-follower").await;
    assert!(
        matches!(o, Outcome::NotAcked(_)),
        "a follower without a quorum acknowledged a write: {o:?}"
    );
    history.record("minority-follower".into(), o);
    for g in &gone {
        c.node_mut(*g).spawn();
    }
    c.wait_leader(&[1, 2, 3]).await;
    history.write_acked(&c.socket(lone), "healed").await;
    let state = c.converged(&[1, 2, 3]).await;
    for id in 1..=3 {
        history.check(id, &state);
    }
}

/// `plinth-server cluster ...` run as a process against the admin socket at `socket`.
fn cli(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("cluster")
        .args(args)
        .arg("-socketPath")
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Membership from the CLI, and a new server joining after the log was purged: with snapshots
/// every 40 entries keeping 5, a fourth server added with `cluster add` after 150 writes must
/// install a snapshot (its log says so) and then holds every entry. Bad changes (removing a
/// non-member, re-adding a member at another address) are refused with a clear error and change
/// nothing; `cluster remove` through a follower takes the fourth server out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t60_a_server_added_after_a_log_purge_installs_a_snapshot_and_is_removed_by_the_cli() {
    const KEYS: &str = "snapshot_after_logs = 40\nlogs_kept_after_snapshot = 5";
    let mut c = Cluster::start_opts(false, KEYS).await;
    let mut history = c.write_acked("early", 150).await;

    let mut n4 = Node::new(c.root.path(), 4).with_cluster_keys(KEYS);
    n4.spawn_and_wait_admin().await;
    c.nodes.push(n4);
    let out = cli(
        &c.socket(1),
        &["add", "-nodeID", "4", "-address", &c.node(4).raft_addr()],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cluster add: {out:?}");
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("4 ") && l.contains(" voter ")),
        "cluster add prints the new voter:\n{stdout}"
    );
    // The leader counts the new server as caught up once it has the snapshot; installing it
    // may finish a moment later.
    let log4 = c.node(4).dir.join("server.log");
    wait_for("the fourth server to install a snapshot", || {
        let text = std::fs::read_to_string(&log4).unwrap_or_default();
        async move {
            text.contains("installed a snapshot from the leader")
                .then_some(())
        }
    })
    .await;
    let state = c.converged(&[1, 2, 3, 4]).await;
    assert_eq!(state.len(), 150);
    for id in 1..=4 {
        history.check(id, &state);
    }
    history
        .write_acked(&c.socket(4), "through-the-fourth")
        .await;

    // Refused, with the reason, and nothing changes.
    let four_voters = |st: &pb::ClusterStatusResponse| {
        st.members.iter().filter(|m| m.voter).count() == 4 && st.leader_id != 0
    };
    for (args, why) in [
        (
            vec!["remove", "-nodeID", "9"],
            "node 9 is not a member of the cluster".to_owned(),
        ),
        (
            vec!["add", "-nodeID", "2", "-address", "127.0.0.9:1"],
            format!("node 2 is already a member at {}", c.node(2).raft_addr()),
        ),
    ] {
        let out = cli(&c.socket(4), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "cluster {args:?} succeeded: {out:?}");
        assert!(stderr.contains(&why), "cluster {args:?}: {stderr}");
        let st = status(&c.socket(4)).await.unwrap();
        assert!(four_voters(&st), "after cluster {args:?}: {st:?}");
    }

    // Removed through a follower (forwarded to the leader).
    let leader = c.wait_leader_of(&[1, 2, 3, 4], 4).await;
    let via = (1..=3).find(|i| *i != leader).unwrap();
    let out = cli(&c.socket(via), &["remove", "-nodeID", "4"]);
    assert!(out.status.success(), "cluster remove: {out:?}");
    c.wait_leader(&[1, 2, 3]).await;
    for id in 1..=3 {
        let st = status(&c.socket(id)).await.unwrap();
        let ids: Vec<u64> = st.members.iter().map(|m| m.node_id).collect();
        assert_eq!(ids, vec![1, 2, 3], "node {id}'s members after the removal");
    }
    c.nodes.pop().unwrap().kill9();
    history.write_acked(&c.socket(via), "after-removal").await;
    let state = c.converged(&[1, 2, 3]).await;
    for id in 1..=3 {
        history.check(id, &state);
    }
}

/// mTLS between servers: two servers join with a minted kit and replicate; each then holds an
/// SVID from its own CA, saved 0600 in its data dir; with the kits deleted, a restart of every
/// node at once elects a leader from the saved SVIDs and keeps every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t60_mtls_cluster_joins_with_minted_kits_and_restarts_cold() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::start_mtls().await;
    let w = Writers::start(2, (1..=3).map(|i| c.socket(i)).collect(), "mtls");
    w.wait_acked(20, "writes over the mTLS cluster").await;
    let history = w.finish().await;
    let before = c.converged(&[1, 2, 3]).await;
    for id in 1..=3 {
        history.check(id, &before);
    }
    for id in 2..=3u64 {
        let node = c.node(id);
        let saved = node.dir.join("data/peer/svid.pem");
        let kit = node.kit.clone().unwrap();
        let kit_svid = std::fs::read_to_string(kit.join("svid.pem")).unwrap();
        // The node's own CA issues its next SVID once it is a member.
        wait_for("the joined node's own peer SVID", || {
            let saved = saved.clone();
            let kit_svid = kit_svid.clone();
            async move {
                let text = std::fs::read_to_string(&saved).ok()?;
                (!text.contains(kit_svid.trim())).then_some(())
            }
        })
        .await;
        let mode = std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "node {id}: {} mode {mode:o}", saved.display());
        std::fs::remove_dir_all(&kit).unwrap();
    }
    for id in 1..=3 {
        c.node_mut(id).kill9();
    }
    for id in 1..=3 {
        c.node_mut(id).spawn();
    }
    c.wait_leader(&[1, 2, 3]).await;
    let after = c.converged(&[1, 2, 3]).await;
    assert_eq!(after, before, "state after a cold restart over mTLS");
    let w = Writers::start(1, vec![c.socket(3)], "after");
    w.wait_acked(3, "writes after the restart").await;
    w.finish().await;
}

/// A join kit for another SPIFFE ID is refused at start, with a one-line reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_a_kit_for_another_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut n1 = Node::new(dir.path(), 1);
    n1.use_mtls(None);
    n1.spawn();
    let s1 = n1.socket();
    wait_for("node 1 to lead", || {
        let s1 = s1.clone();
        async move { status(&s1).await.ok().filter(|s| s.leader_id == 1) }
    })
    .await;
    let mut n2 = Node::new(dir.path(), 2);
    let kit = n2.dir.join("kit");
    mint(&s1, "spiffe://example.org/not-a-server", &kit);
    n2.use_mtls(Some(kit));
    let out = Command::new(BIN)
        .args(["run", "-config"])
        .arg(n2.config_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("servers must present spiffe://example.org/spire/server"),
        "{err}"
    );
    // A joining node with no kit at all is told how to get one.
    let mut n3 = Node::new(dir.path(), 3);
    n3.use_mtls(None);
    let out = Command::new(BIN)
        .args(["run", "-config"])
        .arg(n3.config_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("x509 mint -spiffeID"), "{err}");
}
