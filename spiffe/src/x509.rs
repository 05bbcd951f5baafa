//! X509-SVIDs and signing certificates: build them per the X509-SVID standard and verify a chain
//! against the bundle of the SVID's own trust domain.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber, SigningKey,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::id::{IdError, SpiffeId, TrustDomain};
use crate::key::{der_tlv, KeyError, KeyType, PublicKeyInfo, Signer};

/// SPIRE backdates NotBefore by this much to absorb clock skew between hosts.
pub const BACKDATE: Duration = Duration::from_secs(10);
/// Longest chain (leaf, intermediates) a verifier walks before giving up.
pub const MAX_CHAIN_LEN: usize = 8;
/// Largest certificate accepted for parsing, in bytes.
pub const MAX_CERT_LEN: usize = 64 * 1024;

/// Why an X.509 certificate could not be built or does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X509Error {
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("certificate {index} of the chain is not valid DER X.509: {reason}")]
    Parse { index: usize, reason: String },
    #[error("certificate {index} is {len} bytes; at most {MAX_CERT_LEN} are allowed")]
    TooLarge { index: usize, len: usize },
    #[error("chain has {0} certificates; at most {MAX_CHAIN_LEN} are allowed")]
    ChainTooLong(usize),
    #[error("leaf certificate has no URI SAN; an X509-SVID has exactly one")]
    NoUriSan,
    #[error("leaf certificate has {0} URI SANs; an X509-SVID has exactly one")]
    MultipleUriSans(usize),
    #[error("leaf URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(IdError),
    #[error("leaf certificate has cA=true; an X509-SVID leaf must not be a CA")]
    LeafIsCa,
    #[error("leaf certificate has keyCertSign; an X509-SVID leaf must not")]
    LeafKeyCertSign,
    #[error("leaf certificate has cRLSign; an X509-SVID leaf must not")]
    LeafCrlSign,
    #[error("leaf certificate has no keyUsage extension")]
    MissingKeyUsage,
    #[error("leaf certificate keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("certificate {index} has malformed extensions: {reason}")]
    BadExtensions { index: usize, reason: String },
    #[error("certificate {index} expired at {not_after}")]
    Expired { index: usize, not_after: String },
    #[error("certificate {index} is not valid before {not_before}")]
    NotYetValid { index: usize, not_before: String },
    #[error("certificate {index} is used as a signing certificate but is not a CA")]
    NotACa { index: usize },
    #[error("certificate {index} signs others but its keyUsage lacks keyCertSign")]
    CaWithoutKeyCertSign { index: usize },
    #[error("certificate {index} uses signature algorithm {oid}, which is not accepted")]
    UnsupportedSignatureAlgorithm { index: usize, oid: String },
    #[error("no X.509 authorities are known for trust domain {0}")]
    NoBundle(String),
    #[error("no chain from the leaf to an X.509 authority of trust domain {0}")]
    NoPathToAuthority(String),
    #[error("trust anchor for trust domain {td} expired at {not_after}")]
    AnchorExpired { td: String, not_after: String },
    #[error("CSR is invalid: {0}")]
    BadCsr(String),
    #[error("the CA certificate's public key does not match the signing key")]
    KeyMismatch,
    #[error("the private key does not match the SVID's public key")]
    LeafKeyMismatch,
    #[error("CA certificate is not usable: {0}")]
    BadCa(String),
    #[error("the signing authority expired at {0}")]
    AuthorityExpired(String),
    #[error("TTL must be positive")]
    ZeroTtl,
    #[error("DNS name {0:?} is not valid")]
    BadDnsName(String),
    #[error("key error: {0}")]
    Key(#[from] KeyError),
    #[error("certificate encoding failed: {0}")]
    Build(String),
}

fn rcgen_alg(kt: KeyType) -> &'static rcgen::SignatureAlgorithm {
    match kt {
        KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        KeyType::Rsa2048 | KeyType::Rsa4096 => &rcgen::PKCS_RSA_SHA256,
    }
}

