//! A plinth cluster as local `plinth-server` processes, one loopback address per node
//! (`127.a.b.<node>`, a random `a.b` per run so that concurrent runs do not collide).
//!
//! Fault primitives are signals: SIGKILL (crash), SIGSTOP/SIGCONT (a node that neither answers
//! nor acts: for processes this is the stand-in for partitioning a whole node away; a real
//! network partition needs network namespaces or the `--docker` mode). Every process is killed
//! and reaped when the cluster is dropped, also on panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plinth_api::server as pb;
use plinth_api::server::cluster_service_client::ClusterServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// The trust domain every chaos cluster serves.
pub const TRUST_DOMAIN: &str = "chaos.test";

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("node {0} is not part of this cluster")]
    UnknownNode(u64),
    #[error("signal: {0}")]
    Signal(#[from] nix::Error),
    #[error("admin API: {0}")]
    Api(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

/// Cluster timing (Raft) and limits.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The `plinth-server` binary.
    pub server_bin: PathBuf,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// How long to wait for a node to come up or a membership change to finish.
    pub start_timeout: Duration,
    /// Run the servers in containers on a private Docker network (adds partitions).
    pub docker: bool,
}

impl ClusterConfig {
    pub fn new(server_bin: PathBuf) -> Self {
        Self {
            server_bin,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            heartbeat_interval_ms: 100,
            start_timeout: Duration::from_secs(60),
            docker: false,
        }
    }
}

/// Where a node lives and whether it runs.
#[derive(Debug)]
pub struct Node {
    pub id: u64,
    pub raft_addr: String,
    /// The TLS API agents connect to.
    pub api_addr: String,
    pub admin_socket: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    /// Docker mode: the container runs.
    container_up: bool,
    /// Docker mode: the container was created (restart with `docker start`).
    container_made: bool,
    paused: bool,
    partitioned: bool,
}

impl Node {
    pub fn running(&self) -> bool {
        self.child.is_some() || self.container_up
    }
    pub fn partitioned(&self) -> bool {
        self.partitioned
    }
    pub fn paused(&self) -> bool {
        self.paused
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Connects a gRPC channel to an admin socket; connection happens on first use and again after
/// the server restarts.
pub fn admin_channel(path: &Path) -> Result<Channel, ClusterError> {
    let path = path.to_owned();
    let ch = Endpoint::try_from("http://plinth.admin")
        .map_err(|e| ClusterError::Api(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }));
    Ok(ch)
}

/// A loopback cluster of `plinth-server` processes.
#[derive(Debug)]
pub struct ProcessCluster {
    cfg: ClusterConfig,
    dir: tempfile::TempDir,
    net: (u8, u8),
    nodes: BTreeMap<u64, Node>,
    spawned: Vec<(u32, PathBuf)>,
    agents: Vec<Agent>,
    docker: Option<crate::docker::DockerRun>,
}

/// A `plinth-agent` process attested with a join token.
#[derive(Debug)]
pub struct Agent {
    pub spiffe_id: String,
    /// Its Workload API socket.
    pub socket: PathBuf,
    child: Option<Child>,
}

impl ProcessCluster {
    /// Starts node 1 (bootstrap) and adds nodes 2..=n through node 1's admin API.
    pub async fn start(cfg: ClusterConfig, n: u64) -> Result<Self, ClusterError> {
        let dir = tempfile::Builder::new().prefix("plinth-chaos-").tempdir()?;
        let net = (rand::random::<u8>() % 200 + 20, rand::random::<u8>());
        let mut c = Self {
            cfg,
            dir,
            net,
            nodes: BTreeMap::new(),
            spawned: Vec::new(),
            agents: Vec::new(),
            docker: None,
        };
        if c.cfg.docker {
            let image = crate::docker::build_server_image(&c.cfg.server_bin)?;
            c.docker = Some(crate::docker::DockerRun::create(image)?);
        }
        c.spawn_new(1, true)?;
        c.wait_leader(c.cfg.start_timeout).await?;
        for id in 2..=n {
            c.add_member(id).await?;
        }
        Ok(c)
    }

    /// The directory holding every node's config, data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn node(&self, id: u64) -> Result<&Node, ClusterError> {
        self.nodes.get(&id).ok_or(ClusterError::UnknownNode(id))
    }

    /// Every process this cluster started: (pid, config file it ran with).
    pub fn spawned(&self) -> &[(u32, PathBuf)] {
        &self.spawned
    }

    /// Node IDs, in order.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Admin sockets of every node (running or not), by node ID.
    pub fn sockets(&self) -> BTreeMap<u64, PathBuf> {
        self.nodes
            .iter()
            .map(|(id, n)| (*id, n.admin_socket.clone()))
            .collect()
    }

    /// Nodes that run, are not paused and not partitioned away.
    pub fn live(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.running() && !n.paused && !n.partitioned)
            .map(|n| n.id)
            .collect()
    }

    fn free_port(ip: &str) -> Result<u16, ClusterError> {
        let l = std::net::TcpListener::bind((ip, 0))?;
        Ok(l.local_addr()?.port())
    }

    fn spawn_new(&mut self, id: u64, bootstrap: bool) -> Result<(), ClusterError> {
        let base = self.dir.path().join(format!("node{id}"));
        std::fs::create_dir_all(&base)?;
        let config_path = base.join("server.toml");
        // Addresses and paths as the server sees them, and as the harness reaches them.
        let (ip, raft_port, api_port, bind_ip, data, sock, admin_socket) = match &self.docker {
            None => {
                let ip = format!("127.{}.{}.{}", self.net.0, self.net.1, id.min(250));
                let raft_port = Self::free_port(&ip)?;
                let api_port = Self::free_port(&ip)?;
                let sock = base.join("admin.sock");
                (
                    ip.clone(),
                    raft_port,
                    api_port,
                    ip,
                    base.display().to_string(),
                    sock.display().to_string(),
                    sock,
                )
            }
            Some(d) => {
                std::fs::create_dir_all(base.join("data"))?;
                std::fs::create_dir_all(base.join("admin"))?;
                (
                    d.ip(id),
                    8082,
                    8081,
                    "0.0.0.0".to_string(),
                    "/var/lib/plinth".to_string(),
                    "/run/plinth/server/api.sock".to_string(),
                    base.join("admin").join("api.sock"),
                )
            }
        };
        let raft_addr = format!("{ip}:{raft_port}");
        // Servers talk Raft over mTLS, as in production. A joining node starts from the join
        // kit `add_member` minted (see `mint_kit`); node 1 bootstraps alone and needs none.
        let kit_dir = if self.docker.is_some() {
            "/var/lib/plinth/kit".to_string()
        } else {
            base.join("data").join("kit").display().to_string()
        };
        let peer = if base.join("data").join("kit").join("svid.pem").exists() {
            format!(
                "bootstrap_svid_path = \"{kit_dir}/svid.pem\"\n\
                 bootstrap_key_path = \"{kit_dir}/key.pem\"\n\
                 trust_bundle_path = \"{kit_dir}/bundle.pem\""
            )
        } else {
            String::new()
        };
        let c = &self.cfg;
        let text = format!(
            r#"[server]
trust_domain = "{TRUST_DOMAIN}"
data_dir = "{data}/data"
socket_path = "{sock}"
bind_address = "{bind_ip}"
bind_port = {api_port}
log_level = "INFO"

[cluster]
node_id = {id}
bind_address = "{bind_ip}:{raft_port}"
advertise_address = "{raft_addr}"
bootstrap = {bootstrap}
{peer}
election_timeout_min_ms = {emin}
election_timeout_max_ms = {emax}
heartbeat_interval_ms = {hb}

[key_manager]
type = "disk"
keys_path = "{data}/keys"

[node_attestor.join_token]
"#,
            emin = c.election_timeout_min_ms,
            emax = c.election_timeout_max_ms,
            hb = c.heartbeat_interval_ms,
        );
        std::fs::write(&config_path, text)?;
        let node = Node {
            id,
            raft_addr,
            api_addr: format!("{ip}:{api_port}"),
            admin_socket,
            config_path,
            log_path: base.join("server.log"),
            child: None,
            container_up: false,
            container_made: false,
            paused: false,
            partitioned: false,
        };
        self.nodes.insert(id, node);
        self.spawn(id)
    }

    fn spawn(&mut self, id: u64) -> Result<(), ClusterError> {
        let bin = self.cfg.server_bin.clone();
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or(ClusterError::UnknownNode(id))?;
        if node.running() {
            return Ok(());
        }
        if let Some(d) = &mut self.docker {
            if node.container_made {
                d.start(id)?;
            } else {
                let base = node
                    .config_path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                d.run_server(id, &base)?;
                node.container_made = true;
            }
            tracing::info!(node = id, container = %d.container(id), "started plinth-server container");
            node.container_up = true;
            node.paused = false;
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)?;
        let child = Command::new(bin)
            .arg("run")
            .arg("-config")
            .arg(&node.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        tracing::info!(node = id, pid = child.id(), "started plinth-server");
        self.spawned.push((child.id(), node.config_path.clone()));
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// Last lines of a node's log (for failure messages).
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let Some(n) = self.nodes.get(&id) else {
            return String::new();
        };
        let text = match &self.docker {
            Some(d) => d.logs(id),
            None => std::fs::read_to_string(&n.log_path).unwrap_or_default(),
        };
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits (bounded) until the node's log (since its latest start) contains `needle`.
    pub async fn wait_log(&self, id: u64, needle: &str, timeout: Duration) -> bool {
        let Some(n) = self.nodes.get(&id) else {
            return false;
        };
        let read = || match &self.docker {
            Some(d) => d.logs(id),
            None => std::fs::read_to_string(&n.log_path).unwrap_or_default(),
        };
        // Only what is written from now on (call this right after starting the node).
        let skip = read().len();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let text = read();
            if text
                .get(skip.min(text.len())..)
                .is_some_and(|t| t.contains(needle))
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Cluster status as one node sees it.
    pub async fn status(&self, id: u64) -> Result<pb::ClusterStatusResponse, ClusterError> {
        let ch = admin_channel(&self.node(id)?.admin_socket)?;
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            ClusterServiceClient::new(ch).status(pb::ClusterStatusRequest {}),
        )
        .await
        .map_err(|_| ClusterError::Timeout(format!("cluster status from node {id}")))?
        .map_err(|s| ClusterError::Api(s.message().to_owned()))?;
        Ok(r.into_inner())
    }

    /// The leader as the live nodes see it (the most common answer), if any.
    pub async fn leader(&self) -> Option<u64> {
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        for id in self.live() {
            if let Ok(s) = self.status(id).await {
                if s.leader_id != 0 {
                    *votes.entry(s.leader_id).or_default() += 1;
                }
            }
        }
        votes.into_iter().max_by_key(|(_, v)| *v).map(|(id, _)| id)
    }

    /// Waits (bounded) until a live node reports a leader that is itself live.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<u64, ClusterError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(l) = self.leader().await {
                if self.live().contains(&l) {
                    return Ok(l);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(ClusterError::Timeout("a leader".into()))
    }

    /// Starts a new node and adds it as a voter through a live member's admin API.
    pub async fn add_member(&mut self, id: u64) -> Result<(), ClusterError> {
        if !self.nodes.contains_key(&id) {
            self.mint_kit(id).await?;
            self.spawn_new(id, false)?;
        }
        let addr = self.node(id)?.raft_addr.clone();
        let deadline = Instant::now() + self.cfg.start_timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            for via in self.live().into_iter().filter(|v| *v != id) {
                let ch = admin_channel(&self.node(via)?.admin_socket)?;
                let r = tokio::time::timeout(
                    Duration::from_secs(20),
                    ClusterServiceClient::new(ch).add_node(pb::AddNodeRequest {
                        node_id: id,
                        address: addr.clone(),
                        learner_only: false,
                    }),
                )
                .await;
                match r {
                    Ok(Ok(s)) => {
                        let s = s.into_inner();
                        if s.members.iter().any(|m| m.node_id == id && m.voter) {
                            tracing::info!(node = id, via, "member added");
                            return Ok(());
                        }
                        last = "not a voter yet".into();
                    }
                    Ok(Err(e)) => last = e.message().to_owned(),
                    Err(_) => last = "add_node timed out".into(),
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(ClusterError::Timeout(format!(
            "adding node {id}: {last}\n{}",
            self.log_tail(id, 20)
        )))
    }

    /// Mints the join kit of a new node through a live member: its first server SVID, key and
    /// the trust bundle, as `plinth-server x509 mint -write` would (`<node>/data/kit`).
    async fn mint_kit(&self, id: u64) -> Result<(), ClusterError> {
        use plinth_api::server::bundle_service_client::BundleServiceClient;
        use plinth_api::server::svid_service_client::SvidServiceClient;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = self
            .dir
            .path()
            .join(format!("node{id}"))
            .join("data")
            .join("kit");
        std::fs::create_dir_all(&dir)?;
        let api = |e: tonic::Status| ClusterError::Api(e.message().to_owned());
        let key = std::sync::Arc::new(
            plinth_spiffe::PrivateKey::generate(plinth_spiffe::KeyType::EcP256)
                .map_err(|e| ClusterError::Api(e.to_string()))?,
        );
        let csr = plinth_spiffe::Csr::create(key.clone())
            .map_err(|e| ClusterError::Api(e.to_string()))?;
        let deadline = Instant::now() + self.cfg.start_timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            for via in self.live().into_iter().filter(|v| *v != id) {
                let ch = admin_channel(&self.node(via)?.admin_socket)?;
                let minted = tokio::time::timeout(Duration::from_secs(10), async {
                    let svid = SvidServiceClient::new(ch.clone())
                        .mint_x509_svid(pb::MintX509SvidRequest {
                            csr: csr.clone(),
                            spiffe_id: format!("spiffe://{TRUST_DOMAIN}/spire/server"),
                            ttl: 0,
                            dns_names: vec![],
                        })
                        .await
                        .map_err(api)?
                        .into_inner()
                        .svid
                        .ok_or_else(|| ClusterError::Api("empty mint answer".into()))?;
                    let bundle = BundleServiceClient::new(ch)
                        .get_bundle(pb::GetBundleRequest {})
                        .await
                        .map_err(api)?
                        .into_inner();
                    Ok::<_, ClusterError>((svid, bundle))
                })
                .await;
                match minted {
                    Ok(Ok((svid, bundle))) => {
                        std::fs::write(
                            dir.join("svid.pem"),
                            plinth_spiffe::pem::encode_certs(&svid.cert_chain),
                        )?;
                        std::fs::write(
                            dir.join("bundle.pem"),
                            plinth_spiffe::pem::encode_certs(&bundle.x509_authorities),
                        )?;
                        let mut f = std::fs::OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .mode(0o600)
                            .open(dir.join("key.pem"))?;
                        std::io::Write::write_all(&mut f, key.to_pkcs8_pem().as_bytes())?;
                        return Ok(());
                    }
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "minting timed out".into(),
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(ClusterError::Timeout(format!(
            "a join kit for node {id}: {last}"
        )))
    }

    /// Removes a member through a live node's admin API, then stops its process and forgets it.
    pub async fn remove_member(&mut self, id: u64) -> Result<(), ClusterError> {
        let deadline = Instant::now() + self.cfg.start_timeout;
        let mut last = String::new();
        let mut done = false;
        'outer: while Instant::now() < deadline {
            for via in self.live().into_iter().filter(|v| *v != id) {
                let ch = admin_channel(&self.node(via)?.admin_socket)?;
                let r = tokio::time::timeout(
                    Duration::from_secs(20),
                    ClusterServiceClient::new(ch)
                        .remove_node(pb::RemoveNodeRequest { node_id: id }),
                )
                .await;
                match r {
                    Ok(Ok(s)) => {
                        if !s.into_inner().members.iter().any(|m| m.node_id == id) {
                            tracing::info!(node = id, via, "member removed");
                            done = true;
                            break 'outer;
                        }
                        last = "still a member".into();
                    }
                    // An earlier attempt whose answer was lost (timed out) may have removed
                    // it: the leader refuses to remove a node that is no longer a member.
                    Ok(Err(e))
                        if e.code() == tonic::Code::FailedPrecondition
                            && e.message().contains("is not a member") =>
                    {
                        tracing::info!(node = id, via, "member already removed");
                        done = true;
                        break 'outer;
                    }
                    Ok(Err(e)) => last = e.message().to_owned(),
                    Err(_) => last = "remove_node timed out".into(),
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if !done {
            return Err(ClusterError::Timeout(format!("removing node {id}: {last}")));
        }
        self.kill(id)?;
        self.save_container_log(id);
        if let Some(d) = &mut self.docker {
            let _ = d.remove(id);
        }
        self.nodes.remove(&id);
        Ok(())
    }

    fn signal(&self, id: u64, sig: Signal) -> Result<(), ClusterError> {
        let node = self.node(id)?;
        if let Some(pid) = node.pid() {
            let pid = i32::try_from(pid).map_err(|_| ClusterError::UnknownNode(id))?;
            kill(Pid::from_raw(pid), sig)?;
        }
        Ok(())
    }

    /// Docker mode: copies a container's log to the node's server.log.
    fn save_container_log(&self, id: u64) {
        if let (Some(d), Some(n)) = (&self.docker, self.nodes.get(&id)) {
            let _ = std::fs::write(&n.log_path, d.logs(id));
        }
    }

    /// Whether the servers run in containers.
    pub fn is_docker(&self) -> bool {
        self.docker.is_some()
    }

    /// Containers (Docker mode) still present.
    pub fn containers(&self) -> Vec<String> {
        self.docker
            .as_ref()
            .map(|d| d.containers().to_vec())
            .unwrap_or_default()
    }

    /// The Docker network name prefix of this run (Docker mode).
    pub fn docker_prefix(&self) -> Option<String> {
        self.docker.as_ref().map(|d| d.prefix.clone())
    }

    /// Docker mode: disconnects a node from the cluster network (it keeps running, alone).
    pub fn partition(&mut self, id: u64) -> Result<(), ClusterError> {
        let Some(d) = &self.docker else {
            return Err(ClusterError::Api(
                "partitions need the Docker mode (--docker)".into(),
            ));
        };
        d.disconnect(id)?;
        if let Some(n) = self.nodes.get_mut(&id) {
            n.partitioned = true;
        }
        tracing::info!(node = id, "partitioned (network disconnect)");
        Ok(())
    }

    fn docker_run(&self, what: &str) -> Result<&crate::docker::DockerRun, ClusterError> {
        self.docker
            .as_ref()
            .ok_or_else(|| ClusterError::Api(format!("{what} needs the Docker mode (--docker)")))
    }

    /// Docker mode: the node loses this share of its packets both ways.
    pub fn lossy(&mut self, id: u64, probability: f64) -> Result<(), ClusterError> {
        self.docker_run("packet loss")?.lossy(id, probability)?;
        tracing::info!(node = id, probability, "lossy network");
        Ok(())
    }

    /// Docker mode: the node hears nothing from its peers but still sends.
    pub fn deaf(&mut self, id: u64) -> Result<(), ClusterError> {
        self.docker_run("a one-way link")?.deaf(id)?;
        tracing::info!(node = id, "one-way link (inbound dropped)");
        Ok(())
    }

    /// Docker mode: clears loss and one-way rules.
    pub fn clear_rules(&mut self, id: u64) -> Result<(), ClusterError> {
        self.docker_run("network rules")?.clear_rules(id)?;
        tracing::info!(node = id, "network rules cleared");
        Ok(())
    }

    /// Docker mode: connects a partitioned node again.
    pub fn unpartition(&mut self, id: u64) -> Result<(), ClusterError> {
        if let Some(d) = &self.docker {
            d.connect(id)?;
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            n.partitioned = false;
        }
        tracing::info!(node = id, "partition healed (network connect)");
        Ok(())
    }

    /// kill -9 and reap.
    pub fn kill(&mut self, id: u64) -> Result<(), ClusterError> {
        if let Some(d) = &self.docker {
            let node = self
                .nodes
                .get_mut(&id)
                .ok_or(ClusterError::UnknownNode(id))?;
            if node.container_up {
                if node.paused {
                    let _ = d.unpause(id);
                }
                d.kill(id)?;
                node.container_up = false;
                tracing::info!(node = id, "killed container (SIGKILL)");
            }
            node.paused = false;
            return Ok(());
        }
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or(ClusterError::UnknownNode(id))?;
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            tracing::info!(node = id, "killed (SIGKILL)");
        }
        node.paused = false;
        Ok(())
    }

    /// SIGSTOP (Docker: `docker pause`): the node neither answers nor acts until resumed.
    pub fn pause(&mut self, id: u64) -> Result<(), ClusterError> {
        match &self.docker {
            Some(d) => d.pause(id)?,
            None => self.signal(id, Signal::SIGSTOP)?,
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            n.paused = true;
        }
        tracing::info!(node = id, "paused (SIGSTOP)");
        Ok(())
    }

    /// SIGCONT (Docker: `docker unpause`).
    pub fn resume(&mut self, id: u64) -> Result<(), ClusterError> {
        match &self.docker {
            Some(d) => d.unpause(id)?,
            None => self.signal(id, Signal::SIGCONT)?,
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            n.paused = false;
        }
        tracing::info!(node = id, "resumed (SIGCONT)");
        Ok(())
    }

    /// Starts a stopped node again on its data directory.
    pub fn restart(&mut self, id: u64) -> Result<(), ClusterError> {
        self.spawn(id)
    }

    /// A node ID no member has used in this run.
    pub fn next_id(&self) -> u64 {
        self.nodes.keys().max().copied().unwrap_or(0) + 1
    }

    /// Starts an agent: a join token made through a live server, the trust bundle, a config
    /// naming every server's API, and a workload entry under the agent for `workload_uid`.
    /// Returns the agent's SPIFFE ID and Workload API socket.
    pub async fn start_agent(
        &mut self,
        agent_bin: &Path,
        workload_spiffe_id: &str,
        workload_uid: u32,
    ) -> Result<(String, PathBuf), ClusterError> {
        use plinth_api::server::agent_service_client::AgentServiceClient;
        use plinth_api::server::bundle_service_client::BundleServiceClient;
        use plinth_api::server::entry_service_client::EntryServiceClient;
        let n = self.agents.len();
        let via = self.wait_leader(self.cfg.start_timeout).await?;
        let ch = admin_channel(&self.node(via)?.admin_socket)?;
        let api = |e: tonic::Status| ClusterError::Api(e.message().to_owned());
        let token = format!("chaos-agent-{n}-{}", rand::random::<u64>());
        AgentServiceClient::new(ch.clone())
            .create_join_token(pb::CreateJoinTokenRequest {
                ttl: 3600,
                agent_id: String::new(),
                token: token.clone(),
            })
            .await
            .map_err(api)?;
        let bundle = BundleServiceClient::new(ch.clone())
            .get_bundle(pb::GetBundleRequest {})
            .await
            .map_err(api)?
            .into_inner();
        let spiffe_id = format!("spiffe://{TRUST_DOMAIN}/spire/agent/join_token/{token}");
        let created = EntryServiceClient::new(ch)
            .batch_create_entry(pb::BatchCreateEntryRequest {
                entries: vec![pb::Entry {
                    spiffe_id: workload_spiffe_id.to_owned(),
                    parent_id: spiffe_id.clone(),
                    selectors: vec![pb::Selector {
                        r#type: "unix".into(),
                        value: format!("uid:{workload_uid}"),
                    }],
                    ..Default::default()
                }],
            })
            .await
            .map_err(api)?
            .into_inner();
        if let Some(st) = created.results.first().and_then(|r| r.status.as_ref()) {
            if st.code != 0 {
                return Err(ClusterError::Api(st.message.clone()));
            }
        }
        let base = self.dir.path().join(format!("agent{n}"));
        std::fs::create_dir_all(&base)?;
        let bundle_path = base.join("bundle.pem");
        std::fs::write(
            &bundle_path,
            plinth_spiffe::pem::encode_certs(&bundle.x509_authorities),
        )?;
        let servers: Vec<String> = self
            .nodes
            .values()
            .map(|n| format!("{:?}", n.api_addr))
            .collect();
        let socket = base.join("workload.sock");
        let config = base.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"[agent]
trust_domain = "{TRUST_DOMAIN}"
server_addresses = [{servers}]
data_dir = "{b}/data"
socket_path = "{sock}"
trust_bundle_path = "{bundle}"

[node_attestor.join_token]
token = "{token}"

[workload_attestor.unix]
"#,
                servers = servers.join(", "),
                b = base.display(),
                sock = socket.display(),
                bundle = bundle_path.display(),
            ),
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(base.join("agent.log"))?;
        let child = Command::new(agent_bin)
            .arg("run")
            .arg("-config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        tracing::info!(agent = n, pid = child.id(), "started plinth-agent");
        self.spawned.push((child.id(), config));
        self.agents.push(Agent {
            spiffe_id: spiffe_id.clone(),
            socket: socket.clone(),
            child: Some(child),
        });
        Ok((spiffe_id, socket))
    }

    /// Kills every process (also paused ones: SIGKILL ends a stopped process).
    pub fn shutdown(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        if self.docker.is_some() {
            for id in &ids {
                self.save_container_log(*id);
            }
        }
        if let Some(d) = &mut self.docker {
            d.cleanup();
            for n in self.nodes.values_mut() {
                n.container_up = false;
            }
        }
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            let _ = self.kill(id);
        }
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}
