//! Deterministic application of [`Proposal`]s to the stored state.
//!
//! Apply reads the stored state and the proposal and nothing else: no clock, no randomness, no
//! configuration. Each log entry becomes one RocksDB write batch holding its changes, the new
//! global revision and the Raft applied state, so a crash never leaves an entry half applied or
//! applied twice.

use std::borrow::Cow;

use rocksdb::WriteBatch;

use crate::command::{Change, ChangeEvent, Command, CommandError, Outcome, Proposal, Response};
use crate::entry_id::EntryId;
use crate::model::{
    AttestedAgent, AuthorityStatus, CaAuthority, FederationRelationship, JoinToken,
    RegistrationEntry, StoredBundle, StoredJwtAuthority,
};
use crate::store::{
    index_key, Store, CF_AGENTS, CF_BUNDLES, CF_CA_JOURNAL, CF_ENTRIES, CF_ENTRIES_BY_PARENT,
    CF_ENTRIES_BY_SELECTOR, CF_ENTRIES_BY_SPIFFE_ID, CF_FEDERATION, CF_JOIN_TOKENS, CF_SM_META,
    SM_BATCH_PROGRESS, SM_LAST_ENTRY_ID,
};
use crate::StorageError;

/// The result of applying one log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub response: Response,
    /// What changed, for subscribers; empty if the command was refused or changed nothing.
    pub changes: Vec<ChangeEvent>,
}

enum Fail {
    Refused(CommandError),
    Storage(StorageError),
}

impl From<StorageError> for Fail {
    fn from(e: StorageError) -> Self {
        Fail::Storage(e)
    }
}

impl From<CommandError> for Fail {
    fn from(e: CommandError) -> Self {
        Fail::Refused(e)
    }
}

struct Txn<'a> {
    store: &'a Store,
    batch: WriteBatch,
    changes: Vec<Change>,
    /// The revision this entry produces if it changes anything.
    revision: u64,
    now: i64,
    now_ms: i64,
    /// The last entry ID made, once read: `Some(None)` if none was ever made.
    last_entry_id: Option<Option<EntryId>>,
}

/// Where a partly applied [`Command::Batch`] stopped: the batch at `log_index` has its first
/// `done` commands applied. Stored in the state-machine metadata (so snapshots carry it) and
/// removed in the write that applies the batch's last command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct BatchProgress {
    log_index: u64,
    done: usize,
}

impl Store {
    /// Applies the log entry at `log_index`. `proposal` is `None` for Raft-internal entries (blank,
    /// membership). `applied_state` is the caller's encoding of its applied log ID and membership;
    /// it is written in the same batch as the entry's last change, so an entry is never applied
    /// twice. The write goes to the memtables only, not to the write-ahead log: it is durable
    /// after [`Store::persist_state`] (or a flush), and after a crash Raft applies the entries
    /// since the last flush again from its log.
    ///
    /// A [`Command::Batch`] is applied one command at a time, each in its own RocksDB write that
    /// also records how far the batch got; applying the entry again after a crash skips the
    /// commands already applied.
    pub fn apply(
        &self,
        log_index: u64,
        proposal: Option<&Proposal>,
        applied_state: &[u8],
    ) -> Result<Applied, StorageError> {
        let Some(proposal) = proposal else {
            let mut batch = WriteBatch::default();
            self.set_applied(&mut batch, applied_state)?;
            self.write_batch(batch)?;
            return Ok(Applied {
                response: Response {
                    revision: self.revision()?,
                    result: Ok(Outcome::None),
                },
                changes: Vec::new(),
            });
        };
        let Command::Batch { commands } = &proposal.command else {
            let current = self.revision()?;
            return self.apply_command(log_index, proposal, &proposal.command, current, |b| {
                self.set_applied(b, applied_state)
            });
        };
        let done = match self.get_typed::<BatchProgress>(CF_SM_META, SM_BATCH_PROGRESS)? {
            Some(p) if p.log_index == log_index => p.done,
            _ => 0,
        };
        // The revision is read once and carried from command to command.
        let mut revision = self.revision()?;
        let mut responses = Vec::with_capacity(commands.len());
        let mut changes = Vec::new();
        for (i, command) in commands.iter().enumerate() {
            #[cfg(test)]
            if tests::crash_here(i) {
                return Err(StorageError::Corrupt {
                    table: "test",
                    reason: "simulated crash".into(),
                });
            }
            if i < done {
                responses.push(Response {
                    revision,
                    result: Ok(Outcome::None),
                });
                continue;
            }
            let last = i + 1 == commands.len();
            let applied = self.apply_command(log_index, proposal, command, revision, |batch| {
                if last {
                    self.delete(batch, CF_SM_META, SM_BATCH_PROGRESS)?;
                    self.set_applied(batch, applied_state)
                } else {
                    let progress = BatchProgress {
                        log_index,
                        done: i + 1,
                    };
                    self.put_typed(batch, CF_SM_META, SM_BATCH_PROGRESS, &progress)
                }
            })?;
            revision = applied.response.revision;
            responses.push(applied.response);
            changes.extend(applied.changes);
        }
        if commands.len() <= done {
            // Empty (or, after corruption, fully applied without its last write).
            let mut batch = WriteBatch::default();
            self.delete(&mut batch, CF_SM_META, SM_BATCH_PROGRESS)?;
            self.set_applied(&mut batch, applied_state)?;
            self.write_batch(batch)?;
        }
        Ok(Applied {
            response: Response {
                revision,
                result: Ok(Outcome::Batch { responses }),
            },
            changes,
        })
    }