/// A public key in the form rcgen encodes.
#[derive(Debug, Clone)]
struct KeyData {
    raw: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl KeyData {
    fn from_spki(spki: &[u8]) -> Result<Self, X509Error> {
        let info = PublicKeyInfo::from_spki(spki)?;
        Ok(Self {
            alg: rcgen_alg(info.key_type),
            raw: info.raw,
        })
    }
}

impl PublicKeyData for KeyData {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

/// Adapts a [`Signer`] to rcgen's signing trait.
#[derive(Debug, Clone)]
struct SignerKey {
    signer: Arc<dyn Signer>,
    data: KeyData,
}

impl SignerKey {
    fn new(signer: Arc<dyn Signer>) -> Result<Self, X509Error> {
        let data = KeyData::from_spki(signer.public_key_spki())?;
        Ok(Self { signer, data })
    }
}

impl PublicKeyData for SignerKey {
    fn der_bytes(&self) -> &[u8] {
        &self.data.raw
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.data.alg
    }
}

impl SigningKey for SignerKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.signer
            .sign(self.signer.key_type().x509_scheme(), msg)
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

fn random_serial_bytes() -> Result<[u8; 16], X509Error> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| X509Error::Build("random generator failed".into()))?;
    // Positive, and no leading zero octet so the DER INTEGER is exactly 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(bytes)
}

fn random_serial() -> Result<SerialNumber, X509Error> {
    Ok(SerialNumber::from_slice(&random_serial_bytes()?))
}

/// The parts of an X509-SVID leaf that are the same for every leaf a CA signs, encoded once.
///
/// Leaves are the hot path of a CA (every workload, every rotation), so they are encoded here
/// by hand from this template rather than through a general certificate builder; signing CAs,
/// which are rare, still go through rcgen. Tests check the output with x509-parser and openssl.
#[derive(Debug, Clone)]
struct LeafTemplate {
    /// `[0] EXPLICIT INTEGER 2` (version 3).
    version: Vec<u8>,
    /// AlgorithmIdentifier of the CA's signature scheme.
    sig_alg: Vec<u8>,
    /// The issuer Name: the CA certificate's subject, byte for byte.
    issuer: Vec<u8>,
    /// `C=US, O=SPIRE` as RDNs (the subject, before an optional CN).
    subject_rdns: Vec<u8>,
    /// Extensions that never change: keyUsage, extKeyUsage, basicConstraints, AKI.
    fixed_extensions: Vec<u8>,
}

const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

fn extension(oid: &[u8], critical: bool, value: &[u8]) -> Vec<u8> {
    let mut c = der_tlv(0x06, oid);
    if critical {
        c.extend([0x01, 0x01, 0xff]);
    }
    c.extend(der_tlv(0x04, value));
    der_tlv(0x30, &c)
}

fn rdn(oid: &[u8], string_tag: u8, value: &[u8]) -> Vec<u8> {
    let mut atv = der_tlv(0x06, oid);
    atv.extend(der_tlv(string_tag, value));
    der_tlv(0x31, &der_tlv(0x30, &atv))
}

/// UTCTime through 2049, GeneralizedTime after (RFC 5280 4.1.2.5).
fn der_time(t: OffsetDateTime) -> Vec<u8> {
    let t = t.to_offset(time::UtcOffset::UTC);
    let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
    let (h, mi, s) = (t.hour(), t.minute(), t.second());
    if (1950..2050).contains(&y) {
        let text = format!("{:02}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z", y % 100);
        der_tlv(0x17, text.as_bytes())
    } else {
        let text = format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z");
        der_tlv(0x18, text.as_bytes())
    }
}

