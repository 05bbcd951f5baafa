//! What clients did and saw, with times relative to the start of the run (microseconds).

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::linearizability::{EntryInput, EntryOutput, Operation};

/// One operation on a register entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryOp {
    pub client: usize,
    /// The node whose admin socket took the call.
    pub server: u64,
    pub key: String,
    pub input: EntryInput,
    /// `None`: indeterminate (the client does not know whether it took effect).
    pub output: Option<EntryOutput>,
    /// Why it failed or is indeterminate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Known not to have taken effect although no definite answer came: the server reported
    /// that it could not even open a connection to forward the call to the leader.
    #[serde(default)]
    pub not_applied: bool,
    pub call_us: u64,
    /// When the client stopped waiting (also for indeterminate operations).
    pub end_us: u64,
}

impl EntryOp {
    pub fn is_write(&self) -> bool {
        !matches!(self.input, EntryInput::Read)
    }

    /// Known to have happened (or known not to have, for a refused write).
    pub fn definite(&self) -> bool {
        self.output.is_some()
    }

    /// Acknowledged: the write took effect, or the read returned.
    pub fn acknowledged(&self) -> bool {
        matches!(
            (&self.input, &self.output),
            (EntryInput::Read, Some(_)) | (_, Some(EntryOutput::Ok))
        )
    }

    /// Part of the history the checker sees: everything except failed reads (which changed
    /// nothing and returned nothing) and writes known not to have been applied.
    pub fn checked(&self) -> bool {
        !self.not_applied && (self.is_write() || self.output.is_some())
    }

    /// The operation as the checker sees it (indeterminate: return at infinity).
    pub fn to_operation(&self) -> Operation<EntryInput, EntryOutput> {
        Operation {
            input: self.input.clone(),
            output: self.output.clone(),
            call: self.call_us,
            ret: self.output.as_ref().map(|_| self.end_us),
        }
    }
}

/// One creation of an entry never changed afterwards (the "no acknowledged write lost" set).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetAdd {
    pub id: String,
    pub server: u64,
    /// True if the server acknowledged the create.
    pub acknowledged: bool,
    pub call_us: u64,
    pub end_us: u64,
    /// A probe write measuring recovery after a fault.
    pub probe: bool,
}

/// How one attestation with a join token ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttestOutcome {
    /// The server issued an agent SVID.
    Attested,
    /// The server refused (PermissionDenied: token unknown or already used).
    Refused,
    /// Unknown (timeout, connection lost, unavailable).
    Indeterminate,
    /// Never reached a server (nothing listened on the socket).
    NotSent,
}

/// One join token and the attestations raced with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRace {
    pub token_no: u64,
    pub created_on: u64,
    pub created_us: u64,
    pub attempts: Vec<TokenAttempt>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenAttempt {
    pub server: u64,
    pub outcome: AttestOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub call_us: u64,
    pub end_us: u64,
}

/// One Workload API look through an agent: X509-SVID fetch and the trust domain's bundle
/// sequence (from FetchJWTBundles' `spiffe_sequence`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadSample {
    pub agent: usize,
    pub t_us: u64,
    pub svid_ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub bundle_sequence: Option<u64>,
}

/// Everything recorded during a run; shared by every client task.
#[derive(Debug)]
pub struct History {
    start: Instant,
    entries: Mutex<Vec<EntryOp>>,
    set: Mutex<Vec<SetAdd>>,
    tokens: Mutex<Vec<TokenRace>>,
    workload: Mutex<Vec<WorkloadSample>>,
    /// Calls that could not even connect (sent nowhere; not part of the history).
    unsent: Mutex<Vec<u64>>,
}

impl History {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            entries: Mutex::default(),
            set: Mutex::default(),
            tokens: Mutex::default(),
            workload: Mutex::default(),
            unsent: Mutex::default(),
        }
    }

    /// Microseconds since the start of the run.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    pub fn push_entry(&self, op: EntryOp) {
        lock(&self.entries).push(op);
    }
    pub fn push_set(&self, add: SetAdd) {
        lock(&self.set).push(add);
    }
    pub fn push_token(&self, t: TokenRace) {
        lock(&self.tokens).push(t);
    }
    pub fn push_workload(&self, w: WorkloadSample) {
        lock(&self.workload).push(w);
    }
    pub fn workload(&self) -> Vec<WorkloadSample> {
        lock(&self.workload).clone()
    }
    pub fn push_unsent(&self, at_us: u64) {
        lock(&self.unsent).push(at_us);
    }

    pub fn entries(&self) -> Vec<EntryOp> {
        lock(&self.entries).clone()
    }
    pub fn set(&self) -> Vec<SetAdd> {
        lock(&self.set).clone()
    }
    pub fn tokens(&self) -> Vec<TokenRace> {
        lock(&self.tokens).clone()
    }
    pub fn unsent(&self) -> Vec<u64> {
        lock(&self.unsent).clone()
    }
}

/// A poisoned lock only means a client task panicked; the data is still a valid history.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
