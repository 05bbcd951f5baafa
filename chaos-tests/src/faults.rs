//! The faults of reliability.md's table that a process cluster can inject, and how each is
//! injected and healed.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterError, ProcessCluster};

/// A fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// kill -9 the leader; restart it at heal time.
    KillLeader,
    /// SIGSTOP the leader past the election timeout, then SIGCONT. For processes this is also
    /// the stand-in for "partition the leader into the minority": the node neither hears nor
    /// is heard, and resumes with its old term.
    PauseLeader,
    /// SIGSTOP a follower (the stand-in for partitioning a follower away), then SIGCONT.
    PauseFollower,
    /// kill -9 every node at once, then start them all again.
    RestartAll,
    /// With a follower paused: start a new server, add it as a voter, remove it again.
    MemberChange,
    /// Docker mode: disconnect the leader from the network (it keeps running, a minority of
    /// one, and clients still reach it through its admin socket), then reconnect it.
    PartitionLeader,
    /// Docker mode: disconnect a follower, then reconnect it.
    PartitionFollower,
    /// kill -9 a follower, write enough entries that the leader snapshots and purges its log
    /// past the follower, restart the follower (it must install a snapshot) and kill -9 it
    /// again a moment later, during the install; heal: start it again. Long mode only (it
    /// writes thousands of entries).
    SnapshotInstall,
    /// Docker mode: the leader drops 20 % of its packets, both ways (iptables `statistic` in
    /// its network namespace; this machine's kernel has no netem, so no delay fault).
    LossyLeader,
    /// Docker mode: the leader hears nothing from its peers but still sends (a one-way link;
    /// over TCP this starves the leader of acknowledgements).
    OneWayLeader,
}

impl Fault {
    pub const ALL: [Fault; 5] = [
        Fault::KillLeader,
        Fault::PauseLeader,
        Fault::PauseFollower,
        Fault::MemberChange,
        Fault::RestartAll,
    ];

    /// Faults that need the Docker mode (a network to cut).
    pub const DOCKER: [Fault; 4] = [
        Fault::PartitionLeader,
        Fault::PartitionFollower,
        Fault::LossyLeader,
        Fault::OneWayLeader,
    ];

    /// Faults too slow for the smoke run, added by default in long mode.
    pub const LONG: [Fault; 1] = [Fault::SnapshotInstall];

    pub fn needs_docker(self) -> bool {
        Fault::DOCKER.contains(&self)
    }

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-leader",
            Fault::PauseLeader => "pause-leader",
            Fault::PauseFollower => "pause-follower",
            Fault::RestartAll => "restart-all",
            Fault::MemberChange => "member-change",
            Fault::PartitionLeader => "partition-leader",
            Fault::PartitionFollower => "partition-follower",
            Fault::SnapshotInstall => "snapshot-install",
            Fault::LossyLeader => "lossy-leader",
            Fault::OneWayLeader => "one-way-leader",
        }
    }

    /// Whether a majority keeps running through the fault, so writes must commit soon after
    /// it is injected; otherwise (every node down) only after it heals.
    pub fn majority_survives(self) -> bool {
        !matches!(self, Fault::RestartAll)
    }
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Fault::ALL
            .into_iter()
            .chain(Fault::DOCKER)
            .chain(Fault::LONG)
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Fault::ALL
                    .iter()
                    .chain(Fault::DOCKER.iter())
                    .chain(Fault::LONG.iter())
                    .map(|f| f.name())
                    .collect();
                format!("unknown fault {s:?} (one of: {})", names.join(", "))
            })
    }
}

/// What an injected fault touched, to heal it later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    pub fault: Fault,
    /// The nodes killed or paused.
    pub targets: Vec<u64>,
    /// For member-change: the member added and removed again.
    pub added: Option<u64>,
    /// What the injection observed.
    pub note: Option<String>,
}

/// What some faults need besides the cluster.
#[derive(Debug, Clone)]
pub struct FaultContext {
    pub history: std::sync::Arc<crate::history::History>,
    /// Entries written while a follower is down (snapshot-install).
    pub snapshot_writes: usize,
    pub op_timeout: Duration,
}

