//! Node attestation (join_token, x509pop) and agent SVID renewal, over the server's
//! `AgentService`. Conversions of the server's wire types to plinth-spiffe types live here too.

use std::sync::Arc;
use std::time::Duration;

use plinth_api::server as pb;
use plinth_api::server::agent_service_client::AgentServiceClient;
use plinth_spiffe::{Bundle, Csr, JwtAuthority, KeyType, PrivateKey, Signer, TrustDomain};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

use crate::config::NodeAttestor;
use crate::store::AgentSvid;

/// Prefix of the bytes an x509pop agent signs over the server's nonce (the server's
/// `X509POP_CONTEXT`; part of the wire protocol).
pub const X509POP_CONTEXT: &[u8] = b"plinth x509pop challenge v1\0";
/// How long one attestation or renewal may take.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Why attestation or renewal failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The server refused this agent (bad or used token, unknown CA, banned, unknown agent).
    /// Retrying with the same evidence will not help.
    #[error("the server refused the agent: {0}")]
    Refused(String),
    /// The server could not be reached or failed; try again (another server).
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// Local evidence (key, certificate files) is unusable, or the answer was malformed.
    #[error("{0}")]
    Local(String),
}

/// Whether a status means "this agent is not welcome", as opposed to "try again later".
pub fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::PermissionDenied
            | Code::Unauthenticated
            | Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
    )
}

fn status_err(s: tonic::Status) -> NodeError {
    let msg = format!("{:?}: {}", s.code(), s.message());
    if is_refusal(s.code()) {
        NodeError::Refused(msg)
    } else {
        NodeError::Unavailable(msg)
    }
}

/// The trust domain named in a wire bundle (`example.org` or `spiffe://example.org`).
fn wire_td(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s.strip_prefix("spiffe://").unwrap_or(s)).map_err(|e| e.to_string())
}

/// A wire bundle as a plinth-spiffe bundle; every authority must parse.
pub fn bundle_from_proto(b: &pb::Bundle) -> Result<Bundle, String> {
    let mut out = Bundle::new(wire_td(&b.trust_domain)?);
    for c in &b.x509_authorities {
        out.add_x509_authority(c.clone())
            .map_err(|e| e.to_string())?;
    }
    for j in &b.jwt_authorities {
        out.add_jwt_authority(JwtAuthority {
            key_id: j.key_id.clone(),
            public_key_spki: j.public_key.clone(),
        })
        .map_err(|e| e.to_string())?;
    }
    out.set_sequence_number(b.sequence_number);
    out.set_refresh_hint_secs(u64::try_from(b.refresh_hint).ok().filter(|h| *h > 0));
    Ok(out)
}

/// Reads the x509pop evidence: the chain (leaf first) and the leaf's key.
fn x509pop_evidence(
    certificate_path: &std::path::Path,
    private_key_path: &std::path::Path,
    intermediates_path: Option<&std::path::Path>,
) -> Result<(Vec<u8>, PrivateKey), NodeError> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| NodeError::Local(format!("{}: {e}", p.display())))
    };
    let mut chain = plinth_spiffe::pem::parse_all(&read(certificate_path)?, "CERTIFICATE")
        .map_err(|e| NodeError::Local(format!("{}: {e}", certificate_path.display())))?;
    if let Some(p) = intermediates_path {
        chain.extend(
            plinth_spiffe::pem::parse_all(&read(p)?, "CERTIFICATE")
                .map_err(|e| NodeError::Local(format!("{}: {e}", p.display())))?,
        );
    }
    let key = PrivateKey::from_pkcs8_pem(&read(private_key_path)?).map_err(|e| {
        NodeError::Local(format!(
            "{}: {e} (a PKCS#8 PEM key is expected)",
            private_key_path.display()
        ))
    })?;
    let leaf_spki = chain
        .first()
        .map(|c| plinth_spiffe::x509::cert_public_key_spki(c))
        .transpose()
        .map_err(|e| NodeError::Local(e.to_string()))?;
    if leaf_spki.as_deref() != Some(key.public_key_spki()) {
        return Err(NodeError::Local(format!(
            "{} does not hold the key of the first certificate in {}",
            private_key_path.display(),
            certificate_path.display()
        )));
    }
    Ok((chain.concat(), key))
}

/// Signs an x509pop challenge with the agent's certificate key.
pub fn x509pop_sign(key: &dyn Signer, nonce: &[u8]) -> Result<Vec<u8>, NodeError> {
    let mut msg = X509POP_CONTEXT.to_vec();
    msg.extend_from_slice(nonce);
    let scheme = match key.key_type() {
        KeyType::EcP256 => plinth_spiffe::SignatureScheme::EcdsaP256Sha256,
        KeyType::EcP384 => plinth_spiffe::SignatureScheme::EcdsaP384Sha384,
        _ => plinth_spiffe::SignatureScheme::RsaPkcs1Sha256,
    };
    key.sign(scheme, &msg)
        .map_err(|e| NodeError::Local(format!("signing the challenge: {e}")))
}

fn svid_from_proto(
    svid: Option<pb::X509Svid>,
    key: Arc<PrivateKey>,
) -> Result<AgentSvid, NodeError> {
    let svid = svid.ok_or_else(|| NodeError::Local("the server sent no SVID".into()))?;
    AgentSvid::new(svid.cert_chain, key)
        .map_err(|e| NodeError::Local(format!("the server sent an unusable SVID: {e}")))
}

/// What attestation yields.
#[derive(Debug)]
pub struct Attested {
    pub svid: AgentSvid,
    pub bundle: Bundle,
    pub reattestable: bool,
}

