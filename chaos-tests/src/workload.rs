//! Clients that drive a cluster through its admin sockets and record what they saw: register
//! clients (entry create/update/delete/read on a few entry IDs), an append-only writer (entries
//! created once, never changed: the "no acknowledged write lost" set), join-token racers, and
//! the recovery probe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use plinth_api::server as pb;
use plinth_api::server::agent_service_client::AgentServiceClient;
use plinth_api::server::entry_service_client::EntryServiceClient;
use plinth_spiffe::{Csr, KeyType, PrivateKey};
use rand::Rng;
use tokio::net::UnixStream;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::cluster::TRUST_DOMAIN;
use crate::history::{
    AttestOutcome, EntryOp, History, SetAdd, TokenAttempt, TokenRace, WorkloadSample,
};
use crate::linearizability::{EntryInput, EntryOutput};

/// Client-side limits.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Register keys (entry IDs) the register clients share.
    pub keys: usize,
    /// How long a client waits for an answer before calling the call indeterminate.
    pub op_timeout: Duration,
    /// Pause between a client's operations.
    pub think: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            keys: 12,
            op_timeout: Duration::from_secs(3),
            think: Duration::from_millis(20),
        }
    }
}

/// Connects to an admin socket now; `None` if nothing listens (the call is then never sent).
pub async fn connect(path: &Path) -> Option<Channel> {
    let path = path.to_owned();
    let ep = Endpoint::try_from("http://plinth.admin").ok()?;
    let fut = ep.connect_with_connector(tower::service_fn(move |_| {
        let path = path.clone();
        async move { UnixStream::connect(path).await.map(TokioIo::new) }
    }));
    tokio::time::timeout(Duration::from_secs(1), fut)
        .await
        .ok()?
        .ok()
}

/// The entry ID of register key `k`.
pub fn key_id(k: usize) -> String {
    format!("chaos-reg-{k}")
}

fn key_entry(k: usize, hint: &str) -> pb::Entry {
    pb::Entry {
        id: key_id(k),
        spiffe_id: format!("spiffe://{TRUST_DOMAIN}/chaos/reg/{k}"),
        parent_id: format!("spiffe://{TRUST_DOMAIN}/chaos/agent"),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: format!("uid:{}", 10_000 + k),
        }],
        hint: hint.to_owned(),
        ..Default::default()
    }
}

fn set_entry(id: &str) -> pb::Entry {
    pb::Entry {
        id: id.to_owned(),
        spiffe_id: format!("spiffe://{TRUST_DOMAIN}/chaos/set/{id}"),
        parent_id: format!("spiffe://{TRUST_DOMAIN}/chaos/agent"),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: "uid:1".into(),
        }],
        ..Default::default()
    }
}

/// Maps a per-item status code to an outcome; other codes leave the outcome unknown.
fn item_outcome(code: i32) -> Option<EntryOutput> {
    match Code::from_i32(code) {
        Code::Ok => Some(EntryOutput::Ok),
        Code::NotFound => Some(EntryOutput::NotFound),
        Code::AlreadyExists => Some(EntryOutput::AlreadyExists),
        _ => None,
    }
}

/// An error that proves the call never reached the leader: the server could not open a TCP
/// connection to forward it (plinth-raft's `NodeError::Unreachable` with tonic's connect error).
/// Any other failure leaves the outcome unknown.
pub fn never_forwarded(error: &str) -> bool {
    error.contains("is unreachable") && error.contains("tcp connect error")
}