impl LeafTemplate {
    fn new(ca: &X509Certificate<'_>, key_type: KeyType) -> Result<Self, X509Error> {
        let sig_alg = match key_type {
            KeyType::EcP256 => der_tlv(
                0x30,
                &der_tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]),
            ),
            KeyType::EcP384 => der_tlv(
                0x30,
                &der_tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03]),
            ),
            KeyType::Rsa2048 | KeyType::Rsa4096 => {
                let mut c = der_tlv(
                    0x06,
                    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b],
                );
                c.extend([0x05, 0x00]);
                der_tlv(0x30, &c)
            }
        };
        let mut subject_rdns = rdn(&[0x55, 0x04, 0x06], 0x13, b"US");
        subject_rdns.extend(rdn(&[0x55, 0x04, 0x0a], 0x0c, b"SPIRE"));

        // keyUsage: digitalSignature, keyEncipherment, keyAgreement (critical).
        let mut ext = extension(&[0x55, 0x1d, 0x0f], true, &[0x03, 0x02, 0x03, 0xa8]);
        // extKeyUsage: serverAuth, clientAuth.
        let mut eku = der_tlv(0x06, &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01]);
        eku.extend(der_tlv(
            0x06,
            &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02],
        ));
        ext.extend(extension(&[0x55, 0x1d, 0x25], false, &der_tlv(0x30, &eku)));
        // basicConstraints: cA=false (critical, empty sequence).
        ext.extend(extension(&[0x55, 0x1d, 0x13], true, &[0x30, 0x00]));
        // authorityKeyIdentifier from the CA's subjectKeyIdentifier, when it has one.
        let ski = ca
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0),
                _ => None,
            });
        if let Some(ski) = ski {
            let aki = der_tlv(0x30, &der_tlv(0x80, ski));
            ext.extend(extension(&[0x55, 0x1d, 0x23], false, &aki));
        }
        Ok(Self {
            version: vec![0xa0, 0x03, 0x02, 0x01, 0x02],
            sig_alg,
            issuer: ca.subject().as_raw().to_vec(),
            subject_rdns,
            fixed_extensions: ext,
        })
    }

    fn tbs(
        &self,
        serial: &[u8; 16],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        spki: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
    ) -> Vec<u8> {
        let mut body = Vec::with_capacity(512);
        body.extend_from_slice(&self.version);
        body.extend(der_tlv(0x02, serial));
        body.extend_from_slice(&self.sig_alg);
        body.extend_from_slice(&self.issuer);
        let mut validity = der_time(not_before);
        validity.extend(der_time(not_after));
        body.extend(der_tlv(0x30, &validity));
        let mut subject = self.subject_rdns.clone();
        if let Some(cn) = dns_names.first() {
            subject.extend(rdn(&[0x55, 0x04, 0x03], 0x0c, cn.as_bytes()));
        }
        body.extend(der_tlv(0x30, &subject));
        body.extend_from_slice(spki);
        let mut names = der_tlv(0x86, id.as_str().as_bytes());
        for dns in dns_names {
            names.extend(der_tlv(0x82, dns.as_bytes()));
        }
        let mut exts = extension(OID_SAN, false, &der_tlv(0x30, &names));
        exts.extend_from_slice(&self.fixed_extensions);
        body.extend(der_tlv(0xa3, &der_tlv(0x30, &exts)));
        der_tlv(0x30, &body)
    }
}

fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

fn asn1_time(t: &x509_parser::time::ASN1Time) -> OffsetDateTime {
    t.to_datetime()
}

