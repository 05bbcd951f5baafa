//! The records of the replicated state: what every server holds, identically, after applying the
//! same Raft log. Only public material lives here; private keys never reach Raft or this crate.
//!
//! Times are Unix seconds stamped by the leader into the command that wrote them, never read from
//! a local clock during apply.

use std::fmt;

use plinth_spiffe::{Bundle, BundleError, JwtAuthority, Selectors, SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

use crate::codec::b64;

/// A registration entry: workloads (or agents) under `parent_id` whose attested selectors include
/// all of `selectors` get `spiffe_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationEntry {
    /// Chosen by the server before proposing (unique; the state machine refuses duplicates).
    pub id: String,
    pub spiffe_id: SpiffeId,
    pub parent_id: SpiffeId,
    pub selectors: Selectors,
    /// X509-SVID TTL in seconds; 0 means the server default.
    pub x509_svid_ttl: u32,
    /// JWT-SVID TTL in seconds; 0 means the server default.
    pub jwt_svid_ttl: u32,
    pub federates_with: Vec<TrustDomain>,
    pub admin: bool,
    pub downstream: bool,
    /// Unix seconds after which the entry no longer applies; `None` = never.
    pub expires_at: Option<i64>,
    pub dns_names: Vec<String>,
    pub hint: String,
    /// The global revision of the command that last changed this entry (set by apply).
    pub revision: u64,
    /// Unix seconds, leader-stamped when the entry was created (set by apply).
    pub created_at: i64,
}

impl RegistrationEntry {
    /// An entry mapping `selectors` under `parent_id` to `spiffe_id`, with the server's default
    /// TTLs and nothing else set.
    pub fn new(
        id: impl Into<String>,
        spiffe_id: SpiffeId,
        parent_id: SpiffeId,
        selectors: Selectors,
    ) -> Self {
        Self {
            id: id.into(),
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            federates_with: Vec::new(),
            admin: false,
            downstream: false,
            expires_at: None,
            dns_names: Vec::new(),
            hint: String::new(),
            revision: 0,
            created_at: 0,
        }
    }

    /// True if `other` describes the same mapping (same SPIFFE ID, parent and selectors): two such
    /// entries must not coexist.
    pub fn same_mapping(&self, other: &RegistrationEntry) -> bool {
        self.spiffe_id == other.spiffe_id
            && self.parent_id == other.parent_id
            && self.selectors == other.selectors
    }
}

/// A node agent that passed node attestation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestedAgent {
    pub spiffe_id: SpiffeId,
    /// The node attestor that vouched for it (`join_token`, `x509pop`, `tpm`...).
    pub attestation_type: String,
    pub selectors: Selectors,
    /// Serial number (hex) of the agent's current SVID; empty once banned.
    pub serial_number: String,
    /// Unix seconds at which the current agent SVID expires.
    pub expires_at: i64,
    /// Serial number (hex) of the SVID the last renewal issued, until the agent first uses it
    /// (then it becomes `serial_number`); empty when none is pending. As in SPIRE, both serials
    /// are accepted meanwhile, so an agent that never received its renewed SVID (a lost reply)
    /// is not locked out: it keeps its current SVID and may renew again.
    #[serde(default)]
    pub new_serial_number: String,
    /// Unix seconds at which the pending SVID expires.
    #[serde(default)]
    pub new_expires_at: i64,
    pub banned: bool,
    /// Unix seconds, leader-stamped at first attestation.
    pub created_at: i64,
    /// Unix seconds, leader-stamped at the last change.
    pub updated_at: i64,
}

impl AttestedAgent {
    /// Whether `serial` (hex, any case) is the current SVID's or the pending renewed one's.
    pub fn accepts_serial(&self, serial: &str) -> bool {
        (!self.serial_number.is_empty() && self.serial_number.eq_ignore_ascii_case(serial))
            || (!self.new_serial_number.is_empty()
                && self.new_serial_number.eq_ignore_ascii_case(serial))
    }

    /// Whether `serial` is the pending renewed SVID's (its first use activates it).
    pub fn is_pending_serial(&self, serial: &str) -> bool {
        !self.new_serial_number.is_empty() && self.new_serial_number.eq_ignore_ascii_case(serial)
    }
}

/// A single-use join token. Its `Debug` output hides the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub token: String,
    /// Optional SPIFFE ID the token's agent is aliased to.
    pub spiffe_id: Option<SpiffeId>,
    /// Unix seconds after which the token is refused.
    pub expires_at: i64,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("token", &"<redacted>")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A JWT authority of a stored bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredJwtAuthority {
    pub key_id: String,
    #[serde(with = "b64")]
    pub public_key_spki: Vec<u8>,
}

/// The bundle of one trust domain (the local one or a federated one) with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBundle {
    pub trust_domain: TrustDomain,
    /// DER certificates.
    #[serde(with = "b64::vec")]
    pub x509_authorities: Vec<Vec<u8>>,
    pub jwt_authorities: Vec<StoredJwtAuthority>,
    pub refresh_hint_secs: Option<u64>,
    /// `spiffe_sequence`; the state machine raises it on every content change.
    pub sequence_number: u64,
}

