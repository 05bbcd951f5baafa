//! The `systemd` workload attestor: `systemd:id:<unit>` for the unit whose cgroup the caller is
//! in (read through the pinned `/proc/<pid>` directory), and `systemd:fragment_path:<path>`, the
//! unit file that defines it.
//!
//! SPIRE asks systemd over D-Bus for the unit's `FragmentPath`. plinth does not speak D-Bus: it
//! looks the unit file up itself, in systemd's unit search path order for the system manager
//! (systemd.unit(5), "System Unit Search Path"; `lookup-paths.c`): the first directory holding a
//! file named after the unit wins; for a template instance `foo@bar.service` with no file of its
//! own, `foo@.service` is looked up the same way. A unit file that is a symlink (an alias, or a
//! unit added with `systemctl link`) is reported by its target, as systemd reports it; one
//! masked (linked to `/dev/null`) or not found gives no `fragment_path` selector. Where this can
//! differ from SPIRE: a unit file added or removed after systemd last loaded the unit (before a
//! `daemon-reload`) is seen as it is on disk now, and a search path changed by `$SYSTEMD_UNIT_PATH`
//! must be configured here too (`unit_search_path`).
//!
//! On a host not booted with systemd (no `/run/systemd/system`, as `sd_booted()` checks) the
//! attestor yields nothing: there, cgroup names are not systemd's and prove nothing.

use std::path::{Path, PathBuf};

use plinth_spiffe::{Selector, Selectors};

use super::{cgroup, AttestError, Peer, WorkloadAttestor};

/// systemd's unit search path for the system manager, highest priority first (systemd.unit(5);
/// `/lib/systemd/system` is searched by split-/usr builds such as older Debian).
pub const SYSTEM_UNIT_SEARCH_PATH: &[&str] = &[
    "/etc/systemd/system.control",
    "/run/systemd/system.control",
    "/run/systemd/transient",
    "/run/systemd/generator.early",
    "/etc/systemd/system",
    "/etc/systemd/system.attached",
    "/run/systemd/system",
    "/run/systemd/system.attached",
    "/run/systemd/generator",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
    "/run/systemd/generator.late",
];

/// Settings of the systemd attestor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemdAttestorConfig {
    /// The directory whose presence means systemd runs (`/run/systemd/system`).
    pub booted_marker: PathBuf,
    /// Where unit files are looked up, highest priority first ([`SYSTEM_UNIT_SEARCH_PATH`]).
    pub unit_search_path: Vec<PathBuf>,
}

impl Default for SystemdAttestorConfig {
    fn default() -> Self {
        Self {
            booted_marker: "/run/systemd/system".into(),
            unit_search_path: SYSTEM_UNIT_SEARCH_PATH.iter().map(PathBuf::from).collect(),
        }
    }
}

/// The unit file for `unit` (see the module docs), or `None`.
pub fn fragment_path(unit: &str, search_path: &[PathBuf]) -> Option<PathBuf> {
    // The name comes from a cgroup path segment; never let it leave the search directories.
    if unit.is_empty() || unit.contains('/') || unit.starts_with('.') || unit.contains('\0') {
        return None;
    }
    let template = unit.split_once('@').and_then(|(prefix, rest)| {
        let suffix = rest.rfind('.').map(|i| &rest[i..])?;
        (!rest.starts_with('.')).then(|| format!("{prefix}@{suffix}"))
    });
    for name in std::iter::once(unit).chain(template.as_deref()) {
        for dir in search_path {
            match unit_file(&dir.join(name)) {
                Lookup::Absent => continue,
                Lookup::Masked => return None,
                Lookup::Found(path) => return Some(path),
            }
        }
    }
    None
}

/// What one directory of the search path holds under a unit's name.
enum Lookup {
    Absent,
    /// Linked to `/dev/null` (or to nothing usable): the unit has no fragment, whatever lower
    /// directories hold.
    Masked,
    Found(PathBuf),
}

