//! The bounded X509-SVID cache policy (SPIRE's LRU cache, `x509_svid_cache_max_size`).
//!
//! The agent always holds every registration entry authorized to it (they are small), but
//! X509-SVIDs and their keys only for some of them:
//! - every entry an open Workload API stream needs (its *subscribers*) always gets an SVID and is
//!   never evicted, even when that takes the cache past its maximum size (as in SPIRE);
//! - while fewer than [`Budget::prefetch`] SVIDs are held, the agent fetches SVIDs for entries no
//!   workload asked for yet (most recently used first, then by entry ID), so the SVIDs of a small
//!   deployment are all ready before any workload asks;
//! - past [`Budget::max_size`], the least recently used SVIDs that no subscriber needs are
//!   dropped (never used counts as least recent). Their entries stay; a workload that asks for
//!   one again waits while the agent fetches a new SVID.
//!
//! [`plan`] is the pure decision; [`SvidUsage`] is what the Workload API records for it (open
//! streams and when each entry was last served) and how it wakes the sync when a workload waits
//! for an SVID the cache does not hold.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use plinth_spiffe::Selectors;
use tokio::sync::Notify;

/// SPIRE's default `x509_svid_cache_max_size`.
pub const DEFAULT_X509_SVID_CACHE_MAX_SIZE: usize = 1000;

/// How many X509-SVIDs the agent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Past this many SVIDs, unsubscribed least-recently-used ones are evicted.
    pub max_size: usize,
    /// SVIDs are fetched ahead of any request while fewer than this many are held. At most
    /// `max_size`.
    pub prefetch: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            max_size: DEFAULT_X509_SVID_CACHE_MAX_SIZE,
            prefetch: DEFAULT_X509_SVID_CACHE_MAX_SIZE,
        }
    }
}

/// What to change in the SVID cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Entries to fetch an SVID for: subscribed ones first, in `eligible` order, then prefetch.
    pub fetch: Vec<String>,
    /// Entries whose SVID to drop, least recently used first.
    pub evict: Vec<String>,
}

/// Decides which SVIDs to fetch and which to evict.
///
/// - `eligible`: the served entries an SVID may be fetched for now (not waiting for a retry).
/// - `cached`: the served entries that hold a current SVID (a subset of the served entries; it
///   may include entries not in `eligible`).
/// - `protected`: entries an open Workload API stream needs.
/// - `last_used`: a logical time per entry, larger is more recent; absent is never used.
pub fn plan(
    eligible: &[&str],
    cached: &HashSet<&str>,
    protected: &HashSet<&str>,
    last_used: &HashMap<String, u64>,
    budget: Budget,
) -> Plan {
    let mut fetch: Vec<String> = eligible
        .iter()
        .filter(|id| protected.contains(*id) && !cached.contains(*id))
        .map(|id| (*id).to_owned())
        .collect();
    let mut held = cached.len() + fetch.len();

    let prefetch = budget.prefetch.min(budget.max_size);
    if held < prefetch {
        let mut candidates: Vec<(Option<u64>, &str)> = eligible
            .iter()
            .filter(|id| !cached.contains(*id) && !protected.contains(*id))
            .map(|id| (last_used.get(*id).copied(), *id))
            .collect();
        // Most recently used first (Some > None), then entry ID order.
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        let take = prefetch - held;
        fetch.extend(candidates.iter().take(take).map(|(_, id)| (*id).to_owned()));
        held += take.min(candidates.len());
    }

    let mut evict = Vec::new();
    if held > budget.max_size {
        let mut candidates: Vec<(Option<u64>, &str)> = cached
            .iter()
            .filter(|id| !protected.contains(*id))
            .map(|id| (last_used.get(*id).copied(), *id))
            .collect();
        // Least recently used first (None < Some), then entry ID order.
        candidates.sort();
        evict = candidates
            .into_iter()
            .take(held - budget.max_size)
            .map(|(_, id)| id.to_owned())
            .collect();
    }
    Plan { fetch, evict }
}

#[derive(Debug, Default)]
struct UsageInner {
    next_subscriber: u64,
    subscribers: HashMap<u64, Selectors>,
    clock: u64,
    last_used: HashMap<String, u64>,
}

