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
    pub const DOCKER: [Fault; 2] = [Fault::PartitionLeader, Fault::PartitionFollower];

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
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Fault::ALL
                    .iter()
                    .chain(Fault::DOCKER.iter())
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
}

/// Injects `fault`. Member changes happen inside the injection (they are the fault's action).
pub async fn inject(
    cluster: &mut ProcessCluster,
    fault: Fault,
    leader_timeout: Duration,
) -> Result<Injected, ClusterError> {
    let leader = cluster.wait_leader(leader_timeout).await?;
    let follower = cluster.live().into_iter().find(|id| *id != leader);
    let mut added = None;
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
    })
}

/// Heals an injected fault: restarts killed nodes, resumes paused ones.
pub fn heal(cluster: &mut ProcessCluster, inj: &Injected) -> Result<(), ClusterError> {
    for id in &inj.targets {
        match inj.fault {
            Fault::KillLeader | Fault::RestartAll => cluster.restart(*id)?,
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
        for f in Fault::ALL.into_iter().chain(Fault::DOCKER) {
            assert_eq!(f.name().parse::<Fault>().unwrap(), f);
        }
        assert!(Fault::PartitionLeader.needs_docker());
        assert!(!Fault::KillLeader.needs_docker());
        assert!("partition-everything".parse::<Fault>().is_err());
    }
}
