//! LocalAuthority API: forced rotation of this server's CA and JWT key.

use std::sync::Arc;

use plinth_api::server as pb;
use plinth_api::server::local_authority_service_server::LocalAuthorityService;
use plinth_storage::{AuthorityKind, AuthorityStatus};
use tonic::{Request, Response, Status};

use super::{ca_status, ServerCore};
use crate::ca::AuthoritySummary;
use crate::state::Replicated;

#[derive(Debug)]
pub(super) struct AuthorityApi<S>(pub(super) Arc<ServerCore<S>>);

fn kind(s: &str) -> Result<AuthorityKind, Status> {
    match s {
        "x509" => Ok(AuthorityKind::X509),
        "jwt" => Ok(AuthorityKind::Jwt),
        other => Err(Status::invalid_argument(format!(
            "unknown authority kind {other:?}; use x509 or jwt"
        ))),
    }
}

fn status_name(s: AuthorityStatus) -> &'static str {
    match s {
        AuthorityStatus::Prepared => "prepared",
        AuthorityStatus::Active => "active",
        AuthorityStatus::Old => "old",
        AuthorityStatus::Tainted => "tainted",
        AuthorityStatus::Revoked => "revoked",
    }
}

fn to_proto(node_id: u64, a: &AuthoritySummary) -> pb::AuthorityState {
    pb::AuthorityState {
        authority_id: a.authority_id.clone(),
        node_id,
        slot: a.slot.clone(),
        status: status_name(a.status).into(),
        expires_at: a.not_after,
        kind: match a.kind {
            AuthorityKind::X509 => "x509".into(),
            AuthorityKind::Jwt => "jwt".into(),
        },
    }
}

impl<S: Replicated> AuthorityApi<S> {
    fn require_id(r: &pb::AuthorityRequest) -> Result<&str, Status> {
        if r.authority_id.is_empty() {
            return Err(Status::invalid_argument("authority_id is required"));
        }
        Ok(&r.authority_id)
    }
}

#[tonic::async_trait]
impl<S: Replicated> LocalAuthorityService for AuthorityApi<S> {
    async fn get_authority_state(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityStateResponse>, Status> {
        self.0.require_admin(&req).await?;
        let k = req.get_ref().kind.clone();
        let node = self.0.state.node_id();
        let authorities = self
            .0
            .ca
            .authorities()
            .map_err(ca_status)?
            .iter()
            .filter(|a| k.is_empty() || kind(&k).is_ok_and(|kk| kk == a.kind))
            .map(|a| to_proto(node, a))
            .collect();
        Ok(Response::new(pb::AuthorityStateResponse { authorities }))
    }

    async fn prepare_authority(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityState>, Status> {
        self.0.require_admin(&req).await?;
        let a = self
            .0
            .ca
            .prepare(kind(&req.get_ref().kind)?)
            .await
            .map_err(ca_status)?;
        Ok(Response::new(to_proto(self.0.state.node_id(), &a)))
    }

    async fn activate_authority(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityState>, Status> {
        self.0.require_admin(&req).await?;
        let a = self
            .0
            .ca
            .activate(kind(&req.get_ref().kind)?)
            .await
            .map_err(ca_status)?;
        Ok(Response::new(to_proto(self.0.state.node_id(), &a)))
    }

    async fn taint_authority(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityState>, Status> {
        self.0.require_admin(&req).await?;
        let id = Self::require_id(req.get_ref())?;
        let a = self.0.ca.taint(id).await.map_err(ca_status)?;
        Ok(Response::new(to_proto(self.0.state.node_id(), &a)))
    }

    async fn revoke_authority(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityState>, Status> {
        self.0.require_admin(&req).await?;
        let id = Self::require_id(req.get_ref())?;
        let a = self.0.ca.revoke(id).await.map_err(ca_status)?;
        Ok(Response::new(to_proto(self.0.state.node_id(), &a)))
    }
}
