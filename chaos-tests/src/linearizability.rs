//! A Porcupine-style linearizability checker (Wing & Gong's search with Lowe's memoisation, as
//! in Knossos' `wgl` and Porcupine's `checkSingle`) over histories of a sequential model.
//!
//! An operation is a call (invocation time), an input, and either a return (time and output) or
//! nothing: an operation whose outcome the client never learned (timeout, connection lost) is
//! *indeterminate*. It may have taken effect at any point after its call, or never; the checker
//! gives it a return time of infinity and the model must accept any output for it, the usual
//! treatment of Jepsen's `:info` operations.
//!
//! Histories are checked per key (P-compositionality: a history of independent registers is
//! linearizable iff each register's sub-history is), which keeps the search small.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use serde::{Deserialize, Serialize};

/// A sequential specification.
pub trait Model {
    type State: Clone + Eq + Hash;
    type Input;
    type Output;
    /// The state before any operation.
    fn init(&self) -> Self::State;
    /// Applies `input` in `state`: the next state if the model could have produced `output`
    /// (`None` for an indeterminate operation, which must be accepted in every state), else
    /// `None`.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Option<Self::State>;
}

/// One operation of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation<I, O> {
    pub input: I,
    /// `None` for an indeterminate operation.
    pub output: Option<O>,
    pub call: u64,
    /// `None` for an indeterminate operation (returns at infinity).
    pub ret: Option<u64>,
}

/// What the checker concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Linearizable,
    NotLinearizable,
    /// The search exceeded its step budget.
    Unknown,
}

/// The result of a check, with the longest prefix that could be linearized when it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub verdict: Verdict,
    /// Indices (into the history given) of the longest linearized sequence found.
    pub longest_prefix: Vec<usize>,
    /// Search steps used.
    pub steps: u64,
}

/// The default number of search steps before the checker gives up.
pub const DEFAULT_BUDGET: u64 = 20_000_000;

#[derive(Debug, Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    /// For a call: the index of its return event.
    matching: usize,
}

/// A bitset of linearized operations (hashable, for the memo).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// Checks one history (one key) against `model`, giving up after `budget` steps.
pub fn check<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
    budget: u64,
) -> CheckResult {
    let n = history.len();
    if n == 0 {
        return CheckResult {
            verdict: Verdict::Linearizable,
            longest_prefix: vec![],
            steps: 0,
        };
    }
    // Events sorted by time; at equal times calls come first (more overlap, never a false
    // alarm). Indeterminate returns go last, in call order.
    let mut order: Vec<(u64, u8, usize, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in history.iter().enumerate() {
        order.push((op.call, 0, i, i));
        let ret = op.ret.map_or(u64::MAX, |r| r.max(op.call));
        order.push((ret, 1, i, i));
    }
    order.sort();
    let mut events: Vec<Event> = Vec::with_capacity(2 * n);
    let mut ret_pos = vec![0usize; n];
    for (pos, &(_, kind, op, _)) in order.iter().enumerate() {
        if kind == 1 {
            ret_pos[op] = pos;
        }
        events.push(Event {
            op,
            is_call: kind == 0,
            matching: 0,
        });
    }
    for e in events.iter_mut() {
        if e.is_call {
            e.matching = ret_pos[e.op];
        }
    }
    // A doubly linked list over event positions with a sentinel head at index `len`.
    let len = events.len();
    let head = len;
    let mut next: Vec<usize> = (1..=len + 1).collect();
    let mut prev: Vec<usize> = Vec::with_capacity(len + 1);
    for i in 0..len {
        prev.push(if i == 0 { head } else { i - 1 });
    }
    prev.push(usize::MAX);
    next[len - 1] = usize::MAX;
    next[head] = 0;
    prev[0] = head;

    let lift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = nx;
        if nx != usize::MAX {
            prev[nx] = p;
        }
    };
    let unlift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = i;
        if nx != usize::MAX {
            prev[nx] = i;
        }
    };

    let mut state = model.init();
    let mut linearized = Bits::new(n);
    let mut cache: HashSet<(Bits, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut longest: Vec<usize> = Vec::new();
    let mut steps = 0u64;
    let mut cur = next[head];
    while next[head] != usize::MAX {
        steps += 1;
        if steps > budget {
            return CheckResult {
                verdict: Verdict::Unknown,
                longest_prefix: longest,
                steps,
            };
        }
        if cur == usize::MAX {
            // Cannot happen: the list always ends with a return event.
            break;
        }
        let ev = events[cur];
        if ev.is_call {
            let op = &history[ev.op];
            let mut advanced = false;
            if let Some(new_state) = model.step(&state, &op.input, op.output.as_ref()) {
                let mut bits = linearized.clone();
                bits.set(ev.op);
                if cache.insert((bits.clone(), new_state.clone())) {
                    stack.push((cur, state));
                    state = new_state;
                    linearized = bits;
                    // Lift the call and its return out of the list.
                    lift(&mut next, &mut prev, cur);
                    lift(&mut next, &mut prev, ev.matching);
                    if stack.len() > longest.len() {
                        longest = stack.iter().map(|&(e, _)| events[e].op).collect();
                    }
                    cur = next[head];
                    advanced = true;
                }
            }
            if !advanced {
                cur = next[cur];
            }
        } else {
            // A return reached: some operation that must precede it is not linearizable here.
            let Some((call, old_state)) = stack.pop() else {
                return CheckResult {
                    verdict: Verdict::NotLinearizable,
                    longest_prefix: longest,
                    steps,
                };
            };
            let ev = events[call];
            state = old_state;
            linearized.clear(ev.op);
            unlift(&mut next, &mut prev, ev.matching);
            unlift(&mut next, &mut prev, call);
            cur = next[call];
        }
    }
    CheckResult {
        verdict: Verdict::Linearizable,
        longest_prefix: longest,
        steps,
    }
}

