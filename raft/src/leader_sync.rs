//! The leader's own log sync in parallel with replication, without counting an unsynced entry
//! toward anything anyone can see.
//!
//! openraft 0.9's Raft core waits for the leader's append callback (its fsync) before it sends
//! the entries to the followers, so the leader's fsync and the followers' run in series: about
//! a third of a lone client's write cycle (docs/benchmarks.md). Raft allows the leader to write
//! its log while it replicates, provided it counts itself toward a majority only once its copy
//! is durable (Raft thesis, 10.2.1; etcd does it). This module gets that order with openraft
//! 0.9's unchanged core:
//!
//! - **Early callback.** When the node is the established leader of the entries' term (its
//!   saved vote is its own and committed, every entry carries that leader ID) and no entry is a
//!   membership change, the log store reports the append flushed as soon as it is written to
//!   the WAL, and records it here as *pending* until the group-commit sync that covers it
//!   completes. openraft then replicates at once, and its own commit index may count the
//!   leader's unsynced copy.
//! - **Nothing acts on such a commit until the copy is durable.** The state machine applies an
//!   entry only when no pending write holds it or an earlier index ([`LeaderSync::wait_durable`]);
//!   every client answer, change event, linearizable read (which waits for the applied index)
//!   and snapshot comes after apply. The commit index the leader sends to followers is held
//!   below the first pending entry ([`LeaderSync::clamp_commit`]), so no follower applies it
//!   either; when that held a commit back, the sync that ends the hold triggers a heartbeat that
//!   carries it ([`LeaderSync::watch`]). So an entry becomes visible only once it is durable on
//!   the leader and on the followers that acknowledged it: a majority, as Raft requires.
//! - **The saved committed index stays behind the log.** It is written after the entries to the
//!   same write-ahead log, which RocksDB recovers as a prefix.
//! - **A failed sync stops the node.** Its pending writes are never released: apply fails (a
//!   fatal storage error in openraft, which stops the node) and followers never hear the commit.
//!
//! On by default (`RaftConfig::parallel_leader_sync`, `[cluster] parallel_leader_sync`): on a
//! benchmark machine whose disk syncs in about 0.3 ms it raised a lone client's throughput by
//! about a quarter (18-48% in six interleaved pairs) with a p99 closer to etcd's; on one
//! syncing in 0.15 ms it gained 0-12%, within the noise of a run, with the longer p99 in most
//! A/B pairs (docs/benchmarks.md).
//!
//! A membership entry keeps the synced callback: openraft moves a joint configuration on when it
//! sees it committed, and that step must rest on a real majority.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::types::LogId;

/// Writes of a leader reported flushed before their sync, and what waits on them.
#[derive(Debug)]
pub struct LeaderSync {
    state: Mutex<State>,
    /// Bumped after a sync that released pending writes while an apply waited on them
    /// ([`LeaderSync::wait_durable`]), and when a sync fails.
    released: watch::Sender<u64>,
    /// Bumped after a sync that ended a hold on the commit index sent to followers
    /// ([`LeaderSync::watch`]), and when a sync fails. Kept apart from `released` so that
    /// the watcher is not woken by every sync: a lone client's write would otherwise pay one
    /// more thread wake for nothing.
    unheld: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    /// Pending writes by sequence number: the first index each holds and the log ID just
    /// before it (what the commit index sent to followers is held to).
    pending: BTreeMap<u64, (u64, Option<LogId>)>,
    /// A commit index sent to a follower was held back since the last release.
    held: bool,
    failed: bool,
}

/// Why an entry cannot be applied: the leader's sync of it failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the leader's log sync failed; entries it reported written may not be durable")]
pub struct SyncFailed;

impl Default for LeaderSync {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            released: watch::channel(0).0,
            unheld: watch::channel(0).0,
        }
    }
}

impl LeaderSync {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a write of entries from `first_index` on, whose preceding entry is `prev`, as
    /// written but not yet synced. Returns its ticket for [`LeaderSync::synced`], or `None` if
    /// an earlier sync failed (the write must then not be reported flushed).
    pub(crate) fn begin(&self, first_index: u64, prev: Option<LogId>) -> Option<u64> {
        let mut s = self.lock();
        if s.failed {
            return None;
        }
        let seq = s.next_seq;
        s.next_seq += 1;
        s.pending.insert(seq, (first_index, prev));
        Some(seq)
    }

    /// Ends the writes `tickets` after the sync that covers them: released if it succeeded. A
    /// failed sync, with tickets or without, stops early callbacks for good: its writes stay
    /// pending and everything waiting on them fails.
    pub(crate) fn synced(&self, tickets: &[u64], ok: bool) {
        if tickets.is_empty() && ok {
            return;
        }
        let (failed, unheld) = {
            let mut s = self.lock();
            if ok && !s.failed {
                for t in tickets {
                    s.pending.remove(t);
                }
            } else {
                s.failed = true;
            }
            (s.failed, s.held && s.pending.is_empty())
        };
        let bump = |v: &mut u64| *v = v.wrapping_add(1);
        // A waiter subscribes before it checks the state under the lock, so one that checked
        // before this release is counted here, and one that checks after sees the release.
        if failed || self.released.receiver_count() > 0 {
            self.released.send_modify(bump);
        }
        if failed || unheld {
            self.unheld.send_modify(bump);
        }
    }

    /// True if a failed sync stopped this node's early callbacks.
    pub fn failed(&self) -> bool {
        self.lock().failed
    }

