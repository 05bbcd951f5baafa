//! `plinth-server run`: start Raft, the CA, and serve the APIs on the admin socket (and TCP).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use plinth_raft::{NodeError, RaftConfig, RaftNode};
use plinth_storage::Command;
use plinth_upstream::{
    DiskKeyManager, DiskUpstreamAuthority, KeyManager, MemoryKeyManager, UpstreamAuthority,
};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::api::{ServerCore, Services};
use crate::attest::X509PopVerifier;
use crate::ca::{CaConfig, CaManager};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, KeyManagerSection, UpstreamSection};
use crate::state::{RaftState, Replicated, StateError};

/// How often the CA manager checks whether a rotation is due.
const ROTATE_EVERY: Duration = Duration::from_secs(10);
/// How often expired join tokens are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A running server (for tests and the binary).
#[derive(Debug)]
pub struct RunningServer {
    pub core: Arc<ServerCore<RaftState>>,
    pub admin_socket: std::path::PathBuf,
    /// Where the TLS API listens (agents, remote admins).
    pub tcp_addr: std::net::SocketAddr,
    /// The server's TLS identity and trust bundle.
    pub tls: Arc<crate::tls::TlsIdentity>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    /// Stops serving and shuts Raft down.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        // Graceful shutdown waits for open streams (agents' sync streams never end by
        // themselves): give them a moment, then stop the task.
        for mut t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(2), &mut t)
                .await
                .is_err()
            {
                t.abort();
                let _ = t.await;
            }
        }
        let core = self.core;
        // The API tasks held the only other references; wait briefly for them to drop.
        let mut core = core;
        for _ in 0..50 {
            match Arc::try_unwrap(core) {
                Ok(c) => {
                    drop(c.ca);
                    if let Ok(state) = Arc::try_unwrap(c.state) {
                        state.shutdown().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    }
                    let _ = std::fs::remove_file(&self.admin_socket);
                    return Ok(());
                }
                Err(c) => {
                    core = c;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let _ = std::fs::remove_file(&self.admin_socket);
        Ok(())
    }
}

fn private_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting permissions of {}", path.display()))?;
    Ok(())
}

async fn wait_for_cluster(state: &RaftState) -> anyhow::Result<()> {
    let mut waited = 0u32;
    loop {
        match state.linearizable().await {
            Ok(()) => return Ok(()),
            Err(StateError::Unavailable(m)) => {
                waited += 1;
                if waited % 5 == 1 {
                    tracing::info!(reason = %m, "waiting for the cluster to elect a leader");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("cluster failed: {e}"),
        }
    }
}

/// The async runtime `plinth-server run` serves on: `worker_threads` threads (from
/// `[server] worker_threads`), or when unset tokio's default: `TOKIO_WORKER_THREADS` if set,
/// else one per CPU.
///
/// One worker per server measured best with three servers sharing two CPUs: tokio wakes a
/// parked sibling worker whenever a worker has more than one task ready, and each write's
/// steps (API, proposal, log append, replication, apply) are a chain of such hand-offs
/// (docs/benchmarks.md).
pub fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if let Some(n) = worker_threads {
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "worker_threads must be at least 1",
            ));
        }
        b.worker_threads(n);
    }
    b.build()
}

