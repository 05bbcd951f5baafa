//! The SPIFFE Workload API handlers (SPIFFE_Workload_API.md), served from the [`IdentityCache`].
//!
//! Every call must carry the `workload.spiffe.io: true` metadata; the caller is attested on each
//! call from kernel facts (see [`crate::attest`]), and gets the identities whose entries its
//! selectors match. Streams send the full state at once and again on every cache change that
//! alters what this caller would receive.
//!
//! The cache holds X509-SVIDs for only some entries (see [`crate::lru`]). A caller whose
//! matching entries lack an SVID waits, up to [`DEFAULT_SVID_WAIT`], while the agent gets them
//! from a server; its stream then starts with all of them. If the wait ends with some SVIDs it
//! starts with those (the rest follow on the stream as they arrive); with none, the call fails
//! with `Unavailable`, which clients retry.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use plinth_api::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use plinth_api::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse, SECURITY_HEADER, SECURITY_HEADER_VALUE,
};
use plinth_spiffe::{jwt, Bundle, BundleSet, Selectors, SpiffeId};
use serde_json::Value;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::attest::{attest_all, AttestError, Peer, WorkloadAttestor};
use crate::cache::{CacheState, IdentityCache};
use crate::jwt::{Clock, JwtSourceError, JwtSvidCache};
use crate::lru::{Subscription, SvidUsage};

/// Largest request accepted (requests are tiny; a JWT to validate is at most 16 KiB).
pub const MAX_REQUEST_LEN: usize = 64 * 1024;

/// How long a FetchX509SVID call waits for SVIDs the cache does not hold yet.
pub const DEFAULT_SVID_WAIT: Duration = Duration::from_secs(30);

/// What the endpoint learned about a connection's caller at accept time; tonic hands it to every
/// request on that connection as a request extension.
#[derive(Debug, Clone)]
pub struct CallerInfo(pub Arc<Result<Peer, AttestError>>);

/// Every way a Workload API call fails, mapped to a gRPC status in one place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("security header missing from request")]
    MissingHeader,
    #[error("no identity issued")]
    NoIdentity,
    #[error("workload attestation failed: {0}")]
    Attestation(AttestError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::MissingHeader | ApiError::InvalidArgument(_) => Status::invalid_argument(msg),
            ApiError::NoIdentity => Status::permission_denied(msg),
            ApiError::Attestation(_) | ApiError::Unavailable(_) => Status::unavailable(msg),
            ApiError::Internal(_) => Status::internal(msg),
        }
    }
}

type PushStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    cache: Arc<IdentityCache>,
    jwt: Arc<JwtSvidCache>,
    attestors: Arc<[Arc<dyn WorkloadAttestor>]>,
    clock: Arc<dyn Clock>,
    svid_wait: Duration,
}

fn check_header<T>(req: &Request<T>) -> Result<(), ApiError> {
    match req.metadata().get(SECURITY_HEADER) {
        Some(v) if v.as_bytes() == SECURITY_HEADER_VALUE.as_bytes() => Ok(()),
        _ => Err(ApiError::MissingHeader),
    }
}

/// The X509-SVID response for a caller: `Ok(None)` while SVIDs of matching entries are missing
/// (any missing one unless `partial`; all of them if `partial`), `NoIdentity` when no entry
/// matches. With the response come the IDs of the entries it serves.
fn x509_response(
    state: &CacheState,
    selectors: &Selectors,
    partial: bool,
) -> Result<Option<(X509svidResponse, Vec<String>)>, ApiError> {
    let entries = state.matching(selectors);
    if entries.is_empty() {
        return Err(ApiError::NoIdentity);
    }
    let identities: Vec<_> = entries
        .iter()
        .filter_map(|e| state.identity(&e.id))
        .collect();
    if identities.is_empty() || (identities.len() < entries.len() && !partial) {
        return Ok(None);
    }
    let bundle = state.bundle().x509_der_concat();
    let svids = identities
        .iter()
        .map(|i| X509svid {
            spiffe_id: i.entry.spiffe_id.to_string(),
            x509_svid: i.svid.chain_der_concat(),
            x509_svid_key: i.private_key.to_pkcs8_der().to_vec(),
            bundle: bundle.clone(),
            hint: i.entry.hint.clone(),
        })
        .collect();
    let served: Vec<_> = identities.iter().map(|i| i.entry).collect();
    let federated_bundles = state
        .federated_for(&served)
        .into_iter()
        .map(|b| (b.trust_domain().id_string(), b.x509_der_concat()))
        .collect();
    let ids = served.iter().map(|e| e.id.clone()).collect();
    Ok(Some((
        X509svidResponse {
            svids,
            crl: Vec::new(),
            federated_bundles,
        },
        ids,
    )))
}

