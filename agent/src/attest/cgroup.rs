//! Container IDs and systemd unit names from `/proc/<pid>/cgroup`, as pure functions.
//!
//! A workload can influence its cgroup paths (it can create nested cgroups where they are
//! delegated to it, and a process in another cgroup namespace sees `/../` paths), so anything
//! ambiguous is rejected rather than guessed: a `..` segment, or more than one distinct container
//! ID across all lines (docker in docker, or a workload-made nested cgroup named like a
//! container).

/// Why a cgroup file was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    #[error("malformed cgroup line {0:?}")]
    Malformed(String),
    #[error("cgroup path {0:?} leaves its cgroup namespace (`..` segment)")]
    DotDot(String),
    #[error("several container IDs in the cgroup paths: {0:?}")]
    Ambiguous(Vec<String>),
}

/// One line of `/proc/<pid>/cgroup`: `hierarchy-ID:controller-list:cgroup-path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLine<'a> {
    pub hierarchy: &'a str,
    /// Empty on the cgroup v2 unified line (`0::/path`).
    pub controllers: &'a str,
    pub path: &'a str,
}

/// Parses every line; rejects paths with a `..` segment.
pub fn parse(contents: &str) -> Result<Vec<CgroupLine<'_>>, CgroupError> {
    contents
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.splitn(3, ':');
            let (Some(hierarchy), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(CgroupError::Malformed(l.to_owned()));
            };
            if !path.starts_with('/') {
                return Err(CgroupError::Malformed(l.to_owned()));
            }
            if path.split('/').any(|seg| seg == "..") {
                return Err(CgroupError::DotDot(path.to_owned()));
            }
            Ok(CgroupLine {
                hierarchy,
                controllers,
                path,
            })
        })
        .collect()
}

const ID_PREFIXES: &[&str] = &[
    "docker-",
    "cri-containerd-",
    "crio-",
    "containerd-",
    "libpod-",
];

fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The container ID a cgroup path segment names, in the forms docker, containerd (CRI) and
/// CRI-O use: `<id>` (cgroupfs driver, e.g. `/docker/<id>`, `/kubepods/.../pod<uid>/<id>`) or
/// `<runtime>-<id>.scope` (systemd driver).
fn segment_container_id(seg: &str) -> Option<&str> {
    if is_container_id(seg) {
        return Some(seg);
    }
    let base = seg.strip_suffix(".scope")?;
    ID_PREFIXES
        .iter()
        .find_map(|p| base.strip_prefix(p))
        .filter(|id| is_container_id(id))
}

/// The one container ID the process's cgroups name, `None` if it is not in a container.
pub fn container_id(contents: &str) -> Result<Option<String>, CgroupError> {
    let mut ids: Vec<String> = Vec::new();
    for line in parse(contents)? {
        for id in line.path.split('/').filter_map(segment_container_id) {
            if !ids.iter().any(|known| known == id) {
                ids.push(id.to_owned());
            }
        }
    }
    match ids.len() {
        0 => Ok(None),
        1 => Ok(ids.pop()),
        _ => Err(CgroupError::Ambiguous(ids)),
    }
}

const UNIT_SUFFIXES: &[&str] = &[".service", ".scope", ".socket", ".mount", ".swap"];

