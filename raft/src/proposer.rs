//! Group proposal: the writes that reach the leader while earlier ones are being committed go
//! into the log together, as one [`Command::Batch`] entry.
//!
//! openraft 0.9 handles every `client_write` on its own: one message to the Raft core, one log
//! append, one entry to replicate, one state-machine apply and one answer. Under many concurrent
//! writers that per-entry work, not the disk or the network, bounded throughput
//! (docs/benchmarks.md). The proposer keeps at most [`MAX_IN_FLIGHT`] proposals in flight; writes
//! that arrive while all are busy wait in a queue, and the next proposal takes all of them (up
//! to [`MAX_BATCH`]). A write that finds a free slot and nobody waiting is proposed at once, as
//! its own command and from the caller's own task, so a lone client pays nothing for batching.
//! Each command in a batch is applied exactly as if it had its own log entry (see
//! `plinth_storage::Store::apply`) and gets its own answer.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use plinth_storage::{Command, Outcome, Proposal, Response};
use tokio::sync::oneshot;

use crate::network::ForwardError;
use crate::types::{NodeId, Raft};

/// Proposals in flight at once. More lets a batch leave before the previous one is committed
/// (the log pipelines them); fewer makes batches larger. Two measured best in `raft-bench`
/// (docs/benchmarks.md).
pub const MAX_IN_FLIGHT: usize = 2;
/// Most commands in one batch (a bound on one log entry's size and apply time).
pub const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<Response, ForwardError>>;

struct Pending {
    command: Command,
    reply: Reply,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Pending>,
    in_flight: usize,
}

/// Proposes commands on this node's Raft, batching them under load. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Proposer {
    raft: Raft,
    queue: Arc<Mutex<Queue>>,
    max_in_flight: usize,
}

impl std::fmt::Debug for Proposer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposer")
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

enum Turn {
    /// A slot was free and nobody waiting: propose from the caller's task.
    Now(Box<Command>),
    /// Wait for a batch to carry the command.
    Queued(oneshot::Receiver<Result<Response, ForwardError>>),
}

/// Holds one in-flight slot; releasing it hands the slot to the waiting writes, if any.
struct Slot {
    proposer: Proposer,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.proposer.release();
    }
}

impl Proposer {
    pub(crate) fn new(raft: Raft) -> Self {
        Self {
            raft,
            queue: Arc::default(),
            max_in_flight: MAX_IN_FLIGHT,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Proposes `command` (on this node, which must be the leader) and waits for its answer.
    /// If the caller stops waiting, the command may still be proposed and committed.
    pub(crate) async fn write(&self, command: Command) -> Result<Response, ForwardError> {
        let turn = {
            let mut q = self.lock();
            if q.waiting.is_empty() && q.in_flight < self.max_in_flight {
                q.in_flight += 1;
                Turn::Now(Box::new(command))
            } else {
                let (reply, answer) = oneshot::channel();
                q.waiting.push(Pending { command, reply });
                Turn::Queued(answer)
            }
        };
        match turn {
            Turn::Queued(answer) => answer
                .await
                .map_err(|_| ForwardError::Failed("the Raft node is shutting down".into()))?,
            Turn::Now(command) => {
                let _slot = Slot {
                    proposer: self.clone(),
                };
                let started = std::time::Instant::now();
                tracing::trace!("proposal start");
                let r = propose_one(&self.raft, *command).await;
                // With the AppendEntries line in `network`, a write's timeline
                // (RUST_LOG=plinth_raft=trace).
                tracing::trace!(
                    took_us = started.elapsed().as_micros() as u64,
                    "proposal done"
                );
                r
            }
        }
    }

    /// A slot became free: give it to the waiting writes (in a task of their own, so no caller
    /// is held up by others' commands), or return it.
    fn release(&self) {
        let mut q = self.lock();
        if q.waiting.is_empty() {
            q.in_flight -= 1;
            return;
        }
        drop(q);
        let slot = Slot {
            proposer: self.clone(),
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime left to propose on: the waiting callers get "shutting down".
            self.lock().waiting.clear();
            drop(slot);
            return;
        };
        runtime.spawn(async move {
            let batch = {
                let mut q = slot.proposer.lock();
                let n = q.waiting.len().min(MAX_BATCH);
                q.waiting.drain(..n).collect::<Vec<_>>()
            };
            propose_batch(&slot.proposer.raft, batch).await;
            drop(slot);
        });
    }
}

/// The leader's clock in Unix milliseconds, stamped on each proposal.
fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub(crate) fn client_write_error(
    e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
) -> ForwardError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ForwardError::NotLeader {
            leader: f.leader_id,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(m)) => {
            ForwardError::Membership(m.to_string())
        }
        RaftError::Fatal(f) => ForwardError::Failed(f.to_string()),
    }
}

async fn propose_one(raft: &Raft, command: Command) -> Result<Response, ForwardError> {
    raft.client_write(Proposal::at_millis(unix_now_ms(), command))
        .await
        .map(|r| r.data)
        .map_err(client_write_error)
}

async fn propose_batch(raft: &Raft, mut batch: Vec<Pending>) {
    // A caller that gave up (timed out) was told the outcome is unknown; not proposing its
    // command keeps that true and saves the work.
    batch.retain(|p| !p.reply.is_closed());
    if batch.len() <= 1 {
        if let Some(p) = batch.pop() {
            let _ = p.reply.send(propose_one(raft, p.command).await);
        }
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<Reply>) =
        batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let count = commands.len();
    let result = raft
        .client_write(Proposal::at_millis(
            unix_now_ms(),
            Command::Batch { commands },
        ))
        .await;
    match result {
        Ok(r) => match r.data.result {
            Ok(Outcome::Batch { responses }) if responses.len() == count => {
                for (reply, response) in replies.into_iter().zip(responses) {
                    let _ = reply.send(Ok(response));
                }
            }
            other => {
                // Apply answers a batch with one response per command; anything else is a bug,
                // and the commands' outcome is unknown to their callers.
                tracing::error!(count, refused = ?other.err(), "a command batch got a malformed answer");
                for reply in replies {
                    let _ = reply.send(Err(ForwardError::Failed(
                        "the state machine answered a command batch without one response per \
                         command"
                            .into(),
                    )));
                }
            }
        },
        Err(e) => {
            let e = client_write_error(e);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
