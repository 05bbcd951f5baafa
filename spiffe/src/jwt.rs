//! JWT-SVIDs: mint and validate per the JWT-SVID standard.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use crate::id::{IdError, SpiffeId, TrustDomain};
use crate::key::{ecdsa_der_to_fixed, KeyError, KeyType, PublicKeyInfo, SignatureScheme, Signer};

/// Largest token accepted for validation, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a JWT-SVID could not be minted or does not validate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    #[error("token is {0} bytes; at most {MAX_TOKEN_LEN} are accepted")]
    TooLarge(usize),
    #[error("token is not a JWS in compact serialization (three base64url parts)")]
    Malformed,
    #[error("token {0} is not valid base64url JSON")]
    BadPart(&'static str),
    #[error("unsupported token algorithm {0:?}; JWT-SVIDs use RS/ES/PS 256/384/512")]
    UnsupportedAlgorithm(String),
    #[error("token header typ {0:?} is not JWT or JOSE")]
    BadType(String),
    #[error("token header has critical extensions {0:?}, which are not understood")]
    CriticalHeader(String),
    #[error("token header is missing key ID")]
    MissingKid,
    #[error("token is missing subject")]
    MissingSubject,
    #[error("token subject is not a valid SPIFFE ID: {0}")]
    BadSubject(IdError),
    #[error("token is missing audience")]
    MissingAudience,
    #[error("token is missing expiration")]
    MissingExpiry,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("expected audience {expected:?} not in token audience {actual:?}")]
    AudienceMismatch {
        expected: String,
        actual: Vec<String>,
    },
    #[error("no JWT authorities are known for trust domain {0}")]
    NoBundle(String),
    #[error("no JWT authority {kid:?} in the bundle of trust domain {td}")]
    UnknownKid { kid: String, td: String },
    #[error("JWT authority {kid:?} is a {key_type} key, which cannot verify {alg}")]
    KeyAlgMismatch {
        kid: String,
        key_type: KeyType,
        alg: JwtAlg,
    },
    #[error("token signature does not verify")]
    BadSignature,
    #[error("audience must have at least one non-empty value")]
    EmptyAudience,
    #[error("key ID must not be empty")]
    EmptyKid,
    #[error("TTL must be positive")]
    ZeroTtl,
    #[error("{alg} cannot be used with a {key_type} signing key")]
    SignerAlgMismatch { alg: JwtAlg, key_type: KeyType },
    #[error("signing failed: {0}")]
    Sign(#[from] KeyError),
}

/// JWS algorithms a JWT-SVID may use. ES512 is in the standard's list but has no P-521
/// implementation in `ring`; it is refused as unsupported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlg {
    ES256,
    ES384,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
}

impl JwtAlg {
    /// The `alg` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlg::ES256 => "ES256",
            JwtAlg::ES384 => "ES384",
            JwtAlg::RS256 => "RS256",
            JwtAlg::RS384 => "RS384",
            JwtAlg::RS512 => "RS512",
            JwtAlg::PS256 => "PS256",
            JwtAlg::PS384 => "PS384",
            JwtAlg::PS512 => "PS512",
        }
    }

    /// The algorithm SPIRE uses for a key type: ES256, ES384, or RS256.
    pub fn default_for(kt: KeyType) -> Self {
        match kt {
            KeyType::EcP256 => JwtAlg::ES256,
            KeyType::EcP384 => JwtAlg::ES384,
            KeyType::Rsa2048 | KeyType::Rsa4096 => JwtAlg::RS256,
        }
    }

    fn scheme(self) -> SignatureScheme {
        match self {
            JwtAlg::ES256 => SignatureScheme::EcdsaP256Sha256,
            JwtAlg::ES384 => SignatureScheme::EcdsaP384Sha384,
            JwtAlg::RS256 => SignatureScheme::RsaPkcs1Sha256,
            JwtAlg::RS384 => SignatureScheme::RsaPkcs1Sha384,
            JwtAlg::RS512 => SignatureScheme::RsaPkcs1Sha512,
            JwtAlg::PS256 => SignatureScheme::RsaPssSha256,
            JwtAlg::PS384 => SignatureScheme::RsaPssSha384,
            JwtAlg::PS512 => SignatureScheme::RsaPssSha512,
        }
    }

    fn verifier(self) -> &'static dyn VerificationAlgorithm {
        match self {
            JwtAlg::ES256 => &signature::ECDSA_P256_SHA256_FIXED,
            JwtAlg::ES384 => &signature::ECDSA_P384_SHA384_FIXED,
            JwtAlg::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            JwtAlg::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            JwtAlg::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            JwtAlg::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
            JwtAlg::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
            JwtAlg::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
        }
    }
}

