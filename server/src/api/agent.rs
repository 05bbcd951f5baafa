//! Agent API: node attestation (a bidirectional stream with challenge and response), renewal,
//! and the admin operations (list, show, ban, evict, join tokens).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use plinth_api::server as pb;
use plinth_api::server::agent_service_server::AgentService;
use plinth_spiffe::{Csr, Selectors, SpiffeId};
use plinth_storage::{Command, JoinToken};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{
    agent_to_proto, bundle_to_proto, selectors_from_proto, serial_hex, svid_to_proto,
};
use super::{ca_status, fatal, state_status, Caller, ServerCore};
use crate::attest::{join_token_agent_id, AttestError, AttestedNode};
use crate::state::Replicated;

/// How long an attestation stream may take end to end (a slow client is cut off).
const ATTEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default join token TTL (SPIRE: 600 s).
pub const DEFAULT_JOIN_TOKEN_TTL: i32 = 600;

#[derive(Debug)]
pub(super) struct AgentApi<S>(pub(super) Arc<ServerCore<S>>);

fn attest_status(e: AttestError) -> Status {
    match e {
        AttestError::NotConfigured(_) => Status::failed_precondition(e.to_string()),
        AttestError::Banned(_) => Status::permission_denied(e.to_string()),
        _ => Status::permission_denied(format!("failed to attest: {e}")),
    }
}

type AttestStream = Pin<Box<dyn Stream<Item = Result<pb::AttestAgentResponse, Status>> + Send>>;

impl<S: Replicated> AgentApi<S> {
    /// Runs one attestation conversation; returns the final response.
    async fn attest(
        core: Arc<ServerCore<S>>,
        mut input: Streaming<pb::AttestAgentRequest>,
        tx: &mpsc::Sender<Result<pb::AttestAgentResponse, Status>>,
    ) -> Result<pb::AttestAgentResponse, Status> {
        let first = input
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("missing attestation parameters"))??;
        let Some(pb::attest_agent_request::Step::Params(params)) = first.step else {
            return Err(Status::invalid_argument(
                "the first message must carry the parameters",
            ));
        };
        let data = params
            .data
            .ok_or_else(|| Status::invalid_argument("missing attestation data"))?;
        let csr = Csr::parse(&params.csr)
            .map_err(|e| Status::invalid_argument(format!("invalid CSR: {e}")))?;
        let td = core.cfg.trust_domain.clone();
        let node: AttestedNode = match data.r#type.as_str() {
            "join_token" => {
                if core.cfg.file.node_attestor.join_token.is_none() {
                    return Err(attest_status(AttestError::NotConfigured(
                        "join_token".into(),
                    )));
                }
                let token = std::str::from_utf8(&data.payload)
                    .map_err(|_| attest_status(AttestError::BadJoinToken))?;
                let agent_id = join_token_agent_id(&td, token).map_err(attest_status)?;
                AttestedNode {
                    agent_id,
                    attestation_type: "join_token".into(),
                    selectors: Selectors::new(),
                    join_token: Some(token.to_owned()),
                    reattestable: false,
                }
            }
            "x509pop" => {
                let verifier = core
                    .x509pop
                    .as_ref()
                    .ok_or_else(|| attest_status(AttestError::NotConfigured("x509pop".into())))?;
                let chain = verifier
                    .verify_chain(&data.payload, core.clock.now())
                    .map_err(attest_status)?;
                let mut nonce = vec![0u8; 32];
                SystemRandom::new()
                    .fill(&mut nonce)
                    .map_err(|_| Status::internal("random generator failed"))?;
                tx.send(Ok(pb::AttestAgentResponse {
                    step: Some(pb::attest_agent_response::Step::Challenge(nonce.clone())),
                }))
                .await
                .map_err(|_| Status::cancelled("client went away"))?;
                let resp = input
                    .next()
                    .await
                    .ok_or_else(|| Status::invalid_argument("missing challenge response"))??;
                let Some(pb::attest_agent_request::Step::ChallengeResponse(sig)) = resp.step else {
                    return Err(Status::invalid_argument("expected a challenge response"));
                };
                verifier
                    .verify_response(&td, &chain, &nonce, &sig)
                    .map_err(attest_status)?
            }
            other => {
                return Err(attest_status(AttestError::NotConfigured(other.to_owned())));
            }
        };
        // A banned agent may not come back (it keeps its record for exactly this reason).
        core.state.linearizable().await.map_err(state_status)?;
        if let Some(a) = core
            .state
            .store()
            .get_agent(&node.agent_id)
            .map_err(fatal)?
        {
            if a.banned {
                return Err(attest_status(AttestError::Banned(
                    node.agent_id.to_string(),
                )));
            }
        }
        let svid = core
            .ca
            .sign_x509_svid(
                &node.agent_id,
                csr.public_key_spki(),
                core.cfg.agent_ttl,
                &[],
            )
            .map_err(ca_status)?;
        let serial = serial_hex(svid.leaf())?;
        // Commit first: the SVID is handed out only if the attestation (and the token
        // consumption, exactly once cluster-wide) committed.
        core.state
            .propose(Command::AgentAttest {
                spiffe_id: node.agent_id.clone(),
                attestation_type: node.attestation_type.clone(),
                selectors: node.selectors.clone(),
                serial_number: serial,
                expires_at: svid.not_after.unix_timestamp(),
                join_token: node
                    .join_token
                    .clone()
                    .map(plinth_storage::SecretString::from),
            })
            .await
            .map_err(state_status)?;
        tracing::info!(agent_id = %node.agent_id, attestor = %node.attestation_type, "agent attested");
        let bundle = core
            .state
            .store()
            .get_bundle(&td)
            .map_err(fatal)?
            .map(|b| bundle_to_proto(&b));
        Ok(pb::AttestAgentResponse {
            step: Some(pb::attest_agent_response::Step::Result(
                pb::attest_agent_response::Result {
                    svid: Some(svid_to_proto(&svid)),
                    reattestable: node.reattestable,
                    bundle,
                },
            )),
        })
    }
}

