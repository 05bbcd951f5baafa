//! Conversions from Workload API messages to `plinth-spiffe` types, done once at the edge so that
//! clients (the agent CLI, tests) speak domain types. Every input comes from the network and is
//! validated here, never trusted.

use std::collections::HashMap;

use plinth_spiffe::x509::split_der_concat;
use plinth_spiffe::{
    Bundle, BundleError, BundleSet, IdError, KeyError, PrivateKey, SpiffeId, TrustDomain, X509Error,
};

use crate::workload::{JwtBundlesResponse, X509svid};

/// Why a Workload API message could not be turned into domain types.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    #[error("bad SPIFFE ID {value:?}: {source}")]
    SpiffeId { value: String, source: IdError },
    #[error("bad trust domain ID {value:?}: {source}")]
    TrustDomain { value: String, source: IdError },
    #[error("bad certificates in {field}: {source}")]
    Certificates {
        field: &'static str,
        source: X509Error,
    },
    #[error("{field} holds no certificate")]
    NoCertificates { field: &'static str },
    #[error("bad private key: {0}")]
    PrivateKey(KeyError),
    #[error("SVID certificate names {actual}, the message says {claimed}")]
    IdMismatch { claimed: String, actual: String },
    #[error("bad bundle for {trust_domain}: {source}")]
    Bundle {
        trust_domain: String,
        source: BundleError,
    },
}

/// An X509-SVID as received from the Workload API.
#[derive(Debug)]
pub struct ReceivedX509Svid {
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    pub private_key: PrivateKey,
    /// DER X.509 authorities of the SVID's trust domain.
    pub bundle: Vec<Vec<u8>>,
    pub hint: String,
}

fn certs(field: &'static str, der: &[u8]) -> Result<Vec<Vec<u8>>, ConvertError> {
    let certs =
        split_der_concat(der).map_err(|source| ConvertError::Certificates { field, source })?;
    if certs.is_empty() {
        return Err(ConvertError::NoCertificates { field });
    }
    Ok(certs)
}

/// Parses a trust domain ID (`spiffe://example.org`) as used for bundle map keys.
pub fn trust_domain_from_id(value: &str) -> Result<TrustDomain, ConvertError> {
    let id = SpiffeId::new(value).map_err(|source| ConvertError::TrustDomain {
        value: value.to_owned(),
        source,
    })?;
    if !id.is_root() {
        return Err(ConvertError::TrustDomain {
            value: value.to_owned(),
            source: IdError::RootIdNotAllowed {
                id: value.to_owned(),
            },
        });
    }
    Ok(id.trust_domain())
}

impl TryFrom<&X509svid> for ReceivedX509Svid {
    type Error = ConvertError;

    fn try_from(m: &X509svid) -> Result<Self, Self::Error> {
        let spiffe_id =
            SpiffeId::new_with_path(&m.spiffe_id).map_err(|source| ConvertError::SpiffeId {
                value: m.spiffe_id.clone(),
                source,
            })?;
        let chain = certs("x509_svid", &m.x509_svid)?;
        let actual = plinth_spiffe::x509::spiffe_id_of(&chain[0]).map_err(|source| {
            ConvertError::Certificates {
                field: "x509_svid",
                source,
            }
        })?;
        if actual != spiffe_id {
            return Err(ConvertError::IdMismatch {
                claimed: spiffe_id.to_string(),
                actual: actual.to_string(),
            });
        }
        let private_key =
            PrivateKey::from_pkcs8_der(&m.x509_svid_key).map_err(ConvertError::PrivateKey)?;
        Ok(Self {
            spiffe_id,
            chain,
            private_key,
            bundle: certs("bundle", &m.bundle)?,
            hint: m.hint.clone(),
        })
    }
}

/// Parses an X.509 bundle map (`federated_bundles`, `X509BundlesResponse.bundles`): trust domain
/// ID to concatenated DER certificates.
pub fn x509_bundles(map: &HashMap<String, Vec<u8>>) -> Result<BundleSet, ConvertError> {
    let mut set = BundleSet::new();
    for (k, v) in map {
        let mut bundle = Bundle::new(trust_domain_from_id(k)?);
        for der in certs("bundle", v)? {
            bundle
                .add_x509_authority(der)
                .map_err(|source| ConvertError::Bundle {
                    trust_domain: k.clone(),
                    source,
                })?;
        }
        set.insert(bundle);
    }
    Ok(set)
}

impl TryFrom<&JwtBundlesResponse> for BundleSet {
    type Error = ConvertError;

    fn try_from(m: &JwtBundlesResponse) -> Result<Self, Self::Error> {
        let mut set = BundleSet::new();
        for (k, v) in &m.bundles {
            let td = trust_domain_from_id(k)?;
            let bundle = Bundle::from_jwks(td, v).map_err(|source| ConvertError::Bundle {
                trust_domain: k.clone(),
                source,
            })?;
            set.insert(bundle);
        }
        Ok(set)
    }
}
