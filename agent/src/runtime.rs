//! `plinth-agent run`: bootstrap trust, attest the node (or reuse the agent SVID in the data
//! dir), serve the Workload API, and sync with the servers for as long as the agent runs.
//!
//! The Workload API serves from the cache whether or not a server is reachable; only a server
//! that refuses the agent outright (banned, unknown) stops it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use plinth_spiffe::tls::{BundleHolder, SvidHolder};
use plinth_spiffe::{Bundle, BundleSet};
use rand::Rng;
use time::OffsetDateTime;

use crate::admin::{AgentInfo, DebugApi};
use crate::attest::docker::DockerAttestor;
use crate::attest::systemd::SystemdAttestor;
use crate::attest::unix::UnixAttestor;
use crate::attest::WorkloadAttestor;
use crate::cache::IdentityCache;
use crate::config::{Bootstrap, Config, NodeAttestor};
use crate::conn::Connector;
use crate::endpoint;
use crate::jwt::{JwtSvidCache, SystemClock};
use crate::node::{self, NodeError};
use crate::store::{AgentSvid, DataDir};
use crate::sync::{cert_not_before, rotation_time, ServerJwtSource, SessionEnd, SyncError, Syncer};
use crate::workload_api::WorkloadApi;

/// First pause after a failed connection; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("data dir: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("trust bundle: {0}")]
    Bundle(String),
    #[error("node attestation: {0}")]
    Attestation(String),
    /// The server refused this agent (banned, unknown, SVID no longer current): it must stop.
    #[error("the server refused this agent, stopping: {0}")]
    Refused(String),
    #[error("Workload API: {0}")]
    Endpoint(#[from] endpoint::EndpointError),
    #[error("admin socket: {0}")]
    Admin(endpoint::EndpointError),
    #[error("{0}")]
    Other(String),
}

/// Exponential backoff with jitter.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: MIN_BACKOFF }
    }

    fn reset(&mut self) {
        self.next = MIN_BACKOFF;
    }

    async fn wait(&mut self) {
        let jitter = rand::thread_rng().gen_range(0.5..=1.0);
        tokio::time::sleep(self.next.mul_f64(jitter)).await;
        self.next = (self.next * 2).min(MAX_BACKOFF);
    }
}

/// The trust bundle to start with: the one stored by a previous run (it follows CA rotation),
/// else the configured file; `None` for an insecure bootstrap.
fn initial_bundle(cfg: &Config, dir: &DataDir) -> Result<Option<Bundle>, RunError> {
    if let Some(b) = dir.load_bundle(&cfg.trust_domain)? {
        return Ok(Some(b));
    }
    match &cfg.bootstrap {
        Bootstrap::Insecure => Ok(None),
        Bootstrap::BundleFile(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| RunError::Bundle(format!("{}: {e}", path.display())))?;
            let certs = plinth_spiffe::pem::parse_all(&text, "CERTIFICATE")
                .map_err(|e| RunError::Bundle(format!("{}: {e}", path.display())))?;
            let mut b = Bundle::new(cfg.trust_domain.clone());
            for c in certs {
                b.add_x509_authority(c)
                    .map_err(|e| RunError::Bundle(format!("{}: {e}", path.display())))?;
            }
            Ok(Some(b))
        }
    }
}

fn bundle_set(b: &Bundle) -> BundleSet {
    let mut s = BundleSet::new();
    s.insert(b.clone());
    s
}

/// When to renew the agent SVID: at (jittered) half-life, counted from when it was received
/// (`fresh`), else from its notBefore (which servers backdate, so renewal comes a bit early).
fn renew_time(svid: &AgentSvid, fresh: bool) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    let nb = cert_not_before(svid.svid.leaf()).unwrap_or(now);
    let start = if fresh { nb.max(now) } else { nb };
    rotation_time(start, svid.svid.not_after)
}

/// State shared by the phases of a run.
struct Agent {
    cfg: Config,
    dir: DataDir,
    connector: Connector,
    info: Arc<AgentInfo>,
    /// The sync's last success (Unix seconds), shared with `info`.
    last_sync: Arc<std::sync::atomic::AtomicI64>,
}

impl Agent {
    fn reattestable(&self) -> bool {
        matches!(self.cfg.node_attestor, NodeAttestor::X509Pop { .. })
    }

