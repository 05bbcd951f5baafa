//! Bundle API: the trust domain's bundle (open to any caller) and federated bundles (admins).

use std::sync::Arc;

use plinth_api::server as pb;
use plinth_api::server::bundle_service_server::BundleService;
use plinth_spiffe::TrustDomain;
use plinth_storage::{Command, Outcome};
use tonic::{Request, Response, Status};

use super::convert::{bundle_from_proto, bundle_to_proto};
use super::{fatal, state_status, ServerCore};
use crate::state::Replicated;

#[derive(Debug)]
pub(super) struct BundleApi<S>(pub(super) Arc<ServerCore<S>>);

fn parse_td(s: &str) -> Result<TrustDomain, Status> {
    TrustDomain::new(s).map_err(|e| Status::invalid_argument(format!("invalid trust domain: {e}")))
}

#[tonic::async_trait]
impl<S: Replicated> BundleService for BundleApi<S> {
    async fn get_bundle(
        &self,
        _req: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        self.0.state.linearizable().await.map_err(state_status)?;
        let b = self
            .0
            .state
            .store()
            .get_bundle(&self.0.cfg.trust_domain)
            .map_err(fatal)?
            .ok_or_else(|| Status::not_found("bundle not found"))?;
        Ok(Response::new(bundle_to_proto(&b)))
    }

    async fn list_federated_bundles(
        &self,
        req: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        self.0.require_admin(&req).await?;
        self.0.state.linearizable().await.map_err(state_status)?;
        let bundles = self
            .0
            .state
            .store()
            .list_bundles()
            .map_err(fatal)?
            .iter()
            .filter(|b| b.trust_domain != self.0.cfg.trust_domain)
            .map(bundle_to_proto)
            .collect();
        Ok(Response::new(pb::ListFederatedBundlesResponse { bundles }))
    }

    async fn get_federated_bundle(
        &self,
        req: Request<pb::GetFederatedBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        self.0.require_admin(&req).await?;
        let td = parse_td(&req.get_ref().trust_domain)?;
        if td == self.0.cfg.trust_domain {
            return Err(Status::invalid_argument(
                "this is the server's own trust domain; use GetBundle",
            ));
        }
        self.0.state.linearizable().await.map_err(state_status)?;
        let b = self
            .0
            .state
            .store()
            .get_bundle(&td)
            .map_err(fatal)?
            .ok_or_else(|| Status::not_found(format!("bundle for {td} not found")))?;
        Ok(Response::new(bundle_to_proto(&b)))
    }

    async fn set_federated_bundle(
        &self,
        req: Request<pb::SetFederatedBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        self.0.require_admin(&req).await?;
        let b = req
            .get_ref()
            .bundle
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("missing bundle"))?;
        let bundle = bundle_from_proto(b)?;
        if bundle.trust_domain == self.0.cfg.trust_domain {
            return Err(Status::invalid_argument(
                "the server's own bundle is managed by its CAs, not set",
            ));
        }
        match self
            .0
            .state
            .propose(Command::BundleSet { bundle })
            .await
            .map_err(state_status)?
            .result
        {
            Ok(Outcome::Bundle { bundle }) => Ok(Response::new(bundle_to_proto(&bundle))),
            _ => Err(Status::internal("unexpected outcome")),
        }
    }

    async fn delete_federated_bundle(
        &self,
        req: Request<pb::DeleteFederatedBundleRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.0.require_admin(&req).await?;
        let td = parse_td(&req.get_ref().trust_domain)?;
        if td == self.0.cfg.trust_domain {
            return Err(Status::invalid_argument(
                "the server's own bundle cannot be deleted",
            ));
        }
        self.0
            .state
            .propose(Command::BundleDelete { trust_domain: td })
            .await
            .map_err(state_status)?;
        Ok(Response::new(pb::Empty {}))
    }
}
