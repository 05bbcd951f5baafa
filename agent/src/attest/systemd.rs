//! The `systemd` workload attestor: `systemd:id:<unit>` for the unit whose cgroup the caller is
//! in (read through the pinned `/proc/<pid>` directory).
//!
//! Only `id` is produced. SPIRE's `fragment_path` comes from systemd over D-Bus, which plinth
//! does not speak; an entry using `systemd:fragment_path:...` never matches.
//!
//! On a host not booted with systemd (no `/run/systemd/system`, as `sd_booted()` checks) the
//! attestor yields nothing: there, cgroup names are not systemd's and prove nothing.

use std::path::PathBuf;

use plinth_spiffe::{Selector, Selectors};

use super::{cgroup, AttestError, Peer, WorkloadAttestor};

/// Settings of the systemd attestor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemdAttestorConfig {
    /// The directory whose presence means systemd runs (`/run/systemd/system`).
    pub booted_marker: PathBuf,
}

impl Default for SystemdAttestorConfig {
    fn default() -> Self {
        Self {
            booted_marker: "/run/systemd/system".into(),
        }
    }
}

/// The systemd workload attestor.
#[derive(Debug, Clone, Default)]
pub struct SystemdAttestor {
    config: SystemdAttestorConfig,
}

/// The selectors for a `/proc/<pid>/cgroup` file: `systemd:id:<unit>`, or none.
pub fn selectors_from_cgroup(cgroups: &str) -> Result<Selectors, AttestError> {
    let mut out = Selectors::new();
    let unit =
        cgroup::systemd_unit(cgroups).map_err(|e| AttestError::Invalid(format!("cgroup: {e}")))?;
    if let Some(unit) = unit {
        out.insert(
            Selector::new("systemd", &format!("id:{unit}"))
                .map_err(|e| AttestError::Invalid(format!("systemd selector: {e}")))?,
        );
    }
    Ok(out)
}

impl SystemdAttestor {
    pub fn new(config: SystemdAttestorConfig) -> Self {
        Self { config }
    }

    fn systemd_runs(&self) -> bool {
        self.config.booted_marker.is_dir()
    }
}

impl WorkloadAttestor for SystemdAttestor {
    fn kind(&self) -> &'static str {
        "systemd"
    }

    fn attest(&self, peer: &Peer) -> Result<Selectors, AttestError> {
        if !self.systemd_runs() {
            return Ok(Selectors::new());
        }
        selectors_from_cgroup(&peer.read("cgroup")?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn strings(s: &Selectors) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn unit_selectors() {
        let s = selectors_from_cgroup("0::/system.slice/nginx.service\n").unwrap();
        assert_eq!(strings(&s), vec!["systemd:id:nginx.service"]);
        // cgroup v1: the name=systemd hierarchy.
        let s =
            selectors_from_cgroup("4:memory:/x\n1:name=systemd:/system.slice/cron.service\n0::/\n")
                .unwrap();
        assert_eq!(strings(&s), vec!["systemd:id:cron.service"]);
        // A cgroup the service made below its unit does not name another unit.
        let s = selectors_from_cgroup("0::/system.slice/app.service/sshd.service\n").unwrap();
        assert_eq!(strings(&s), vec!["systemd:id:app.service"]);
    }

    #[test]
    fn no_unit_no_selectors_and_bad_paths_fail() {
        assert!(selectors_from_cgroup("0::/\n").unwrap().is_empty());
        assert!(selectors_from_cgroup("0::/docker/abc\n")
            .unwrap()
            .is_empty());
        assert!(selectors_from_cgroup("0::/../system.slice/sshd.service\n").is_err());
        assert!(selectors_from_cgroup("garbage\n").is_err());
    }

    #[test]
    fn without_systemd_nothing_is_attested() {
        let dir = tempfile::tempdir().unwrap();
        let a = SystemdAttestor::new(SystemdAttestorConfig {
            booted_marker: dir.path().join("absent"),
        });
        assert!(!a.systemd_runs());
        let b = SystemdAttestor::new(SystemdAttestorConfig {
            booted_marker: dir.path().to_path_buf(),
        });
        assert!(b.systemd_runs());
    }
}
