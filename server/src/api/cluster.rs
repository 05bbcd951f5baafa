//! Cluster API: membership and status.

use std::sync::Arc;

use plinth_api::server as pb;
use plinth_api::server::cluster_service_server::ClusterService;
use tonic::{Request, Response, Status};

use super::{state_status, ServerCore};
use crate::state::Replicated;

#[derive(Debug)]
pub(super) struct ClusterApi<S>(pub(super) Arc<ServerCore<S>>);

impl<S: Replicated> ClusterApi<S> {
    async fn status(&self) -> pb::ClusterStatusResponse {
        let v = self.0.state.cluster_status().await;
        let me = v.node_id;
        let applied = v
            .members
            .iter()
            .find(|m| m.node_id == me)
            .and_then(|m| m.applied_index)
            .unwrap_or(0);
        pb::ClusterStatusResponse {
            node_id: v.node_id,
            leader_id: v.leader.unwrap_or(0),
            term: v.term,
            members: v
                .members
                .into_iter()
                .map(|m| pb::ClusterMember {
                    node_id: m.node_id,
                    address: m.address,
                    voter: m.voter,
                    applied_index: m.applied_index.unwrap_or(0),
                    log_syncs: m.log_syncs.map_or(0, |(n, _)| n),
                    log_sync_micros: m.log_syncs.map_or(0, |(_, us)| us),
                })
                .collect(),
            applied_index: applied,
        }
    }
}

#[tonic::async_trait]
impl<S: Replicated> ClusterService for ClusterApi<S> {
    async fn status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.0.require_admin(&req).await?;
        Ok(Response::new(ClusterApi::status(self).await))
    }

    async fn add_node(
        &self,
        req: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.0.require_admin(&req).await?;
        let r = req.get_ref();
        if r.node_id == 0 || r.address.is_empty() {
            return Err(Status::invalid_argument("node_id and address are required"));
        }
        self.0
            .state
            .add_node(r.node_id, r.address.clone(), r.learner_only)
            .await
            .map_err(state_status)?;
        Ok(Response::new(ClusterApi::status(self).await))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.0.require_admin(&req).await?;
        self.0
            .state
            .remove_node(req.get_ref().node_id)
            .await
            .map_err(state_status)?;
        Ok(Response::new(ClusterApi::status(self).await))
    }
}
