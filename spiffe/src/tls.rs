//! SPIFFE mTLS for rustls (cargo feature `tls`).
//!
//! Peers authenticate with X509-SVIDs: each side's chain is checked with [`verify_svid`] against
//! the *current* bundles (read from a [`BundleSource`] on every handshake, so a bundle update
//! takes effect for the next connection) and the peer's SPIFFE ID is then checked by an
//! [`Authorizer`]. Server names (SNI, DNS SANs) play no part; the SPIFFE ID is the identity.
//!
//! The local SVID is served from an [`SvidSource`] (usually an [`SvidHolder`] that rotation
//! updates), and its private key is reached only through the [`Signer`] trait, so a key in an HSM
//! can terminate TLS.
//!
//! Session resumption is disabled on both sides by the config builders: a resumed session skips
//! certificate validation, so a chain whose authority has since left the bundle would still be
//! accepted (SPIRE 1.14.3). Every connection made with these configs runs a full handshake and
//! a full chain check.
//!
//! No IO here: plug the configs into tokio-rustls (or any rustls transport) in the caller.
//! `tests/tls_tonic.rs` shows the tonic wiring: a server stream type implementing tonic's
//! `Connected` with [`peer_spiffe_id`] as its connect info (so handlers find the caller's ID in
//! the request extensions), and a client `Endpoint::connect_with_connector` that dials TCP and
//! runs the handshake with a [`client_config`].

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{ring as ring_provider, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, SignatureAlgorithm, SignatureScheme as TlsScheme,
};
use time::OffsetDateTime;

use crate::key::{KeyError, KeyType, PublicKeyInfo, SignatureScheme, Signer};
use crate::x509::{verify_svid, VerifiedSvid, X509Error, X509Svid};
use crate::{BundleSet, SpiffeId, TrustDomain};

/// The ALPN protocol gRPC (tonic) speaks; set on every config built here.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS identity could not be set up or a peer was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("the SVID has an empty certificate chain")]
    EmptySvid,
    #[error("the signer's public key does not match the SVID leaf's")]
    KeyMismatch,
    #[error("peer SPIFFE ID {0} is not authorized")]
    Unauthorized(SpiffeId),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("current time is outside the range X.509 can express")]
    BadTime,
    #[error(transparent)]
    X509(#[from] X509Error),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("rustls: {0}")]
    Rustls(rustls::Error),
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError::Rustls(e)
    }
}

/// Reads a lock even if a writer panicked: every write replaces the value whole, so what is
/// there is always consistent.
fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read().unwrap_or_else(PoisonError::into_inner).clone()
}

fn write<T>(lock: &RwLock<T>, value: T) {
    *lock.write().unwrap_or_else(PoisonError::into_inner) = value;
}

// ---------------------------------------------------------------------------------------------
// Bundles

/// Where the verifiers read the trust bundles; called on every handshake.
pub trait BundleSource: Send + Sync + fmt::Debug {
    /// The bundles to validate peers against now.
    fn bundle_set(&self) -> Arc<BundleSet>;
}

/// A [`BundleSource`] that the owner updates when bundles change (rotation, federation refresh).
#[derive(Debug, Default)]
pub struct BundleHolder {
    current: RwLock<Arc<BundleSet>>,
}

impl BundleHolder {
    pub fn new(bundles: BundleSet) -> Self {
        Self {
            current: RwLock::new(Arc::new(bundles)),
        }
    }

    /// The current bundles.
    pub fn get(&self) -> Arc<BundleSet> {
        read(&self.current)
    }

    /// Replaces the bundles; handshakes from now on use the new ones.
    pub fn set(&self, bundles: BundleSet) {
        write(&self.current, Arc::new(bundles));
    }

    /// Changes the bundles in place (copy, edit, swap).
    pub fn update(&self, edit: impl FnOnce(&mut BundleSet)) {
        let mut guard = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = BundleSet::clone(&guard);
        edit(&mut next);
        *guard = Arc::new(next);
    }
}

impl BundleSource for BundleHolder {
    fn bundle_set(&self) -> Arc<BundleSet> {
        self.get()
    }
}

// ---------------------------------------------------------------------------------------------
// Authorization

/// Which peer SPIFFE IDs are accepted once the chain has verified.
#[derive(Clone)]
#[non_exhaustive]
pub enum Authorizer {
    /// Any ID that verifies against the bundles (authentication only).
    Any,
    /// Any ID in this trust domain.
    MemberOf(TrustDomain),
    /// Exactly this ID.
    Exact(SpiffeId),
    /// One of these IDs.
    OneOf(Vec<SpiffeId>),
    /// IDs for which the predicate is true.
    Predicate(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>),
}

impl Authorizer {
    pub fn any() -> Self {
        Authorizer::Any
    }