/// Waits until every entry matching `selectors` holds an SVID, asking the sync for the missing
/// ones, for at most `wait`; then answers with what there is.
async fn first_x509(
    rx: &mut watch::Receiver<Arc<CacheState>>,
    usage: &SvidUsage,
    selectors: &Selectors,
    wait: Duration,
) -> Result<X509svidResponse, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut asked = false;
    loop {
        let state = rx.borrow_and_update().clone();
        if let Some((resp, ids)) = x509_response(&state, selectors, false)? {
            usage.touch(ids.iter().map(String::as_str));
            return Ok(resp);
        }
        if !asked {
            tracing::debug!("waiting for X509-SVIDs the cache does not hold");
            asked = true;
        }
        usage.want();
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return Err(ApiError::Unavailable("the agent is shutting down".into())),
            Err(_) => {
                let state = rx.borrow_and_update().clone();
                return match x509_response(&state, selectors, true)? {
                    Some((resp, ids)) => {
                        usage.touch(ids.iter().map(String::as_str));
                        Ok(resp)
                    }
                    None => Err(ApiError::Unavailable(format!(
                        "no X509-SVID available yet for this workload: the agent could not get \
                         one from a server within {}s",
                        wait.as_secs()
                    ))),
                };
            }
        }
    }
}

/// Own bundle plus the federated bundles of the caller's entries (bundles need no SVID).
fn caller_bundles<'a>(
    state: &'a CacheState,
    selectors: &Selectors,
) -> Result<Vec<&'a Bundle>, ApiError> {
    let entries = state.matching(selectors);
    if entries.is_empty() {
        return Err(ApiError::NoIdentity);
    }
    let mut out = vec![state.bundle()];
    out.extend(state.federated_for(&entries));
    Ok(out)
}

fn x509_bundles_response(
    state: &CacheState,
    selectors: &Selectors,
) -> Result<X509BundlesResponse, ApiError> {
    let bundles = caller_bundles(state, selectors)?
        .into_iter()
        .map(|b| (b.trust_domain().id_string(), b.x509_der_concat()))
        .collect();
    Ok(X509BundlesResponse {
        crl: Vec::new(),
        bundles,
    })
}

fn jwt_bundles_response(
    state: &CacheState,
    selectors: &Selectors,
) -> Result<JwtBundlesResponse, ApiError> {
    let bundles = caller_bundles(state, selectors)?
        .into_iter()
        .map(|b| {
            jwt_only(b)
                .and_then(|j| j.to_jwks())
                .map(|doc| (b.trust_domain().id_string(), doc.into_bytes()))
                .map_err(|e| ApiError::Internal(format!("encoding bundle: {e}")))
        })
        .collect::<Result<HashMap<_, _>, _>>()?;
    Ok(JwtBundlesResponse { bundles })
}

/// The JWT authorities of a bundle only: FetchJWTBundles serves JWK Sets of `jwt-svid` keys, as
/// SPIRE does; clients such as py-spiffe reject keys without a `kid` there.
fn jwt_only(b: &Bundle) -> Result<Bundle, plinth_spiffe::BundleError> {
    let mut j = Bundle::new(b.trust_domain().clone());
    for a in b.jwt_authorities() {
        j.add_jwt_authority(a.clone())?;
    }
    j.set_sequence_number(b.sequence_number());
    j.set_refresh_hint_secs(b.refresh_hint_secs());
    Ok(j)
}

