//! The CA manager: this server's X.509 CA and JWT signing key, in A/B slots, rotated on SPIRE's
//! schedule, with every transition journaled through Raft.
//!
//! Invariants kept here:
//! - Private keys stay in the [`KeyManager`]; only public parts are proposed.
//! - A key is committed to the bundle (the `CaPrepare` command) before anything it signs is
//!   handed out: a prepared authority is only ever used after `CaActivate` committed.
//! - After a restart, the authorities are reloaded from the journal and the key manager, so a
//!   crash between prepare and activate leaves exactly one active authority per kind.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use plinth_spiffe::x509::{self, X509Authority, X509Error};
use plinth_spiffe::{
    jwt, CaTemplate, Csr, JwtAlg, JwtError, JwtSvidParams, KeyType, Signer, SpiffeId, SvidRequest,
    TrustDomain, X509Svid,
};
use plinth_storage::{
    AuthorityKind, AuthorityPublic, AuthorityStatus, CaAuthority, Command, Outcome,
    StoredJwtAuthority,
};
use plinth_upstream::{KeyManager, KeyManagerError, UpstreamAuthority, UpstreamError};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::clock::Clock;
use crate::state::{outcome, Replicated, StateError};

/// Never prepare later than this before expiry (SPIRE: min(lifetime/2, 30 days)).
const MAX_PREPARE_LEAD: time::Duration = time::Duration::days(30);
/// Never activate later than this before expiry (SPIRE: min(lifetime/6, 7 days)).
const MAX_ACTIVATE_LEAD: time::Duration = time::Duration::days(7);