    pub fn member_of(td: TrustDomain) -> Self {
        Authorizer::MemberOf(td)
    }

    pub fn exact(id: SpiffeId) -> Self {
        Authorizer::Exact(id)
    }

    pub fn one_of(ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        Authorizer::OneOf(ids.into_iter().collect())
    }

    pub fn predicate(f: impl Fn(&SpiffeId) -> bool + Send + Sync + 'static) -> Self {
        Authorizer::Predicate(Arc::new(f))
    }

    /// True if `id` is accepted.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Authorizer::Any => true,
            Authorizer::MemberOf(td) => id.is_member_of(td),
            Authorizer::Exact(want) => id == want,
            Authorizer::OneOf(ids) => ids.contains(id),
            Authorizer::Predicate(f) => f(id),
        }
    }
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authorizer::Any => f.write_str("Any"),
            Authorizer::MemberOf(td) => f.debug_tuple("MemberOf").field(td).finish(),
            Authorizer::Exact(id) => f.debug_tuple("Exact").field(id).finish(),
            Authorizer::OneOf(ids) => f.debug_tuple("OneOf").field(ids).finish(),
            Authorizer::Predicate(_) => f.write_str("Predicate(..)"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verifiers

/// Validates a peer's X509-SVID chain against the current bundles and authorizes its ID. Shared by
/// [`SpiffeServerCertVerifier`] and [`SpiffeClientCertVerifier`].
#[derive(Debug, Clone)]
pub struct SvidVerifier {
    bundles: Arc<dyn BundleSource>,
    authorizer: Authorizer,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SvidVerifier {
    pub fn new(bundles: Arc<dyn BundleSource>, authorizer: Authorizer) -> Self {
        Self {
            bundles,
            authorizer,
            algorithms: ring_provider::default_provider().signature_verification_algorithms,
        }
    }

    /// Verifies `chain` (leaf first) at `now` and authorizes the leaf's SPIFFE ID.
    pub fn verify<D: AsRef<[u8]>>(
        &self,
        chain: &[D],
        now: OffsetDateTime,
    ) -> Result<VerifiedSvid, TlsError> {
        let bundles = self.bundles.bundle_set();
        let verified = verify_svid(chain, bundles.as_ref(), now)?;
        if !self.authorizer.allows(&verified.spiffe_id) {
            return Err(TlsError::Unauthorized(verified.spiffe_id));
        }
        Ok(verified)
    }

    fn verify_tls(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<VerifiedSvid, rustls::Error> {
        let now = i64::try_from(now.as_secs())
            .ok()
            .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
            .ok_or_else(|| to_rustls(TlsError::BadTime))?;
        let mut chain: Vec<&[u8]> = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.as_ref());
        chain.extend(intermediates.iter().map(|c| c.as_ref()));
        self.verify(&chain, now).map_err(to_rustls)
    }

    fn tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn schemes(&self) -> Vec<TlsScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Maps a refusal onto rustls's error, using the standard certificate errors where one fits
/// (they choose the TLS alert), else carrying ours.
fn to_rustls(e: TlsError) -> rustls::Error {
    let cert_err = match e {
        TlsError::X509(X509Error::Expired { .. }) => CertificateError::Expired,
        TlsError::X509(X509Error::NotYetValid { .. }) => CertificateError::NotValidYet,
        TlsError::X509(X509Error::NoBundle(_) | X509Error::NoPathToAuthority(_)) => {
            CertificateError::UnknownIssuer
        }
        TlsError::X509(
            X509Error::Parse { .. } | X509Error::TooLarge { .. } | X509Error::EmptyChain,
        ) => CertificateError::BadEncoding,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_err)
}

/// A client's check of the server: the server's SVID must verify and its ID be authorized. The
/// server name the connection was opened with is not consulted.
#[derive(Debug, Clone)]
pub struct SpiffeServerCertVerifier {
    inner: SvidVerifier,
}

impl SpiffeServerCertVerifier {
    pub fn new(bundles: Arc<dyn BundleSource>, authorizer: Authorizer) -> Self {
        Self {
            inner: SvidVerifier::new(bundles, authorizer),
        }
    }
}

impl ServerCertVerifier for SpiffeServerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_tls(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<TlsScheme> {
        self.inner.schemes()
    }
}

/// Whether a server asks for and requires a client SVID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client must present an authorized SVID (agent API, admin over TCP).
    Required,
    /// A client may connect without a certificate; one it does present must verify and be
    /// authorized, or the handshake fails.
    Optional,
    /// No certificate is requested (SPIFFE bundle endpoints, which must not ask for one).
    NotRequested,
}

/// A server's check of its clients.
#[derive(Debug, Clone)]
pub struct SpiffeClientCertVerifier {
    inner: SvidVerifier,
    mode: ClientAuth,
}

impl SpiffeClientCertVerifier {
    pub fn new(bundles: Arc<dyn BundleSource>, authorizer: Authorizer, mode: ClientAuth) -> Self {
        Self {
            inner: SvidVerifier::new(bundles, authorizer),
            mode,
        }
    }
}

impl ClientCertVerifier for SpiffeClientCertVerifier {
    fn offer_client_auth(&self) -> bool {
        self.mode != ClientAuth::NotRequested
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mode == ClientAuth::Required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client sends its one SVID whatever the server's authorities are called.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_tls(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<TlsScheme> {
        self.inner.schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// Signing through plinth's Signer

/// A rustls signing key over a plinth [`Signer`], so the key may live anywhere the trait reaches.
#[derive(Debug, Clone)]
pub struct SignerSigningKey {
    signer: Arc<dyn Signer>,
}

impl SignerSigningKey {
    pub fn new(signer: Arc<dyn Signer>) -> Self {
        Self { signer }
    }
}

/// TLS schemes a key type can sign with, best first. TLS 1.3 binds ECDSA schemes to a curve, and
/// allows only PSS for RSA; PKCS#1 is kept last for TLS 1.2 peers.
fn schemes_for(kt: KeyType) -> &'static [(TlsScheme, SignatureScheme)] {
    match kt {
        KeyType::EcP256 => &[(
            TlsScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::EcdsaP256Sha256,
        )],
        KeyType::EcP384 => &[(
            TlsScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::EcdsaP384Sha384,
        )],
        KeyType::Rsa2048 | KeyType::Rsa4096 => &[
            (TlsScheme::RSA_PSS_SHA256, SignatureScheme::RsaPssSha256),
            (TlsScheme::RSA_PSS_SHA384, SignatureScheme::RsaPssSha384),
            (TlsScheme::RSA_PSS_SHA512, SignatureScheme::RsaPssSha512),
            (TlsScheme::RSA_PKCS1_SHA256, SignatureScheme::RsaPkcs1Sha256),
            (TlsScheme::RSA_PKCS1_SHA384, SignatureScheme::RsaPkcs1Sha384),
            (TlsScheme::RSA_PKCS1_SHA512, SignatureScheme::RsaPkcs1Sha512),
        ],
    }
}

impl rustls::sign::SigningKey for SignerSigningKey {
    fn choose_scheme(&self, offered: &[TlsScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        schemes_for(self.signer.key_type())
            .iter()
            .find(|(tls, _)| offered.contains(tls))
            .map(|&(tls, own)| {
                Box::new(SchemeSigner {
                    signer: self.signer.clone(),
                    tls,
                    own,
                }) as Box<dyn rustls::sign::Signer>
            })
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.signer.public_key_spki()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        if self.signer.key_type().is_rsa() {
            SignatureAlgorithm::RSA
        } else {
            SignatureAlgorithm::ECDSA
        }
    }
}

#[derive(Debug)]
struct SchemeSigner {
    signer: Arc<dyn Signer>,
    tls: TlsScheme,
    own: SignatureScheme,
}

impl rustls::sign::Signer for SchemeSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        // plinth's Signer returns ECDSA in ASN.1 DER, which is what TLS carries.
        self.signer
            .sign(self.own, message)
            .map_err(|e| rustls::Error::General(format!("TLS handshake signature failed: {e}")))
    }

    fn scheme(&self) -> TlsScheme {
        self.tls
    }
}

/// Pairs an SVID chain with the signer of its leaf key, checking that they belong together.
pub fn certified_key(svid: &X509Svid, signer: Arc<dyn Signer>) -> Result<CertifiedKey, TlsError> {
    let leaf = svid.chain.first().ok_or(TlsError::EmptySvid)?;
    let leaf_key = PublicKeyInfo::from_spki(&crate::x509::cert_public_key_spki(leaf)?)?;
    let signer_key = PublicKeyInfo::from_spki(signer.public_key_spki())?;
    if leaf_key.raw != signer_key.raw {
        return Err(TlsError::KeyMismatch);
    }
    let chain = svid
        .chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    Ok(CertifiedKey::new(
        chain,
        Arc::new(SignerSigningKey::new(signer)),
    ))
}

// ---------------------------------------------------------------------------------------------
// The local SVID

/// Where a TLS endpoint finds the SVID to present; called on every handshake.
pub trait SvidSource: Send + Sync + fmt::Debug {
    /// The SVID to present now, or `None` if there is none yet.
    fn current_svid(&self) -> Option<Arc<CertifiedKey>>;
}

#[derive(Clone)]
struct CurrentSvid {
    spiffe_id: SpiffeId,
    not_after: OffsetDateTime,
    key: Arc<CertifiedKey>,
}

/// An [`SvidSource`] that SVID rotation updates with [`SvidHolder::set`].
#[derive(Default)]
pub struct SvidHolder {
    current: RwLock<Option<CurrentSvid>>,
}

impl fmt::Debug for SvidHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = read(&self.current);
        f.debug_struct("SvidHolder")
            .field("spiffe_id", &current.as_ref().map(|c| &c.spiffe_id))
            .field("not_after", &current.as_ref().map(|c| c.not_after))
            .finish()
    }
}

