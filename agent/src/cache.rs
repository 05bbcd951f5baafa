//! The identity cache the Workload API serves from.
//!
//! It holds every registration entry that applies to workloads on this node, the current
//! X509-SVID and private key of some of them (all of them in a small deployment; see
//! [`crate::lru`] for which), the node's own trust bundle and the federated bundles. The sync with
//! the server fills it; every change is published as a new immutable [`CacheState`] through a
//! `tokio::sync::watch` channel, so every open Workload API stream sees every change (the full
//! state each time) without polling.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use plinth_spiffe::x509::cert_public_key_spki;
use plinth_spiffe::{
    Bundle, BundleSet, PrivateKey, Selectors, Signer, SpiffeId, TrustDomain, X509Svid,
};
use tokio::sync::watch;

use crate::lru::SvidUsage;

/// Why a change to the cache was refused. The cache is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    #[error("entry {entry_id}: SVID is for {svid_id}, the entry names {entry_spiffe_id}")]
    SvidIdMismatch {
        entry_id: String,
        entry_spiffe_id: String,
        svid_id: String,
    },
    #[error("entry {entry_id}: the private key does not match the SVID's public key")]
    KeyMismatch { entry_id: String },
    #[error("entry {entry_id}: the SVID chain is empty or unreadable")]
    BadSvid { entry_id: String },
    #[error("entry {entry_id}: {spiffe_id} is not in this node's trust domain {trust_domain}")]
    ForeignId {
        entry_id: String,
        spiffe_id: String,
        trust_domain: String,
    },
    #[error("entry ID must not be empty")]
    EmptyEntryId,
    #[error("bundle is for {actual}, this node's trust domain is {expected}")]
    WrongTrustDomain { expected: String, actual: String },
    #[error("{0} is this node's own trust domain, not a federated one")]
    OwnTrustDomain(String),
    #[error("no entry {0} in the cache")]
    NoSuchEntry(String),
}

/// A registration entry as the agent sees it: which workloads (selectors) get which SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry's ID, unique and stable (assigned by the server).
    pub id: String,
    pub spiffe_id: SpiffeId,
    /// All of them must be among the caller's selectors (see [`Selectors::matched_by`]).
    pub selectors: Selectors,
    /// Trust domains whose bundles workloads of this entry receive.
    pub federates_with: Vec<TrustDomain>,
    /// Operator-chosen hint sent with the SVID; empty for none.
    pub hint: String,
}

/// An entry with its current X509-SVID and private key.
#[derive(Clone)]
pub struct Identity {
    pub entry: Entry,
    pub svid: X509Svid,
    pub private_key: Arc<PrivateKey>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The private key is never printed.
        f.debug_struct("Identity")
            .field("entry", &self.entry)
            .field("not_after", &self.svid.not_after)
            .finish_non_exhaustive()
    }
}

/// An X509-SVID and its private key, as the cache holds them for an entry.
#[derive(Clone)]
pub struct CachedSvid {
    pub svid: X509Svid,
    pub private_key: Arc<PrivateKey>,
}

impl fmt::Debug for CachedSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedSvid")
            .field("spiffe_id", &self.svid.spiffe_id)
            .field("not_after", &self.svid.not_after)
            .finish_non_exhaustive()
    }
}

/// An entry of the cache together with its cached SVID.
#[derive(Debug, Clone, Copy)]
pub struct IdentityRef<'a> {
    pub entry: &'a Entry,
    pub svid: &'a X509Svid,
    pub private_key: &'a Arc<PrivateKey>,
}

/// One published state of the cache. Immutable once published; [`IdentityCache`] hands out
/// `Arc`s of it. The maps are shared between states until one of them changes, so publishing a
/// change costs one copy of the map that changed (of pointers, not of entries or SVIDs).
#[derive(Debug, Clone)]
pub struct CacheState {
    bundle: Bundle,
    federated: BundleSet,
    /// Every entry this node serves, by entry ID.
    entries: Arc<BTreeMap<String, Arc<Entry>>>,
    /// The X509-SVIDs held, by entry ID: a subset of `entries` (see [`crate::lru`]).
    svids: Arc<BTreeMap<String, Arc<CachedSvid>>>,
    revision: u64,
}

impl CacheState {
    fn new(bundle: Bundle) -> Self {
        Self {
            bundle,
            federated: BundleSet::new(),
            entries: Arc::default(),
            svids: Arc::default(),
            revision: 0,
        }
    }

