//! Campaigning on time when the leader goes silent.
//!
//! openraft 0.9 checks the election timer only on its tick, which runs every 1.5 heartbeat
//! intervals (105 ms with the 70 ms default). A follower whose leader died therefore campaigned
//! up to one whole tick after its timeout had passed: 0-105 ms, about 50 ms on average, added
//! to every failover (seen in the servers' logs: a campaign 355 ms after the kill, for a
//! timeout of at most 320 ms).
//!
//! The watchdog checks every [`CHECK_EVERY`] instead, with openraft's own rule: a follower that
//! knows a leader campaigns once it has heard nothing from that leader for the leader lease
//! (`election_timeout_max`) plus a random election timeout in
//! `[election_timeout_min, election_timeout_max)`. It only starts the first campaign after a
//! leader is lost; a candidate that loses is left to openraft's timer, as before. Safety is
//! unchanged: a voter still refuses a vote while its own lease runs, and a campaign is only a
//! vote request.
//!
//! "Heard from the leader" is recorded by the peer service on each AppendEntries or snapshot
//! chunk whose vote is at least this node's (from a stale leader it is not contact), when the
//! request arrives: a follower whose disk stalls while it handles a request still counts the
//! leader as alive, as openraft does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use openraft::ServerState;
use rand::Rng;

use crate::types::{NodeId, Raft, Vote};

/// How often the watchdog looks at the clock.
pub(crate) const CHECK_EVERY: Duration = Duration::from_millis(5);

/// When this node last heard from a leader it accepts.
#[derive(Debug)]
pub(crate) struct LeaderContact {
    base: Instant,
    /// Milliseconds after `base`.
    last_ms: AtomicU64,
}

impl LeaderContact {
    /// Counts the start as contact: a node that was just started waits a whole timeout before
    /// it campaigns, as openraft does.
    pub(crate) fn new() -> Self {
        Self {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn touch(&self) {
        self.last_ms.fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// Records contact if a request carrying `vote` comes from this node's leader or a newer
    /// one (`current` is this node's vote).
    pub(crate) fn heard(&self, vote: &Vote, current: &Vote) {
        if vote >= current {
            self.touch();
        }
    }

    pub(crate) fn silence(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        )
    }
}

/// Whether a node in `state`, that sees `leader` as the leader, should campaign now.
pub(crate) fn should_campaign(
    id: NodeId,
    state: ServerState,
    leader: Option<NodeId>,
    is_voter: bool,
    silence: Duration,
    deadline: Duration,
) -> bool {
    state == ServerState::Follower
        && is_voter
        && leader.is_some_and(|l| l != id)
        && silence >= deadline
}

/// The silence after which to campaign: the leader lease plus a fresh random election timeout.
fn deadline(min: Duration, max: Duration) -> Duration {
    let timeout = if max > min {
        rand::thread_rng().gen_range(min..max)
    } else {
        min
    };
    max + timeout
}

/// Runs until Raft stops.
pub(crate) async fn watch(
    raft: Raft,
    contact: std::sync::Arc<LeaderContact>,
    min: Duration,
    max: Duration,
) {
    let metrics = raft.server_metrics();
    let mut limit = deadline(min, max);
    // The timeout is drawn anew for each leader, so that two followers whose draws happened to
    // be close (and split the vote once) do not stay close for every later failover.
    let mut leader_seen = None;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let campaign = {
            let m = metrics.borrow();
            if m.current_leader != leader_seen {
                leader_seen = m.current_leader;
                limit = deadline(min, max);
            }
            let is_voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == m.id);
            should_campaign(
                m.id,
                m.state,
                m.current_leader,
                is_voter,
                contact.silence(),
                limit,
            )
        };
        if !campaign {
            continue;
        }
        tracing::info!(
            silence_ms = contact.silence().as_millis() as u64,
            "no word from the leader within its lease and an election timeout; campaigning"
        );
        if raft.trigger().elect().await.is_err() {
            // Raft has stopped.
            return;
        }
        // The next campaign, if this one is lost to a new leader that dies too, waits a whole
        // timeout again.
        contact.touch();
        limit = deadline(min, max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn only_a_voting_follower_that_lost_its_leader_campaigns() {
        use ServerState::{Candidate, Follower, Leader, Learner};
        let d = MS(300);
        // (state, leader seen, voter, silence, campaigns, why); this node is 2.
        let cases = [
            (Follower, Some(1), true, 300, true, "the deadline passed"),
            (Follower, Some(1), true, 299, false, "too early"),
            (
                Follower,
                None,
                true,
                900,
                false,
                "no leader known: openraft's timer",
            ),
            (Candidate, Some(1), true, 900, false, "already campaigning"),
            (Leader, Some(2), true, 900, false, "the leader itself"),
            (Learner, Some(1), false, 900, false, "a learner"),
            (Follower, Some(1), false, 900, false, "not a voter"),
            (Follower, Some(2), true, 900, false, "sees itself as leader"),
        ];
        for (state, leader, voter, silence, want, why) in cases {
            assert_eq!(
                should_campaign(2, state, leader, voter, MS(silence), d),
                want,
                "{why}"
            );
        }
    }

    #[test]
    fn the_deadline_is_the_lease_plus_a_timeout_in_range() {
        for _ in 0..200 {
            let d = deadline(MS(80), MS(160));
            assert!(d >= MS(240) && d < MS(320), "{d:?}");
        }
        assert_eq!(deadline(MS(100), MS(100)), MS(200));
    }

    #[test]
    fn contact_counts_only_the_current_or_a_newer_leader() {
        let c = LeaderContact::new();
        let last = |c: &LeaderContact| c.last_ms.load(Ordering::Relaxed);
        let vote = |term, node| Vote::new_committed(term, node);
        std::thread::sleep(MS(20));
        c.heard(&vote(2, 1), &vote(3, 2));
        assert_eq!(last(&c), 0, "a stale leader is not contact");
        assert!(c.silence() >= MS(20));
        c.heard(&vote(3, 2), &vote(3, 2));
        let t1 = last(&c);
        assert!(t1 >= 20, "the current leader is contact");
        std::thread::sleep(MS(20));
        c.heard(&vote(4, 3), &vote(3, 2));
        assert!(last(&c) >= t1 + 20, "so is a newer one");
    }
}
