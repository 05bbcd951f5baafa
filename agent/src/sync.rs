//! The sync with the server: the authorized-entries stream in, SVIDs signed for keys made here,
//! the [`IdentityCache`] filled, each SVID rotated at half-life (with jitter), bundles pushed.
//!
//! One [`Syncer`] lives as long as the agent; each connection to a server is one *session*
//! ([`Syncer::run_session`]). What the syncer knows (the entries, which SVID was issued for
//! which entry settings, when to rotate) outlives sessions. A new session resumes: it tells the
//! server which entries it holds at which revisions and gets only what changed (after a server
//! failover every agent reconnects at once, and 100 000 entries are about 20 MB each), and
//! unchanged entries cost no new SVIDs. A large update arrives in parts of about 1 MiB and is
//! applied once whole.
//!
//! ## Which entries this agent serves
//! The server sends every entry reachable from the agent: parented to the agent, to a node alias
//! of it, or to another sent entry (nested, for downstream use). The agent serves an entry when
//! its parent is one of its *node IDs*:
//! 1. the agent's own SPIFFE ID;
//! 2. the SPIFFE ID of a sent entry parented to the agent whose selectors are all of type
//!    `spiffe_id` (a join-token alias, `token generate -spiffeID`); such alias entries are not
//!    served themselves (no workload has `spiffe_id` selectors);
//! 3. a parent ID of a sent entry that names no sent entry: a node alias the server matched
//!    against the agent's selectors (the server does not send the alias entry itself).
//!
//! Entries whose parent is another sent entry's SPIFFE ID are nested and are not served. (An
//! alias ID that is also the SPIFFE ID of a sent workload entry counts as nested: keep alias IDs
//! and workload IDs apart.)

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use plinth_api::server as pb;
use plinth_api::server::entry_service_client::EntryServiceClient;
use plinth_api::server::svid_service_client::SvidServiceClient;
use plinth_spiffe::tls::BundleHolder;
use plinth_spiffe::x509::{cert_not_after, spiffe_id_of};
use plinth_spiffe::{
    Bundle, BundleSet, Csr, KeyType, PrivateKey, Selector, Selectors, SpiffeId, TrustDomain,
    X509Svid,
};
use rand::Rng;
use time::OffsetDateTime;
use tonic::transport::Channel;

use crate::cache::{CachedSvid, Entry, Identity, IdentityCache};
use crate::jwt::{BoxFuture, JwtSourceError, JwtSvid, JwtSvidCache, JwtSvidSource};
use crate::lru::{self, Budget};
use crate::node::{bundle_from_proto, is_refusal};
use crate::store::DataDir;

/// CSRs per `BatchNewX509Svid` call (the server takes at most 1000).
pub const SVID_BATCH_SIZE: usize = 500;
/// Batches in flight at once during a large sync.
pub const SVID_BATCHES_IN_FLIGHT: usize = 4;
/// When an entry's SVID could not be had, ask again after this long.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long one SVID batch may take.
pub const BATCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest entry-stream message accepted. The server splits a large update (a full set of
/// 100 000 entries is about 20 MB) into parts of about 1 MiB; what else a part carries is the
/// trust bundle and the federated bundles.
pub const MAX_SYNC_MESSAGE_LEN: usize = 32 * 1024 * 1024;
/// Most held entries reported to the server when a session resumes (the server's bound); an
/// agent holding more asks for a full set.
pub const MAX_KNOWN_SENT: usize = 1_000_000;
/// SVIDs are renewed at a random point between this fraction of their lifetime and half of it.
pub const ROTATE_EARLIEST: f64 = 0.4;

/// Why a session ended badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The server refused this agent outright (unknown, banned, SVID no longer current).
    #[error("the server refused the agent: {0}")]
    Refused(String),
    /// The server went away or failed; reconnect (to another server).
    #[error("{0}")]
    Unavailable(String),
}

fn status_err(what: &str, s: tonic::Status) -> SyncError {
    let msg = format!("{what}: {:?}: {}", s.code(), s.message());
    if s.code() == tonic::Code::PermissionDenied || s.code() == tonic::Code::Unauthenticated {
        SyncError::Refused(msg)
    } else {
        SyncError::Unavailable(msg)
    }
}

/// Why a session ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The agent SVID reached its renewal time: renew it and reconnect with the new one.
    RenewAgent,
}

/// A point in `[ROTATE_EARLIEST, 0.5]` of the way from `not_before` to `not_after`: renewal
/// before half-life, so that an outage shorter than half the TTL never reaches workloads, with
/// jitter so that SVIDs issued together are not renewed together.
pub fn rotation_time(not_before: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    let life = (not_after - not_before).max(time::Duration::ZERO);
    let frac = rand::thread_rng().gen_range(ROTATE_EARLIEST..=0.5);
    not_before + life * frac
}