    /// This node's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.bundle.trust_domain()
    }

    /// This node's own trust bundle.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// Bundles of federated trust domains.
    pub fn federated_bundles(&self) -> &BundleSet {
        &self.federated
    }

    /// Every entry, with or without an SVID, ordered by entry ID.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values().map(|e| e.as_ref())
    }

    /// Entry `entry_id`.
    pub fn entry(&self, entry_id: &str) -> Option<&Entry> {
        self.entries.get(entry_id).map(|e| e.as_ref())
    }

    /// Entry `entry_id` as held (shared).
    pub fn entry_arc(&self, entry_id: &str) -> Option<&Arc<Entry>> {
        self.entries.get(entry_id)
    }

    /// Number of entries.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Number of X509-SVIDs held.
    pub fn svid_count(&self) -> usize {
        self.svids.len()
    }

    /// Every entry that holds an SVID, ordered by entry ID.
    pub fn identities(&self) -> impl Iterator<Item = IdentityRef<'_>> {
        self.svids
            .iter()
            .filter_map(|(id, s)| self.join(self.entries.get(id)?, s))
    }

    fn join<'a>(
        &'a self,
        entry: &'a Arc<Entry>,
        s: &'a Arc<CachedSvid>,
    ) -> Option<IdentityRef<'a>> {
        Some(IdentityRef {
            entry,
            svid: &s.svid,
            private_key: &s.private_key,
        })
    }

    /// The identity of entry `entry_id`, if it holds an SVID.
    pub fn identity(&self, entry_id: &str) -> Option<IdentityRef<'_>> {
        self.join(self.entries.get(entry_id)?, self.svids.get(entry_id)?)
    }

    /// True if entry `entry_id` holds an SVID.
    pub fn has_svid(&self, entry_id: &str) -> bool {
        self.svids.contains_key(entry_id)
    }

    /// Increases by one on every published change.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The entries a caller with attested `selectors` is entitled to, ordered by entry ID,
    /// whether or not they hold an SVID yet. When two entries carry the same non-empty hint only
    /// the first is returned, since hints must be unique within a response (SPIRE does the same).
    pub fn matching(&self, selectors: &Selectors) -> Vec<&Entry> {
        let mut hints = std::collections::BTreeSet::new();
        self.entries
            .values()
            .map(|e| e.as_ref())
            .filter(|e| e.selectors.matched_by(selectors))
            .filter(|e| e.hint.is_empty() || hints.insert(e.hint.as_str()))
            .collect()
    }

    /// The federated bundles the given entries federate with and the cache holds, by trust
    /// domain (a trust domain the cache has no bundle for yet is left out).
    pub fn federated_for<'a>(&'a self, entries: &[&Entry]) -> Vec<&'a Bundle> {
        let mut tds: Vec<&TrustDomain> = entries
            .iter()
            .flat_map(|e| e.federates_with.iter())
            .collect();
        tds.sort();
        tds.dedup();
        tds.into_iter()
            .filter(|td| *td != self.trust_domain())
            .filter_map(|td| self.federated.get(td))
            .collect()
    }

    fn check_entry(&self, entry: &Entry) -> Result<(), CacheError> {
        if entry.id.is_empty() {
            return Err(CacheError::EmptyEntryId);
        }
        if !entry.spiffe_id.is_member_of(self.trust_domain()) {
            return Err(CacheError::ForeignId {
                entry_id: entry.id.clone(),
                spiffe_id: entry.spiffe_id.to_string(),
                trust_domain: self.trust_domain().to_string(),
            });
        }
        Ok(())
    }

    fn check_svid(entry: &Entry, svid: &CachedSvid) -> Result<(), CacheError> {
        let entry_id = entry.id.clone();
        if svid.svid.spiffe_id != entry.spiffe_id {
            return Err(CacheError::SvidIdMismatch {
                entry_id,
                entry_spiffe_id: entry.spiffe_id.to_string(),
                svid_id: svid.svid.spiffe_id.to_string(),
            });
        }
        let leaf = svid.svid.chain.first().ok_or_else(|| CacheError::BadSvid {
            entry_id: entry_id.clone(),
        })?;
        let spki = cert_public_key_spki(leaf).map_err(|_| CacheError::BadSvid {
            entry_id: entry_id.clone(),
        })?;
        if spki != svid.private_key.public_key_spki() {
            return Err(CacheError::KeyMismatch { entry_id });
        }
        Ok(())
    }

    /// Inserts or replaces an entry together with its SVID, after checking that the SVID names
    /// the entry's SPIFFE ID, lies in this trust domain and matches the private key.
    pub fn put_identity(&mut self, identity: Identity) -> Result<(), CacheError> {
        self.check_entry(&identity.entry)?;
        let svid = CachedSvid {
            svid: identity.svid,
            private_key: identity.private_key,
        };
        Self::check_svid(&identity.entry, &svid)?;
        let id = identity.entry.id.clone();
        Arc::make_mut(&mut self.entries).insert(id.clone(), Arc::new(identity.entry));
        Arc::make_mut(&mut self.svids).insert(id, Arc::new(svid));
        self.revision += 1;
        Ok(())
    }

    /// Inserts or replaces the SVID of an entry the cache holds (checked as in
    /// [`CacheState::put_identity`]).
    pub fn put_svid(&mut self, entry_id: &str, svid: CachedSvid) -> Result<(), CacheError> {
        let entry = self
            .entries
            .get(entry_id)
            .ok_or_else(|| CacheError::NoSuchEntry(entry_id.to_owned()))?;
        Self::check_svid(entry, &svid)?;
        Arc::make_mut(&mut self.svids).insert(entry_id.to_owned(), Arc::new(svid));
        self.revision += 1;
        Ok(())
    }

    /// Drops the SVID of an entry and keeps the entry (eviction); false if it held none.
    pub fn remove_svid(&mut self, entry_id: &str) -> bool {
        if !self.svids.contains_key(entry_id) {
            return false;
        }
        Arc::make_mut(&mut self.svids).remove(entry_id);
        self.revision += 1;
        true
    }

    /// Inserts or replaces an entry. A changed SPIFFE ID drops the entry's SVID (it names the
    /// old ID); other changes keep it.
    pub fn put_entry(&mut self, entry: Arc<Entry>) -> Result<(), CacheError> {
        self.check_entry(&entry)?;
        match self.entries.get(&entry.id) {
            Some(current) if Arc::ptr_eq(current, &entry) || **current == *entry => return Ok(()),
            Some(current)
                if current.spiffe_id != entry.spiffe_id && self.svids.contains_key(&entry.id) =>
            {
                Arc::make_mut(&mut self.svids).remove(&entry.id);
            }
            _ => {}
        }
        Arc::make_mut(&mut self.entries).insert(entry.id.clone(), entry);
        self.revision += 1;
        Ok(())
    }

    /// Replaces an entry's fields (selectors, federates_with, hint) and keeps its SVID. Changing
    /// the SPIFFE ID needs a new SVID: use [`CacheState::put_identity`].
    pub fn update_entry(&mut self, entry: Entry) -> Result<(), CacheError> {
        let current = self
            .entries
            .get(&entry.id)
            .ok_or_else(|| CacheError::NoSuchEntry(entry.id.clone()))?;
        if current.spiffe_id != entry.spiffe_id {
            return Err(CacheError::SvidIdMismatch {
                entry_id: entry.id.clone(),
                entry_spiffe_id: entry.spiffe_id.to_string(),
                svid_id: current.spiffe_id.to_string(),
            });
        }
        self.put_entry(Arc::new(entry))
    }

    /// Removes an entry and its SVID; false if there was none.
    pub fn remove_entry(&mut self, entry_id: &str) -> bool {
        if !self.entries.contains_key(entry_id) {
            return false;
        }
        Arc::make_mut(&mut self.entries).remove(entry_id);
        if self.svids.contains_key(entry_id) {
            Arc::make_mut(&mut self.svids).remove(entry_id);
        }
        self.revision += 1;
        true
    }

    /// Replaces this node's own bundle (same trust domain).
    pub fn set_bundle(&mut self, bundle: Bundle) -> Result<(), CacheError> {
        if bundle.trust_domain() != self.trust_domain() {
            return Err(CacheError::WrongTrustDomain {
                expected: self.trust_domain().to_string(),
                actual: bundle.trust_domain().to_string(),
            });
        }
        if bundle != self.bundle {
            self.bundle = bundle;
            self.revision += 1;
        }
        Ok(())
    }

    /// Inserts or replaces the bundle of a federated trust domain.
    pub fn set_federated_bundle(&mut self, bundle: Bundle) -> Result<(), CacheError> {
        if bundle.trust_domain() == self.trust_domain() {
            return Err(CacheError::OwnTrustDomain(
                bundle.trust_domain().to_string(),
            ));
        }
        if self.federated.get(bundle.trust_domain()) != Some(&bundle) {
            self.federated.insert(bundle);
            self.revision += 1;
        }
        Ok(())
    }

    /// Drops the bundle of a federated trust domain; false if there was none.
    pub fn remove_federated_bundle(&mut self, td: &TrustDomain) -> bool {
        if self.federated.get(td).is_none() {
            return false;
        }
        let mut rest = BundleSet::new();
        for b in self.federated.iter().filter(|b| b.trust_domain() != td) {
            rest.insert(b.clone());
        }
        self.federated = rest;
        self.revision += 1;
        true
    }
}

