#![allow(clippy::unwrap_used)]
//! The harness's member changes survive a lost answer. A change can commit while its answer
//! never reaches the harness (a time-out, a leader change). The retry must then find the work
//! done: the leader refuses to remove a node that is no longer a member, and re-adding a member
//! at its own address succeeds. A follower that forwards a change answers with the members as
//! they are after it, not as it last saw them.

use std::time::Duration;

use plinth_api::server as pb;
use plinth_api::server::cluster_service_client::ClusterServiceClient;
use plinth_chaos::cluster::{admin_channel, ClusterConfig, ProcessCluster};
use plinth_chaos::testing::server_bin;

fn member_ids(s: &pb::ClusterStatusResponse) -> Vec<u64> {
    let mut ids: Vec<u64> = s.members.iter().map(|m| m.node_id).collect();
    ids.sort_unstable();
    ids
}

/// Node `id`'s member list once it equals `want` (followers learn a change a heartbeat
/// later), or the last one it gave after 10 s.
async fn members_of(cluster: &ProcessCluster, id: u64, want: &[u64]) -> Vec<u64> {
    let mut got = Vec::new();
    for _ in 0..50 {
        if let Ok(s) = cluster.status(id).await {
            got = member_ids(&s);
            if got == want {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t12_member_changes_whose_answer_was_lost_are_retried_to_success() {
    let mut cfg = ClusterConfig::new(server_bin().unwrap());
    // A retry that cannot succeed fails in this time rather than the default minute.
    cfg.start_timeout = Duration::from_secs(20);
    let mut cluster = ProcessCluster::start(cfg, 3).await.unwrap();

    // Adding is retried on the same address: the second call finds node 4 a voter.
    cluster.add_member(4).await.unwrap();
    cluster.add_member(4).await.unwrap();
    assert_eq!(members_of(&cluster, 2, &[1, 2, 3, 4]).await, [1, 2, 3, 4]);

    // Node 4 is removed behind the harness's back, as a remove whose answer was lost, through
    // a follower: it forwards the change and answers with the member list after it.
    let leader = cluster.wait_leader(Duration::from_secs(10)).await.unwrap();
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let via = cluster.sockets()[&follower].clone();
    let removed = ClusterServiceClient::new(admin_channel(&via).unwrap())
        .remove_node(pb::RemoveNodeRequest { node_id: 4 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(member_ids(&removed), [1, 2, 3]);
    // The server refuses a second remove, with its reason ...
    let again = ClusterServiceClient::new(admin_channel(&via).unwrap())
        .remove_node(pb::RemoveNodeRequest { node_id: 4 })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    assert!(
        again.message().contains("node 4 is not a member"),
        "{again}"
    );
    // ... and the harness takes that refusal as the removal done: it stops node 4.
    cluster.remove_member(4).await.unwrap();
    assert_eq!(cluster.ids(), [1, 2, 3]);
    for id in [1, 2, 3] {
        assert_eq!(members_of(&cluster, id, &[1, 2, 3]).await, [1, 2, 3]);
    }
    cluster.shutdown();
}