fn to_offset(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// Parameters of a signing (CA) certificate.
#[derive(Debug, Clone)]
pub struct CaTemplate {
    /// The trust domain; its ID becomes the certificate's URI SAN.
    pub trust_domain: TrustDomain,
    /// Subject organization (SPIRE's default ca_subject is `O=SPIFFE, C=US`).
    pub organization: String,
    /// Subject country.
    pub country: String,
    /// Optional subject common name.
    pub common_name: Option<String>,
    /// Start of validity (SPIRE backdates by [`BACKDATE`]).
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl CaTemplate {
    /// A template valid from `now - BACKDATE` for `ttl`.
    pub fn new(trust_domain: TrustDomain, now: OffsetDateTime, ttl: Duration) -> Self {
        Self {
            trust_domain,
            organization: "SPIFFE".into(),
            country: "US".into(),
            common_name: None,
            not_before: now - to_offset(BACKDATE),
            not_after: now + to_offset(ttl),
        }
    }

    fn params(&self) -> Result<CertificateParams, X509Error> {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        // RFC 5280 wants countryName as a PrintableString.
        let country = rcgen::string::PrintableString::try_from(self.country.as_str())
            .map_err(|_| X509Error::Build(format!("bad country {:?}", self.country)))?;
        p.distinguished_name.push(
            DnType::CountryName,
            rcgen::DnValue::PrintableString(country),
        );
        p.distinguished_name
            .push(DnType::OrganizationName, &self.organization);
        if let Some(cn) = &self.common_name {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        p.subject_alt_names = vec![SanType::URI(
            self.trust_domain
                .id_string()
                .try_into()
                .map_err(|e: rcgen::Error| X509Error::Build(e.to_string()))?,
        )];
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = self.not_before;
        p.not_after = self.not_after;
        p.serial_number = Some(random_serial()?);
        p.use_authority_key_identifier_extension = true;
        Ok(p)
    }
}

/// Builds a self-signed root CA certificate for `signer`'s key.
pub fn self_signed_ca(
    template: &CaTemplate,
    signer: Arc<dyn Signer>,
) -> Result<Vec<u8>, X509Error> {
    if template.not_after <= template.not_before {
        return Err(X509Error::ZeroTtl);
    }
    let key = SignerKey::new(signer)?;
    let mut params = template.params()?;
    params.use_authority_key_identifier_extension = false;
    let cert = params
        .self_signed(&key)
        .map_err(|e| X509Error::Build(e.to_string()))?;
    Ok(cert.der().to_vec())
}

/// Earliest notAfter over a list of DER certificates.
fn earliest_not_after<D: AsRef<[u8]>>(certs: &[D]) -> Result<OffsetDateTime, X509Error> {
    let mut min: Option<OffsetDateTime> = None;
    for (index, der) in certs.iter().enumerate() {
        let cert = parse_cert(der.as_ref(), index)?;
        let na = asn1_time(&cert.validity().not_after);
        min = Some(min.map_or(na, |m| m.min(na)));
    }
    min.ok_or(X509Error::EmptyChain)
}

/// A CA that signs X509-SVIDs and intermediate CAs: its certificate, the chain up to (not
/// including) the root, and the [`Signer`] holding its private key.
pub struct X509Authority {
    cert: Vec<u8>,
    /// What follows a leaf in an SVID chain: empty for a self-signed root, else this CA and its
    /// upstream intermediates.
    chain_after_leaf: Vec<Vec<u8>>,
    not_after: OffsetDateTime,
    trust_domain: TrustDomain,
    issuer: Issuer<'static, SignerKey>,
    key_type: KeyType,
    /// Pre-encoded parts of every leaf this CA signs (see [`LeafTemplate`]).
    leaf: LeafTemplate,
}

impl std::fmt::Debug for X509Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Authority")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl X509Authority {
    /// Wraps a CA certificate (DER) and its signing key. `upstream_chain` holds the intermediates
    /// between this CA and its root, excluding the root; empty for a self-signed CA.
    pub fn new(
        cert: Vec<u8>,
        upstream_chain: Vec<Vec<u8>>,
        signer: Arc<dyn Signer>,
    ) -> Result<Self, X509Error> {
        let parsed = parse_cert(&cert, 0)?;
        let cert_key = PublicKeyInfo::from_parsed(parsed.public_key())?;
        let signer_key = PublicKeyInfo::from_spki(signer.public_key_spki())?;
        if cert_key.raw != signer_key.raw {
            return Err(X509Error::KeyMismatch);
        }
        if !parsed.is_ca() {
            return Err(X509Error::NotACa { index: 0 });
        }
        let uri = uri_sans(&parsed, 0)?;
        let trust_domain = match uri.as_slice() {
            [one] => TrustDomain::new(one).map_err(X509Error::BadSpiffeId)?,
            _ => {
                return Err(X509Error::BadCa(
                    "a signing certificate carries exactly one URI SAN, its trust domain ID".into(),
                ))
            }
        };
        let self_signed = parsed.subject().as_raw() == parsed.issuer().as_raw()
            && parsed.verify_signature(None).is_ok();
        let mut chain_after_leaf = Vec::new();
        if !self_signed {
            chain_after_leaf.push(cert.clone());
            chain_after_leaf.extend(upstream_chain);
        }
        let mut all = vec![cert.clone()];
        all.extend(chain_after_leaf.iter().skip(1).cloned());
        let not_after = earliest_not_after(&all)?;
        let key_type = signer.key_type();
        let leaf = LeafTemplate::new(&parsed, key_type)?;
        let issuer = Issuer::from_ca_cert_der(&cert.as_slice().into(), SignerKey::new(signer)?)
            .map_err(|e| X509Error::BadCa(e.to_string()))?;
        Ok(Self {
            cert,
            chain_after_leaf,
            not_after,
            trust_domain,
            issuer,
            key_type,
            leaf,
        })
    }

    /// This CA's certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert
    }

    /// Certificates that follow a leaf signed by this CA.
    pub fn chain_after_leaf(&self) -> &[Vec<u8>] {
        &self.chain_after_leaf
    }

    /// The earliest expiry along this CA's chain; nothing it signs outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The trust domain named in this CA's URI SAN.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA key's type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn validity(
        &self,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<(OffsetDateTime, OffsetDateTime), X509Error> {
        if ttl.is_zero() {
            return Err(X509Error::ZeroTtl);
        }
        if now >= self.not_after {
            return Err(X509Error::AuthorityExpired(fmt_time(self.not_after)));
        }
        let not_after = (now + to_offset(ttl)).min(self.not_after);
        Ok((now - to_offset(BACKDATE), not_after))
    }

    /// Signs an X509-SVID for `req.spiffe_id` over `req.public_key_spki`.
    pub fn sign_svid(
        &self,
        req: &SvidRequest<'_>,
        now: OffsetDateTime,
    ) -> Result<X509Svid, X509Error> {
        if req.spiffe_id.is_root() {
            return Err(X509Error::BadSpiffeId(IdError::RootIdNotAllowed {
                id: req.spiffe_id.to_string(),
            }));
        }
        if !req.spiffe_id.is_member_of(&self.trust_domain) {
            return Err(X509Error::BadSpiffeId(IdError::WrongTrustDomain {
                id: req.spiffe_id.to_string(),
                trust_domain: self.trust_domain.to_string(),
            }));
        }
        let subject = PublicKeyInfo::from_spki(req.public_key_spki)?;
        for name in req.dns_names {
            if !valid_dns_name(name) {
                return Err(X509Error::BadDnsName(name.clone()));
            }
        }
        let (not_before, not_after) = self.validity(now, req.ttl)?;
        let serial = random_serial_bytes()?;
        let tbs = self.leaf.tbs(
            &serial,
            not_before,
            not_after,
            &subject.spki,
            req.spiffe_id,
            req.dns_names,
        );
        let sig = self
            .issuer
            .key()
            .signer
            .sign(self.key_type.x509_scheme(), &tbs)?;
        let mut body = tbs;
        body.extend_from_slice(&self.leaf.sig_alg);
        let mut bits = Vec::with_capacity(sig.len() + 1);
        bits.push(0);
        bits.extend_from_slice(&sig);
        body.extend(der_tlv(0x03, &bits));
        let cert = der_tlv(0x30, &body);
        let mut chain = Vec::with_capacity(1 + self.chain_after_leaf.len());
        chain.push(cert);
        chain.extend(self.chain_after_leaf.iter().cloned());
        Ok(X509Svid {
            spiffe_id: req.spiffe_id.clone(),
            chain,
            not_after,
        })
    }

    /// Signs an intermediate CA certificate for `template.trust_domain` over `public_key_spki`
    /// (used for upstream-signed and downstream CAs). `not_after` is clamped to this CA's.
    pub fn sign_ca(
        &self,
        template: &CaTemplate,
        public_key_spki: &[u8],
        now: OffsetDateTime,
    ) -> Result<Vec<u8>, X509Error> {
        if now >= self.not_after {
            return Err(X509Error::AuthorityExpired(fmt_time(self.not_after)));
        }
        let subject = KeyData::from_spki(public_key_spki)?;
        let mut t = template.clone();
        t.not_after = t.not_after.min(self.not_after);
        if t.not_after <= t.not_before {
            return Err(X509Error::ZeroTtl);
        }
        let params = t.params()?;
        let cert = params
            .signed_by(&subject, &self.issuer)
            .map_err(|e| X509Error::Build(e.to_string()))?;
        Ok(cert.der().to_vec())
    }
}

/// True for a DNS name an X509-SVID may carry: LDH labels of 1-63 bytes, at most 253 bytes in
/// all, a wildcard only as the whole first label.
pub fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').enumerate().all(|(i, label)| {
            (label == "*" && i == 0)
                || (!label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        })
}

