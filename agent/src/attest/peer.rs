//! The caller of a Unix-socket connection, pinned against PID reuse.
//!
//! At accept: SO_PEERCRED gives the PID, UID and GID recorded at `connect()`. Where the kernel
//! has SO_PEERPIDFD (Linux >= 6.5) we also get a pidfd naming exactly the process that connected,
//! check that it still runs and that its PID is the one from SO_PEERCRED, and open `/proc/<pid>`:
//! a process that still runs after the open proves that the directory is its own. Without a
//! pidfd we fall back to SPIRE's defence: the open directory plus the process start time
//! (`/proc/<pid>/stat` field 22). Every read goes through the open directory (`openat`), which
//! fails with ESRCH once that process is gone, even if its PID has been reused since.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::stat::Mode;
use tokio::net::UnixStream;

use super::AttestError;

/// Largest `/proc/<pid>/<file>` read for attestation.
pub const MAX_PROC_FILE_LEN: u64 = 1024 * 1024;

/// The process at the other end of a Workload API connection.
#[derive(Debug)]
pub struct Peer {
    pid: i32,
    uid: u32,
    gid: u32,
    pidfd: Option<OwnedFd>,
    proc_dir: File,
    start_time: u64,
}

fn read_err(what: &str, e: impl std::fmt::Display) -> AttestError {
    AttestError::Read {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

/// Field 22 (`starttime`) of `/proc/<pid>/stat`. The command name (field 2) is in parentheses and
/// may itself contain spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")" come fields 3 (state) onwards; starttime is field 22, the 20th of them.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The `Pid:` line of a pidfd's `/proc/self/fdinfo` entry; -1 once the process is gone.
fn pidfd_pid(pidfd: &OwnedFd) -> Result<i64, AttestError> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
        .map_err(|e| read_err("pidfd info", e))?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| read_err("pidfd info", "no Pid line"))
}

/// True if the process behind `pidfd` has exited (a pidfd polls readable on exit).
fn pidfd_exited(pidfd: &OwnedFd) -> Result<bool, AttestError> {
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    let n = poll(&mut fds, PollTimeout::ZERO).map_err(|e| read_err("pidfd", e))?;
    Ok(n > 0)
}

impl Peer {
    /// Identifies the caller of `stream`; call it right after accept.
    pub fn from_stream(stream: &UnixStream) -> Result<Self, AttestError> {
        let cred = stream
            .peer_cred()
            .map_err(|e| AttestError::NoPeer(format!("SO_PEERCRED: {e}")))?;
        let pid = cred
            .pid()
            .filter(|p| *p > 0)
            .ok_or_else(|| AttestError::NoPeer("no PID in the peer credentials".into()))?;
        let pidfd = match getsockopt(stream, sockopt::PeerPidfd) {
            Ok(fd) => Some(fd),
            // Kernels before 6.5 do not know the option.
            Err(Errno::ENOPROTOOPT | Errno::EINVAL) => None,
            // The peer is already gone (newer kernels refuse pidfds for reaped processes).
            Err(Errno::ESRCH) => return Err(AttestError::CallerGone),
            Err(e) => return Err(AttestError::NoPeer(format!("SO_PEERPIDFD: {e}"))),
        };
        if let Some(fd) = &pidfd {
            if pidfd_pid(fd)? != i64::from(pid) || pidfd_exited(fd)? {
                return Err(AttestError::CallerGone);
            }
        }
        let proc_dir = File::open(format!("/proc/{pid}")).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                AttestError::CallerGone
            } else {
                read_err("/proc entry", e)
            }
        })?;
        let mut peer = Self {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            pidfd,
            proc_dir,
            start_time: 0,
        };
        peer.start_time = peer.read_start_time()?;
        if let Some(fd) = &peer.pidfd {
            // Still running after we opened /proc/<pid>: the directory is that process's.
            if pidfd_exited(fd)? {
                return Err(AttestError::CallerGone);
            }
        }
        Ok(peer)
    }

    /// The caller's PID (in the agent's PID namespace).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The caller's effective UID at connect time.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The caller's effective GID at connect time.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// True if the kernel gave us a pidfd for the caller.
    pub fn has_pidfd(&self) -> bool {
        self.pidfd.is_some()
    }

    /// Opens `/proc/<pid>/<name>` through the pinned directory.
    pub fn open(&self, name: &str) -> Result<File, AttestError> {
        openat(
            self.proc_dir.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        )
        .map(File::from)
        .map_err(|e| match e {
            Errno::ESRCH | Errno::ENOENT => AttestError::CallerGone,
            other => read_err(name, other),
        })
    }

    /// Reads `/proc/<pid>/<name>` (at most [`MAX_PROC_FILE_LEN`] bytes) as text.
    pub fn read(&self, name: &str) -> Result<String, AttestError> {
        let mut text = String::new();
        self.open(name)?
            .take(MAX_PROC_FILE_LEN)
            .read_to_string(&mut text)
            .map_err(|e| match e.raw_os_error() {
                Some(code) if code == Errno::ESRCH as i32 => AttestError::CallerGone,
                _ => read_err(name, e),
            })?;
        Ok(text)
    }

    /// Reads the symlink `/proc/<pid>/<name>` (e.g. `exe`).
    pub fn read_link(&self, name: &str) -> Result<String, AttestError> {
        let target = readlinkat(self.proc_dir.as_fd(), name).map_err(|e| match e {
            Errno::ESRCH | Errno::ENOENT => AttestError::CallerGone,
            other => read_err(name, other),
        })?;
        target
            .into_string()
            .map_err(|_| AttestError::Invalid(format!("/proc/<pid>/{name} is not UTF-8")))
    }

    fn read_start_time(&self) -> Result<u64, AttestError> {
        parse_start_time(&self.read("stat")?)
            .ok_or_else(|| AttestError::Invalid("malformed /proc/<pid>/stat".into()))
    }

    /// Fails with [`AttestError::CallerGone`] unless the process that connected still runs and
    /// still is the one our `/proc` directory describes. Call it after attestation.
    pub fn check_same_process(&self) -> Result<(), AttestError> {
        if let Some(fd) = &self.pidfd {
            if pidfd_exited(fd)? {
                return Err(AttestError::CallerGone);
            }
        }
        if self.read_start_time()? != self.start_time {
            return Err(AttestError::CallerGone);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_counts_fields_after_the_command_name() {
        let stat = "1234 (my (odd) cmd) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("1234 (x) S 1"), None);
        assert_eq!(parse_start_time("no parens"), None);
    }

    #[test]
    fn own_process_start_time_is_readable() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        assert!(parse_start_time(&stat).is_some_and(|t| t > 0));
    }
}
