//! In-process clusters over real tonic on 127.0.0.1: replication, forwarding, failover,
//! catch-up, snapshots after log purge, and a minority that must not commit.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::net::SocketAddr;
use std::time::Duration;

use plinth_raft::{NodeError, RaftConfig, RaftNode};
use plinth_spiffe::{Selectors, SpiffeId};
use plinth_storage::{Change, Command, Outcome, RegistrationEntry, Response};

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn config(id: u64, addr: SocketAddr, dir: &std::path::Path) -> RaftConfig {
    let mut c = RaftConfig::new(id, addr, dir.join(format!("node{id}")));
    c.heartbeat_interval = Duration::from_millis(50);
    c.election_timeout_min = Duration::from_millis(300);
    c.election_timeout_max = Duration::from_millis(600);
    c.snapshot_after_logs = 10_000;
    c.logs_kept_after_snapshot = 0;
    c.request_timeout = Duration::from_secs(3);
    c.insecure_plaintext = true;
    c
}

fn entry(n: u32) -> RegistrationEntry {
    RegistrationEntry::new(
        format!("entry-{n}"),
        SpiffeId::new(&format!("spiffe://example.org/w/{n}")).unwrap(),
        SpiffeId::new("spiffe://example.org/agent").unwrap(),
        Selectors::parse_all(&[format!("unix:uid:{n}")]).unwrap(),
    )
}

fn create(n: u32) -> Command {
    Command::EntryCreate { entry: entry(n) }
}

struct Cluster {
    dir: tempfile::TempDir,
    addrs: Vec<SocketAddr>,
    nodes: Vec<Option<RaftNode>>,
    snapshot_after_logs: u64,
    /// Election timeout (min, max) in ms, if not `config`'s.
    election_ms: Option<(u64, u64)>,
    parallel_leader_sync: bool,
    /// How long a commit notice is held back (zero: sent at once), or `None` to wait for its
    /// answer as openraft 0.9 does.
    commit_notices: Option<Duration>,
}

/// The node's default handling of commit notices: held back, then dropped or sent.
const HELD_BACK: Option<Duration> = Some(Duration::from_micros(
    plinth_raft::node::DEFAULT_COMMIT_NOTICE_DELAY_US,
));

impl Cluster {
    async fn start(n: u64) -> Self {
        Self::start_with(n, 10_000).await
    }

    async fn start_with(n: u64, snapshot_after_logs: u64) -> Self {
        Self::start_full(n, snapshot_after_logs, None).await
    }

    async fn start_full(n: u64, snapshot_after_logs: u64, election_ms: Option<(u64, u64)>) -> Self {
        Self::start_opts(n, snapshot_after_logs, election_ms, true, HELD_BACK).await
    }

    async fn start_opts(
        n: u64,
        snapshot_after_logs: u64,
        election_ms: Option<(u64, u64)>,
        parallel_leader_sync: bool,
        commit_notices: Option<Duration>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cluster {
            dir,
            addrs: Vec::new(),
            nodes: Vec::new(),
            snapshot_after_logs,
            election_ms,
            parallel_leader_sync,
            commit_notices,
        };
        for id in 1..=n {
            c.addrs.push(free_addr());
            let node = c.launch(id).await;
            c.nodes.push(Some(node));
        }
        c.node(1).bootstrap().await.unwrap();
        c.node(1)
            .raft()
            .wait(Some(Duration::from_secs(10)))
            .current_leader(1, "bootstrap")
            .await
            .unwrap();
        for id in 2..=n {
            let addr = c.addrs[(id - 1) as usize].to_string();
            c.node(1).add_learner(id, addr).await.unwrap();
            c.node(1).promote(id).await.unwrap();
        }
        c
    }

    async fn launch(&self, id: u64) -> RaftNode {
        let mut cfg = config(id, self.addrs[(id - 1) as usize], self.dir.path());
        cfg.snapshot_after_logs = self.snapshot_after_logs;
        cfg.parallel_leader_sync = self.parallel_leader_sync;
        cfg.pipeline_commit_notices = self.commit_notices.is_some();
        if let Some(delay) = self.commit_notices {
            cfg.commit_notice_delay = delay;
        }
        if let Some((min, max)) = self.election_ms {
            cfg.election_timeout_min = Duration::from_millis(min);
            cfg.election_timeout_max = Duration::from_millis(max);
        }
        RaftNode::start(cfg).await.unwrap()
    }

