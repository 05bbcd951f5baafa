//! The agent's configuration file (TOML, SPIRE's agent settings under plinth's spelling).
//!
//! ```toml
//! [agent]
//! trust_domain = "example.org"
//! server_addresses = ["10.0.0.1:8081", "10.0.0.2:8081"]  # tried in turn, failing over
//! data_dir = "/var/lib/plinth-agent"                      # created 0700
//! socket_path = "/tmp/plinth-agent/public/api.sock"       # the default
//! trust_bundle_path = "/etc/plinth/bundle.pem"            # or: insecure_bootstrap = true
//! log_level = "INFO"
//! # X509-SVIDs held in memory (SPIRE's key and default). Every authorized entry is always held;
//! # past this many SVIDs the least recently used that no open Workload API stream needs are
//! # dropped, and fetched again from a server when a workload asks. 0 means the default.
//! x509_svid_cache_max_size = 1000
//! # SVIDs fetched ahead of any request, while fewer are held (plinth's key; at most
//! # x509_svid_cache_max_size, which is also the default: a deployment with fewer entries than
//! # that has every SVID ready before any workload asks). 0: fetch only on request.
//! x509_svid_prefetch_count = 1000
//! # The admin socket (SPIRE's Debug API, `plinth-agent debug info`); off unless set. Must not
//! # be in the Workload API socket's directory or below it. Mode 0770.
//! admin_socket_path = "/tmp/plinth-agent/private/admin.sock"
//!
//! [node_attestor.join_token]
//! token = "..."                 # or `plinth-agent run -joinToken ...`
//! # [node_attestor.x509pop]
//! # certificate_path = "agent.crt.pem"   # leaf first, intermediates may follow
//! # private_key_path = "agent.key.pem"   # PKCS#8 PEM
//!
//! [workload_attestor.unix]
//! discover_workload_path = false
//! workload_size_limit = 0
//!
//! [workload_attestor.docker]                  # present: docker selectors are on
//! docker_socket_path = "/var/run/docker.sock" # the default; `unix://` prefix accepted
//!
//! [workload_attestor.systemd]                 # present: systemd selectors are on
//! # unit_search_path = ["/etc/systemd/system", ...]  # for fragment_path; systemd's order by default
//! ```
//!
//! Unknown keys are errors that name the key. [`Config::load`] parses and validates; the result
//! is what `run` uses and what `validate` checks.

use std::path::{Path, PathBuf};

use plinth_spiffe::TrustDomain;
use serde::Deserialize;

use crate::attest::docker::DockerAttestorConfig;
use crate::attest::systemd::SystemdAttestorConfig;
use crate::attest::unix::UnixAttestorConfig;
use crate::lru::{Budget, DEFAULT_X509_SVID_CACHE_MAX_SIZE};

/// Where the Workload API socket goes unless configured (like SPIRE's `/tmp/spire-agent/...`).
pub const DEFAULT_SOCKET_PATH: &str = "/tmp/plinth-agent/public/api.sock";
/// The size cap for `unix:sha256` when `workload_size_limit = 0`: plinth always caps hashing,
/// where SPIRE treats 0 as "no limit".
pub const DEFAULT_WORKLOAD_SIZE_LIMIT: u64 = 256 * 1024 * 1024;

