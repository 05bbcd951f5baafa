//! The agent's data directory (0700): its SVID with the private key, and the last trust bundle
//! it received, so that a restarted agent reconnects without attesting again (a join token is
//! single-use) and trusts servers whose CA rotated while it was running.
//!
//! Files are written to a temporary name and renamed, so a crash leaves the old or the new
//! version, never half of one. The SVID and its key share one file (mode 0600), so they can
//! never disagree.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use plinth_spiffe::x509::{cert_not_after, cert_public_key_spki, spiffe_id_of};
use plinth_spiffe::{Bundle, PrivateKey, Signer, TrustDomain, X509Svid};

/// Mode of the data directory.
pub const DATA_DIR_MODE: u32 = 0o700;
/// Mode of files holding private keys.
pub const KEY_FILE_MODE: u32 = 0o600;

const AGENT_SVID_FILE: &str = "agent-svid.pem";
const BUNDLE_FILE: &str = "bundle.jwks";

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// The agent's SVID and its private key.
#[derive(Clone)]
pub struct AgentSvid {
    pub svid: X509Svid,
    pub key: Arc<PrivateKey>,
}

impl std::fmt::Debug for AgentSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSvid")
            .field("spiffe_id", &self.svid.spiffe_id)
            .field("not_after", &self.svid.not_after)
            .finish_non_exhaustive()
    }
}

impl AgentSvid {
    /// Checks that `chain` is an SVID whose leaf certifies `key`.
    pub fn new(chain: Vec<Vec<u8>>, key: Arc<PrivateKey>) -> Result<Self, String> {
        let leaf = chain.first().ok_or("empty certificate chain")?;
        let spiffe_id = spiffe_id_of(leaf).map_err(|e| e.to_string())?;
        let not_after = cert_not_after(leaf).map_err(|e| e.to_string())?;
        let spki = cert_public_key_spki(leaf).map_err(|e| e.to_string())?;
        if spki != key.public_key_spki() {
            return Err("the private key does not match the certificate".into());
        }
        Ok(Self {
            svid: X509Svid {
                spiffe_id,
                chain,
                not_after,
            },
            key,
        })
    }
}

/// The data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    path: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl DataDir {
    /// Creates the directory if needed and makes it 0700.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(io(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(DATA_DIR_MODE))
            .map_err(io(path))?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` atomically with `mode`.
    fn write(&self, name: &str, contents: &[u8], mode: u32) -> Result<(), StoreError> {
        let target = self.path.join(name);
        let tmp = self.path.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(contents).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &target).map_err(io(&target))?;
        // Make the rename durable too.
        if let Ok(d) = std::fs::File::open(&self.path) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn read(&self, name: &str) -> Result<Option<String>, StoreError> {
        let p = self.path.join(name);
        match std::fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p)(e)),
        }
    }

    /// The stored agent SVID, if any.
    pub fn load_agent_svid(&self) -> Result<Option<AgentSvid>, StoreError> {
        let path = self.path.join(AGENT_SVID_FILE);
        let Some(text) = self.read(AGENT_SVID_FILE)? else {
            return Ok(None);
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.clone(),
            reason,
        };
        let chain = plinth_spiffe::pem::parse_all(&text, "CERTIFICATE")
            .map_err(|e| corrupt(e.to_string()))?;
        let key = PrivateKey::from_pkcs8_pem(&text).map_err(|e| corrupt(e.to_string()))?;
        AgentSvid::new(chain, Arc::new(key))
            .map(Some)
            .map_err(corrupt)
    }

    /// Stores the agent SVID and its key (one 0600 file).
    pub fn save_agent_svid(&self, svid: &AgentSvid) -> Result<(), StoreError> {
        let mut text = svid.svid.chain_pem();
        text.push_str(&svid.key.to_pkcs8_pem());
        self.write(AGENT_SVID_FILE, text.as_bytes(), KEY_FILE_MODE)
    }

    /// Forgets the agent SVID (before attesting again).
    pub fn remove_agent_svid(&self) -> Result<(), StoreError> {
        let p = self.path.join(AGENT_SVID_FILE);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&p)(e)),
        }
    }

    /// The last stored bundle of `td`, if any.
    pub fn load_bundle(&self, td: &TrustDomain) -> Result<Option<Bundle>, StoreError> {
        let path = self.path.join(BUNDLE_FILE);
        let Some(text) = self.read(BUNDLE_FILE)? else {
            return Ok(None);
        };
        Bundle::from_jwks(td.clone(), text.as_bytes())
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path,
                reason: e.to_string(),
            })
    }

    /// Stores the trust bundle (a JWK Set).
    pub fn save_bundle(&self, bundle: &Bundle) -> Result<(), StoreError> {
        let path = self.path.join(BUNDLE_FILE);
        let doc = bundle.to_jwks().map_err(|e| StoreError::Corrupt {
            path,
            reason: e.to_string(),
        })?;
        self.write(BUNDLE_FILE, doc.as_bytes(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use plinth_spiffe::{CaTemplate, KeyType, SpiffeId, SvidRequest, X509Authority};
    use time::OffsetDateTime;

    use super::*;

    fn agent_svid() -> (AgentSvid, Bundle) {
        let td = TrustDomain::new("example.org").unwrap();
        let ca_key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        let tmpl = CaTemplate::new(
            td.clone(),
            OffsetDateTime::now_utc(),
            Duration::from_secs(60),
        );
        let der = plinth_spiffe::x509::self_signed_ca(&tmpl, ca_key.clone()).unwrap();
        let ca = X509Authority::new(der.clone(), vec![], ca_key).unwrap();
        let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        let svid = ca
            .sign_svid(
                &SvidRequest {
                    spiffe_id: &SpiffeId::new("spiffe://example.org/spire/agent/x").unwrap(),
                    public_key_spki: key.public_key_spki(),
                    ttl: Duration::from_secs(30),
                    dns_names: &[],
                },
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        let mut bundle = Bundle::new(td);
        bundle.add_x509_authority(der).unwrap();
        (AgentSvid::new(svid.chain, key).unwrap(), bundle)
    }

    #[test]
    fn svid_and_bundle_round_trip_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(&tmp.path().join("data")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.path()), 0o700);
        assert!(dir.load_agent_svid().unwrap().is_none());
        let (svid, bundle) = agent_svid();
        dir.save_agent_svid(&svid).unwrap();
        assert_eq!(mode(&dir.path().join(AGENT_SVID_FILE)), 0o600);
        let back = dir.load_agent_svid().unwrap().unwrap();
        assert_eq!(back.svid, svid.svid);
        assert_eq!(back.key.public_key_spki(), svid.key.public_key_spki());
        dir.save_bundle(&bundle).unwrap();
        let b = dir.load_bundle(bundle.trust_domain()).unwrap().unwrap();
        assert!(b.same_authorities(&bundle));
        dir.remove_agent_svid().unwrap();
        assert!(dir.load_agent_svid().unwrap().is_none());
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        let (svid, _) = agent_svid();
        let other = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        assert!(AgentSvid::new(svid.svid.chain.clone(), other.clone()).is_err());
        let mut text = svid.svid.chain_pem();
        text.push_str(&other.to_pkcs8_pem());
        std::fs::write(dir.path().join(AGENT_SVID_FILE), text).unwrap();
        assert!(matches!(
            dir.load_agent_svid(),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
