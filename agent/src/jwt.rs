//! JWT-SVIDs for workloads: the agent does not hold the JWT signing keys, so it asks a
//! [`JwtSvidSource`] (the server, once the sync code exists) and caches the answer per SPIFFE ID
//! and audience set until half of the token's lifetime has passed.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plinth_spiffe::jwt::{self, JwtSvidParams};
use plinth_spiffe::{JwtError, Signer, SpiffeId};
use time::OffsetDateTime;

/// Largest number of cached tokens; past it expired ones are dropped, then the oldest.
pub const MAX_CACHED_JWT_SVIDS: usize = 4096;

/// A boxed future, so that [`JwtSvidSource`] stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A minted JWT-SVID.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSvid {
    pub spiffe_id: SpiffeId,
    /// The compact JWS. A bearer credential: never log it.
    pub token: String,
    pub issued_at: OffsetDateTime,
    pub expiry: OffsetDateTime,
}

impl fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("issued_at", &self.issued_at)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

/// Why no JWT-SVID could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtSourceError {
    /// The signer (server) could not be reached or failed; the workload should retry.
    #[error("JWT-SVID signer unavailable: {0}")]
    Unavailable(String),
    /// The request was refused (bad audience, not authorized).
    #[error("JWT-SVID request refused: {0}")]
    Refused(String),
}

/// Where the agent gets JWT-SVIDs from. The server-sync code implements it by calling the
/// server's `NewJWTSVID`; [`LocalJwtSource`] mints in process.
pub trait JwtSvidSource: Send + Sync + fmt::Debug {
    /// A JWT-SVID for `spiffe_id` valid for every audience in `audience` (never empty).
    fn fetch_jwt_svid<'a>(
        &'a self,
        spiffe_id: &'a SpiffeId,
        audience: &'a [String],
    ) -> BoxFuture<'a, Result<JwtSvid, JwtSourceError>>;
}

/// Tells the time; injected so that expiry is testable without sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// Mints JWT-SVIDs with a signing key held in process (tests, and single-process setups).
#[derive(Debug)]
pub struct LocalJwtSource {
    signer: Arc<dyn Signer>,
    key_id: String,
    ttl: Duration,
    clock: Arc<dyn Clock>,
}

impl LocalJwtSource {
    /// `key_id` must be the key's `kid` in the trust bundle.
    pub fn new(
        signer: Arc<dyn Signer>,
        key_id: impl Into<String>,
        ttl: Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            signer,
            key_id: key_id.into(),
            ttl,
            clock,
        }
    }
}

impl JwtSvidSource for LocalJwtSource {
    fn fetch_jwt_svid<'a>(
        &'a self,
        spiffe_id: &'a SpiffeId,
        audience: &'a [String],
    ) -> BoxFuture<'a, Result<JwtSvid, JwtSourceError>> {
        Box::pin(async move {
            let now = self.clock.now();
            let params = JwtSvidParams {
                subject: spiffe_id,
                audience,
                ttl: self.ttl,
                key_id: &self.key_id,
                alg: None,
            };
            let (token, expiry) =
                jwt::mint(self.signer.as_ref(), &params, now).map_err(|e| match e {
                    JwtError::EmptyAudience | JwtError::BadSubject(_) => {
                        JwtSourceError::Refused(e.to_string())
                    }
                    other => JwtSourceError::Unavailable(other.to_string()),
                })?;
            Ok(JwtSvid {
                spiffe_id: spiffe_id.clone(),
                token,
                issued_at: now,
                expiry,
            })
        })
    }
}

type CacheKey = (SpiffeId, BTreeSet<String>);

/// Caches JWT-SVIDs by SPIFFE ID and audience set (order and duplicates of audiences do not
/// matter). A token is reused until half of its lifetime has passed, like SPIRE's agent.
#[derive(Debug)]
pub struct JwtSvidCache {
    source: Arc<dyn JwtSvidSource>,
    clock: Arc<dyn Clock>,
    tokens: Mutex<HashMap<CacheKey, JwtSvid>>,
}

impl JwtSvidCache {
    pub fn new(source: Arc<dyn JwtSvidSource>, clock: Arc<dyn Clock>) -> Self {
        Self {
            source,
            clock,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    fn fresh(svid: &JwtSvid, now: OffsetDateTime) -> bool {
        let half = (svid.expiry - svid.issued_at) / 2;
        now < svid.issued_at + half
    }

    fn lookup(&self, key: &CacheKey, now: OffsetDateTime) -> Option<JwtSvid> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .get(key)
            .filter(|svid| Self::fresh(svid, now))
            .cloned()
    }

    fn store(&self, key: CacheKey, svid: JwtSvid, now: OffsetDateTime) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.len() >= MAX_CACHED_JWT_SVIDS {
            tokens.retain(|_, t| t.expiry > now);
        }
        if tokens.len() >= MAX_CACHED_JWT_SVIDS {
            if let Some(oldest) = tokens
                .iter()
                .min_by_key(|(_, t)| t.issued_at)
                .map(|(k, _)| k.clone())
            {
                tokens.remove(&oldest);
            }
        }
        tokens.insert(key, svid);
    }

