//! Entry API: admin CRUD, and the authorized-entries stream agents subscribe to.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use plinth_api::server as pb;
use plinth_api::server::entry_service_server::EntryService;
use plinth_spiffe::{SpiffeId, TrustDomain};
use plinth_storage::{Change, Command, Outcome, RegistrationEntry};
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::{bundle_to_proto, entry_from_proto, entry_to_proto, selectors_from_proto};
use super::{command_status, fatal, item_err, item_ok, state_status, ServerCore};
use crate::authz::authorized_entries;
use crate::state::Replicated;

/// Largest page a list returns.
const MAX_PAGE: usize = 1000;
/// Entries per Raft write in `BatchCreateEntry` (bounds one log entry to a few hundred KiB).
const ENTRY_BATCH_CHUNK: usize = 500;
/// Most entries an agent may report as already held when it resumes a sync.
const MAX_KNOWN: usize = 1_000_000;
/// Largest request the Entry API accepts: a resuming agent's `known` list at [`MAX_KNOWN`]
/// (about 50 bytes an entry) fits.
pub(super) const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// About how large one message of the entry stream grows before the rest of an update goes in
/// the next part (`more`): agents never need to take one huge message (a full set of 100 000
/// entries is about 20 MB). The set is still computed whole before its first part leaves.
pub const SYNC_PART_BYTES: usize = 1024 * 1024;

#[derive(Debug)]
pub(super) struct EntryApi<S>(pub(super) Arc<ServerCore<S>>);

