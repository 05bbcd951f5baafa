//! SPIFFE bundles: the JWK Set of a trust domain's X.509 and JWT authorities.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{Map, Value};

use crate::id::TrustDomain;
use crate::jwk::{read_key_params, write_key_params, JwkError};
use crate::jwt::{JwtBundleSource, JwtError};
use crate::x509::{cert_public_key_spki, X509BundleSource};

/// Largest bundle document accepted, in bytes.
pub const MAX_BUNDLE_LEN: usize = 4 * 1024 * 1024;
/// `use` of an X.509 authority.
pub const USE_X509_SVID: &str = "x509-svid";
/// `use` of a JWT authority.
pub const USE_JWT_SVID: &str = "jwt-svid";

/// Why a bundle document could not be read or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("bundle is {0} bytes; at most {MAX_BUNDLE_LEN} are accepted")]
    TooLarge(usize),
    #[error("bundle is not a JSON object: {0}")]
    NotJson(String),
    #[error("bundle has no \"keys\" array")]
    MissingKeys,
    #[error("key {index} of the bundle is not a JSON object")]
    KeyNotObject { index: usize },
    #[error("{member} must be a non-negative integer")]
    BadNumber { member: &'static str },
    #[error("x509-svid key {index} must have exactly one certificate in x5c, found {found}")]
    X5cCount { index: usize, found: usize },
    #[error(
        "x509-svid key {index} has a certificate that is not valid base64 DER X.509: {reason}"
    )]
    BadCertificate { index: usize, reason: String },
    #[error("x509-svid key {index}: JWK key parameters do not match the certificate's key")]
    X5cKeyMismatch { index: usize },
    #[error("jwt-svid key {index} has no kid")]
    MissingKid { index: usize },
    #[error("jwt-svid key ID {kid:?} appears twice with different keys")]
    DuplicateKid { kid: String },
    #[error("key {index}: {source}")]
    Jwk { index: usize, source: JwkError },
    #[error("JWT authority key ID must not be empty")]
    EmptyKid,
}

/// True if two bundles' authorities are the same sets: X.509 certificates (DER) and JWT
/// authorities as (key ID, DER SubjectPublicKeyInfo), each compared regardless of order.
pub fn same_authority_sets(
    x509_a: &[Vec<u8>],
    x509_b: &[Vec<u8>],
    jwt_a: &[(String, Vec<u8>)],
    jwt_b: &[(String, Vec<u8>)],
) -> bool {
    fn sorted<T: Ord + Clone>(v: &[T]) -> Vec<T> {
        let mut v = v.to_vec();
        v.sort();
        v
    }
    sorted(x509_a) == sorted(x509_b) && sorted(jwt_a) == sorted(jwt_b)
}

/// A JWT authority: a key ID and its public key (DER SubjectPublicKeyInfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    pub key_id: String,
    pub public_key_spki: Vec<u8>,
}

/// The trust bundle of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    trust_domain: TrustDomain,
    x509_authorities: Vec<Vec<u8>>,
    jwt_authorities: Vec<JwtAuthority>,
    sequence_number: u64,
    refresh_hint_secs: Option<u64>,
}

