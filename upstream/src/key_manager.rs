//! Key managers: where a server's CA and JWT signing keys live. Private keys never leave the key
//! manager except as a [`Signer`] handle; they are never replicated.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use plinth_spiffe::{KeyError, KeyType, PrivateKey, Signer};

/// Why a key manager operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyManagerError {
    #[error("key ID {0:?} is invalid: use 1-64 letters, digits, '-', '_' or '.' (not starting with '.')")]
    BadKeyId(String),
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error("key {id:?} in {path} is unreadable: {reason}")]
    Corrupt {
        id: String,
        path: PathBuf,
        reason: String,
    },
    #[error("key store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// A key and its ID.
pub type NamedKey = (String, Arc<dyn Signer>);

/// A place that holds private keys by ID and signs with them.
///
/// Semantics shared by every implementation (checked by [`crate::conformance`]):
/// `generate_key` replaces any key with the same ID; `get_key` of an unknown ID is `Ok(None)`;
/// keys survive a restart where the implementation is persistent.
pub trait KeyManager: Send + Sync + fmt::Debug {
    /// A short name for logs and configuration (`memory`, `disk`, `pkcs11`).
    fn name(&self) -> &'static str;
    /// Generates a new key under `id`, replacing any existing one.
    fn generate_key(&self, id: &str, key_type: KeyType)
        -> Result<Arc<dyn Signer>, KeyManagerError>;
    /// The key under `id`, if any.
    fn get_key(&self, id: &str) -> Result<Option<Arc<dyn Signer>>, KeyManagerError>;
    /// Every key, ordered by ID.
    fn get_keys(&self) -> Result<Vec<NamedKey>, KeyManagerError>;
}

/// Checks a key ID: it becomes a file name on disk and an object label in an HSM.
pub fn validate_key_id(id: &str) -> Result<(), KeyManagerError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(KeyManagerError::BadKeyId(id.to_owned()))
    }
}

/// Makes a private key of any supported type. EC keys come from `ring`; RSA keys, which `ring`
/// cannot generate, from the `rsa` crate, and are then loaded into `ring` for signing.
pub fn generate_private_key(key_type: KeyType) -> Result<PrivateKey, KeyManagerError> {
    match key_type {
        KeyType::EcP256 | KeyType::EcP384 => Ok(PrivateKey::generate(key_type)?),
        KeyType::Rsa2048 | KeyType::Rsa4096 => {
            use rsa::pkcs8::EncodePrivateKey;
            let bits = if key_type == KeyType::Rsa2048 {
                2048
            } else {
                4096
            };
            let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, bits)
                .map_err(|e| KeyManagerError::Generate(e.to_string()))?;
            let der = key
                .to_pkcs8_der()
                .map_err(|e| KeyManagerError::Generate(e.to_string()))?;
            Ok(PrivateKey::from_pkcs8_der(der.as_bytes())?)
        }
    }
}

/// Keys in process memory only: lost on restart (SPIRE's `memory` key manager).
#[derive(Debug, Default)]
pub struct MemoryKeyManager {
    keys: Mutex<BTreeMap<String, Arc<PrivateKey>>>,
}

impl MemoryKeyManager {
    /// An empty key manager.
    pub fn new() -> Self {
        Self::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a map of Arcs half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type KeyMap = Mutex<BTreeMap<String, Arc<PrivateKey>>>;

fn lookup(keys: &KeyMap, id: &str) -> Result<Option<Arc<dyn Signer>>, KeyManagerError> {
    validate_key_id(id)?;
    Ok(lock(keys).get(id).map(|k| k.clone() as Arc<dyn Signer>))
}

fn list(keys: &KeyMap) -> Vec<NamedKey> {
    lock(keys)
        .iter()
        .map(|(id, k)| (id.clone(), k.clone() as Arc<dyn Signer>))
        .collect()
}

impl KeyManager for MemoryKeyManager {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn generate_key(
        &self,
        id: &str,
        key_type: KeyType,
    ) -> Result<Arc<dyn Signer>, KeyManagerError> {
        validate_key_id(id)?;
        let key = Arc::new(generate_private_key(key_type)?);
        lock(&self.keys).insert(id.to_owned(), key.clone());
        Ok(key)
    }

    fn get_key(&self, id: &str) -> Result<Option<Arc<dyn Signer>>, KeyManagerError> {
        lookup(&self.keys, id)
    }

    fn get_keys(&self) -> Result<Vec<NamedKey>, KeyManagerError> {
        Ok(list(&self.keys))
    }
}

/// Keys as PKCS#8 PEM files in a directory (SPIRE's `disk` key manager): the directory is 0700,
/// each key file 0600, written to a temporary file, synced and renamed so that a crash leaves
/// either the old key or the new one.
#[derive(Debug)]
pub struct DiskKeyManager {
    dir: PathBuf,
    cache: Mutex<BTreeMap<String, Arc<PrivateKey>>>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyManagerError + '_ {
    move |source| KeyManagerError::Io {
        path: path.to_owned(),
        source,
    }
}

impl DiskKeyManager {
    /// Opens (creating if needed) the key directory and loads every key in it.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, KeyManagerError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // Tighten an existing directory too: keys must never sit in a readable one.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
        let km = Self {
            dir,
            cache: Mutex::new(BTreeMap::new()),
        };
        let mut loaded = BTreeMap::new();
        for entry in fs::read_dir(&km.dir).map_err(io_err(&km.dir))? {
            let entry = entry.map_err(io_err(&km.dir))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".key.pem")) else {
                continue;
            };
            if validate_key_id(id).is_err() {
                continue;
            }
            loaded.insert(id.to_owned(), Arc::new(km.load(id)?));
        }
        *lock(&km.cache) = loaded;
        Ok(km)
    }

    fn path_of(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.key.pem"))
    }

    fn load(&self, id: &str) -> Result<PrivateKey, KeyManagerError> {
        let path = self.path_of(id);
        let meta = fs::metadata(&path).map_err(io_err(&path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io_err(&path))?;
            tracing::warn!(
                key_id = id,
                "key file was readable by others; permissions set to 0600"
            );
        }
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        PrivateKey::from_pkcs8_pem(&text).map_err(|e| KeyManagerError::Corrupt {
            id: id.to_owned(),
            path: path.clone(),
            reason: e.to_string(),
        })
    }

    fn store(&self, id: &str, key: &PrivateKey) -> Result<(), KeyManagerError> {
        let path = self.path_of(id);
        let tmp = self.dir.join(format!(".{id}.key.pem.tmp"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(key.to_pkcs8_pem().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        Ok(())
    }
}

impl KeyManager for DiskKeyManager {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn generate_key(
        &self,
        id: &str,
        key_type: KeyType,
    ) -> Result<Arc<dyn Signer>, KeyManagerError> {
        validate_key_id(id)?;
        let key = Arc::new(generate_private_key(key_type)?);
        self.store(id, &key)?;
        lock(&self.cache).insert(id.to_owned(), key.clone());
        Ok(key)
    }

    fn get_key(&self, id: &str) -> Result<Option<Arc<dyn Signer>>, KeyManagerError> {
        lookup(&self.cache, id)
    }

    fn get_keys(&self) -> Result<Vec<NamedKey>, KeyManagerError> {
        Ok(list(&self.cache))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids() {
        for ok in ["x509-CA-A", "JWT-Signer-B", "a.b_c"] {
            assert!(validate_key_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../x", "a/b", ".hidden", "sp ace", &"a".repeat(65)] {
            assert!(validate_key_id(bad).is_err(), "{bad}");
        }
    }
}