    /// Applies one command in one RocksDB write, from the global revision `current`; `finish`
    /// adds the bookkeeping of where apply stands to that write (also when the command is
    /// refused).
    fn apply_command(
        &self,
        log_index: u64,
        proposal: &Proposal,
        command: &Command,
        current: u64,
        finish: impl FnOnce(&mut WriteBatch) -> Result<(), StorageError>,
    ) -> Result<Applied, StorageError> {
        let mut txn = Txn {
            store: self,
            batch: WriteBatch::default(),
            changes: Vec::new(),
            revision: current + 1,
            now: proposal.now,
            now_ms: proposal.millis(),
            last_entry_id: None,
        };
        let result = match txn.execute(command) {
            Ok(outcome) => Ok(outcome),
            Err(Fail::Refused(e)) => Err(e),
            Err(Fail::Storage(e)) => return Err(e),
        };
        let (mut batch, changes) = match &result {
            Ok(_) => (txn.batch, txn.changes),
            // A refused command changes nothing but still advances the applied log ID.
            Err(_) => (WriteBatch::default(), Vec::new()),
        };
        let revision = if changes.is_empty() {
            current
        } else {
            self.set_revision(&mut batch, txn.revision)?;
            txn.revision
        };
        finish(&mut batch)?;
        self.write_batch(batch)?;
        Ok(Applied {
            response: Response { revision, result },
            changes: changes
                .into_iter()
                .map(|change| ChangeEvent {
                    revision,
                    log_index,
                    change,
                })
                .collect(),
        })
    }
}

/// The pending renewed SVID becomes the current one.
fn activate_pending(agent: &mut AttestedAgent) {
    agent.serial_number = std::mem::take(&mut agent.new_serial_number);
    agent.expires_at = agent.new_expires_at;
    agent.new_expires_at = 0;
}

