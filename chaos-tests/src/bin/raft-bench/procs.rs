//! Child processes that die with the benchmark (kill -9 on drop, also when it fails).

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// The unit of /proc's CPU times: Linux's USER_HZ, `sysconf(_SC_CLK_TCK)`, which the kernel's
/// ABI fixes at 100 on every architecture this runs on.
const USER_HZ: u64 = 100;

/// A running server process, its output appended to a log file.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        Ok(Self { child: Some(child) })
    }

    /// CPU time (user + system, all threads, exited ones included) the process has used so
    /// far, or `None` once it is gone.
    pub fn cpu_time(&self) -> Option<Duration> {
        let pid = self.child.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which is in parentheses and may hold spaces): state is
        // the first, utime and stime the 12th and 13th, in clock ticks.
        let rest = stat.get(stat.rfind(')')? + 1..)?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(Duration::from_millis(ticks * 1000 / USER_HZ))
    }

    /// Voluntary context switches of the process's live threads so far: each is a thread that
    /// blocked (waiting for work, a wake, a lock or IO), so per write they count the hand-offs
    /// between threads that a write costs. Threads that already exited are not counted, which
    /// misses little over a cell: runtime workers live as long as the process and blocking-pool
    /// threads for seconds after their last task. `None` once the process is gone.
    pub fn voluntary_switches(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        let mut total = 0;
        for task in tasks.flatten() {
            // A thread that exits meanwhile is skipped.
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            total += field_u64(&status, "voluntary_ctxt_switches:").unwrap_or(0);
        }
        Some(total)
    }

    /// Bytes the process has caused to be written to storage so far (`write_bytes` in
    /// `/proc/<pid>/io`), or `None` once it is gone. The kernel counts a buffered write when it
    /// dirties a page-cache page (a whole page: a small append to a page that a sync just
    /// cleaned counts 4 KiB again) and a direct write when it is issued.
    pub fn disk_written(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
        field_u64(&io, "write_bytes:")
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The number after `key` on the line of a /proc text file (`status`, `io`) that starts with it.
fn field_u64(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// A port free right now on `ip` (the server binds it with SO_REUSEADDR).
pub fn free_port(ip: &str) -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))
        .with_context(|| format!("binding {ip}:0"))?
        .local_addr()?
        .port())
}

/// What a set of server processes has used so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu: Duration,
    pub switches: u64,
    pub disk_written: u64,
}

impl Usage {
    /// What was used between `earlier` and `self`.
    pub fn since(self, earlier: Usage) -> Usage {
        Usage {
            cpu: self.cpu.saturating_sub(earlier.cpu),
            switches: self.switches.saturating_sub(earlier.switches),
            disk_written: self.disk_written.saturating_sub(earlier.disk_written),
        }
    }
}

/// The CPU time, voluntary context switches and bytes written to storage of all of `procs`
/// so far (those already gone count nothing).
pub fn usage<'a>(procs: impl IntoIterator<Item = &'a Proc>) -> Usage {
    let mut u = Usage::default();
    for p in procs {
        u.cpu += p.cpu_time().unwrap_or_default();
        u.switches += p.voluntary_switches().unwrap_or_default();
        u.disk_written += p.disk_written().unwrap_or_default();
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that writes 4 MiB with O_DIRECT (counted as issued, whatever the page cache
    /// holds) is counted for at least those bytes while it is still there.
    #[test]
    fn disk_written_counts_a_childs_direct_writes() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
        let out = dir.path().join("data");
        let log = dir.path().join("log");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "dd if=/dev/zero of={} bs=1M count=4 oflag=direct status=none && sleep 30",
            out.display()
        ));
        let mut p = Proc::spawn(&mut cmd, &log).expect("spawn");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut seen = 0;
        while std::time::Instant::now() < deadline {
            // The shell's own counter includes its exited child dd's (the kernel adds a reaped
            // child's IO to its parent's).
            seen = p.disk_written().expect("child alive");
            if seen >= 4 << 20 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        p.kill9();
        assert!(seen >= 4 << 20, "saw {seen} bytes written");
        assert_eq!(p.disk_written(), None, "gone after kill -9");
    }
}
