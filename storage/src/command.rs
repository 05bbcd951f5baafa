//! The commands of the replicated state machine, their outcomes and the changes they publish.
//!
//! A [`Proposal`] is what goes through Raft: a [`Command`] plus the time the leader stamped on it.
//! Applying a proposal reads only the stored state and the proposal, so every server reaches the
//! same state and the same [`Response`]. Preconditions are checked at apply time, which is what
//! makes racing requests safe: of two proposals consuming one join token, the one ordered first
//! by the log wins and the other is refused with [`CommandError::JoinTokenNotFound`].

use plinth_spiffe::{Selectors, SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

use crate::model::{
    AttestedAgent, CaAuthority, FederationRelationship, JoinToken, RegistrationEntry, SecretString,
    StoredBundle, StoredJwtAuthority,
};

/// A command with the leader's clock reading: `now` in Unix seconds and `now_ms` in Unix
/// milliseconds (the same instant; entry IDs take their time from it, see
/// [`crate::entry_id`]). A proposal written without `now_ms` reads as `now` whole seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub now: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now_ms: Option<i64>,
    pub command: Command,
}

impl Proposal {
    /// `command` stamped at `now_ms` Unix milliseconds.
    pub fn at_millis(now_ms: i64, command: Command) -> Self {
        Self {
            now: now_ms.div_euclid(1000),
            now_ms: Some(now_ms),
            command,
        }
    }

    /// `command` stamped at `now` whole Unix seconds.
    pub fn at(now: i64, command: Command) -> Self {
        Self::at_millis(now.saturating_mul(1000), command)
    }

    /// The stamp in Unix milliseconds.
    pub fn millis(&self) -> i64 {
        self.now_ms.unwrap_or_else(|| self.now.saturating_mul(1000))
    }
}

/// Every change to the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Command {
    /// Create an entry. `revision` and `created_at` are set by apply, and so is `id` if it is
    /// empty (the next ID in log order, [`crate::entry_id`]). Refused if the ID exists or
    /// another entry has the same SPIFFE ID, parent ID and selectors.
    EntryCreate {
        entry: RegistrationEntry,
    },
    /// Create many entries in one log entry. Each is checked and created on its own, in order,
    /// exactly as [`Command::EntryCreate`] would (a refused one does not stop the others), and
    /// entries earlier in the same batch count for the ID and conflict checks. The outcome is
    /// [`Outcome::EntryBatch`], one result per entry in the same order.
    EntryCreateBatch {
        entries: Vec<RegistrationEntry>,
    },
    /// Replace an entry (same ID). With `expected_revision`, refused unless the stored entry is at
    /// that revision (compare-and-set).
    EntryUpdate {
        entry: RegistrationEntry,
        expected_revision: Option<u64>,
    },
    EntryDelete {
        id: String,
    },

    /// Record a successful node attestation. With `join_token`, the token is consumed in the same
    /// step, so an attestation and its token consumption commit together or not at all.
    AgentAttest {
        spiffe_id: SpiffeId,
        attestation_type: String,
        selectors: Selectors,
        serial_number: String,
        expires_at: i64,
        join_token: Option<SecretString>,
    },
    /// Record a renewed agent SVID as pending. Refused unless `current_serial` is the current or
    /// the pending serial on record; presenting the pending one activates it first.
    AgentRenew {
        spiffe_id: SpiffeId,
        current_serial: String,
        new_serial: String,
        expires_at: i64,
    },
    /// The agent used its pending renewed SVID: it becomes the current one and the previous SVID
    /// is refused from now on. A no-op if `serial` is already current.
    AgentActivateSerial {
        spiffe_id: SpiffeId,
        serial: String,
    },
    /// Ban: the agent keeps its record (so it cannot simply re-attest) but may do nothing.
    AgentBan {
        spiffe_id: SpiffeId,
    },
    /// Evict: delete the record; the agent must attest again.
    AgentEvict {
        spiffe_id: SpiffeId,
    },

    JoinTokenCreate {
        token: JoinToken,
    },
    /// Consume a token on its own (see also `AgentAttest::join_token`).
    JoinTokenConsume {
        token: SecretString,
    },
    /// Delete every token that expired before the proposal's `now`.
    JoinTokenPrune,

    /// Add authorities to a bundle (created if missing); sequence +1 if anything changed.
    BundleAppend {
        trust_domain: TrustDomain,
        x509_authorities: Vec<Vec<u8>>,
        jwt_authorities: Vec<StoredJwtAuthority>,
    },
    /// Replace a bundle's content. The stored sequence becomes `max(old + 1, bundle.sequence)`.
    /// Refused if `bundle.sequence_number` is non-zero and lower than the stored one (a federation
    /// peer must never roll a bundle back).
    BundleSet {
        bundle: StoredBundle,
    },
    BundleDelete {
        trust_domain: TrustDomain,
    },

    FederationCreate {
        relationship: FederationRelationship,
    },
    FederationUpdate {
        relationship: FederationRelationship,
    },
    FederationDelete {
        trust_domain: TrustDomain,
    },

    /// Journal a freshly prepared authority of one server and publish its public part in the
    /// bundle of `trust_domain` in the same step (a key is in the bundle before it signs anything).
    /// A previously prepared, never activated authority of the same node and kind becomes `Old`.
    CaPrepare {
        trust_domain: TrustDomain,
        authority: CaAuthority,
    },
    /// Prepared -> Active; the node's previously active authority of that kind becomes Old.
    CaActivate {
        authority_id: String,
    },
    /// Old -> Tainted.
    CaTaint {
        authority_id: String,
    },
    /// Tainted -> Revoked, and remove it from the bundle of `trust_domain`.
    CaRevoke {
        trust_domain: TrustDomain,
        authority_id: String,
    },

    /// Several commands in one log entry: the leader groups the writes that reach it while
    /// earlier ones are still being committed. Each command is applied on its own and in order,
    /// exactly as if it had a log entry of its own: it sees the changes of the ones before it,
    /// gets its own revision and its own [`Response`], in [`Outcome::Batch`]. A batch inside a
    /// batch is refused ([`CommandError::NestedBatch`]).
    Batch {
        commands: Vec<Command>,
    },
}

