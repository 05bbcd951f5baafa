//! The `plinth-server` command line, mirroring `spire-server`: the same subcommands, flag names
//! (single dash accepted: `-spiffeID` is `--spiffeID`), output formats and messages.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use hyper_util::rt::TokioIo;
use plinth_api::server as pb;
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// The default admin socket (SPIRE's is /tmp/spire-server/private/api.sock).
pub const DEFAULT_SOCKET: &str = "/tmp/plinth-server/private/api.sock";

#[derive(Debug, Parser)]
#[command(
    name = "plinth-server",
    version,
    about = "plinth server: the trust domain's CA and registry"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Runs the server.
    Run(RunArgs),
    /// Validates a configuration file.
    Validate(RunArgs),
    /// Checks that the server is up and serving.
    Healthcheck(SocketArgs),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCmd),
    /// Attested agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Trust bundles.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// X509-SVIDs.
    #[command(subcommand)]
    X509(X509Cmd),
    /// JWT-SVIDs.
    #[command(subcommand)]
    Jwt(JwtCmd),
    /// This server's signing authorities.
    #[command(subcommand, name = "localauthority")]
    LocalAuthority(LocalAuthorityCmd),
    /// Cluster membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Path to the configuration file.
    #[arg(long = "config", default_value = "server.toml")]
    pub config: PathBuf,
    /// Expand ${VAR} references in the configuration from the environment.
    #[arg(long = "expandEnv")]
    pub expand_env: bool,
}

#[derive(Debug, Args, Clone)]
pub struct SocketArgs {
    /// Path to the admin API socket.
    #[arg(long = "socketPath", default_value = DEFAULT_SOCKET)]
    pub socket_path: PathBuf,
}

#[derive(Debug, Args, Clone)]
pub struct OutputArgs {
    /// Output format: pretty or json.
    #[arg(long = "output", default_value = "pretty")]
    pub output: String,
}

#[derive(Debug, Args)]
pub struct EntryFields {
    /// The SPIFFE ID the entry issues.
    #[arg(long = "spiffeID")]
    pub spiffe_id: Option<String>,
    /// The ID of the parent: an agent, a node alias or the server.
    #[arg(long = "parentID")]
    pub parent_id: Option<String>,
    /// A colon-delimited type:value selector (repeatable).
    #[arg(long = "selector")]
    pub selector: Vec<String>,
    /// X509-SVID TTL in seconds (0 = server default).
    #[arg(long = "x509SVIDTTL", default_value_t = 0)]
    pub x509_ttl: i32,
    /// JWT-SVID TTL in seconds (0 = server default).
    #[arg(long = "jwtSVIDTTL", default_value_t = 0)]
    pub jwt_ttl: i32,
    /// A DNS name for the X509-SVID (repeatable).
    #[arg(long = "dns")]
    pub dns: Vec<String>,
    /// A trust domain to federate with (repeatable).
    #[arg(long = "federatesWith")]
    pub federates_with: Vec<String>,
    /// Issue admin SVIDs.
    #[arg(long = "admin")]
    pub admin: bool,
    /// A downstream (nested) CA entry.
    #[arg(long = "downstream")]
    pub downstream: bool,
    /// A hint returned to workloads.
    #[arg(long = "hint", default_value = "")]
    pub hint: String,
    /// Unix seconds after which the entry expires.
    #[arg(long = "entryExpiry", default_value_t = 0)]
    pub entry_expiry: i64,
    /// Register the entry under the server as a node alias.
    #[arg(long = "node")]
    pub node: bool,
}

