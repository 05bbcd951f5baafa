//! SVID API: agents get SVIDs for the entries authorized to them (the SPIFFE ID always comes from
//! the entry, never from the CSR); admins mint SVIDs directly.

use std::sync::Arc;
use std::time::Duration;

use plinth_api::server as pb;
use plinth_api::server::svid_service_server::SvidService;
use plinth_spiffe::{Csr, SpiffeId};
use tonic::{Request, Response, Status};

use super::convert::svid_to_proto;
use super::{ca_status, fatal, item_err, item_ok, ServerCore};
use crate::authz::authorized_entry;
use crate::state::Replicated;

/// Most CSRs one batch may carry.
const MAX_BATCH: usize = 1000;

#[derive(Debug)]
pub(super) struct SvidApi<S>(pub(super) Arc<ServerCore<S>>);

fn ttl_or(v: u32, default: Duration) -> Duration {
    if v == 0 {
        default
    } else {
        Duration::from_secs(u64::from(v))
    }
}

fn audience(a: &[String]) -> Result<Vec<String>, Status> {
    if a.is_empty() || a.iter().any(String::is_empty) {
        return Err(Status::invalid_argument(
            "audience must have at least one non-empty value",
        ));
    }
    Ok(a.to_vec())
}

impl<S: Replicated> SvidApi<S> {
    /// Entry `entry_id` if `agent` may get SVIDs for it; PermissionDenied otherwise. Decided for
    /// the one entry (walking up its parents), not by computing the agent's whole set.
    fn authorized(
        &self,
        agent: &plinth_storage::AttestedAgent,
        entry_id: &str,
    ) -> Result<plinth_storage::RegistrationEntry, Status> {
        authorized_entry(
            self.0.state.store(),
            &self.0.cfg.trust_domain,
            &agent.spiffe_id,
            &agent.selectors,
            entry_id,
            self.0.now(),
        )
        .map_err(fatal)?
        .ok_or_else(|| {
            Status::permission_denied(format!(
                "entry {entry_id:?} is not authorized to agent {}",
                agent.spiffe_id
            ))
        })
    }
}

#[tonic::async_trait]
impl<S: Replicated> SvidService for SvidApi<S> {
    async fn mint_x509_svid(
        &self,
        req: Request<pb::MintX509SvidRequest>,
    ) -> Result<Response<pb::MintX509SvidResponse>, Status> {
        self.0.require_admin(&req).await?;
        let r = req.get_ref();
        let id = SpiffeId::new_with_path(&r.spiffe_id)
            .map_err(|e| Status::invalid_argument(format!("invalid SPIFFE ID: {e}")))?;
        let csr = Csr::parse(&r.csr)
            .map_err(|e| Status::invalid_argument(format!("invalid CSR: {e}")))?;
        let ttl = u32::try_from(r.ttl)
            .map_err(|_| Status::invalid_argument("ttl must not be negative"))?;
        let svid = self
            .0
            .ca
            .sign_x509_svid(
                &id,
                csr.public_key_spki(),
                ttl_or(ttl, self.0.cfg.x509_svid_ttl),
                &r.dns_names,
            )
            .map_err(ca_status)?;
        Ok(Response::new(pb::MintX509SvidResponse {
            svid: Some(svid_to_proto(&svid)),
        }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        self.0.require_admin(&req).await?;
        let r = req.get_ref();
        let id = SpiffeId::new_with_path(&r.spiffe_id)
            .map_err(|e| Status::invalid_argument(format!("invalid SPIFFE ID: {e}")))?;
        id.require_member_of(&self.0.cfg.trust_domain)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let aud = audience(&r.audience)?;
        let ttl = u32::try_from(r.ttl)
            .map_err(|_| Status::invalid_argument("ttl must not be negative"))?;
        let (token, exp) = self
            .0
            .ca
            .mint_jwt_svid(&id, &aud, ttl_or(ttl, self.0.cfg.jwt_svid_ttl))
            .map_err(ca_status)?;
        Ok(Response::new(pb::MintJwtSvidResponse {
            svid: Some(pb::JwtSvid {
                spiffe_id: id.to_string(),
                token,
                expires_at: exp.unix_timestamp(),
                issued_at: self.0.now(),
            }),
        }))
    }

    async fn batch_new_x509_svid(
        &self,
        req: Request<pb::BatchNewX509SvidRequest>,
    ) -> Result<Response<pb::BatchNewX509SvidResponse>, Status> {
        let agent = self.0.require_agent(&req).await?;
        let params = &req.get_ref().params;
        if params.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} CSRs per batch"
            )));
        }
        let mut results = Vec::with_capacity(params.len());
        for p in params {
            let r = (|| {
                let entry = self.authorized(&agent, &p.entry_id)?;
                let csr = Csr::parse(&p.csr)
                    .map_err(|e| Status::invalid_argument(format!("invalid CSR: {e}")))?;
                self.0
                    .ca
                    .sign_x509_svid(
                        &entry.spiffe_id,
                        csr.public_key_spki(),
                        ttl_or(entry.x509_svid_ttl, self.0.cfg.x509_svid_ttl),
                        &entry.dns_names,
                    )
                    .map_err(ca_status)
            })();
            results.push(match r {
                Ok(svid) => pb::batch_new_x509_svid_response::Result {
                    status: item_ok(),
                    svid: Some(svid_to_proto(&svid)),
                },
                Err(s) => pb::batch_new_x509_svid_response::Result {
                    status: item_err(&s),
                    svid: None,
                },
            });
        }
        Ok(Response::new(pb::BatchNewX509SvidResponse { results }))
    }

    async fn new_jwt_svid(
        &self,
        req: Request<pb::NewJwtSvidRequest>,
    ) -> Result<Response<pb::NewJwtSvidResponse>, Status> {
        let agent = self.0.require_agent(&req).await?;
        let r = req.get_ref();
        let aud = audience(&r.audience)?;
        let entry = self.authorized(&agent, &r.entry_id)?;
        let (token, exp) = self
            .0
            .ca
            .mint_jwt_svid(
                &entry.spiffe_id,
                &aud,
                ttl_or(entry.jwt_svid_ttl, self.0.cfg.jwt_svid_ttl),
            )
            .map_err(ca_status)?;
        Ok(Response::new(pb::NewJwtSvidResponse {
            svid: Some(pb::JwtSvid {
                spiffe_id: entry.spiffe_id.to_string(),
                token,
                expires_at: exp.unix_timestamp(),
                issued_at: self.0.now(),
            }),
        }))
    }
}
