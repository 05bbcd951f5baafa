//! The identity servers present to each other on the Raft peer API (mTLS).
//!
//! Every server authenticates peers by their X509-SVID: the leaf must name the servers' SPIFFE ID
//! (`spiffe://<td>/spire/server`) and chain to the trust domain's bundle. A server's peer SVID is
//! its regular server SVID (see [`crate::tls::TlsIdentity`]), issued by its own CA and rotated at
//! half-life, and kept in `<data_dir>/peer/svid.pem` (0600, chain and key) so that a restarted
//! cluster can elect a leader before any CA is loaded (loading a CA needs a leader).
//!
//! A server joining a cluster has neither a CA nor the bundle yet. It starts from a join kit made
//! on a member with `plinth-server x509 mint -spiffeID spiffe://<td>/spire/server -write DIR`:
//! `[cluster] bootstrap_svid_path`, `bootstrap_key_path` and `trust_bundle_path` point at the
//! kit's `svid.pem`, `key.pem` and `bundle.pem`. Once it is a member, its own CA issues its next
//! SVID and the replicated bundle replaces the bootstrap one.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use plinth_raft::PeerTls;
use plinth_spiffe::tls::{self, Authorizer, BundleSource, ClientAuth, SvidSource};
use plinth_spiffe::{Bundle, BundleSet, PrivateKey, Signer, SpiffeId, TrustDomain, X509Svid};
use time::OffsetDateTime;

use crate::tls::TlsIdentity;

/// The file (under the data dir) holding the current peer SVID chain and its key.
pub const PEER_SVID_FILE: &str = "peer/svid.pem";

/// An SVID and its key, checked to belong together.
#[derive(Debug, Clone)]
pub struct PeerSvid {
    pub svid: X509Svid,
    pub key: Arc<PrivateKey>,
}

impl PeerSvid {
    /// Checks that `chain` is an SVID for `expected` whose leaf certifies `key`.
    pub fn new(
        chain: Vec<Vec<u8>>,
        key: Arc<PrivateKey>,
        expected: &SpiffeId,
    ) -> anyhow::Result<Self> {
        let svid = X509Svid::from_chain_for_key(chain, key.public_key_spki())
            .map_err(|e| anyhow!("{e}"))?;
        if &svid.spiffe_id != expected {
            bail!(
                "the SVID is for {}; servers must present {expected}",
                svid.spiffe_id
            );
        }
        Ok(Self { svid, key })
    }

    /// Reads a chain (`CERTIFICATE` blocks) from `svid_path` and a PKCS#8 key from `key_path`
    /// (they may be the same file).
    pub fn load(svid_path: &Path, key_path: &Path, expected: &SpiffeId) -> anyhow::Result<Self> {
        let svid_text = std::fs::read_to_string(svid_path)
            .with_context(|| format!("reading {}", svid_path.display()))?;
        let chain = plinth_spiffe::pem::parse_all(&svid_text, "CERTIFICATE")
            .with_context(|| format!("{}", svid_path.display()))?;
        let key_text = if key_path == svid_path {
            svid_text
        } else {
            std::fs::read_to_string(key_path)
                .with_context(|| format!("reading {}", key_path.display()))?
        };
        let key = PrivateKey::from_pkcs8_pem(&key_text)
            .map_err(|e| anyhow!("{}: {e}", key_path.display()))?;
        Self::new(chain, Arc::new(key), expected)
            .with_context(|| format!("{}", svid_path.display()))
    }