impl SvidHolder {
    /// A holder with no SVID yet.
    pub fn empty() -> Self {
        Self::default()
    }

    /// A holder presenting `svid`, signed for by `signer`.
    pub fn new(svid: &X509Svid, signer: Arc<dyn Signer>) -> Result<Self, TlsError> {
        let holder = Self::empty();
        holder.set(svid, signer)?;
        Ok(holder)
    }

    /// Replaces the SVID; handshakes from now on present the new one. On error the old one stays.
    pub fn set(&self, svid: &X509Svid, signer: Arc<dyn Signer>) -> Result<(), TlsError> {
        let key = Arc::new(certified_key(svid, signer)?);
        write(
            &self.current,
            Some(CurrentSvid {
                spiffe_id: svid.spiffe_id.clone(),
                not_after: svid.not_after,
                key,
            }),
        );
        Ok(())
    }

    /// Removes the SVID; servers then fail handshakes and clients connect without one.
    pub fn clear(&self) {
        write(&self.current, None);
    }

    /// The SPIFFE ID currently presented.
    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        read(&self.current).map(|c| c.spiffe_id)
    }
}

impl SvidSource for SvidHolder {
    fn current_svid(&self) -> Option<Arc<CertifiedKey>> {
        read(&self.current).map(|c| c.key)
    }
}