/// The notBefore of a DER certificate.
pub fn cert_not_before(der: &[u8]) -> Option<OffsetDateTime> {
    use x509_parser::prelude::FromDer;
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(c.validity().not_before.to_datetime())
}

/// The entries this agent serves out of everything the server sent (see the module docs).
pub fn servable<'a>(
    agent_id: &str,
    entries: &'a BTreeMap<String, pb::Entry>,
) -> BTreeMap<&'a str, &'a pb::Entry> {
    let ids: HashSet<&str> = entries.values().map(|e| e.spiffe_id.as_str()).collect();
    let is_alias = |e: &pb::Entry| {
        e.parent_id == agent_id
            && !e.selectors.is_empty()
            && e.selectors.iter().all(|s| s.r#type == "spiffe_id")
    };
    let mut nodes: HashSet<&str> = HashSet::new();
    nodes.insert(agent_id);
    for e in entries.values() {
        if is_alias(e) {
            nodes.insert(e.spiffe_id.as_str());
        }
        if !ids.contains(e.parent_id.as_str()) {
            nodes.insert(e.parent_id.as_str());
        }
    }
    entries
        .iter()
        .filter(|(_, e)| nodes.contains(e.parent_id.as_str()) && !is_alias(e))
        .map(|(id, e)| (id.as_str(), e))
        .collect()
}

fn wire_td(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s.strip_prefix("spiffe://").unwrap_or(s)).map_err(|e| e.to_string())
}

/// A wire entry as the cache's entry.
pub fn entry_from_proto(e: &pb::Entry) -> Result<Entry, String> {
    let spiffe_id = SpiffeId::new(&e.spiffe_id).map_err(|err| format!("spiffe_id: {err}"))?;
    let mut selectors = Selectors::new();
    for s in &e.selectors {
        selectors.insert(Selector::new(&s.r#type, &s.value).map_err(|err| err.to_string())?);
    }
    if selectors.is_empty() {
        return Err("entry has no selectors".into());
    }
    let federates_with = e
        .federates_with
        .iter()
        .map(|t| wire_td(t))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Entry {
        id: e.id.clone(),
        spiffe_id,
        selectors,
        federates_with,
        hint: e.hint.clone(),
    })
}

/// The entry settings an SVID was issued for; a change to any of them needs a new SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SvidParams {
    spiffe_id: String,
    x509_svid_ttl: i32,
    dns_names: Vec<String>,
}

impl SvidParams {
    fn matches(&self, e: &pb::Entry) -> bool {
        self.spiffe_id == e.spiffe_id
            && self.x509_svid_ttl == e.x509_svid_ttl
            && self.dns_names == e.dns_names
    }

