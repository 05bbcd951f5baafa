//! The identity cache the Workload API serves from.
//!
//! It holds the registration entries that apply to workloads on this node, each with its current
//! X509-SVID and private key, the node's own trust bundle and the federated bundles. The sync with
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

/// One published state of the cache. Immutable once published; [`IdentityCache`] hands out
/// `Arc`s of it.
#[derive(Debug, Clone)]
pub struct CacheState {
    bundle: Bundle,
    federated: BundleSet,
    identities: BTreeMap<String, Identity>,
    revision: u64,
}

impl CacheState {
    fn new(bundle: Bundle) -> Self {
        Self {
            bundle,
            federated: BundleSet::new(),
            identities: BTreeMap::new(),
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

    /// Every identity, ordered by entry ID.
    pub fn identities(&self) -> impl Iterator<Item = &Identity> {
        self.identities.values()
    }

    /// The identity of entry `entry_id`.
    pub fn identity(&self, entry_id: &str) -> Option<&Identity> {
        self.identities.get(entry_id)
    }

    /// Increases by one on every published change.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The identities a caller with attested `selectors` is entitled to, ordered by entry ID. When
    /// two entries carry the same non-empty hint only the first is returned, since hints must be
    /// unique within a response (SPIRE does the same).
    pub fn matching(&self, selectors: &Selectors) -> Vec<&Identity> {
        let mut hints = std::collections::BTreeSet::new();
        self.identities
            .values()
            .filter(|i| i.entry.selectors.matched_by(selectors))
            .filter(|i| i.entry.hint.is_empty() || hints.insert(i.entry.hint.as_str()))
            .collect()
    }

    /// The federated bundles the given identities federate with and the cache holds, by trust
    /// domain (a trust domain the cache has no bundle for yet is left out).
    pub fn federated_for<'a>(&'a self, identities: &[&Identity]) -> Vec<&'a Bundle> {
        let mut tds: Vec<&TrustDomain> = identities
            .iter()
            .flat_map(|i| i.entry.federates_with.iter())
            .collect();
        tds.sort();
        tds.dedup();
        tds.into_iter()
            .filter(|td| *td != self.trust_domain())
            .filter_map(|td| self.federated.get(td))
            .collect()
    }

    /// Inserts or replaces the identity of an entry after checking that the SVID names the
    /// entry's SPIFFE ID, lies in this trust domain and matches the private key.
    pub fn put_identity(&mut self, identity: Identity) -> Result<(), CacheError> {
        let entry_id = identity.entry.id.clone();
        if entry_id.is_empty() {
            return Err(CacheError::EmptyEntryId);
        }
        if !identity.entry.spiffe_id.is_member_of(self.trust_domain()) {
            return Err(CacheError::ForeignId {
                entry_id,
                spiffe_id: identity.entry.spiffe_id.to_string(),
                trust_domain: self.trust_domain().to_string(),
            });
        }
        if identity.svid.spiffe_id != identity.entry.spiffe_id {
            return Err(CacheError::SvidIdMismatch {
                entry_id,
                entry_spiffe_id: identity.entry.spiffe_id.to_string(),
                svid_id: identity.svid.spiffe_id.to_string(),
            });
        }
        let leaf = identity
            .svid
            .chain
            .first()
            .ok_or_else(|| CacheError::BadSvid {
                entry_id: entry_id.clone(),
            })?;
        let spki = cert_public_key_spki(leaf).map_err(|_| CacheError::BadSvid {
            entry_id: entry_id.clone(),
        })?;
        if spki != identity.private_key.public_key_spki() {
            return Err(CacheError::KeyMismatch { entry_id });
        }
        self.identities.insert(entry_id, identity);
        self.revision += 1;
        Ok(())
    }

    /// Replaces an entry's fields (selectors, federates_with, hint) and keeps its SVID. Changing
    /// the SPIFFE ID needs a new SVID: use [`CacheState::put_identity`].
    pub fn update_entry(&mut self, entry: Entry) -> Result<(), CacheError> {
        let current = self
            .identities
            .get_mut(&entry.id)
            .ok_or_else(|| CacheError::NoSuchEntry(entry.id.clone()))?;
        if current.entry.spiffe_id != entry.spiffe_id {
            return Err(CacheError::SvidIdMismatch {
                entry_id: entry.id.clone(),
                entry_spiffe_id: entry.spiffe_id.to_string(),
                svid_id: current.entry.spiffe_id.to_string(),
            });
        }
        if current.entry != entry {
            current.entry = entry;
            self.revision += 1;
        }
        Ok(())
    }

    /// Removes an entry and its SVID; false if there was none.
    pub fn remove_entry(&mut self, entry_id: &str) -> bool {
        let removed = self.identities.remove(entry_id).is_some();
        if removed {
            self.revision += 1;
        }
        removed
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

/// The cache: the current [`CacheState`] and a watch channel that publishes every change.
#[derive(Debug)]
pub struct IdentityCache {
    tx: watch::Sender<Arc<CacheState>>,
}

impl IdentityCache {
    /// An empty cache for the trust domain of `bundle`.
    pub fn new(bundle: Bundle) -> Self {
        let (tx, _) = watch::channel(Arc::new(CacheState::new(bundle)));
        Self { tx }
    }

    /// The current state.
    pub fn state(&self) -> Arc<CacheState> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every published state, starting from the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CacheState>> {
        self.tx.subscribe()
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
            .map(|i| i.entry.id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        let only_uid = Selectors::parse_all(&["unix:uid:1"]).unwrap();
        assert_eq!(state.matching(&only_uid).len(), 1);

        // Same hint: the entry that sorts first wins.
        for id in ["a", "b"] {
            let mut e = state.identity(id).unwrap().entry.clone();
            e.hint = "h".into();
            cache.update_entry(e).unwrap();
        }
        let state = cache.state();
        let ids: Vec<&str> = state
            .matching(&caller)
            .iter()
            .map(|i| i.entry.id.as_str())
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
        assert_eq!(got.svid, a.svid);
        e.spiffe_id = SpiffeId::new("spiffe://example.org/other").unwrap();
        assert!(cache.update_entry(e).is_err());
        let mut missing = a.entry.clone();
        missing.id = "zz".into();
        assert_eq!(
            cache.update_entry(missing),
            Err(CacheError::NoSuchEntry("zz".into()))
        );
    }
}