impl fmt::Display for JwtAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JwtAlg {
    type Err = JwtError;
    fn from_str(s: &str) -> Result<Self, JwtError> {
        Ok(match s {
            "ES256" => JwtAlg::ES256,
            "ES384" => JwtAlg::ES384,
            "RS256" => JwtAlg::RS256,
            "RS384" => JwtAlg::RS384,
            "RS512" => JwtAlg::RS512,
            "PS256" => JwtAlg::PS256,
            "PS384" => JwtAlg::PS384,
            "PS512" => JwtAlg::PS512,
            other => return Err(JwtError::UnsupportedAlgorithm(other.to_owned())),
        })
    }
}

/// What to put in a JWT-SVID.
#[derive(Debug, Clone)]
pub struct JwtSvidParams<'a> {
    pub subject: &'a SpiffeId,
    pub audience: &'a [String],
    pub ttl: Duration,
    /// The key ID of the signing JWT authority, as published in the bundle.
    pub key_id: &'a str,
    /// `None` picks [`JwtAlg::default_for`] the signer's key type.
    pub alg: Option<JwtAlg>,
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Mints a JWT-SVID signed by `signer` at `now`; returns the compact token and its expiry.
pub fn mint(
    signer: &dyn Signer,
    params: &JwtSvidParams<'_>,
    now: OffsetDateTime,
) -> Result<(String, OffsetDateTime), JwtError> {
    if params.audience.is_empty() || params.audience.iter().any(String::is_empty) {
        return Err(JwtError::EmptyAudience);
    }
    if params.key_id.is_empty() {
        return Err(JwtError::EmptyKid);
    }
    if params.ttl.is_zero() {
        return Err(JwtError::ZeroTtl);
    }
    if params.subject.is_root() {
        return Err(JwtError::BadSubject(IdError::RootIdNotAllowed {
            id: params.subject.to_string(),
        }));
    }
    let kt = signer.key_type();
    let alg = params.alg.unwrap_or_else(|| JwtAlg::default_for(kt));
    if !alg.scheme().fits(kt) {
        return Err(JwtError::SignerAlgMismatch { alg, key_type: kt });
    }
    let iat = now.unix_timestamp();
    let exp = iat.saturating_add(i64::try_from(params.ttl.as_secs()).unwrap_or(i64::MAX));
    let header = json!({"alg": alg.as_str(), "kid": params.key_id, "typ": "JWT"});
    let aud: Value = match params.audience {
        [one] => one.as_str().into(),
        many => many.iter().map(|a| Value::from(a.as_str())).collect(),
    };
    let claims = json!({"sub": params.subject.as_str(), "aud": aud, "exp": exp, "iat": iat});
    let signing_input = format!("{}.{}", b64(&header), b64(&claims));
    let mut sig = signer.sign(alg.scheme(), signing_input.as_bytes())?;
    if let Some(width) = match alg {
        JwtAlg::ES256 => Some(32),
        JwtAlg::ES384 => Some(48),
        _ => None,
    } {
        sig = ecdsa_der_to_fixed(&sig, width).ok_or_else(|| {
            KeyError::SignFailed("signer returned a malformed ECDSA signature".into())
        })?;
    }
    let expiry = OffsetDateTime::from_unix_timestamp(exp).unwrap_or(now);
    Ok((
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)),
        expiry,
    ))
}

/// Where a validator finds JWT authorities.
pub trait JwtBundleSource {
    /// `Ok(spki)` for the key `kid` of `td`; `Err(JwtError::NoBundle | UnknownKid)` otherwise.
    fn jwt_authority(&self, td: &TrustDomain, kid: &str) -> Result<Vec<u8>, JwtError>;
}

/// A validated JWT-SVID.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJwt {
    pub spiffe_id: SpiffeId,
    pub audience: Vec<String>,
    pub expiry: OffsetDateTime,
    /// Every claim of the token, for `ValidateJWTSVID`'s `claims` field.
    pub claims: Map<String, Value>,
}