    /// Attests until it works or the server refuses; stores the SVID and bundle.
    async fn attest(&self, backoff: &mut Backoff) -> Result<AgentSvid, RunError> {
        loop {
            let insecure = self.connector.bundles().get().is_empty();
            let conn = if insecure {
                tracing::warn!("insecure bootstrap: trusting the first server reached");
                self.connector.connect_insecure().await
            } else {
                self.connector.connect().await
            };
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach a server to attest");
                    backoff.wait().await;
                    continue;
                }
            };
            match node::attest(
                conn.channel.clone(),
                &self.cfg.node_attestor,
                &self.cfg.trust_domain,
            )
            .await
            {
                Ok(a) => {
                    self.dir.save_bundle(&a.bundle)?;
                    self.dir.save_agent_svid(&a.svid)?;
                    self.connector.bundles().set(bundle_set(&a.bundle));
                    tracing::info!(
                        agent_id = %a.svid.svid.spiffe_id,
                        server = %conn.address,
                        expires = %a.svid.svid.not_after,
                        "node attested"
                    );
                    backoff.reset();
                    return Ok(a.svid);
                }
                Err(NodeError::Unavailable(e)) => {
                    tracing::warn!(server = %conn.address, error = %e, "attestation failed; retrying");
                    self.connector.fail_over(&conn.address);
                    backoff.wait().await;
                }
                Err(e) => return Err(RunError::Attestation(e.to_string())),
            }
        }
    }

    fn use_svid(&self, svid: &AgentSvid) -> Result<(), RunError> {
        self.info.set_agent_svid(&svid.svid);
        self.connector
            .svid()
            .set(&svid.svid, svid.key.clone())
            .map_err(|e| RunError::Other(format!("agent SVID: {e}")))
    }
}

/// Runs the agent until `shutdown` completes or the server refuses it.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), RunError> {
    let dir = DataDir::open(&cfg.data_dir)?;
    let bundle = initial_bundle(&cfg, &dir)?;
    let bundles = Arc::new(BundleHolder::new(
        bundle.as_ref().map(bundle_set).unwrap_or_default(),
    ));
    let connector = Connector::new(
        cfg.server_addresses.clone(),
        &cfg.trust_domain,
        bundles.clone(),
        Arc::new(SvidHolder::empty()),
    )
    .map_err(|e| RunError::Other(e.to_string()))?;
    let last_sync = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let agent = Agent {
        cfg,
        dir,
        connector,
        info: Arc::new(AgentInfo::new(last_sync.clone())),
        last_sync,
    };
    // Dropping the main loop stops the Workload API too.
    let result = tokio::select! {
        r = main_loop(&agent) => r,
        _ = shutdown => {
            tracing::info!("shutting down");
            Ok(())
        }
    };
    let sockets = std::iter::once(&agent.cfg.socket_path).chain(&agent.cfg.admin_socket_path);
    for path in sockets {
        if std::fs::symlink_metadata(path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            let _ = std::fs::remove_file(path);
        }
    }
    result
}