/// Why a configuration was refused. Messages never include the join token.
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
    #[error("config: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.to_string(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    agent: AgentSection,
    #[serde(default)]
    node_attestor: NodeAttestorSection,
    #[serde(default)]
    workload_attestor: WorkloadAttestorSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentSection {
    trust_domain: String,
    server_addresses: Vec<String>,
    data_dir: PathBuf,
    #[serde(default)]
    socket_path: Option<PathBuf>,
    #[serde(default)]
    trust_bundle_path: Option<PathBuf>,
    #[serde(default)]
    insecure_bootstrap: bool,
    #[serde(default)]
    log_level: Option<String>,
    #[serde(default)]
    x509_svid_cache_max_size: Option<i64>,
    #[serde(default)]
    x509_svid_prefetch_count: Option<i64>,
    #[serde(default)]
    admin_socket_path: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeAttestorSection {
    join_token: Option<JoinTokenSection>,
    x509pop: Option<X509PopSection>,
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinTokenSection {
    #[serde(default)]
    token: Option<String>,
}

impl std::fmt::Debug for JoinTokenSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTokenSection").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct X509PopSection {
    certificate_path: PathBuf,
    private_key_path: PathBuf,
    #[serde(default)]
    intermediates_path: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadAttestorSection {
    unix: Option<UnixSection>,
    docker: Option<DockerSection>,
    systemd: Option<SystemdSection>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DockerSection {
    #[serde(default)]
    docker_socket_path: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SystemdSection {
    /// Unit file directories for `fragment_path`, highest priority first.
    #[serde(default)]
    unit_search_path: Option<Vec<PathBuf>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnixSection {
    #[serde(default)]
    discover_workload_path: bool,
    /// SPIRE's meaning for negative (never hash); 0 means plinth's default cap.
    #[serde(default)]
    workload_size_limit: i64,
}

/// A join token: a bearer secret, so `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(String);

impl JoinToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

/// How the agent proves its node's identity to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAttestor {
    /// A single-use join token. `None`: none given; fine while the data dir holds an agent SVID.
    JoinToken(Option<JoinToken>),
    /// Proof of possession of a key certified by a CA the server trusts.
    X509Pop {
        certificate_path: PathBuf,
        private_key_path: PathBuf,
        intermediates_path: Option<PathBuf>,
    },
}

/// How the agent learns which servers to trust before it has talked to one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// A PEM file of the trust domain's CA certificates.
    BundleFile(PathBuf),
    /// Trust the first server reached and take its bundle (demos only).
    Insecure,
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub trust_domain: TrustDomain,
    /// `host:port`, resolved at each connection attempt.
    pub server_addresses: Vec<String>,
    pub data_dir: PathBuf,
    pub socket_path: PathBuf,
    pub bootstrap: Bootstrap,
    pub node_attestor: NodeAttestor,
    pub unix: UnixAttestorConfig,
    /// The docker attestor, if `[workload_attestor.docker]` is present.
    pub docker: Option<DockerAttestorConfig>,
    /// The systemd attestor, if `[workload_attestor.systemd]` is present.
    pub systemd: Option<SystemdAttestorConfig>,
    /// A `tracing` level: trace, debug, info, warn or error.
    pub log_level: String,
    /// How many X509-SVIDs to hold and prefetch.
    pub svid_budget: Budget,
    /// Where to serve the admin (Debug) API; `None`: not served.
    pub admin_socket_path: Option<PathBuf>,
}

fn check_address(a: &str) -> Result<(), String> {
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| format!("{a:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{a:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(format!("{a:?} has no valid port")),
    }
}

fn log_level(s: &str) -> Result<String, ConfigError> {
    let l = s.to_ascii_lowercase();
    match l.as_str() {
        "trace" | "debug" | "info" | "warn" | "error" => Ok(l),
        _ => Err(invalid(
            "agent.log_level",
            format!("{s:?}: expected DEBUG, INFO, WARN or ERROR"),
        )),
    }
}

/// SPIRE's rule: the admin socket must not be in the directory holding the Workload API socket,
/// nor below it (a workload could reach it there).
fn check_admin_socket(admin: &Path, workload: &Path) -> Result<(), ConfigError> {
    const KEY: &str = "agent.admin_socket_path";
    if !admin.is_absolute() {
        return Err(invalid(KEY, "must be an absolute path"));
    }
    if admin.file_name().is_none() {
        return Err(invalid(KEY, "must name a socket file"));
    }
    if admin
        .components()
        .chain(workload.components())
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(invalid(
            KEY,
            "neither it nor socket_path may contain `..` (they are compared as written)",
        ));
    }
    let dir = workload.parent().unwrap_or(Path::new("/"));
    // Compare component by component (no filesystem access: the paths need not exist yet).
    if admin.parent().is_some_and(|p| p.starts_with(dir)) {
        return Err(invalid(
            KEY,
            format!(
                "admin socket cannot be in the same directory or a subdirectory as that \
                 containing the Workload API socket ({})",
                dir.display()
            ),
        ));
    }
    Ok(())
}

fn svid_budget(max_size: Option<i64>, prefetch: Option<i64>) -> Result<Budget, ConfigError> {
    let max_size = match max_size.unwrap_or(0) {
        n if n < 0 => {
            return Err(invalid(
                "agent.x509_svid_cache_max_size",
                format!("{n}: must not be negative (0 means the default, 1000)"),
            ))
        }
        0 => DEFAULT_X509_SVID_CACHE_MAX_SIZE,
        n => usize::try_from(n).map_err(|e| invalid("agent.x509_svid_cache_max_size", e))?,
    };
    let prefetch = match prefetch {
        None => max_size,
        Some(n) if n < 0 => {
            return Err(invalid(
                "agent.x509_svid_prefetch_count",
                format!("{n}: must not be negative"),
            ))
        }
        Some(n) => usize::try_from(n).map_err(|e| invalid("agent.x509_svid_prefetch_count", e))?,
    };
    if prefetch > max_size {
        return Err(invalid(
            "agent.x509_svid_prefetch_count",
            format!("{prefetch} is more than x509_svid_cache_max_size ({max_size})"),
        ));
    }
    Ok(Budget { max_size, prefetch })
}

impl Config {
    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.message().to_owned()))?;
        Self::validate(file)
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Applies `-joinToken`: it overrides the config's token (and selects join_token attestation
    /// when no node attestor is configured).
    pub fn with_join_token(mut self, token: Option<String>) -> Result<Self, ConfigError> {
        let Some(token) = token else {
            return Ok(self);
        };
        if matches!(self.node_attestor, NodeAttestor::X509Pop { .. }) {
            return Err(invalid(
                "-joinToken",
                "the config selects x509pop node attestation",
            ));
        }
        if token.is_empty() {
            return Err(invalid("-joinToken", "must not be empty"));
        }
        self.node_attestor = NodeAttestor::JoinToken(Some(JoinToken(token)));
        Ok(self)
    }

    fn validate(f: FileConfig) -> Result<Self, ConfigError> {
        let a = f.agent;
        let trust_domain =
            TrustDomain::new(&a.trust_domain).map_err(|e| invalid("agent.trust_domain", e))?;
        if a.server_addresses.is_empty() {
            return Err(invalid(
                "agent.server_addresses",
                "list at least one server as host:port",
            ));
        }
        for s in &a.server_addresses {
            check_address(s).map_err(|e| invalid("agent.server_addresses", e))?;
        }
        if a.data_dir.as_os_str().is_empty() {
            return Err(invalid("agent.data_dir", "must not be empty"));
        }
        let socket_path = a
            .socket_path
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH));
        if !socket_path.is_absolute() {
            return Err(invalid("agent.socket_path", "must be an absolute path"));
        }
        if let Some(admin) = &a.admin_socket_path {
            check_admin_socket(admin, &socket_path)?;
        }
        let svid_budget = svid_budget(a.x509_svid_cache_max_size, a.x509_svid_prefetch_count)?;
        let bootstrap = match (a.trust_bundle_path, a.insecure_bootstrap) {
            (Some(p), false) => Bootstrap::BundleFile(p),
            (None, true) => Bootstrap::Insecure,
            (Some(_), true) => {
                return Err(invalid(
                    "agent.insecure_bootstrap",
                    "set either trust_bundle_path or insecure_bootstrap, not both",
                ))
            }
            (None, false) => {
                return Err(invalid(
                    "agent.trust_bundle_path",
                    "required (or insecure_bootstrap = true for demos)",
                ))
            }
        };
        let node_attestor = match (f.node_attestor.join_token, f.node_attestor.x509pop) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "node_attestor",
                    "configure one of join_token and x509pop",
                ))
            }
            (Some(j), None) => NodeAttestor::JoinToken(match j.token {
                Some(t) if t.is_empty() => {
                    return Err(invalid("node_attestor.join_token.token", "is empty"))
                }
                t => t.map(JoinToken),
            }),
            (None, Some(x)) => NodeAttestor::X509Pop {
                certificate_path: x.certificate_path,
                private_key_path: x.private_key_path,
                intermediates_path: x.intermediates_path,
            },
            // Only `-joinToken` can make this usable; `with_join_token` does.
            (None, None) => NodeAttestor::JoinToken(None),
        };
        let u = f.workload_attestor.unix.unwrap_or_default();
        let unix = UnixAttestorConfig {
            discover_workload_path: u.discover_workload_path,
            sha256_size_limit: match (u.discover_workload_path, u.workload_size_limit) {
                (false, _) => None,
                (true, n) if n < 0 => None,
                (true, 0) => Some(DEFAULT_WORKLOAD_SIZE_LIMIT),
                (true, n) => Some(n.unsigned_abs()),
            },
            ..UnixAttestorConfig::default()
        };
        let docker = match f.workload_attestor.docker {
            None => None,
            Some(d) => {
                let mut c = DockerAttestorConfig::default();
                if let Some(p) = d.docker_socket_path {
                    let p = p.strip_prefix("unix://").unwrap_or(&p);
                    if !p.starts_with('/') {
                        return Err(invalid(
                            "workload_attestor.docker.docker_socket_path",
                            format!("{p:?} is not an absolute path to a Unix socket"),
                        ));
                    }
                    c.docker_socket_path = p.into();
                }
                Some(c)
            }
        };
        let systemd = match f.workload_attestor.systemd {
            None => None,
            Some(sd) => {
                let mut c = SystemdAttestorConfig::default();
                if let Some(dirs) = sd.unit_search_path {
                    if dirs.is_empty() || dirs.iter().any(|d| !d.is_absolute()) {
                        return Err(invalid(
                            "workload_attestor.systemd.unit_search_path",
                            "list absolute directories, highest priority first",
                        ));
                    }
                    c.unit_search_path = dirs;
                }
                Some(c)
            }
        };
        Ok(Self {
            trust_domain,
            server_addresses: a.server_addresses,
            data_dir: a.data_dir,
            socket_path,
            bootstrap,
            node_attestor,
            unix,
            docker,
            systemd,
            log_level: log_level(a.log_level.as_deref().unwrap_or("INFO"))?,
            svid_budget,
            admin_socket_path: a.admin_socket_path,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const MINIMAL: &str = r#"
[agent]
trust_domain = "example.org"
server_addresses = ["127.0.0.1:8081", "server-2.example.org:8081"]
data_dir = "/var/lib/plinth-agent"
trust_bundle_path = "/etc/plinth/bundle.pem"

[node_attestor.join_token]
token = "abc"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.trust_domain.name(), "example.org");
        assert_eq!(c.server_addresses.len(), 2);
        assert_eq!(c.socket_path, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert_eq!(
            c.bootstrap,
            Bootstrap::BundleFile("/etc/plinth/bundle.pem".into())
        );
        assert_eq!(
            c.node_attestor,
            NodeAttestor::JoinToken(Some(JoinToken::new("abc")))
        );
        assert_eq!(c.log_level, "info");
        assert_eq!(c.unix.sha256_size_limit, None);
        assert!(
            !format!("{c:?}").contains("abc"),
            "the token is never printed"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = MINIMAL.replace("[agent]\n", "[agent]\nserver_adress = \"x:1\"\n");
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(e.contains("server_adress"), "{e}");
        let text = format!("{MINIMAL}\n[workload_attestor.dockr]\n");
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(e.contains("dockr"), "{e}");
        let text = format!("{MINIMAL}\n[workload_attestor.docker]\nsocket = \"/x\"\n");
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(e.contains("socket"), "{e}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        for (from, to, key) in [
            ("\"example.org\"", "\"Example.org\"", "agent.trust_domain"),
            ("\"127.0.0.1:8081\", ", "\"nohost\", ", "agent.server_addresses"),
            (
                "trust_bundle_path = \"/etc/plinth/bundle.pem\"",
                "",
                "agent.trust_bundle_path",
            ),
            (
                "trust_bundle_path = \"/etc/plinth/bundle.pem\"",
                "trust_bundle_path = \"/b\"\ninsecure_bootstrap = true",
                "agent.insecure_bootstrap",
            ),
            ("token = \"abc\"", "token = \"\"", "node_attestor.join_token.token"),
            (
                "[node_attestor.join_token]",
                "[node_attestor.x509pop]\ncertificate_path = \"a\"\nprivate_key_path = \"b\"\n[node_attestor.join_token]",
                "node_attestor",
            ),
        ] {
            let text = MINIMAL.replace(from, to);
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        let text = MINIMAL.replace(
            "data_dir",
            "log_level = \"LOUD\"\nsocket_path = \"/s\"\ndata_dir",
        );
        assert!(Config::parse(&text)
            .unwrap_err()
            .to_string()
            .contains("agent.log_level"));
    }

    #[test]
    fn join_token_flag_overrides_the_config() {
        let c = Config::parse(MINIMAL)
            .unwrap()
            .with_join_token(Some("flag".into()))
            .unwrap();
        assert_eq!(
            c.node_attestor,
            NodeAttestor::JoinToken(Some(JoinToken::new("flag")))
        );
        let text = MINIMAL.replace("[node_attestor.join_token]\ntoken = \"abc\"\n", "");
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.node_attestor, NodeAttestor::JoinToken(None));
        let c = c.with_join_token(Some("t".into())).unwrap();
        assert_eq!(
            c.node_attestor,
            NodeAttestor::JoinToken(Some(JoinToken::new("t")))
        );
        let x = MINIMAL.replace(
            "[node_attestor.join_token]\ntoken = \"abc\"",
            "[node_attestor.x509pop]\ncertificate_path = \"a\"\nprivate_key_path = \"b\"",
        );
        assert!(Config::parse(&x)
            .unwrap()
            .with_join_token(Some("t".into()))
            .is_err());
    }

    #[test]
    fn unix_attestor_options() {
        let text = format!(
            "{MINIMAL}\n[workload_attestor.unix]\ndiscover_workload_path = true\nworkload_size_limit = 1024\n"
        );
        let c = Config::parse(&text).unwrap();
        assert!(c.unix.discover_workload_path);
        assert_eq!(c.unix.sha256_size_limit, Some(1024));
        let text = text.replace("1024", "-1");
        assert_eq!(Config::parse(&text).unwrap().unix.sha256_size_limit, None);
        let text = text.replace("-1", "0");
        assert_eq!(
            Config::parse(&text).unwrap().unix.sha256_size_limit,
            Some(DEFAULT_WORKLOAD_SIZE_LIMIT)
        );
    }

    #[test]
    fn docker_and_systemd_attestors() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.docker, None);
        assert_eq!(c.systemd, None);
        let c = Config::parse(&format!(
            "{MINIMAL}\n[workload_attestor.docker]\n[workload_attestor.systemd]\n"
        ))
        .unwrap();
        assert_eq!(
            c.docker.unwrap().docker_socket_path,
            PathBuf::from("/var/run/docker.sock")
        );
        assert_eq!(c.systemd, Some(SystemdAttestorConfig::default()));
        let c = Config::parse(&format!(
            "{MINIMAL}\n[workload_attestor.systemd]\nunit_search_path = [\"/a\", \"/b\"]\n"
        ))
        .unwrap();
        assert_eq!(
            c.systemd.unwrap().unit_search_path,
            [PathBuf::from("/a"), PathBuf::from("/b")]
        );
        let e = Config::parse(&format!(
            "{MINIMAL}\n[workload_attestor.systemd]\nunit_search_path = [\"rel\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("unit_search_path"), "{e}");
        for (value, want) in [
            ("/run/d.sock", "/run/d.sock"),
            ("unix:///var/run/other.sock", "/var/run/other.sock"),
        ] {
            let c = Config::parse(&format!(
                "{MINIMAL}\n[workload_attestor.docker]\ndocker_socket_path = \"{value}\"\n"
            ))
            .unwrap();
            assert_eq!(c.docker.unwrap().docker_socket_path, PathBuf::from(want));
        }
        let e = Config::parse(&format!(
            "{MINIMAL}\n[workload_attestor.docker]\ndocker_socket_path = \"tcp://h:2375\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("workload_attestor.docker.docker_socket_path"),
            "{e}"
        );
    }

    #[test]
    fn svid_cache_size_and_prefetch() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(
            c.svid_budget,
            Budget {
                max_size: 1000,
                prefetch: 1000
            }
        );
        let with = |lines: &str| MINIMAL.replace("[agent]\n", &format!("[agent]\n{lines}\n"));
        let c = Config::parse(&with("x509_svid_cache_max_size = 50")).unwrap();
        assert_eq!(
            c.svid_budget,
            Budget {
                max_size: 50,
                prefetch: 50
            },
            "prefetch follows the cache size"
        );
        let c = Config::parse(&with(
            "x509_svid_cache_max_size = 50\nx509_svid_prefetch_count = 0",
        ))
        .unwrap();
        assert_eq!(c.svid_budget.prefetch, 0);
        let c = Config::parse(&with("x509_svid_cache_max_size = 0")).unwrap();
        assert_eq!(c.svid_budget.max_size, 1000, "0 means SPIRE's default");
        for (lines, key) in [
            (
                "x509_svid_cache_max_size = -1",
                "agent.x509_svid_cache_max_size",
            ),
            (
                "x509_svid_prefetch_count = -1",
                "agent.x509_svid_prefetch_count",
            ),
            (
                "x509_svid_cache_max_size = 10\nx509_svid_prefetch_count = 11",
                "agent.x509_svid_prefetch_count",
            ),
        ] {
            let e = Config::parse(&with(lines)).unwrap_err().to_string();
            assert!(e.contains(key), "{lines}: {e}");
        }
    }

    #[test]
    fn admin_socket_must_not_be_beside_or_below_the_workload_socket() {
        let with = |lines: &str| MINIMAL.replace("[agent]\n", &format!("[agent]\n{lines}\n"));
        let c = Config::parse(&with(
            "socket_path = \"/run/plinth/public/api.sock\"\nadmin_socket_path = \"/run/plinth/private/admin.sock\"",
        ))
        .unwrap();
        assert_eq!(
            c.admin_socket_path,
            Some(PathBuf::from("/run/plinth/private/admin.sock"))
        );
        assert_eq!(Config::parse(MINIMAL).unwrap().admin_socket_path, None);
        for admin in [
            "/run/plinth/public/admin.sock",
            "/run/plinth/public/sub/admin.sock",
            "/run/plinth/public/./admin.sock",
        ] {
            let e = Config::parse(&with(&format!(
                "socket_path = \"/run/plinth/public/api.sock\"\nadmin_socket_path = \"{admin}\""
            )))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("agent.admin_socket_path")
                    && e.contains("cannot be in the same directory or a subdirectory"),
                "{admin}: {e}"
            );
        }
        // A sibling directory whose name merely starts the same is fine.
        Config::parse(&with(
            "socket_path = \"/run/plinth/public/api.sock\"\nadmin_socket_path = \"/run/plinth/public-admin/admin.sock\"",
        ))
        .unwrap();
        let e = Config::parse(&with(
            "socket_path = \"/run/plinth/public/api.sock\"\nadmin_socket_path = \"/run/plinth/x/../public/admin.sock\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains(".."), "{e}");
        let e = Config::parse(&with("admin_socket_path = \"admin.sock\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
    }
}