/// Attests this node over `channel` with `attestor`.
pub async fn attest(
    channel: Channel,
    attestor: &NodeAttestor,
    td: &TrustDomain,
) -> Result<Attested, NodeError> {
    let key = Arc::new(
        PrivateKey::generate(KeyType::EcP256).map_err(|e| NodeError::Local(e.to_string()))?,
    );
    let csr = Csr::create(key.clone()).map_err(|e| NodeError::Local(e.to_string()))?;
    let (data, pop_key) = match attestor {
        NodeAttestor::JoinToken(Some(token)) => (
            pb::AttestationData {
                r#type: "join_token".into(),
                payload: token.expose().as_bytes().to_vec(),
            },
            None,
        ),
        NodeAttestor::JoinToken(None) => {
            return Err(NodeError::Local(
                "no join token: set node_attestor.join_token.token or pass -joinToken".into(),
            ))
        }
        NodeAttestor::X509Pop {
            certificate_path,
            private_key_path,
            intermediates_path,
        } => {
            let (payload, k) = x509pop_evidence(
                certificate_path,
                private_key_path,
                intermediates_path.as_deref(),
            )?;
            (
                pb::AttestationData {
                    r#type: "x509pop".into(),
                    payload,
                },
                Some(k),
            )
        }
    };
    let (tx, rx) = mpsc::channel(2);
    let params = pb::AttestAgentRequest {
        step: Some(pb::attest_agent_request::Step::Params(
            pb::attest_agent_request::Params {
                data: Some(data),
                csr,
            },
        )),
    };
    tx.send(params)
        .await
        .map_err(|_| NodeError::Local("request stream closed".into()))?;
    let fut = async {
        let mut stream = AgentServiceClient::new(channel)
            .attest_agent(ReceiverStream::new(rx))
            .await
            .map_err(status_err)?
            .into_inner();
        loop {
            let msg =
                stream.message().await.map_err(status_err)?.ok_or_else(|| {
                    NodeError::Unavailable("attestation stream ended early".into())
                })?;
            match msg.step {
                Some(pb::attest_agent_response::Step::Challenge(nonce)) => {
                    let k = pop_key.as_ref().ok_or_else(|| {
                        NodeError::Refused("the server sent a challenge to a join token".into())
                    })?;
                    let response = x509pop_sign(k, &nonce)?;
                    tx.send(pb::AttestAgentRequest {
                        step: Some(pb::attest_agent_request::Step::ChallengeResponse(response)),
                    })
                    .await
                    .map_err(|_| NodeError::Unavailable("attestation stream closed".into()))?;
                }
                Some(pb::attest_agent_response::Step::Result(r)) => {
                    let svid = svid_from_proto(r.svid, key.clone())?;
                    let bundle = r
                        .bundle
                        .as_ref()
                        .ok_or_else(|| NodeError::Local("the server sent no bundle".into()))
                        .and_then(|b| bundle_from_proto(b).map_err(NodeError::Local))?;
                    if bundle.trust_domain() != td || !svid.svid.spiffe_id.is_member_of(td) {
                        return Err(NodeError::Local(format!(
                            "the server answered for {}, this agent is configured for {td}",
                            bundle.trust_domain()
                        )));
                    }
                    return Ok(Attested {
                        svid,
                        bundle,
                        reattestable: r.reattestable,
                    });
                }
                None => return Err(NodeError::Local("empty attestation message".into())),
            }
        }
    };
    tokio::time::timeout(RPC_TIMEOUT, fut)
        .await
        .map_err(|_| NodeError::Unavailable("attestation timed out".into()))?
}

/// Renews the agent SVID with a fresh key (the connection must present the current SVID).
pub async fn renew(channel: Channel) -> Result<AgentSvid, NodeError> {
    let key = Arc::new(
        PrivateKey::generate(KeyType::EcP256).map_err(|e| NodeError::Local(e.to_string()))?,
    );
    let csr = Csr::create(key.clone()).map_err(|e| NodeError::Local(e.to_string()))?;
    let resp = tokio::time::timeout(
        RPC_TIMEOUT,
        AgentServiceClient::new(channel).renew_agent(pb::RenewAgentRequest { csr }),
    )
    .await
    .map_err(|_| NodeError::Unavailable("renewal timed out".into()))?
    .map_err(status_err)?
    .into_inner();
    svid_from_proto(resp.svid, key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn wire_bundles_convert_and_bad_ones_are_refused() {
        let b = pb::Bundle {
            trust_domain: "example.org".into(),
            sequence_number: 7,
            refresh_hint: 300,
            ..Default::default()
        };
        let got = bundle_from_proto(&b).unwrap();
        assert_eq!(got.trust_domain().name(), "example.org");
        assert_eq!(got.sequence_number(), 7);
        assert_eq!(got.refresh_hint_secs(), Some(300));
        let mut bad = b.clone();
        bad.x509_authorities.push(vec![1, 2, 3]);
        assert!(bundle_from_proto(&bad).is_err());
        bad.x509_authorities.clear();
        bad.trust_domain = "Not A Domain".into();
        assert!(bundle_from_proto(&bad).is_err());
    }

    #[test]
    fn refusals_are_told_apart_from_outages() {
        assert!(is_refusal(Code::PermissionDenied));
        assert!(!is_refusal(Code::Unavailable));
        assert!(!is_refusal(Code::DeadlineExceeded));
        assert!(matches!(
            status_err(tonic::Status::permission_denied("banned")),
            NodeError::Refused(_)
        ));
    }
}