fn decode_part(part: &str, what: &'static str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::BadPart(what))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JwtError::BadPart(what)),
    }
}

fn numeric(claims: &Map<String, Value>, name: &str) -> Option<Option<i64>> {
    match claims.get(name) {
        None => Some(None),
        Some(v) => v
            .as_i64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.is_finite())
                    .map(|f| f.floor() as i64)
            })
            .map(Some),
    }
}

/// A token split into its parts, nothing verified yet.
struct Unverified<'t> {
    alg: JwtAlg,
    kid: String,
    claims: Map<String, Value>,
    signing_input: &'t str,
    sig: Vec<u8>,
}

/// Parses a token's header and claims without checking the signature; used to pick the bundle.
/// Validation must always go through [`validate`].
fn parse_unverified(token: &str) -> Result<Unverified<'_>, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLarge(token.len()));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header = decode_part(h, "header")?;
    let alg_s = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::UnsupportedAlgorithm(String::new()))?;
    let alg = JwtAlg::from_str(alg_s)?;
    if let Some(typ) = header.get("typ") {
        match typ.as_str() {
            Some("JWT") | Some("JOSE") => {}
            _ => return Err(JwtError::BadType(typ.to_string())),
        }
    }
    if let Some(crit) = header.get("crit") {
        return Err(JwtError::CriticalHeader(crit.to_string()));
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
        .ok_or(JwtError::MissingKid)?
        .to_owned();
    let claims = decode_part(c, "payload")?;
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwtError::BadPart("signature"))?;
    let signing_input = &token[..h.len() + 1 + c.len()];
    Ok(Unverified {
        alg,
        kid,
        claims,
        signing_input,
        sig,
    })
}

/// Validates a JWT-SVID at `now` for `audience` against the JWT authorities of the subject's
/// trust domain.
pub fn validate(
    token: &str,
    bundles: &dyn JwtBundleSource,
    audience: &str,
    now: OffsetDateTime,
) -> Result<ValidatedJwt, JwtError> {
    if audience.is_empty() {
        return Err(JwtError::EmptyAudience);
    }
    let Unverified {
        alg,
        kid,
        claims,
        signing_input,
        sig,
    } = parse_unverified(token)?;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtError::MissingSubject)?;
    let spiffe_id = SpiffeId::new_with_path(sub).map_err(JwtError::BadSubject)?;
    let spki = bundles.jwt_authority(&spiffe_id.trust_domain(), &kid)?;
    let key = PublicKeyInfo::from_spki(&spki).map_err(|_| JwtError::BadSignature)?;
    let fits = match alg {
        JwtAlg::ES256 => key.key_type == KeyType::EcP256,
        JwtAlg::ES384 => key.key_type == KeyType::EcP384,
        _ => key.key_type.is_rsa(),
    };
    if !fits {
        return Err(JwtError::KeyAlgMismatch {
            kid,
            key_type: key.key_type,
            alg,
        });
    }
    UnparsedPublicKey::new(alg.verifier(), &key.raw)
        .verify(signing_input.as_bytes(), &sig)
        .map_err(|_| JwtError::BadSignature)?;

    // Claims are checked only after the signature: nothing unauthenticated drives decisions.
    let audiences: Vec<String> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or(JwtError::MissingAudience)?,
        _ => return Err(JwtError::MissingAudience),
    };
    if audiences.is_empty() {
        return Err(JwtError::MissingAudience);
    }
    let exp = numeric(&claims, "exp")
        .flatten()
        .ok_or(JwtError::MissingExpiry)?;
    let now_s = now.unix_timestamp();
    if now_s >= exp {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = numeric(&claims, "nbf").ok_or(JwtError::NotYetValid)? {
        if now_s < nbf {
            return Err(JwtError::NotYetValid);
        }
    }
    if !audiences.iter().any(|a| a == audience) {
        return Err(JwtError::AudienceMismatch {
            expected: audience.to_owned(),
            actual: audiences,
        });
    }
    Ok(ValidatedJwt {
        spiffe_id,
        audience: audiences,
        expiry: OffsetDateTime::from_unix_timestamp(exp).unwrap_or(now),
        claims,
    })
}