/// What the Workload API tells the SVID cache: which callers have streams open (by their
/// selectors), which entries were served when, and that a caller waits for missing SVIDs.
#[derive(Debug, Default)]
pub struct SvidUsage {
    inner: Mutex<UsageInner>,
    wanted: Notify,
}

impl SvidUsage {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UsageInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an open stream of a caller with `selectors`: while the returned guard lives,
    /// every entry those selectors match keeps (or gets) its SVID.
    pub fn subscribe(self: &Arc<Self>, selectors: Selectors) -> Subscription {
        let mut inner = self.lock();
        let id = inner.next_subscriber;
        inner.next_subscriber += 1;
        inner.subscribers.insert(id, selectors);
        Subscription {
            usage: self.clone(),
            id,
        }
    }

    /// The selectors of every open stream.
    pub fn subscribers(&self) -> Vec<Selectors> {
        self.lock().subscribers.values().cloned().collect()
    }

    /// Number of open streams.
    pub fn subscriber_count(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// Records that the SVIDs of `entry_ids` were just served.
    pub fn touch<'a>(&self, entry_ids: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        for id in entry_ids {
            match inner.last_used.get_mut(id) {
                Some(t) => *t = now,
                None => {
                    inner.last_used.insert(id.to_owned(), now);
                }
            }
        }
    }

    /// When each entry was last served (a logical time; larger is later).
    pub fn last_used(&self) -> HashMap<String, u64> {
        self.lock().last_used.clone()
    }

    /// Forgets entries that no longer exist.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().last_used.retain(|id, _| keep(id));
    }

    /// A caller waits for SVIDs the cache does not hold: wake the sync.
    pub fn want(&self) {
        self.wanted.notify_one();
    }

    /// Completes once [`SvidUsage::want`] was called (at once if it was called since the last
    /// time this completed).
    pub async fn wanted(&self) {
        self.wanted.notified().await;
    }
}