/// Runs one entry operation against one server; returns (output, error text).
async fn entry_call(
    ch: Channel,
    key: usize,
    input: &EntryInput,
    timeout: Duration,
) -> (Option<EntryOutput>, Option<String>) {
    let mut c = EntryServiceClient::new(ch);
    let fut = async {
        match input {
            EntryInput::Create(v) => c
                .batch_create_entry(pb::BatchCreateEntryRequest {
                    entries: vec![key_entry(key, v)],
                })
                .await
                .map(|r| {
                    r.into_inner()
                        .results
                        .first()
                        .and_then(|x| x.status.clone())
                }),
            EntryInput::Update(v) => c
                .batch_update_entry(pb::BatchUpdateEntryRequest {
                    entries: vec![key_entry(key, v)],
                })
                .await
                .map(|r| {
                    r.into_inner()
                        .results
                        .first()
                        .and_then(|x| x.status.clone())
                }),
            EntryInput::Delete => c
                .batch_delete_entry(pb::BatchDeleteEntryRequest {
                    ids: vec![key_id(key)],
                })
                .await
                .map(|r| {
                    r.into_inner()
                        .results
                        .first()
                        .and_then(|x| x.status.clone())
                }),
            EntryInput::Read => match c.get_entry(pb::GetEntryRequest { id: key_id(key) }).await {
                Ok(e) => {
                    return (
                        Some(EntryOutput::Value(Some(e.into_inner().hint))),
                        None::<String>,
                    )
                }
                Err(s) if s.code() == Code::NotFound => {
                    return (Some(EntryOutput::Value(None)), None)
                }
                Err(s) => Err(s),
            },
        }
        .map_or_else(
            |s| (None, Some(format!("{:?}: {}", s.code(), s.message()))),
            |st| match st {
                None => (None, Some("no item status".into())),
                Some(st) => match item_outcome(st.code) {
                    Some(o) => (Some(o), None),
                    None => (None, Some(format!("item {}: {}", st.code, st.message))),
                },
            },
        )
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => (None, Some("timeout".into())),
    }
}

/// How long a client leaves a server alone after a call to it timed out (a client with a
/// health-checked server list; without it every client ends up waiting on a paused server).
const AVOID_AFTER_TIMEOUT: Duration = Duration::from_secs(5);

/// Servers a client currently avoids.
#[derive(Debug, Default)]
struct Avoid(BTreeMap<u64, tokio::time::Instant>);

impl Avoid {
    fn suspect(&mut self, server: u64) {
        self.0
            .insert(server, tokio::time::Instant::now() + AVOID_AFTER_TIMEOUT);
    }

    /// The next turn (index into `servers`) after `turn` whose server is not avoided; the
    /// plain next one if all are.
    fn next(&self, servers: &[(u64, PathBuf)], turn: usize) -> usize {
        let now = tokio::time::Instant::now();
        for step in 1..=servers.len() {
            let t = turn + step;
            let id = servers[t % servers.len()].0;
            if self.0.get(&id).is_none_or(|until| *until <= now) {
                return t;
            }
        }
        turn + 1
    }
}