// -------------------------------------------------------------------------------------------
// The model the harness uses: a register per registration entry.

/// An operation on one registration entry (keyed by its entry ID). Values are the entry's
/// `hint`, unique per write.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "f", content = "value")]
pub enum EntryInput {
    Create(String),
    Update(String),
    Delete,
    Read,
}

/// What the server answered.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "r", content = "value")]
pub enum EntryOutput {
    Ok,
    NotFound,
    AlreadyExists,
    /// A read: the entry's value, or absent.
    Value(Option<String>),
}

/// Entry create/update/delete/read as a register that may be absent: create fails with
/// AlreadyExists on a present entry, update and delete fail with NotFound on an absent one.
#[derive(Debug, Clone, Copy, Default)]
pub struct EntryModel;

impl Model for EntryModel {
    type State = Option<String>;
    type Input = EntryInput;
    type Output = EntryOutput;

    fn init(&self) -> Self::State {
        None
    }

    fn step(
        &self,
        state: &Self::State,
        input: &EntryInput,
        output: Option<&EntryOutput>,
    ) -> Option<Self::State> {
        use EntryInput as I;
        use EntryOutput as O;
        match (input, state, output) {
            (I::Create(v), None, None | Some(O::Ok)) => Some(Some(v.clone())),
            (I::Create(_), Some(_), None | Some(O::AlreadyExists)) => Some(state.clone()),
            (I::Update(v), Some(_), None | Some(O::Ok)) => Some(Some(v.clone())),
            (I::Update(_), None, None | Some(O::NotFound)) => Some(None),
            (I::Delete, Some(_), None | Some(O::Ok)) => Some(None),
            (I::Delete, None, None | Some(O::NotFound)) => Some(None),
            (I::Read, s, None) => Some(s.clone()),
            (I::Read, s, Some(O::Value(v))) if s == v => Some(s.clone()),
            _ => None,
        }
    }
}

/// The outcome of checking a multi-key history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedVerdict {
    pub verdict: Verdict,
    pub keys_checked: usize,
    /// Keys whose sub-history is not linearizable.
    pub failed_keys: Vec<String>,
    /// Keys the checker gave up on.
    pub unknown_keys: Vec<String>,
}