    fn of(e: &pb::Entry) -> Self {
        Self {
            spiffe_id: e.spiffe_id.clone(),
            x509_svid_ttl: e.x509_svid_ttl,
            dns_names: e.dns_names.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct Issued {
    params: SvidParams,
    rotate_at: OffsetDateTime,
}

/// What fetching SVIDs for a set of entries gave.
struct Fetched {
    identities: Vec<(Identity, SvidParams, OffsetDateTime)>,
    failed: Vec<(String, String)>,
    error: Option<SyncError>,
}

/// Gets JWT-SVIDs from the server (`NewJwtSvid`) over the current connection.
#[derive(Debug)]
pub struct ServerJwtSource {
    cache: Arc<IdentityCache>,
    channel: RwLock<Option<Channel>>,
}

impl ServerJwtSource {
    pub fn new(cache: Arc<IdentityCache>) -> Self {
        Self {
            cache,
            channel: RwLock::new(None),
        }
    }

    /// The connection to use from now on (`None`: no server reachable).
    pub fn set_channel(&self, ch: Option<Channel>) {
        *self.channel.write().unwrap_or_else(|p| p.into_inner()) = ch;
    }
}

impl JwtSvidSource for ServerJwtSource {
    fn fetch_jwt_svid<'a>(
        &'a self,
        spiffe_id: &'a SpiffeId,
        audience: &'a [String],
    ) -> BoxFuture<'a, Result<JwtSvid, JwtSourceError>> {
        Box::pin(async move {
            let entry_id = self
                .cache
                .state()
                .entries()
                .find(|e| &e.spiffe_id == spiffe_id)
                .map(|e| e.id.clone())
                .ok_or_else(|| JwtSourceError::Refused(format!("no entry for {spiffe_id}")))?;
            let ch = self
                .channel
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .ok_or_else(|| JwtSourceError::Unavailable("no server reachable".into()))?;
            let req = pb::NewJwtSvidRequest {
                entry_id,
                audience: audience.to_vec(),
            };
            let resp = tokio::time::timeout(
                Duration::from_secs(10),
                SvidServiceClient::new(ch).new_jwt_svid(req),
            )
            .await
            .map_err(|_| JwtSourceError::Unavailable("the server did not answer".into()))?
            .map_err(|s| {
                let m = format!("{:?}: {}", s.code(), s.message());
                if is_refusal(s.code()) {
                    JwtSourceError::Refused(m)
                } else {
                    JwtSourceError::Unavailable(m)
                }
            })?
            .into_inner();
            let svid = resp
                .svid
                .ok_or_else(|| JwtSourceError::Unavailable("the server sent no token".into()))?;
            let ts = |t: i64| {
                OffsetDateTime::from_unix_timestamp(t)
                    .map_err(|_| JwtSourceError::Unavailable("bad timestamp from server".into()))
            };
            Ok(JwtSvid {
                spiffe_id: SpiffeId::new(&svid.spiffe_id)
                    .map_err(|e| JwtSourceError::Unavailable(e.to_string()))?,
                token: svid.token,
                issued_at: ts(svid.issued_at)?,
                expiry: ts(svid.expires_at)?,
            })
        })
    }
}

/// Keeps the cache in step with the server.
#[derive(Debug)]
pub struct Syncer {
    td: TrustDomain,
    cache: Arc<IdentityCache>,
    jwt: Arc<JwtSvidCache>,
    tls_bundles: Arc<BundleHolder>,
    data_dir: Option<DataDir>,
    /// Everything the server sent, by entry ID.
    entries: BTreeMap<String, pb::Entry>,
    /// Sent entries as the cache holds them, converted once per change (`None`: malformed).
    converted: HashMap<String, Option<Arc<Entry>>>,
    /// How many X509-SVIDs to hold (see [`crate::lru`]).
    budget: Budget,
    /// When a message of the entry stream was last applied (Unix seconds; 0: never).
    last_sync_success: Arc<AtomicI64>,
    /// For each cached identity: what its SVID was issued for and when to rotate it.
    issued: BTreeMap<String, Issued>,
    /// Entries whose SVID could not be had, and when to try again.
    retry: BTreeMap<String, OffsetDateTime>,
    /// The revision of the last whole update of the entry stream applied (in this or an
    /// earlier session): `entries` is then what the server last sent, and a new session can
    /// resume from it.
    synced: Option<u64>,
}

impl Syncer {
    /// `tls_bundles` is what connections to servers trust; it follows the trust bundle the server
    /// pushes (which is also stored in `data_dir`, for restarts).
    pub fn new(
        td: TrustDomain,
        cache: Arc<IdentityCache>,
        jwt: Arc<JwtSvidCache>,
        tls_bundles: Arc<BundleHolder>,
        data_dir: Option<DataDir>,
    ) -> Self {
        Self {
            td,
            cache,
            jwt,
            tls_bundles,
            data_dir,
            entries: BTreeMap::new(),
            converted: HashMap::new(),
            budget: Budget::default(),
            last_sync_success: Arc::new(AtomicI64::new(0)),
            issued: BTreeMap::new(),
            retry: BTreeMap::new(),
            synced: None,
        }
    }

    /// Sets how many X509-SVIDs the agent holds and prefetches.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }

    /// Where to record when a message of the entry stream was last applied in full (Unix
    /// seconds; 0: never).
    pub fn with_last_sync_success(mut self, at: Arc<AtomicI64>) -> Self {
        self.last_sync_success = at;
        self
    }

