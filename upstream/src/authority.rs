//! Upstream authorities: something above plinth that signs plinth's CA as an intermediate, so
//! that plinth's trust chains to an existing PKI.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use plinth_spiffe::x509::{X509Authority, X509Error};
use plinth_spiffe::{CaTemplate, Csr, PrivateKey, TrustDomain};
use time::OffsetDateTime;

/// Why an upstream authority could not mint a CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    #[error("upstream authority configuration: {0}")]
    Config(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("CSR rejected: {0}")]
    BadCsr(String),
    #[error("upstream refused to sign: {0}")]
    Refused(String),
    #[error("upstream is unavailable: {0}")]
    Unavailable(String),
}

/// A freshly minted intermediate CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedCa {
    /// The new CA certificate first, then the upstream intermediates up to (not including) a root.
    pub ca_chain: Vec<Vec<u8>>,
    /// The upstream roots, to publish in the trust bundle.
    pub upstream_roots: Vec<Vec<u8>>,
}

/// Signs plinth CA certificates. Calls may block (network or disk): call from a blocking context.
pub trait UpstreamAuthority: Send + Sync + fmt::Debug {
    /// A short name for logs and configuration (`disk`, `vault`, `aws_pca`).
    fn name(&self) -> &'static str;
    /// Signs an intermediate CA for `trust_domain` over the key in `csr_der`, valid for at most
    /// `ttl` from `now` (the upstream may shorten it).
    fn mint_x509_ca(
        &self,
        csr_der: &[u8],
        trust_domain: &TrustDomain,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<MintedCa, UpstreamError>;
}

/// An upstream CA whose certificate and key are files (SPIRE's `disk` UpstreamAuthority):
/// `cert_file` holds the signing certificate (optionally followed by its intermediates),
/// `key_file` its PKCS#8 key, and `bundle_file` the roots (omit it when the certificate is itself
/// a self-signed root).
#[derive(Debug)]
pub struct DiskUpstreamAuthority {
    authority: X509Authority,
    roots: Vec<Vec<u8>>,
}

fn read(path: &Path) -> Result<String, UpstreamError> {
    std::fs::read_to_string(path).map_err(|source| UpstreamError::Read {
        path: path.to_owned(),
        source,
    })
}

fn bad(path: &Path, reason: impl fmt::Display) -> UpstreamError {
    UpstreamError::BadFile {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

impl DiskUpstreamAuthority {
    /// Loads and checks the files: the key must match the certificate, which must be a CA.
    pub fn open(
        cert_file: &Path,
        key_file: &Path,
        bundle_file: Option<&Path>,
    ) -> Result<Self, UpstreamError> {
        let mut certs = plinth_spiffe::pem::parse_all(&read(cert_file)?, "CERTIFICATE")
            .map_err(|e| bad(cert_file, e))?;
        let key = PrivateKey::from_pkcs8_pem(&read(key_file)?).map_err(|e| bad(key_file, e))?;
        let cert = certs.remove(0);
        let authority =
            X509Authority::new(cert.clone(), certs, Arc::new(key)).map_err(|e| match e {
                X509Error::KeyMismatch => bad(key_file, "key does not match the certificate"),
                other => bad(cert_file, other),
            })?;
        let roots =
            match bundle_file {
                Some(p) => plinth_spiffe::pem::parse_all(&read(p)?, "CERTIFICATE")
                    .map_err(|e| bad(p, e))?,
                None if authority.chain_after_leaf().is_empty() => vec![cert],
                None => return Err(UpstreamError::Config(
                    "the upstream certificate is not self-signed, so bundle_file_path is required"
                        .into(),
                )),
            };
        Ok(Self { authority, roots })
    }
}

impl UpstreamAuthority for DiskUpstreamAuthority {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn mint_x509_ca(
        &self,
        csr_der: &[u8],
        trust_domain: &TrustDomain,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<MintedCa, UpstreamError> {
        let csr = Csr::parse(csr_der).map_err(|e| UpstreamError::BadCsr(e.to_string()))?;
        let template = CaTemplate::new(trust_domain.clone(), now, ttl);
        let der = self
            .authority
            .sign_ca(&template, csr.public_key_spki(), now)
            .map_err(|e| UpstreamError::Refused(e.to_string()))?;
        let mut ca_chain = vec![der];
        ca_chain.extend(self.authority.chain_after_leaf().iter().cloned());
        Ok(MintedCa {
            ca_chain,
            upstream_roots: self.roots.clone(),
        })
    }
}
