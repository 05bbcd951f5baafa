//! Node attestation verifiers: join_token and x509pop. Agent IDs follow SPIRE's names:
//! `spiffe://<td>/spire/agent/join_token/<token>` and `spiffe://<td>/spire/agent/x509pop/<sha1>`.

use plinth_spiffe::{Selector, Selectors, SpiffeId, TrustDomain};
use ring::digest;
use ring::signature::{self, UnparsedPublicKey};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// Longest join token accepted (SPIRE makes UUIDs; users may pick their own).
pub const MAX_JOIN_TOKEN_LEN: usize = 256;
/// Largest x509pop payload (the agent's certificate chain).
pub const MAX_X509POP_PAYLOAD: usize = 64 * 1024;
/// Prefix of the bytes an x509pop agent signs, so a signature cannot be replayed elsewhere.
pub const X509POP_CONTEXT: &[u8] = b"plinth x509pop challenge v1\0";

/// Why node attestation failed. Messages never include the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    #[error("attestor {0:?} is not configured on this server")]
    NotConfigured(String),
    #[error("join token is malformed")]
    BadJoinToken,
    #[error("join token not found or already used")]
    UnknownJoinToken,
    #[error("join token expired")]
    ExpiredJoinToken,
    #[error("x509pop: {0}")]
    X509Pop(String),
    #[error("agent {0} is banned")]
    Banned(String),
}

/// A successfully attested node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    pub agent_id: SpiffeId,
    pub attestation_type: String,
    pub selectors: Selectors,
    /// Set for join_token: the token to consume in the same command as the attestation.
    pub join_token: Option<String>,
    /// Whether the agent can attest again with the same evidence (x509pop yes, tokens no).
    pub reattestable: bool,
}

/// Checks the shape of a join token and returns the agent ID it yields. Whether the token exists,
/// is unexpired and unused is decided when the attestation commits (exactly once cluster-wide).
pub fn join_token_agent_id(td: &TrustDomain, token: &str) -> Result<SpiffeId, AttestError> {
    if token.is_empty()
        || token.len() > MAX_JOIN_TOKEN_LEN
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(AttestError::BadJoinToken);
    }
    td.id_from_segments(&["spire", "agent", "join_token", token])
        .map_err(|_| AttestError::BadJoinToken)
}

/// The x509pop verifier: the agent proves possession of a key certified by a configured CA.
#[derive(Debug, Clone)]
pub struct X509PopVerifier {
    roots: Vec<Vec<u8>>,
}