    /// A JWT-SVID for `spiffe_id` and `audience`, from the cache if still fresh.
    pub async fn get(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
    ) -> Result<JwtSvid, JwtSourceError> {
        let set: BTreeSet<String> = audience.iter().cloned().collect();
        if set.is_empty() || set.iter().any(String::is_empty) {
            return Err(JwtSourceError::Refused("audience must not be empty".into()));
        }
        let key = (spiffe_id.clone(), set);
        if let Some(hit) = self.lookup(&key, self.clock.now()) {
            return Ok(hit);
        }
        let audience: Vec<String> = key.1.iter().cloned().collect();
        let svid = self.source.fetch_jwt_svid(spiffe_id, &audience).await?;
        if &svid.spiffe_id != spiffe_id {
            return Err(JwtSourceError::Unavailable(format!(
                "signer returned a JWT-SVID for {} instead of {spiffe_id}",
                svid.spiffe_id
            )));
        }
        self.store(key, svid.clone(), self.clock.now());
        Ok(svid)
    }

    /// Drops cached tokens of SPIFFE IDs no longer in `keep` (after entries were deleted).
    pub fn retain_ids(&self, keep: impl Fn(&SpiffeId) -> bool) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.retain(|(id, _), _| keep(id));
    }

    /// Number of cached tokens.
    pub fn len(&self) -> usize {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True if nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    use plinth_spiffe::{KeyType, PrivateKey};

    use super::*;

    #[derive(Debug)]
    struct FakeClock(AtomicI64);

    impl Clock for FakeClock {
        fn now(&self) -> OffsetDateTime {
            OffsetDateTime::from_unix_timestamp(self.0.load(Ordering::SeqCst)).unwrap()
        }
    }

    #[derive(Debug)]
    struct Counting {
        inner: LocalJwtSource,
        calls: AtomicUsize,
    }

    impl JwtSvidSource for Counting {
        fn fetch_jwt_svid<'a>(
            &'a self,
            spiffe_id: &'a SpiffeId,
            audience: &'a [String],
        ) -> BoxFuture<'a, Result<JwtSvid, JwtSourceError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.inner.fetch_jwt_svid(spiffe_id, audience)
        }
    }

    fn setup() -> (Arc<FakeClock>, Arc<Counting>, JwtSvidCache) {
        let clock = Arc::new(FakeClock(AtomicI64::new(1_900_000_000)));
        let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
        let source = Arc::new(Counting {
            inner: LocalJwtSource::new(key, "k1", Duration::from_secs(300), clock.clone()),
            calls: AtomicUsize::new(0),
        });
        let cache = JwtSvidCache::new(source.clone(), clock.clone());
        (clock, source, cache)
    }

    #[tokio::test]
    async fn reuses_a_token_until_half_life_keyed_by_audience_set() {
        let (clock, source, cache) = setup();
        let id = SpiffeId::new("spiffe://example.org/web").unwrap();
        let a = cache.get(&id, &["b".into(), "a".into()]).await.unwrap();
        let b = cache
            .get(&id, &["a".into(), "b".into(), "a".into()])
            .await
            .unwrap();
        assert_eq!(a, b, "same audience set, same token");
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        cache.get(&id, &["a".into()]).await.unwrap();
        assert_eq!(source.calls.load(Ordering::SeqCst), 2, "other audience set");

        clock.0.fetch_add(149, Ordering::SeqCst);
        cache.get(&id, &["a".into(), "b".into()]).await.unwrap();
        assert_eq!(source.calls.load(Ordering::SeqCst), 2, "before half life");
        clock.0.fetch_add(1, Ordering::SeqCst);
        let c = cache.get(&id, &["a".into(), "b".into()]).await.unwrap();
        assert_eq!(source.calls.load(Ordering::SeqCst), 3, "at half life");
        assert_ne!(a.token, c.token);
    }

    #[tokio::test]
    async fn refuses_empty_audience_and_forgets_removed_ids() {
        let (_clock, source, cache) = setup();
        let id = SpiffeId::new("spiffe://example.org/web").unwrap();
        assert!(matches!(
            cache.get(&id, &[]).await,
            Err(JwtSourceError::Refused(_))
        ));
        assert!(matches!(
            cache.get(&id, &[String::new()]).await,
            Err(JwtSourceError::Refused(_))
        ));
        assert_eq!(source.calls.load(Ordering::SeqCst), 0);
        cache.get(&id, &["a".into()]).await.unwrap();
        assert_eq!(cache.len(), 1);
        cache.retain_ids(|_| false);
        assert!(cache.is_empty());
    }

    #[test]
    fn debug_never_prints_the_token() {
        let svid = JwtSvid {
            spiffe_id: SpiffeId::new("spiffe://example.org/web").unwrap(),
            token: "secret.token.value".into(),
            issued_at: OffsetDateTime::UNIX_EPOCH,
            expiry: OffsetDateTime::UNIX_EPOCH,
        };
        assert!(!format!("{svid:?}").contains("secret"));
    }
}