impl Command {
    /// A short name for logs (never includes tokens or keys).
    pub fn name(&self) -> &'static str {
        match self {
            Command::EntryCreate { .. } => "entry_create",
            Command::EntryCreateBatch { .. } => "entry_create_batch",
            Command::EntryUpdate { .. } => "entry_update",
            Command::EntryDelete { .. } => "entry_delete",
            Command::AgentAttest { .. } => "agent_attest",
            Command::AgentRenew { .. } => "agent_renew",
            Command::AgentActivateSerial { .. } => "agent_activate_serial",
            Command::AgentBan { .. } => "agent_ban",
            Command::AgentEvict { .. } => "agent_evict",
            Command::JoinTokenCreate { .. } => "join_token_create",
            Command::JoinTokenConsume { .. } => "join_token_consume",
            Command::JoinTokenPrune => "join_token_prune",
            Command::BundleAppend { .. } => "bundle_append",
            Command::BundleSet { .. } => "bundle_set",
            Command::BundleDelete { .. } => "bundle_delete",
            Command::FederationCreate { .. } => "federation_create",
            Command::FederationUpdate { .. } => "federation_update",
            Command::FederationDelete { .. } => "federation_delete",
            Command::CaPrepare { .. } => "ca_prepare",
            Command::CaActivate { .. } => "ca_activate",
            Command::CaTaint { .. } => "ca_taint",
            Command::CaRevoke { .. } => "ca_revoke",
            Command::Batch { .. } => "batch",
        }
    }
}

/// A refused command: the caller's mistake or a lost race. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "error", rename_all = "snake_case")]
#[non_exhaustive]
pub enum CommandError {
    #[error("entry {id} already exists")]
    EntryIdExists { id: String },
    #[error(
        "an entry with the same SPIFFE ID, parent ID and selectors already exists: {existing_id}"
    )]
    EntryConflict { existing_id: String },
    #[error("entry {id} not found")]
    EntryNotFound { id: String },
    #[error("entry {id} is at revision {actual}, not {expected}")]
    EntryRevisionMismatch {
        id: String,
        expected: u64,
        actual: u64,
    },
    #[error("entry has no selectors")]
    EntryWithoutSelectors,
    #[error("agent {spiffe_id} not found")]
    AgentNotFound { spiffe_id: String },
    #[error("agent {spiffe_id} is banned")]
    AgentBanned { spiffe_id: String },
    #[error("agent {spiffe_id} presented serial {presented}, not its current SVID")]
    AgentSerialMismatch {
        spiffe_id: String,
        presented: String,
    },
    #[error("join token already exists")]
    JoinTokenExists,
    #[error("join token not found or already used")]
    JoinTokenNotFound,
    #[error("join token expired")]
    JoinTokenExpired,
    #[error("bundle for {trust_domain} not found")]
    BundleNotFound { trust_domain: String },
    #[error("bundle for {trust_domain} has sequence {stored}; refusing older sequence {offered}")]
    BundleSequenceRegressed {
        trust_domain: String,
        stored: u64,
        offered: u64,
    },
    #[error("invalid bundle: {reason}")]
    InvalidBundle { reason: String },
    #[error("federation relationship with {trust_domain} already exists")]
    FederationExists { trust_domain: String },
    #[error("federation relationship with {trust_domain} not found")]
    FederationNotFound { trust_domain: String },
    #[error("authority {authority_id} already exists")]
    AuthorityExists { authority_id: String },
    #[error("authority {authority_id} not found")]
    AuthorityNotFound { authority_id: String },
    #[error("authority {authority_id} is {actual}; the transition needs {expected}")]
    AuthorityWrongStatus {
        authority_id: String,
        expected: String,
        actual: String,
    },
    #[error("a command batch cannot contain another batch")]
    NestedBatch,
}