/// Why the CA manager failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error("no active {0} authority yet")]
    NoActiveAuthority(&'static str),
    #[error("no prepared {0} authority to activate; prepare one first")]
    NothingPrepared(&'static str),
    #[error("authority {0} is not one of this server's")]
    UnknownAuthority(String),
    #[error("key manager: {0}")]
    KeyManager(#[from] KeyManagerError),
    #[error("upstream authority: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("X.509: {0}")]
    X509(#[from] X509Error),
    #[error("JWT: {0}")]
    Jwt(#[from] JwtError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("unexpected state machine outcome for {0}")]
    Unexpected(&'static str),
}

/// What the CA manager needs from the server configuration.
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub trust_domain: TrustDomain,
    pub ca_ttl: Duration,
    pub ca_key_type: KeyType,
    pub jwt_key_type: KeyType,
    /// Subject organization and country of CA certificates (SPIRE's `ca_subject`).
    pub ca_organization: String,
    pub ca_country: String,
    pub ca_common_name: Option<String>,
    /// `iss` claim of JWT-SVIDs, if configured.
    pub jwt_issuer: Option<String>,
}

#[derive(Debug, Clone)]
struct X509Slot {
    authority_id: String,
    slot: &'static str,
    ca: Arc<X509Authority>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

#[derive(Debug, Clone)]
struct JwtSlot {
    key_id: String,
    slot: &'static str,
    signer: Arc<dyn Signer>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

#[derive(Debug, Default)]
struct Slots {
    x509_active: Option<X509Slot>,
    x509_prepared: Option<X509Slot>,
    jwt_active: Option<JwtSlot>,
    jwt_prepared: Option<JwtSlot>,
}

fn other_slot(slot: Option<&'static str>) -> &'static str {
    match slot {
        Some("A") => "B",
        _ => "A",
    }
}

fn key_id(kind: AuthorityKind, slot: &str) -> String {
    match kind {
        AuthorityKind::X509 => format!("x509-CA-{slot}"),
        AuthorityKind::Jwt => format!("JWT-Signer-{slot}"),
    }
}

fn kind_name(kind: AuthorityKind) -> &'static str {
    match kind {
        AuthorityKind::X509 => "x509",
        AuthorityKind::Jwt => "jwt",
    }
}

fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn from_unix(s: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(s).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// When to prepare the successor of an authority valid over `[not_before, not_after]`.
pub fn prepare_at(not_before: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    let lifetime: time::Duration = not_after - not_before;
    not_after - (lifetime / 2_i32).min(MAX_PREPARE_LEAD)
}

/// When to activate the successor of an authority valid over `[not_before, not_after]`.
pub fn activate_at(not_before: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    let lifetime: time::Duration = not_after - not_before;
    not_after - (lifetime / 6_i32).min(MAX_ACTIVATE_LEAD)
}

/// A summary of one authority of this server, for `localauthority show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthoritySummary {
    pub authority_id: String,
    pub kind: AuthorityKind,
    pub slot: String,
    pub status: AuthorityStatus,
    pub not_after: i64,
}

/// This server's signing authorities.
#[derive(Debug)]
pub struct CaManager<S> {
    cfg: CaConfig,
    state: Arc<S>,
    keys: Arc<dyn KeyManager>,
    upstream: Option<Arc<dyn UpstreamAuthority>>,
    clock: Arc<dyn Clock>,
    slots: RwLock<Slots>,
    // Serialises rotations: one prepare/activate at a time.
    rotate: tokio::sync::Mutex<()>,
}

impl<S: Replicated> CaManager<S> {
    /// A manager with nothing loaded; call [`CaManager::init`].
    pub fn new(
        cfg: CaConfig,
        state: Arc<S>,
        keys: Arc<dyn KeyManager>,
        upstream: Option<Arc<dyn UpstreamAuthority>>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            cfg,
            state,
            keys,
            upstream,
            clock,
            slots: RwLock::new(Slots::default()),
            rotate: tokio::sync::Mutex::new(()),
        }
    }

    fn read_slots(&self) -> std::sync::RwLockReadGuard<'_, Slots> {
        self.slots.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_slots(&self) -> std::sync::RwLockWriteGuard<'_, Slots> {
        self.slots.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Reloads this node's authorities from the journal (after a linearizable barrier) and the
    /// key manager; prepares and activates fresh ones where none is usable.
    pub async fn init(&self) -> Result<(), CaError> {
        let _guard = self.rotate.lock().await;
        self.state.linearizable().await?;
        let node = self.state.node_id();
        let journal: Vec<CaAuthority> = self
            .state
            .store()
            .list_authorities()
            .map_err(|e| StateError::Fatal(e.to_string()))?
            .into_iter()
            .filter(|a| a.node_id == node)
            .collect();
        for a in &journal {
            let usable = matches!(
                a.status,
                AuthorityStatus::Active | AuthorityStatus::Prepared
            ) && from_unix(a.not_after) > self.clock.now();
            if !usable {
                continue;
            }
            match self.load(a) {
                Ok(()) => {}
                Err(e) => {
                    // The key is gone (memory key manager restarted) or does not match: the
                    // authority cannot sign again. Fresh ones are prepared below.
                    tracing::warn!(authority_id = %a.authority_id, error = %e,
                        "journaled authority has no usable key; it will be replaced");
                }
            }
        }
        for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
            if !self.has_active(kind) {
                if !self.has_prepared(kind) {
                    self.prepare_locked(kind).await?;
                }
                self.activate_locked(kind).await?;
            }
        }
        Ok(())
    }

    fn has_active(&self, kind: AuthorityKind) -> bool {
        let s = self.read_slots();
        match kind {
            AuthorityKind::X509 => s.x509_active.is_some(),
            AuthorityKind::Jwt => s.jwt_active.is_some(),
        }
    }

    fn has_prepared(&self, kind: AuthorityKind) -> bool {
        let s = self.read_slots();
        match kind {
            AuthorityKind::X509 => s.x509_prepared.is_some(),
            AuthorityKind::Jwt => s.jwt_prepared.is_some(),
        }
    }

    fn load(&self, a: &CaAuthority) -> Result<(), CaError> {
        let slot: &'static str = if a.slot == "B" { "B" } else { "A" };
        let signer = self
            .keys
            .get_key(&key_id(a.kind(), slot))?
            .ok_or_else(|| CaError::UnknownAuthority(a.authority_id.clone()))?;
        match &a.public {
            AuthorityPublic::X509 { cert_der } => {
                let chain = self.stored_chain(&a.authority_id, cert_der);
                let ca = X509Authority::new(cert_der.clone(), chain, signer)?;
                let not_before = cert_not_before(cert_der).unwrap_or(self.clock.now());
                let s = X509Slot {
                    authority_id: a.authority_id.clone(),
                    slot,
                    ca: Arc::new(ca),
                    not_before,
                    not_after: from_unix(a.not_after),
                };
                let mut slots = self.write_slots();
                if a.status == AuthorityStatus::Active {
                    slots.x509_active = Some(s);
                } else {
                    slots.x509_prepared = Some(s);
                }
            }
            AuthorityPublic::Jwt {
                key_id: kid,
                public_key_spki,
            } => {
                if signer.public_key_spki() != public_key_spki.as_slice() {
                    return Err(CaError::X509(X509Error::KeyMismatch));
                }
                let s = JwtSlot {
                    key_id: kid.clone(),
                    slot,
                    signer,
                    not_before: from_unix(a.updated_at),
                    not_after: from_unix(a.not_after),
                };
                let mut slots = self.write_slots();
                if a.status == AuthorityStatus::Active {
                    slots.jwt_active = Some(s);
                } else {
                    slots.jwt_prepared = Some(s);
                }
            }
        }
        Ok(())
    }

    /// Upstream intermediates of a journaled CA are not replicated (only the CA certificate is);
    /// with an upstream authority, plinth re-derives nothing and signs with the CA alone, so the
    /// chain after the leaf is the CA itself.
    fn stored_chain(&self, _authority_id: &str, _cert: &[u8]) -> Vec<Vec<u8>> {
        Vec::new()
    }

    /// Rotation step: prepares or activates whatever is due at the clock's current time.
    pub async fn rotate(&self) -> Result<(), CaError> {
        let _guard = self.rotate.lock().await;
        let now = self.clock.now();
        for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
            let (active, prepared) = {
                let s = self.read_slots();
                match kind {
                    AuthorityKind::X509 => (
                        s.x509_active.as_ref().map(|a| (a.not_before, a.not_after)),
                        s.x509_prepared.is_some(),
                    ),
                    AuthorityKind::Jwt => (
                        s.jwt_active.as_ref().map(|a| (a.not_before, a.not_after)),
                        s.jwt_prepared.is_some(),
                    ),
                }
            };
            match active {
                None => {
                    if !prepared {
                        self.prepare_locked(kind).await?;
                    }
                    self.activate_locked(kind).await?;
                }
                Some((nb, na)) => {
                    if !prepared && now >= prepare_at(nb, na) {
                        self.prepare_locked(kind).await?;
                    }
                    let prepared = self.has_prepared(kind);
                    if prepared && now >= activate_at(nb, na) {
                        self.activate_locked(kind).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Forced rotation, step 1: prepare a new authority of `kind` now.
    pub async fn prepare(&self, kind: AuthorityKind) -> Result<AuthoritySummary, CaError> {
        let _guard = self.rotate.lock().await;
        self.prepare_locked(kind).await
    }

    /// Forced rotation, step 2: activate the prepared authority of `kind` now.
    pub async fn activate(&self, kind: AuthorityKind) -> Result<AuthoritySummary, CaError> {
        let _guard = self.rotate.lock().await;
        self.activate_locked(kind).await
    }

    /// Forced rotation, step 3: taint an old authority (agents rotate what it signed early).
    pub async fn taint(&self, authority_id: &str) -> Result<AuthoritySummary, CaError> {
        self.transition(
            Command::CaTaint {
                authority_id: authority_id.to_owned(),
            },
            authority_id,
        )
        .await
    }

    /// Forced rotation, step 4: revoke a tainted authority (it leaves the bundle).
    pub async fn revoke(&self, authority_id: &str) -> Result<AuthoritySummary, CaError> {
        self.transition(
            Command::CaRevoke {
                trust_domain: self.cfg.trust_domain.clone(),
                authority_id: authority_id.to_owned(),
            },
            authority_id,
        )
        .await
    }

    async fn transition(
        &self,
        command: Command,
        authority_id: &str,
    ) -> Result<AuthoritySummary, CaError> {
        let node = self.state.node_id();
        let known = self
            .state
            .store()
            .get_authority(authority_id)
            .map_err(|e| StateError::Fatal(e.to_string()))?;
        if known.is_none_or(|a| a.node_id != node) {
            return Err(CaError::UnknownAuthority(authority_id.to_owned()));
        }
        match outcome(self.state.propose(command).await?)? {
            Outcome::Authority { authority } => Ok(summary(&authority)),
            _ => Err(CaError::Unexpected("authority transition")),
        }
    }

    async fn prepare_locked(&self, kind: AuthorityKind) -> Result<AuthoritySummary, CaError> {
        let now = self.clock.now();
        let active_slot = {
            let s = self.read_slots();
            match kind {
                AuthorityKind::X509 => s.x509_active.as_ref().map(|a| a.slot),
                AuthorityKind::Jwt => s.jwt_active.as_ref().map(|a| a.slot),
            }
        };
        let slot = other_slot(active_slot);
        let node = self.state.node_id();
        match kind {
            AuthorityKind::X509 => {
                let signer = self
                    .keys
                    .generate_key(&key_id(kind, slot), self.cfg.ca_key_type)?;
                let (cert, chain, roots) = self.new_ca_cert(signer.clone(), now)?;
                if !roots.is_empty() {
                    // Upstream roots go into the bundle first: they are what SVIDs chain to.
                    self.state
                        .propose(Command::BundleAppend {
                            trust_domain: self.cfg.trust_domain.clone(),
                            x509_authorities: roots,
                            jwt_authorities: Vec::new(),
                        })
                        .await
                        .and_then(outcome)?;
                }
                let ca = X509Authority::new(cert.clone(), chain, signer.clone())?;
                let authority_id = authority_id_of(signer.public_key_spki());
                let record = CaAuthority {
                    authority_id: authority_id.clone(),
                    node_id: node,
                    slot: slot.to_owned(),
                    public: AuthorityPublic::X509 {
                        cert_der: cert.clone(),
                    },
                    not_after: unix(ca.not_after()),
                    status: AuthorityStatus::Prepared,
                    upstream_authority_id: self.upstream.as_ref().map(|u| u.name().to_owned()),
                    updated_at: unix(now),
                };
                let committed = self.commit_prepare(record).await?;
                let not_before = cert_not_before(&cert).unwrap_or(now);
                self.write_slots().x509_prepared = Some(X509Slot {
                    authority_id,
                    slot,
                    not_after: ca.not_after(),
                    ca: Arc::new(ca),
                    not_before,
                });
                tracing::info!(slot, authority_id = %committed.authority_id, "prepared X.509 authority");
                Ok(committed)
            }
            AuthorityKind::Jwt => {
                let signer = self
                    .keys
                    .generate_key(&key_id(kind, slot), self.cfg.jwt_key_type)?;
                let kid = random_kid()?;
                let not_after =
                    now + time::Duration::try_from(self.cfg.ca_ttl).unwrap_or(time::Duration::DAY);
                let record = CaAuthority {
                    authority_id: kid.clone(),
                    node_id: node,
                    slot: slot.to_owned(),
                    public: AuthorityPublic::Jwt {
                        key_id: kid.clone(),
                        public_key_spki: signer.public_key_spki().to_vec(),
                    },
                    not_after: unix(not_after),
                    status: AuthorityStatus::Prepared,
                    upstream_authority_id: None,
                    updated_at: unix(now),
                };
                let committed = self.commit_prepare(record).await?;
                self.write_slots().jwt_prepared = Some(JwtSlot {
                    key_id: kid,
                    slot,
                    signer,
                    not_before: now,
                    not_after,
                });
                tracing::info!(slot, key_id = %committed.authority_id, "prepared JWT authority");
                Ok(committed)
            }
        }
    }

    async fn commit_prepare(&self, record: CaAuthority) -> Result<AuthoritySummary, CaError> {
        match outcome(
            self.state
                .propose(Command::CaPrepare {
                    trust_domain: self.cfg.trust_domain.clone(),
                    authority: record,
                })
                .await?,
        )? {
            Outcome::Authority { authority } => Ok(summary(&authority)),
            _ => Err(CaError::Unexpected("ca_prepare")),
        }
    }

    /// A new CA certificate for `signer`: self-signed, or minted by the upstream authority.
    /// Returns (CA cert, intermediates after it, upstream roots).
    #[allow(clippy::type_complexity)]
    fn new_ca_cert(
        &self,
        signer: Arc<dyn Signer>,
        now: OffsetDateTime,
    ) -> Result<(Vec<u8>, Vec<Vec<u8>>, Vec<Vec<u8>>), CaError> {
        match &self.upstream {
            None => {
                let mut t = CaTemplate::new(self.cfg.trust_domain.clone(), now, self.cfg.ca_ttl);
                t.organization = self.cfg.ca_organization.clone();
                t.country = self.cfg.ca_country.clone();
                t.common_name = self.cfg.ca_common_name.clone();
                Ok((x509::self_signed_ca(&t, signer)?, Vec::new(), Vec::new()))
            }
            Some(up) => {
                let csr = Csr::create(signer)?;
                let minted = up.mint_x509_ca(&csr, &self.cfg.trust_domain, self.cfg.ca_ttl, now)?;
                let mut chain = minted.ca_chain;
                if chain.is_empty() {
                    return Err(CaError::Upstream(UpstreamError::Refused(
                        "upstream returned an empty chain".into(),
                    )));
                }
                let cert = chain.remove(0);
                Ok((cert, chain, minted.upstream_roots))
            }
        }
    }

    async fn activate_locked(&self, kind: AuthorityKind) -> Result<AuthoritySummary, CaError> {
        let prepared_id = {
            let s = self.read_slots();
            match kind {
                AuthorityKind::X509 => s.x509_prepared.as_ref().map(|p| p.authority_id.clone()),
                AuthorityKind::Jwt => s.jwt_prepared.as_ref().map(|p| p.key_id.clone()),
            }
        }
        .ok_or(CaError::NothingPrepared(kind_name(kind)))?;
        let committed = match outcome(
            self.state
                .propose(Command::CaActivate {
                    authority_id: prepared_id.clone(),
                })
                .await?,
        )? {
            Outcome::Authority { authority } => summary(&authority),
            _ => return Err(CaError::Unexpected("ca_activate")),
        };
        let mut s = self.write_slots();
        match kind {
            AuthorityKind::X509 => {
                if let Some(p) = s.x509_prepared.take() {
                    s.x509_active = Some(p);
                }
            }
            AuthorityKind::Jwt => {
                if let Some(p) = s.jwt_prepared.take() {
                    s.jwt_active = Some(p);
                }
            }
        }
        tracing::info!(kind = kind_name(kind), authority_id = %prepared_id, "activated authority");
        Ok(committed)
    }

    /// Signs an X509-SVID with the active CA. The SPIFFE ID comes from the caller's entry.
    pub fn sign_x509_svid(
        &self,
        spiffe_id: &SpiffeId,
        public_key_spki: &[u8],
        ttl: Duration,
        dns_names: &[String],
    ) -> Result<X509Svid, CaError> {
        let ca = self
            .read_slots()
            .x509_active
            .as_ref()
            .map(|a| a.ca.clone())
            .ok_or(CaError::NoActiveAuthority("x509"))?;
        Ok(ca.sign_svid(
            &SvidRequest {
                spiffe_id,
                public_key_spki,
                ttl,
                dns_names,
            },
            self.clock.now(),
        )?)
    }

    /// Mints a JWT-SVID with the active JWT key. Returns the token and its expiry.
    pub fn mint_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<(String, OffsetDateTime), CaError> {
        let (signer, kid, key_not_after) = {
            let s = self.read_slots();
            let a = s
                .jwt_active
                .as_ref()
                .ok_or(CaError::NoActiveAuthority("jwt"))?;
            (a.signer.clone(), a.key_id.clone(), a.not_after)
        };
        let now = self.clock.now();
        // A JWT-SVID never outlives the key that signed it.
        let left = (key_not_after - now).max(time::Duration::ZERO);
        let ttl = ttl.min(Duration::try_from(left).unwrap_or(Duration::ZERO));
        let (token, exp) = jwt::mint(
            signer.as_ref(),
            &JwtSvidParams {
                subject: spiffe_id,
                audience,
                ttl,
                key_id: &kid,
                alg: Some(JwtAlg::default_for(signer.key_type())),
            },
            now,
        )?;
        Ok((token, exp))
    }

    /// The active X.509 CA, for callers that need its chain (e.g. serving TLS).
    pub fn active_x509(&self) -> Option<Arc<X509Authority>> {
        self.read_slots().x509_active.as_ref().map(|a| a.ca.clone())
    }

    /// True once both an X.509 CA and a JWT key are active.
    pub fn is_ready(&self) -> bool {
        let s = self.read_slots();
        s.x509_active.is_some() && s.jwt_active.is_some()
    }

    /// The journal records of this server's authorities, from local state.
    pub fn authorities(&self) -> Result<Vec<AuthoritySummary>, CaError> {
        let node = self.state.node_id();
        Ok(self
            .state
            .store()
            .list_authorities()
            .map_err(|e| StateError::Fatal(e.to_string()))?
            .iter()
            .filter(|a| a.node_id == node)
            .map(summary)
            .collect())
    }
}

fn summary(a: &CaAuthority) -> AuthoritySummary {
    AuthoritySummary {
        authority_id: a.authority_id.clone(),
        kind: a.kind(),
        slot: a.slot.clone(),
        status: a.status,
        not_after: a.not_after,
    }
}

/// SPIRE identifies X.509 authorities by subject key ID; plinth uses the hex SHA-256 of the
/// public key, truncated to 20 bytes.
pub fn authority_id_of(spki: &[u8]) -> String {
    hex::encode(&Sha256::digest(spki)[..20])
}

fn random_kid() -> Result<String, CaError> {
    let mut b = [0u8; 24];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| CaError::Unexpected("random generator"))?;
    Ok(URL_SAFE_NO_PAD.encode(b))
}

fn cert_not_before(der: &[u8]) -> Option<OffsetDateTime> {
    use x509_parser::prelude::FromDer;
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(c.validity().not_before.to_datetime())
}

/// Converts a journal JWT authority to the stored-bundle form.
pub fn jwt_authority_of(a: &CaAuthority) -> Option<StoredJwtAuthority> {
    match &a.public {
        AuthorityPublic::Jwt {
            key_id,
            public_key_spki,
        } => Some(StoredJwtAuthority {
            key_id: key_id.clone(),
            public_key_spki: public_key_spki.clone(),
        }),
        AuthorityPublic::X509 { .. } => None,
    }
}
