//! Write-ahead log files kept longer than their contents, as etcd keeps its WAL segments.
//!
//! RocksDB creates each WAL file empty and appends to it; its own preallocation keeps the file
//! size (`FALLOC_FL_KEEP_SIZE`). So every synced append grows the file, and on ext4 the
//! `fdatasync` that makes the Raft log durable must then also commit the inode's new size
//! through the filesystem journal, which three nodes on one disk share. etcd allocates its
//! segments at their full 64 MiB up front (`fallocate` without KEEP_SIZE), so its syncs write
//! data only.
//!
//! A [`Presizer`] thread per store gives RocksDB's newest WAL file the same shape: when its size
//! is not a whole number of [`STEP`]s (a new file, or one RocksDB has written past the end of),
//! it is allocated up to the next whole step. RocksDB writes at its own file offset (the file
//! is not opened `O_APPEND`), so the extra length is only allocated space; a clean close
//! truncates the file back to what RocksDB wrote. After a crash the tail reads as zeros, which
//! RocksDB's log reader skips as padding (the zero record type it reserves for preallocated
//! files), so recovery replays exactly the records written (tested on a copy of an open store).
//!
//! The rule is stateless, so two presizers on one directory (a store being reopened) agree. A
//! failed allocation changes nothing: for want of space it is retried at the next tick; on a
//! filesystem without `fallocate` the presizer stops. The log is as correct without it, only
//! slower to sync. Measured in docs/benchmarks.md ("Pre-sized write-ahead log").

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use nix::fcntl::{fallocate, FallocateFlags};
use rocksdb::DB;

/// The unit the newest WAL file is allocated in: etcd's segment size.
pub const STEP: u64 = 64 * 1024 * 1024;

/// How often the presizer looks at the newest WAL file. A new file (after a memtable flush)
/// syncs the slow way for at most this long.
const TICK: Duration = Duration::from_millis(100);

/// The background thread of one store. It stops at the first tick after the last handle on
/// the database is dropped.
pub(crate) struct Presizer;

impl Presizer {
    /// Presizes the newest WAL in `dir` now, then starts the thread, unless the filesystem
    /// cannot allocate.
    pub(crate) fn start(dir: PathBuf, db: Weak<DB>) {
        if !report(presize_newest(&dir)) {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("wal-presize".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                // Checked after the sleep, so that a closed store's WAL is, but for a narrow
                // race, left as RocksDB truncated it (a zero tail would be skipped anyway).
                if db.strong_count() == 0 || !report(presize_newest(&dir)) {
                    return;
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "write-ahead log presizer not started; log syncs stay slower");
        }
    }
}

/// Logs the outcome of one look; false when presizing cannot work on this filesystem (no
/// `fallocate`), so that the presizer stops instead of failing every tick.
fn report(r: io::Result<Option<u64>>) -> bool {
    match r {
        Ok(Some(len)) => tracing::debug!(len, "write-ahead log presized"),
        Ok(None) => {}
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {
            tracing::info!(error = %e, "filesystem cannot preallocate; write-ahead log not presized");
            return false;
        }
        Err(e) => tracing::debug!(error = %e, "write-ahead log not presized"),
    }
    true
}

/// Allocates the newest WAL file in `dir` up to a whole number of [`STEP`]s. Returns the new
/// length if it allocated.
pub(crate) fn presize_newest(dir: &Path) -> io::Result<Option<u64>> {
    match newest_wal(dir)? {
        Some(path) => presize(&path),
        None => Ok(None),
    }
}

/// The WAL file with the highest number (`000123.log`): the one RocksDB writes to.
pub(crate) fn newest_wal(dir: &Path) -> io::Result<Option<PathBuf>> {
    let mut best: Option<(u64, PathBuf)> = None;
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let name = item.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(b, _)| number > *b) {
            best = Some((number, item.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Allocates `path` up to the next whole [`STEP`] unless its size is one already.
fn presize(path: &Path) -> io::Result<Option<u64>> {
    let file = match OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        // RocksDB deleted it between the listing and now: the next tick sees the new one.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len % STEP == 0 && len > 0 {
        return Ok(None);
    }
    let target = (len / STEP + 1) * STEP;
    let target_off = i64::try_from(target).map_err(io::Error::other)?;
    fallocate(&file, FallocateFlags::empty(), 0, target_off).map_err(io::Error::from)?;
    // The new size durable once, so that the log's syncs need not commit it.
    file.sync_all()?;
    Ok(Some(target))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::Store;

    fn len(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().len()
    }

    #[test]
    fn the_newest_wal_is_allocated_in_whole_steps_and_others_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("000003.log"), [1u8; 100]).unwrap();
        std::fs::write(p("000007.log"), b"").unwrap();
        for other in ["LOG", "000009.sst", "MANIFEST-000010", "x.log"] {
            std::fs::write(p(other), b"x").unwrap();
        }
        assert_eq!(newest_wal(dir.path()).unwrap(), Some(p("000007.log")));

        assert_eq!(presize_newest(dir.path()).unwrap(), Some(STEP));
        assert_eq!(len(&p("000007.log")), STEP);
        // A whole step already: nothing to do, however often asked.
        assert_eq!(presize_newest(dir.path()).unwrap(), None);
        assert_eq!(len(&p("000007.log")), STEP);
        // Written past the end: extended to the next whole step, contents kept.
        std::fs::OpenOptions::new()
            .write(true)
            .open(p("000007.log"))
            .unwrap()
            .set_len(STEP + 10)
            .unwrap();
        assert_eq!(presize_newest(dir.path()).unwrap(), Some(2 * STEP));
        assert_eq!(len(&p("000007.log")), 2 * STEP);
        // Older WAL files and other files are not touched.
        assert_eq!(std::fs::read(p("000003.log")).unwrap(), vec![1u8; 100]);
        assert_eq!(len(&p("LOG")), 1);
    }

    #[test]
    fn the_presizer_stops_only_where_the_filesystem_cannot_allocate() {
        let unsupported = io::Error::from_raw_os_error(nix::libc::EOPNOTSUPP);
        assert!(!report(Err(unsupported)));
        let full = io::Error::from_raw_os_error(nix::libc::ENOSPC);
        assert!(
            report(Err(full)),
            "a full disk may have room at the next tick"
        );
        assert!(report(Ok(None)));
        assert!(report(Ok(Some(STEP))));
    }

    #[test]
    fn a_directory_without_a_wal_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(presize_newest(dir.path()).unwrap(), None);
        assert!(presize_newest(&dir.path().join("missing")).is_err());
    }