    /// Entries up to `index` may be applied: waits until no pending write holds `index` or an
    /// earlier one.
    pub async fn wait_durable(&self, index: u64) -> Result<(), SyncFailed> {
        let mut rx = self.released.subscribe();
        loop {
            {
                let s = self.lock();
                if s.failed {
                    return Err(SyncFailed);
                }
                if s.pending.values().all(|(first, _)| *first > index) {
                    return Ok(());
                }
            }
            if rx.changed().await.is_err() {
                return Err(SyncFailed);
            }
        }
    }

    /// The commit index to send a follower in place of `commit`: held below the first pending
    /// entry, so that no follower applies what is not yet durable on the leader.
    pub fn clamp_commit(&self, commit: Option<LogId>) -> Option<LogId> {
        let mut s = self.lock();
        let Some((first, prev)) = s.pending.values().min_by_key(|(first, _)| *first).copied()
        else {
            return commit;
        };
        match commit {
            Some(c) if c.index >= first => {
                s.held = true;
                prev
            }
            other => other,
        }
    }

    /// Waits for a release that ended a hold on the commit index sent to followers (the caller
    /// then sends them a heartbeat, which carries the commit index). Returns `false` once the
    /// node's sync failed or this `LeaderSync` is gone.
    pub async fn watch(&self) -> bool {
        let mut rx = self.unheld.subscribe();
        loop {
            {
                let mut s = self.lock();
                if s.failed {
                    return false;
                }
                if s.held && s.pending.is_empty() {
                    s.held = false;
                    return true;
                }
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use openraft::CommittedLeaderId;

    use super::*;

    fn id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(2, 1), index)
    }

    #[test]
    fn the_commit_sent_to_followers_stays_below_the_first_pending_entry() {
        let s = LeaderSync::default();
        assert_eq!(s.clamp_commit(Some(id(9))), Some(id(9)), "nothing pending");
        let a = s.begin(10, Some(id(9))).unwrap();
        let b = s.begin(11, Some(id(10))).unwrap();
        assert_eq!(
            s.clamp_commit(Some(id(9))),
            Some(id(9)),
            "below the pending"
        );
        assert_eq!(s.clamp_commit(Some(id(11))), Some(id(9)));
        assert_eq!(s.clamp_commit(None), None);
        // The later write's sync finishing first releases nothing below it.
        s.synced(&[b], true);
        assert_eq!(s.clamp_commit(Some(id(11))), Some(id(9)));
        s.synced(&[a], true);
        assert_eq!(s.clamp_commit(Some(id(11))), Some(id(11)));
    }

    #[test]
    fn a_release_wakes_only_a_waiting_apply_or_the_watcher_of_a_held_commit() {
        let s = LeaderSync::default();
        let a = s.begin(1, None).unwrap();
        s.synced(&[a], true);
        assert_eq!(*s.released.borrow(), 0, "no apply waited");
        assert_eq!(*s.unheld.borrow(), 0, "no commit was held");

        let waiting_apply = s.released.subscribe();
        let b = s.begin(2, Some(id(1))).unwrap();
        s.synced(&[b], true);
        assert_eq!(*s.released.borrow(), 1, "an apply waited");
        assert_eq!(*s.unheld.borrow(), 0);
        drop(waiting_apply);

        let c = s.begin(3, Some(id(2))).unwrap();
        let d = s.begin(4, Some(id(3))).unwrap();
        assert_eq!(s.clamp_commit(Some(id(4))), Some(id(2)));
        s.synced(&[c], true);
        assert_eq!(*s.unheld.borrow(), 0, "still held below entry 4");
        s.synced(&[d], true);
        assert_eq!(*s.unheld.borrow(), 1, "the hold ended");
        assert_eq!(*s.released.borrow(), 1);

        s.synced(&[], false);
        assert_eq!(*s.released.borrow(), 2, "a failure wakes every waiter");
        assert_eq!(*s.unheld.borrow(), 2);
    }

    #[tokio::test]
    async fn apply_waits_for_the_sync_and_fails_after_a_failed_one() {
        let s = Arc::new(LeaderSync::default());
        let a = s.begin(5, Some(id(4))).unwrap();
        // Below the pending write: no wait.
        s.wait_durable(4).await.unwrap();
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.wait_durable(5).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "applied before the leader's sync");
        s.synced(&[a], true);
        waiter.await.unwrap().unwrap();

        let b = s.begin(6, Some(id(5))).unwrap();
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.wait_durable(6).await }
        });
        s.synced(&[b], false);
        assert!(waiter.await.unwrap().is_err());
        assert!(s.failed());
        assert!(
            s.begin(7, Some(id(6))).is_none(),
            "no early callback after a failure"
        );
        assert_eq!(
            s.clamp_commit(Some(id(6))),
            Some(id(5)),
            "a failed write is never released to followers"
        );
    }

    #[tokio::test]
    async fn a_held_commit_asks_for_a_heartbeat_once_released() {
        let s = Arc::new(LeaderSync::default());
        let a = s.begin(3, Some(id(2))).unwrap();
        let w = tokio::spawn({
            let s = s.clone();
            async move { s.watch().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Not held yet: a release alone asks for nothing.
        s.synced(&[a], true);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!w.is_finished());
        let b = s.begin(4, Some(id(3))).unwrap();
        assert_eq!(s.clamp_commit(Some(id(4))), Some(id(3)));
        s.synced(&[b], true);
        assert!(w.await.unwrap());
    }
}