/// What to put in an X509-SVID. The SPIFFE ID comes from a registration entry, never a CSR.
#[derive(Debug, Clone)]
pub struct SvidRequest<'a> {
    pub spiffe_id: &'a SpiffeId,
    /// The subject public key, a DER SubjectPublicKeyInfo (from [`Csr::public_key_spki`]).
    pub public_key_spki: &'a [u8],
    pub ttl: Duration,
    pub dns_names: &'a [String],
}

/// An X509-SVID certificate chain, leaf first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Svid {
    pub spiffe_id: SpiffeId,
    pub chain: Vec<Vec<u8>>,
    pub not_after: OffsetDateTime,
}

impl X509Svid {
    /// An SVID chain (leaf first) held with the private key whose public part is
    /// `public_key_spki`: reads the leaf's SPIFFE ID and expiry after checking that the leaf
    /// certifies that key. The chain is not verified against a bundle here.
    pub fn from_chain_for_key(
        chain: Vec<Vec<u8>>,
        public_key_spki: &[u8],
    ) -> Result<Self, X509Error> {
        let leaf = chain.first().ok_or(X509Error::EmptyChain)?;
        let spiffe_id = spiffe_id_of(leaf)?;
        let not_after = cert_not_after(leaf)?;
        if cert_public_key_spki(leaf)? != public_key_spki {
            return Err(X509Error::LeafKeyMismatch);
        }
        Ok(Self {
            spiffe_id,
            chain,
            not_after,
        })
    }