impl StoredBundle {
    /// An empty bundle with sequence 0.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            refresh_hint_secs: None,
            sequence_number: 0,
        }
    }

    /// Copies a validated plinth-spiffe bundle.
    pub fn from_bundle(bundle: &Bundle) -> Self {
        Self {
            trust_domain: bundle.trust_domain().clone(),
            x509_authorities: bundle.x509_authorities().to_vec(),
            jwt_authorities: bundle
                .jwt_authorities()
                .iter()
                .map(|a| StoredJwtAuthority {
                    key_id: a.key_id.clone(),
                    public_key_spki: a.public_key_spki.clone(),
                })
                .collect(),
            refresh_hint_secs: bundle.refresh_hint_secs(),
            sequence_number: bundle.sequence_number(),
        }
    }

    /// Builds (and so validates) the plinth-spiffe bundle.
    pub fn to_bundle(&self) -> Result<Bundle, BundleError> {
        let mut b = Bundle::new(self.trust_domain.clone());
        for der in &self.x509_authorities {
            b.add_x509_authority(der.clone())?;
        }
        for a in &self.jwt_authorities {
            b.add_jwt_authority(JwtAuthority {
                key_id: a.key_id.clone(),
                public_key_spki: a.public_key_spki.clone(),
            })?;
        }
        b.set_refresh_hint_secs(self.refresh_hint_secs);
        b.set_sequence_number(self.sequence_number);
        Ok(b)
    }

    /// True if both hold the same authorities and refresh hint (sequence numbers aside).
    pub fn same_content(&self, other: &StoredBundle) -> bool {
        let jwt = |b: &StoredBundle| -> Vec<(String, Vec<u8>)> {
            b.jwt_authorities
                .iter()
                .map(|j| (j.key_id.clone(), j.public_key_spki.clone()))
                .collect()
        };
        self.trust_domain == other.trust_domain
            && self.refresh_hint_secs == other.refresh_hint_secs
            && plinth_spiffe::bundle::same_authority_sets(
                &self.x509_authorities,
                &other.x509_authorities,
                &jwt(self),
                &jwt(other),
            )
    }

    /// Adds the public part of an authority; returns true if the bundle changed.
    pub fn add_authority(&mut self, public: &AuthorityPublic) -> bool {
        match public {
            AuthorityPublic::X509 { cert_der } => {
                if self.x509_authorities.contains(cert_der) {
                    return false;
                }
                self.x509_authorities.push(cert_der.clone());
                true
            }
            AuthorityPublic::Jwt {
                key_id,
                public_key_spki,
            } => {
                if self.jwt_authorities.iter().any(|a| &a.key_id == key_id) {
                    return false;
                }
                self.jwt_authorities.push(StoredJwtAuthority {
                    key_id: key_id.clone(),
                    public_key_spki: public_key_spki.clone(),
                });
                true
            }
        }
    }

    /// Removes the public part of an authority; returns true if the bundle changed.
    pub fn remove_authority(&mut self, public: &AuthorityPublic) -> bool {
        let before = (self.x509_authorities.len(), self.jwt_authorities.len());
        match public {
            AuthorityPublic::X509 { cert_der } => self.x509_authorities.retain(|c| c != cert_der),
            AuthorityPublic::Jwt { key_id, .. } => {
                self.jwt_authorities.retain(|a| &a.key_id != key_id)
            }
        }
        before != (self.x509_authorities.len(), self.jwt_authorities.len())
    }
}

/// How the bundle endpoint of a federated trust domain authenticates itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "profile", rename_all = "snake_case")]
pub enum BundleEndpointProfile {
    HttpsWeb,
    HttpsSpiffe { endpoint_spiffe_id: SpiffeId },
}

/// A federation relationship with another trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationRelationship {
    pub trust_domain: TrustDomain,
    pub bundle_endpoint_url: String,
    pub profile: BundleEndpointProfile,
}

/// Which kind of signing authority a CA journal record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorityKind {
    X509,
    Jwt,
}

/// The life cycle of an authority (SPIRE's prepare -> activate -> old -> taint -> revoke).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorityStatus {
    Prepared,
    Active,
    Old,
    Tainted,
    Revoked,
}

/// The public half of a signing authority, as published in the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuthorityPublic {
    X509 {
        #[serde(with = "b64")]
        cert_der: Vec<u8>,
    },
    Jwt {
        key_id: String,
        #[serde(with = "b64")]
        public_key_spki: Vec<u8>,
    },
}

impl AuthorityPublic {
    /// The kind of authority.
    pub fn kind(&self) -> AuthorityKind {
        match self {
            AuthorityPublic::X509 { .. } => AuthorityKind::X509,
            AuthorityPublic::Jwt { .. } => AuthorityKind::Jwt,
        }
    }
}

/// One record of the CA journal: an authority of one server node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaAuthority {
    /// Unique ID (SPIRE uses the subject key ID, or the JWT `kid`).
    pub authority_id: String,
    /// The Raft node ID of the server that holds the private key.
    pub node_id: u64,
    /// The A/B slot of that node the key occupies (`"A"` or `"B"`).
    pub slot: String,
    pub public: AuthorityPublic,
    /// Unix seconds.
    pub not_after: i64,
    pub status: AuthorityStatus,
    /// ID of the upstream authority that signed it, if any.
    pub upstream_authority_id: Option<String>,
    /// Unix seconds of the last transition, leader-stamped.
    pub updated_at: i64,
}

impl CaAuthority {
    /// The kind of authority.
    pub fn kind(&self) -> AuthorityKind {
        self.public.kind()
    }
}

/// A secret string (a join token presented by an agent). Its `Debug` output is redacted so a
/// command can be logged without leaking it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself; do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for SecretString {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<String> for SecretString {
    fn from(s: String) -> Self {
        Self(s)
    }
}