/// Serves the current SVID of an [`SvidSource`] as a server's or a client's certificate.
#[derive(Debug, Clone)]
pub struct SvidResolver {
    source: Arc<dyn SvidSource>,
}

impl SvidResolver {
    pub fn new(source: Arc<dyn SvidSource>) -> Self {
        Self { source }
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.source.current_svid()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[TlsScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // Offering a certificate the server cannot check the signature of only fails later.
        self.source
            .current_svid()
            .filter(|k| k.key.choose_scheme(sigschemes).is_some())
    }

    fn has_certs(&self) -> bool {
        self.source.current_svid().is_some()
    }
}

// ---------------------------------------------------------------------------------------------
// Config builders

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring_provider::default_provider())
}

/// A server config that presents the current SVID of `svid`, checks clients per `client_auth`
/// against `bundles` and `authorizer`, offers ALPN `h2` and never resumes sessions.
///
/// For a SPIFFE bundle endpoint use [`ClientAuth::NotRequested`] and set `alpn_protocols` to
/// what the HTTP server speaks.
pub fn server_config(
    svid: Arc<dyn SvidSource>,
    bundles: Arc<dyn BundleSource>,
    authorizer: Authorizer,
    client_auth: ClientAuth,
) -> Result<ServerConfig, TlsError> {
    let verifier = SpiffeClientCertVerifier::new(bundles, authorizer, client_auth);
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(SvidResolver::new(svid)));
    // Attack 7: no stateful session cache (TLS 1.2 IDs, TLS 1.3 tickets) and no stateless
    // tickets (rustls's default ticketer never produces any); every handshake is a full one.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A client config that checks the server's SVID against `bundles` and `authorizer`, presents
/// the current SVID of `svid` if given and asked for, offers ALPN `h2` and never resumes
/// sessions. The server name a connection is opened with is not checked; any valid one works.
pub fn client_config(
    svid: Option<Arc<dyn SvidSource>>,
    bundles: Arc<dyn BundleSource>,
    authorizer: Authorizer,
) -> Result<ClientConfig, TlsError> {
    let verifier = SpiffeServerCertVerifier::new(bundles, authorizer);
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match svid {
        Some(source) => builder.with_client_cert_resolver(Arc::new(SvidResolver::new(source))),
        None => builder.with_no_client_auth(),
    };
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

// ---------------------------------------------------------------------------------------------
// Peer identity

/// The SPIFFE ID of a peer certificate chain (leaf first). Reads the URI SAN only: call it on
/// chains a verifier of this module accepted.
pub fn spiffe_id_from_certs(certs: &[CertificateDer<'_>]) -> Result<SpiffeId, TlsError> {
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    Ok(crate::x509::spiffe_id_of(leaf)?)
}

/// The SPIFFE ID the peer of a connection authenticated with, after its handshake. Works on a
/// `rustls::ServerConnection` or `ClientConnection` (both dereference to [`CommonState`]).
pub fn peer_spiffe_id(conn: &CommonState) -> Result<SpiffeId, TlsError> {
    spiffe_id_from_certs(conn.peer_certificates().unwrap_or_default())
}
