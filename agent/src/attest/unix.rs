//! The `unix` workload attestor: UID, GID and their names, supplementary groups, and (opt-in)
//! the path and SHA-256 of the caller's executable.
//!
//! User and group names come from `/etc/passwd` and `/etc/group` as the agent sees them, parsed
//! here (no libc NSS). UID and GID are the effective ones SO_PEERCRED recorded at `connect()`.

use std::io::Read;
use std::path::PathBuf;

use plinth_spiffe::{Selector, Selectors};
use sha2::{Digest, Sha256};

use super::{AttestError, Peer, WorkloadAttestor};

/// Settings of the unix attestor.
#[derive(Debug, Clone)]
pub struct UnixAttestorConfig {
    /// Emit `unix:path:<executable path>`.
    pub discover_workload_path: bool,
    /// Emit `unix:sha256:<hex>` of the executable, refusing executables larger than this many
    /// bytes (hashing is work a workload could make expensive). `None`: no sha256 selector.
    pub sha256_size_limit: Option<u64>,
    pub passwd_path: PathBuf,
    pub group_path: PathBuf,
}

impl Default for UnixAttestorConfig {
    fn default() -> Self {
        Self {
            discover_workload_path: false,
            sha256_size_limit: None,
            passwd_path: "/etc/passwd".into(),
            group_path: "/etc/group".into(),
        }
    }
}

/// The unix workload attestor.
#[derive(Debug, Clone, Default)]
pub struct UnixAttestor {
    config: UnixAttestorConfig,
}

/// The name of `id` in an `/etc/passwd` or `/etc/group` style file (`name:x:id:...`): the first
/// line naming it, as libc does.
pub fn name_for_id(db: &str, id: u32) -> Option<String> {
    db.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let mut f = l.split(':');
        let (name, _, num) = (f.next()?, f.next()?, f.next()?);
        (num.trim().parse::<u32>().ok()? == id && !name.is_empty()).then(|| name.to_owned())
    })
}

/// The `Groups:` line of `/proc/<pid>/status`: supplementary GIDs.
pub fn supplementary_gids(status: &str) -> Result<Vec<u32>, AttestError> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .ok_or_else(|| AttestError::Invalid("no Groups line in /proc/<pid>/status".into()))?;
    line.split_whitespace()
        .map(|g| {
            g.parse()
                .map_err(|_| AttestError::Invalid(format!("bad supplementary gid {g:?}")))
        })
        .collect()
}

fn selector(value: String) -> Result<Selector, AttestError> {
    Selector::new("unix", &value).map_err(|e| AttestError::Invalid(format!("selector: {e}")))
}

impl UnixAttestor {
    pub fn new(config: UnixAttestorConfig) -> Self {
        Self { config }
    }

    fn read_db(path: &PathBuf) -> Result<String, AttestError> {
        // A missing database only means no names; any other failure is an error.
        match std::fs::read_to_string(path) {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(AttestError::Read {
                what: path.display().to_string(),
                reason: e.to_string(),
            }),
        }
    }

    fn hash_executable(peer: &Peer, limit: u64) -> Result<String, AttestError> {
        let file = peer.open("exe")?;
        let mut hasher = Sha256::new();
        let mut reader = file.take(limit + 1);
        let mut buf = vec![0u8; 64 * 1024];
        let mut total: u64 = 0;
        loop {
            let n = reader.read(&mut buf).map_err(|e| AttestError::Read {
                what: "executable".into(),
                reason: e.to_string(),
            })?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > limit {
                return Err(AttestError::Invalid(format!(
                    "executable is larger than the sha256 size limit of {limit} bytes"
                )));
            }
            hasher.update(&buf[..n]);
        }
        Ok(hex::encode(hasher.finalize()))
    }
}

impl WorkloadAttestor for UnixAttestor {
    fn kind(&self) -> &'static str {
        "unix"
    }

    fn attest(&self, peer: &Peer) -> Result<Selectors, AttestError> {
        let passwd = Self::read_db(&self.config.passwd_path)?;
        let groups = Self::read_db(&self.config.group_path)?;
        let mut out = Selectors::new();
        out.insert(selector(format!("uid:{}", peer.uid()))?);
        if let Some(name) = name_for_id(&passwd, peer.uid()) {
            out.insert(selector(format!("user:{name}"))?);
        }
        out.insert(selector(format!("gid:{}", peer.gid()))?);
        if let Some(name) = name_for_id(&groups, peer.gid()) {
            out.insert(selector(format!("group:{name}"))?);
        }
        for gid in supplementary_gids(&peer.read("status")?)? {
            out.insert(selector(format!("supplementary_gid:{gid}"))?);
            if let Some(name) = name_for_id(&groups, gid) {
                out.insert(selector(format!("supplementary_group:{name}"))?);
            }
        }
        if self.config.discover_workload_path {
            out.insert(selector(format!("path:{}", peer.read_link("exe")?))?);
        }
        if let Some(limit) = self.config.sha256_size_limit {
            out.insert(selector(format!(
                "sha256:{}",
                Self::hash_executable(peer, limit)?
            ))?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
                          # comment:x:5:5\n\
                          broken line\n\
                          alice:x:1000:1000::/home/alice:/bin/sh\n\
                          alias:x:1000:1000::/home/alias:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:alice\nstaff:x:50:\n";

    #[test]
    fn names_come_from_the_first_matching_line() {
        assert_eq!(name_for_id(PASSWD, 0).as_deref(), Some("root"));
        assert_eq!(name_for_id(PASSWD, 1000).as_deref(), Some("alice"));
        assert_eq!(name_for_id(PASSWD, 5), None, "comments are skipped");
        assert_eq!(name_for_id(PASSWD, 4242), None);
        assert_eq!(name_for_id(GROUP, 10).as_deref(), Some("wheel"));
    }

    #[test]
    fn supplementary_gids_parse_from_status() {
        let status = "Name:\tbash\nUid:\t0\t0\t0\t0\nGroups:\t10 50 \nVmRSS:\t1 kB\n";
        assert_eq!(supplementary_gids(status).unwrap_or_default(), vec![10, 50]);
        assert_eq!(
            supplementary_gids("Groups:\t\n").unwrap_or_default(),
            Vec::<u32>::new()
        );
        assert!(supplementary_gids("Name: x\n").is_err());
        assert!(supplementary_gids("Groups: 1 x\n").is_err());
    }
}