    fn next_wake(&self) -> Option<OffsetDateTime> {
        // An SVID whose renewal failed waits for its retry time, not its (past) rotation time.
        let rotate = self
            .issued
            .iter()
            .filter(|(id, _)| !self.retry.contains_key(*id))
            .map(|(_, i)| i.rotate_at)
            .min();
        let retry = self.retry.values().min().copied();
        match (rotate, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Follows the server's entry stream over `channel` as `agent_id` until the connection fails,
    /// the server refuses the agent, or `renew_at` comes (the agent SVID must be renewed).
    /// `on_first` runs once the first update (all its parts) has been applied.
    pub async fn run_session(
        &mut self,
        channel: Channel,
        agent_id: &SpiffeId,
        renew_at: OffsetDateTime,
        mut on_first: impl FnMut(),
    ) -> Result<SessionEnd, SyncError> {
        let request = self.resume_request();
        if !request.known.is_empty() {
            tracing::info!(
                known = request.known.len(),
                revision = request.from_revision,
                "resuming the entry stream from the entries held"
            );
        }
        let mut stream = EntryServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_SYNC_MESSAGE_LEN)
            .sync_authorized_entries(request)
            .await
            .map_err(|s| status_err("opening the entry stream", s))?
            .into_inner();
        let mut first = true;
        // The parts of an update received so far (`more` set on each).
        let mut partial: Option<pb::SyncAuthorizedEntriesResponse> = None;
        let usage = self.cache.usage().clone();
        loop {
            let now = OffsetDateTime::now_utc();
            if now >= renew_at {
                return Ok(SessionEnd::RenewAgent);
            }
            let wake = self.next_wake().map_or(renew_at, |w| w.min(renew_at));
            let sleep = Duration::try_from(wake - now).unwrap_or(Duration::ZERO);
            tokio::select! {
                msg = stream.message() => {
                    let msg = msg
                        .map_err(|s| status_err("entry stream", s))?
                        .ok_or_else(|| SyncError::Unavailable("the server ended the entry stream".into()))?;
                    let more = msg.more;
                    let msg = match partial.take() {
                        Some(head) => join_parts(head, msg),
                        None => msg,
                    };
                    if more {
                        partial = Some(msg);
                        continue;
                    }
                    let revision = msg.revision;
                    self.apply(&channel, agent_id, msg).await?;
                    self.synced = Some(revision);
                    if first {
                        first = false;
                        on_first();
                    }
                }
                _ = usage.wanted() => {
                    // A workload waits for SVIDs the cache does not hold.
                    self.reconcile(&channel, agent_id, None, None, &BTreeSet::new()).await?;
                }
                _ = tokio::time::sleep(sleep) => {
                    if OffsetDateTime::now_utc() >= renew_at {
                        return Ok(SessionEnd::RenewAgent);
                    }
                    let now = OffsetDateTime::now_utc();
                    let due: BTreeSet<String> = self
                        .issued
                        .iter()
                        .filter(|(id, i)| i.rotate_at <= now && !self.retry.contains_key(*id))
                        .map(|(id, _)| id.clone())
                        .collect();
                    self.retry.retain(|_, at| *at > now);
                    if !due.is_empty() {
                        tracing::debug!(count = due.len(), "rotating SVIDs");
                    }
                    self.reconcile(&channel, agent_id, None, None, &due).await?;
                }
            }
        }
    }

    /// What a new session asks for: after a whole update, the difference from the entries held
    /// (the server answers with what changed); before one, or holding more than the server
    /// takes, a full set.
    fn resume_request(&self) -> pb::SyncAuthorizedEntriesRequest {
        let Some(revision) = self.synced else {
            return pb::SyncAuthorizedEntriesRequest::default();
        };
        if self.entries.len() > MAX_KNOWN_SENT {
            return pb::SyncAuthorizedEntriesRequest::default();
        }
        pb::SyncAuthorizedEntriesRequest {
            from_revision: revision,
            known: self
                .entries
                .values()
                .map(|e| pb::EntryRevision {
                    id: e.id.clone(),
                    revision: e.revision,
                })
                .collect(),
        }
    }

    /// Applies one whole update of the entry stream (its parts joined).
    async fn apply(
        &mut self,
        channel: &Channel,
        agent_id: &SpiffeId,
        msg: pb::SyncAuthorizedEntriesResponse,
    ) -> Result<(), SyncError> {
        if msg.full {
            self.entries.clear();
            self.converted.clear();
        }
        let (upserted, deleted) = (msg.upserted.len(), msg.deleted_ids.len());
        for e in msg.upserted {
            self.converted.remove(&e.id);
            self.entries.insert(e.id.clone(), e);
        }
        for id in &msg.deleted_ids {
            self.converted.remove(id);
            self.entries.remove(id);
        }
        tracing::debug!(
            full = msg.full,
            revision = msg.revision,
            upserted,
            deleted,
            "entry update from server"
        );
        let bundle = match msg.bundle.as_ref().map(bundle_from_proto) {
            Some(Ok(b)) if b.trust_domain() == &self.td => Some(b),
            Some(Ok(b)) => {
                tracing::warn!(trust_domain = %b.trust_domain(), "ignoring a bundle of another trust domain");
                None
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "ignoring a malformed bundle");
                None
            }
            None => None,
        };
        // The server sends the whole list when it changes (and with every full set).
        let federated = if msg.full
            || msg.federated_bundles_changed
            || !msg.federated_bundles.is_empty()
        {
            let mut set = Vec::new();
            for b in &msg.federated_bundles {
                match bundle_from_proto(b) {
                    Ok(b) if b.trust_domain() != &self.td => set.push(b),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed federated bundle"),
                }
            }
            Some(set)
        } else {
            None
        };
        self.reconcile(channel, agent_id, bundle, federated, &BTreeSet::new())
            .await?;
        self.last_sync_success.store(
            OffsetDateTime::now_utc().unix_timestamp(),
            Ordering::Relaxed,
        );
        if msg.full {
            let state = self.cache.state();
            tracing::info!(
                entries = state.entry_count(),
                svids = state.svid_count(),
                revision = msg.revision,
                "entries synced"
            );
        }
        Ok(())
    }