    /// The leaf certificate (DER).
    pub fn leaf(&self) -> &[u8] {
        &self.chain[0]
    }

    /// The chain as concatenated DER (the Workload API's `x509_svid` field).
    pub fn chain_der_concat(&self) -> Vec<u8> {
        self.chain.concat()
    }

    /// The chain as PEM.
    pub fn chain_pem(&self) -> String {
        crate::pem::encode_certs(&self.chain)
    }
}

/// A PKCS#10 certificate signing request whose self-signature has been checked. Only its public
/// key is used; names in it are ignored (SPIRE CVE-2021-27098).
#[derive(Debug, Clone)]
pub struct Csr {
    spki: Vec<u8>,
}

impl Csr {
    /// Parses a DER CSR and checks its proof of possession.
    pub fn parse(der: &[u8]) -> Result<Self, X509Error> {
        if der.len() > MAX_CERT_LEN {
            return Err(X509Error::BadCsr(format!(
                "{} bytes is too large",
                der.len()
            )));
        }
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| X509Error::BadCsr(e.to_string()))?;
        if !rest.is_empty() {
            return Err(X509Error::BadCsr("trailing bytes after the CSR".into()));
        }
        csr.verify_signature()
            .map_err(|e| X509Error::BadCsr(format!("signature does not verify: {e}")))?;
        let info = PublicKeyInfo::from_parsed(&csr.certification_request_info.subject_pki)?;
        Ok(Self { spki: info.spki })
    }

    /// Builds a CSR (DER) for `signer`'s key. Used by agents; the CSR names nobody.
    pub fn create(signer: Arc<dyn Signer>) -> Result<Vec<u8>, X509Error> {
        let key = SignerKey::new(signer)?;
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        let csr = p
            .serialize_request(&key)
            .map_err(|e| X509Error::Build(e.to_string()))?;
        Ok(csr.der().to_vec())
    }

    /// The requested public key as DER SubjectPublicKeyInfo.
    pub fn public_key_spki(&self) -> &[u8] {
        &self.spki
    }
}

fn parse_cert(der: &[u8], index: usize) -> Result<X509Certificate<'_>, X509Error> {
    if der.len() > MAX_CERT_LEN {
        return Err(X509Error::TooLarge {
            index,
            len: der.len(),
        });
    }
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| X509Error::Parse {
        index,
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(X509Error::Parse {
            index,
            reason: "trailing bytes after the certificate".into(),
        });
    }
    Ok(cert)
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>, index: usize) -> Result<Vec<&'a str>, X509Error> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| X509Error::BadExtensions {
            index,
            reason: e.to_string(),
        })?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Extracts the SPIFFE ID from an X509-SVID leaf, checking the URI SAN rules only.