/// Starts a server from a validated configuration.
pub async fn start(cfg: Config) -> anyhow::Result<RunningServer> {
    let cfg = Arc::new(cfg);
    let data_dir = cfg.file.server.data_dir.clone();
    private_dir(&data_dir)?;
    let cl = &cfg.file.cluster;
    let mut rc = RaftConfig::new(cl.node_id, cfg.raft_bind, data_dir.join("raft"));
    rc.insecure_plaintext = cl.insecure_plaintext;
    if !cl.advertise_address.is_empty() {
        rc.advertise_addr = Some(cl.advertise_address.clone());
    }
    rc.election_timeout_min = Duration::from_millis(cl.election_timeout_min_ms);
    rc.election_timeout_max = Duration::from_millis(cl.election_timeout_max_ms);
    rc.heartbeat_interval = Duration::from_millis(cl.heartbeat_interval_ms);
    rc.snapshot_after_logs = cl.snapshot_after_logs;
    rc.logs_kept_after_snapshot = cl.logs_kept_after_snapshot;
    rc.parallel_leader_sync = cl.parallel_leader_sync;
    rc.pipeline_commit_notices = cl.pipeline_commit_notices;
    rc.commit_notice_delay = Duration::from_micros(cl.commit_notice_delay_us);
    // The server's SVID, also presented to peers: restored before Raft starts, because loading
    // the CA needs a leader and electing one needs peers to accept each other.
    let identity = Arc::new(
        crate::tls::TlsIdentity::new().persisting_to(data_dir.join(crate::peer::PEER_SVID_FILE)),
    );
    let restored = if cl.insecure_plaintext {
        None
    } else {
        let peer_cfg = crate::peer::PeerIdentityConfig {
            trust_domain: cfg.trust_domain.clone(),
            persisted: data_dir.join(crate::peer::PEER_SVID_FILE),
            bootstrap: cl
                .bootstrap_svid_path
                .clone()
                .zip(cl.bootstrap_key_path.clone()),
            trust_bundle: cl.trust_bundle_path.clone(),
        };
        let r = crate::peer::restore(&identity, &peer_cfg, time::OffsetDateTime::now_utc())
            .context("[cluster] peer identity")?;
        rc.tls = Some(crate::peer::peer_tls(&identity, &cfg.trust_domain)?);
        Some(r)
    };
    let node = RaftNode::start(rc)
        .await
        .map_err(|e| anyhow::anyhow!("starting Raft: {e}"))?;
    identity.refresh_bundle_from(node.store(), &cfg.trust_domain);
    if let Some(crate::peer::Restored::Nothing(why)) = &restored {
        // Alone in a new (or single-node) cluster, nothing needs a peer SVID yet: the CA issues
        // one shortly. Any other server would be refused by its peers.
        let members = node.cluster_status().await.members.len();
        let alone = members == 1 || (members == 0 && cl.bootstrap);
        if !alone {
            bail!(
                "this server has no peer SVID ({why}), so the other servers would refuse it. On a \
                 cluster member run `plinth-server x509 mint -spiffeID {} -write DIR`, copy DIR \
                 here and set [cluster] bootstrap_svid_path = \"DIR/svid.pem\", \
                 bootstrap_key_path = \"DIR/key.pem\", trust_bundle_path = \"DIR/bundle.pem\"",
                crate::authz::server_id(&cfg.trust_domain)
            );
        }
    }
    if cl.bootstrap {
        match node.bootstrap().await {
            Ok(()) => tracing::info!(node_id = cl.node_id, "bootstrapped a new cluster"),
            Err(NodeError::AlreadyInitialized) => {}
            Err(e) => bail!("bootstrapping the cluster: {e}"),
        }
    }
    let state = Arc::new(RaftState::new(node));
    if cl.bootstrap {
        wait_for_cluster(&state).await?;
    }

    let keys: Arc<dyn KeyManager> = match &cfg.file.key_manager {
        KeyManagerSection::Memory => Arc::new(MemoryKeyManager::new()),
        KeyManagerSection::Disk { keys_path } => Arc::new(
            DiskKeyManager::open(keys_path).with_context(|| "opening the disk key manager")?,
        ),
    };
    let upstream: Option<Arc<dyn UpstreamAuthority>> = match &cfg.file.upstream_authority {
        None => None,
        Some(UpstreamSection::Disk {
            cert_file_path,
            key_file_path,
            bundle_file_path,
        }) => Some(Arc::new(
            DiskUpstreamAuthority::open(cert_file_path, key_file_path, bundle_file_path.as_deref())
                .context("upstream_authority")?,
        )),
    };
    let x509pop = match &cfg.file.node_attestor.x509pop {
        None => None,
        Some(x) => {
            let text = std::fs::read_to_string(&x.ca_bundle_path)
                .with_context(|| format!("reading {}", x.ca_bundle_path.display()))?;
            let roots = plinth_spiffe::pem::parse_all(&text, "CERTIFICATE")
                .with_context(|| format!("{}", x.ca_bundle_path.display()))?;
            Some(X509PopVerifier::new(roots)?)
        }
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let s = &cfg.file.server;
    let ca = Arc::new(CaManager::new(
        CaConfig {
            trust_domain: cfg.trust_domain.clone(),
            ca_ttl: cfg.ca_ttl,
            ca_key_type: cfg.ca_key_type,
            jwt_key_type: cfg.jwt_key_type,
            ca_organization: s.ca_subject.organization.clone(),
            ca_country: s.ca_subject.country.clone(),
            ca_common_name: (!s.ca_subject.common_name.is_empty())
                .then(|| s.ca_subject.common_name.clone()),
            jwt_issuer: (!s.jwt_issuer.is_empty()).then(|| s.jwt_issuer.clone()),
        },
        state.clone(),
        keys,
        upstream,
        clock.clone(),
    ));
    if cl.bootstrap {
        ca.init().await.context("initialising the CA")?;
    }
    let core = Arc::new(ServerCore {
        cfg: cfg.clone(),
        state: state.clone(),
        ca: ca.clone(),
        clock,
        x509pop,
    });

    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();

    // CA rotation; also finishes CA set-up on a node that joined an existing cluster.
    {
        let ca = ca.clone();
        let mut stop_rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let r = if ca.is_ready() {
                    ca.rotate().await
                } else {
                    ca.init().await
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "CA rotation step failed; will retry");
                }
                // Until the CA is up (a joining node waits for membership), retry quickly.
                let pause = if ca.is_ready() {
                    ROTATE_EVERY
                } else {
                    Duration::from_millis(500)
                };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop_rx.changed() => return,
                }
            }
        }));
    }
    // Expired join tokens.
    {
        let state = state.clone();
        let mut stop_rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(PRUNE_EVERY) => {}
                    _ = stop_rx.changed() => return,
                }
                if let Err(e) = state.propose(Command::JoinTokenPrune).await {
                    tracing::debug!(error = %e, "join token prune skipped");
                }
            }
        }));
    }

    // The admin socket: local administrators.
    let sock = s.socket_path.clone();
    if let Some(dir) = sock.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if sock.exists() {
        std::fs::remove_file(&sock)
            .with_context(|| format!("removing stale {}", sock.display()))?;
    }
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o770))?;
    let router = Services::new(core.clone()).router();
    {
        let mut stop_rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let r = router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                    let _ = stop_rx.changed().await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "admin socket server failed");
            }
        }));
    }

    // The TLS API: agents and remote admins.
    let tcp = tokio::net::TcpListener::bind(cfg.bind)
        .await
        .with_context(|| format!("binding {}", cfg.bind))?;
    let tcp_addr = tcp.local_addr()?;
    identity.refresh_bundle(&core);
    if ca.is_ready() {
        identity
            .rotate_svid(&core)
            .map_err(|e| anyhow::anyhow!("issuing the server SVID: {e}"))?;
    }
    tasks.push(tokio::spawn(crate::tls::maintain(
        core.clone(),
        identity.clone(),
        stop_rx.clone(),
    )));
    let conns = crate::tls::incoming(
        tcp,
        identity.clone(),
        cfg.trust_domain.clone(),
        stop_rx.clone(),
    )
    .map_err(|e| anyhow::anyhow!("TLS configuration: {e}"))?;
    {
        let router = Services::new(core.clone()).router();
        let mut stop_rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let r = router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::ReceiverStream::new(conns),
                    async move {
                        let _ = stop_rx.changed().await;
                    },
                )
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "TLS API server failed");
            }
        }));
    }

    if cfg.file.health_checks.listener_enabled {
        let h = &cfg.file.health_checks;
        let addr = format!("{}:{}", h.bind_address, h.bind_port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding health checks on {addr}"))?;
        tasks.push(tokio::spawn(crate::health::serve(
            listener,
            core.clone(),
            h.live_path.clone(),
            h.ready_path.clone(),
            stop_rx.clone(),
        )));
    }

    tracing::info!(
        trust_domain = %cfg.trust_domain,
        admin_socket = %sock.display(),
        api = %tcp_addr,
        node_id = cl.node_id,
        "plinth server ready"
    );
    Ok(RunningServer {
        core,
        admin_socket: sock,
        tcp_addr,
        tls: identity,
        stop,
        tasks,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_has_the_configured_workers_or_one_per_cpu() {
        for n in [1, 3] {
            let rt = runtime(Some(n)).unwrap();
            assert_eq!(rt.metrics().num_workers(), n);
            // It runs tasks and timers.
            let got = rt.block_on(async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                tokio::spawn(async { 7 }).await.unwrap()
            });
            assert_eq!(got, 7);
        }
        let cpus = std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().unwrap().get());
        assert_eq!(runtime(None).unwrap().metrics().num_workers(), cpus);
        let e = runtime(Some(0)).unwrap_err();
        assert!(e.to_string().contains("at least 1"), "{e}");
    }
}