/// A register client: random operations on random keys through the servers in turn, until
/// `stop` is set.
pub async fn register_client(
    client: usize,
    sockets: BTreeMap<u64, PathBuf>,
    cfg: ClientConfig,
    history: Arc<History>,
    mut stop: watch::Receiver<bool>,
) {
    let servers: Vec<(u64, PathBuf)> = sockets.into_iter().collect();
    if servers.is_empty() {
        return;
    }
    let mut seq = 0u64;
    let mut turn = client;
    let mut avoid = Avoid::default();
    while !*stop.borrow() {
        seq += 1;
        turn = avoid.next(&servers, turn);
        let (server, path) = &servers[turn % servers.len()];
        let (key, input) = {
            let mut rng = rand::thread_rng();
            let key = rng.gen_range(0..cfg.keys.max(1));
            let v = format!("c{client}-{seq}");
            let input = match rng.gen_range(0..100) {
                0..40 => EntryInput::Read,
                40..70 => EntryInput::Update(v),
                70..88 => EntryInput::Create(v),
                _ => EntryInput::Delete,
            };
            (key, input)
        };
        let call_us = history.now_us();
        let Some(ch) = connect(path).await else {
            history.push_unsent(call_us);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.changed() => {}
            }
            continue;
        };
        let (output, error) = entry_call(ch, key, &input, cfg.op_timeout).await;
        let end_us = history.now_us();
        if error.as_deref() == Some("timeout") {
            avoid.suspect(*server);
        }
        // A failed read is kept for the statistics; the checker skips it (it changed nothing).
        history.push_entry(EntryOp {
            client,
            server: *server,
            key: key_id(key),
            input,
            output,
            not_applied: error.as_deref().is_some_and(never_forwarded),
            error,
            call_us,
            end_us,
        });
        tokio::select! {
            _ = tokio::time::sleep(cfg.think) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Creates one set entry through `path`; true if acknowledged.
pub async fn set_add(
    history: &History,
    server: u64,
    path: &Path,
    id: &str,
    timeout: Duration,
    probe: bool,
) -> bool {
    let call_us = history.now_us();
    let Some(ch) = connect(path).await else {
        history.push_unsent(call_us);
        return false;
    };
    let r = tokio::time::timeout(
        timeout,
        EntryServiceClient::new(ch).batch_create_entry(pb::BatchCreateEntryRequest {
            entries: vec![set_entry(id)],
        }),
    )
    .await;
    let acknowledged = matches!(&r, Ok(Ok(resp)) if resp.get_ref().results.first()
        .and_then(|x| x.status.as_ref()).is_some_and(|s| s.code == 0));
    history.push_set(SetAdd {
        id: id.to_owned(),
        server,
        acknowledged,
        call_us,
        end_us: history.now_us(),
        probe,
    });
    acknowledged
}

/// The append-only writer: creates `set-<n>` entries through the servers in turn.
pub async fn set_writer(
    sockets: BTreeMap<u64, PathBuf>,
    cfg: ClientConfig,
    history: Arc<History>,
    mut stop: watch::Receiver<bool>,
) {
    let servers: Vec<(u64, PathBuf)> = sockets.into_iter().collect();
    if servers.is_empty() {
        return;
    }
    let mut n = 0usize;
    let mut turn = 0usize;
    let mut avoid = Avoid::default();
    while !*stop.borrow() {
        turn = avoid.next(&servers, turn);
        let (server, path) = &servers[turn % servers.len()];
        let t0 = tokio::time::Instant::now();
        let ok = set_add(
            &history,
            *server,
            path,
            &format!("set-{n}"),
            cfg.op_timeout,
            false,
        )
        .await;
        if !ok && t0.elapsed() >= cfg.op_timeout {
            avoid.suspect(*server);
        }
        n += 1;
        tokio::select! {
            _ = tokio::time::sleep(cfg.think * 5) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Creates `count` set entries (`bulk-<n>`) in batches of 50 from four concurrent callers
/// through the given servers; returns how many were acknowledged. Bounded: each call by
/// `timeout`, the whole by 40 calls' worth of timeouts per caller.
pub async fn bulk_create(
    history: Arc<History>,
    servers: Vec<(u64, PathBuf)>,
    count: usize,
    timeout: Duration,
) -> usize {
    const BATCH: usize = 50;
    const CALLERS: usize = 4;
    if servers.is_empty() {
        return 0;
    }
    let base = rand::random::<u32>();
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        let history = history.clone();
        let servers = servers.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = 0usize;
            let batches: Vec<usize> = (0..count.div_ceil(BATCH))
                .filter(|b| b % CALLERS == c)
                .collect();
            let deadline = tokio::time::Instant::now() + timeout * 40;
            for (i, b) in batches.into_iter().enumerate() {
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                let (server, path) = &servers[(c + i) % servers.len()];
                let ids: Vec<String> = (b * BATCH..((b + 1) * BATCH).min(count))
                    .map(|n| format!("bulk-{base:08x}-{n}"))
                    .collect();
                let call_us = history.now_us();
                let Some(ch) = connect(path).await else {
                    history.push_unsent(call_us);
                    continue;
                };
                let r = tokio::time::timeout(
                    timeout * 4,
                    EntryServiceClient::new(ch).batch_create_entry(pb::BatchCreateEntryRequest {
                        entries: ids.iter().map(|id| set_entry(id)).collect(),
                    }),
                )
                .await;
                let end_us = history.now_us();
                let statuses: Vec<bool> = match &r {
                    Ok(Ok(resp)) => resp
                        .get_ref()
                        .results
                        .iter()
                        .map(|x| x.status.as_ref().is_some_and(|s| s.code == 0))
                        .collect(),
                    _ => Vec::new(),
                };
                for (k, id) in ids.iter().enumerate() {
                    let ok = statuses.get(k).copied().unwrap_or(false);
                    acked += usize::from(ok);
                    history.push_set(SetAdd {
                        id: id.clone(),
                        server: *server,
                        acknowledged: ok,
                        call_us,
                        end_us,
                        probe: false,
                    });
                }
            }
            acked
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    total
}

/// After a fault: writes probe entries through the given servers until one is acknowledged
/// or `bound` passes; returns when the first acknowledged probe was acknowledged (µs).
pub async fn probe_commit(
    history: Arc<History>,
    servers: Vec<(u64, PathBuf)>,
    tag: String,
    bound: Duration,
) -> Option<u64> {
    if servers.is_empty() {
        return None;
    }
    let deadline = tokio::time::Instant::now() + bound;
    let mut i = 0usize;
    while tokio::time::Instant::now() < deadline {
        let (server, path) = &servers[i % servers.len()];
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let t = left.min(Duration::from_secs(2));
        if set_add(
            &history,
            *server,
            path,
            &format!("probe-{tag}-{i}"),
            t,
            true,
        )
        .await
        {
            return history.set().last().map(|s| s.end_us);
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

async fn attest(path: &Path, token: &str, timeout: Duration) -> (AttestOutcome, Option<String>) {
    let Some(ch) = connect(path).await else {
        return (AttestOutcome::NotSent, Some("connect failed".into()));
    };
    let csr = match PrivateKey::generate(KeyType::EcP256)
        .map_err(|e| e.to_string())
        .and_then(|k| Csr::create(Arc::new(k)).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => return (AttestOutcome::NotSent, Some(format!("csr: {e}"))),
    };
    let req = pb::AttestAgentRequest {
        step: Some(pb::attest_agent_request::Step::Params(
            pb::attest_agent_request::Params {
                data: Some(pb::AttestationData {
                    r#type: "join_token".into(),
                    payload: token.as_bytes().to_vec(),
                }),
                csr,
            },
        )),
    };
    let fut = async {
        let mut stream = AgentServiceClient::new(ch)
            .attest_agent(tokio_stream::iter(vec![req]))
            .await?
            .into_inner();
        stream.message().await
    };
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => (AttestOutcome::Indeterminate, Some("timeout".into())),
        Ok(Ok(Some(pb::AttestAgentResponse {
            step: Some(pb::attest_agent_response::Step::Result(r)),
        }))) if r.svid.is_some() => (AttestOutcome::Attested, None),
        Ok(Ok(other)) => (
            AttestOutcome::Indeterminate,
            Some(format!("unexpected answer: {other:?}")),
        ),
        Ok(Err(s)) if s.code() == Code::PermissionDenied => {
            (AttestOutcome::Refused, Some(s.message().to_owned()))
        }
        Ok(Err(s)) => (
            AttestOutcome::Indeterminate,
            Some(format!("{:?}: {}", s.code(), s.message())),
        ),
    }
}

/// Creates join tokens and races two attestations with each through two different servers.
pub async fn token_racer(
    sockets: BTreeMap<u64, PathBuf>,
    cfg: ClientConfig,
    history: Arc<History>,
    mut stop: watch::Receiver<bool>,
) {
    let servers: Vec<(u64, PathBuf)> = sockets.into_iter().collect();
    if servers.len() < 2 {
        return;
    }
    let mut n = 0u64;
    while !*stop.borrow() {
        n += 1;
        let i = usize::try_from(n).unwrap_or(0);
        let (on, path) = &servers[i % servers.len()];
        let token = format!("chaos-token-{n}-{}", rand::random::<u32>());
        let created_us = history.now_us();
        let created = match connect(path).await {
            None => false,
            Some(ch) => matches!(
                tokio::time::timeout(
                    cfg.op_timeout,
                    AgentServiceClient::new(ch).create_join_token(pb::CreateJoinTokenRequest {
                        ttl: 3600,
                        agent_id: String::new(),
                        token: token.clone(),
                    }),
                )
                .await,
                Ok(Ok(_))
            ),
        };
        if created {
            let (a, pa) = &servers[(i + 1) % servers.len()];
            let (b, pb_) = &servers[(i + 2) % servers.len()];
            let h = history.clone();
            let one = async {
                let call_us = h.now_us();
                let (outcome, error) = attest(pa, &token, cfg.op_timeout).await;
                TokenAttempt {
                    server: *a,
                    outcome,
                    error,
                    call_us,
                    end_us: h.now_us(),
                }
            };
            let two = async {
                let call_us = h.now_us();
                let (outcome, error) = attest(pb_, &token, cfg.op_timeout).await;
                TokenAttempt {
                    server: *b,
                    outcome,
                    error,
                    call_us,
                    end_us: h.now_us(),
                }
            };
            let (x, y) = tokio::join!(one, two);
            history.push_token(TokenRace {
                token_no: n,
                created_on: *on,
                created_us,
                attempts: vec![x, y],
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.think * 10) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Reads every register key and lists every entry through one server (after the run).
pub async fn final_read(
    history: &History,
    server: u64,
    path: &Path,
    keys: usize,
    timeout: Duration,
) -> Option<Vec<pb::Entry>> {
    for k in 0..keys {
        let call_us = history.now_us();
        let ch = connect(path).await?;
        let (output, error) = entry_call(ch, k, &EntryInput::Read, timeout).await;
        let failed = output.is_none();
        history.push_entry(EntryOp {
            client: usize::MAX,
            server,
            key: key_id(k),
            input: EntryInput::Read,
            output,
            error,
            not_applied: false,
            call_us,
            end_us: history.now_us(),
        });
        // A node that does not answer one read is tried again later, from the first key: going
        // on would cost a time-out per key.
        if failed {
            return None;
        }
    }
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..10_000 {
        let ch = connect(path).await?;
        let r = tokio::time::timeout(
            timeout,
            EntryServiceClient::new(ch).list_entries(pb::ListEntriesRequest {
                filter: None,
                page_size: 500,
                page_token: token.clone(),
            }),
        )
        .await
        .ok()?
        .ok()?
        .into_inner();
        out.extend(r.entries);
        if r.next_page_token.is_empty() {
            return Some(out);
        }
        token = r.next_page_token;
    }
    None
}

/// The oracle "every SVID a workload received verifies against the bundle the agent served at
/// that time": the chain of the response's first SVID against the bundle in the same response,
/// with every X509-SVID validator rule, now.
fn verify_against_served_bundle(s: &plinth_api::workload::X509svid) -> Result<(), String> {
    use plinth_spiffe::x509::{split_der_concat, verify_svid};
    let chain = split_der_concat(&s.x509_svid).map_err(|e| format!("chain: {e}"))?;
    let td = plinth_spiffe::TrustDomain::new(TRUST_DOMAIN).map_err(|e| e.to_string())?;
    let mut bundle = plinth_spiffe::Bundle::new(td);
    for der in split_der_concat(&s.bundle).map_err(|e| format!("bundle: {e}"))? {
        bundle
            .add_x509_authority(der)
            .map_err(|e| format!("bundle: {e}"))?;
    }
    let v =
        verify_svid(&chain, &bundle, time::OffsetDateTime::now_utc()).map_err(|e| e.to_string())?;
    if v.spiffe_id.to_string() != s.spiffe_id {
        return Err(format!(
            "chain is for {}, response says {}",
            v.spiffe_id, s.spiffe_id
        ));
    }
    Ok(())
}

/// One Workload API look: the first X509-SVID message, and our trust domain's bundle sequence.
async fn workload_look(socket: &Path, timeout: Duration) -> (Result<(), String>, Option<u64>) {
    use plinth_api::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use plinth_api::workload::{JwtBundlesRequest, X509svidRequest};
    let Some(ch) = connect(socket).await else {
        return (Err("agent socket: connect failed".into()), None);
    };
    fn req<M>(m: M) -> tonic::Request<M> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut().insert(
            plinth_api::workload::SECURITY_HEADER,
            tonic::metadata::MetadataValue::from_static("true"),
        );
        r
    }
    let mut c = SpiffeWorkloadApiClient::new(ch);
    let svid = tokio::time::timeout(timeout, async {
        let mut s = c
            .fetch_x509svid(req(X509svidRequest {}))
            .await?
            .into_inner();
        s.message().await
    })
    .await;
    let svid = match svid {
        Err(_) => Err("FetchX509SVID: timeout".to_string()),
        Ok(Err(e)) => Err(format!("FetchX509SVID: {:?}: {}", e.code(), e.message())),
        Ok(Ok(None)) => Err("FetchX509SVID: stream ended".into()),
        Ok(Ok(Some(m))) => match m.svids.first() {
            None => Err("FetchX509SVID: no SVID".into()),
            Some(s) => verify_against_served_bundle(s).map_err(|e| format!("SVID check: {e}")),
        },
    };
    let seq = tokio::time::timeout(timeout, async {
        let mut s = c
            .fetch_jwt_bundles(req(JwtBundlesRequest {}))
            .await
            .ok()?
            .into_inner();
        let m = s.message().await.ok()??;
        let doc = m.bundles.get(&format!("spiffe://{TRUST_DOMAIN}"))?;
        let v: serde_json::Value = serde_json::from_slice(doc).ok()?;
        v.get("spiffe_sequence")?.as_u64()
    })
    .await
    .ok()
    .flatten();
    (svid, seq)
}

/// A workload beside an agent: looks at its SVID and bundle every `every` until `stop`.
pub async fn workload_watcher(
    agent: usize,
    socket: PathBuf,
    every: Duration,
    history: Arc<History>,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let (svid, seq) = workload_look(&socket, Duration::from_secs(3)).await;
        history.push_workload(WorkloadSample {
            agent,
            t_us: history.now_us(),
            svid_ok: svid.is_ok(),
            error: svid.err(),
            bundle_sequence: seq,
        });
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Waits (bounded) until a workload gets an SVID through the agent at `socket`.
pub async fn wait_for_svid(socket: &Path, bound: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + bound;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match workload_look(socket, Duration::from_secs(3)).await {
            (Ok(()), _) => return Ok(()),
            (Err(e), _) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use plinth_spiffe::{CaTemplate, Signer, SpiffeId, SvidRequest, TrustDomain, X509Authority};

    /// A CA of `td` and an SVID response for `id` signed by it, with `bundle_ca` in the bundle.
    fn response(td: &str, id: &str, bundle_of_other_ca: bool) -> plinth_api::workload::X509svid {
        let now = time::OffsetDateTime::now_utc();
        let ca = |td: &str| {
            let key = Arc::new(PrivateKey::generate(KeyType::EcP256).unwrap());
            let tmpl =
                CaTemplate::new(TrustDomain::new(td).unwrap(), now, Duration::from_secs(600));
            let der = plinth_spiffe::x509::self_signed_ca(&tmpl, key.clone()).unwrap();
            (X509Authority::new(der.clone(), vec![], key).unwrap(), der)
        };
        let (signer, signer_der) = ca(td);
        let (_, other_der) = ca(td);
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let sid = SpiffeId::new(id).unwrap();
        let svid = signer
            .sign_svid(
                &SvidRequest {
                    spiffe_id: &sid,
                    public_key_spki: key.public_key_spki(),
                    ttl: Duration::from_secs(300),
                    dns_names: &[],
                },
                now,
            )
            .unwrap();
        plinth_api::workload::X509svid {
            spiffe_id: id.into(),
            x509_svid: svid.chain_der_concat(),
            bundle: if bundle_of_other_ca {
                other_der
            } else {
                signer_der
            },
            ..Default::default()
        }
    }

    #[test]
    fn svid_check_accepts_a_chain_to_the_served_bundle() {
        let id = format!("spiffe://{TRUST_DOMAIN}/w");
        verify_against_served_bundle(&response(TRUST_DOMAIN, &id, false)).unwrap();
    }

    #[test]
    fn svid_check_refuses_other_bundles_ids_and_domains() {
        let id = format!("spiffe://{TRUST_DOMAIN}/w");
        // Signed by a CA the served bundle does not hold.
        assert!(verify_against_served_bundle(&response(TRUST_DOMAIN, &id, true)).is_err());
        // The response names another ID than the chain.
        let mut r = response(TRUST_DOMAIN, &id, false);
        r.spiffe_id = format!("spiffe://{TRUST_DOMAIN}/other");
        assert!(verify_against_served_bundle(&r).is_err());
        // An SVID of another trust domain.
        let r = response("elsewhere.test", "spiffe://elsewhere.test/w", false);
        assert!(verify_against_served_bundle(&r).is_err());
    }

    #[test]
    fn only_a_failed_forward_connection_is_known_not_applied() {
        assert!(never_forwarded(
            "item 14: node 1 is unreachable: code: 'The service is currently unavailable', \
             message: \"tcp connect error\""
        ));
        assert!(!never_forwarded(
            "item 14: node 1 is unreachable: transport error"
        ));
        assert!(!never_forwarded("timeout"));
        assert!(!never_forwarded(
            "item 14: the cluster did not answer in time"
        ));
    }
}