    /// Writes chain and key to `path` (0600), replacing it atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent directory", path.display()))?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting permissions of {}", dir.display()))?;
        let mut text = self.svid.chain_pem();
        text.push_str(&self.key.to_pkcs8_pem());
        let tmp = path.with_extension("pem.tmp");
        let mut f = plinth_storage::create_private_file(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// Where a server's peer identity comes from.
#[derive(Debug, Clone)]
pub struct PeerIdentityConfig {
    pub trust_domain: TrustDomain,
    /// `<data_dir>/peer/svid.pem`.
    pub persisted: PathBuf,
    /// A join kit's SVID and key (`[cluster] bootstrap_svid_path`, `bootstrap_key_path`).
    pub bootstrap: Option<(PathBuf, PathBuf)>,
    /// A join kit's bundle (`[cluster] trust_bundle_path`).
    pub trust_bundle: Option<PathBuf>,
}

/// What [`restore`] loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// The SVID saved by an earlier run.
    Persisted,
    /// The join kit's SVID.
    Bootstrap,
    /// No usable SVID: fine for a server that bootstraps a new cluster alone; peers will refuse
    /// any other. The reason says why.
    Nothing(String),
}

/// Loads the best usable peer SVID into `identity` (the saved one, else the join kit's) and the
/// join kit's bundle, if configured. A configured file that cannot be read is an error.
pub fn restore(
    identity: &TlsIdentity,
    cfg: &PeerIdentityConfig,
    now: OffsetDateTime,
) -> anyhow::Result<Restored> {
    let expected = crate::authz::server_id(&cfg.trust_domain);
    let mut why = Vec::new();
    // A kit that is not there (yet) is not an error by itself: the first server never has one,
    // and a joining server is refused below with instructions if it has nothing else.
    if let Some(path) = cfg.trust_bundle.as_ref().filter(|p| !p.exists()) {
        why.push(format!(
            "trust_bundle_path {} does not exist",
            path.display()
        ));
    }
    if let Some(path) = cfg.trust_bundle.as_ref().filter(|p| p.exists()) {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading trust_bundle_path {}", path.display()))?;
        let certs = plinth_spiffe::pem::parse_all(&text, "CERTIFICATE")
            .with_context(|| format!("trust_bundle_path {}", path.display()))?;
        let mut bundle = Bundle::new(cfg.trust_domain.clone());
        for c in certs {
            bundle
                .add_x509_authority(c)
                .map_err(|e| anyhow!("trust_bundle_path {}: {e}", path.display()))?;
        }
        let mut set = BundleSet::new();
        set.insert(bundle);
        identity.bundles.set(set);
    }
    if cfg.persisted.exists() {
        match PeerSvid::load(&cfg.persisted, &cfg.persisted, &expected) {
            Ok(p) if p.svid.not_after > now => {
                identity.install_peer_svid(&p)?;
                return Ok(Restored::Persisted);
            }
            Ok(p) => why.push(format!(
                "the saved peer SVID expired at {}",
                p.svid.not_after
            )),
            Err(e) => why.push(format!("the saved peer SVID is unusable: {e:#}")),
        }
    }
    if let Some((svid, _)) = cfg.bootstrap.as_ref().filter(|(svid, _)| !svid.exists()) {
        why.push(format!(
            "bootstrap_svid_path {} does not exist",
            svid.display()
        ));
    } else if let Some((svid, key)) = &cfg.bootstrap {
        let p = PeerSvid::load(svid, key, &expected).context("bootstrap_svid_path")?;
        if p.svid.not_after <= now {
            bail!(
                "bootstrap_svid_path {}: the SVID expired at {}; mint a new one with \
                 `plinth-server x509 mint -spiffeID {expected} -write DIR` on a cluster member",
                svid.display(),
                p.svid.not_after
            );
        }
        identity.install_peer_svid(&p)?;
        return Ok(Restored::Bootstrap);
    }
    if cfg.bootstrap.is_none() && !cfg.persisted.exists() {
        why.push("no peer SVID was saved and no bootstrap_svid_path is set".into());
    }
    Ok(Restored::Nothing(why.join("; ")))
}

/// The rustls configurations of the peer API: present `identity`'s SVID, accept only peers
/// presenting the servers' SPIFFE ID under `identity`'s bundle.
pub fn peer_tls(identity: &TlsIdentity, td: &TrustDomain) -> anyhow::Result<PeerTls> {
    let server_id = crate::authz::server_id(td);
    let svid: Arc<dyn SvidSource> = identity.svid.clone();
    let bundles: Arc<dyn BundleSource> = identity.bundles.clone();
    let server = tls::server_config(
        svid.clone(),
        bundles.clone(),
        Authorizer::exact(server_id.clone()),
        ClientAuth::Required,
    )
    .map_err(|e| anyhow!("peer TLS: {e}"))?;
    let client = tls::client_config(Some(svid), bundles, Authorizer::exact(server_id))
        .map_err(|e| anyhow!("peer TLS: {e}"))?;
    Ok(PeerTls {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use plinth_spiffe::x509::{self_signed_ca, CaTemplate, SvidRequest, X509Authority};
    use plinth_spiffe::KeyType;
    use std::time::Duration;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn issue(id: &str) -> PeerSvid {
        let ca_key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        let t = CaTemplate::new(td(), OffsetDateTime::now_utc(), Duration::from_secs(7200));
        let ca = X509Authority::new(self_signed_ca(&t, ca_key.clone()).unwrap(), vec![], ca_key)
            .unwrap();
        let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        let svid = ca
            .sign_svid(
                &SvidRequest {
                    spiffe_id: &SpiffeId::new(id).unwrap(),
                    public_key_spki: key.public_key_spki(),
                    ttl: Duration::from_secs(3600),
                    dns_names: &[],
                },
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        PeerSvid { svid, key }
    }

    fn cfg(dir: &Path) -> PeerIdentityConfig {
        PeerIdentityConfig {
            trust_domain: td(),
            persisted: dir.join(PEER_SVID_FILE),
            bootstrap: None,
            trust_bundle: None,
        }
    }

    #[test]
    fn saved_svid_is_restored_private_and_refused_once_expired() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let now = OffsetDateTime::now_utc();
        assert!(matches!(
            restore(&TlsIdentity::new(), &c, now).unwrap(),
            Restored::Nothing(_)
        ));
        let p = issue("spiffe://example.org/spire/server");
        p.save(&c.persisted).unwrap();
        let mode = std::fs::metadata(&c.persisted)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let id = TlsIdentity::new();
        assert_eq!(restore(&id, &c, now).unwrap(), Restored::Persisted);
        assert_eq!(
            id.svid.spiffe_id().unwrap().as_str(),
            "spiffe://example.org/spire/server"
        );
        let later = now + time::Duration::hours(2);
        match restore(&TlsIdentity::new(), &c, later).unwrap() {
            Restored::Nothing(why) => assert!(why.contains("expired"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_kit_must_name_the_servers_id_and_match_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let server = SpiffeId::new("spiffe://example.org/spire/server").unwrap();
        let other = issue("spiffe://example.org/web");
        let path = dir.path().join("other.pem");
        other.save(&path).unwrap();
        let e = PeerSvid::load(&path, &path, &server).unwrap_err();
        assert!(format!("{e:#}").contains("servers must present"), "{e:#}");
        // The chain of one SVID with the key of another.
        let a = issue("spiffe://example.org/spire/server");
        let b = issue("spiffe://example.org/spire/server");
        std::fs::write(dir.path().join("a.pem"), a.svid.chain_pem()).unwrap();
        std::fs::write(dir.path().join("b.key"), b.key.to_pkcs8_pem()).unwrap();
        let e = PeerSvid::load(
            &dir.path().join("a.pem"),
            &dir.path().join("b.key"),
            &server,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("does not match"), "{e:#}");
    }
}
