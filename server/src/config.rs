//! `server.toml`: SPIRE's configuration blocks in TOML. Unknown keys are an error naming the key;
//! `${VAR}` references are expanded only when asked (`-expandEnv`), as in SPIRE.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use plinth_raft::TimingFault;
use plinth_spiffe::{KeyType, SpiffeId, TrustDomain};
use serde::Deserialize;

/// Why a configuration is not usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Parse(String),
    #[error("config: environment variable {0} referenced by ${{{0}}} is not set")]
    MissingEnv(String),
    #[error("config: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.to_string(),
    }
}

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server: ServerSection,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub key_manager: KeyManagerSection,
    pub upstream_authority: Option<UpstreamSection>,
    #[serde(default)]
    pub node_attestor: NodeAttestorSection,
    #[serde(default)]
    pub health_checks: HealthSection,
    #[serde(default)]
    pub telemetry: TelemetrySection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    #[serde(default = "default_bind_address")]
    pub bind_address: String,
    #[serde(default = "default_bind_port")]
    pub bind_port: u16,
    #[serde(default = "default_socket_path")]
    pub socket_path: PathBuf,
    pub trust_domain: String,
    pub data_dir: PathBuf,
    #[serde(default = "default_log_level")]
    pub log_level: String,
    #[serde(default = "default_ca_ttl")]
    pub ca_ttl: String,
    #[serde(default = "default_x509_ttl")]
    pub default_x509_svid_ttl: String,
    #[serde(default = "default_jwt_ttl")]
    pub default_jwt_svid_ttl: String,
    #[serde(default = "default_key_type")]
    pub ca_key_type: String,
    #[serde(default = "default_key_type")]
    pub jwt_key_type: String,
    #[serde(default)]
    pub jwt_issuer: String,
    #[serde(default)]
    pub admin_ids: Vec<String>,
    #[serde(default)]
    pub ca_subject: CaSubject,
    #[serde(default = "default_agent_ttl")]
    pub agent_ttl: String,
    /// Threads of the async runtime that runs the server (API, Raft, replication); blocking
    /// work such as log syncs has its own pool. Unset: one per CPU. Servers that share a host
    /// do better with its CPUs divided among them (docs/benchmarks.md).
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSubject {
    #[serde(default = "default_country")]
    pub country: String,
    #[serde(default = "default_org")]
    pub organization: String,
    #[serde(default)]
    pub common_name: String,
}

