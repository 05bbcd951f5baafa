//! Workload attestation: who is calling the Workload API, as told by the kernel.
//!
//! [`Peer`] identifies the caller of a Unix-socket connection (SO_PEERCRED, a pidfd from
//! SO_PEERPIDFD where the kernel has it, and an open `/proc/<pid>` directory); attestors read
//! facts about it through that directory and turn them into [`Selectors`]; after attestation
//! [`Peer::check_same_process`] makes sure the facts came from the process that connected.

pub mod cgroup;
pub mod docker;
mod peer;
pub mod systemd;
pub mod unix;

use std::fmt;

use plinth_spiffe::Selectors;

pub use peer::Peer;

/// Why a caller could not be attested. The Workload API answers `Unavailable` to all of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The connection carries no usable peer credentials.
    #[error("cannot identify the caller: {0}")]
    NoPeer(String),
    /// The process that connected exited, or its PID now names another process.
    #[error("the calling process exited or its PID was reused")]
    CallerGone,
    /// Reading facts about the caller failed.
    #[error("cannot read {what} of the caller: {reason}")]
    Read { what: String, reason: String },
    /// A fact about the caller is malformed or ambiguous (e.g. several container IDs).
    #[error("{0}")]
    Invalid(String),
}

/// Turns facts about a caller into selectors. Implementations read only through `peer` (never
/// `/proc/<pid>` by path), so that the facts belong to the process that connected.
pub trait WorkloadAttestor: Send + Sync + fmt::Debug {
    /// The selector type this attestor produces, e.g. `unix`.
    fn kind(&self) -> &'static str;
    /// Attests the caller; runs on a blocking thread.
    fn attest(&self, peer: &Peer) -> Result<Selectors, AttestError>;
}

/// Runs every attestor against `peer`, then checks that the caller is still the process that
/// connected; the union of the selectors.
pub fn attest_all(
    attestors: &[std::sync::Arc<dyn WorkloadAttestor>],
    peer: &Peer,
) -> Result<Selectors, AttestError> {
    let mut all = Selectors::new();
    for a in attestors {
        for s in a.attest(peer)?.iter() {
            all.insert(s.clone());
        }
    }
    peer.check_same_process()?;
    Ok(all)
}
