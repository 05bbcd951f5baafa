//! Authorization: which registration entries an agent may get SVIDs for, and who is an admin.
//!
//! An agent is authorized for entries parented to its own ID, or to a node alias (an entry
//! parented to the server whose selectors the agent's attested selectors include), and,
//! transitively, for entries parented to the SPIFFE ID of an entry it is authorized for.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

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
    let mut parents: VecDeque<SpiffeId> = VecDeque::new();
    let mut seen: BTreeSet<SpiffeId> = BTreeSet::new();
    parents.push_back(agent_id.clone());
    seen.insert(agent_id.clone());
    for alias in store.entries_by_parent(&server_id(td))? {
        if live(&alias)
            && alias.selectors.matched_by(selectors)
            && seen.insert(alias.spiffe_id.clone())
        {
            parents.push_back(alias.spiffe_id.clone());
        }
    }
    let mut out = BTreeMap::new();
    while let Some(parent) = parents.pop_front() {
        for e in store.entries_by_parent(&parent)? {
            if !live(&e) {
                continue;
            }
            if seen.insert(e.spiffe_id.clone()) {
                parents.push_back(e.spiffe_id.clone());
            }
            out.insert(e.id.clone(), e);
        }
    }
    Ok(out)
}