impl Bundle {
    /// An empty bundle (every SVID of `trust_domain` is invalid against it).
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence_number: 0,
            refresh_hint_secs: None,
        }
    }

    /// The trust domain this bundle is for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// X.509 authorities (DER certificates).
    pub fn x509_authorities(&self) -> &[Vec<u8>] {
        &self.x509_authorities
    }

    /// JWT authorities.
    pub fn jwt_authorities(&self) -> &[JwtAuthority] {
        &self.jwt_authorities
    }

    /// `spiffe_sequence`.
    pub fn sequence_number(&self) -> u64 {
        self.sequence_number
    }

    /// Sets `spiffe_sequence` (callers increment it on every content change).
    pub fn set_sequence_number(&mut self, n: u64) {
        self.sequence_number = n;
    }

    /// `spiffe_refresh_hint`, in seconds.
    pub fn refresh_hint_secs(&self) -> Option<u64> {
        self.refresh_hint_secs
    }

    /// Sets `spiffe_refresh_hint`.
    pub fn set_refresh_hint_secs(&mut self, secs: Option<u64>) {
        self.refresh_hint_secs = secs;
    }

    /// Adds an X.509 authority; returns false if it was already present.
    pub fn add_x509_authority(&mut self, der: Vec<u8>) -> Result<bool, BundleError> {
        cert_public_key_spki(&der).map_err(|e| BundleError::BadCertificate {
            index: self.x509_authorities.len(),
            reason: e.to_string(),
        })?;
        if self.x509_authorities.contains(&der) {
            return Ok(false);
        }
        self.x509_authorities.push(der);
        Ok(true)
    }

    /// Removes an X.509 authority; returns false if it was not present.
    pub fn remove_x509_authority(&mut self, der: &[u8]) -> bool {
        let before = self.x509_authorities.len();
        self.x509_authorities.retain(|c| c != der);
        before != self.x509_authorities.len()
    }

    /// Adds a JWT authority; returns false if an identical one was present. The same key ID with
    /// a different key is an error.
    pub fn add_jwt_authority(&mut self, auth: JwtAuthority) -> Result<bool, BundleError> {
        if auth.key_id.is_empty() {
            return Err(BundleError::EmptyKid);
        }
        if let Some(existing) = self
            .jwt_authorities
            .iter()
            .find(|a| a.key_id == auth.key_id)
        {
            if existing.public_key_spki == auth.public_key_spki {
                return Ok(false);
            }
            return Err(BundleError::DuplicateKid {
                kid: auth.key_id.clone(),
            });
        }
        self.jwt_authorities.push(auth);
        Ok(true)
    }

    /// Removes the JWT authority with `key_id`; returns false if absent.
    pub fn remove_jwt_authority(&mut self, key_id: &str) -> bool {
        let before = self.jwt_authorities.len();
        self.jwt_authorities.retain(|a| a.key_id != key_id);
        before != self.jwt_authorities.len()
    }

    /// True if both bundles hold the same authorities (ignoring order, sequence and hint).
    pub fn same_authorities(&self, other: &Bundle) -> bool {
        let jwt = |b: &Bundle| -> Vec<(String, Vec<u8>)> {
            b.jwt_authorities
                .iter()
                .map(|j| (j.key_id.clone(), j.public_key_spki.clone()))
                .collect()
        };
        same_authority_sets(
            &self.x509_authorities,
            &other.x509_authorities,
            &jwt(self),
            &jwt(other),
        )
    }

    /// The X.509 authorities as concatenated PEM `CERTIFICATE` blocks.
    pub fn x509_pem(&self) -> String {
        crate::pem::encode_certs(&self.x509_authorities)
    }

    /// The X.509 authorities as concatenated DER (the Workload API's bundle encoding).
    pub fn x509_der_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// Encodes the bundle as a SPIFFE bundle document (a JWK Set).
    pub fn to_jwks(&self) -> Result<String, BundleError> {
        let mut keys = Vec::new();
        for (index, der) in self.x509_authorities.iter().enumerate() {
            let spki = cert_public_key_spki(der).map_err(|e| BundleError::BadCertificate {
                index,
                reason: e.to_string(),
            })?;
            let mut obj = Map::new();
            write_key_params(&spki, &mut obj)
                .map_err(|source| BundleError::Jwk { index, source })?;
            obj.insert("use".into(), USE_X509_SVID.into());
            obj.insert(
                "x5c".into(),
                Value::Array(vec![STANDARD.encode(der).into()]),
            );
            keys.push(Value::Object(obj));
        }
        for (i, auth) in self.jwt_authorities.iter().enumerate() {
            let index = self.x509_authorities.len() + i;
            let mut obj = Map::new();
            write_key_params(&auth.public_key_spki, &mut obj)
                .map_err(|source| BundleError::Jwk { index, source })?;
            obj.insert("use".into(), USE_JWT_SVID.into());
            obj.insert("kid".into(), auth.key_id.clone().into());
            keys.push(Value::Object(obj));
        }
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        doc.insert("spiffe_sequence".into(), self.sequence_number.into());
        if let Some(h) = self.refresh_hint_secs {
            doc.insert("spiffe_refresh_hint".into(), h.into());
        }
        Ok(Value::Object(doc).to_string())
    }

    /// Decodes a SPIFFE bundle document for `trust_domain` (the binding is configured by the
    /// caller, never read from the document). Keys of unknown `use` or `kty` are ignored.
    pub fn from_jwks(trust_domain: TrustDomain, doc: &[u8]) -> Result<Self, BundleError> {
        if doc.len() > MAX_BUNDLE_LEN {
            return Err(BundleError::TooLarge(doc.len()));
        }
        let value: Value =
            serde_json::from_slice(doc).map_err(|e| BundleError::NotJson(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(BundleError::NotJson("top level is not an object".into()));
        };
        let keys = obj
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(BundleError::MissingKeys)?;
        let mut bundle = Bundle::new(trust_domain);
        if let Some(seq) = obj.get("spiffe_sequence") {
            bundle.sequence_number = seq.as_u64().ok_or(BundleError::BadNumber {
                member: "spiffe_sequence",
            })?;
        }
        if let Some(hint) = obj.get("spiffe_refresh_hint") {
            bundle.refresh_hint_secs = Some(hint.as_u64().ok_or(BundleError::BadNumber {
                member: "spiffe_refresh_hint",
            })?);
        }
        for (index, key) in keys.iter().enumerate() {
            let Value::Object(k) = key else {
                return Err(BundleError::KeyNotObject { index });
            };
            match k.get("use").and_then(Value::as_str) {
                Some(USE_X509_SVID) => {
                    let x5c = k.get("x5c").and_then(Value::as_array);
                    let certs = match x5c {
                        Some(a) if a.len() == 1 => a,
                        Some(a) => {
                            return Err(BundleError::X5cCount {
                                index,
                                found: a.len(),
                            })
                        }
                        None => return Err(BundleError::X5cCount { index, found: 0 }),
                    };
                    let der = certs[0]
                        .as_str()
                        .and_then(|s| STANDARD.decode(s).ok())
                        .ok_or_else(|| BundleError::BadCertificate {
                            index,
                            reason: "not base64".into(),
                        })?;
                    let cert_spki =
                        cert_public_key_spki(&der).map_err(|e| BundleError::BadCertificate {
                            index,
                            reason: e.to_string(),
                        })?;
                    match read_key_params(k) {
                        Ok(Some(spki)) if spki != cert_spki => {
                            return Err(BundleError::X5cKeyMismatch { index })
                        }
                        Ok(_) => {}
                        Err(source) => return Err(BundleError::Jwk { index, source }),
                    }
                    if !bundle.x509_authorities.contains(&der) {
                        bundle.x509_authorities.push(der);
                    }
                }
                Some(USE_JWT_SVID) => {
                    let kid = k
                        .get("kid")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .ok_or(BundleError::MissingKid { index })?;
                    let spki = match read_key_params(k) {
                        Ok(Some(spki)) => spki,
                        Ok(None) => continue,
                        Err(source) => return Err(BundleError::Jwk { index, source }),
                    };
                    bundle.add_jwt_authority(JwtAuthority {
                        key_id: kid.to_owned(),
                        public_key_spki: spki,
                    })?;
                }
                _ => continue,
            }
        }
        Ok(bundle)
    }
}

