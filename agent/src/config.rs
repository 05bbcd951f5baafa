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
}