/// The cache: the current [`CacheState`], a watch channel that publishes every change, and the
/// Workload API's [`SvidUsage`] that decides which SVIDs are kept (see [`crate::lru`]).
#[derive(Debug)]
pub struct IdentityCache {
    tx: watch::Sender<Arc<CacheState>>,
    usage: Arc<SvidUsage>,
}

impl IdentityCache {
    /// An empty cache for the trust domain of `bundle`.
    pub fn new(bundle: Bundle) -> Self {
        let (tx, _) = watch::channel(Arc::new(CacheState::new(bundle)));
        Self {
            tx,
            usage: Arc::new(SvidUsage::new()),
        }
    }

    /// The current state.
    pub fn state(&self) -> Arc<CacheState> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every published state, starting from the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CacheState>> {
        self.tx.subscribe()
    }

    /// Open streams, use times and requests for missing SVIDs.
    pub fn usage(&self) -> &Arc<SvidUsage> {
        &self.usage
    }

    /// Applies `f` to a copy of the state and publishes the copy in one step if `f` succeeded and
    /// changed anything. Use it to apply a batch from the server atomically: streams then see the
    /// batch as one change.
    pub fn modify<R>(
        &self,
        f: impl FnOnce(&mut CacheState) -> Result<R, CacheError>,
    ) -> Result<R, CacheError> {
        let mut result = None;
        self.tx.send_if_modified(|current| {
            let mut next = CacheState::clone(current);
            let before = next.revision;
            let r = f(&mut next);
            let changed = r.is_ok() && next.revision != before;
            if changed {
                next.revision = current.revision + 1;
                *current = Arc::new(next);
            }
            result = Some(r);
            changed
        });
        result.expect("send_if_modified always runs its closure")
    }

