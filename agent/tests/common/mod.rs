//! A real Workload API on a temp-dir Unix socket, filled with SVIDs minted by a local CA.
#![allow(dead_code, clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use plinth_agent::attest::unix::UnixAttestor;
use plinth_agent::attest::WorkloadAttestor;
use plinth_agent::cache::{Entry, Identity, IdentityCache};
use plinth_agent::client::{channel, connect, WorkloadClient};
use plinth_agent::endpoint;
use plinth_agent::jwt::{JwtSvidCache, LocalJwtSource, SystemClock};
use plinth_agent::workload_api::WorkloadApi;
use plinth_api::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use plinth_spiffe::{
    Bundle, CaTemplate, JwtAuthority, KeyType, PrivateKey, Selectors, Signer, SpiffeId,
    SvidRequest, TrustDomain, X509Authority,
};
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TD: &str = "example.org";
pub const FED_TD: &str = "partner.test";
pub const JWT_KID: &str = "jwt-key-1";
pub const FED_JWT_KID: &str = "partner-jwt-1";

/// A trust domain's authorities: an X.509 CA and a JWT signing key.
pub struct Domain {
    pub ca: X509Authority,
    pub jwt_key: Arc<PrivateKey>,
    pub bundle: Bundle,
}

impl Domain {
    pub fn new(td: &str, kid: &str) -> Self {
        let td = TrustDomain::new(td).unwrap();
        let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        let tmpl = CaTemplate::new(td.clone(), now(), Duration::from_secs(86400));
        let der = plinth_spiffe::x509::self_signed_ca(&tmpl, key.clone()).unwrap();
        let ca = X509Authority::new(der.clone(), vec![], key).unwrap();
        let jwt_key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        let mut bundle = Bundle::new(td);
        bundle.add_x509_authority(der).unwrap();
        bundle
            .add_jwt_authority(JwtAuthority {
                key_id: kid.into(),
                public_key_spki: jwt_key.public_key_spki().to_vec(),
            })
            .unwrap();
        bundle.set_sequence_number(1);
        Self {
            ca,
            jwt_key,
            bundle,
        }
    }

    /// A fresh key and an SVID for `spiffe_id`.
    pub fn svid(&self, spiffe_id: &SpiffeId) -> (plinth_spiffe::X509Svid, Arc<PrivateKey>) {
        let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        let svid = self
            .ca
            .sign_svid(
                &SvidRequest {
                    spiffe_id,
                    public_key_spki: key.public_key_spki(),
                    ttl: Duration::from_secs(3600),
                    dns_names: &[],
                },
                now(),
            )
            .unwrap();
        (svid, key)
    }
}

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

pub fn entry(entry_id: &str, spiffe_id: &str, selectors: &[&str]) -> Entry {
    Entry {
        id: entry_id.into(),
        spiffe_id: id(spiffe_id),
        selectors: Selectors::parse_all(selectors).unwrap(),
        federates_with: vec![],
        hint: String::new(),
    }
}

/// The effective UID of this test process (from /proc, no libc needed).
pub fn my_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// A selector every call from this test process matches.
pub fn my_selector() -> String {
    format!("unix:uid:{}", my_uid())
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub cache: Arc<IdentityCache>,
    pub jwt: Arc<JwtSvidCache>,
    pub domain: Domain,
    pub partner: Domain,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(vec![Arc::new(UnixAttestor::default())]).await
    }

    pub async fn start_with(attestors: Vec<Arc<dyn WorkloadAttestor>>) -> Self {
        Self::start_configured(attestors, None).await
    }

    /// A harness whose FetchX509SVID waits at most `svid_wait` for SVIDs the cache lacks.
    pub async fn start_with_svid_wait(svid_wait: Duration) -> Self {
        Self::start_configured(vec![Arc::new(UnixAttestor::default())], Some(svid_wait)).await
    }

    async fn start_configured(
        attestors: Vec<Arc<dyn WorkloadAttestor>>,
        svid_wait: Option<Duration>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Let processes of other users reach the socket directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("public").join("api.sock");
        let domain = Domain::new(TD, JWT_KID);
        let partner = Domain::new(FED_TD, FED_JWT_KID);
        let cache = Arc::new(IdentityCache::new(domain.bundle.clone()));
        cache.set_federated_bundle(partner.bundle.clone()).unwrap();
        let clock = Arc::new(SystemClock);
        let source = Arc::new(LocalJwtSource::new(
            domain.jwt_key.clone(),
            JWT_KID,
            Duration::from_secs(300),
            clock.clone(),
        ));
        let jwt = Arc::new(JwtSvidCache::new(source, clock.clone()));
        let mut api = WorkloadApi::new(cache.clone(), jwt.clone(), attestors, clock);
        if let Some(wait) = svid_wait {
            api = api.with_svid_wait(wait);
        }
        let listener = endpoint::bind(&socket).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            endpoint::serve(listener, api, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self {
            dir,
            socket,
            cache,
            jwt,
            domain,
            partner,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Puts an entry with a freshly minted SVID into the cache.
    pub fn add(&self, entry: Entry) -> Identity {
        let (svid, private_key) = self.domain.svid(&entry.spiffe_id);
        let identity = Identity {
            entry,
            svid,
            private_key,
        };
        self.cache.put_identity(identity.clone()).unwrap();
        identity
    }

    /// A client that sends the security header.
    pub fn client(&self) -> WorkloadClient {
        connect(&self.socket).unwrap()
    }

    /// A client that sends no security header.
    pub fn bare_client(&self) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
        SpiffeWorkloadApiClient::new(channel(&self.socket).unwrap())
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

/// Waits for the next stream message; a hang guard, not a timing assertion.
pub async fn next<T>(stream: &mut tonic::Streaming<T>) -> Result<Option<T>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("the Workload API stream went silent")
}