#[tonic::async_trait]
impl<S: Replicated> AgentService for AgentApi<S> {
    async fn count_agents(
        &self,
        req: Request<pb::CountAgentsRequest>,
    ) -> Result<Response<pb::CountAgentsResponse>, Status> {
        self.0.require_admin(&req).await?;
        let n = self.filtered(req.get_ref().filter.as_ref()).await?.len();
        Ok(Response::new(pb::CountAgentsResponse {
            count: i32::try_from(n).unwrap_or(i32::MAX),
        }))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.0.require_admin(&req).await?;
        let r = req.get_ref();
        let all = self.filtered(r.filter.as_ref()).await?;
        let size = match r.page_size {
            n if n <= 0 => 1000,
            n => usize::try_from(n).unwrap_or(1000).min(1000),
        };
        let start = if r.page_token.is_empty() {
            0
        } else {
            all.partition_point(|a| a.spiffe_id.as_str() <= r.page_token.as_str())
        };
        let page: Vec<_> = all.iter().skip(start).take(size).collect();
        let next_page_token = if start + page.len() < all.len() {
            page.last()
                .map(|a| a.spiffe_id.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListAgentsResponse {
            agents: page.into_iter().map(agent_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        self.0.require_admin(&req).await?;
        let id = parse_id(&req.get_ref().spiffe_id)?;
        self.0.state.linearizable().await.map_err(state_status)?;
        let a = self
            .0
            .state
            .store()
            .get_agent(&id)
            .map_err(fatal)?
            .ok_or_else(|| Status::not_found(format!("agent {id} not found")))?;
        Ok(Response::new(agent_to_proto(&a)))
    }

    async fn ban_agent(
        &self,
        req: Request<pb::BanAgentRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.0.require_admin(&req).await?;
        let id = parse_id(&req.get_ref().spiffe_id)?;
        self.0
            .state
            .propose(Command::AgentBan {
                spiffe_id: id.clone(),
            })
            .await
            .map_err(state_status)?;
        tracing::info!(agent_id = %id, "agent banned");
        Ok(Response::new(pb::Empty {}))
    }

    async fn delete_agent(
        &self,
        req: Request<pb::DeleteAgentRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.0.require_admin(&req).await?;
        let id = parse_id(&req.get_ref().spiffe_id)?;
        self.0
            .state
            .propose(Command::AgentEvict {
                spiffe_id: id.clone(),
            })
            .await
            .map_err(state_status)?;
        tracing::info!(agent_id = %id, "agent evicted");
        Ok(Response::new(pb::Empty {}))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        self.0.require_admin(&req).await?;
        let r = req.get_ref();
        let ttl = match r.ttl {
            0 => DEFAULT_JOIN_TOKEN_TTL,
            t if t < 0 => return Err(Status::invalid_argument("ttl must not be negative")),
            t => t,
        };
        let token = if r.token.is_empty() {
            super::convert::new_uuid()?
        } else {
            r.token.clone()
        };
        // The token must yield a valid agent ID.
        join_token_agent_id(&self.0.cfg.trust_domain, &token).map_err(|_| {
            Status::invalid_argument("token may only contain letters, digits, '-', '_' and '.'")
        })?;
        let spiffe_id = if r.agent_id.is_empty() {
            None
        } else {
            let id = parse_id(&r.agent_id)?;
            id.require_member_of(&self.0.cfg.trust_domain)
                .map_err(|e| Status::invalid_argument(format!("invalid agent_id: {e}")))?;
            Some(id)
        };
        let expires_at = self.0.now() + i64::from(ttl);
        self.0
            .state
            .propose(Command::JoinTokenCreate {
                token: JoinToken {
                    token: token.clone(),
                    spiffe_id: spiffe_id.clone(),
                    expires_at,
                },
            })
            .await
            .map_err(state_status)?;
        if let Some(alias) = spiffe_id {
            // SPIRE aliases the token's agent by an entry parented to the agent's ID.
            let agent_id = join_token_agent_id(&self.0.cfg.trust_domain, &token)
                .map_err(|_| Status::internal("token"))?;
            let selectors = Selectors::parse_all(&[format!("spiffe_id:{agent_id}")])
                .map_err(|e| Status::internal(e.to_string()))?;
            let entry =
                plinth_storage::RegistrationEntry::new(String::new(), alias, agent_id, selectors);
            self.0
                .state
                .propose(Command::EntryCreate { entry })
                .await
                .map_err(state_status)?;
        }
        Ok(Response::new(pb::JoinToken {
            value: token,
            expires_at,
        }))
    }

    type AttestAgentStream = AttestStream;

    async fn attest_agent(
        &self,
        req: Request<Streaming<pb::AttestAgentRequest>>,
    ) -> Result<Response<AttestStream>, Status> {
        let core = self.0.clone();
        let input = req.into_inner();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let r = tokio::time::timeout(ATTEST_TIMEOUT, Self::attest(core, input, &tx))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("attestation took too long")));
            if let Err(s) = &r {
                tracing::warn!(code = ?s.code(), message = s.message(), "node attestation failed");
            }
            let _ = tx.send(r).await;
        });
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as AttestStream
        ))
    }

    async fn renew_agent(
        &self,
        req: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let agent = self.0.require_agent(&req).await?;
        let Caller::Peer(peer) = ServerCore::<S>::caller(&req) else {
            return Err(Status::unauthenticated("an agent X509-SVID is required"));
        };
        let csr = Csr::parse(&req.get_ref().csr)
            .map_err(|e| Status::invalid_argument(format!("invalid CSR: {e}")))?;
        let svid = self
            .0
            .ca
            .sign_x509_svid(
                &agent.spiffe_id,
                csr.public_key_spki(),
                self.0.cfg.agent_ttl,
                &[],
            )
            .map_err(ca_status)?;
        let new_serial = serial_hex(svid.leaf())?;
        self.0
            .state
            .propose(Command::AgentRenew {
                spiffe_id: agent.spiffe_id.clone(),
                current_serial: peer.serial.to_lowercase(),
                new_serial,
                expires_at: svid.not_after.unix_timestamp(),
            })
            .await
            .map_err(state_status)?;
        Ok(Response::new(pb::RenewAgentResponse {
            svid: Some(svid_to_proto(&svid)),
        }))
    }
}

impl<S: Replicated> AgentApi<S> {
    async fn filtered(
        &self,
        filter: Option<&pb::AgentFilter>,
    ) -> Result<Vec<plinth_storage::AttestedAgent>, Status> {
        self.0.state.linearizable().await.map_err(state_status)?;
        let mut all = self.0.state.store().list_agents().map_err(fatal)?;
        if let Some(f) = filter {
            let want = selectors_from_proto(&f.by_selectors)?;
            all.retain(|a| {
                (f.by_attestation_type.is_empty() || a.attestation_type == f.by_attestation_type)
                    && want.iter().all(|s| a.selectors.contains(s))
                    && match f.by_banned {
                        1 => a.banned,
                        2 => !a.banned,
                        _ => true,
                    }
            });
        }
        all.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        Ok(all)
    }
}

fn parse_id(s: &str) -> Result<SpiffeId, Status> {
    SpiffeId::new_with_path(s)
        .map_err(|e| Status::invalid_argument(format!("invalid SPIFFE ID: {e}")))
}