pub fn spiffe_id_of(leaf_der: &[u8]) -> Result<SpiffeId, X509Error> {
    let cert = parse_cert(leaf_der, 0)?;
    leaf_id(&cert)
}

fn leaf_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, X509Error> {
    let uris = uri_sans(cert, 0)?;
    match uris.as_slice() {
        [] => Err(X509Error::NoUriSan),
        [one] => SpiffeId::new_with_path(one).map_err(X509Error::BadSpiffeId),
        many => Err(X509Error::MultipleUriSans(many.len())),
    }
}

// Signature algorithms a verifier accepts (no SHA-1, no MD5).
const ALLOWED_SIG_OIDS: &[&[u8]] = &[
    &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02], // ecdsa-with-SHA256
    &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03], // ecdsa-with-SHA384
    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b], // sha256WithRSAEncryption
    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a], // RSASSA-PSS
    &[0x2b, 0x65, 0x70],                               // Ed25519
];

fn check_sig_alg(cert: &X509Certificate<'_>, index: usize) -> Result<(), X509Error> {
    let outer = &cert.signature_algorithm.algorithm;
    let inner = &cert.tbs_certificate.signature.algorithm;
    if outer != inner || !ALLOWED_SIG_OIDS.contains(&outer.as_bytes()) {
        return Err(X509Error::UnsupportedSignatureAlgorithm {
            index,
            oid: outer.to_id_string(),
        });
    }
    Ok(())
}

fn check_validity(
    cert: &X509Certificate<'_>,
    index: usize,
    now: OffsetDateTime,
) -> Result<(), X509Error> {
    let nb = asn1_time(&cert.validity().not_before);
    let na = asn1_time(&cert.validity().not_after);
    if now < nb {
        return Err(X509Error::NotYetValid {
            index,
            not_before: fmt_time(nb),
        });
    }
    if now > na {
        return Err(X509Error::Expired {
            index,
            not_after: fmt_time(na),
        });
    }
    Ok(())
}

fn check_signing_cert(cert: &X509Certificate<'_>, index: usize) -> Result<(), X509Error> {
    let bc = cert
        .basic_constraints()
        .map_err(|e| X509Error::BadExtensions {
            index,
            reason: e.to_string(),
        })?;
    if !bc.is_some_and(|b| b.value.ca) {
        return Err(X509Error::NotACa { index });
    }
    let ku = cert.key_usage().map_err(|e| X509Error::BadExtensions {
        index,
        reason: e.to_string(),
    })?;
    if let Some(ku) = ku {
        if !ku.value.key_cert_sign() {
            return Err(X509Error::CaWithoutKeyCertSign { index });
        }
    }
    Ok(())
}

/// Where a verifier finds the X.509 authorities of a trust domain.
pub trait X509BundleSource {
    /// The X.509 authorities (DER) of `td`, or `None` if `td` is unknown.
    fn x509_authorities(&self, td: &TrustDomain) -> Option<Vec<Vec<u8>>>;
}

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    pub spiffe_id: SpiffeId,
    pub not_after: OffsetDateTime,
    /// Index in the bundle of the authority the chain ends at.
    pub authority_index: usize,
}