    /// See [`CacheState::put_identity`].
    pub fn put_identity(&self, identity: Identity) -> Result<(), CacheError> {
        self.modify(|s| s.put_identity(identity))
    }

    /// See [`CacheState::update_entry`].
    pub fn update_entry(&self, entry: Entry) -> Result<(), CacheError> {
        self.modify(|s| s.update_entry(entry))
    }

    /// See [`CacheState::remove_entry`].
    pub fn remove_entry(&self, entry_id: &str) -> bool {
        self.modify(|s| Ok(s.remove_entry(entry_id)))
            .unwrap_or(false)
    }

    /// See [`CacheState::set_bundle`].
    pub fn set_bundle(&self, bundle: Bundle) -> Result<(), CacheError> {
        self.modify(|s| s.set_bundle(bundle))
    }

    /// See [`CacheState::set_federated_bundle`].
    pub fn set_federated_bundle(&self, bundle: Bundle) -> Result<(), CacheError> {
        self.modify(|s| s.set_federated_bundle(bundle))
    }

    /// See [`CacheState::remove_federated_bundle`].
    pub fn remove_federated_bundle(&self, td: &TrustDomain) -> bool {
        self.modify(|s| Ok(s.remove_federated_bundle(td)))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use plinth_spiffe::{CaTemplate, KeyType, SvidRequest, X509Authority};
    use time::OffsetDateTime;

    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap()
    }

    fn make_ca(td: &str) -> (X509Authority, Bundle) {
        let td = TrustDomain::new(td).unwrap();
        let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        let tmpl = CaTemplate::new(td.clone(), now(), Duration::from_secs(3600));
        let der = plinth_spiffe::x509::self_signed_ca(&tmpl, key.clone()).unwrap();
        let mut bundle = Bundle::new(td);
        bundle.add_x509_authority(der.clone()).unwrap();
        (X509Authority::new(der, vec![], key).unwrap(), bundle)
    }

