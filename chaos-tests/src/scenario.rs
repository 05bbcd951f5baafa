//! A chaos run: start a cluster, run clients, inject faults one after another, heal each,
//! measure recovery, then check the recorded history and write the report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::cluster::{ClusterConfig, ClusterError, ProcessCluster};
use crate::faults::{self, Fault};
use crate::history::{AttestOutcome, EntryOp, History};
use crate::linearizability::{self, EntryInput, EntryOutput};
use crate::report::{
    buckets, Checks, Convergence, FaultWindow, LostWrite, Report, Row, SpawnedProcess, TokenCheck,
    WorkloadCheck,
};
use crate::workload::{self, ClientConfig};

/// How a run goes.
#[derive(Debug, Clone)]
pub struct ScenarioConfig {
    pub cluster: ClusterConfig,
    pub results_dir: PathBuf,
    pub nodes: u64,
    /// Register clients (plus one append-only writer and one join-token racer).
    pub clients: usize,
    pub client: ClientConfig,
    /// Faults in order; repeated until `duration` passes when set (long mode).
    pub faults: Vec<Fault>,
    pub duration: Option<Duration>,
    /// Load before the first fault.
    pub warmup: Duration,
    /// How long a fault lasts before it heals (longer than the election timeout).
    pub hold: Duration,
    /// Load after a fault healed, before the next.
    pub settle: Duration,
    /// The stated bound: after a fault (see `Fault::majority_survives`), a new write commits
    /// within this.
    pub recovery_bound: Duration,
    pub checker_budget: u64,
    /// Entries written while a follower is down in the snapshot-install fault (the servers
    /// snapshot every 5000 entries and keep 1000 after it).
    pub snapshot_writes: usize,
    /// Agents to run (each with a workload watching its SVID and bundle); needs `agent_bin`.
    pub agents: usize,
    pub agent_bin: Option<PathBuf>,
}

impl ScenarioConfig {
    /// The CI smoke run: every fault once, small load, generous bounds (about a minute).
    pub fn smoke(server_bin: PathBuf, results_dir: PathBuf) -> Self {
        Self {
            cluster: ClusterConfig::new(server_bin),
            results_dir,
            nodes: 3,
            clients: 3,
            client: ClientConfig::default(),
            faults: Fault::ALL.to_vec(),
            duration: None,
            warmup: Duration::from_secs(3),
            hold: Duration::from_secs(3),
            settle: Duration::from_secs(3),
            recovery_bound: Duration::from_secs(20),
            checker_budget: linearizability::DEFAULT_BUDGET,
            snapshot_writes: 6500,
            agents: 0,
            agent_bin: None,
        }
    }
}