/// What a successful command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// A Raft-internal entry (blank, membership): no state change.
    None,
    Entry {
        entry: RegistrationEntry,
    },
    EntryDeleted {
        entry: RegistrationEntry,
    },
    /// Per-entry results of [`Command::EntryCreateBatch`], in request order.
    EntryBatch {
        results: Vec<Result<RegistrationEntry, CommandError>>,
    },
    Agent {
        agent: AttestedAgent,
    },
    AgentEvicted {
        agent: AttestedAgent,
    },
    JoinTokenCreated {
        expires_at: i64,
    },
    JoinTokenConsumed {
        token: JoinToken,
    },
    JoinTokensPruned {
        count: u64,
    },
    Bundle {
        bundle: StoredBundle,
    },
    BundleDeleted {
        trust_domain: TrustDomain,
    },
    Federation {
        relationship: FederationRelationship,
    },
    FederationDeleted {
        trust_domain: TrustDomain,
    },
    Authority {
        authority: CaAuthority,
    },
    /// One response per command of a [`Command::Batch`], in order. A command that a crash had
    /// already applied before the entry was applied again answers `Ok(Outcome::None)` (nobody
    /// waits for the answers of a replay).
    Batch {
        responses: Vec<Response>,
    },
}

/// The state machine's answer to one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The global revision after this entry (unchanged if it was refused or changed nothing).
    pub revision: u64,
    pub result: Result<Outcome, CommandError>,
}

/// One change published to subscribers (the server pushes these to agents as revisions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Change {
    EntryPut {
        entry: RegistrationEntry,
    },
    EntryDeleted {
        entry: RegistrationEntry,
    },
    AgentPut {
        agent: AttestedAgent,
    },
    AgentDeleted {
        spiffe_id: SpiffeId,
    },
    /// A join token was created or removed; the token itself is never published.
    JoinTokensChanged,
    BundlePut {
        bundle: StoredBundle,
    },
    BundleDeleted {
        trust_domain: TrustDomain,
    },
    FederationPut {
        relationship: FederationRelationship,
    },
    FederationDeleted {
        trust_domain: TrustDomain,
    },
    AuthorityPut {
        authority: CaAuthority,
    },
    /// The whole state was replaced by a snapshot: subscribers must reload everything.
    Reset,
}

impl Change {
    /// Whether it may change what a server trusts or presents: a bundle (its own or a
    /// federated one), a CA authority, or the whole state.
    pub fn affects_trust(&self) -> bool {
        matches!(
            self,
            Change::BundlePut { .. }
                | Change::BundleDeleted { .. }
                | Change::AuthorityPut { .. }
                | Change::Reset
        )
    }
}

/// A change with the revision it produced and the log index that carried it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEvent {
    pub revision: u64,
    pub log_index: u64,
    pub change: Change,
}

impl ChangeEvent {
    /// The revision of the last of `events` that [`Change::affects_trust`], if any: what a
    /// watch of trust changes moves to after them.
    pub fn last_trust_revision(events: &[ChangeEvent]) -> Option<u64> {
        events
            .iter()
            .rev()
            .find(|e| e.change.affects_trust())
            .map(|e| e.revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proposal_keeps_its_milliseconds_and_one_written_without_them_reads_as_whole_seconds() {
        let command = Command::EntryDelete { id: "e1".into() };
        let p = Proposal::at_millis(1_700_000_000_123, command.clone());
        assert_eq!((p.now, p.millis()), (1_700_000_000, 1_700_000_000_123));
        let text = serde_json::to_string(&p).unwrap_or_default();
        assert_eq!(serde_json::from_str::<Proposal>(&text).ok(), Some(p));
        // A stamp before 1970 rounds its second down, not toward zero.
        assert_eq!(Proposal::at_millis(-1, command.clone()).now, -1);
        // What a build without `now_ms` wrote, still in the logs of an upgraded server.
        let old = r#"{"now":1700000000,"command":{"op":"entry_delete","id":"e1"}}"#;
        let read: Proposal = serde_json::from_str(old).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read.now_ms, None);
        assert_eq!(read.millis(), 1_700_000_000_000);
        assert_eq!(read.command, command);
    }
}