    /// Brings the cache in line with `self.entries`: removes what is no longer served, updates
    /// changed entries, decides which SVIDs to hold ([`lru::plan`]: those open streams need,
    /// prefetch, eviction), gets SVIDs for new, changed and due (`rotate`) ones, and publishes
    /// it all (with the bundles) as one change.
    async fn reconcile(
        &mut self,
        channel: &Channel,
        agent_id: &SpiffeId,
        bundle: Option<Bundle>,
        federated: Option<Vec<Bundle>>,
        rotate: &BTreeSet<String>,
    ) -> Result<(), SyncError> {
        let state = self.cache.state();
        let served = servable(agent_id.as_str(), &self.entries);

        // The entries the cache is to hold.
        let mut next: BTreeMap<&str, Arc<Entry>> = BTreeMap::new();
        for (id, wire) in &served {
            if !self.converted.contains_key(*id) {
                let conv = entry_from_proto(wire).and_then(|e| {
                    if e.spiffe_id.is_member_of(&self.td) {
                        Ok(e)
                    } else {
                        Err(format!(
                            "{} is not in trust domain {}",
                            e.spiffe_id, self.td
                        ))
                    }
                });
                let conv = match conv {
                    Ok(e) => Some(Arc::new(e)),
                    Err(err) => {
                        tracing::warn!(entry_id = %id, error = %err, "ignoring a malformed entry");
                        None
                    }
                };
                self.converted.insert((*id).to_owned(), conv);
            }
            if let Some(Some(e)) = self.converted.get(*id) {
                next.insert(*id, e.clone());
            }
        }

        // SVIDs held that still name their entry's SPIFFE ID; of those, the ones to renew
        // (entry settings changed, or due for rotation).
        let mut cached: HashSet<&str> = HashSet::new();
        let mut renew: Vec<&str> = Vec::new();
        for (id, e) in &next {
            let Some(held) = state.identity(id) else {
                continue;
            };
            if held.svid.spiffe_id != e.spiffe_id {
                continue; // dropped with the entry update below
            }
            cached.insert(*id);
            let current = self
                .issued
                .get(*id)
                .is_some_and(|i| i.params.matches(served[id]));
            if (!current && !self.retry.contains_key(*id)) || rotate.contains(*id) {
                renew.push(*id);
            }
        }

        // Entries an open Workload API stream needs.
        let subscribers = self.cache.usage().subscribers();
        let protected: HashSet<&str> = if subscribers.is_empty() {
            HashSet::new()
        } else {
            next.iter()
                .filter(|(_, e)| subscribers.iter().any(|s| e.selectors.matched_by(s)))
                .map(|(id, _)| *id)
                .collect()
        };
        let eligible: Vec<&str> = next
            .keys()
            .copied()
            .filter(|id| !self.retry.contains_key(*id))
            .collect();
        let last_used = self.cache.usage().last_used();
        let plan = lru::plan(&eligible, &cached, &protected, &last_used, self.budget);
        let evict: HashSet<&str> = plan.evict.iter().map(String::as_str).collect();
        if !plan.evict.is_empty() {
            tracing::debug!(
                count = plan.evict.len(),
                "evicting least recently used SVIDs"
            );
        }

        let needs: Vec<(Entry, pb::Entry)> = renew
            .iter()
            .copied()
            .filter(|id| !evict.contains(id))
            .chain(plan.fetch.iter().map(String::as_str))
            .filter_map(|id| Some((Entry::clone(next.get(id)?), (*served.get(id)?).clone())))
            .collect();
        if !needs.is_empty() {
            tracing::debug!(entries = next.len(), svids = needs.len(), "fetching SVIDs");
        }
        let fetched = if needs.is_empty() {
            Fetched {
                identities: Vec::new(),
                failed: Vec::new(),
                error: None,
            }
        } else {
            let f = fetch_svids(channel, needs).await;
            tracing::debug!(
                svids = f.identities.len(),
                failed = f.failed.len(),
                "SVIDs fetched"
            );
            f
        };

        let bundle_changed = bundle.as_ref().is_some_and(|b| b != state.bundle());
        let mut rejected = Vec::new();
        let applied = self.cache.modify(|s| {
            if let Some(b) = &bundle {
                if let Err(e) = s.set_bundle(b.clone()) {
                    tracing::warn!(error = %e, "bundle not applied");
                }
            }
            if let Some(feds) = &federated {
                let keep: BTreeSet<&TrustDomain> = feds.iter().map(|b| b.trust_domain()).collect();
                let gone: Vec<TrustDomain> = s
                    .federated_bundles()
                    .iter()
                    .map(|b| b.trust_domain().clone())
                    .filter(|td| !keep.contains(td))
                    .collect();
                for td in gone {
                    s.remove_federated_bundle(&td);
                }
                for b in feds {
                    if let Err(e) = s.set_federated_bundle(b.clone()) {
                        tracing::warn!(error = %e, "federated bundle not applied");
                    }
                }
            }
            let gone: Vec<String> = s
                .entries()
                .filter(|e| !next.contains_key(e.id.as_str()))
                .map(|e| e.id.clone())
                .collect();
            for id in &gone {
                s.remove_entry(id);
            }
            for e in next.values() {
                if let Err(err) = s.put_entry(e.clone()) {
                    tracing::warn!(entry_id = %e.id, error = %err, "entry not cached");
                }
            }
            for id in &evict {
                s.remove_svid(id);
            }
            for (identity, _, _) in &fetched.identities {
                let id = identity.entry.id.as_str();
                let svid = CachedSvid {
                    svid: identity.svid.clone(),
                    private_key: identity.private_key.clone(),
                };
                if let Err(err) = s.put_svid(id, svid) {
                    tracing::warn!(entry_id = %id, error = %err, "SVID not cached");
                    rejected.push(id.to_owned());
                }
            }
            Ok(())
        });
        if let Err(e) = applied {
            // Unreachable: every step above handles its own errors.
            tracing::error!(error = %e, "cache update failed");
        }

        let now = OffsetDateTime::now_utc();
        for (identity, params, rotate_at) in fetched.identities {
            if rejected.contains(&identity.entry.id) {
                self.retry.insert(identity.entry.id, now + RETRY_AFTER);
                continue;
            }
            self.retry.remove(&identity.entry.id);
            self.issued
                .insert(identity.entry.id, Issued { params, rotate_at });
        }
        for (id, reason) in fetched.failed {
            tracing::warn!(entry_id = %id, reason = %reason, "no SVID for entry; retrying later");
            self.retry.insert(id, now + RETRY_AFTER);
        }
        // Forget what no longer exists: rotation only for SVIDs held.
        let after = self.cache.state();
        self.issued.retain(|id, _| after.has_svid(id));
        self.retry.retain(|id, _| next.contains_key(id.as_str()));
        self.cache.usage().retain(|id| next.contains_key(id));
        if !self.jwt.is_empty() {
            let keep: HashSet<&SpiffeId> = next.values().map(|e| &e.spiffe_id).collect();
            self.jwt.retain_ids(|id| keep.contains(id));
        }

        if bundle_changed {
            if let Some(b) = bundle {
                let mut set = BundleSet::new();
                set.insert(b.clone());
                self.tls_bundles.set(set);
                if let Some(dir) = &self.data_dir {
                    if let Err(e) = dir.save_bundle(&b) {
                        tracing::warn!(error = %e, "cannot store the trust bundle");
                    }
                }
                tracing::info!(sequence = b.sequence_number(), "trust bundle updated");
            }
        }
        match fetched.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Adds the next part of an update to the parts received before it.
fn join_parts(
    mut head: pb::SyncAuthorizedEntriesResponse,
    part: pb::SyncAuthorizedEntriesResponse,
) -> pb::SyncAuthorizedEntriesResponse {
    head.full |= part.full;
    head.revision = part.revision;
    head.more = part.more;
    head.upserted.extend(part.upserted);
    head.deleted_ids.extend(part.deleted_ids);
    if part.bundle.is_some() {
        head.bundle = part.bundle;
    }
    if part.federated_bundles_changed || !part.federated_bundles.is_empty() {
        head.federated_bundles = part.federated_bundles;
        head.federated_bundles_changed = true;
    }
    head
}

/// A fresh workload key and a CSR (DER) for it.
type KeyAndCsr = (Arc<PrivateKey>, Vec<u8>);

/// A key and CSR per entry (CPU work, on a blocking thread).
fn make_keys(n: usize) -> Result<Vec<KeyAndCsr>, String> {
    (0..n)
        .map(|_| {
            let key = Arc::new(PrivateKey::generate(KeyType::EcP256).map_err(|e| e.to_string())?);
            let csr = Csr::create(key.clone()).map_err(|e| e.to_string())?;
            Ok((key, csr))
        })
        .collect()
}

async fn fetch_batch(channel: Channel, batch: Vec<(Entry, pb::Entry)>) -> Fetched {
    let mut out = Fetched {
        identities: Vec::new(),
        failed: Vec::new(),
        error: None,
    };
    let n = batch.len();
    let keys = match tokio::task::spawn_blocking(move || make_keys(n)).await {
        Ok(Ok(k)) => k,
        Ok(Err(err)) => {
            out.failed = batch
                .into_iter()
                .map(|(e, _)| (e.id, err.clone()))
                .collect();
            return out;
        }
        Err(err) => {
            out.failed = batch
                .into_iter()
                .map(|(e, _)| (e.id, err.to_string()))
                .collect();
            return out;
        }
    };
    let params = batch
        .iter()
        .zip(&keys)
        .map(|((e, _), (_, csr))| pb::NewX509SvidParams {
            entry_id: e.id.clone(),
            csr: csr.clone(),
        })
        .collect();
    let resp = tokio::time::timeout(
        BATCH_TIMEOUT,
        SvidServiceClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .batch_new_x509_svid(pb::BatchNewX509SvidRequest { params }),
    )
    .await;
    let results = match resp {
        Ok(Ok(r)) => r.into_inner().results,
        Ok(Err(s)) => {
            out.error = Some(status_err("BatchNewX509Svid", s));
            return out;
        }
        Err(_) => {
            out.error = Some(SyncError::Unavailable("BatchNewX509Svid timed out".into()));
            return out;
        }
    };
    if results.len() != n {
        out.error = Some(SyncError::Unavailable(format!(
            "BatchNewX509Svid answered {} of {n} requests",
            results.len()
        )));
        return out;
    }
    for (((entry, wire), (key, _)), r) in batch.into_iter().zip(keys).zip(results) {
        let status = r.status.unwrap_or_default();
        if status.code != 0 {
            out.failed.push((entry.id, status.message));
            continue;
        }
        match svid_from_wire(r.svid) {
            Ok((svid, not_before)) => {
                // Servers backdate notBefore (clock skew); the lifetime that matters is from now.
                let start = not_before.max(OffsetDateTime::now_utc());
                let rotate_at = rotation_time(start, svid.not_after);
                out.identities.push((
                    Identity {
                        entry,
                        svid,
                        private_key: key,
                    },
                    SvidParams::of(&wire),
                    rotate_at,
                ));
            }
            Err(e) => out.failed.push((entry.id, e)),
        }
    }
    out
}

fn svid_from_wire(svid: Option<pb::X509Svid>) -> Result<(X509Svid, OffsetDateTime), String> {
    let svid = svid.ok_or("no SVID in the answer")?;
    let leaf = svid.cert_chain.first().ok_or("empty certificate chain")?;
    let spiffe_id = spiffe_id_of(leaf).map_err(|e| e.to_string())?;
    let not_after = cert_not_after(leaf).map_err(|e| e.to_string())?;
    let not_before = cert_not_before(leaf).ok_or("unreadable notBefore")?;
    Ok((
        X509Svid {
            spiffe_id,
            chain: svid.cert_chain,
            not_after,
        },
        not_before,
    ))
}

/// SVIDs for `needs`, in batches, several in flight.
async fn fetch_svids(channel: &Channel, needs: Vec<(Entry, pb::Entry)>) -> Fetched {
    let mut batches = Vec::new();
    let mut it = needs.into_iter().peekable();
    while it.peek().is_some() {
        batches.push(it.by_ref().take(SVID_BATCH_SIZE).collect::<Vec<_>>());
    }
    let mut results =
        futures_util::stream::iter(batches.into_iter().map(|b| fetch_batch(channel.clone(), b)))
            .buffer_unordered(SVID_BATCHES_IN_FLIGHT);
    let mut out = Fetched {
        identities: Vec::new(),
        failed: Vec::new(),
        error: None,
    };
    while let Some(f) = results.next().await {
        out.identities.extend(f.identities);
        out.failed.extend(f.failed);
        if out.error.is_none() {
            out.error = f.error;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn e(id: &str, spiffe_id: &str, parent: &str, sel: &[(&str, &str)]) -> pb::Entry {
        pb::Entry {
            id: id.into(),
            spiffe_id: spiffe_id.into(),
            parent_id: parent.into(),
            selectors: sel
                .iter()
                .map(|(t, v)| pb::Selector {
                    r#type: (*t).into(),
                    value: (*v).into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn parts_of_an_update_join_into_the_whole_update() {
        let bundle = pb::Bundle {
            trust_domain: "example.org".into(),
            sequence_number: 3,
            ..Default::default()
        };
        let fed = pb::Bundle {
            trust_domain: "partner.org".into(),
            ..Default::default()
        };
        let part = |ids: &[&str], gone: &[&str], first: bool, more: bool| {
            pb::SyncAuthorizedEntriesResponse {
                full: true,
                revision: 9,
                upserted: ids
                    .iter()
                    .map(|i| e(i, "spiffe://example.org/w", "p", &[]))
                    .collect(),
                deleted_ids: gone.iter().map(|g| (*g).to_owned()).collect(),
                bundle: first.then(|| bundle.clone()),
                federated_bundles: if first { vec![fed.clone()] } else { vec![] },
                federated_bundles_changed: first,
                more,
            }
        };
        let whole = [
            part(&["a", "b"], &[], true, true),
            part(&["c"], &["x"], false, true),
            part(&[], &["y"], false, false),
        ]
        .into_iter()
        .reduce(join_parts)
        .unwrap();
        let ids: Vec<&str> = whole.upserted.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(whole.deleted_ids, ["x", "y"]);
        assert!(whole.full && !whole.more);
        assert_eq!(whole.revision, 9);
        assert_eq!(
            whole.bundle,
            Some(bundle),
            "later parts do not drop the bundle"
        );
        assert_eq!(whole.federated_bundles, vec![fed]);
        assert!(whole.federated_bundles_changed);
    }

    #[test]
    fn serves_entries_of_the_agent_and_its_aliases_not_nested_ones() {
        let agent = "spiffe://td/spire/agent/join_token/t";
        let all: BTreeMap<String, pb::Entry> = [
            e("direct", "spiffe://td/web", agent, &[("unix", "uid:1")]),
            // join-token alias and an entry under it
            e(
                "alias",
                "spiffe://td/node/a",
                agent,
                &[("spiffe_id", agent)],
            ),
            e(
                "via-alias",
                "spiffe://td/db",
                "spiffe://td/node/a",
                &[("unix", "uid:2")],
            ),
            // server-side alias (not sent) and an entry under it
            e(
                "via-cluster",
                "spiffe://td/api",
                "spiffe://td/cluster/x",
                &[("unix", "uid:3")],
            ),
            // nested under a workload entry: downstream, not served
            e(
                "nested",
                "spiffe://td/child",
                "spiffe://td/web",
                &[("unix", "uid:4")],
            ),
            e(
                "nested2",
                "spiffe://td/grandchild",
                "spiffe://td/child",
                &[("unix", "uid:5")],
            ),
        ]
        .into_iter()
        .map(|x| (x.id.clone(), x))
        .collect();
        let got: Vec<&str> = servable(agent, &all).keys().copied().collect();
        assert_eq!(got, ["direct", "via-alias", "via-cluster"]);
    }

    #[test]
    fn rotation_is_jittered_and_never_later_than_half_life() {
        let nb = OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        let na = nb + time::Duration::seconds(100);
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            let t = rotation_time(nb, na);
            assert!(t <= nb + time::Duration::seconds(50), "{t}");
            assert!(t >= nb + time::Duration::seconds(40), "{t}");
            seen.insert(t.unix_timestamp());
        }
        assert!(seen.len() > 1, "jitter spreads rotations");
        // An already expired or inverted validity rotates at once.
        assert_eq!(rotation_time(na, nb), na);
    }

    #[test]
    fn wire_entries_convert() {
        let mut w = e(
            "a",
            "spiffe://td/web",
            "spiffe://td/x",
            &[("unix", "uid:1")],
        );
        w.federates_with = vec!["spiffe://partner.org".into(), "other.org".into()];
        w.hint = "h".into();
        let got = entry_from_proto(&w).unwrap();
        assert_eq!(got.federates_with.len(), 2);
        assert_eq!(got.hint, "h");
        w.selectors.clear();
        assert!(entry_from_proto(&w).is_err());
        let bad = e("b", "not an id", "spiffe://td/x", &[("unix", "uid:1")]);
        assert!(entry_from_proto(&bad).is_err());
    }
}