/// Why a run could not produce a report (a failed check is not an error: it is in the report).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    #[error("cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("report: {0}")]
    Report(#[from] crate::report::ReportError),
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Runs a scenario; the cluster's processes are gone when this returns (or unwinds).
pub async fn run(cfg: ScenarioConfig) -> Result<Report, ScenarioError> {
    let start = Instant::now();
    let history = Arc::new(History::new(start));
    let mut cluster = ProcessCluster::start(cfg.cluster.clone(), cfg.nodes).await?;
    let result = drive(&cfg, &mut cluster, history.clone()).await;
    // Keep the servers' logs with the report.
    let logs = cfg.results_dir.join("logs");
    if std::fs::create_dir_all(&logs).is_ok() {
        if let Ok(rd) = std::fs::read_dir(cluster.dir()) {
            for d in rd.flatten() {
                for f in ["server.log", "agent.log"] {
                    let from = d.path().join(f);
                    if from.exists() {
                        let name = format!("{}.log", d.file_name().to_string_lossy());
                        let _ = std::fs::copy(&from, logs.join(name));
                    }
                }
            }
        }
    }
    let docker_prefix = cluster.docker_prefix();
    cluster.shutdown();
    let processes = cluster
        .spawned()
        .iter()
        .map(|(pid, config)| SpawnedProcess {
            pid: *pid,
            config: config.display().to_string(),
        })
        .collect();
    let (windows, finals, notes) = result?;
    let mut report = analyse(&cfg, &history, windows, finals, notes, start.elapsed());
    report.processes = processes;
    report.docker_prefix = docker_prefix;
    report.write(&cfg.results_dir)?;
    // The raw history, for a second look.
    let mut lines = String::new();
    for op in history.entries() {
        if let Ok(l) = serde_json::to_string(&op) {
            lines.push_str(&l);
            lines.push('\n');
        }
    }
    std::fs::write(cfg.results_dir.join("history.jsonl"), lines)
        .map_err(crate::report::ReportError::from)?;
    Ok(report)
}

/// What each node held at the end: node -> entries (None: did not answer).
type Finals = BTreeMap<u64, Option<Vec<plinth_api::server::Entry>>>;

async fn drive(
    cfg: &ScenarioConfig,
    cluster: &mut ProcessCluster,
    history: Arc<History>,
) -> Result<(Vec<FaultWindow>, Finals, Vec<String>), ClusterError> {
    let mut notes = Vec::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let sockets = cluster.sockets();
    let mut tasks = Vec::new();
    if cfg.agents > 0 {
        let Some(bin) = &cfg.agent_bin else {
            return Err(ClusterError::Api(
                "agents asked for without an agent binary".into(),
            ));
        };
        let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?);
        for a in 0..cfg.agents {
            let id = format!(
                "spiffe://{}/chaos/workload/{a}",
                crate::cluster::TRUST_DOMAIN
            );
            let (_, socket) = cluster.start_agent(bin, &id, uid).await?;
            workload::wait_for_svid(&socket, cfg.cluster.start_timeout)
                .await
                .map_err(|e| ClusterError::Timeout(format!("agent {a} serving an SVID: {e}")))?;
            tasks.push(tokio::spawn(workload::workload_watcher(
                a,
                socket,
                Duration::from_millis(250),
                history.clone(),
                stop_rx.clone(),
            )));
        }
    }
    for c in 0..cfg.clients {
        tasks.push(tokio::spawn(workload::register_client(
            c,
            sockets.clone(),
            cfg.client.clone(),
            history.clone(),
            stop_rx.clone(),
        )));
    }
    tasks.push(tokio::spawn(workload::set_writer(
        sockets.clone(),
        cfg.client.clone(),
        history.clone(),
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(workload::token_racer(
        sockets.clone(),
        cfg.client.clone(),
        history.clone(),
        stop_rx.clone(),
    )));

    tokio::time::sleep(cfg.warmup).await;
    let mut windows = Vec::new();
    let run_start = history.start();
    let mut i = 0usize;
    while let Some(&fault) = cfg.faults.get(i % cfg.faults.len().max(1)) {
        match cfg.duration {
            None if i >= cfg.faults.len() => break,
            Some(d) if i > 0 && run_start.elapsed() >= d => break,
            _ => {}
        }
        i += 1;
        windows.push(one_fault(cfg, cluster, &history, fault, i).await);
        tokio::time::sleep(cfg.settle).await;
    }

    let _ = stop_tx.send(true);
    for t in tasks {
        // Every client call is bounded by op_timeout; a task that hangs longer is a bug.
        if tokio::time::timeout(cfg.client.op_timeout * 4, t)
            .await
            .is_err()
        {
            notes.push("a client task did not stop in time".into());
        }
    }

    // Final state through every node, once a leader is back.
    if let Err(e) = cluster.wait_leader(cfg.recovery_bound).await {
        notes.push(format!("no leader for the final reads: {e}"));
    }
    let mut finals = BTreeMap::new();
    for (id, path) in cluster.sockets() {
        // A node that has not answered within the recovery bound is reported unreachable (a
        // failed check), not waited for.
        let deadline = tokio::time::Instant::now() + cfg.recovery_bound;
        let mut got = None;
        while got.is_none() && tokio::time::Instant::now() < deadline {
            got = workload::final_read(&history, id, &path, cfg.client.keys, cfg.client.op_timeout)
                .await;
            if got.is_none() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if got.is_none() {
            tracing::warn!(node = id, "no final read answered");
        }
        finals.insert(id, got);
    }
    Ok((windows, finals, notes))
}

async fn one_fault(
    cfg: &ScenarioConfig,
    cluster: &mut ProcessCluster,
    history: &Arc<History>,
    fault: Fault,
    n: usize,
) -> FaultWindow {
    let start_us = history.now_us();
    tracing::info!(fault = fault.name(), "injecting");
    let ctx = faults::FaultContext {
        history: history.clone(),
        snapshot_writes: cfg.snapshot_writes,
        op_timeout: cfg.client.op_timeout,
    };
    let injected = faults::inject(cluster, fault, cfg.recovery_bound, &ctx).await;
    let live = |c: &ProcessCluster| -> Vec<(u64, PathBuf)> {
        let s = c.sockets();
        c.live()
            .into_iter()
            .filter_map(|id| s.get(&id).map(|p| (id, p.clone())))
            .collect()
    };
    let mut window = FaultWindow {
        fault: fault.name().into(),
        targets: vec![],
        start_s: secs(start_us),
        heal_s: secs(start_us),
        recovery_from: if fault.majority_survives() {
            "injection".into()
        } else {
            "heal".into()
        },
        recovery_ms: None,
        within_bound: false,
        error: None,
        note: None,
    };
    let inj = match injected {
        Ok(i) => i,
        Err(e) => {
            window.error = Some(format!("injection failed: {e}"));
            window.heal_s = secs(history.now_us());
            return window;
        }
    };
    window.targets = inj.targets.clone();
    window.note = inj.note.clone();
    // Some injections take a while (member changes, bulk writes): measure from their end.
    let injected_us = history.now_us();
    let probe = fault.majority_survives().then(|| {
        tokio::spawn(workload::probe_commit(
            history.clone(),
            live(cluster),
            format!("{n}-{}", fault.name()),
            cfg.recovery_bound,
        ))
    });
    tokio::time::sleep(cfg.hold).await;
    if let Err(e) = faults::heal(cluster, &inj) {
        window.error = Some(format!("heal failed: {e}"));
    }
    let heal_us = history.now_us();
    window.heal_s = secs(heal_us);
    tracing::info!(fault = fault.name(), "healed");
    let (from_us, acked) = match probe {
        Some(p) => (injected_us, p.await.ok().flatten()),
        None => {
            // Every node restarted: they must elect and commit again.
            let servers = live(cluster);
            let acked = workload::probe_commit(
                history.clone(),
                servers,
                format!("{n}-{}", fault.name()),
                cfg.recovery_bound,
            )
            .await;
            (heal_us, acked)
        }
    };
    window.recovery_ms = acked.map(|t| t.saturating_sub(from_us) / 1000);
    window.within_bound = acked.is_some();
    window
}

/// Acknowledged register writes that the final state does not reflect although nothing could
/// have overwritten them: every other effective write or delete on the key finished before
/// this one was called, so it must be the last.
fn lost_register_writes(
    ops: &[EntryOp],
    finals: &BTreeMap<String, Option<String>>,
) -> Vec<LostWrite> {
    let mut by_key: BTreeMap<&str, Vec<&EntryOp>> = BTreeMap::new();
    for op in ops
        .iter()
        .filter(|o| o.is_write() && o.client != usize::MAX)
    {
        by_key.entry(&op.key).or_default().push(op);
    }
    let mut lost = Vec::new();
    for (key, ops) in by_key {
        let Some(final_value) = finals.get(key) else {
            continue;
        };
        for w in &ops {
            let value = match (&w.input, &w.output) {
                (EntryInput::Create(v) | EntryInput::Update(v), Some(EntryOutput::Ok)) => {
                    Some(v.clone())
                }
                (EntryInput::Delete, Some(EntryOutput::Ok)) => None,
                _ => continue,
            };
            // Could any other write take effect after this one?
            let overtaken = ops.iter().any(|o| {
                !std::ptr::eq(*o, *w)
                    && !matches!(
                        o.output,
                        Some(EntryOutput::NotFound | EntryOutput::AlreadyExists)
                    )
                    && (o.output.is_none() || o.end_us >= w.call_us)
            });
            if !overtaken && *final_value != value {
                lost.push(LostWrite {
                    key: key.to_owned(),
                    value: value.unwrap_or_else(|| "<deleted>".into()),
                    acknowledged_at_s: secs(w.end_us),
                    server: w.server,
                    found: final_value.clone(),
                });
            }
        }
    }
    lost
}

fn analyse(
    cfg: &ScenarioConfig,
    history: &History,
    windows: Vec<FaultWindow>,
    finals: Finals,
    mut notes: Vec<String>,
    elapsed: Duration,
) -> Report {
    let entries = history.entries();
    let set = history.set();
    let tokens = history.tokens();
    let duration_s = elapsed.as_secs_f64();
    let mut failures = Vec::new();

    // Linearizability over every register operation (failed reads changed nothing).
    let checked = entries
        .iter()
        .filter(|o| o.checked())
        .map(|o| (o.key.as_str(), o.to_operation()));
    let lin = linearizability::check_entries(checked, cfg.checker_budget);
    match lin.verdict {
        linearizability::Verdict::Linearizable => {}
        linearizability::Verdict::NotLinearizable => failures.push(format!(
            "entry history not linearizable for keys {}",
            lin.failed_keys.join(", ")
        )),
        linearizability::Verdict::Unknown => failures.push(format!(
            "linearizability checker gave up on keys {}",
            lin.unknown_keys.join(", ")
        )),
    }

    // Convergence: every node that answered holds the same entries.
    let mut conv = Convergence::default();
    let mut seen: Option<BTreeSet<(String, String)>> = None;
    conv.identical = true;
    for (id, got) in &finals {
        match got {
            None => conv.unreachable.push(*id),
            Some(list) => {
                conv.entries_per_node.insert(*id, list.len());
                let s: BTreeSet<(String, String)> = list
                    .iter()
                    .map(|e| (e.id.clone(), e.hint.clone()))
                    .collect();
                match &seen {
                    None => seen = Some(s),
                    Some(prev) if *prev != s => conv.identical = false,
                    Some(_) => {}
                }
            }
        }
    }
    if !conv.unreachable.is_empty() {
        failures.push(format!(
            "nodes {:?} did not answer the final read",
            conv.unreachable
        ));
    }
    if !conv.identical {
        failures.push("servers hold different entries at the end".into());
    }
    let final_set = seen.unwrap_or_default();
    let final_ids: BTreeSet<&str> = final_set.iter().map(|(id, _)| id.as_str()).collect();
    let final_regs: BTreeMap<String, Option<String>> = (0..cfg.client.keys)
        .map(|k| {
            let id = workload::key_id(k);
            let v = final_set
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, h)| h.clone());
            (id, v)
        })
        .collect();

    // No acknowledged write lost.
    let mut lost = if seen_any(&finals) {
        lost_register_writes(&entries, &final_regs)
    } else {
        Vec::new()
    };
    if seen_any(&finals) {
        for a in set.iter().filter(|a| a.acknowledged) {
            if !final_ids.contains(a.id.as_str()) {
                lost.push(LostWrite {
                    key: a.id.clone(),
                    value: "<created>".into(),
                    acknowledged_at_s: secs(a.end_us),
                    server: a.server,
                    found: None,
                });
            }
        }
    }
    if !lost.is_empty() {
        failures.push(format!("{} acknowledged writes lost", lost.len()));
    }

    // Join tokens consumed at most once.
    let mut tc = TokenCheck {
        tokens_raced: tokens.len(),
        ..Default::default()
    };
    for t in &tokens {
        let ok = t
            .attempts
            .iter()
            .filter(|a| a.outcome == AttestOutcome::Attested)
            .count();
        tc.attested += ok.min(1);
        if ok > 1 {
            tc.double_attested.push(t.token_no);
        }
        if ok == 0
            && t.attempts
                .iter()
                .all(|a| a.outcome == AttestOutcome::Refused)
        {
            tc.never_consumed.push(t.token_no);
        }
    }
    if !tc.double_attested.is_empty() {
        failures.push(format!(
            "join tokens consumed twice: {:?}",
            tc.double_attested
        ));
    }
    if !tc.never_consumed.is_empty() {
        failures.push(format!(
            "join tokens refused to every attestation: {:?}",
            tc.never_consumed
        ));
    }

    // Workloads beside agents: no error once they had an SVID; bundle sequence never down.
    let mut wc = WorkloadCheck {
        agents: cfg.agents,
        ..Default::default()
    };
    for a in 0..cfg.agents {
        let mut had_svid = false;
        let mut last_seq: Option<u64> = None;
        for w in history.workload().iter().filter(|w| w.agent == a) {
            wc.looks += 1;
            if w.svid_ok {
                had_svid = true;
            } else if had_svid {
                wc.errors += 1;
                if wc.first_errors.len() < 5 {
                    wc.first_errors.push(format!(
                        "agent {a} at {:.1}s: {}",
                        secs(w.t_us),
                        w.error.clone().unwrap_or_default()
                    ));
                }
            }
            if let Some(seq) = w.bundle_sequence {
                wc.sequences_seen += 1;
                if let Some(prev) = last_seq {
                    if seq < prev {
                        wc.sequence_regressions.push(format!(
                            "agent {a} at {:.1}s: {prev} -> {seq}",
                            secs(w.t_us)
                        ));
                    }
                }
                last_seq = Some(last_seq.map_or(seq, |p| p.max(seq)));
            }
        }
    }
    if wc.errors > 0 {
        failures.push(format!(
            "workloads saw {} errors with cached SVIDs: {}",
            wc.errors,
            wc.first_errors.join("; ")
        ));
    }
    if !wc.sequence_regressions.is_empty() {
        failures.push(format!(
            "bundle sequence went down: {}",
            wc.sequence_regressions.join("; ")
        ));
    }

    // Recovery.
    let recovery_ok = windows.iter().all(|w| w.within_bound && w.error.is_none());
    for w in &windows {
        if let Some(e) = &w.error {
            failures.push(format!("{} at {:.1}s: {e}", w.fault, w.start_s));
        }
        if !w.within_bound {
            failures.push(format!(
                "{} at {:.1}s: no write committed within {} ms",
                w.fault,
                w.start_s,
                cfg.recovery_bound.as_millis()
            ));
        }
    }
    if !history.unsent().is_empty() {
        notes.push(format!(
            "{} calls found no server listening (killed node) and were not sent",
            history.unsent().len()
        ));
    }
    notes.push(format!(
        "a client whose call hangs (a paused or cut-off server) waits {} ms before it calls the \
         outcome unknown and avoids that server for a while: throughput dips in and just after \
         such windows are partly this client behaviour",
        cfg.client.op_timeout.as_millis()
    ));
    if cfg.cluster.docker {
        notes.push(
            "docker mode: partitions disconnect a container from the cluster network (the \
             node keeps running and clients still reach its admin socket); loss and one-way \
             links are iptables rules in the node's network namespace; delay is not injected \
             (no netem in this kernel)"
                .into(),
        );
    } else {
        notes.push(
            "process mode: SIGSTOP of a whole node stands in for partitioning it away (leader \
             into the minority, or a follower); real partitions need the --docker mode"
                .into(),
        );
    }

    // Rows: warm-up, then one per fault (until the next fault), then the total.
    let client_ops: Vec<&EntryOp> = entries.iter().filter(|o| o.client != usize::MAX).collect();
    let mut bounds: Vec<(String, f64, f64, Option<u64>)> = Vec::new();
    let first = windows.first().map_or(duration_s, |w| w.start_s);
    bounds.push(("warm-up".into(), 0.0, first, None));
    for (i, w) in windows.iter().enumerate() {
        let end = windows.get(i + 1).map_or(duration_s, |n| n.start_s);
        bounds.push((w.fault.clone(), w.start_s, end, w.recovery_ms));
    }
    let in_window = |t_us: u64, a: f64, b: f64| {
        let t = secs(t_us);
        t >= a && t < b
    };
    let rows: Vec<Row> = bounds
        .iter()
        .map(|(phase, a, b, rec)| {
            let ops: Vec<&&EntryOp> = client_ops
                .iter()
                .filter(|o| in_window(o.call_us, *a, *b))
                .collect();
            let sets: Vec<_> = set
                .iter()
                .filter(|s| in_window(s.call_us, *a, *b))
                .collect();
            let lost_n = lost
                .iter()
                .filter(|l| {
                    let t = l.acknowledged_at_s;
                    t >= *a && t < *b
                })
                .count();
            let tok_anom = tokens
                .iter()
                .filter(|t| {
                    in_window(t.created_us, *a, *b)
                        && (tc.double_attested.contains(&t.token_no)
                            || tc.never_consumed.contains(&t.token_no))
                })
                .count();
            Row {
                phase: phase.clone(),
                start_s: *a,
                end_s: *b,
                operations: ops.len() + sets.len(),
                acknowledged: ops.iter().filter(|o| o.acknowledged()).count()
                    + sets.iter().filter(|s| s.acknowledged).count(),
                indeterminate: ops
                    .iter()
                    .filter(|o| o.is_write() && !o.definite() && !o.not_applied)
                    .count(),
                lost: lost_n,
                anomalies: lost_n + tok_anom,
                recovery_ms: *rec,
            }
        })
        .collect();
    let lin_anom = lin.failed_keys.len() + usize::from(!conv.identical);
    let total = Row {
        phase: "total".into(),
        start_s: 0.0,
        end_s: duration_s,
        operations: rows.iter().map(|r| r.operations).sum(),
        acknowledged: rows.iter().map(|r| r.acknowledged).sum(),
        indeterminate: rows.iter().map(|r| r.indeterminate).sum(),
        lost: lost.len(),
        anomalies: rows.iter().map(|r| r.anomalies).sum::<usize>() + lin_anom,
        recovery_ms: windows.iter().filter_map(|w| w.recovery_ms).max(),
    };

    let mut samples: Vec<(u64, u64, bool)> = client_ops
        .iter()
        .map(|o| (o.call_us, o.end_us, o.definite()))
        .collect();
    samples.extend(set.iter().map(|s| (s.call_us, s.end_us, s.acknowledged)));

    Report {
        mode: if cfg.cluster.docker {
            "docker".into()
        } else {
            "processes".into()
        },
        nodes: cfg.nodes,
        clients: cfg.clients,
        duration_s,
        windows,
        rows,
        total,
        checks: Checks {
            linearizability: lin,
            lost_writes: lost,
            tokens: tc,
            convergence: conv,
            recovery_bound_ms: u64::try_from(cfg.recovery_bound.as_millis()).unwrap_or(u64::MAX),
            recovery_within_bound: recovery_ok,
            workloads: wc,
            failures,
        },
        series: buckets(&samples, duration_s),
        notes,
        processes: Vec::new(),
        docker_prefix: None,
    }
}

fn seen_any(finals: &Finals) -> bool {
    finals.values().any(Option::is_some)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn w(
        key: &str,
        input: EntryInput,
        output: Option<EntryOutput>,
        call: u64,
        end: u64,
    ) -> EntryOp {
        EntryOp {
            client: 0,
            server: 1,
            key: key.into(),
            input,
            output,
            error: None,
            not_applied: false,
            call_us: call,
            end_us: end,
        }
    }

    #[test]
    fn last_acknowledged_write_must_survive() {
        let ops = vec![
            w(
                "k",
                EntryInput::Create("a".into()),
                Some(EntryOutput::Ok),
                0,
                10,
            ),
            w(
                "k",
                EntryInput::Update("b".into()),
                Some(EntryOutput::Ok),
                20,
                30,
            ),
        ];
        let ok: BTreeMap<String, Option<String>> =
            [("k".to_string(), Some("b".to_string()))].into();
        assert!(lost_register_writes(&ops, &ok).is_empty());
        let bad: BTreeMap<String, Option<String>> =
            [("k".to_string(), Some("a".to_string()))].into();
        let lost = lost_register_writes(&ops, &bad);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].value, "b");
        let gone: BTreeMap<String, Option<String>> = [("k".to_string(), None)].into();
        assert_eq!(lost_register_writes(&ops, &gone).len(), 1);
    }

    #[test]
    fn concurrent_or_indeterminate_writes_may_win() {
        let ops = vec![
            w(
                "k",
                EntryInput::Create("a".into()),
                Some(EntryOutput::Ok),
                0,
                10,
            ),
            w(
                "k",
                EntryInput::Update("b".into()),
                Some(EntryOutput::Ok),
                20,
                30,
            ),
            // Indeterminate, called before b: may still land after it.
            w("k", EntryInput::Delete, None, 5, 8),
        ];
        let deleted: BTreeMap<String, Option<String>> = [("k".to_string(), None)].into();
        assert!(lost_register_writes(&ops, &deleted).is_empty());
        // A refused write changes nothing: b must survive.
        let ops = vec![
            w(
                "k",
                EntryInput::Update("b".into()),
                Some(EntryOutput::Ok),
                20,
                30,
            ),
            w(
                "k",
                EntryInput::Create("c".into()),
                Some(EntryOutput::AlreadyExists),
                21,
                25,
            ),
        ];
        let c: BTreeMap<String, Option<String>> = [("k".to_string(), Some("c".to_string()))].into();
        assert_eq!(lost_register_writes(&ops, &c).len(), 1);
    }
}