    fn identity(ca: &X509Authority, entry_id: &str, id: &str, selectors: &[&str]) -> Identity {
        let spiffe_id = SpiffeId::new(id).unwrap();
        let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        let svid = ca
            .sign_svid(
                &SvidRequest {
                    spiffe_id: &spiffe_id,
                    public_key_spki: key.public_key_spki(),
                    ttl: Duration::from_secs(600),
                    dns_names: &[],
                },
                now(),
            )
            .unwrap();
        Identity {
            entry: Entry {
                id: entry_id.into(),
                spiffe_id,
                selectors: Selectors::parse_all(selectors).unwrap(),
                federates_with: vec![],
                hint: String::new(),
            },
            svid,
            private_key: key,
        }
    }

    #[test]
    fn refuses_inconsistent_identities_and_leaves_the_state_unchanged() {
        let (ca, bundle) = make_ca("example.org");
        let cache = IdentityCache::new(bundle);
        let good = identity(&ca, "e1", "spiffe://example.org/a", &["unix:uid:1"]);

        let mut wrong_id = good.clone();
        wrong_id.entry.spiffe_id = SpiffeId::new("spiffe://example.org/b").unwrap();
        assert!(matches!(
            cache.put_identity(wrong_id),
            Err(CacheError::SvidIdMismatch { .. })
        ));
        let mut wrong_key = good.clone();
        wrong_key.private_key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        assert!(matches!(
            cache.put_identity(wrong_key),
            Err(CacheError::KeyMismatch { .. })
        ));
        let (other_ca, _) = make_ca("other.org");
        let foreign = identity(&other_ca, "e2", "spiffe://other.org/a", &["unix:uid:1"]);
        assert!(matches!(
            cache.put_identity(foreign),
            Err(CacheError::ForeignId { .. })
        ));
        let mut no_id = good.clone();
        no_id.entry.id = String::new();
        assert_eq!(cache.put_identity(no_id), Err(CacheError::EmptyEntryId));
        assert_eq!(cache.state().revision(), 0, "nothing was published");

        cache.put_identity(good).unwrap();
        assert_eq!(cache.state().revision(), 1);
    }

