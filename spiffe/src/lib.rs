//! plinth-spiffe: the SPIFFE identity core shared by every plinth crate.
//!
//! Owns: [`SpiffeId`] and [`TrustDomain`] (parsed per the SPIFFE-ID standard, rejecting and never
//! normalising), [`Selector`]s and the entry matching rule, X509-SVID and signing-certificate
//! building and verification, JWT-SVID minting and validation, and SPIFFE bundles (JWK Sets).
//!
//! Must not depend on: tokio or any IO, nor on any other plinth crate. Time is passed in by the
//! caller, so expiry and rotation are testable without sleeping. Keys are reached through the
//! [`Signer`] trait so that they can live in memory, on disk or in an HSM.
//!
//! With the `tls` feature, `tls` adds SPIFFE mTLS for rustls (verifiers, an SVID resolver over
//! [`Signer`], config builders); still no IO.

pub mod bundle;
pub mod id;
mod jwk;
pub mod jwt;
pub mod key;
pub mod pem;
pub mod selector;
#[cfg(feature = "tls")]
pub mod tls;
pub mod x509;

pub use bundle::{Bundle, BundleError, BundleSet, JwtAuthority};
pub use id::{IdError, SpiffeId, TrustDomain};
pub use jwk::JwkError;
pub use jwt::{JwtAlg, JwtError, JwtSvidParams, ValidatedJwt};
pub use key::{KeyError, KeyType, PrivateKey, SignatureScheme, Signer};
pub use selector::{Selector, SelectorError, Selectors};
pub use x509::{CaTemplate, Csr, SvidRequest, VerifiedSvid, X509Authority, X509Error, X509Svid};