impl Default for CaSubject {
    fn default() -> Self {
        Self {
            country: default_country(),
            organization: default_org(),
            common_name: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    #[serde(default = "default_node_id")]
    pub node_id: u64,
    /// Where the Raft peer API listens.
    #[serde(default = "default_raft_bind")]
    pub bind_address: String,
    /// `host:port` other servers use to reach this one; defaults to the bound address.
    #[serde(default)]
    pub advertise_address: String,
    /// Initialise a new cluster with this node as its only member (first node only; ignored if
    /// the data dir already holds a cluster).
    #[serde(default = "default_true")]
    pub bootstrap: bool,
    /// Serve and dial the Raft peer API over plain, unauthenticated TCP instead of mTLS. Only
    /// for tests and local development.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// A joining server's first peer SVID (`spiffe://<td>/spire/server`), minted on a member
    /// with `plinth-server x509 mint -spiffeID spiffe://<td>/spire/server -write DIR`
    /// (`DIR/svid.pem`). Used until the server's own CA issues its SVID.
    #[serde(default)]
    pub bootstrap_svid_path: Option<PathBuf>,
    /// The key of `bootstrap_svid_path` (`DIR/key.pem`).
    #[serde(default)]
    pub bootstrap_key_path: Option<PathBuf>,
    /// The trust bundle a joining server checks peers against until it has the replicated one
    /// (`DIR/bundle.pem`, or `plinth-server bundle show` on a member).
    #[serde(default)]
    pub trust_bundle_path: Option<PathBuf>,
    #[serde(default = "default_election_min")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "default_election_max")]
    pub election_timeout_max_ms: u64,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_ms: u64,
    /// Applied log entries between two snapshots (each a full copy of the state).
    #[serde(default = "default_snapshot_after_logs")]
    pub snapshot_after_logs: u64,
    /// Log entries kept after a snapshot, for followers that lag a little. A new leader sends
    /// each follower about half of the unpurged log again (openraft 0.9), so a shorter log is
    /// a faster failover after heavy write loads (docs/benchmarks.md).
    #[serde(default = "default_logs_kept_after_snapshot")]
    pub logs_kept_after_snapshot: u64,
    /// As leader, replicate new entries while syncing them rather than after; nothing counts as
    /// committed until it is durable on the leader too. On by default (see
    /// `plinth_raft::node::RaftConfig::parallel_leader_sync` and docs/benchmarks.md).
    #[serde(default = "default_parallel_leader_sync")]
    pub parallel_leader_sync: bool,
    /// As leader, count the AppendEntries that only moves a follower's commit index on as
    /// accepted without waiting for its answer, and hold it back `commit_notice_delay_us` for
    /// the next request to carry. On by default (see
    /// `plinth_raft::node::RaftConfig::pipeline_commit_notices` and docs/benchmarks.md).
    #[serde(default = "default_pipeline_commit_notices")]
    pub pipeline_commit_notices: bool,
    /// Microseconds a commit notice is held back; 0 sends it at once. At most the heartbeat
    /// interval.
    #[serde(default = "default_commit_notice_delay_us")]
    pub commit_notice_delay_us: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            node_id: default_node_id(),
            bind_address: default_raft_bind(),
            advertise_address: String::new(),
            bootstrap: true,
            insecure_plaintext: false,
            bootstrap_svid_path: None,
            bootstrap_key_path: None,
            trust_bundle_path: None,
            election_timeout_min_ms: default_election_min(),
            election_timeout_max_ms: default_election_max(),
            heartbeat_interval_ms: default_heartbeat(),
            snapshot_after_logs: default_snapshot_after_logs(),
            logs_kept_after_snapshot: default_logs_kept_after_snapshot(),
            parallel_leader_sync: default_parallel_leader_sync(),
            pipeline_commit_notices: default_pipeline_commit_notices(),
            commit_notice_delay_us: default_commit_notice_delay_us(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum KeyManagerSection {
    #[default]
    Memory,
    Disk {
        keys_path: PathBuf,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum UpstreamSection {
    Disk {
        cert_file_path: PathBuf,
        key_file_path: PathBuf,
        #[serde(default)]
        bundle_file_path: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAttestorSection {
    pub join_token: Option<JoinTokenAttestor>,
    pub x509pop: Option<X509PopAttestor>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenAttestor {}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509PopAttestor {
    /// PEM file of the CA certificates agent certificates must chain to.
    pub ca_bundle_path: PathBuf,
    /// SPIRE's `agent_path_template`; plinth supports the default only.
    #[serde(default)]
    pub agent_path_template: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    #[serde(default)]
    pub listener_enabled: bool,
    #[serde(default = "default_health_bind")]
    pub bind_address: String,
    #[serde(default = "default_health_port")]
    pub bind_port: u16,
    #[serde(default = "default_live")]
    pub live_path: String,
    #[serde(default = "default_ready")]
    pub ready_path: String,
}

impl Default for HealthSection {
    fn default() -> Self {
        Self {
            listener_enabled: false,
            bind_address: default_health_bind(),
            bind_port: default_health_port(),
            live_path: default_live(),
            ready_path: default_ready(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    /// Prometheus listener port (SPIRE convention 9988); not served yet when unset.
    #[serde(default)]
    pub prometheus_port: Option<u16>,
}

fn default_bind_address() -> String {
    "0.0.0.0".into()
}
fn default_bind_port() -> u16 {
    8081
}
fn default_socket_path() -> PathBuf {
    PathBuf::from("/tmp/plinth-server/private/api.sock")
}
fn default_log_level() -> String {
    "INFO".into()
}
fn default_ca_ttl() -> String {
    "24h".into()
}
fn default_x509_ttl() -> String {
    "1h".into()
}
fn default_jwt_ttl() -> String {
    "5m".into()
}
fn default_agent_ttl() -> String {
    "1h".into()
}
fn default_key_type() -> String {
    "ec-p256".into()
}
fn default_country() -> String {
    "US".into()
}
fn default_org() -> String {
    "SPIFFE".into()
}
fn default_node_id() -> u64 {
    1
}
fn default_raft_bind() -> String {
    "127.0.0.1:8082".into()
}
fn default_true() -> bool {
    true
}
// Raft timing defaults: plinth-raft's, for servers on one LAN (see `RaftConfig::new`).
fn default_election_min() -> u64 {
    plinth_raft::node::DEFAULT_ELECTION_TIMEOUT_MIN_MS
}
fn default_election_max() -> u64 {
    plinth_raft::node::DEFAULT_ELECTION_TIMEOUT_MAX_MS
}
fn default_heartbeat() -> u64 {
    plinth_raft::node::DEFAULT_HEARTBEAT_MS
}
fn default_snapshot_after_logs() -> u64 {
    plinth_raft::node::DEFAULT_SNAPSHOT_AFTER_LOGS
}
fn default_logs_kept_after_snapshot() -> u64 {
    plinth_raft::node::DEFAULT_LOGS_KEPT_AFTER_SNAPSHOT
}
fn default_parallel_leader_sync() -> bool {
    plinth_raft::node::DEFAULT_PARALLEL_LEADER_SYNC
}
fn default_pipeline_commit_notices() -> bool {
    plinth_raft::node::DEFAULT_PIPELINE_COMMIT_NOTICES
}
fn default_commit_notice_delay_us() -> u64 {
    plinth_raft::node::DEFAULT_COMMIT_NOTICE_DELAY_US
}
fn default_health_bind() -> String {
    "localhost".into()
}
fn default_health_port() -> u16 {
    80
}
fn default_live() -> String {
    "/live".into()
}
fn default_ready() -> String {
    "/ready".into()
}

/// Parses durations as SPIRE writes them: `90s`, `5m`, `1h`, `24h`, `1h30m`, `168h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0u64;
    let mut num = String::new();
    let mut saw_unit = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            unit = "ms".into();
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration like 90s, 5m or 24h"))?;
        num.clear();
        let secs = match unit.as_str() {
            "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            "d" => n * 86400,
            "ms" => {
                if n % 1000 != 0 {
                    return Err(format!("{s:?}: sub-second durations are not supported"));
                }
                n / 1000
            }
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
        };
        total = total
            .checked_add(secs)
            .ok_or_else(|| format!("{s:?} is too long"))?;
        saw_unit = true;
    }
    if !num.is_empty() || !saw_unit {
        return Err(format!("{s:?} needs a unit (s, m, h or d)"));
    }
    if total == 0 {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(Duration::from_secs(total))
}

/// Replaces `${VAR}` with the environment's value; a missing variable is an error.
pub fn expand_env(text: &str) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let name = &after[..end];
        let value = std::env::var(name).map_err(|_| ConfigError::MissingEnv(name.to_owned()))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A validated configuration, with parsed values.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: FileConfig,
    pub trust_domain: TrustDomain,
    pub bind: SocketAddr,
    pub raft_bind: SocketAddr,
    pub ca_ttl: Duration,
    pub x509_svid_ttl: Duration,
    pub jwt_svid_ttl: Duration,
    pub agent_ttl: Duration,
    pub ca_key_type: KeyType,
    pub jwt_key_type: KeyType,
    pub admin_ids: Vec<SpiffeId>,
}

fn socket_addr(key: &'static str, host: &str, port: u16) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()
        .map_err(|e| invalid(key, format!("{host}:{port}: {e}")))?
        .next()
        .ok_or_else(|| invalid(key, format!("{host}:{port} resolves to nothing")))
}

impl Config {
    /// Parses and validates config text.
    pub fn parse(text: &str, expand: bool) -> Result<Self, ConfigError> {
        let text = if expand {
            expand_env(text)?
        } else {
            text.to_owned()
        };
        let file: FileConfig = toml::from_str(&text).map_err(|e| {
            // One line, "line N: message", rather than toml's multi-line snippet.
            let line = e
                .span()
                .map(|sp| text[..sp.start.min(text.len())].matches('\n').count() + 1);
            let msg = e.message().trim().replace('\n', " ");
            ConfigError::Parse(match line {
                Some(l) => format!("line {l}: {msg}"),
                None => msg,
            })
        })?;
        Self::validate(file)
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &std::path::Path, expand: bool) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, expand)
    }

    fn validate(file: FileConfig) -> Result<Self, ConfigError> {
        let s = &file.server;
        let trust_domain =
            TrustDomain::new(&s.trust_domain).map_err(|e| invalid("server.trust_domain", e))?;
        let dur = |key: &'static str, v: &str| parse_duration(v).map_err(|e| invalid(key, e));
        let ca_ttl = dur("server.ca_ttl", &s.ca_ttl)?;
        let x509_svid_ttl = dur("server.default_x509_svid_ttl", &s.default_x509_svid_ttl)?;
        let jwt_svid_ttl = dur("server.default_jwt_svid_ttl", &s.default_jwt_svid_ttl)?;
        let agent_ttl = dur("server.agent_ttl", &s.agent_ttl)?;
        if s.worker_threads == Some(0) {
            return Err(invalid(
                "server.worker_threads",
                "must be at least 1 (remove it for one per CPU)",
            ));
        }
        if x509_svid_ttl >= ca_ttl {
            return Err(invalid(
                "server.default_x509_svid_ttl",
                format!(
                    "{} must be shorter than ca_ttl ({}), or every SVID is cut short by its CA",
                    s.default_x509_svid_ttl, s.ca_ttl
                ),
            ));
        }
        let ca_key_type: KeyType = s
            .ca_key_type
            .parse()
            .map_err(|e| invalid("server.ca_key_type", e))?;
        let jwt_key_type: KeyType = s
            .jwt_key_type
            .parse()
            .map_err(|e| invalid("server.jwt_key_type", e))?;
        let admin_ids = s
            .admin_ids
            .iter()
            .map(|a| {
                SpiffeId::new(a).map_err(|e| invalid("server.admin_ids", format!("{a:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bind = socket_addr("server.bind_address", &s.bind_address, s.bind_port)?;
        let raft_bind: SocketAddr = file.cluster.bind_address.parse().map_err(|e| {
            invalid(
                "cluster.bind_address",
                format!("{}: {e}", file.cluster.bind_address),
            )
        })?;
        if file.cluster.node_id == 0 {
            return Err(invalid("cluster.node_id", "must be at least 1"));
        }
        // The Raft timings, by the rules Raft checks when it starts (`plinth_raft::timing_fault`),
        // here so that `plinth-server validate` refuses them too and names the key.
        let timing = &file.cluster;
        if let Some(fault) = plinth_raft::timing_fault(
            Duration::from_millis(timing.heartbeat_interval_ms),
            Duration::from_millis(timing.election_timeout_min_ms),
            Duration::from_millis(timing.election_timeout_max_ms),
            Duration::from_micros(timing.commit_notice_delay_us),
        ) {
            return Err(match fault {
                TimingFault::HeartbeatInterval => invalid(
                    "cluster.heartbeat_interval_ms",
                    format!(
                        "{} must be at least 1 and below election_timeout_min_ms ({}): a \
                         follower that hears no heartbeat within its election timeout starts an \
                         election",
                        timing.heartbeat_interval_ms, timing.election_timeout_min_ms
                    ),
                ),
                TimingFault::ElectionTimeoutMin => invalid(
                    "cluster.election_timeout_min_ms",
                    format!(
                        "{} must be below election_timeout_max_ms ({}): servers draw their \
                         timeouts from that range so that they do not all stand at once",
                        timing.election_timeout_min_ms, timing.election_timeout_max_ms
                    ),
                ),
                TimingFault::CommitNoticeDelay => invalid(
                    "cluster.commit_notice_delay_us",
                    "must not exceed heartbeat_interval_ms (a heartbeat that moves the commit \
                     index on is held back as long)",
                ),
            });
        }
        if file.cluster.snapshot_after_logs == 0 {
            return Err(invalid("cluster.snapshot_after_logs", "must be at least 1"));
        }
        let cl = &file.cluster;
        if cl.bootstrap_svid_path.is_some() != cl.bootstrap_key_path.is_some() {
            return Err(invalid(
                "cluster.bootstrap_svid_path",
                "set bootstrap_svid_path and bootstrap_key_path together",
            ));
        }
        if cl.insecure_plaintext
            && (cl.bootstrap_svid_path.is_some() || cl.trust_bundle_path.is_some())
        {
            return Err(invalid(
                "cluster.insecure_plaintext",
                "plain TCP uses no peer SVID; remove bootstrap_svid_path, bootstrap_key_path \
                 and trust_bundle_path, or insecure_plaintext",
            ));
        }
        if file.node_attestor.join_token.is_none() && file.node_attestor.x509pop.is_none() {
            return Err(invalid(
                "node_attestor",
                "configure at least one node attestor ([node_attestor.join_token] or [node_attestor.x509pop])",
            ));
        }
        if let Some(x) = &file.node_attestor.x509pop {
            if x.agent_path_template.is_some() {
                return Err(invalid(
                    "node_attestor.x509pop.agent_path_template",
                    "custom templates are not supported; remove it to use the default",
                ));
            }
        }
        Ok(Self {
            trust_domain,
            bind,
            raft_bind,
            ca_ttl,
            x509_svid_ttl,
            jwt_svid_ttl,
            agent_ttl,
            ca_key_type,
            jwt_key_type,
            admin_ids,
            file,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[server]
trust_domain = "example.org"
data_dir = "/tmp/x"

[node_attestor.join_token]
"#;

    /// `MIN` with a `[cluster]` section of `lines`.
    fn with_cluster(lines: &str) -> String {
        format!("{MIN}\n[cluster]\n{lines}\n")
    }

    /// `text` parsed; a refusal fails the test.
    fn parsed(text: &str) -> Config {
        Config::parse(text, false).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Why `text` is refused; accepting it fails the test.
    fn refused(text: &str) -> String {
        Config::parse(text, false)
            .err()
            .unwrap_or_else(|| panic!("accepted: {text}"))
            .to_string()
    }

    #[test]
    fn minimal_config_gets_spire_defaults() {
        let c = parsed(MIN);
        assert_eq!(c.bind.port(), 8081);
        assert_eq!(c.ca_ttl, Duration::from_secs(86400));
        assert_eq!(c.x509_svid_ttl, Duration::from_secs(3600));
        assert_eq!(c.jwt_svid_ttl, Duration::from_secs(300));
        assert_eq!(c.ca_key_type, KeyType::EcP256);
        assert_eq!(
            c.file.server.socket_path,
            PathBuf::from("/tmp/plinth-server/private/api.sock")
        );
    }

    #[test]
    fn snapshot_settings_default_to_raft_and_are_checked() {
        let c = parsed(MIN);
        assert_eq!(c.file.cluster.snapshot_after_logs, 5000);
        assert_eq!(c.file.cluster.logs_kept_after_snapshot, 1000);
        let c = parsed(&with_cluster(
            "snapshot_after_logs = 1000\nlogs_kept_after_snapshot = 50",
        ));
        assert_eq!(c.file.cluster.snapshot_after_logs, 1000);
        assert_eq!(c.file.cluster.logs_kept_after_snapshot, 50);
        let e = refused(&with_cluster("snapshot_after_logs = 0"));
        assert!(e.contains("cluster.snapshot_after_logs"), "{e}");
    }

    #[test]
    fn worker_threads_default_to_one_per_cpu_and_zero_is_refused() {
        assert_eq!(parsed(MIN).file.server.worker_threads, None);
        let with =
            |v: &str| MIN.replacen("[server]", &format!("[server]\nworker_threads = {v}"), 1);
        assert_eq!(parsed(&with("1")).file.server.worker_threads, Some(1));
        assert_eq!(parsed(&with("6")).file.server.worker_threads, Some(6));
        let e = refused(&with("0"));
        assert!(
            e.contains("server.worker_threads") && e.contains("at least 1"),
            "{e}"
        );
        // The line of the key (the third of the file) and what it must be.
        let e = refused(&with("-1"));
        assert!(e.contains("line 3") && e.contains("expected usize"), "{e}");
    }

    /// The `[cluster]` switch `key` is `default` with no `[cluster]` section and when the
    /// section lacks it, else what it is set to; a non-boolean is refused.
    fn cluster_switch(key: &str, default: bool, get: fn(&Config) -> bool) {
        for (text, want) in [
            (MIN.to_owned(), default),
            (with_cluster("node_id = 1"), default),
            (with_cluster(&format!("{key} = false")), false),
            (with_cluster(&format!("{key} = true")), true),
        ] {
            assert_eq!(get(&parsed(&text)), want, "{text}");
        }
        let e = refused(&with_cluster(&format!("{key} = 1")));
        assert!(e.contains("expected a boolean"), "{e}");
    }

    #[test]
    fn parallel_leader_sync_is_on_unless_turned_off() {
        cluster_switch("parallel_leader_sync", true, |c| {
            c.file.cluster.parallel_leader_sync
        });
    }

    #[test]
    fn pipeline_commit_notices_is_on_unless_turned_off() {
        cluster_switch("pipeline_commit_notices", true, |c| {
            c.file.cluster.pipeline_commit_notices
        });
    }

    #[test]
    fn commit_notice_delay_defaults_to_1ms_and_stays_within_the_heartbeat() {
        assert_eq!(parsed(MIN).file.cluster.commit_notice_delay_us, 1000);
        let c = parsed(&with_cluster("commit_notice_delay_us = 0"));
        assert_eq!(c.file.cluster.commit_notice_delay_us, 0);
        let c = parsed(&with_cluster(
            "heartbeat_interval_ms = 50\ncommit_notice_delay_us = 50000",
        ));
        assert_eq!(c.file.cluster.commit_notice_delay_us, 50_000);
        let e = refused(&with_cluster(
            "heartbeat_interval_ms = 50\ncommit_notice_delay_us = 50001",
        ));
        assert!(e.contains("cluster.commit_notice_delay_us"), "{e}");
        assert!(e.contains("heartbeat_interval_ms"), "{e}");
    }

    #[test]
    fn raft_timings_out_of_order_are_refused_by_key() {
        let refused = |cluster: &str| refused(&with_cluster(cluster));
        let c = parsed(&with_cluster(
            "heartbeat_interval_ms = 99\nelection_timeout_min_ms = 100\nelection_timeout_max_ms = 101",
        ));
        assert_eq!(c.file.cluster.heartbeat_interval_ms, 99);
        let e = refused("heartbeat_interval_ms = 0");
        assert!(e.contains("cluster.heartbeat_interval_ms"), "{e}");
        let e = refused("heartbeat_interval_ms = 100\nelection_timeout_min_ms = 100");
        assert!(e.contains("cluster.heartbeat_interval_ms"), "{e}");
        assert!(e.contains("election_timeout_min_ms (100)"), "{e}");
        let e = refused("election_timeout_min_ms = 300\nelection_timeout_max_ms = 300");
        assert!(e.contains("cluster.election_timeout_min_ms"), "{e}");
        assert!(e.contains("election_timeout_max_ms (300)"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = MIN.replace("data_dir", "data_dirr");
        let e = refused(&text);
        assert!(e.contains("data_dirr"), "{e}");
        let text = format!("{MIN}\n[bogus]\nx = 1\n");
        let e = refused(&text);
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_values_are_clear() {
        let cases = [
            (
                "trust_domain = \"example.org\"",
                "trust_domain = \"Example.org\"",
                "server.trust_domain",
            ),
            ("data_dir", "ca_ttl = \"1x\"\ndata_dir", "server.ca_ttl"),
            (
                "data_dir",
                "ca_key_type = \"dsa\"\ndata_dir",
                "server.ca_key_type",
            ),
            (
                "data_dir",
                "default_x509_svid_ttl = \"48h\"\ndata_dir",
                "default_x509_svid_ttl",
            ),
            (
                "data_dir",
                "admin_ids = [\"spiffe://x/../y\"]\ndata_dir",
                "server.admin_ids",
            ),
            ("[node_attestor.join_token]", "", "node_attestor"),
        ];
        for (from, to, want) in cases {
            let text = MIN.replacen(from, to, 1);
            let e = refused(&text);
            assert!(e.contains(want), "{to:?}: {e}");
        }
    }

    #[test]
    fn peer_kit_keys_are_checked() {
        let e = refused(&with_cluster("bootstrap_svid_path = \"/k/svid.pem\""));
        assert!(e.contains("bootstrap_key_path"), "{e}");
        let e = refused(&with_cluster(
            "insecure_plaintext = true\ntrust_bundle_path = \"/k/bundle.pem\"",
        ));
        assert!(e.contains("cluster.insecure_plaintext"), "{e}");
        let c = parsed(&with_cluster(
            "bootstrap = false\nbootstrap_svid_path = \"/k/svid.pem\"\n\
             bootstrap_key_path = \"/k/key.pem\"\ntrust_bundle_path = \"/k/bundle.pem\"",
        ));
        assert_eq!(
            c.file.cluster.bootstrap_key_path,
            Some(PathBuf::from("/k/key.pem"))
        );
        assert!(!c.file.cluster.insecure_plaintext);
    }

    #[test]
    fn env_expansion_only_when_asked() {
        std::env::set_var("PLINTH_TEST_TD", "env.example");
        let text = MIN.replace("example.org", "${PLINTH_TEST_TD}");
        assert!(Config::parse(&text, false).is_err());
        let c = Config::parse(&text, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.trust_domain.name(), "env.example");
        let text = MIN.replace("example.org", "${PLINTH_TEST_UNSET_VAR}");
        assert!(matches!(
            Config::parse(&text, true),
            Err(ConfigError::MissingEnv(_))
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("168h"), Ok(Duration::from_secs(604800)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }
}
