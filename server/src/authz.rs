//! Authorization: which registration entries an agent may get SVIDs for, and who is an admin.
//!
//! An agent is authorized for entries parented to its own ID, or to a node alias (an entry
//! parented to the server whose selectors the agent's attested selectors include), and,
//! transitively, for entries parented to the SPIFFE ID of an entry it is authorized for.

use std::collections::{BTreeMap, BTreeSet};

use plinth_spiffe::{Selectors, SpiffeId, TrustDomain};
use plinth_storage::{RegistrationEntry, StorageError, Store};

/// The server's own SPIFFE ID, the parent of node alias entries (SPIRE's convention).
pub fn server_id(td: &TrustDomain) -> SpiffeId {
    td.id_from_segments(&["spire", "server"])
        .unwrap_or_else(|_| td.id())
}

/// Entries authorized to an agent with `agent_id` and attested `selectors`, keyed by entry ID.
/// Expired entries (expires_at before `now`) are left out.
pub fn authorized_entries(
    store: &Store,
    td: &TrustDomain,
    agent_id: &SpiffeId,
    selectors: &Selectors,
    now: i64,
) -> Result<BTreeMap<String, RegistrationEntry>, StorageError> {
    let live = |e: &RegistrationEntry| e.expires_at.is_none_or(|x| x > now);
    let mut seen: BTreeSet<SpiffeId> = BTreeSet::new();
    seen.insert(agent_id.clone());
    let mut frontier = vec![agent_id.clone()];
    for alias in store.entries_by_parent(&server_id(td))? {
        if live(&alias)
            && alias.selectors.matched_by(selectors)
            && seen.insert(alias.spiffe_id.clone())
        {
            frontier.push(alias.spiffe_id.clone());
        }
    }
    // Breadth first, one level per store pass: the children of a whole level are read with one
    // index iterator, which matters for agents with very many entries (each entry's SPIFFE ID is
    // a potential parent of the next level).
    let mut out = BTreeMap::new();
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for e in store.entries_by_parents(&frontier)? {
            if !live(&e) {
                continue;
            }
            if seen.insert(e.spiffe_id.clone()) {
                next.push(e.spiffe_id.clone());
            }
            out.insert(e.id.clone(), e);
        }
        frontier = next;
    }
    Ok(out)
}

/// The entry `entry_id` if it is authorized to the agent (the same rule as
/// [`authorized_entries`], decided for one entry by walking up its parents instead of computing
/// the agent's whole set).
pub fn authorized_entry(
    store: &Store,
    td: &TrustDomain,
    agent_id: &SpiffeId,
    selectors: &Selectors,
    entry_id: &str,
    now: i64,
) -> Result<Option<RegistrationEntry>, StorageError> {
    let Some(entry) = store.get_entry(entry_id)? else {
        return Ok(None);
    };
    let live = |e: &RegistrationEntry| e.expires_at.is_none_or(|x| x > now);
    if !live(&entry) {
        return Ok(None);
    }
    // Is `parent` in the agent's set of parent IDs: the agent itself, a node alias it matches,
    // or the SPIFFE ID of an entry authorized to it? Depth first over the parents' parents;
    // an ID seen before on this walk adds nothing (this also ends cycles).
    let server = server_id(td);
    let mut seen: BTreeSet<SpiffeId> = BTreeSet::new();
    let mut stack = vec![entry.parent_id.clone()];
    while let Some(parent) = stack.pop() {
        if &parent == agent_id {
            return Ok(Some(entry));
        }
        if !seen.insert(parent.clone()) {
            continue;
        }
        for holder in store.entries_by_spiffe_id(&parent)? {
            if !live(&holder) {
                continue;
            }
            if holder.parent_id == server {
                if holder.selectors.matched_by(selectors) {
                    return Ok(Some(entry));
                }
            } else {
                stack.push(holder.parent_id.clone());
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use plinth_storage::{Command, Proposal};

    /// A small deterministic generator (no test may depend on luck).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) % n as u64) as usize
        }
    }

    /// On random entry graphs (nested parents, node aliases matched or not, cycles, expired
    /// entries), the one-entry check agrees with the whole-set computation for every entry.
    #[test]
    fn one_entry_check_agrees_with_the_whole_set() {
        let td = TrustDomain::new("example.org").unwrap();
        let agent = SpiffeId::new("spiffe://example.org/spire/agent/a").unwrap();
        let other = "spiffe://example.org/spire/agent/b";
        let agent_sels = Selectors::parse_all(&["unix:uid:1", "k8s:ns:a"]).unwrap();
        let selector_sets: [&[&str]; 4] = [
            &["unix:uid:1"],
            &["k8s:ns:a"],
            &["unix:uid:2"],
            &["unix:uid:1", "k8s:ns:a"],
        ];
        let now = 1_000;
        for seed in 1..=12u64 {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let mut rng = Lcg(seed);
            let pool: Vec<String> = (0..60)
                .map(|k| format!("spiffe://example.org/w/{k}"))
                .collect();
            let aliases: Vec<String> = (0..6)
                .map(|k| format!("spiffe://example.org/alias/{k}"))
                .collect();
            let server = server_id(&td).as_str().to_owned();
            for i in 0..250u64 {
                let parent = match rng.next(10) {
                    0 => agent.as_str().to_owned(),
                    1 => other.to_owned(),
                    2 => server.clone(),
                    3 | 4 => aliases[rng.next(aliases.len())].clone(),
                    _ => pool[rng.next(pool.len())].clone(),
                };
                // Node aliases have alias IDs; everything else workload IDs.
                let spiffe_id = if parent == server {
                    aliases[rng.next(aliases.len())].clone()
                } else {
                    pool[rng.next(pool.len())].clone()
                };
                let entry = RegistrationEntry {
                    expires_at: (rng.next(8) == 0).then_some(now - 1),
                    ..RegistrationEntry::new(
                        format!("e{i}"),
                        SpiffeId::new(&spiffe_id).unwrap(),
                        SpiffeId::new(&parent).unwrap(),
                        Selectors::parse_all(selector_sets[rng.next(4)]).unwrap(),
                    )
                };
                let proposal = Proposal::at(now, Command::EntryCreate { entry });
                store
                    .apply(i + 1, Some(&proposal), &(i + 1).to_be_bytes())
                    .unwrap();
            }
            let all = store.list_entries().unwrap();
            let set = authorized_entries(&store, &td, &agent, &agent_sels, now).unwrap();
            assert!(
                !set.is_empty() && set.len() < all.len(),
                "seed {seed}: a trivial graph"
            );
            for e in &all {
                let one = authorized_entry(&store, &td, &agent, &agent_sels, &e.id, now).unwrap();
                assert_eq!(
                    one.is_some(),
                    set.contains_key(&e.id),
                    "seed {seed}, entry {e:?}"
                );
            }
            assert!(
                authorized_entry(&store, &td, &agent, &agent_sels, "no-such-entry", now)
                    .unwrap()
                    .is_none()
            );
        }
    }
}