impl Txn<'_> {
    fn execute(&mut self, command: &Command) -> Result<Outcome, Fail> {
        match command {
            Command::EntryCreate { entry } => self.entry_create(entry),
            Command::EntryCreateBatch { entries } => self.entry_create_batch(entries),
            // Store::apply unpacks the outer batch; one inside it is a proposer's bug.
            Command::Batch { .. } => Err(CommandError::NestedBatch.into()),
            Command::EntryUpdate {
                entry,
                expected_revision,
            } => self.entry_update(entry, *expected_revision),
            Command::EntryDelete { id } => {
                let old = self.existing_entry(id)?;
                self.delete_entry(&old)?;
                Ok(Outcome::EntryDeleted { entry: old })
            }
            Command::AgentAttest {
                spiffe_id,
                attestation_type,
                selectors,
                serial_number,
                expires_at,
                join_token,
            } => {
                let existing = self.store.get_agent(spiffe_id)?;
                if existing.as_ref().is_some_and(|a| a.banned) {
                    return Err(CommandError::AgentBanned {
                        spiffe_id: spiffe_id.to_string(),
                    }
                    .into());
                }
                if let Some(token) = join_token {
                    self.consume_token(token.expose())?;
                }
                let agent = AttestedAgent {
                    spiffe_id: spiffe_id.clone(),
                    attestation_type: attestation_type.clone(),
                    selectors: selectors.clone(),
                    serial_number: serial_number.clone(),
                    expires_at: *expires_at,
                    new_serial_number: String::new(),
                    new_expires_at: 0,
                    banned: false,
                    created_at: existing.map_or(self.now, |a| a.created_at),
                    updated_at: self.now,
                };
                self.put_agent(&agent)?;
                Ok(Outcome::Agent { agent })
            }
            Command::AgentRenew {
                spiffe_id,
                current_serial,
                new_serial,
                expires_at,
            } => {
                let mut agent = self.usable_agent(spiffe_id)?;
                if !agent.accepts_serial(current_serial) {
                    return Err(CommandError::AgentSerialMismatch {
                        spiffe_id: spiffe_id.to_string(),
                        presented: current_serial.clone(),
                    }
                    .into());
                }
                if agent.is_pending_serial(current_serial) {
                    activate_pending(&mut agent);
                }
                agent.new_serial_number = new_serial.clone();
                agent.new_expires_at = *expires_at;
                agent.updated_at = self.now;
                self.put_agent(&agent)?;
                Ok(Outcome::Agent { agent })
            }
            Command::AgentActivateSerial { spiffe_id, serial } => {
                let mut agent = self.usable_agent(spiffe_id)?;
                if !agent.accepts_serial(serial) {
                    return Err(CommandError::AgentSerialMismatch {
                        spiffe_id: spiffe_id.to_string(),
                        presented: serial.clone(),
                    }
                    .into());
                }
                if agent.is_pending_serial(serial) {
                    activate_pending(&mut agent);
                    agent.updated_at = self.now;
                    self.put_agent(&agent)?;
                }
                Ok(Outcome::Agent { agent })
            }
            Command::AgentBan { spiffe_id } => {
                let mut agent = self.existing_agent(spiffe_id)?;
                agent.banned = true;
                agent.serial_number.clear();
                agent.new_serial_number.clear();
                agent.updated_at = self.now;
                self.put_agent(&agent)?;
                Ok(Outcome::Agent { agent })
            }
            Command::AgentEvict { spiffe_id } => {
                let agent = self.existing_agent(spiffe_id)?;
                self.store
                    .delete(&mut self.batch, CF_AGENTS, spiffe_id.as_str().as_bytes())?;
                self.changes.push(Change::AgentDeleted {
                    spiffe_id: spiffe_id.clone(),
                });
                Ok(Outcome::AgentEvicted { agent })
            }
            Command::JoinTokenCreate { token } => {
                if self.store.get_join_token(&token.token)?.is_some() {
                    return Err(CommandError::JoinTokenExists.into());
                }
                self.store.put_typed(
                    &mut self.batch,
                    CF_JOIN_TOKENS,
                    token.token.as_bytes(),
                    token,
                )?;
                self.changes.push(Change::JoinTokensChanged);
                Ok(Outcome::JoinTokenCreated {
                    expires_at: token.expires_at,
                })
            }
            Command::JoinTokenConsume { token } => {
                let token = self.consume_token(token.expose())?;
                Ok(Outcome::JoinTokenConsumed { token })
            }
            Command::JoinTokenPrune => {
                let mut count = 0;
                for t in self.store.list_join_tokens()? {
                    if t.expires_at <= self.now {
                        self.store
                            .delete(&mut self.batch, CF_JOIN_TOKENS, t.token.as_bytes())?;
                        count += 1;
                    }
                }
                if count > 0 {
                    self.changes.push(Change::JoinTokensChanged);
                }
                Ok(Outcome::JoinTokensPruned { count })
            }
            Command::BundleAppend {
                trust_domain,
                x509_authorities,
                jwt_authorities,
            } => {
                let mut bundle = self
                    .store
                    .get_bundle(trust_domain)?
                    .unwrap_or_else(|| StoredBundle::new(trust_domain.clone()));
                let before = bundle.clone();
                for der in x509_authorities {
                    if !bundle.x509_authorities.contains(der) {
                        bundle.x509_authorities.push(der.clone());
                    }
                }
                for a in jwt_authorities {
                    append_jwt(&mut bundle, a);
                }
                if bundle != before {
                    bundle.sequence_number = before.sequence_number + 1;
                    self.put_bundle(&bundle)?;
                }
                Ok(Outcome::Bundle { bundle })
            }
            Command::BundleSet { bundle } => self.bundle_set(bundle),
            Command::BundleDelete { trust_domain } => {
                if self.store.get_bundle(trust_domain)?.is_none() {
                    return Err(CommandError::BundleNotFound {
                        trust_domain: trust_domain.to_string(),
                    }
                    .into());
                }
                self.store
                    .delete(&mut self.batch, CF_BUNDLES, trust_domain.name().as_bytes())?;
                self.changes.push(Change::BundleDeleted {
                    trust_domain: trust_domain.clone(),
                });
                Ok(Outcome::BundleDeleted {
                    trust_domain: trust_domain.clone(),
                })
            }
            Command::FederationCreate { relationship } => {
                if self
                    .store
                    .get_federation(&relationship.trust_domain)?
                    .is_some()
                {
                    return Err(CommandError::FederationExists {
                        trust_domain: relationship.trust_domain.to_string(),
                    }
                    .into());
                }
                self.put_federation(relationship)
            }
            Command::FederationUpdate { relationship } => {
                if self
                    .store
                    .get_federation(&relationship.trust_domain)?
                    .is_none()
                {
                    return Err(CommandError::FederationNotFound {
                        trust_domain: relationship.trust_domain.to_string(),
                    }
                    .into());
                }
                self.put_federation(relationship)
            }
            Command::FederationDelete { trust_domain } => {
                if self.store.get_federation(trust_domain)?.is_none() {
                    return Err(CommandError::FederationNotFound {
                        trust_domain: trust_domain.to_string(),
                    }
                    .into());
                }
                self.store.delete(
                    &mut self.batch,
                    CF_FEDERATION,
                    trust_domain.name().as_bytes(),
                )?;
                self.changes.push(Change::FederationDeleted {
                    trust_domain: trust_domain.clone(),
                });
                Ok(Outcome::FederationDeleted {
                    trust_domain: trust_domain.clone(),
                })
            }
            Command::CaPrepare {
                trust_domain,
                authority,
            } => {
                if self.store.get_authority(&authority.authority_id)?.is_some() {
                    return Err(CommandError::AuthorityExists {
                        authority_id: authority.authority_id.clone(),
                    }
                    .into());
                }
                for mut other in self.store.list_authorities()? {
                    if other.node_id == authority.node_id
                        && other.kind() == authority.kind()
                        && other.status == AuthorityStatus::Prepared
                    {
                        other.status = AuthorityStatus::Old;
                        other.updated_at = self.now;
                        self.put_authority(&other)?;
                    }
                }
                let mut bundle = self
                    .store
                    .get_bundle(trust_domain)?
                    .unwrap_or_else(|| StoredBundle::new(trust_domain.clone()));
                if bundle.add_authority(&authority.public) {
                    validate(&bundle)?;
                    bundle.sequence_number += 1;
                    self.put_bundle(&bundle)?;
                }
                let mut prepared = authority.clone();
                prepared.status = AuthorityStatus::Prepared;
                prepared.updated_at = self.now;
                self.put_authority(&prepared)?;
                Ok(Outcome::Authority {
                    authority: prepared,
                })
            }
            Command::CaActivate { authority_id } => {
                let mut a = self.authority_in(authority_id, AuthorityStatus::Prepared)?;
                for mut other in self.store.list_authorities()? {
                    if other.node_id == a.node_id
                        && other.kind() == a.kind()
                        && other.status == AuthorityStatus::Active
                    {
                        other.status = AuthorityStatus::Old;
                        other.updated_at = self.now;
                        self.put_authority(&other)?;
                    }
                }
                a.status = AuthorityStatus::Active;
                a.updated_at = self.now;
                self.put_authority(&a)?;
                Ok(Outcome::Authority { authority: a })
            }
            Command::CaTaint { authority_id } => {
                let mut a = self.authority_in(authority_id, AuthorityStatus::Old)?;
                a.status = AuthorityStatus::Tainted;
                a.updated_at = self.now;
                self.put_authority(&a)?;
                Ok(Outcome::Authority { authority: a })
            }
            Command::CaRevoke {
                trust_domain,
                authority_id,
            } => {
                let mut a = self.authority_in(authority_id, AuthorityStatus::Tainted)?;
                if let Some(mut bundle) = self.store.get_bundle(trust_domain)? {
                    if bundle.remove_authority(&a.public) {
                        bundle.sequence_number += 1;
                        self.put_bundle(&bundle)?;
                    }
                }
                a.status = AuthorityStatus::Revoked;
                a.updated_at = self.now;
                self.put_authority(&a)?;
                Ok(Outcome::Authority { authority: a })
            }
        }
    }

    // ---- entries ---------------------------------------------------------------------------

    fn check_entry(&self, entry: &RegistrationEntry) -> Result<(), Fail> {
        if entry.selectors.is_empty() {
            return Err(CommandError::EntryWithoutSelectors.into());
        }
        if let Some(other) = self
            .store
            .entries_by_spiffe_id(&entry.spiffe_id)?
            .into_iter()
            .find(|e| e.id != entry.id && e.same_mapping(entry))
        {
            return Err(CommandError::EntryConflict {
                existing_id: other.id,
            }
            .into());
        }
        Ok(())
    }

    fn entry_create(&mut self, entry: &RegistrationEntry) -> Result<Outcome, Fail> {
        let entry = self.with_id(entry)?;
        let entry = self.create_entry(&entry, matches!(entry, Cow::Owned(_)))?;
        Ok(Outcome::Entry { entry })
    }

    /// `entry` with its ID: the one it came with (borrowed), or else the next one in log
    /// order (owned), which is recorded as the last made. An ID a client already chose is
    /// passed over, so a made ID is known to be free in the store.
    fn with_id<'e>(
        &mut self,
        entry: &'e RegistrationEntry,
    ) -> Result<Cow<'e, RegistrationEntry>, Fail> {
        if !entry.id.is_empty() {
            return Ok(Cow::Borrowed(entry));
        }
        let mut last = match self.last_entry_id {
            Some(last) => last,
            None => self.stored_last_entry_id()?,
        };
        let id = loop {
            let id = EntryId::next(last, self.now_ms);
            last = Some(id);
            let text = id.to_string();
            if self.store.get_entry(&text)?.is_none() {
                break text;
            }
        };
        self.last_entry_id = Some(last);
        self.store
            .put_typed(&mut self.batch, CF_SM_META, SM_LAST_ENTRY_ID, &id)?;
        Ok(Cow::Owned(RegistrationEntry {
            id,
            ..entry.clone()
        }))
    }

    fn stored_last_entry_id(&self) -> Result<Option<EntryId>, StorageError> {
        self.store
            .get_typed::<String>(CF_SM_META, SM_LAST_ENTRY_ID)?
            .map(|text| {
                EntryId::parse(&text).ok_or_else(|| StorageError::Corrupt {
                    table: CF_SM_META,
                    reason: format!("the last entry ID {text:?} is not a version 7 UUID"),
                })
            })
            .transpose()
    }

    /// Creates `entry`, whose ID is set. `id_is_new` if [`Txn::with_id`] made it, which
    /// already found it free in the store.
    fn create_entry(
        &mut self,
        entry: &RegistrationEntry,
        id_is_new: bool,
    ) -> Result<RegistrationEntry, Fail> {
        if !id_is_new && self.store.get_entry(&entry.id)?.is_some() {
            return Err(CommandError::EntryIdExists {
                id: entry.id.clone(),
            }
            .into());
        }
        self.check_entry(entry)?;
        let mut new = entry.clone();
        new.revision = self.revision;
        new.created_at = self.now;
        self.put_entry(None, &new)?;
        Ok(new)
    }

    /// Each entry is created or refused on its own. The store does not see this log entry's
    /// own writes until it commits, so entries earlier in the batch are checked here.
    fn entry_create_batch(&mut self, entries: &[RegistrationEntry]) -> Result<Outcome, Fail> {
        // IDs are given first, in request order, so the ones made here follow that order.
        let entries = entries
            .iter()
            .map(|e| self.with_id(e))
            .collect::<Result<Vec<_>, _>>()?;
        let mut ids = std::collections::HashSet::with_capacity(entries.len());
        let mut created: std::collections::HashMap<&str, Vec<&RegistrationEntry>> =
            std::collections::HashMap::new();
        let mut results = Vec::with_capacity(entries.len());
        for with_id in &entries {
            let entry = &**with_id;
            let earlier_conflict = created
                .get(entry.spiffe_id.as_str())
                .and_then(|v| v.iter().find(|e| e.same_mapping(entry)));
            let r = if ids.contains(entry.id.as_str()) {
                Err(CommandError::EntryIdExists {
                    id: entry.id.clone(),
                })
            } else if let Some(other) = earlier_conflict {
                Err(CommandError::EntryConflict {
                    existing_id: other.id.clone(),
                })
            } else {
                match self.create_entry(entry, matches!(with_id, Cow::Owned(_))) {
                    Ok(new) => Ok(new),
                    Err(Fail::Refused(e)) => Err(e),
                    Err(Fail::Storage(e)) => return Err(Fail::Storage(e)),
                }
            };
            if r.is_ok() {
                ids.insert(entry.id.as_str());
                created
                    .entry(entry.spiffe_id.as_str())
                    .or_default()
                    .push(entry);
            }
            results.push(r);
        }
        Ok(Outcome::EntryBatch { results })
    }

    fn entry_update(
        &mut self,
        entry: &RegistrationEntry,
        expected_revision: Option<u64>,
    ) -> Result<Outcome, Fail> {
        let old = self.existing_entry(&entry.id)?;
        if let Some(expected) = expected_revision {
            if old.revision != expected {
                return Err(CommandError::EntryRevisionMismatch {
                    id: old.id,
                    expected,
                    actual: old.revision,
                }
                .into());
            }
        }
        self.check_entry(entry)?;
        let mut new = entry.clone();
        new.revision = self.revision;
        new.created_at = old.created_at;
        self.put_entry(Some(&old), &new)?;
        Ok(Outcome::Entry { entry: new })
    }

    fn existing_entry(&self, id: &str) -> Result<RegistrationEntry, Fail> {
        self.store
            .get_entry(id)?
            .ok_or_else(|| CommandError::EntryNotFound { id: id.to_owned() }.into())
    }

    fn remove_entry_indexes(&mut self, e: &RegistrationEntry) -> Result<(), StorageError> {
        let s = self.store;
        s.delete(
            &mut self.batch,
            CF_ENTRIES_BY_PARENT,
            &index_key(e.parent_id.as_str(), &e.id),
        )?;
        s.delete(
            &mut self.batch,
            CF_ENTRIES_BY_SPIFFE_ID,
            &index_key(e.spiffe_id.as_str(), &e.id),
        )?;
        for sel in &e.selectors {
            s.delete(
                &mut self.batch,
                CF_ENTRIES_BY_SELECTOR,
                &index_key(&sel.to_string(), &e.id),
            )?;
        }
        Ok(())
    }

    fn put_entry(
        &mut self,
        old: Option<&RegistrationEntry>,
        e: &RegistrationEntry,
    ) -> Result<(), StorageError> {
        if let Some(old) = old {
            self.remove_entry_indexes(old)?;
        }
        let s = self.store;
        s.put_typed(&mut self.batch, CF_ENTRIES, e.id.as_bytes(), e)?;
        s.put_raw(
            &mut self.batch,
            CF_ENTRIES_BY_PARENT,
            &index_key(e.parent_id.as_str(), &e.id),
            &[],
        )?;
        s.put_raw(
            &mut self.batch,
            CF_ENTRIES_BY_SPIFFE_ID,
            &index_key(e.spiffe_id.as_str(), &e.id),
            &[],
        )?;
        for sel in &e.selectors {
            s.put_raw(
                &mut self.batch,
                CF_ENTRIES_BY_SELECTOR,
                &index_key(&sel.to_string(), &e.id),
                &[],
            )?;
        }
        self.changes.push(Change::EntryPut { entry: e.clone() });
        Ok(())
    }

    fn delete_entry(&mut self, e: &RegistrationEntry) -> Result<(), StorageError> {
        self.remove_entry_indexes(e)?;
        self.store
            .delete(&mut self.batch, CF_ENTRIES, e.id.as_bytes())?;
        self.changes.push(Change::EntryDeleted { entry: e.clone() });
        Ok(())
    }

    // ---- agents and tokens -----------------------------------------------------------------

    fn existing_agent(&self, spiffe_id: &plinth_spiffe::SpiffeId) -> Result<AttestedAgent, Fail> {
        self.store.get_agent(spiffe_id)?.ok_or_else(|| {
            CommandError::AgentNotFound {
                spiffe_id: spiffe_id.to_string(),
            }
            .into()
        })
    }

    fn usable_agent(&self, spiffe_id: &plinth_spiffe::SpiffeId) -> Result<AttestedAgent, Fail> {
        let agent = self.existing_agent(spiffe_id)?;
        if agent.banned {
            return Err(CommandError::AgentBanned {
                spiffe_id: spiffe_id.to_string(),
            }
            .into());
        }
        Ok(agent)
    }

    fn put_agent(&mut self, agent: &AttestedAgent) -> Result<(), StorageError> {
        self.store.put_typed(
            &mut self.batch,
            CF_AGENTS,
            agent.spiffe_id.as_str().as_bytes(),
            agent,
        )?;
        self.changes.push(Change::AgentPut {
            agent: agent.clone(),
        });
        Ok(())
    }

    fn consume_token(&mut self, token: &str) -> Result<JoinToken, Fail> {
        let t = self
            .store
            .get_join_token(token)?
            .ok_or(CommandError::JoinTokenNotFound)?;
        if t.expires_at <= self.now {
            return Err(CommandError::JoinTokenExpired.into());
        }
        self.store
            .delete(&mut self.batch, CF_JOIN_TOKENS, token.as_bytes())?;
        self.changes.push(Change::JoinTokensChanged);
        Ok(t)
    }

    // ---- bundles and federation ------------------------------------------------------------

    fn bundle_set(&mut self, offered: &StoredBundle) -> Result<Outcome, Fail> {
        validate(offered)?;
        let old = self.store.get_bundle(&offered.trust_domain)?;
        let next = match &old {
            Some(old) => {
                if offered.sequence_number != 0 && offered.sequence_number < old.sequence_number {
                    return Err(CommandError::BundleSequenceRegressed {
                        trust_domain: offered.trust_domain.to_string(),
                        stored: old.sequence_number,
                        offered: offered.sequence_number,
                    }
                    .into());
                }
                if old.same_content(offered) {
                    return Ok(Outcome::Bundle {
                        bundle: old.clone(),
                    });
                }
                old.sequence_number + 1
            }
            None => 1,
        };
        let mut bundle = offered.clone();
        bundle.sequence_number = next.max(offered.sequence_number);
        self.put_bundle(&bundle)?;
        Ok(Outcome::Bundle { bundle })
    }

    fn put_bundle(&mut self, bundle: &StoredBundle) -> Result<(), StorageError> {
        self.store.put_typed(
            &mut self.batch,
            CF_BUNDLES,
            bundle.trust_domain.name().as_bytes(),
            bundle,
        )?;
        self.changes.push(Change::BundlePut {
            bundle: bundle.clone(),
        });
        Ok(())
    }

    fn put_federation(&mut self, r: &FederationRelationship) -> Result<Outcome, Fail> {
        self.store.put_typed(
            &mut self.batch,
            CF_FEDERATION,
            r.trust_domain.name().as_bytes(),
            r,
        )?;
        self.changes.push(Change::FederationPut {
            relationship: r.clone(),
        });
        Ok(Outcome::Federation {
            relationship: r.clone(),
        })
    }

    // ---- CA journal ------------------------------------------------------------------------

    fn authority_in(
        &self,
        authority_id: &str,
        expected: AuthorityStatus,
    ) -> Result<CaAuthority, Fail> {
        let a = self.store.get_authority(authority_id)?.ok_or_else(|| {
            CommandError::AuthorityNotFound {
                authority_id: authority_id.to_owned(),
            }
        })?;
        if a.status != expected {
            return Err(CommandError::AuthorityWrongStatus {
                authority_id: authority_id.to_owned(),
                expected: format!("{expected:?}").to_lowercase(),
                actual: format!("{:?}", a.status).to_lowercase(),
            }
            .into());
        }
        Ok(a)
    }

    fn put_authority(&mut self, a: &CaAuthority) -> Result<(), StorageError> {
        self.store
            .put_typed(&mut self.batch, CF_CA_JOURNAL, a.authority_id.as_bytes(), a)?;
        self.changes.push(Change::AuthorityPut {
            authority: a.clone(),
        });
        Ok(())
    }
}