fn matches_filter(e: &RegistrationEntry, f: &pb::EntryFilter) -> Result<bool, Status> {
    if !f.by_spiffe_id.is_empty() && e.spiffe_id.as_str() != f.by_spiffe_id {
        return Ok(false);
    }
    if !f.by_parent_id.is_empty() && e.parent_id.as_str() != f.by_parent_id {
        return Ok(false);
    }
    if !f.by_hint.is_empty() && e.hint != f.by_hint {
        return Ok(false);
    }
    if !f.by_federates_with.is_empty()
        && !e
            .federates_with
            .iter()
            .any(|t| t.name() == f.by_federates_with || t.id_string() == f.by_federates_with)
    {
        return Ok(false);
    }
    match f.by_downstream {
        1 if !e.downstream => return Ok(false),
        2 if e.downstream => return Ok(false),
        _ => {}
    }
    if let Some(m) = &f.by_selectors {
        let want = selectors_from_proto(&m.selectors)?;
        use pb::selector_match::MatchBehavior;
        let ok = match MatchBehavior::try_from(m.r#match).unwrap_or(MatchBehavior::MatchExact) {
            MatchBehavior::MatchExact => e.selectors == want,
            MatchBehavior::MatchSubset => e.selectors.iter().all(|s| want.contains(s)),
            MatchBehavior::MatchSuperset => want.iter().all(|s| e.selectors.contains(s)),
            MatchBehavior::MatchAny => want.iter().any(|s| e.selectors.contains(s)),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

impl<S: Replicated> EntryApi<S> {
    fn td(&self) -> &TrustDomain {
        &self.0.cfg.trust_domain
    }

    async fn filtered(
        &self,
        filter: Option<&pb::EntryFilter>,
    ) -> Result<Vec<RegistrationEntry>, Status> {
        self.0.state.linearizable().await.map_err(state_status)?;
        let all = self.0.state.store().list_entries().map_err(fatal)?;
        let mut out = Vec::with_capacity(all.len());
        for e in all {
            if filter.map_or(Ok(true), |f| matches_filter(&e, f))? {
                out.push(e);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

type SyncStream =
    Pin<Box<dyn Stream<Item = Result<pb::SyncAuthorizedEntriesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Replicated> EntryService for EntryApi<S> {
    async fn count_entries(
        &self,
        req: Request<pb::CountEntriesRequest>,
    ) -> Result<Response<pb::CountEntriesResponse>, Status> {
        self.0.require_admin(&req).await?;
        let n = self.filtered(req.get_ref().filter.as_ref()).await?.len();
        Ok(Response::new(pb::CountEntriesResponse {
            count: i32::try_from(n).unwrap_or(i32::MAX),
        }))
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        self.0.require_admin(&req).await?;
        let r = req.get_ref();
        if r.page_size < 0 {
            return Err(Status::invalid_argument("page_size must not be negative"));
        }
        let size = match r.page_size {
            0 => MAX_PAGE,
            n => usize::try_from(n).unwrap_or(MAX_PAGE).min(MAX_PAGE),
        };
        let all = self.filtered(r.filter.as_ref()).await?;
        let start = if r.page_token.is_empty() {
            0
        } else {
            all.partition_point(|e| e.id.as_str() <= r.page_token.as_str())
        };
        let page: Vec<_> = all.iter().skip(start).take(size).collect();
        let next_page_token = if start + page.len() < all.len() {
            page.last().map(|e| e.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListEntriesResponse {
            entries: page.into_iter().map(entry_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_entry(
        &self,
        req: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        self.0.require_admin(&req).await?;
        self.0.state.linearizable().await.map_err(state_status)?;
        let id = &req.get_ref().id;
        let e = self
            .0
            .state
            .store()
            .get_entry(id)
            .map_err(fatal)?
            .ok_or_else(|| Status::not_found(format!("entry {id} not found")))?;
        Ok(Response::new(entry_to_proto(&e)))
    }

    async fn batch_create_entry(
        &self,
        req: Request<pb::BatchCreateEntryRequest>,
    ) -> Result<Response<pb::BatchCreateEntryResponse>, Status> {
        self.0.require_admin(&req).await?;
        // Entries that parse are created together: one Raft write per chunk, each entry checked
        // and created (or refused) on its own, in request order, as SPIRE does item by item.
        let mut results: Vec<Option<Result<RegistrationEntry, Status>>> = Vec::new();
        let mut valid: Vec<(usize, RegistrationEntry)> = Vec::new();
        for (i, e) in req.get_ref().entries.iter().enumerate() {
            match entry_from_proto(e, self.td()) {
                Ok(entry) => {
                    results.push(None);
                    valid.push((i, entry));
                }
                Err(s) => results.push(Some(Err(s))),
            }
        }
        for chunk in valid.chunks(ENTRY_BATCH_CHUNK) {
            let entries = chunk.iter().map(|(_, e)| e.clone()).collect();
            let outcome = self
                .0
                .state
                .propose(Command::EntryCreateBatch { entries })
                .await;
            match outcome {
                Ok(resp) => match resp.result {
                    Ok(Outcome::EntryBatch { results: items }) if items.len() == chunk.len() => {
                        for ((i, _), item) in chunk.iter().zip(items) {
                            results[*i] = Some(item.map_err(command_status));
                        }
                    }
                    _ => {
                        for (i, _) in chunk {
                            results[*i] = Some(Err(Status::internal("unexpected outcome")));
                        }
                    }
                },
                Err(e) => {
                    let status = state_status(e);
                    for (i, _) in chunk {
                        results[*i] = Some(Err(Status::new(status.code(), status.message())));
                    }
                }
            }
        }
        let results = results
            .into_iter()
            .map(|r| match r {
                Some(Ok(entry)) => pb::batch_create_entry_response::Result {
                    status: item_ok(),
                    entry: Some(entry_to_proto(&entry)),
                },
                Some(Err(s)) => pb::batch_create_entry_response::Result {
                    status: item_err(&s),
                    entry: None,
                },
                None => pb::batch_create_entry_response::Result {
                    status: item_err(&Status::internal("entry was not processed")),
                    entry: None,
                },
            })
            .collect();
        Ok(Response::new(pb::BatchCreateEntryResponse { results }))
    }

    async fn batch_update_entry(
        &self,
        req: Request<pb::BatchUpdateEntryRequest>,
    ) -> Result<Response<pb::BatchUpdateEntryResponse>, Status> {
        self.0.require_admin(&req).await?;
        let mut results = Vec::new();
        for e in &req.get_ref().entries {
            let r = if e.id.is_empty() {
                Err(Status::invalid_argument(
                    "invalid id: an entry ID is required to update",
                ))
            } else {
                match entry_from_proto(e, self.td()) {
                    Err(s) => Err(s),
                    Ok(entry) => {
                        let expected_revision = (e.revision != 0).then_some(e.revision);
                        match self
                            .0
                            .state
                            .propose(Command::EntryUpdate {
                                entry,
                                expected_revision,
                            })
                            .await
                        {
                            Ok(resp) => match resp.result {
                                Ok(Outcome::Entry { entry }) => Ok(entry),
                                _ => Err(Status::internal("unexpected outcome")),
                            },
                            Err(e) => Err(state_status(e)),
                        }
                    }
                }
            };
            results.push(match r {
                Ok(entry) => pb::batch_update_entry_response::Result {
                    status: item_ok(),
                    entry: Some(entry_to_proto(&entry)),
                },
                Err(s) => pb::batch_update_entry_response::Result {
                    status: item_err(&s),
                    entry: None,
                },
            });
        }
        Ok(Response::new(pb::BatchUpdateEntryResponse { results }))
    }

    async fn batch_delete_entry(
        &self,
        req: Request<pb::BatchDeleteEntryRequest>,
    ) -> Result<Response<pb::BatchDeleteEntryResponse>, Status> {
        self.0.require_admin(&req).await?;
        let mut results = Vec::new();
        for id in &req.get_ref().ids {
            let r = self
                .0
                .state
                .propose(Command::EntryDelete { id: id.clone() })
                .await
                .map_err(state_status);
            results.push(pb::batch_delete_entry_response::Result {
                status: match &r {
                    Ok(_) => item_ok(),
                    Err(s) => item_err(s),
                },
                id: id.clone(),
            });
        }
        Ok(Response::new(pb::BatchDeleteEntryResponse { results }))
    }

    type SyncAuthorizedEntriesStream = SyncStream;

    async fn sync_authorized_entries(
        &self,
        req: Request<pb::SyncAuthorizedEntriesRequest>,
    ) -> Result<Response<SyncStream>, Status> {
        let agent = self.0.require_agent(&req).await?;
        if req.get_ref().known.len() > MAX_KNOWN {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_KNOWN} known entries may be sent"
            )));
        }
        let known: BTreeMap<String, u64> = req
            .get_ref()
            .known
            .iter()
            .map(|k| (k.id.clone(), k.revision))
            .collect();
        let core = self.0.clone();
        // Subscribe before reading the full set, so that no change falls between the two.
        let changes = core.state.subscribe();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(sync_loop(core, agent.spiffe_id, known, changes, tx));
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as SyncStream
        ))
    }
}

/// What one agent currently holds: entry IDs and their revisions.
struct AgentView {
    entries: BTreeMap<String, u64>,
    bundle_seq: Option<u64>,
    federated: BTreeMap<String, u64>,
}

/// Authorized entries, the trust bundle and the federated bundles they need.
type AgentState = (
    BTreeMap<String, RegistrationEntry>,
    Option<pb::Bundle>,
    Vec<pb::Bundle>,
);

fn compute<S: Replicated>(core: &ServerCore<S>, agent_id: &SpiffeId) -> Result<AgentState, Status> {
    let store = core.state.store();
    let agent = store
        .get_agent(agent_id)
        .map_err(fatal)?
        .filter(|a| !a.banned)
        .ok_or_else(|| {
            Status::permission_denied(format!(
                "agent {agent_id} is no longer attested or is banned"
            ))
        })?;
    let entries = authorized_entries(
        store,
        &core.cfg.trust_domain,
        agent_id,
        &agent.selectors,
        core.now(),
    )
    .map_err(fatal)?;
    let bundle = store
        .get_bundle(&core.cfg.trust_domain)
        .map_err(fatal)?
        .map(|b| bundle_to_proto(&b));
    let mut feds: Vec<TrustDomain> = entries
        .values()
        .flat_map(|e| e.federates_with.iter().cloned())
        .collect();
    feds.sort();
    feds.dedup();
    let mut federated = Vec::new();
    for td in feds {
        if let Some(b) = store.get_bundle(&td).map_err(fatal)? {
            federated.push(bundle_to_proto(&b));
        }
    }
    Ok((entries, bundle, federated))
}

async fn sync_loop<S: Replicated>(
    core: Arc<ServerCore<S>>,
    agent_id: SpiffeId,
    known: BTreeMap<String, u64>,
    mut changes: broadcast::Receiver<plinth_storage::ChangeEvent>,
    tx: mpsc::Sender<Result<pb::SyncAuthorizedEntriesResponse, Status>>,
) {
    // An agent that says what it holds gets the difference; otherwise a full set.
    let mut full = known.is_empty();
    let mut view = AgentView {
        entries: known,
        bundle_seq: None,
        federated: BTreeMap::new(),
    };
    let mut first = true;
    loop {
        let revision = core.state.store().revision().unwrap_or(0);
        let msg = match compute(&core, &agent_id) {
            Ok((entries, bundle, federated)) => {
                let mut m = pb::SyncAuthorizedEntriesResponse {
                    full,
                    revision,
                    ..Default::default()
                };
                if full {
                    m.upserted = entries.values().map(entry_to_proto).collect();
                } else {
                    for (id, e) in &entries {
                        if view.entries.get(id).is_none_or(|rev| *rev != e.revision) {
                            m.upserted.push(entry_to_proto(e));
                        }
                    }
                    for id in view.entries.keys() {
                        if !entries.contains_key(id) {
                            m.deleted_ids.push(id.clone());
                        }
                    }
                }
                let seq = bundle.as_ref().map(|b| b.sequence_number);
                if full || seq != view.bundle_seq {
                    m.bundle = bundle;
                }
                let fed_now: BTreeMap<String, u64> = federated
                    .iter()
                    .map(|b| (b.trust_domain.clone(), b.sequence_number))
                    .collect();
                if full || fed_now != view.federated {
                    m.federated_bundles = federated;
                    m.federated_bundles_changed = true;
                }
                view = AgentView {
                    entries: entries
                        .iter()
                        .map(|(id, e)| (id.clone(), e.revision))
                        .collect(),
                    bundle_seq: seq,
                    federated: fed_now,
                };
                // The first message always goes out, so the agent knows it is in sync.
                let changed = first
                    || full
                    || !m.upserted.is_empty()
                    || !m.deleted_ids.is_empty()
                    || m.bundle.is_some()
                    || m.federated_bundles_changed;
                changed.then_some(m)
            }
            Err(s) => {
                let _ = tx.send(Err(s)).await;
                return;
            }
        };
        if let Some(m) = msg {
            for part in split_update(m, SYNC_PART_BYTES) {
                if tx.send(Ok(part)).await.is_err() {
                    return; // agent went away
                }
            }
        }
        full = false;
        first = false;
        // Wait for a change that can matter to this agent; drain bursts before recomputing.
        let mut relevant = false;
        while !relevant {
            match changes.recv().await {
                Ok(ev) => {
                    full |= matches!(ev.change, Change::Reset);
                    relevant = matters(&ev.change, &agent_id);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    full = true;
                    relevant = true;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
            while let Ok(ev) = changes.try_recv() {
                full |= matches!(ev.change, Change::Reset);
                relevant |= matters(&ev.change, &agent_id);
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// Splits one update of the entry stream into parts of about `max_bytes` of entries and deleted
/// IDs each (at least one item a part, so an entry larger than that still goes out). Every part
/// repeats `full` and `revision`; the bundles ride in the first; all but the last have `more`
/// set. An update that fits is sent as it is.
fn split_update(
    mut m: pb::SyncAuthorizedEntriesResponse,
    max_bytes: usize,
) -> Vec<pb::SyncAuthorizedEntriesResponse> {
    let upserted = std::mem::take(&mut m.upserted);
    let deleted = std::mem::take(&mut m.deleted_ids);
    // Every part after the first: the update's `full` and `revision` and nothing else yet.
    let next = pb::SyncAuthorizedEntriesResponse {
        full: m.full,
        revision: m.revision,
        more: true,
        ..Default::default()
    };
    let mut parts = vec![pb::SyncAuthorizedEntriesResponse { more: true, ..m }];
    let mut size = 0usize;
    for e in upserted {
        let len = e.encoded_len();
        part_with_room(&mut parts, &mut size, len, max_bytes, &next)
            .upserted
            .push(e);
    }
    for id in deleted {
        part_with_room(&mut parts, &mut size, id.len() + 2, max_bytes, &next)
            .deleted_ids
            .push(id);
    }
    if let Some(p) = parts.last_mut() {
        p.more = false;
    }
    parts
}

/// The part an item of `len` bytes goes in: the last one, or a new one (a copy of `next`) when
/// the last already holds something and the item would take it over `max_bytes`. `size` is
/// what the last part holds.
fn part_with_room<'a>(
    parts: &'a mut Vec<pb::SyncAuthorizedEntriesResponse>,
    size: &mut usize,
    len: usize,
    max_bytes: usize,
    next: &pb::SyncAuthorizedEntriesResponse,
) -> &'a mut pb::SyncAuthorizedEntriesResponse {
    if parts.is_empty() || (*size > 0 && *size + len > max_bytes) {
        parts.push(next.clone());
        *size = 0;
    }
    *size += len;
    let last = parts.len() - 1;
    &mut parts[last]
}

fn matters(change: &Change, agent_id: &SpiffeId) -> bool {
    match change {
        Change::EntryPut { .. } | Change::EntryDeleted { .. } | Change::BundlePut { .. } => true,
        Change::BundleDeleted { .. } | Change::Reset => true,
        Change::AgentPut { agent } => &agent.spiffe_id == agent_id,
        Change::AgentDeleted { spiffe_id } => spiffe_id == agent_id,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(entries: usize, deleted: usize) -> pb::SyncAuthorizedEntriesResponse {
        pb::SyncAuthorizedEntriesResponse {
            full: false,
            revision: 7,
            upserted: (0..entries)
                .map(|i| pb::Entry {
                    id: format!("entry-{i:04}"),
                    spiffe_id: format!("spiffe://example.org/w{i:04}"),
                    ..Default::default()
                })
                .collect(),
            deleted_ids: (0..deleted).map(|i| format!("gone-{i:04}")).collect(),
            bundle: Some(pb::Bundle {
                trust_domain: "example.org".into(),
                ..Default::default()
            }),
            federated_bundles_changed: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_small_update_goes_as_it_is() {
        let m = update(3, 2);
        let parts = split_update(m.clone(), SYNC_PART_BYTES);
        assert_eq!(parts, vec![m]);
    }

    #[test]
    fn parts_are_bounded_ordered_and_add_up() {
        let m = update(100, 50);
        let entry_len = m.upserted[0].encoded_len();
        let parts = split_update(m.clone(), 10 * entry_len);
        assert!(parts.len() > 10, "{} parts", parts.len());
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.more, i + 1 < parts.len(), "part {i}");
            assert_eq!(p.revision, 7);
            assert!(!p.full);
            assert_eq!(p.bundle.is_some(), i == 0);
            assert_eq!(p.federated_bundles_changed, i == 0);
            let bytes: usize = p.upserted.iter().map(|e| e.encoded_len()).sum::<usize>()
                + p.deleted_ids.iter().map(|d| d.len() + 2).sum::<usize>();
            assert!(bytes <= 10 * entry_len, "part {i}: {bytes}");
        }
        let upserted: Vec<_> = parts.iter().flat_map(|p| p.upserted.clone()).collect();
        let deleted: Vec<_> = parts.iter().flat_map(|p| p.deleted_ids.clone()).collect();
        assert_eq!(upserted, m.upserted, "every entry once, in order");
        assert_eq!(deleted, m.deleted_ids);
    }

    #[test]
    fn an_entry_larger_than_a_part_still_goes_out_alone() {
        let m = update(3, 0);
        let parts = split_update(m.clone(), 1);
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.upserted.len() == 1));
    }
}