#[derive(Debug, Subcommand)]
pub enum EntryCmd {
    /// Creates a registration entry.
    Create {
        #[command(flatten)]
        fields: EntryFields,
        /// Use this entry ID instead of a generated one.
        #[arg(long = "entryID", default_value = "")]
        entry_id: String,
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Updates a registration entry.
    Update {
        #[command(flatten)]
        fields: EntryFields,
        #[arg(long = "entryID")]
        entry_id: String,
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Deletes a registration entry.
    Delete {
        #[arg(long = "entryID")]
        entry_id: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Shows registration entries, filtered.
    Show {
        #[arg(long = "entryID", default_value = "")]
        entry_id: String,
        #[arg(long = "spiffeID", default_value = "")]
        spiffe_id: String,
        #[arg(long = "parentID", default_value = "")]
        parent_id: String,
        #[arg(long = "selector")]
        selector: Vec<String>,
        /// Selector matcher: exact, subset, superset or any.
        #[arg(long = "matchSelectorsOn", default_value = "superset")]
        match_on: String,
        #[arg(long = "federatesWith", default_value = "")]
        federates_with: String,
        #[arg(long = "hint", default_value = "")]
        hint: String,
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Counts registration entries.
    Count {
        #[command(flatten)]
        socket: SocketArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Lists attested agents.
    List {
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Shows one agent.
    Show {
        #[arg(long = "spiffeID")]
        spiffe_id: String,
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Bans an agent: it can neither call the server nor attest again.
    Ban {
        #[arg(long = "spiffeID")]
        spiffe_id: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Evicts an agent: it must attest again.
    Evict {
        #[arg(long = "spiffeID")]
        spiffe_id: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Counts attested agents.
    Count {
        #[command(flatten)]
        socket: SocketArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Generates a single-use join token.
    Generate {
        /// Additional SPIFFE ID to assign the token owner.
        #[arg(long = "spiffeID", default_value = "")]
        spiffe_id: String,
        /// Token TTL in seconds.
        #[arg(long = "ttl", default_value_t = 600)]
        ttl: i32,
        #[command(flatten)]
        socket: SocketArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Prints the trust domain's bundle.
    Show {
        /// pem or spiffe.
        #[arg(long = "format", default_value = "pem")]
        format: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Lists federated bundles.
    List {
        #[arg(long = "id", default_value = "")]
        id: String,
        #[arg(long = "format", default_value = "pem")]
        format: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Sets a federated bundle (read from -path, or stdin).
    Set {
        #[arg(long = "id")]
        id: String,
        #[arg(long = "path")]
        path: Option<PathBuf>,
        #[arg(long = "format", default_value = "pem")]
        format: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Deletes a federated bundle.
    Delete {
        #[arg(long = "id")]
        id: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum X509Cmd {
    /// Mints an X509-SVID (admin).
    Mint {
        #[arg(long = "spiffeID")]
        spiffe_id: String,
        #[arg(long = "ttl", default_value_t = 0)]
        ttl: i32,
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Directory to write svid.pem, key.pem and bundle.pem into (else printed).
        #[arg(long = "write")]
        write: Option<PathBuf>,
        #[command(flatten)]
        socket: SocketArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum JwtCmd {
    /// Mints a JWT-SVID (admin).
    Mint {
        #[arg(long = "spiffeID")]
        spiffe_id: String,
        #[arg(long = "audience")]
        audience: Vec<String>,
        #[arg(long = "ttl", default_value_t = 0)]
        ttl: i32,
        #[command(flatten)]
        socket: SocketArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum LocalAuthorityCmd {
    /// X.509 authority operations.
    X509 {
        #[command(subcommand)]
        op: AuthorityOp,
    },
    /// JWT authority operations.
    Jwt {
        #[command(subcommand)]
        op: AuthorityOp,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuthorityOp {
    Show {
        #[command(flatten)]
        socket: SocketArgs,
    },
    Prepare {
        #[command(flatten)]
        socket: SocketArgs,
    },
    Activate {
        #[command(flatten)]
        socket: SocketArgs,
    },
    Taint {
        #[arg(long = "authorityID")]
        authority_id: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    Revoke {
        #[arg(long = "authorityID")]
        authority_id: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Leader, term, members and their applied index.
    Status {
        #[command(flatten)]
        socket: SocketArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Adds a server (learner, then voter).
    Add {
        #[arg(long = "nodeID")]
        node_id: u64,
        #[arg(long = "address")]
        address: String,
        #[arg(long = "learnerOnly")]
        learner_only: bool,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Removes a server.
    Remove {
        #[arg(long = "nodeID")]
        node_id: u64,
        #[command(flatten)]
        socket: SocketArgs,
    },
}

/// SPIRE's CLI takes Go-style single-dash long flags; clap wants two dashes.
pub fn normalize_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let b = a.as_bytes();
            if i > 0 && b.len() > 2 && b[0] == b'-' && b[1].is_ascii_alphabetic() {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

/// Connects to the admin socket.
pub async fn connect(path: &Path) -> anyhow::Result<Channel> {
    if !path.exists() {
        bail!(
            "could not connect to the server: socket {} does not exist (is the server running? pass -socketPath)",
            path.display()
        );
    }
    let path = path.to_owned();
    let ch = Endpoint::try_from("http://plinth.admin")?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| anyhow!("could not connect to the server: {e}"))?;
    Ok(ch)
}

/// The mean Raft log sync in milliseconds from a member's sync count and total microseconds;
/// `None` when it has not synced (or did not answer).
fn mean_log_sync(syncs: u64, micros: u64) -> Option<f64> {
    (syncs > 0).then(|| micros as f64 / syncs as f64 / 1000.0)
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow!("{}", s.message())
}

fn selector_pb(s: &str) -> anyhow::Result<pb::Selector> {
    let sel = plinth_spiffe::Selector::parse(s).map_err(|e| anyhow!("{e}"))?;
    Ok(pb::Selector {
        r#type: sel.kind().to_owned(),
        value: sel.value().to_owned(),
    })
}

fn entry_pb(
    f: &EntryFields,
    id: &str,
    trust_domain_server: Option<&str>,
) -> anyhow::Result<pb::Entry> {
    let spiffe_id = f
        .spiffe_id
        .clone()
        .ok_or_else(|| anyhow!("a SPIFFE ID is required (-spiffeID)"))?;
    let parent_id = match (&f.parent_id, f.node, trust_domain_server) {
        (Some(p), false, _) => p.clone(),
        (None, true, Some(server)) => server.to_owned(),
        (Some(_), true, _) => bail!("-parentID and -node cannot be used together"),
        _ => bail!("a parent ID is required (-parentID) unless -node is set"),
    };
    if f.selector.is_empty() {
        bail!("at least one selector is required (-selector type:value)");
    }
    Ok(pb::Entry {
        id: id.to_owned(),
        spiffe_id,
        parent_id,
        selectors: f
            .selector
            .iter()
            .map(|s| selector_pb(s))
            .collect::<Result<_, _>>()?,
        x509_svid_ttl: f.x509_ttl,
        jwt_svid_ttl: f.jwt_ttl,
        federates_with: f.federates_with.clone(),
        admin: f.admin,
        downstream: f.downstream,
        expires_at: f.entry_expiry,
        dns_names: f.dns.clone(),
        hint: f.hint.clone(),
        revision: 0,
        created_at: 0,
    })
}

fn ttl_text(t: i32) -> String {
    if t == 0 {
        "default".into()
    } else {
        t.to_string()
    }
}

/// Unix seconds as SPIRE's CLI prints a time (Go's `time.Time` in UTC:
/// `2026-12-04 18:23:13 +0000 UTC`); the number itself if it is out of range.
fn go_time(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map_or_else(|_| secs.to_string(), plinth_spiffe::x509::display_time)
}

fn print_entry(e: &pb::Entry) {
    println!("Entry ID         : {}", e.id);
    println!("SPIFFE ID        : {}", e.spiffe_id);
    println!("Parent ID        : {}", e.parent_id);
    println!("Revision         : {}", e.revision);
    if e.downstream {
        println!("Downstream       : true");
    }
    println!("X509-SVID TTL    : {}", ttl_text(e.x509_svid_ttl));
    println!("JWT-SVID TTL     : {}", ttl_text(e.jwt_svid_ttl));
    if e.expires_at != 0 {
        println!("Expiration time  : {}", go_time(e.expires_at));
    }
    for s in &e.selectors {
        println!("Selector         : {}:{}", s.r#type, s.value);
    }
    for f in &e.federates_with {
        println!("FederatesWith    : {f}");
    }
    for d in &e.dns_names {
        println!("DNS name         : {d}");
    }
    if e.admin {
        println!("Admin            : true");
    }
    if !e.hint.is_empty() {
        println!("Hint             : {}", e.hint);
    }
    println!();
}

fn entry_json(e: &pb::Entry) -> Value {
    json!({
        "id": e.id, "spiffe_id": e.spiffe_id, "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| json!({"type": s.r#type, "value": s.value})).collect::<Vec<_>>(),
        "x509_svid_ttl": e.x509_svid_ttl, "jwt_svid_ttl": e.jwt_svid_ttl,
        "federates_with": e.federates_with, "admin": e.admin, "downstream": e.downstream,
        "expires_at": e.expires_at, "dns_names": e.dns_names, "hint": e.hint,
        "revision": e.revision, "created_at": e.created_at,
    })
}

fn print_agent(a: &pb::Agent) {
    println!("SPIFFE ID         : {}", a.spiffe_id);
    println!("Attestation type  : {}", a.attestation_type);
    println!("Expiration time   : {}", go_time(a.x509_svid_expires_at));
    println!("Serial number     : {}", a.x509_svid_serial_number);
    println!("Can re-attest     : {}", a.can_reattest);
    println!("Banned            : {}", a.banned);
    for s in &a.selectors {
        println!("Selector          : {}:{}", s.r#type, s.value);
    }
    println!();
}

fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "id": a.spiffe_id, "attestation_type": a.attestation_type,
        "x509svid_serial_number": a.x509_svid_serial_number,
        "x509svid_expires_at": a.x509_svid_expires_at, "banned": a.banned,
        "can_reattest": a.can_reattest,
        "selectors": a.selectors.iter().map(|s| json!({"type": s.r#type, "value": s.value})).collect::<Vec<_>>(),
    })
}

fn check_output(o: &OutputArgs) -> anyhow::Result<bool> {
    match o.output.as_str() {
        "pretty" => Ok(false),
        "json" => Ok(true),
        other => bail!("invalid output format {other:?}; use pretty or json"),
    }
}

fn bundle_text(b: &pb::Bundle, format: &str) -> anyhow::Result<String> {
    let td = plinth_spiffe::TrustDomain::new(&b.trust_domain).map_err(|e| anyhow!("{e}"))?;
    let mut bundle = plinth_spiffe::Bundle::new(td);
    for c in &b.x509_authorities {
        bundle
            .add_x509_authority(c.clone())
            .map_err(|e| anyhow!("{e}"))?;
    }
    for j in &b.jwt_authorities {
        bundle
            .add_jwt_authority(plinth_spiffe::JwtAuthority {
                key_id: j.key_id.clone(),
                public_key_spki: j.public_key.clone(),
            })
            .map_err(|e| anyhow!("{e}"))?;
    }
    bundle.set_sequence_number(b.sequence_number);
    bundle.set_refresh_hint_secs(u64::try_from(b.refresh_hint).ok().filter(|h| *h > 0));
    match format {
        "pem" => Ok(bundle.x509_pem()),
        "spiffe" => Ok(bundle.to_jwks().map_err(|e| anyhow!("{e}"))? + "\n"),
        other => bail!("invalid format {other:?}; use pem or spiffe"),
    }
}

/// Runs a client subcommand; `Run` and `Validate` are handled by the caller.
pub async fn client(cmd: Cmd) -> anyhow::Result<()> {
    use pb::agent_service_client::AgentServiceClient;
    use pb::bundle_service_client::BundleServiceClient;
    use pb::cluster_service_client::ClusterServiceClient;
    use pb::entry_service_client::EntryServiceClient;
    use pb::local_authority_service_client::LocalAuthorityServiceClient;
    use pb::svid_service_client::SvidServiceClient;

    match cmd {
        Cmd::Run(_) | Cmd::Validate(_) => unreachable_cmd(),
        Cmd::Healthcheck(s) => {
            let ch = connect(&s.socket_path).await?;
            BundleServiceClient::new(ch)
                .get_bundle(pb::GetBundleRequest {})
                .await
                .map_err(|e| anyhow!("server is unhealthy: {}", e.message()))?;
            println!("Server is healthy.");
            Ok(())
        }
        Cmd::Entry(e) => match e {
            EntryCmd::Create {
                fields,
                entry_id,
                socket,
                out,
            } => write_entry(EntryWrite::Create, &fields, &entry_id, &socket, &out).await,
            EntryCmd::Update {
                fields,
                entry_id,
                socket,
                out,
            } => write_entry(EntryWrite::Update, &fields, &entry_id, &socket, &out).await,
            EntryCmd::Delete { entry_id, socket } => {
                let ch = connect(&socket.socket_path).await?;
                let r = EntryServiceClient::new(ch)
                    .batch_delete_entry(pb::BatchDeleteEntryRequest {
                        ids: vec![entry_id.clone()],
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                let st = r
                    .results
                    .into_iter()
                    .next()
                    .and_then(|r| r.status)
                    .unwrap_or_default();
                if st.code != 0 {
                    bail!("failed to delete entry: {}", st.message);
                }
                println!("Deleted entry with ID: {entry_id}");
                Ok(())
            }
            EntryCmd::Show {
                entry_id,
                spiffe_id,
                parent_id,
                selector,
                match_on,
                federates_with,
                hint,
                socket,
                out,
            } => {
                let json_out = check_output(&out)?;
                let ch = connect(&socket.socket_path).await?;
                let mut client = EntryServiceClient::new(ch);
                let entries = if !entry_id.is_empty() {
                    vec![client
                        .get_entry(pb::GetEntryRequest { id: entry_id })
                        .await
                        .map_err(status_err)?
                        .into_inner()]
                } else {
                    use pb::selector_match::MatchBehavior;
                    let by_selectors = if selector.is_empty() {
                        None
                    } else {
                        let m = match match_on.as_str() {
                            "exact" => MatchBehavior::MatchExact,
                            "subset" => MatchBehavior::MatchSubset,
                            "superset" => MatchBehavior::MatchSuperset,
                            "any" => MatchBehavior::MatchAny,
                            other => bail!("unsupported match behavior {other:?}"),
                        };
                        Some(pb::SelectorMatch {
                            selectors: selector
                                .iter()
                                .map(|s| selector_pb(s))
                                .collect::<Result<_, _>>()?,
                            r#match: m as i32,
                        })
                    };
                    let filter = pb::EntryFilter {
                        by_spiffe_id: spiffe_id,
                        by_parent_id: parent_id,
                        by_selectors,
                        by_federates_with: federates_with,
                        by_hint: hint,
                        by_downstream: 0,
                    };
                    let mut all = Vec::new();
                    let mut token = String::new();
                    loop {
                        let r = client
                            .list_entries(pb::ListEntriesRequest {
                                filter: Some(filter.clone()),
                                page_size: 0,
                                page_token: token,
                            })
                            .await
                            .map_err(status_err)?
                            .into_inner();
                        all.extend(r.entries);
                        if r.next_page_token.is_empty() {
                            break;
                        }
                        token = r.next_page_token;
                    }
                    all
                };
                if json_out {
                    println!(
                        "{}",
                        json!({"entries": entries.iter().map(entry_json).collect::<Vec<_>>()})
                    );
                } else {
                    println!(
                        "Found {} {}",
                        entries.len(),
                        if entries.len() == 1 {
                            "entry"
                        } else {
                            "entries"
                        }
                    );
                    for e in &entries {
                        print_entry(e);
                    }
                }
                Ok(())
            }
            EntryCmd::Count { socket } => {
                let ch = connect(&socket.socket_path).await?;
                let n = EntryServiceClient::new(ch)
                    .count_entries(pb::CountEntriesRequest { filter: None })
                    .await
                    .map_err(status_err)?
                    .into_inner()
                    .count;
                println!(
                    "{n} registration {}",
                    if n == 1 { "entry" } else { "entries" }
                );
                Ok(())
            }
        },
        Cmd::Agent(a) => match a {
            AgentCmd::List { socket, out } => {
                let json_out = check_output(&out)?;
                let ch = connect(&socket.socket_path).await?;
                let r = AgentServiceClient::new(ch)
                    .list_agents(pb::ListAgentsRequest::default())
                    .await
                    .map_err(status_err)?
                    .into_inner();
                if json_out {
                    println!(
                        "{}",
                        json!({"agents": r.agents.iter().map(agent_json).collect::<Vec<_>>()})
                    );
                } else {
                    println!(
                        "Found {} attested {}:\n",
                        r.agents.len(),
                        if r.agents.len() == 1 {
                            "agent"
                        } else {
                            "agents"
                        }
                    );
                    for a in &r.agents {
                        print_agent(a);
                    }
                }
                Ok(())
            }
            AgentCmd::Show {
                spiffe_id,
                socket,
                out,
            } => {
                let json_out = check_output(&out)?;
                let ch = connect(&socket.socket_path).await?;
                let a = AgentServiceClient::new(ch)
                    .get_agent(pb::GetAgentRequest { spiffe_id })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                if json_out {
                    println!("{}", agent_json(&a));
                } else {
                    println!("Found an attested agent given its SPIFFE ID\n");
                    print_agent(&a);
                }
                Ok(())
            }
            AgentCmd::Ban { spiffe_id, socket } => {
                let ch = connect(&socket.socket_path).await?;
                AgentServiceClient::new(ch)
                    .ban_agent(pb::BanAgentRequest { spiffe_id })
                    .await
                    .map_err(status_err)?;
                println!("Agent banned successfully");
                Ok(())
            }
            AgentCmd::Evict { spiffe_id, socket } => {
                let ch = connect(&socket.socket_path).await?;
                AgentServiceClient::new(ch)
                    .delete_agent(pb::DeleteAgentRequest { spiffe_id })
                    .await
                    .map_err(status_err)?;
                println!("Agent evicted successfully");
                Ok(())
            }
            AgentCmd::Count { socket } => {
                let ch = connect(&socket.socket_path).await?;
                let n = AgentServiceClient::new(ch)
                    .count_agents(pb::CountAgentsRequest { filter: None })
                    .await
                    .map_err(status_err)?
                    .into_inner()
                    .count;
                println!("{n} attested {}", if n == 1 { "agent" } else { "agents" });
                Ok(())
            }
        },
        Cmd::Token(TokenCmd::Generate {
            spiffe_id,
            ttl,
            socket,
        }) => {
            let ch = connect(&socket.socket_path).await?;
            let t = AgentServiceClient::new(ch)
                .create_join_token(pb::CreateJoinTokenRequest {
                    ttl,
                    agent_id: spiffe_id,
                    token: String::new(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("Token: {}", t.value);
            Ok(())
        }
        Cmd::Bundle(b) => match b {
            BundleCmd::Show { format, socket } => {
                let ch = connect(&socket.socket_path).await?;
                let b = BundleServiceClient::new(ch)
                    .get_bundle(pb::GetBundleRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner();
                print!("{}", bundle_text(&b, &format)?);
                Ok(())
            }
            BundleCmd::List { id, format, socket } => {
                let ch = connect(&socket.socket_path).await?;
                let mut c = BundleServiceClient::new(ch);
                let bundles = if id.is_empty() {
                    c.list_federated_bundles(pb::ListFederatedBundlesRequest {})
                        .await
                        .map_err(status_err)?
                        .into_inner()
                        .bundles
                } else {
                    let td = id.strip_prefix("spiffe://").unwrap_or(&id).to_owned();
                    vec![c
                        .get_federated_bundle(pb::GetFederatedBundleRequest { trust_domain: td })
                        .await
                        .map_err(status_err)?
                        .into_inner()]
                };
                for b in &bundles {
                    println!("****************************************");
                    println!("* spiffe://{}", b.trust_domain);
                    println!("****************************************");
                    print!("{}", bundle_text(b, &format)?);
                }
                Ok(())
            }
            BundleCmd::Set {
                id,
                path,
                format,
                socket,
            } => {
                let text = match &path {
                    Some(p) => {
                        std::fs::read(p).with_context(|| format!("reading {}", p.display()))?
                    }
                    None => {
                        use std::io::Read;
                        let mut v = Vec::new();
                        std::io::stdin().read_to_end(&mut v)?;
                        v
                    }
                };
                let td = plinth_spiffe::TrustDomain::new(&id)
                    .map_err(|e| anyhow!("invalid -id: {e}"))?;
                let bundle = match format.as_str() {
                    "spiffe" => plinth_spiffe::Bundle::from_jwks(td.clone(), &text)
                        .map_err(|e| anyhow!("{e}"))?,
                    "pem" => {
                        let mut b = plinth_spiffe::Bundle::new(td.clone());
                        let certs = plinth_spiffe::pem::parse_all(
                            &String::from_utf8_lossy(&text),
                            "CERTIFICATE",
                        )
                        .map_err(|e| anyhow!("{e}"))?;
                        for c in certs {
                            b.add_x509_authority(c).map_err(|e| anyhow!("{e}"))?;
                        }
                        b
                    }
                    other => bail!("invalid format {other:?}; use pem or spiffe"),
                };
                let ch = connect(&socket.socket_path).await?;
                BundleServiceClient::new(ch)
                    .set_federated_bundle(pb::SetFederatedBundleRequest {
                        bundle: Some(pb::Bundle {
                            trust_domain: td.to_string(),
                            x509_authorities: bundle.x509_authorities().to_vec(),
                            jwt_authorities: bundle
                                .jwt_authorities()
                                .iter()
                                .map(|j| pb::JwtAuthority {
                                    key_id: j.key_id.clone(),
                                    public_key: j.public_key_spki.clone(),
                                    expires_at: 0,
                                })
                                .collect(),
                            refresh_hint: 0,
                            sequence_number: bundle.sequence_number(),
                        }),
                    })
                    .await
                    .map_err(status_err)?;
                println!("bundle set.");
                Ok(())
            }
            BundleCmd::Delete { id, socket } => {
                let ch = connect(&socket.socket_path).await?;
                let td = id.strip_prefix("spiffe://").unwrap_or(&id).to_owned();
                BundleServiceClient::new(ch)
                    .delete_federated_bundle(pb::DeleteFederatedBundleRequest { trust_domain: td })
                    .await
                    .map_err(status_err)?;
                println!("bundle deleted.");
                Ok(())
            }
        },
        Cmd::X509(X509Cmd::Mint {
            spiffe_id,
            ttl,
            dns,
            write,
            socket,
        }) => {
            let key = Arc::new(
                plinth_spiffe::PrivateKey::generate(plinth_spiffe::KeyType::EcP256)
                    .map_err(|e| anyhow!("{e}"))?,
            );
            let csr = plinth_spiffe::Csr::create(key.clone()).map_err(|e| anyhow!("{e}"))?;
            let ch = connect(&socket.socket_path).await?;
            let svid = SvidServiceClient::new(ch.clone())
                .mint_x509_svid(pb::MintX509SvidRequest {
                    csr,
                    spiffe_id,
                    ttl,
                    dns_names: dns,
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .svid
                .ok_or_else(|| anyhow!("empty response"))?;
            let bundle = BundleServiceClient::new(ch)
                .get_bundle(pb::GetBundleRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            let svid_pem = plinth_spiffe::pem::encode_certs(&svid.cert_chain);
            let bundle_pem = plinth_spiffe::pem::encode_certs(&bundle.x509_authorities);
            match write {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)?;
                    std::fs::write(dir.join("svid.pem"), &svid_pem)?;
                    write_secret(&dir.join("key.pem"), key.to_pkcs8_pem().as_bytes())?;
                    std::fs::write(dir.join("bundle.pem"), &bundle_pem)?;
                    println!("X509-SVID written to {}", dir.join("svid.pem").display());
                    println!("Private key written to {}", dir.join("key.pem").display());
                    println!("Root CAs written to {}", dir.join("bundle.pem").display());
                }
                None => {
                    println!("X509-SVID:\n{svid_pem}");
                    println!("Private key:\n{}", key.to_pkcs8_pem());
                    println!("Root CAs:\n{bundle_pem}");
                }
            }
            Ok(())
        }
        Cmd::Jwt(JwtCmd::Mint {
            spiffe_id,
            audience,
            ttl,
            socket,
        }) => {
            if audience.is_empty() {
                bail!("at least one audience is required (-audience)");
            }
            let ch = connect(&socket.socket_path).await?;
            let svid = SvidServiceClient::new(ch)
                .mint_jwt_svid(pb::MintJwtSvidRequest {
                    spiffe_id,
                    audience,
                    ttl,
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .svid
                .ok_or_else(|| anyhow!("empty response"))?;
            println!("{}", svid.token);
            Ok(())
        }
        Cmd::LocalAuthority(la) => {
            let (kind, op) = match la {
                LocalAuthorityCmd::X509 { op } => ("x509", op),
                LocalAuthorityCmd::Jwt { op } => ("jwt", op),
            };
            let (socket, id) = match &op {
                AuthorityOp::Show { socket }
                | AuthorityOp::Prepare { socket }
                | AuthorityOp::Activate { socket } => (socket.clone(), String::new()),
                AuthorityOp::Taint {
                    socket,
                    authority_id,
                }
                | AuthorityOp::Revoke {
                    socket,
                    authority_id,
                } => (socket.clone(), authority_id.clone()),
            };
            let ch = connect(&socket.socket_path).await?;
            let mut c = LocalAuthorityServiceClient::new(ch);
            let req = pb::AuthorityRequest {
                kind: kind.into(),
                authority_id: id,
            };
            let print = |a: &pb::AuthorityState| {
                println!("  Authority ID : {}", a.authority_id);
                println!("  Slot         : {}", a.slot);
                println!("  Status       : {}", a.status);
                println!("  Expires at   : {}", a.expires_at);
                println!();
            };
            // One line naming the transition, then the authority it produced.
            let report = |done: &str,
                          r: Result<tonic::Response<pb::AuthorityState>, tonic::Status>|
             -> anyhow::Result<()> {
                let a = r.map_err(status_err)?.into_inner();
                println!("{done} {kind} authority:");
                print(&a);
                Ok(())
            };
            match op {
                AuthorityOp::Show { .. } => {
                    let r = c
                        .get_authority_state(req)
                        .await
                        .map_err(status_err)?
                        .into_inner();
                    for status in ["active", "prepared", "old", "tainted", "revoked"] {
                        for a in r.authorities.iter().filter(|a| a.status == status) {
                            println!("{}{} authority:", status[..1].to_uppercase(), &status[1..]);
                            print(a);
                        }
                    }
                }
                AuthorityOp::Prepare { .. } => {
                    report("Prepared", c.prepare_authority(req).await)?;
                }
                AuthorityOp::Activate { .. } => {
                    report("Activated", c.activate_authority(req).await)?;
                }
                AuthorityOp::Taint { .. } => report("Tainted", c.taint_authority(req).await)?,
                AuthorityOp::Revoke { .. } => report("Revoked", c.revoke_authority(req).await)?,
            }
            Ok(())
        }
        Cmd::Cluster(c) => {
            let print_status = |s: &pb::ClusterStatusResponse| {
                println!("Node ID   : {}", s.node_id);
                println!(
                    "Leader    : {}",
                    if s.leader_id == 0 {
                        "none".to_string()
                    } else {
                        s.leader_id.to_string()
                    }
                );
                println!("Term      : {}", s.term);
                println!("Members   :");
                for m in &s.members {
                    println!(
                        "  {:>4}  {:<22} {:<8} applied {}{}",
                        m.node_id,
                        m.address,
                        if m.voter { "voter" } else { "learner" },
                        m.applied_index,
                        mean_log_sync(m.log_syncs, m.log_sync_micros)
                            .map(|ms| format!(", log sync {ms:.2} ms mean"))
                            .unwrap_or_default()
                    );
                }
            };
            match c {
                ClusterCmd::Status { socket, out } => {
                    let json_out = check_output(&out)?;
                    let ch = connect(&socket.socket_path).await?;
                    let s = ClusterServiceClient::new(ch)
                        .status(pb::ClusterStatusRequest {})
                        .await
                        .map_err(status_err)?
                        .into_inner();
                    if json_out {
                        println!(
                            "{}",
                            json!({"node_id": s.node_id, "leader_id": s.leader_id, "term": s.term,
                                "members": s.members.iter().map(|m| json!({"node_id": m.node_id, "address": m.address, "voter": m.voter, "applied_index": m.applied_index, "log_syncs": m.log_syncs, "log_sync_micros": m.log_sync_micros})).collect::<Vec<_>>()})
                        );
                    } else {
                        print_status(&s);
                    }
                }
                ClusterCmd::Add {
                    node_id,
                    address,
                    learner_only,
                    socket,
                } => {
                    let ch = connect(&socket.socket_path).await?;
                    eprintln!("Adding node {node_id} at {address}; waiting for it to catch up...");
                    let s = ClusterServiceClient::new(ch)
                        .add_node(pb::AddNodeRequest {
                            node_id,
                            address,
                            learner_only,
                        })
                        .await
                        .map_err(status_err)?
                        .into_inner();
                    print_status(&s);
                }
                ClusterCmd::Remove { node_id, socket } => {
                    let ch = connect(&socket.socket_path).await?;
                    let s = ClusterServiceClient::new(ch)
                        .remove_node(pb::RemoveNodeRequest { node_id })
                        .await
                        .map_err(status_err)?
                        .into_inner();
                    print_status(&s);
                }
            }
            Ok(())
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum EntryWrite {
    Create,
    Update,
}

/// `entry create` and `entry update`: one entry, one batch item, its status as the exit code.
async fn write_entry(
    op: EntryWrite,
    fields: &EntryFields,
    entry_id: &str,
    socket: &SocketArgs,
    out: &OutputArgs,
) -> anyhow::Result<()> {
    use pb::entry_service_client::EntryServiceClient;
    let json_out = check_output(out)?;
    let ch = connect(&socket.socket_path).await?;
    let server_id = server_id_of(fields)?;
    let entries = vec![entry_pb(fields, entry_id, server_id.as_deref())?];
    let mut client = EntryServiceClient::new(ch);
    let (verb, status, entry) = match op {
        EntryWrite::Create => {
            let r = client
                .batch_create_entry(pb::BatchCreateEntryRequest { entries })
                .await
                .map_err(status_err)?
                .into_inner();
            let res = r
                .results
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("empty response"))?;
            ("create", res.status, res.entry)
        }
        EntryWrite::Update => {
            let r = client
                .batch_update_entry(pb::BatchUpdateEntryRequest { entries })
                .await
                .map_err(status_err)?
                .into_inner();
            let res = r
                .results
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("empty response"))?;
            ("update", res.status, res.entry)
        }
    };
    let st = status.unwrap_or_default();
    if st.code != 0 {
        bail!("failed to {verb} entry: {}", st.message);
    }
    let e = entry.ok_or_else(|| anyhow!("empty response"))?;
    match (json_out, op) {
        (true, EntryWrite::Create) => println!(
            "{}",
            json!({"results": [{"status": {"code": 0, "message": "OK"}, "entry": entry_json(&e)}]})
        ),
        (true, EntryWrite::Update) => println!("{}", entry_json(&e)),
        (false, _) => print_entry(&e),
    }
    Ok(())
}

fn unreachable_cmd() -> anyhow::Result<()> {
    Err(anyhow!(
        "internal error: run and validate are not client commands"
    ))
}

/// `-node` registers under the server's ID; the trust domain comes from the SPIFFE ID.
fn server_id_of(f: &EntryFields) -> anyhow::Result<Option<String>> {
    if !f.node {
        return Ok(None);
    }
    let id = f
        .spiffe_id
        .as_deref()
        .ok_or_else(|| anyhow!("a SPIFFE ID is required (-spiffeID)"))?;
    let id = plinth_spiffe::SpiffeId::new(id).map_err(|e| anyhow!("invalid -spiffeID: {e}"))?;
    Ok(Some(
        crate::authz::server_id(&id.trust_domain()).to_string(),
    ))
}

fn write_secret(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = plinth_storage::create_private_file(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{go_time, mean_log_sync};

    #[test]
    fn times_print_as_spire_prints_them_and_out_of_range_ones_as_numbers() {
        assert_eq!(go_time(0), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(go_time(1_552_410_266), "2019-03-12 17:04:26 +0000 UTC");
        assert_eq!(go_time(1_796_408_593), "2026-12-04 18:23:13 +0000 UTC");
        assert_eq!(go_time(i64::MAX), i64::MAX.to_string());
    }

    #[test]
    fn mean_log_sync_is_per_sync_in_ms_and_absent_without_syncs() {
        assert_eq!(mean_log_sync(0, 0), None);
        assert_eq!(mean_log_sync(0, 500), None);
        assert_eq!(mean_log_sync(4, 1_000), Some(0.25));
        assert_eq!(mean_log_sync(1, 2_500), Some(2.5));
    }
}