/// `path` as a unit file: itself if a regular file, its target if a symlink to one.
fn unit_file(path: &Path) -> Lookup {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Lookup::Absent;
    };
    if meta.file_type().is_symlink() {
        return match std::fs::canonicalize(path) {
            Ok(target) if target != Path::new("/dev/null") && target.is_file() => {
                Lookup::Found(target)
            }
            _ => Lookup::Masked,
        };
    }
    if meta.is_file() {
        Lookup::Found(path.to_owned())
    } else {
        Lookup::Absent
    }
}

/// The systemd workload attestor.
#[derive(Debug, Clone, Default)]
pub struct SystemdAttestor {
    config: SystemdAttestorConfig,
}

/// The selectors for a `/proc/<pid>/cgroup` file: `systemd:id:<unit>` and, when its unit file is
/// found in `search_path`, `systemd:fragment_path:<path>`; none outside a unit.
pub fn selectors_from_cgroup(
    cgroups: &str,
    search_path: &[PathBuf],
) -> Result<Selectors, AttestError> {
    let mut out = Selectors::new();
    let unit =
        cgroup::systemd_unit(cgroups).map_err(|e| AttestError::Invalid(format!("cgroup: {e}")))?;
    let selector = |value: String| {
        Selector::new("systemd", &value)
            .map_err(|e| AttestError::Invalid(format!("systemd selector: {e}")))
    };
    if let Some(unit) = unit {
        if let Some(path) = fragment_path(&unit, search_path) {
            let path = path.to_str().ok_or_else(|| {
                AttestError::Invalid(format!("unit file of {unit} is not a UTF-8 path"))
            })?;
            out.insert(selector(format!("fragment_path:{path}"))?);
        }
        out.insert(selector(format!("id:{unit}"))?);
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
        selectors_from_cgroup(&peer.read("cgroup")?, &self.config.unit_search_path)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn strings(s: &Selectors) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn sel(cgroups: &str) -> Result<Selectors, AttestError> {
        selectors_from_cgroup(cgroups, &[])
    }

    #[test]
    fn unit_selectors() {
        let s = sel("0::/system.slice/nginx.service\n").unwrap();
        assert_eq!(strings(&s), vec!["systemd:id:nginx.service"]);
        // cgroup v1: the name=systemd hierarchy.
        let s = sel("4:memory:/x\n1:name=systemd:/system.slice/cron.service\n0::/\n").unwrap();
        assert_eq!(strings(&s), vec!["systemd:id:cron.service"]);
        // A cgroup the service made below its unit does not name another unit.
        let s = sel("0::/system.slice/app.service/sshd.service\n").unwrap();
        assert_eq!(strings(&s), vec!["systemd:id:app.service"]);
    }

    #[test]
    fn no_unit_no_selectors_and_bad_paths_fail() {
        assert!(sel("0::/\n").unwrap().is_empty());
        assert!(sel("0::/docker/abc\n").unwrap().is_empty());
        assert!(sel("0::/../system.slice/sshd.service\n").is_err());
        assert!(sel("garbage\n").is_err());
    }

    #[test]
    fn without_systemd_nothing_is_attested() {
        let dir = tempfile::tempdir().unwrap();
        let a = SystemdAttestor::new(SystemdAttestorConfig {
            booted_marker: dir.path().join("absent"),
            ..Default::default()
        });
        assert!(!a.systemd_runs());
        let b = SystemdAttestor::new(SystemdAttestorConfig {
            booted_marker: dir.path().to_path_buf(),
            ..Default::default()
        });
        assert!(b.systemd_runs());
    }

    /// A temporary unit tree laid out like a system's, with the default search order rebased
    /// onto it.
    fn unit_tree() -> (tempfile::TempDir, Vec<PathBuf>) {
        let root = tempfile::tempdir().unwrap();
        let search: Vec<PathBuf> = SYSTEM_UNIT_SEARCH_PATH
            .iter()
            .map(|d| root.path().join(d.trim_start_matches('/')))
            .collect();
        for d in &search {
            std::fs::create_dir_all(d).unwrap();
        }
        (root, search)
    }

    fn put(root: &Path, dir: &str, name: &str) -> PathBuf {
        let p = root.join(dir.trim_start_matches('/')).join(name);
        std::fs::write(&p, "[Service]\nExecStart=/bin/true\n").unwrap();
        p
    }

    #[test]
    fn fragment_path_follows_the_search_order() {
        let (root, search) = unit_tree();
        let r = root.path();
        assert_eq!(fragment_path("web.service", &search), None);
        let vendor = put(r, "/usr/lib/systemd/system", "web.service");
        put(r, "/lib/systemd/system", "web.service");
        assert_eq!(fragment_path("web.service", &search), Some(vendor));
        let local = put(r, "/usr/local/lib/systemd/system", "web.service");
        assert_eq!(fragment_path("web.service", &search), Some(local));
        let run = put(r, "/run/systemd/system", "web.service");
        assert_eq!(fragment_path("web.service", &search), Some(run));
        let etc = put(r, "/etc/systemd/system", "web.service");
        assert_eq!(fragment_path("web.service", &search), Some(etc));
        let transient = put(r, "/run/systemd/transient", "web.service");
        assert_eq!(fragment_path("web.service", &search), Some(transient));
        let control = put(r, "/etc/systemd/system.control", "web.service");
        assert_eq!(fragment_path("web.service", &search), Some(control));
        // A directory of that name is not a unit file.
        std::fs::create_dir(r.join("run/systemd/system.control/web.service")).unwrap();
        assert_eq!(
            fragment_path("web.service", &search),
            Some(r.join("etc/systemd/system.control/web.service"))
        );
    }

    #[test]
    fn template_instances_fall_back_to_the_template() {
        let (root, search) = unit_tree();
        let r = root.path();
        let template = put(r, "/usr/lib/systemd/system", "getty@.service");
        assert_eq!(
            fragment_path("getty@tty1.service", &search),
            Some(template.clone())
        );
        // An instance file of its own wins over the template, even from a lower directory.
        put(r, "/etc/systemd/system", "getty@.service");
        let own = put(r, "/lib/systemd/system", "getty@tty2.service");
        assert_eq!(fragment_path("getty@tty2.service", &search), Some(own));
        assert_eq!(
            fragment_path("getty@tty1.service", &search),
            Some(r.join("etc/systemd/system/getty@.service"))
        );
        assert_eq!(fragment_path("other@x.service", &search), None);
    }

    #[test]
    fn symlinks_masks_and_hostile_names() {
        let (root, search) = unit_tree();
        let r = root.path();
        // An alias resolves to the file it points at; a masked unit has no fragment.
        let target = put(r, "/usr/lib/systemd/system", "real.service");
        std::os::unix::fs::symlink(&target, r.join("etc/systemd/system/alias.service")).unwrap();
        assert_eq!(
            fragment_path("alias.service", &search),
            Some(std::fs::canonicalize(&target).unwrap())
        );
        put(r, "/usr/lib/systemd/system", "masked.service");
        std::os::unix::fs::symlink("/dev/null", r.join("etc/systemd/system/masked.service"))
            .unwrap();
        assert_eq!(fragment_path("masked.service", &search), None);
        // Names that would leave the search directories are never looked up.
        put(r, "/etc/systemd", "escape.service");
        for bad in [
            "../escape.service",
            "..",
            "",
            ".hidden.service",
            "a/b.service",
        ] {
            assert_eq!(fragment_path(bad, &search), None, "{bad:?}");
        }
    }

    #[test]
    fn selectors_include_the_fragment_path_when_the_unit_file_exists() {
        let (root, search) = unit_tree();
        let file = put(root.path(), "/etc/systemd/system", "nginx.service");
        let s = selectors_from_cgroup("0::/system.slice/nginx.service\n", &search).unwrap();
        assert_eq!(
            strings(&s),
            vec![
                format!("systemd:fragment_path:{}", file.display()),
                "systemd:id:nginx.service".to_owned()
            ]
        );
        let s = selectors_from_cgroup("0::/system.slice/gone.service\n", &search).unwrap();
        assert_eq!(strings(&s), vec!["systemd:id:gone.service"]);
    }
}