/// Injects `fault`. Member changes happen inside the injection (they are the fault's action).
pub async fn inject(
    cluster: &mut ProcessCluster,
    fault: Fault,
    leader_timeout: Duration,
    ctx: &FaultContext,
) -> Result<Injected, ClusterError> {
    let leader = cluster.wait_leader(leader_timeout).await?;
    let follower = cluster.live().into_iter().find(|id| *id != leader);
    let mut added = None;
    let mut note = None;
    let targets = match fault {
        Fault::KillLeader => {
            cluster.kill(leader)?;
            vec![leader]
        }
        Fault::PauseLeader => {
            cluster.pause(leader)?;
            vec![leader]
        }
        Fault::PauseFollower => {
            let f = follower.ok_or_else(|| ClusterError::Api("no live follower".into()))?;
            cluster.pause(f)?;
            vec![f]
        }
        Fault::PartitionLeader => {
            cluster.partition(leader)?;
            vec![leader]
        }
        Fault::PartitionFollower => {
            let f = follower.ok_or_else(|| ClusterError::Api("no live follower".into()))?;
            cluster.partition(f)?;
            vec![f]
        }
        Fault::LossyLeader => {
            cluster.lossy(leader, 0.2)?;
            vec![leader]
        }
        Fault::OneWayLeader => {
            cluster.deaf(leader)?;
            vec![leader]
        }
        Fault::SnapshotInstall => {
            let f = follower.ok_or_else(|| ClusterError::Api("no live follower".into()))?;
            cluster.kill(f)?;
            let sockets = cluster.sockets();
            let servers: Vec<_> = cluster
                .live()
                .into_iter()
                .filter_map(|id| sockets.get(&id).map(|p| (id, p.clone())))
                .collect();
            let written = crate::workload::bulk_create(
                ctx.history.clone(),
                servers,
                ctx.snapshot_writes,
                ctx.op_timeout,
            )
            .await;
            tracing::info!(written, "bulk writes done; restarting the follower");
            cluster.restart(f)?;
            // The leader sends a snapshot as soon as the follower answers: kill it as soon as
            // its log says the transfer began (openraft's begin_receiving_snapshot).
            let hit = cluster
                .wait_log(f, "begin_receiving_snapshot", Duration::from_secs(30))
                .await;
            cluster.kill(f)?;
            note = Some(format!(
                "{written} entries written while node {f} was down; {}",
                if hit {
                    "killed again while it received a snapshot"
                } else {
                    "no snapshot transfer seen within 30 s; killed again after it"
                }
            ));
            vec![f]
        }
        Fault::RestartAll => {
            let ids = cluster.ids();
            for id in &ids {
                cluster.kill(*id)?;
            }
            ids
        }
        Fault::MemberChange => {
            let f = follower.ok_or_else(|| ClusterError::Api("no live follower".into()))?;
            cluster.pause(f)?;
            let new = cluster.next_id();
            let r = async {
                cluster.add_member(new).await?;
                cluster.remove_member(new).await
            }
            .await;
            if let Err(e) = r {
                let _ = cluster.resume(f);
                return Err(e);
            }
            added = Some(new);
            vec![f]
        }
    };
    Ok(Injected {
        fault,
        targets,
        added,
        note,
    })
}

/// Heals an injected fault: restarts killed nodes, resumes paused ones.
pub fn heal(cluster: &mut ProcessCluster, inj: &Injected) -> Result<(), ClusterError> {
    for id in &inj.targets {
        match inj.fault {
            Fault::KillLeader | Fault::RestartAll | Fault::SnapshotInstall => {
                cluster.restart(*id)?
            }
            Fault::LossyLeader | Fault::OneWayLeader => cluster.clear_rules(*id)?,
            Fault::PauseLeader | Fault::PauseFollower | Fault::MemberChange => {
                cluster.resume(*id)?
            }
            Fault::PartitionLeader | Fault::PartitionFollower => cluster.unpartition(*id)?,
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in Fault::ALL
            .into_iter()
            .chain(Fault::DOCKER)
            .chain(Fault::LONG)
        {
            assert_eq!(f.name().parse::<Fault>().unwrap(), f);
        }
        assert!(Fault::PartitionLeader.needs_docker());
        assert!(!Fault::KillLeader.needs_docker());
        assert!("partition-everything".parse::<Fault>().is_err());
    }
}