/// A stream that sends `first` now and then `build(state)` whenever the cache changes what it
/// returns (`Ok(None)`: nothing to send yet); an error (the caller lost its last identity) is
/// sent and ends the stream. `guard` lives as long as the stream.
fn push_stream<T, F, G>(
    rx: watch::Receiver<Arc<CacheState>>,
    selectors: Selectors,
    first: T,
    build: F,
    guard: G,
) -> PushStream<T>
where
    T: PartialEq + Clone + Send + 'static,
    F: Fn(&CacheState, &Selectors) -> Result<Option<T>, ApiError> + Send + Sync + 'static,
    G: Send + 'static,
{
    let stream = futures_util::stream::unfold(
        (rx, selectors, build, Some(first), true, guard),
        |(mut rx, selectors, build, last, first_pending, guard)| async move {
            let last = last?;
            if first_pending {
                return Some((
                    Ok(last.clone()),
                    (rx, selectors, build, Some(last), false, guard),
                ));
            }
            loop {
                // The cache is gone: the agent is shutting down; end the stream.
                rx.changed().await.ok()?;
                let state = rx.borrow_and_update().clone();
                match build(&state, &selectors) {
                    Err(e) => {
                        return Some((Err(e.into()), (rx, selectors, build, None, false, guard)))
                    }
                    Ok(None) => continue,
                    Ok(Some(m)) if m == last => continue,
                    Ok(Some(m)) => {
                        return Some((
                            Ok(m.clone()),
                            (rx, selectors, build, Some(m), false, guard),
                        ));
                    }
                }
            }
        },
    );
    Box::pin(stream)
}

/// A bundle stream: the first answer at once, then every change.
fn bundle_stream<T, F>(
    mut rx: watch::Receiver<Arc<CacheState>>,
    selectors: Selectors,
    build: F,
) -> Result<PushStream<T>, Status>
where
    T: PartialEq + Clone + Send + 'static,
    F: Fn(&CacheState, &Selectors) -> Result<T, ApiError> + Send + Sync + 'static,
{
    let current = rx.borrow_and_update().clone();
    let first = build(&current, &selectors)?;
    Ok(push_stream(
        rx,
        selectors,
        first,
        move |s: &CacheState, sel: &Selectors| build(s, sel).map(Some),
        (),
    ))
}