    #[test]
    fn matching_follows_selectors_and_hint_uniqueness() {
        let (ca, bundle) = make_ca("example.org");
        let cache = IdentityCache::new(bundle);
        cache
            .put_identity(identity(
                &ca,
                "b",
                "spiffe://example.org/b",
                &["unix:uid:1"],
            ))
            .unwrap();
        cache
            .put_identity(identity(
                &ca,
                "a",
                "spiffe://example.org/a",
                &["unix:uid:1", "unix:gid:2"],
            ))
            .unwrap();
        let caller = Selectors::parse_all(&["unix:uid:1", "unix:gid:2", "unix:gid:3"]).unwrap();
        let state = cache.state();
        let ids: Vec<&str> = state
            .matching(&caller)
            .iter()
            .map(|e| e.id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        let only_uid = Selectors::parse_all(&["unix:uid:1"]).unwrap();
        assert_eq!(state.matching(&only_uid).len(), 1);

        // Same hint: the entry that sorts first wins.
        for id in ["a", "b"] {
            let mut e = state.entry(id).unwrap().clone();
            e.hint = "h".into();
            cache.update_entry(e).unwrap();
        }
        let state = cache.state();
        let ids: Vec<&str> = state
            .matching(&caller)
            .iter()
            .map(|e| e.id.as_str())
            .collect();
        assert_eq!(ids, ["a"]);
    }

    #[tokio::test]
    async fn a_batch_is_published_once_and_a_failed_batch_not_at_all() {
        let (ca, bundle) = make_ca("example.org");
        let (_, partner) = make_ca("partner.org");
        let cache = IdentityCache::new(bundle);
        let mut rx = cache.subscribe();
        rx.borrow_and_update();
        let (a, b) = (
            identity(&ca, "a", "spiffe://example.org/a", &["unix:uid:1"]),
            identity(&ca, "b", "spiffe://example.org/b", &["unix:uid:1"]),
        );
        cache
            .modify(|s| {
                s.put_identity(a)?;
                s.put_identity(b)?;
                s.set_federated_bundle(partner.clone())
            })
            .unwrap();
        assert!(rx.has_changed().unwrap());
        let seen = rx.borrow_and_update().clone();
        assert_eq!(seen.identities().count(), 2);
        assert_eq!(seen.federated_bundles().len(), 1);
        assert_eq!(seen.revision(), 1, "one batch, one revision");

        let err = cache.modify(|s| {
            s.remove_entry("a");
            s.set_bundle(partner.clone())
        });
        assert!(matches!(err, Err(CacheError::WrongTrustDomain { .. })));
        assert!(
            !rx.has_changed().unwrap(),
            "a failed batch publishes nothing"
        );
        assert!(cache.state().identity("a").is_some());

        // No-op changes publish nothing either.
        assert!(!cache.remove_entry("nope"));
        cache.set_federated_bundle(partner.clone()).unwrap();
        assert!(!rx.has_changed().unwrap());

        assert!(cache.remove_federated_bundle(partner.trust_domain()));
        assert!(rx.has_changed().unwrap());
        assert!(cache.state().federated_bundles().is_empty());
        assert!(matches!(
            cache.set_federated_bundle(cache.state().bundle().clone()),
            Err(CacheError::OwnTrustDomain(_))
        ));
    }

    #[test]
    fn update_entry_keeps_the_svid_and_refuses_a_new_spiffe_id() {
        let (ca, bundle) = make_ca("example.org");
        let cache = IdentityCache::new(bundle);
        let a = identity(&ca, "a", "spiffe://example.org/a", &["unix:uid:1"]);
        cache.put_identity(a.clone()).unwrap();
        let mut e = a.entry.clone();
        e.selectors = Selectors::parse_all(&["unix:uid:2"]).unwrap();
        cache.update_entry(e.clone()).unwrap();
        let state = cache.state();
        let got = state.identity("a").unwrap();
        assert_eq!(got.entry.selectors, e.selectors);
        assert_eq!(*got.svid, a.svid);
        e.spiffe_id = SpiffeId::new("spiffe://example.org/other").unwrap();
        assert!(cache.update_entry(e).is_err());
        let mut missing = a.entry.clone();
        missing.id = "zz".into();
        assert_eq!(
            cache.update_entry(missing),
            Err(CacheError::NoSuchEntry("zz".into()))
        );
    }

    #[test]
    fn entries_are_held_without_svids_and_evicting_keeps_the_entry() {
        let (ca, bundle) = make_ca("example.org");
        let cache = IdentityCache::new(bundle);
        let a = identity(&ca, "a", "spiffe://example.org/a", &["unix:uid:1"]);
        // An entry alone: matched, but no identity to serve yet.
        cache
            .modify(|s| s.put_entry(Arc::new(a.entry.clone())))
            .unwrap();
        let caller = Selectors::parse_all(&["unix:uid:1"]).unwrap();
        let state = cache.state();
        assert_eq!(state.matching(&caller).len(), 1);
        assert!(state.identity("a").is_none());
        assert_eq!((state.entry_count(), state.svid_count()), (1, 0));

        let svid = CachedSvid {
            svid: a.svid.clone(),
            private_key: a.private_key.clone(),
        };
        cache.modify(|s| s.put_svid("a", svid.clone())).unwrap();
        assert_eq!(cache.state().svid_count(), 1);
        // An SVID for an entry the cache does not hold, or one naming another ID, is refused.
        assert_eq!(
            cache.modify(|s| s.put_svid("zz", svid.clone())),
            Err(CacheError::NoSuchEntry("zz".into()))
        );

        // Eviction drops the SVID, not the entry.
        assert!(cache.modify(|s| Ok(s.remove_svid("a"))).unwrap());
        let state = cache.state();
        assert_eq!((state.entry_count(), state.svid_count()), (1, 0));
        assert!(!cache.modify(|s| Ok(s.remove_svid("a"))).unwrap());

        // A new SPIFFE ID for the entry drops its SVID (it names the old ID); other changes keep it.
        cache.modify(|s| s.put_svid("a", svid.clone())).unwrap();
        let mut changed = a.entry.clone();
        changed.hint = "h".into();
        cache
            .modify(|s| s.put_entry(Arc::new(changed.clone())))
            .unwrap();
        assert!(cache.state().has_svid("a"));
        changed.spiffe_id = SpiffeId::new("spiffe://example.org/other").unwrap();
        cache.modify(|s| s.put_entry(Arc::new(changed))).unwrap();
        assert!(!cache.state().has_svid("a"));
        assert_eq!(cache.state().entry_count(), 1);
    }
}
