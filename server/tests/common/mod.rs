//! Scaffolding shared by the server's integration tests and its benchmark (`#[path]`-included
//! there): an in-process server in a temporary directory, and an mTLS channel to its TLS API.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use plinth_server::config::Config;
use plinth_server::run::{start, RunningServer};
use plinth_spiffe::tls::{client_config, Authorizer, BundleHolder, SvidHolder, SvidSource};
use plinth_spiffe::{Bundle, BundleSet, PrivateKey, SpiffeId, X509Svid};

/// The node attestor most tests use.
pub const JOIN_TOKEN: &str = "[node_attestor.join_token]\n";

/// A server config for node `node` of trust domain `example.org` under `dir` (node 1 in
/// `data/`, `admin/`, `keys/`; node N in `dataN/`...), API and Raft on free loopback ports,
/// short election timeouts, disk keys, Raft over plain TCP (multi-node in-process tests have no
/// join kits; the mTLS peer API is tested in raft/tests/peer_tls.rs and t60_processes.rs), and
/// `sections` appended (node attestors, upstream authority, health checks...).
pub fn config_text(dir: &Path, node: u64, bootstrap: bool, sections: &str) -> String {
    let n = if node == 1 {
        String::new()
    } else {
        node.to_string()
    };
    format!(
        r#"
[server]
trust_domain = "example.org"
data_dir = "{d}/data{n}"
socket_path = "{d}/admin{n}/api.sock"
bind_address = "127.0.0.1"
bind_port = 0
log_level = "WARN"

[cluster]
node_id = {node}
bind_address = "127.0.0.1:0"
bootstrap = {bootstrap}
insecure_plaintext = true
election_timeout_min_ms = 150
election_timeout_max_ms = 300
heartbeat_interval_ms = 50

[key_manager]
type = "disk"
keys_path = "{d}/keys{n}"

{sections}
"#,
        d = dir.display()
    )
}

/// [`config_text`], parsed.
pub fn config(dir: &Path, node: u64, bootstrap: bool, sections: &str) -> Config {
    Config::parse(&config_text(dir, node, bootstrap, sections), false).unwrap()
}

/// A single-node server and the directory it lives in (dropped after it).
pub struct Harness {
    pub server: RunningServer,
    pub dir: tempfile::TempDir,
}

/// Starts a single-node server with `sections` (see [`config_text`]).
pub async fn single(sections: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path(), 1, true, sections)).await.unwrap();
    Harness { server, dir }
}

/// A gRPC channel over mTLS to the TLS API at `addr`: checks the server against `bundle` and
/// `server`, presents `svid` if given.
pub async fn tls_channel(
    addr: std::net::SocketAddr,
    bundle: Bundle,
    svid: Option<(X509Svid, Arc<PrivateKey>)>,
    server: SpiffeId,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let mut set = BundleSet::new();
    set.insert(bundle);
    let bundles = Arc::new(BundleHolder::new(set));
    let source: Option<Arc<dyn SvidSource>> =
        svid.map(|(s, k)| Arc::new(SvidHolder::new(&s, k).unwrap()) as Arc<dyn SvidSource>);
    let cfg = Arc::new(client_config(source, bundles, Authorizer::exact(server)).unwrap());
    tonic::transport::Endpoint::try_from("http://plinth-server")?
        .connect_with_connector(tower::service_fn(move |_| {
            let cfg = cfg.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from("plinth-server").unwrap();
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
}