/// An open stream's registration; dropping it ends the protection of its entries.
#[derive(Debug)]
pub struct Subscription {
    usage: Arc<SvidUsage>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.usage.lock().subscribers.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("e{i:03}")).collect()
    }

    fn set<'a>(v: &[&'a str]) -> HashSet<&'a str> {
        v.iter().copied().collect()
    }

    /// The plan for a cache that holds nothing, with no open streams and no use recorded.
    fn plan_empty(eligible: &[&str], budget: Budget) -> Plan {
        plan(
            eligible,
            &HashSet::new(),
            &HashSet::new(),
            &HashMap::new(),
            budget,
        )
    }

    #[test]
    fn prefetches_up_to_the_prefetch_count_in_entry_order() {
        let all = ids(10);
        let eligible: Vec<&str> = all.iter().map(String::as_str).collect();
        let p = plan_empty(
            &eligible,
            Budget {
                max_size: 5,
                prefetch: 3,
            },
        );
        assert_eq!(p.fetch, ["e000", "e001", "e002"]);
        assert!(p.evict.is_empty());

        // Small deployment with the defaults: everything.
        let p = plan_empty(&eligible, Budget::default());
        assert_eq!(p.fetch.len(), 10);

        // A prefetch count above the maximum size is held to it.
        let p = plan_empty(
            &eligible,
            Budget {
                max_size: 4,
                prefetch: 100,
            },
        );
        assert_eq!(p.fetch.len(), 4);
    }

    #[test]
    fn prefetch_prefers_recently_used_entries() {
        let all = ids(6);
        let eligible: Vec<&str> = all.iter().map(String::as_str).collect();
        let used: HashMap<String, u64> = [("e004".to_owned(), 7), ("e005".to_owned(), 9)].into();
        let p = plan(
            &eligible,
            &HashSet::new(),
            &HashSet::new(),
            &used,
            Budget {
                max_size: 3,
                prefetch: 3,
            },
        );
        assert_eq!(p.fetch, ["e005", "e004", "e000"]);
    }

    #[test]
    fn evicts_the_least_recently_used_down_to_the_max_size() {
        let all = ids(6);
        let eligible: Vec<&str> = all.iter().map(String::as_str).collect();
        let cached = set(&["e000", "e001", "e002", "e003"]);
        // e002 never used: oldest. Then e000 (1), e003 (2), e001 (3).
        let used: HashMap<String, u64> = [
            ("e000".to_owned(), 1),
            ("e003".to_owned(), 2),
            ("e001".to_owned(), 3),
        ]
        .into();
        let p = plan(
            &eligible,
            &cached,
            &HashSet::new(),
            &used,
            Budget {
                max_size: 2,
                prefetch: 2,
            },
        );
        assert!(p.fetch.is_empty());
        assert_eq!(p.evict, ["e002", "e000"]);
    }

    #[test]
    fn never_evicts_subscribed_entries_and_fetches_them_beyond_the_max() {
        let all = ids(6);
        let eligible: Vec<&str> = all.iter().map(String::as_str).collect();
        let cached = set(&["e000", "e001"]);
        let protected = set(&["e000", "e001", "e004", "e005"]);
        let p = plan(
            &eligible,
            &cached,
            &protected,
            &HashMap::new(),
            Budget {
                max_size: 2,
                prefetch: 2,
            },
        );
        // Both missing subscribed SVIDs are fetched although the cache is full; nothing can be
        // evicted because every cached SVID is subscribed.
        assert_eq!(p.fetch, ["e004", "e005"]);
        assert!(p.evict.is_empty());

        // With an unsubscribed SVID in the cache, that one makes room.
        let cached = set(&["e000", "e002"]);
        let protected = set(&["e000", "e003"]);
        let used: HashMap<String, u64> = [("e002".to_owned(), 100)].into();
        let p = plan(
            &eligible,
            &cached,
            &protected,
            &used,
            Budget {
                max_size: 2,
                prefetch: 2,
            },
        );
        assert_eq!(p.fetch, ["e003"]);
        assert_eq!(p.evict, ["e002"]);
    }

    #[test]
    fn respects_the_max_size_over_many_rounds() {
        // A workload at a time asks for one entry (subscribes, is served, goes away); the cache
        // never holds more than the maximum once nobody is subscribed.
        let all = ids(50);
        let eligible: Vec<&str> = all.iter().map(String::as_str).collect();
        let budget = Budget {
            max_size: 8,
            prefetch: 4,
        };
        let mut cached: HashSet<&str> = HashSet::new();
        let mut used = HashMap::new();
        for (round, id) in eligible.iter().enumerate() {
            let protected = set(&[*id]);
            let p = plan(&eligible, &cached, &protected, &used, budget);
            for f in &p.fetch {
                cached.insert(eligible.iter().copied().find(|e| *e == f.as_str()).unwrap());
            }
            for e in &p.evict {
                assert_ne!(e.as_str(), *id, "the subscribed entry is never evicted");
                cached.remove(e.as_str());
            }
            assert!(cached.contains(id));
            assert!(cached.len() <= budget.max_size, "round {round}");
            used.insert((*id).to_owned(), round as u64 + 1);
        }
        // The most recent ones survived.
        for id in &eligible[eligible.len() - budget.max_size..] {
            assert!(cached.contains(id), "{id}");
        }
    }

    #[test]
    fn subscriptions_end_when_dropped_and_touch_orders_entries() {
        let usage = Arc::new(SvidUsage::new());
        let a = usage.subscribe(Selectors::parse_all(&["unix:uid:1"]).unwrap());
        let b = usage.subscribe(Selectors::parse_all(&["unix:uid:2"]).unwrap());
        assert_eq!(usage.subscriber_count(), 2);
        drop(a);
        assert_eq!(usage.subscribers().len(), 1);
        drop(b);
        assert_eq!(usage.subscriber_count(), 0);

        usage.touch(["x", "y"]);
        usage.touch(["x"]);
        let used = usage.last_used();
        assert!(used["x"] > used["y"]);
        usage.retain(|id| id == "x");
        assert_eq!(usage.last_used().len(), 1);
    }

    #[tokio::test]
    async fn a_want_before_the_wait_is_not_lost() {
        let usage = SvidUsage::new();
        usage.want();
        tokio::time::timeout(std::time::Duration::from_secs(10), usage.wanted())
            .await
            .expect("the stored wake-up completes at once");
    }
}