    /// A store copied while open is what a power cut leaves: a WAL longer than its records,
    /// its tail zeros. Recovery must replay exactly the synced records, no more and no fewer,
    /// and the recovered store must take new writes.
    #[test]
    fn a_store_copied_while_open_recovers_every_synced_entry_from_a_presized_wal() {
        let live = tempfile::tempdir().unwrap();
        let store = Store::open(live.path()).unwrap();
        let entry = |i: u64| (i, format!("entry {i}").repeat(40).into_bytes());
        store.log_append((1..=50).map(entry)).unwrap();
        // Presized by now (at open); asked again so the test does not depend on the thread.
        presize_newest(live.path()).unwrap();
        let wal = newest_wal(live.path()).unwrap().unwrap();
        assert_eq!(len(&wal) % STEP, 0, "the WAL is presized");
        // These land inside the allocated length.
        store.log_append((51..=200).map(entry)).unwrap();
        assert_eq!(
            len(&wal),
            STEP,
            "appends inside the allocation keep the size"
        );

        let copy = store.copy_files_while_open();
        assert_eq!(len(&copy.path().join(wal.file_name().unwrap())), STEP);

        let recovered = Store::open(copy.path()).unwrap();
        let got = recovered.log_range(0, None).unwrap();
        let want: Vec<_> = (1..=200).map(entry).collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "recovered entries differ from the synced ones");
        recovered.log_append([entry(201)]).unwrap();
        assert_eq!(recovered.log_range(201, None).unwrap(), vec![entry(201)]);
        drop(recovered);
        let reopened = Store::open(copy.path()).unwrap();
        assert_eq!(reopened.log_range(0, None).unwrap().len(), 201);
    }

    /// Opening presizes the WAL the store starts with; the store's thread presizes each one
    /// RocksDB switches to after, within a few ticks.
    #[test]
    fn a_store_presizes_its_wal_at_open_and_each_new_one_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = newest_wal(dir.path()).unwrap().unwrap();
        assert_eq!(len(&first), STEP, "presized at open");

        // A flush switches RocksDB to a new WAL (the current one holds a log entry).
        store.log_append([(1, b"entry".to_vec())]).unwrap();
        store.apply(1, None, b"applied").unwrap();
        store.persist_state().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let second = loop {
            let newest = newest_wal(dir.path()).unwrap().unwrap();
            if newest != first && len(&newest) == STEP {
                break newest;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the new WAL {newest:?} was not presized"
            );
            std::thread::sleep(TICK);
        };
        assert_ne!(second, first);
    }
}