fn append_jwt(bundle: &mut StoredBundle, a: &StoredJwtAuthority) {
    if !bundle.jwt_authorities.iter().any(|x| x.key_id == a.key_id) {
        bundle.jwt_authorities.push(a.clone());
    }
}

fn validate(bundle: &StoredBundle) -> Result<(), CommandError> {
    bundle
        .to_bundle()
        .map(|_| ())
        .map_err(|e| CommandError::InvalidBundle {
            reason: e.to_string(),
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::cell::Cell;

    use plinth_spiffe::{Selectors, SpiffeId};

    use super::*;
    use crate::model::JoinToken;

    thread_local! {
        /// Simulates a crash just before a batch applies its command number N.
        static CRASH_BEFORE: Cell<Option<usize>> = const { Cell::new(None) };
    }

    pub(super) fn crash_here(i: usize) -> bool {
        CRASH_BEFORE.with(|c| c.get() == Some(i))
    }

    fn entry(id: &str, spiffe: &str, selector: &str) -> RegistrationEntry {
        RegistrationEntry::new(
            id,
            SpiffeId::new(spiffe).unwrap(),
            SpiffeId::new("spiffe://example.org/agent").unwrap(),
            Selectors::parse_all(&[selector]).unwrap(),
        )
    }

    /// Commands that depend on each other: each one's outcome depends on the ones before it.
    fn commands() -> Vec<Command> {
        let token = JoinToken {
            token: "tok".into(),
            spiffe_id: None,
            expires_at: 5_000,
        };
        vec![
            Command::EntryCreate {
                entry: entry("e1", "spiffe://example.org/web", "unix:uid:1"),
            },
            // Same ID as the one just created.
            Command::EntryCreate {
                entry: entry("e1", "spiffe://example.org/db", "unix:uid:2"),
            },
            // Compare-and-set against the revision the first command produced.
            Command::EntryUpdate {
                entry: entry("e1", "spiffe://example.org/web2", "unix:uid:1"),
                expected_revision: Some(1),
            },
            Command::JoinTokenCreate {
                token: token.clone(),
            },
            Command::JoinTokenConsume {
                token: "tok".into(),
            },
            // Consumed by the command before.
            Command::JoinTokenConsume {
                token: "tok".into(),
            },
            // The same mapping as e1 now has.
            Command::EntryCreate {
                entry: entry("e2", "spiffe://example.org/web2", "unix:uid:1"),
            },
            Command::EntryDelete { id: "e1".into() },
            // Allowed once e1 is gone.
            Command::EntryCreate {
                entry: entry("e2", "spiffe://example.org/web2", "unix:uid:1"),
            },
        ]
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("db")).unwrap();
        (dir, store)
    }

    fn proposal(command: Command) -> Proposal {
        Proposal::at(1_000, command)
    }

    /// Everything but the applied log ID, which differs by construction.
    fn state(store: &Store) -> (u64, Vec<RegistrationEntry>, Vec<JoinToken>) {
        (
            store.revision().unwrap(),
            store.list_entries().unwrap(),
            store.list_join_tokens().unwrap(),
        )
    }

    fn apply_batch(store: &Store, index: u64, commands: Vec<Command>, applied: &[u8]) -> Applied {
        let batch = proposal(Command::Batch { commands });
        store.apply(index, Some(&batch), applied).unwrap()
    }

    fn batch_responses(applied: &Applied) -> Vec<Response> {
        match &applied.response.result {
            Ok(Outcome::Batch { responses }) => responses.clone(),
            other => panic!("not a batch outcome: {other:?}"),
        }
    }

    #[test]
    fn a_batch_applies_like_one_log_entry_per_command() {
        let (_a, one_by_one) = open();
        let mut expected = Vec::new();
        let mut events = Vec::new();
        for (i, c) in commands().into_iter().enumerate() {
            let applied = one_by_one
                .apply(i as u64 + 1, Some(&proposal(c)), b"x")
                .unwrap();
            expected.push(applied.response);
            events.extend(applied.changes.into_iter().map(|e| (e.revision, e.change)));
        }
        // Each behaves as the comments in `commands` say.
        let errors: Vec<Option<CommandError>> =
            expected.iter().map(|r| r.result.clone().err()).collect();
        assert_eq!(
            errors,
            vec![
                None,
                Some(CommandError::EntryIdExists { id: "e1".into() }),
                None,
                None,
                None,
                Some(CommandError::JoinTokenNotFound),
                Some(CommandError::EntryConflict {
                    existing_id: "e1".into()
                }),
                None,
                None,
            ]
        );

        let (_b, batched) = open();
        let applied = apply_batch(&batched, 7, commands(), b"y");
        assert_eq!(batch_responses(&applied), expected);
        assert_eq!(applied.response.revision, one_by_one.revision().unwrap());
        let batched_events: Vec<_> = applied
            .changes
            .into_iter()
            .map(|e| {
                assert_eq!(e.log_index, 7);
                (e.revision, e.change)
            })
            .collect();
        assert_eq!(batched_events, events);
        assert_eq!(state(&batched), state(&one_by_one));
        assert_eq!(batched.applied_state().unwrap(), Some(b"y".to_vec()));
    }

    #[test]
    fn a_batch_cut_by_a_crash_is_finished_without_applying_anything_twice() {
        let (_a, reference) = open();
        let whole = Command::Batch {
            commands: commands(),
        };
        let expected = batch_responses(
            &reference
                .apply(1, Some(&proposal(whole.clone())), b"1")
                .unwrap(),
        );

        for cut in 1..commands().len() {
            let (dir, store) = open();
            CRASH_BEFORE.with(|c| c.set(Some(cut)));
            let crashed = store.apply(1, Some(&proposal(whole.clone())), b"1");
            CRASH_BEFORE.with(|c| c.set(None));
            assert!(crashed.is_err(), "cut {cut}");
            // The entry is not marked applied, so Raft hands it over again after the restart.
            assert_eq!(store.applied_state().unwrap(), None, "cut {cut}");

            // A follower that installs a snapshot taken at this moment ends in the same state.
            let (snapshot, _) = store.export_state().unwrap();
            drop(store);
            let store = Store::open(dir.path().join("db")).unwrap();
            let (_c, installed) = open();
            installed.import_state(&snapshot).unwrap();

            for replay in [&store, &installed] {
                let applied = replay
                    .apply(1, Some(&proposal(whole.clone())), b"1")
                    .unwrap();
                let responses = batch_responses(&applied);
                // The commands before the cut answer as replays; the rest answer as they would
                // have without the crash.
                assert!(responses[..cut]
                    .iter()
                    .all(|r| r.result == Ok(Outcome::None)));
                assert_eq!(responses[cut..], expected[cut..], "cut {cut}");
                assert_eq!(state(replay), state(&reference), "cut {cut}");
                assert_eq!(replay.applied_state().unwrap(), Some(b"1".to_vec()));
                // The progress record is gone, so a later batch starts from its first command.
                assert_eq!(
                    replay
                        .get_typed::<BatchProgress>(CF_SM_META, SM_BATCH_PROGRESS)
                        .unwrap(),
                    None
                );
            }
        }
    }

    #[test]
    fn progress_of_another_log_entry_is_ignored() {
        let (_a, store) = open();
        let mut batch = WriteBatch::default();
        let stale = BatchProgress {
            log_index: 3,
            done: 5,
        };
        store
            .put_typed(&mut batch, CF_SM_META, SM_BATCH_PROGRESS, &stale)
            .unwrap();
        store.write_batch(batch).unwrap();
        let applied = apply_batch(&store, 4, commands(), b"4");
        assert!(batch_responses(&applied)[0].result.is_ok());
        let ids: Vec<String> = store
            .list_entries()
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, vec!["e2"]);
    }

    #[test]
    fn a_batch_inside_a_batch_is_refused_and_changes_nothing() {
        let (_a, store) = open();
        let applied = store
            .apply(
                1,
                Some(&proposal(Command::Batch {
                    commands: vec![
                        Command::Batch {
                            commands: vec![Command::EntryCreate {
                                entry: entry("e1", "spiffe://example.org/web", "unix:uid:1"),
                            }],
                        },
                        Command::EntryDelete { id: "e1".into() },
                    ],
                })),
                b"1",
            )
            .unwrap();
        let errors: Vec<_> = batch_responses(&applied)
            .into_iter()
            .map(|r| r.result.err())
            .collect();
        assert_eq!(
            errors,
            vec![
                Some(CommandError::NestedBatch),
                Some(CommandError::EntryNotFound { id: "e1".into() })
            ]
        );
        assert_eq!(store.revision().unwrap(), 0);
        assert!(store.list_entries().unwrap().is_empty());
        assert_eq!(store.applied_state().unwrap(), Some(b"1".to_vec()));
    }

    /// Applied state is not in the write-ahead log: a crash goes back to the last persisted
    /// state, whole (every table and the applied index of one point), and the Raft log,
    /// synced, keeps every entry to apply again. A clean close keeps everything.
    #[test]
    fn a_crash_goes_back_to_the_last_persisted_state_whole_and_keeps_the_log() {
        let (dir, store) = open();
        let create = |i: u64| Command::EntryCreate {
            entry: entry(
                &format!("e{i}"),
                &format!("spiffe://example.org/w{i}"),
                "unix:uid:1",
            ),
        };
        for i in 1..=3 {
            store.log_append([(i, vec![i as u8])]).unwrap();
            store
                .apply(i, Some(&proposal(create(i))), format!("{i}").as_bytes())
                .unwrap();
        }
        store.persist_state().unwrap();
        let persisted = state(&store);
        for i in 4..=6 {
            store.log_append([(i, vec![i as u8])]).unwrap();
            store
                .apply(i, Some(&proposal(create(i))), format!("{i}").as_bytes())
                .unwrap();
        }
        let latest = state(&store);
        assert_ne!(latest, persisted);

        let copy = store.copy_files_while_open();
        let crashed = Store::open(copy.path()).unwrap();
        assert_eq!(crashed.applied_state().unwrap(), Some(b"3".to_vec()));
        assert_eq!(state(&crashed), persisted);
        let log: Vec<_> = crashed.log_range(0, None).unwrap();
        assert_eq!(log.len(), 6, "every synced log entry survives");
        // Applying the lost entries again gives the state the store had.
        for i in 4..=6 {
            crashed
                .apply(i, Some(&proposal(create(i))), format!("{i}").as_bytes())
                .unwrap();
        }
        assert_eq!(state(&crashed), latest);

        drop(store);
        let reopened = Store::open(dir.path().join("db")).unwrap();
        assert_eq!(reopened.applied_state().unwrap(), Some(b"6".to_vec()));
        assert_eq!(state(&reopened), latest);
    }

    /// An installed snapshot replaces the state whole, also after a crash: a delete that was
    /// only in memory when the snapshot came must not let the deleted key come back from an
    /// older table file.
    #[test]
    fn an_import_after_deletes_in_memory_leaves_nothing_behind_after_a_crash() {
        let (_dir, store) = open();
        let create = |id: &str| Command::EntryCreate {
            entry: entry(id, &format!("spiffe://example.org/{id}"), "unix:uid:1"),
        };
        store.apply(1, Some(&proposal(create("e1"))), b"1").unwrap();
        store.persist_state().unwrap();
        let delete = Command::EntryDelete { id: "e1".into() };
        store.apply(2, Some(&proposal(delete)), b"2").unwrap();

        let (_other_dir, other) = open();
        other.apply(1, Some(&proposal(create("e2"))), b"s").unwrap();
        let (data, _) = other.export_state().unwrap();
        store.import_state(&data).unwrap();
        assert_eq!(state(&store), state(&other));

        let copy = store.copy_files_while_open();
        let crashed = Store::open(copy.path()).unwrap();
        assert_eq!(state(&crashed), state(&other));
        assert_eq!(crashed.applied_state().unwrap(), Some(b"s".to_vec()));
    }
}