async fn main_loop(agent: &Agent) -> Result<(), RunError> {
    let mut backoff = Backoff::new();
    let td = agent.cfg.trust_domain.clone();

    // 1. The agent SVID: from the data dir, else by attesting.
    let mut fresh = true;
    let mut svid = match agent.dir.load_agent_svid()? {
        Some(s) if !s.svid.spiffe_id.is_member_of(&td) => {
            return Err(RunError::Other(format!(
                "the data dir holds an SVID of {}, this agent is configured for {td}",
                s.svid.spiffe_id
            )))
        }
        Some(s) if s.svid.not_after <= OffsetDateTime::now_utc() && agent.reattestable() => {
            tracing::info!("stored agent SVID expired; attesting again");
            agent.attest(&mut backoff).await?
        }
        Some(s) => {
            if s.svid.not_after <= OffsetDateTime::now_utc() {
                tracing::error!(
                    agent_id = %s.svid.spiffe_id,
                    "the stored agent SVID has expired and a join token cannot be used twice; \
                     remove agent-svid.pem from the data dir and attest with a new token"
                );
            }
            tracing::info!(agent_id = %s.svid.spiffe_id, expires = %s.svid.not_after, "reusing the agent SVID from the data dir");
            fresh = false;
            s
        }
        None => agent.attest(&mut backoff).await?,
    };
    agent.use_svid(&svid)?;
    let bundle = agent
        .connector
        .bundles()
        .get()
        .get(&td)
        .cloned()
        .ok_or_else(|| {
            RunError::Bundle(
                "no trust bundle (remove the data dir's agent-svid.pem to attest again)".into(),
            )
        })?;

    // 2. The Workload API, served from the cache from now on.
    let cache = Arc::new(IdentityCache::new(bundle));
    let clock = Arc::new(SystemClock);
    let jwt_source = Arc::new(ServerJwtSource::new(cache.clone()));
    let jwt = Arc::new(JwtSvidCache::new(jwt_source.clone(), clock.clone()));
    let mut attestors: Vec<Arc<dyn WorkloadAttestor>> =
        vec![Arc::new(UnixAttestor::new(agent.cfg.unix.clone()))];
    if let Some(docker) = &agent.cfg.docker {
        attestors.push(Arc::new(DockerAttestor::new(docker.clone())));
    }
    if let Some(systemd) = &agent.cfg.systemd {
        attestors.push(Arc::new(SystemdAttestor::new(systemd.clone())));
    }
    let api = WorkloadApi::new(cache.clone(), jwt.clone(), attestors, clock);
    let listener = endpoint::bind(&agent.cfg.socket_path)?;
    tracing::info!(socket = %agent.cfg.socket_path.display(), "serving the Workload API");
    let api_task = tokio::spawn(async move {
        if let Err(e) = endpoint::serve(listener, api, std::future::pending()).await {
            tracing::error!(error = %e, "the Workload API stopped");
        }
    });
    let _abort_api = AbortOnDrop(api_task);
    let _abort_admin = match &agent.cfg.admin_socket_path {
        Some(path) => {
            let listener = crate::admin::bind(path).map_err(RunError::Admin)?;
            let debug = DebugApi::new(agent.info.clone(), cache.clone(), jwt.clone());
            tracing::info!(socket = %path.display(), "serving the admin API");
            Some(AbortOnDrop(tokio::spawn(async move {
                if let Err(e) = crate::admin::serve(listener, debug, std::future::pending()).await {
                    tracing::error!(error = %e, "the admin API stopped");
                }
            })))
        }
        None => None,
    };

    // 3. Sync, reconnecting and failing over, renewing the agent SVID at half-life.
    let mut syncer = Syncer::new(
        td.clone(),
        cache,
        jwt,
        agent.connector.bundles().clone(),
        Some(agent.dir.clone()),
    )
    .with_budget(agent.cfg.svid_budget)
    .with_last_sync_success(agent.last_sync.clone());
    let mut renew_at = renew_time(&svid, fresh);
    loop {
        let conn = match agent.connector.connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no server reachable; serving from cache");
                backoff.wait().await;
                continue;
            }
        };
        tracing::info!(server = %conn.address, "connected");
        jwt_source.set_channel(Some(conn.channel.clone()));
        let result = syncer
            .run_session(conn.channel.clone(), &svid.svid.spiffe_id, renew_at, || {
                backoff.reset()
            })
            .await;
        jwt_source.set_channel(None);
        let refusal = match result {
            Ok(SessionEnd::RenewAgent) => match node::renew(conn.channel.clone()).await {
                Ok(new) => {
                    agent.dir.save_agent_svid(&new)?;
                    agent.use_svid(&new)?;
                    tracing::info!(expires = %new.svid.not_after, "agent SVID renewed");
                    svid = new;
                    renew_at = renew_time(&svid, true);
                    continue;
                }
                Err(NodeError::Refused(m)) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "agent SVID renewal failed; retrying");
                    agent.connector.fail_over(&conn.address);
                    backoff.wait().await;
                    continue;
                }
            },
            Err(SyncError::Unavailable(e)) => {
                tracing::warn!(server = %conn.address, error = %e, "lost the server; serving from cache");
                agent.connector.fail_over(&conn.address);
                backoff.wait().await;
                continue;
            }
            Err(SyncError::Refused(m)) => m,
        };
        // The server does not accept this agent SVID any more.
        if agent.reattestable() && !refusal.contains("banned") {
            tracing::warn!(reason = %refusal, "the server no longer accepts the agent SVID; attesting again");
            agent.dir.remove_agent_svid()?;
            agent.connector.svid().clear();
            svid = agent.attest(&mut backoff).await?;
            agent.use_svid(&svid)?;
            renew_at = renew_time(&svid, true);
            continue;
        }
        tracing::error!(
            agent_id = %svid.svid.spiffe_id,
            reason = %refusal,
            "the server refused this agent (banned, evicted or superseded); stopping"
        );
        return Err(RunError::Refused(refusal));
    }
}

/// Aborts a task when dropped (the Workload API must not outlive a failed run).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