/// Verifies an X509-SVID chain (leaf first) at `now` against the authorities of the leaf's own
/// trust domain, applying every validator rule of the X509-SVID standard.
pub fn verify_svid<D: AsRef<[u8]>>(
    chain: &[D],
    bundles: &dyn X509BundleSource,
    now: OffsetDateTime,
) -> Result<VerifiedSvid, X509Error> {
    if chain.is_empty() {
        return Err(X509Error::EmptyChain);
    }
    if chain.len() > MAX_CHAIN_LEN {
        return Err(X509Error::ChainTooLong(chain.len()));
    }
    let certs = chain
        .iter()
        .enumerate()
        .map(|(i, d)| parse_cert(d.as_ref(), i))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = &certs[0];
    let spiffe_id = leaf_id(leaf)?;

    let bc = leaf
        .basic_constraints()
        .map_err(|e| X509Error::BadExtensions {
            index: 0,
            reason: e.to_string(),
        })?;
    if bc.is_some_and(|b| b.value.ca) {
        return Err(X509Error::LeafIsCa);
    }
    let ku = leaf
        .key_usage()
        .map_err(|e| X509Error::BadExtensions {
            index: 0,
            reason: e.to_string(),
        })?
        .ok_or(X509Error::MissingKeyUsage)?;
    if ku.value.key_cert_sign() {
        return Err(X509Error::LeafKeyCertSign);
    }
    if ku.value.crl_sign() {
        return Err(X509Error::LeafCrlSign);
    }
    if !ku.value.digital_signature() {
        return Err(X509Error::NoDigitalSignature);
    }
    for (i, c) in certs.iter().enumerate() {
        check_sig_alg(c, i)?;
        check_validity(c, i, now)?;
    }

    let td = spiffe_id.trust_domain();
    let anchors_der = bundles
        .x509_authorities(&td)
        .ok_or_else(|| X509Error::NoBundle(td.to_string()))?;
    let anchors = anchors_der
        .iter()
        .enumerate()
        .filter_map(|(i, d)| parse_cert(d, i).ok().map(|c| (i, c)))
        .collect::<Vec<_>>();

    let mut current = 0usize;
    let mut used = vec![false; certs.len()];
    used[0] = true;
    for _ in 0..certs.len() {
        let cur = &certs[current];
        for (ai, anchor) in &anchors {
            if anchor.subject().as_raw() == cur.issuer().as_raw()
                && cur.verify_signature(Some(anchor.public_key())).is_ok()
            {
                let na = asn1_time(&anchor.validity().not_after);
                if now > na {
                    return Err(X509Error::AnchorExpired {
                        td: td.to_string(),
                        not_after: fmt_time(na),
                    });
                }
                let not_after = certs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| used[*i])
                    .map(|(_, c)| asn1_time(&c.validity().not_after))
                    .min()
                    .unwrap_or(na)
                    .min(na);
                return Ok(VerifiedSvid {
                    spiffe_id,
                    not_after,
                    authority_index: *ai,
                });
            }
        }
        let next = certs.iter().enumerate().position(|(i, c)| {
            !used[i]
                && c.subject().as_raw() == cur.issuer().as_raw()
                && cur.verify_signature(Some(c.public_key())).is_ok()
        });
        match next {
            Some(i) => {
                check_signing_cert(&certs[i], i)?;
                used[i] = true;
                current = i;
            }
            None => break,
        }
    }
    Err(X509Error::NoPathToAuthority(td.to_string()))
}

/// The public key (DER SPKI) of a certificate.
pub fn cert_public_key_spki(der: &[u8]) -> Result<Vec<u8>, X509Error> {
    let cert = parse_cert(der, 0)?;
    Ok(PublicKeyInfo::from_parsed(cert.public_key())?.spki)
}

/// The notAfter of a certificate.
pub fn cert_not_after(der: &[u8]) -> Result<OffsetDateTime, X509Error> {
    let cert = parse_cert(der, 0)?;
    Ok(asn1_time(&cert.validity().not_after))
}

/// The notBefore and notAfter of a certificate, from one parse.
pub fn cert_validity(der: &[u8]) -> Result<(OffsetDateTime, OffsetDateTime), X509Error> {
    let cert = parse_cert(der, 0)?;
    let v = cert.validity();
    Ok((asn1_time(&v.not_before), asn1_time(&v.not_after)))
}

/// A time as SPIRE's command-line tools print certificate and expiry times (Go's `time.Time`
/// in UTC): `2026-12-04 18:23:13 +0000 UTC`.
pub fn display_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} +0000 UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Splits concatenated DER certificates (the Workload API's chain encoding).
pub fn split_der_concat(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, X509Error> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (_, _, rest) = crate::key::der_read(bytes).ok_or(X509Error::Parse {
            index: out.len(),
            reason: "truncated DER".into(),
        })?;
        let len = bytes.len() - rest.len();
        out.push(bytes[..len].to_vec());
        bytes = rest;
        if out.len() > 1024 {
            return Err(X509Error::ChainTooLong(out.len()));
        }
    }
    Ok(out)
}