/// Checks a history of entry operations per key.
pub fn check_entries<'a>(
    ops: impl IntoIterator<Item = (&'a str, Operation<EntryInput, EntryOutput>)>,
    budget_per_key: u64,
) -> KeyedVerdict {
    let mut by_key: HashMap<&str, Vec<Operation<EntryInput, EntryOutput>>> = HashMap::new();
    for (k, op) in ops {
        by_key.entry(k).or_default().push(op);
    }
    let mut keys: Vec<&str> = by_key.keys().copied().collect();
    keys.sort_unstable();
    let mut failed_keys = Vec::new();
    let mut unknown_keys = Vec::new();
    for k in &keys {
        let r = check(&EntryModel, &by_key[k], budget_per_key);
        match r.verdict {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable => failed_keys.push((*k).to_owned()),
            Verdict::Unknown => unknown_keys.push((*k).to_owned()),
        }
    }
    let verdict = if !failed_keys.is_empty() {
        Verdict::NotLinearizable
    } else if !unknown_keys.is_empty() {
        Verdict::Unknown
    } else {
        Verdict::Linearizable
    };
    KeyedVerdict {
        verdict,
        keys_checked: keys.len(),
        failed_keys,
        unknown_keys,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use EntryInput as I;
    use EntryOutput as O;

    type Op = Operation<EntryInput, EntryOutput>;

    fn op(input: I, output: O, call: u64, ret: u64) -> Op {
        Operation {
            input,
            output: Some(output),
            call,
            ret: Some(ret),
        }
    }
    fn info(input: I, call: u64) -> Op {
        Operation {
            input,
            output: None,
            call,
            ret: None,
        }
    }
    fn c(v: &str) -> I {
        I::Create(v.into())
    }
    fn u(v: &str) -> I {
        I::Update(v.into())
    }
    fn val(v: &str) -> O {
        O::Value(Some(v.into()))
    }
    fn verdict(h: &[Op]) -> Verdict {
        check(&EntryModel, h, DEFAULT_BUDGET).verdict
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(I::Read, O::Value(None), 0, 1),
            op(c("a"), O::Ok, 2, 3),
            op(c("b"), O::AlreadyExists, 4, 5),
            op(I::Read, val("a"), 6, 7),
            op(u("b"), O::Ok, 8, 9),
            op(I::Read, val("b"), 10, 11),
            op(I::Delete, O::Ok, 12, 13),
            op(u("c"), O::NotFound, 14, 15),
            op(I::Delete, O::NotFound, 16, 17),
            op(I::Read, O::Value(None), 18, 19),
        ];
        assert_eq!(verdict(&h), Verdict::Linearizable);
    }

    #[test]
    fn empty_history_is_linearizable() {
        assert_eq!(verdict(&[]), Verdict::Linearizable);
    }

    #[test]
    fn concurrent_writes_may_be_seen_in_either_order() {
        // Two overlapping updates; readers after both see the one linearized last.
        let base = vec![
            op(c("0"), O::Ok, 0, 1),
            op(u("a"), O::Ok, 2, 10),
            op(u("b"), O::Ok, 3, 9),
        ];
        let mut h1 = base.clone();
        h1.push(op(I::Read, val("a"), 11, 12));
        let mut h2 = base.clone();
        h2.push(op(I::Read, val("b"), 11, 12));
        assert_eq!(verdict(&h1), Verdict::Linearizable);
        assert_eq!(verdict(&h2), Verdict::Linearizable);
        // A read during both may see the old value, or either new one.
        let mut h3 = base;
        h3.push(op(I::Read, val("0"), 4, 5));
        assert_eq!(verdict(&h3), Verdict::Linearizable);
    }

    #[test]
    fn stale_read_after_acknowledged_write_is_not_linearizable() {
        let h = vec![
            op(c("a"), O::Ok, 0, 1),
            op(u("b"), O::Ok, 2, 3),
            op(I::Read, val("a"), 4, 5),
        ];
        assert_eq!(verdict(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn lost_acknowledged_create_is_not_linearizable() {
        let h = vec![op(c("a"), O::Ok, 0, 1), op(I::Read, O::Value(None), 2, 3)];
        assert_eq!(verdict(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn read_of_a_value_never_written_is_not_linearizable() {
        let h = vec![op(c("a"), O::Ok, 0, 1), op(I::Read, val("z"), 2, 3)];
        assert_eq!(verdict(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn reads_going_back_in_time_are_not_linearizable() {
        // The write overlaps both reads, so each read alone is fine; but once one reader saw
        // the new value, a later read may not see the old one again.
        let h = vec![
            op(c("0"), O::Ok, 0, 1),
            op(u("1"), O::Ok, 2, 20),
            op(I::Read, val("1"), 3, 4),
            op(I::Read, val("0"), 5, 6),
        ];
        assert_eq!(verdict(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn double_successful_create_is_not_linearizable() {
        // Two creates of the same ID both acknowledged: the second must have seen the first.
        let h = vec![op(c("a"), O::Ok, 0, 5), op(c("b"), O::Ok, 1, 6)];
        assert_eq!(verdict(&h), Verdict::NotLinearizable);
        // Concurrent, one refused: fine either way round.
        let h = vec![op(c("a"), O::Ok, 0, 5), op(c("b"), O::AlreadyExists, 1, 6)];
        assert_eq!(verdict(&h), Verdict::Linearizable);
    }

    #[test]
    fn delete_then_not_found_then_recreate() {
        let h = vec![
            op(c("a"), O::Ok, 0, 1),
            op(I::Delete, O::Ok, 2, 3),
            op(I::Read, O::Value(None), 4, 5),
            op(c("b"), O::Ok, 6, 7),
            op(I::Read, val("b"), 8, 9),
        ];
        assert_eq!(verdict(&h), Verdict::Linearizable);
        let bad = vec![
            op(c("a"), O::Ok, 0, 1),
            op(I::Delete, O::Ok, 2, 3),
            op(I::Read, val("a"), 4, 5),
        ];
        assert_eq!(verdict(&bad), Verdict::NotLinearizable);
    }

    #[test]
    fn indeterminate_write_may_or_may_not_take_effect() {
        let took = vec![
            op(c("a"), O::Ok, 0, 1),
            info(u("b"), 2),
            op(I::Read, val("b"), 5, 6),
        ];
        assert_eq!(verdict(&took), Verdict::Linearizable);
        let never = vec![
            op(c("a"), O::Ok, 0, 1),
            info(u("b"), 2),
            op(I::Read, val("a"), 5, 6),
        ];
        assert_eq!(verdict(&never), Verdict::Linearizable);
        // Late: seen only after an old read.
        let late = vec![
            op(c("a"), O::Ok, 0, 1),
            info(u("b"), 2),
            op(I::Read, val("a"), 5, 6),
            op(I::Read, val("b"), 7, 8),
        ];
        assert_eq!(verdict(&late), Verdict::Linearizable);
    }

    #[test]
    fn indeterminate_write_cannot_take_effect_before_its_call() {
        let h = vec![
            op(c("a"), O::Ok, 0, 1),
            op(I::Read, val("b"), 2, 3),
            info(u("b"), 4),
        ];
        assert_eq!(verdict(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn indeterminate_write_cannot_flicker() {
        // Seen, then unseen, then seen again: it took effect once.
        let h = vec![
            op(c("a"), O::Ok, 0, 1),
            info(u("b"), 2),
            op(I::Read, val("b"), 3, 4),
            op(I::Read, val("a"), 5, 6),
        ];
        assert_eq!(verdict(&h), Verdict::NotLinearizable);
    }

    #[test]
    fn many_concurrent_clients_finish_within_budget() {
        // 6 clients, 300 operations, each client's ops sequential, overlapping the others';
        // every read sees the latest completed write (a linearizable history by construction).
        let mut h = vec![op(c("v0"), O::Ok, 0, 1)];
        let mut t = 10;
        let mut last = "v0".to_string();
        for i in 0..300u64 {
            let v = format!("v{}", i + 1);
            if i % 3 == 0 {
                h.push(op(I::Read, O::Value(Some(last.clone())), t, t + 25));
            } else {
                // Overlaps the next few operations.
                h.push(op(u(&v), O::Ok, t, t + 4));
                last = v;
            }
            t += 5;
        }
        let r = check(&EntryModel, &h, DEFAULT_BUDGET);
        assert_eq!(r.verdict, Verdict::Linearizable);
    }

    #[test]
    fn budget_exhaustion_is_unknown_not_a_pass() {
        let h = vec![
            op(c("a"), O::Ok, 0, 1),
            op(u("b"), O::Ok, 2, 3),
            op(I::Read, val("a"), 4, 5),
        ];
        assert_eq!(check(&EntryModel, &h, 1).verdict, Verdict::Unknown);
    }

    #[test]
    fn keyed_check_names_the_failing_key() {
        let ops = vec![
            ("k1", op(c("a"), O::Ok, 0, 1)),
            ("k2", op(c("b"), O::Ok, 0, 1)),
            ("k1", op(I::Read, val("a"), 2, 3)),
            ("k2", op(I::Read, O::Value(None), 2, 3)),
        ];
        let v = check_entries(ops, DEFAULT_BUDGET);
        assert_eq!(v.verdict, Verdict::NotLinearizable);
        assert_eq!(v.keys_checked, 2);
        assert_eq!(v.failed_keys, vec!["k2".to_string()]);
    }

    #[test]
    fn longest_prefix_points_at_the_problem() {
        let h = vec![
            op(c("a"), O::Ok, 0, 1),
            op(u("b"), O::Ok, 2, 3),
            op(I::Read, val("a"), 4, 5),
        ];
        let r = check(&EntryModel, &h, DEFAULT_BUDGET);
        assert_eq!(r.verdict, Verdict::NotLinearizable);
        assert_eq!(r.longest_prefix, vec![0, 1]);
    }
}