impl X509BundleSource for Bundle {
    fn x509_authorities(&self, td: &TrustDomain) -> Option<Vec<Vec<u8>>> {
        (td == &self.trust_domain).then(|| self.x509_authorities.clone())
    }
}

impl JwtBundleSource for Bundle {
    fn jwt_authority(&self, td: &TrustDomain, kid: &str) -> Result<Vec<u8>, JwtError> {
        if td != &self.trust_domain {
            return Err(JwtError::NoBundle(td.to_string()));
        }
        self.jwt_authorities
            .iter()
            .find(|a| a.key_id == kid)
            .map(|a| a.public_key_spki.clone())
            .ok_or_else(|| JwtError::UnknownKid {
                kid: kid.to_owned(),
                td: td.to_string(),
            })
    }
}

/// Bundles of several trust domains, kept apart: an SVID is only ever checked against the
/// bundle of its own trust domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleSet {
    bundles: BTreeMap<TrustDomain, Bundle>,
}

impl BundleSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces the bundle of its trust domain.
    pub fn insert(&mut self, bundle: Bundle) {
        self.bundles.insert(bundle.trust_domain.clone(), bundle);
    }

    /// The bundle of `td`.
    pub fn get(&self, td: &TrustDomain) -> Option<&Bundle> {
        self.bundles.get(td)
    }

    /// Every bundle, ordered by trust domain.
    pub fn iter(&self) -> impl Iterator<Item = &Bundle> {
        self.bundles.values()
    }

    /// Number of trust domains.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

impl X509BundleSource for BundleSet {
    fn x509_authorities(&self, td: &TrustDomain) -> Option<Vec<Vec<u8>>> {
        self.bundles.get(td).map(|b| b.x509_authorities.clone())
    }
}

impl JwtBundleSource for BundleSet {
    fn jwt_authority(&self, td: &TrustDomain, kid: &str) -> Result<Vec<u8>, JwtError> {
        self.bundles
            .get(td)
            .ok_or_else(|| JwtError::NoBundle(td.to_string()))?
            .jwt_authority(td, kid)
    }
}