    fn node(&self, id: u64) -> &RaftNode {
        self.nodes[(id - 1) as usize].as_ref().unwrap()
    }

    fn running(&self) -> impl Iterator<Item = &RaftNode> {
        self.nodes.iter().flatten()
    }

    async fn stop(&mut self, id: u64) {
        let node = self.nodes[(id - 1) as usize].take().unwrap();
        node.shutdown().await.unwrap();
    }

    async fn restart(&mut self, id: u64) {
        let node = self.launch(id).await;
        self.nodes[(id - 1) as usize] = Some(node);
    }

    /// Waits (bounded) until the running nodes agree on a leader that is running.
    async fn wait_leader(&self) -> u64 {
        for _ in 0..200 {
            let leaders: Vec<Option<u64>> = self
                .running()
                .map(|n| n.raft().metrics().borrow().current_leader)
                .collect();
            if let Some(Some(l)) = leaders.first() {
                let alive = self.running().any(|n| n.id() == *l);
                if alive && leaders.iter().all(|x| x == &Some(*l)) {
                    return *l;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no leader elected");
    }

    /// Writes through `via`, retrying while the cluster fails over.
    async fn write(&self, via: u64, command: Command) -> Response {
        let mut last = None;
        for _ in 0..20 {
            match self.node(via).write(command.clone()).await {
                Ok(r) => return r,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("write never succeeded: {last:?}");
    }

    async fn entries(&self, id: u64) -> Vec<RegistrationEntry> {
        self.node(id).read(|s| s.list_entries()).await.unwrap()
    }
}

fn created(r: Response) -> RegistrationEntry {
    match r.result {
        Ok(Outcome::Entry { entry }) => entry,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_writes_from_any_node_are_forwarded_replicated_and_published() {
    let c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let mut changes = c.node(leader).subscribe();

    let e = created(c.write(follower, create(1)).await);
    assert_eq!(e.revision, 1);
    // Exactly one of two conflicting writes wins, whichever node they enter through.
    let dup = c
        .write(
            leader,
            Command::EntryCreate {
                entry: {
                    let mut d = entry(1);
                    d.id = "other".into();
                    d
                },
            },
        )
        .await;
    assert!(dup.result.is_err(), "{dup:?}");

    for id in 1..=3 {
        assert_eq!(c.entries(id).await, vec![e.clone()], "node {id}");
    }
    let ev = changes.recv().await.unwrap();
    assert_eq!(ev.revision, 1);
    assert_eq!(ev.change, Change::EntryPut { entry: e.clone() });

    let status = c.node(follower).cluster_status().await;
    assert_eq!(status.leader, Some(leader));
    assert!(status.term >= 1);
    assert_eq!(status.members.len(), 3);
    assert!(status.members.iter().all(|m| m.voter));
    for m in &status.members {
        let s = m.status.as_ref().unwrap();
        assert!(s.applied_index.is_some());
        // Every member synced its log; the others' counts came over the peer API.
        assert!(s.log_syncs >= 1, "{s:?}");
    }
    // The leader syncs a write before it is acknowledged, and counts the sync with its time.
    let before = c.node(leader).node_status();
    created(c.write(leader, create(2)).await);
    let after = c.node(leader).node_status();
    assert!(
        after.log_syncs > before.log_syncs,
        "{before:?} -> {after:?}"
    );
    assert!(after.log_sync_micros >= before.log_sync_micros);
    for node in c.nodes.into_iter().flatten() {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_leader_loss_new_leader_commits_and_no_acknowledged_write_is_lost() {
    let c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    let mut acked = Vec::new();
    for n in 0..5 {
        acked.push(created(c.write(leader, create(n)).await));
    }
    lose_leader_and_keep(c, leader, acked).await;
}

/// Stops `leader`; a new leader must commit a write, and every survivor must hold every write
/// in `acked`. Shuts the cluster down.
async fn lose_leader_and_keep(mut c: Cluster, leader: u64, mut acked: Vec<RegistrationEntry>) {
    c.stop(leader).await;
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, leader);
    let survivor = (1..=3).find(|i| *i != leader).unwrap();
    acked.push(created(c.write(survivor, create(100)).await));
    for id in (1..=3).filter(|i| *i != leader) {
        let got = c.entries(id).await;
        for e in &acked {
            assert!(got.contains(e), "node {id} lost acknowledged {}", e.id);
        }
    }
    for node in c.nodes.into_iter().flatten() {
        node.shutdown().await.unwrap();
    }
}

/// With commit notices sent at once without waiting for their answers, and with each answer
/// waited for (openraft 0.9's order); every other test runs with the default, notices held
/// back. Every write is answered and applied on every node, the followers hear the last commit
/// index without another write, and after the leader is lost a new leader commits with no
/// acknowledged write lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t22_with_commit_notices_sent_at_once_or_waited_for_nothing_acknowledged_is_lost() {
    for notices in [Some(Duration::ZERO), None] {
        let c = Cluster::start_opts(3, 10_000, None, true, notices).await;
        let leader = c.wait_leader().await;
        let mut acked = Vec::new();
        for n in 0..30 {
            acked.push(created(c.write(leader, create(n)).await));
        }
        let last = c.node(leader).raft().metrics().borrow().last_log_index;
        wait_indexes(&c, "every write applied everywhere", |v| {
            v.iter()
                .all(|(_, log, applied)| Some(*log) == last && Some(*applied) == last)
        })
        .await;
        lose_leader_and_keep(c, leader, acked).await;
    }
}

/// The election watchdog (`raft/src/election.rs`) alone: with openraft's own tick elections
/// turned off on every node, a healthy leader keeps its term (the watchdog hears it), and when
/// the leader is lost a survivor campaigns (the watchdog), and a new leader takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t25_the_election_watchdog_keeps_a_live_leader_and_replaces_a_dead_one() {
    // A 1.8-2.4 s campaign deadline, so that only a stall of that length on a loaded test
    // machine (not the watchdog) could change the term while the leader is alive.
    let mut c = Cluster::start_full(3, 10_000, Some((600, 1200))).await;
    let leader = c.wait_leader().await;
    for n in c.running() {
        n.raft().runtime_config().elect(false);
    }
    let term = |c: &Cluster, id: u64| c.node(id).raft().metrics().borrow().current_term;
    let before = term(&c, leader);
    // Idle, then writing: longer than the watchdog's longest deadline (2.4 s here).
    tokio::time::sleep(Duration::from_millis(3000)).await;
    for n in 0..20 {
        c.write(leader, create(n)).await;
    }
    for id in 1..=3 {
        assert_eq!(
            term(&c, id),
            before,
            "node {id} saw an election under a live leader"
        );
        assert_eq!(
            c.node(id).raft().metrics().borrow().current_leader,
            Some(leader)
        );
    }
    c.stop(leader).await;
    let survivors: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    // Only the watchdog can start a campaign now: some survivor's term goes up.
    let mut campaigned = false;
    for _ in 0..200 {
        if survivors.iter().any(|id| term(&c, *id) > before) {
            campaigned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        campaigned,
        "no survivor campaigned after its leader stopped"
    );
    // Let openraft settle a split vote, if the two survivors campaigned at the same moment.
    for n in c.running() {
        n.raft().runtime_config().elect(true);
    }
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, leader);
    created(c.write(survivors[0], create(100)).await);
    for node in c.nodes.into_iter().flatten() {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_restarted_node_catches_up_from_its_store() {
    let mut c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    c.write(leader, create(1)).await;
    c.stop(follower).await;
    for n in 2..8 {
        c.write(leader, create(n)).await;
    }
    c.restart(follower).await;
    let want = c.entries(leader).await;
    assert_eq!(want.len(), 7);
    // A linearizable read on the restarted node waits for it to catch up.
    assert_eq!(c.entries(follower).await, want);
    for node in c.nodes.into_iter().flatten() {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_node_added_after_log_purge_receives_a_snapshot() {
    let mut c = Cluster::start_with(3, 10).await;
    let leader = c.wait_leader().await;
    for n in 0..25 {
        c.write(leader, create(n)).await;
    }
    // Snapshot now and purge everything it covers. A trigger that comes while the snapshot
    // policy's own build runs is ignored by openraft, so trigger until one covers `applied`.
    let raft = c.node(leader).raft().clone();
    let applied = raft.metrics().borrow().last_applied.unwrap().index;
    let mut covered = false;
    for _ in 0..10 {
        raft.trigger().snapshot().await.unwrap();
        covered = raft
            .wait(Some(Duration::from_secs(1)))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied),
                "snapshot",
            )
            .await
            .is_ok();
        if covered {
            break;
        }
    }
    assert!(covered, "no snapshot covers index {applied}");
    raft.wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= applied), "purge")
        .await
        .unwrap();
    assert!(c
        .node(leader)
        .store()
        .log_range(0, Some(applied + 1))
        .unwrap()
        .is_empty());

    c.addrs.push(free_addr());
    let node4 = c.launch(4).await;
    c.nodes.push(Some(node4));
    c.node(leader)
        .add_learner(4, c.addrs[3].to_string())
        .await
        .unwrap();
    c.node(leader).promote(4).await.unwrap();
    let n4 = c.node(4);
    // Metrics are published asynchronously; wait (bounded) for node 4 to report the snapshot.
    n4.raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.snapshot.is_some(), "node 4 installed a snapshot")
        .await
        .unwrap();
    assert!(n4.store().snapshot_get().unwrap().is_some());
    let mode = std::fs::metadata(n4.store().snapshot_path())
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    assert_eq!(c.entries(4).await, c.entries(leader).await);
    assert_eq!(c.entries(4).await.len(), 25);
    for node in c.nodes.into_iter().flatten() {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_a_minority_neither_commits_nor_serves_linearizable_reads() {
    let mut c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    c.write(leader, create(1)).await;
    for id in (1..=3).filter(|i| *i != leader) {
        c.stop(id).await;
    }
    let r = c.node(leader).write(create(2)).await;
    assert!(
        matches!(
            r,
            Err(NodeError::Timeout | NodeError::NoLeader | NodeError::Unreachable { .. })
        ),
        "a write without a quorum was acknowledged: {r:?}"
    );
    let read = c.node(leader).read(|s| s.list_entries()).await;
    match read {
        Ok(r) => panic!("a read without a quorum was served: {r:?}"),
        // Retryable: the node must keep running and serve again once its peers are back.
        Err(e) => assert!(!e.is_fatal(), "a lost quorum is not fatal: {e:?}"),
    }
    for node in c.nodes.into_iter().flatten() {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_restarting_every_node_gives_identical_state() {
    let mut c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    for n in 0..6 {
        c.write(leader, create(n)).await;
    }
    c.write(
        leader,
        Command::EntryDelete {
            id: "entry-3".into(),
        },
    )
    .await;
    let before = c.entries(leader).await;
    for id in 1..=3 {
        c.stop(id).await;
    }
    for id in 1..=3 {
        c.restart(id).await;
    }
    c.wait_leader().await;
    let mut revisions = Vec::new();
    for id in 1..=3 {
        assert_eq!(c.entries(id).await, before, "node {id}");
        revisions.push(c.node(id).store().revision().unwrap());
    }
    assert!(revisions.iter().all(|r| *r == revisions[0]));
    assert!(
        !before.iter().any(|e| e.id == "entry-3"),
        "no resurrected delete"
    );
    for node in c.nodes.into_iter().flatten() {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t15_racing_attestations_through_different_nodes_consume_a_token_once() {
    use plinth_storage::{CommandError, JoinToken};
    let c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    let token = JoinToken {
        token: "race-token".into(),
        spiffe_id: None,
        expires_at: i64::MAX,
    };
    c.write(leader, Command::JoinTokenCreate { token }).await;
    let attest = |agent: &str| Command::AgentAttest {
        spiffe_id: SpiffeId::new(&format!("spiffe://example.org/spire/agent/{agent}")).unwrap(),
        attestation_type: "join_token".into(),
        selectors: Selectors::new(),
        serial_number: "01".into(),
        expires_at: i64::MAX,
        join_token: Some("race-token".into()),
    };
    let (a, b) = tokio::join!(
        c.node(1).write(attest("a")),
        c.node(2).write(attest("b")),
        // node 3 joins the race too
    );
    let third = c.node(3).write(attest("c")).await;
    let results = [a.unwrap().result, b.unwrap().result, third.unwrap().result];
    let winners = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "{results:?}");
    assert!(results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .all(|e| *e == CommandError::JoinTokenNotFound));
    let agents = c.node(3).read(|s| s.list_agents()).await.unwrap();
    assert_eq!(agents.len(), 1);
    for node in c.nodes.into_iter().flatten() {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn t05_plain_tcp_needs_the_explicit_flag() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(1, free_addr(), dir.path());
    cfg.insecure_plaintext = false;
    assert!(matches!(
        RaftNode::start(cfg).await,
        Err(NodeError::Config(m)) if m.contains("mTLS")
    ));
}

#[tokio::test]
async fn t06_a_commit_notice_is_held_back_at_most_a_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(1, free_addr(), dir.path());
    cfg.commit_notice_delay = cfg.heartbeat_interval + Duration::from_micros(1);
    assert!(matches!(
        RaftNode::start(cfg).await,
        Err(NodeError::Config(m)) if m.contains("commit_notice_delay") && m.contains("heartbeat_interval")
    ));
    let mut cfg = config(1, free_addr(), dir.path());
    cfg.commit_notice_delay = cfg.heartbeat_interval;
    cfg.validate().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t70_concurrent_writes_share_log_entries_but_each_gets_its_own_answer() {
    use plinth_storage::CommandError;
    let c = Cluster::start(3).await;
    c.wait_leader().await;
    let first_index = c
        .node(1)
        .raft()
        .metrics()
        .borrow()
        .last_log_index
        .unwrap_or(0);
    // 200 distinct entries, and a second create of entries 0..99 through another node: of each
    // such pair exactly one wins, whichever way the log orders them.
    let mut writes = Vec::new();
    for n in 0..200u32 {
        writes.push((n, (n % 3 + 1) as u64));
    }
    for n in 0..100u32 {
        writes.push((n, ((n + 1) % 3 + 1) as u64));
    }
    let results =
        futures::future::join_all(writes.iter().map(|(n, via)| c.node(*via).write(create(*n))))
            .await;
    let mut winners = std::collections::BTreeMap::new();
    let mut revisions = Vec::new();
    for ((n, _), r) in writes.iter().zip(results) {
        let r = r.unwrap();
        match r.result {
            Ok(Outcome::Entry { entry }) => {
                assert_eq!(entry.id, format!("entry-{n}"));
                assert_eq!(entry.revision, r.revision, "its own revision");
                assert!(
                    winners.insert(*n, entry).is_none(),
                    "entry-{n} created twice"
                );
                revisions.push(r.revision);
            }
            Err(CommandError::EntryIdExists { id }) => {
                assert_eq!(id, format!("entry-{n}"));
                assert!(*n < 100, "only the duplicated entries can be refused");
            }
            other => panic!("entry-{n}: {other:?}"),
        }
    }
    assert_eq!(winners.len(), 200);
    revisions.sort_unstable();
    assert_eq!(
        revisions,
        (1..=200).collect::<Vec<u64>>(),
        "one revision per change"
    );
    // Batching happened: 300 writes took fewer log entries.
    let leader = c.wait_leader().await;
    let used = c
        .node(leader)
        .raft()
        .metrics()
        .borrow()
        .last_log_index
        .unwrap_or(0)
        - first_index;
    assert!(used < 300, "{used} log entries for 300 writes");
    for id in 1..=3 {
        let stored = c.entries(id).await;
        assert_eq!(stored.len(), 200, "node {id}");
        for e in stored {
            let n: u32 = e.id.trim_start_matches("entry-").parse().unwrap();
            assert_eq!(winners[&n], e, "node {id}");
        }
    }
    for node in c.nodes.into_iter().flatten() {
        node.shutdown().await.unwrap();
    }
}

/// Entries created without an ID, concurrently and through every node (so forwarded and
/// batched), get IDs in log order: the order of the revisions apply gave them. Every node
/// stores the same IDs, and a new leader goes on above the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t71_entries_without_ids_are_numbered_in_log_order_on_every_node() {
    let mut c = Cluster::start(3).await;
    c.wait_leader().await;
    let unnamed = |n: u32| {
        let mut e = entry(n);
        e.id = String::new();
        Command::EntryCreate { entry: e }
    };
    let results = futures::future::join_all(
        (0..150u32).map(|n| c.node(u64::from(n % 3 + 1)).write(unnamed(n))),
    )
    .await;
    let mut made: Vec<RegistrationEntry> =
        results.into_iter().map(|r| created(r.unwrap())).collect();
    made.sort_by_key(|e| e.revision);
    for e in &made {
        assert!(plinth_storage::EntryId::parse(&e.id).is_some(), "{}", e.id);
    }
    assert!(
        made.windows(2).all(|p| p[0].id < p[1].id),
        "IDs follow the log: {:?}",
        made.iter().map(|e| (&e.id, e.revision)).collect::<Vec<_>>()
    );
    let mut by_id = made.clone();
    by_id.sort_by(|a, b| a.id.cmp(&b.id));
    for id in 1..=3 {
        assert_eq!(c.entries(id).await, by_id, "node {id}");
    }
    let leader = c.wait_leader().await;
    c.stop(leader).await;
    let via = (1..=3).find(|i| *i != leader).unwrap();
    // (`write` retries through the failover; an attempt that committed unanswered makes the
    // retry a conflict that names the entry.)
    let after = match c.write(via, unnamed(150)).await.result {
        Ok(Outcome::Entry { entry }) => entry.id,
        Err(plinth_storage::CommandError::EntryConflict { existing_id }) => existing_id,
        other => panic!("{other:?}"),
    };
    let last = &made[made.len() - 1].id;
    assert!(after > *last, "{after} after {last}");
    for node in c.nodes.into_iter().flatten() {
        node.shutdown().await.unwrap();
    }
}

/// The leader's last log index, and the last log and applied indexes of every node.
fn indexes(c: &Cluster) -> Vec<(u64, u64, u64)> {
    c.running()
        .map(|n| {
            let m = n.raft().metrics().borrow().clone();
            (
                n.id(),
                m.last_log_index.unwrap_or(0),
                m.last_applied.map(|l| l.index).unwrap_or(0),
            )
        })
        .collect()
}

/// Waits (bounded) for `cond` on the nodes' indexes.
async fn wait_indexes(c: &Cluster, what: &str, cond: impl Fn(&[(u64, u64, u64)]) -> bool) {
    for _ in 0..200 {
        if cond(&indexes(c)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{what}: never happened; (node, last log, applied): {:?}",
        indexes(c)
    );
}

/// Parallel leader sync (`plinth_raft::leader_sync`): with the leader's disk stalled, a new
/// entry still reaches both followers' logs, but nothing treats it as committed: the write is
/// not answered and no node applies it (so no read, change event or follower sees it) until
/// the leader's own copy is synced. Then the write is answered and every node applies it
/// without another write. With the option off, the leader sends nothing before its sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t75_the_leader_replicates_while_it_syncs_but_commits_nothing_unsynced() {
    for parallel in [true, false] {
        let c = Cluster::start_opts(3, 10_000, None, parallel, HELD_BACK).await;
        let leader = c.wait_leader().await;
        c.write(leader, create(1)).await;
        let before = c
            .node(leader)
            .raft()
            .metrics()
            .borrow()
            .last_log_index
            .unwrap();
        wait_indexes(&c, "the first write applied everywhere", |v| {
            v.iter()
                .all(|(_, log, applied)| *log == before && *applied == before)
        })
        .await;
        let mut events = c.node(leader).subscribe();

        c.node(leader).stall_log_sync(true);
        let new = before + 1;
        {
            let write = c.node(leader).write(create(2));
            tokio::pin!(write);
            let checks = async {
                if parallel {
                    wait_indexes(&c, "the entry in every log", |v| {
                        v.iter().all(|(_, log, _)| *log == new)
                    })
                    .await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                let now = indexes(&c);
                for (id, log, applied) in &now {
                    assert_eq!(
                        *applied, before,
                        "node {id} applied an entry the leader has not synced: {now:?}"
                    );
                    if !parallel && *id != leader {
                        assert_eq!(
                            *log, before,
                            "serial: sent before the leader's sync: {now:?}"
                        );
                    }
                }
                assert!(
                    events.try_recv().is_err(),
                    "a change was published before the leader's sync"
                );
            };
            tokio::select! {
                r = &mut write => panic!("a write was answered before the leader's sync: {r:?}"),
                () = checks => {}
            }
            c.node(leader).stall_log_sync(false);
            let r = write.await.unwrap();
            assert!(r.result.is_ok(), "{r:?}");
            assert!(events.recv().await.is_ok());
        }
        // The followers hear the commit index without another write.
        wait_indexes(&c, "the entry applied everywhere", |v| {
            v.iter().all(|(_, _, applied)| *applied == new)
        })
        .await;
        for id in 1..=3 {
            assert_eq!(c.entries(id).await.len(), 2, "node {id}");
        }
        for node in c.nodes.into_iter().flatten() {
            node.shutdown().await.unwrap();
        }
    }
}