fn sha1_hex(der: &[u8]) -> String {
    let d = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, AttestError> {
    let (rest, c) = X509Certificate::from_der(der)
        .map_err(|e| AttestError::X509Pop(format!("certificate does not parse: {e}")))?;
    if !rest.is_empty() {
        // Signed bytes must be exactly the parsed bytes (SPIRE 1.14.6 / 1.15.1 advisories).
        return Err(AttestError::X509Pop(
            "trailing bytes after a certificate".into(),
        ));
    }
    Ok(c)
}

impl X509PopVerifier {
    /// A verifier trusting `roots` (DER CA certificates).
    pub fn new(roots: Vec<Vec<u8>>) -> Result<Self, AttestError> {
        for r in &roots {
            parse(r)?;
        }
        if roots.is_empty() {
            return Err(AttestError::X509Pop("no CA certificates configured".into()));
        }
        Ok(Self { roots })
    }

    /// Step 1: checks the agent's chain (leaf first, DER concatenated in the payload) against the
    /// configured roots at `now`; returns the leaf for step 2.
    pub fn verify_chain(
        &self,
        payload: &[u8],
        now: OffsetDateTime,
    ) -> Result<Vec<Vec<u8>>, AttestError> {
        if payload.len() > MAX_X509POP_PAYLOAD {
            return Err(AttestError::X509Pop("certificate chain too large".into()));
        }
        let chain = plinth_spiffe::x509::split_der_concat(payload)
            .map_err(|e| AttestError::X509Pop(e.to_string()))?;
        if chain.is_empty() || chain.len() > 8 {
            return Err(AttestError::X509Pop("expected 1 to 8 certificates".into()));
        }
        let certs = chain
            .iter()
            .map(|c| parse(c))
            .collect::<Result<Vec<_>, _>>()?;
        let roots = self
            .roots
            .iter()
            .map(|r| parse(r))
            .collect::<Result<Vec<_>, _>>()?;
        for c in &certs {
            let nb = c.validity().not_before.to_datetime();
            let na = c.validity().not_after.to_datetime();
            if now < nb || now > na {
                return Err(AttestError::X509Pop(
                    "a certificate of the chain is not valid now".into(),
                ));
            }
        }
        let mut cur = 0usize;
        for _ in 0..=certs.len() {
            let c = &certs[cur];
            if roots.iter().any(|r| {
                r.subject().as_raw() == c.issuer().as_raw()
                    && c.verify_signature(Some(r.public_key())).is_ok()
            }) {
                return Ok(chain);
            }
            let next = certs.iter().enumerate().position(|(i, p)| {
                i != cur
                    && p.is_ca()
                    && p.subject().as_raw() == c.issuer().as_raw()
                    && c.verify_signature(Some(p.public_key())).is_ok()
            });
            match next {
                Some(i) => cur = i,
                None => break,
            }
        }
        Err(AttestError::X509Pop(
            "certificate does not chain to a configured CA".into(),
        ))
    }

    /// Step 2: checks the agent's signature over the server's nonce with the leaf's key, and
    /// returns the attested node.
    pub fn verify_response(
        &self,
        td: &TrustDomain,
        chain: &[Vec<u8>],
        nonce: &[u8],
        signature_der: &[u8],
    ) -> Result<AttestedNode, AttestError> {
        let leaf_der = chain
            .first()
            .ok_or_else(|| AttestError::X509Pop("empty chain".into()))?;
        let leaf = parse(leaf_der)?;
        let info = plinth_spiffe::key::PublicKeyInfo::from_spki(leaf.public_key().raw)
            .map_err(|e| AttestError::X509Pop(e.to_string()))?;
        let alg: &dyn signature::VerificationAlgorithm = match info.key_type {
            plinth_spiffe::KeyType::EcP256 => &signature::ECDSA_P256_SHA256_ASN1,
            plinth_spiffe::KeyType::EcP384 => &signature::ECDSA_P384_SHA384_ASN1,
            _ => &signature::RSA_PKCS1_2048_8192_SHA256,
        };
        let mut msg = X509POP_CONTEXT.to_vec();
        msg.extend_from_slice(nonce);
        UnparsedPublicKey::new(alg, &info.raw)
            .verify(&msg, signature_der)
            .map_err(|_| {
                AttestError::X509Pop("challenge response signature does not verify".into())
            })?;

        let fingerprint = sha1_hex(leaf_der);
        let agent_id = td
            .id_from_segments(&["spire", "agent", "x509pop", &fingerprint])
            .map_err(|e| AttestError::X509Pop(e.to_string()))?;
        let mut selectors = Selectors::new();
        let mut add = |v: String| {
            if let Ok(s) = Selector::new("x509pop", &v) {
                selectors.insert(s);
            }
        };
        for cn in leaf.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                add(format!("subject:cn:{cn}"));
            }
        }
        // The intermediates the agent sent, and the configured root that issued the top one.
        let mut top_issuer = leaf.issuer().as_raw().to_vec();
        for ca in chain.iter().skip(1) {
            if let Ok(c) = parse(ca) {
                add(format!("ca:fingerprint:{}", sha1_hex(ca)));
                top_issuer = c.issuer().as_raw().to_vec();
            }
        }
        for root in &self.roots {
            if parse(root).is_ok_and(|r| r.subject().as_raw() == top_issuer.as_slice()) {
                add(format!("ca:fingerprint:{}", sha1_hex(root)));
            }
        }
        if let Ok(Some(san)) = leaf.subject_alternative_name() {
            for g in &san.value.general_names {
                match g {
                    GeneralName::DNSName(d) => add(format!("san:dns:{d}")),
                    GeneralName::URI(u) => add(format!("san:uri:{u}")),
                    _ => {}
                }
            }
        }
        Ok(AttestedNode {
            agent_id,
            attestation_type: "x509pop".into(),
            selectors,
            join_token: None,
            reattestable: true,
        })
    }
}

/// Signs an x509pop challenge as an agent would (used by the agent and by tests).
pub fn x509pop_sign(
    key: &dyn plinth_spiffe::Signer,
    nonce: &[u8],
) -> Result<Vec<u8>, plinth_spiffe::KeyError> {
    let mut msg = X509POP_CONTEXT.to_vec();
    msg.extend_from_slice(nonce);
    let scheme = match key.key_type() {
        plinth_spiffe::KeyType::EcP256 => plinth_spiffe::SignatureScheme::EcdsaP256Sha256,
        plinth_spiffe::KeyType::EcP384 => plinth_spiffe::SignatureScheme::EcdsaP384Sha384,
        _ => plinth_spiffe::SignatureScheme::RsaPkcs1Sha256,
    };
    key.sign(scheme, &msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_token_ids() {
        let td = TrustDomain::new("example.org").unwrap_or_else(|e| panic!("{e}"));
        let id = join_token_agent_id(&td, "3f0e2b7a-1c2d").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            id.as_str(),
            "spiffe://example.org/spire/agent/join_token/3f0e2b7a-1c2d"
        );
        for bad in ["", "a/b", "..", "a b", &"x".repeat(300)] {
            assert_eq!(
                join_token_agent_id(&td, bad),
                Err(AttestError::BadJoinToken),
                "{bad:?}"
            );
        }
    }
}