/// Converts JSON claims to a protobuf `Struct`.
fn to_struct(claims: serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

impl WorkloadApi {
    pub fn new(
        cache: Arc<IdentityCache>,
        jwt: Arc<JwtSvidCache>,
        attestors: Vec<Arc<dyn WorkloadAttestor>>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            cache,
            jwt,
            attestors: attestors.into(),
            clock,
            svid_wait: DEFAULT_SVID_WAIT,
        }
    }

    /// How long FetchX509SVID waits for SVIDs the cache does not hold yet.
    pub fn with_svid_wait(mut self, wait: Duration) -> Self {
        self.svid_wait = wait;
        self
    }

    /// The tonic service, with request size limits.
    pub fn into_service(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self).max_decoding_message_size(MAX_REQUEST_LEN)
    }

    /// Checks the security header, then attests the caller.
    async fn admit<T>(&self, req: &Request<T>) -> Result<Selectors, ApiError> {
        check_header(req)?;
        let info = req
            .extensions()
            .get::<CallerInfo>()
            .cloned()
            .ok_or_else(|| {
                ApiError::Attestation(AttestError::NoPeer("connection has no peer info".into()))
            })?;
        let attestors = self.attestors.clone();
        let result = tokio::task::spawn_blocking(move || match info.0.as_ref() {
            Ok(peer) => attest_all(&attestors, peer),
            Err(e) => Err(e.clone()),
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("attestation task failed: {e}")))?;
        match result {
            Ok(selectors) => Ok(selectors),
            Err(e) => {
                tracing::warn!(error = %e, "workload attestation failed");
                Err(ApiError::Attestation(e))
            }
        }
    }

    async fn jwt_svids(&self, req: &Request<JwtsvidRequest>) -> Result<JwtsvidResponse, ApiError> {
        check_header(req)?;
        let msg = req.get_ref();
        if msg.audience.is_empty() || msg.audience.iter().any(String::is_empty) {
            return Err(ApiError::InvalidArgument(
                "audience must be specified".into(),
            ));
        }
        let wanted = if msg.spiffe_id.is_empty() {
            None
        } else {
            Some(SpiffeId::new_with_path(&msg.spiffe_id).map_err(|e| {
                ApiError::InvalidArgument(format!("bad spiffe_id {:?}: {e}", msg.spiffe_id))
            })?)
        };
        let selectors = self.admit(req).await?;
        let state = self.cache.state();
        let mut ids: Vec<(SpiffeId, String)> = Vec::new();
        let mut seen = BTreeSet::new();
        for entry in state.matching(&selectors) {
            if wanted.as_ref().is_some_and(|w| w != &entry.spiffe_id) {
                continue;
            }
            if seen.insert(entry.spiffe_id.clone()) {
                ids.push((entry.spiffe_id.clone(), entry.hint.clone()));
            }
        }
        if ids.is_empty() {
            return Err(ApiError::NoIdentity);
        }
        let mut svids = Vec::with_capacity(ids.len());
        for (id, hint) in ids {
            let svid = self
                .jwt
                .get(&id, &msg.audience)
                .await
                .map_err(|e| match e {
                    JwtSourceError::Refused(m) => ApiError::InvalidArgument(m),
                    other => ApiError::Unavailable(other.to_string()),
                })?;
            svids.push(Jwtsvid {
                spiffe_id: id.to_string(),
                svid: svid.token,
                hint,
            });
        }
        Ok(JwtsvidResponse { svids })
    }

    async fn validate(
        &self,
        req: &Request<ValidateJwtsvidRequest>,
    ) -> Result<ValidateJwtsvidResponse, ApiError> {
        check_header(req)?;
        let msg = req.get_ref();
        if msg.audience.is_empty() {
            return Err(ApiError::InvalidArgument(
                "audience must be specified".into(),
            ));
        }
        if msg.svid.is_empty() {
            return Err(ApiError::InvalidArgument("svid must be specified".into()));
        }
        // Validation needs no identity, but only attested local workloads may use the agent.
        self.admit(req).await?;
        let state = self.cache.state();
        let mut bundles = BundleSet::new();
        for b in state.federated_bundles().iter() {
            bundles.insert(b.clone());
        }
        bundles.insert(state.bundle().clone());
        let valid = jwt::validate(&msg.svid, &bundles, &msg.audience, self.clock.now())
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        Ok(ValidateJwtsvidResponse {
            spiffe_id: valid.spiffe_id.to_string(),
            claims: Some(to_struct(valid.claims)),
        })
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = PushStream<X509svidResponse>;
    type FetchX509BundlesStream = PushStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = PushStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let selectors = self.admit(&request).await?;
        let usage = self.cache.usage().clone();
        // Registered before waiting, so that the sync fetches (and never evicts) what this
        // caller needs.
        let subscription: Subscription = usage.subscribe(selectors.clone());
        let mut rx = self.cache.subscribe();
        let first = first_x509(&mut rx, &usage, &selectors, self.svid_wait).await?;
        let build = move |state: &CacheState,
                          selectors: &Selectors|
              -> Result<Option<X509svidResponse>, ApiError> {
            Ok(x509_response(state, selectors, true)?.map(|(resp, ids)| {
                usage.touch(ids.iter().map(String::as_str));
                resp
            }))
        };
        Ok(Response::new(push_stream(
            rx,
            selectors,
            first,
            build,
            subscription,
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let selectors = self.admit(&request).await?;
        bundle_stream(self.cache.subscribe(), selectors, x509_bundles_response).map(Response::new)
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Ok(Response::new(self.jwt_svids(&request).await?))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let selectors = self.admit(&request).await?;
        bundle_stream(self.cache.subscribe(), selectors, jwt_bundles_response).map(Response::new)
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Ok(Response::new(self.validate(&request).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_standard_codes_and_messages() {
        let s = Status::from(ApiError::MissingHeader);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "security header missing from request");
        let s = Status::from(ApiError::NoIdentity);
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert_eq!(s.message(), "no identity issued");
        let s = Status::from(ApiError::Attestation(AttestError::CallerGone));
        assert_eq!(s.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn claims_convert_to_a_protobuf_struct() {
        let claims = serde_json::json!({
            "sub": "spiffe://example.org/w", "aud": ["a", "b"], "exp": 5, "x": {"y": null, "z": true}
        });
        let Value::Object(map) = claims else {
            unreachable!()
        };
        let s = to_struct(map);
        use prost_types::value::Kind;
        assert_eq!(
            s.fields["sub"].kind,
            Some(Kind::StringValue("spiffe://example.org/w".into()))
        );
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(5.0)));
        let Some(Kind::ListValue(l)) = &s.fields["aud"].kind else {
            panic!("aud is a list")
        };
        assert_eq!(l.values.len(), 2);
        let Some(Kind::StructValue(inner)) = &s.fields["x"].kind else {
            panic!("x is a struct")
        };
        assert_eq!(inner.fields["y"].kind, Some(Kind::NullValue(0)));
        assert_eq!(inner.fields["z"].kind, Some(Kind::BoolValue(true)));
    }
}