/// The systemd unit of the process: the first non-slice segment of the path in the unified
/// hierarchy (`0::`), or in the `name=systemd` hierarchy on cgroup v1. Deeper segments are
/// ignored on purpose: below its unit a delegated service makes its own cgroups and could name
/// one `sshd.service`.
pub fn systemd_unit(contents: &str) -> Result<Option<String>, CgroupError> {
    let lines = parse(contents)?;
    let path = lines
        .iter()
        .find(|l| l.controllers == "name=systemd")
        .or_else(|| {
            lines
                .iter()
                .find(|l| l.hierarchy == "0" && l.controllers.is_empty())
        })
        .map(|l| l.path);
    let Some(path) = path else {
        return Ok(None);
    };
    let first_unit = path
        .split('/')
        .filter(|s| !s.is_empty())
        .find(|s| !s.ends_with(".slice"));
    Ok(first_unit
        .filter(|s| {
            UNIT_SUFFIXES
                .iter()
                .any(|suf| s.ends_with(suf) && s.len() > suf.len())
        })
        .map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    #[test]
    fn docker_cgroup_v1_cgroupfs_driver() {
        let f = format!(
            "12:pids:/docker/{A}\n11:memory:/docker/{A}\n1:name=systemd:/docker/{A}\n0::/\n"
        );
        assert_eq!(container_id(&f), Ok(Some(A.to_owned())));
    }

    #[test]
    fn docker_and_containerd_cgroup_v2_systemd_driver() {
        for prefix in ["docker-", "cri-containerd-", "crio-", "libpod-"] {
            let f = format!("0::/system.slice/{prefix}{A}.scope\n");
            assert_eq!(container_id(&f), Ok(Some(A.to_owned())), "{prefix}");
        }
        let k8s = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod1234_5678.slice/cri-containerd-{A}.scope\n"
        );
        assert_eq!(container_id(&k8s), Ok(Some(A.to_owned())));
        let k8s_v1 = format!("4:cpu:/kubepods/besteffort/pod1234-5678/{A}\n");
        assert_eq!(container_id(&k8s_v1), Ok(Some(A.to_owned())));
    }

    #[test]
    fn not_in_a_container() {
        assert_eq!(
            container_id("0::/user.slice/user-0.slice/session-1.scope\n"),
            Ok(None)
        );
        assert_eq!(container_id("0::/\n"), Ok(None));
        // 63 hex digits, uppercase, or an unknown prefix are not container IDs.
        assert_eq!(container_id(&format!("0::/docker/{}\n", &A[1..])), Ok(None));
        assert_eq!(
            container_id(&format!("0::/docker/{}\n", A.to_uppercase())),
            Ok(None)
        );
        assert_eq!(container_id(&format!("0::/x/evil-{A}.scope\n")), Ok(None));
    }

    #[test]
    fn nested_cgroups_with_the_same_id_are_fine() {
        let f = format!("0::/system.slice/docker-{A}.scope/init.scope\n");
        assert_eq!(container_id(&f), Ok(Some(A.to_owned())));
    }

    #[test]
    fn several_container_ids_are_rejected() {
        // Docker in docker, or a workload that made a nested cgroup named like a container.
        let nested = format!("0::/system.slice/docker-{A}.scope/docker-{B}.scope\n");
        assert_eq!(
            container_id(&nested),
            Err(CgroupError::Ambiguous(vec![A.to_owned(), B.to_owned()]))
        );
        let dind = format!("0::/docker/{A}/docker/{B}\n");
        assert!(matches!(
            container_id(&dind),
            Err(CgroupError::Ambiguous(_))
        ));
        let across_lines = format!("3:cpu:/docker/{A}\n2:memory:/docker/{B}\n");
        assert!(matches!(
            container_id(&across_lines),
            Err(CgroupError::Ambiguous(_))
        ));
    }

    #[test]
    fn dot_dot_paths_are_rejected() {
        for path in [
            format!("0::/../docker-{A}.scope"),
            format!("0::/system.slice/../../docker/{A}"),
            "0::/..".to_owned(),
        ] {
            assert!(
                matches!(container_id(&path), Err(CgroupError::DotDot(_))),
                "{path}"
            );
            assert!(matches!(systemd_unit(&path), Err(CgroupError::DotDot(_))));
        }
        // A segment merely containing dots is a name, not a parent reference.
        assert_eq!(container_id("0::/a..b/c...\n"), Ok(None));
    }

    #[test]
    fn malformed_lines_are_rejected() {
        assert!(matches!(
            container_id("garbage"),
            Err(CgroupError::Malformed(_))
        ));
        assert!(matches!(
            container_id("0::relative"),
            Err(CgroupError::Malformed(_))
        ));
    }

    #[test]
    fn systemd_units() {
        assert_eq!(
            systemd_unit("0::/system.slice/nginx.service\n"),
            Ok(Some("nginx.service".into()))
        );
        assert_eq!(
            systemd_unit("0::/system.slice/nginx.service/worker/sshd.service\n"),
            Ok(Some("nginx.service".into())),
            "delegated sub-cgroups cannot pose as another unit"
        );
        assert_eq!(
            systemd_unit("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\n"),
            Ok(Some("user@1000.service".into()))
        );
        assert_eq!(
            systemd_unit("0::/user.slice/user-1000.slice/session-4.scope\n"),
            Ok(Some("session-4.scope".into()))
        );
        assert_eq!(
            systemd_unit("0::/init.scope\n"),
            Ok(Some("init.scope".into()))
        );
        assert_eq!(
            systemd_unit("5:cpu:/foo\n1:name=systemd:/system.slice/cron.service\n"),
            Ok(Some("cron.service".into()))
        );
        assert_eq!(systemd_unit("0::/\n"), Ok(None));
        assert_eq!(systemd_unit("0::/docker/abc\n"), Ok(None));
        assert_eq!(systemd_unit("0::/system.slice/.service\n"), Ok(None));
        assert_eq!(systemd_unit("3:cpu:/system.slice/a.service\n"), Ok(None));
    }
}
