//! The `plinth-agent` binary: `run -config agent.toml [-joinToken T]` runs the agent,
//! `validate -config agent.toml` checks a config, `healthcheck` checks that a running agent's
//! Workload API answers, `debug info` reads the admin socket (SPIRE's Debug API), and the `api`
//! commands talk to that Workload API like
//! `spire-agent api ...` (same flag spellings: `-socketPath`, `-write`, `-audience`, `-spiffeID`,
//! `-svid`; Go-style single-dash long flags are accepted).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use plinth_agent::client::{connect, socket_path_from_addr, WorkloadClient};
use plinth_agent::config::Config;
use plinth_api::convert::{x509_bundles, ReceivedX509Svid};
use plinth_api::spire::agent::debug::v1::debug_client::DebugClient;
use plinth_api::spire::agent::debug::v1::{GetInfoRequest, GetInfoResponse};
use plinth_api::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
    X509svidResponse, ENDPOINT_SOCKET_ENV,
};
use plinth_spiffe::x509::{cert_validity, display_time};
use plinth_spiffe::BundleSet;

/// Where `plinth-agent api` looks for the socket when neither `-socketPath` nor
/// `SPIFFE_ENDPOINT_SOCKET` says.
const DEFAULT_SOCKET_PATH: &str = "/tmp/plinth-agent/public/api.sock";
/// Where `plinth-agent debug` looks for the admin socket unless `-socketPath` says.
const DEFAULT_ADMIN_SOCKET_PATH: &str = "/tmp/plinth-agent/private/admin.sock";

#[derive(Debug, Parser)]
#[command(name = "plinth-agent", version, about = "The plinth node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// Path of the agent's TOML config.
        #[arg(long = "config", default_value = "agent.toml")]
        config: PathBuf,
        /// Join token to attest with (overrides node_attestor.join_token.token).
        #[arg(long = "joinToken")]
        join_token: Option<String>,
    },
    /// Check a config file and exit.
    Validate {
        /// Path of the agent's TOML config.
        #[arg(long = "config", default_value = "agent.toml")]
        config: PathBuf,
    },
    /// Check that a running agent's Workload API answers (like `spire-agent healthcheck`).
    Healthcheck(Common),
    /// Talk to the Workload API of a running agent.
    Api {
        #[command(subcommand)]
        command: ApiCommand,
    },
    /// Read a running agent's admin socket (admin_socket_path).
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DebugCommand {
    /// What the agent holds: its SVID chain, uptime, cached SVIDs, last sync (SPIRE's
    /// Debug.GetInfo).
    Info {
        /// Path of the admin socket (default /tmp/plinth-agent/private/admin.sock).
        #[arg(long = "socketPath")]
        socket_path: Option<PathBuf>,
        /// Output format: pretty or json.
        #[arg(long = "output", default_value = "pretty")]
        output: String,
        /// Seconds to wait for an answer.
        #[arg(long = "timeout", default_value_t = 5)]
        timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ApiCommand {
    /// Fetch SVIDs or bundles.
    Fetch {
        #[command(subcommand)]
        what: FetchWhat,
    },
    /// Validate a token.
    Validate {
        #[command(subcommand)]
        what: ValidateWhat,
    },
    /// Print every X509-SVID update as the agent pushes it.
    Watch(Common),
}

#[derive(Debug, Subcommand)]
enum FetchWhat {
    /// Fetch X509-SVIDs, and write them to a directory with -write.
    X509 {
        #[command(flatten)]
        common: Common,
        /// Directory to write svid.N.pem, svid.N.key, bundle.N.pem and federated bundles to.
        #[arg(long = "write")]
        write: Option<PathBuf>,
        /// Print nothing unless an error occurs.
        #[arg(long = "silent")]
        silent: bool,
    },
    /// Fetch a JWT-SVID.
    Jwt {
        #[command(flatten)]
        common: Common,
        /// Audience of the token (repeat for several).
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        /// SPIFFE ID of the token to fetch; every identity when absent.
        #[arg(long = "spiffeID")]
        spiffe_id: Option<String>,
    },
    /// Fetch the X.509 and JWT bundles.
    Bundles(Common),
}

#[derive(Debug, Subcommand)]
enum ValidateWhat {
    /// Validate a JWT-SVID.
    Jwt {
        #[command(flatten)]
        common: Common,
        /// The audience the token must be for.
        #[arg(long = "audience")]
        audience: String,
        /// The token.
        #[arg(long = "svid")]
        svid: String,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// Path of the Workload API socket (default: SPIFFE_ENDPOINT_SOCKET, else
    /// /tmp/plinth-agent/public/api.sock).
    #[arg(long = "socketPath")]
    socket_path: Option<PathBuf>,
    /// Seconds to wait for an answer.
    #[arg(long = "timeout", default_value_t = 5)]
    timeout: u64,
}

impl Common {
    fn socket(&self) -> Result<PathBuf> {
        if let Some(p) = &self.socket_path {
            return Ok(p.clone());
        }
        match std::env::var(ENDPOINT_SOCKET_ENV) {
            Ok(addr) => socket_path_from_addr(&addr)
                .with_context(|| format!("{ENDPOINT_SOCKET_ENV}={addr:?} is not a unix socket")),
            Err(_) => Ok(PathBuf::from(DEFAULT_SOCKET_PATH)),
        }
    }

    fn client(&self) -> Result<WorkloadClient> {
        let path = self.socket()?;
        connect(&path).with_context(|| format!("connecting to {}", path.display()))
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout.max(1))
    }
}

/// Go's flag package accepts `-name value`; clap wants `--name`. Rewrites single-dash long flags.
fn go_style_args(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest_literal = false;
    for a in args {
        if rest_literal {
            out.push(a);
            continue;
        }
        if a == "--" {
            rest_literal = true;
        }
        let is_go_long = a.len() > 2
            && a.starts_with('-')
            && !a.starts_with("--")
            && a.as_bytes()[1].is_ascii_alphabetic();
        out.push(if is_go_long { format!("-{a}") } else { a });
    }
    out
}

fn status_err(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", e.code(), e.message())
}

async fn first_x509(client: &mut WorkloadClient, timeout: Duration) -> Result<X509svidResponse> {
    let fut = async {
        let mut stream = client
            .fetch_x509svid(X509svidRequest {})
            .await
            .map_err(status_err)?
            .into_inner();
        stream
            .message()
            .await
            .map_err(status_err)?
            .context("the agent closed the stream without an answer")
    };
    tokio::time::timeout(timeout, fut)
        .await
        .context("timed out waiting for the Workload API")?
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // The mode above applies only to new files; tighten an existing one too.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(contents)?;
    Ok(())
}

/// A certificate's validity as SPIRE's `api fetch x509` prints it: `<label> Valid After:` and
/// `<label> Valid Until:` lines.
fn print_validity(label: &str, der: &[u8]) -> Result<()> {
    let (after, until) = cert_validity(der)?;
    println!("{label} Valid After:\t{}", display_time(after));
    println!("{label} Valid Until:\t{}", display_time(until));
    Ok(())
}

fn print_svids(resp: &X509svidResponse, write: Option<&Path>, silent: bool) -> Result<()> {
    let svids = resp
        .svids
        .iter()
        .map(ReceivedX509Svid::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    let federated = x509_bundles(&resp.federated_bundles)?;
    for (i, svid) in svids.iter().enumerate() {
        if !silent {
            println!("SPIFFE ID:\t\t{}", svid.spiffe_id);
            if !svid.hint.is_empty() {
                println!("Hint:\t\t\t{}", svid.hint);
            }
            // As SPIRE's `api fetch x509` prints them: each certificate's validity.
            print_validity("SVID", &svid.chain[0])?;
            for (n, c) in svid.chain.iter().skip(1).enumerate() {
                print_validity(&format!("Intermediate #{}", n + 1), c)?;
            }
            for (n, c) in svid.bundle.iter().enumerate() {
                print_validity(&format!("CA #{}", n + 1), c)?;
            }
            for b in federated.iter() {
                for (n, c) in b.x509_authorities().iter().enumerate() {
                    print_validity(&format!("[{}] CA #{}", b.trust_domain(), n + 1), c)?;
                }
            }
            println!();
        }
        if let Some(dir) = write {
            let chain = plinth_spiffe::pem::encode_certs(&svid.chain);
            write_file(&dir.join(format!("svid.{i}.pem")), chain.as_bytes(), 0o644)?;
            let key = svid.private_key.to_pkcs8_pem();
            write_file(&dir.join(format!("svid.{i}.key")), key.as_bytes(), 0o600)?;
            let bundle = plinth_spiffe::pem::encode_certs(&svid.bundle);
            write_file(
                &dir.join(format!("bundle.{i}.pem")),
                bundle.as_bytes(),
                0o644,
            )?;
            for (j, b) in federated.iter().enumerate() {
                write_file(
                    &dir.join(format!("federated_bundle.{i}.{j}.pem")),
                    b.x509_pem().as_bytes(),
                    0o644,
                )?;
            }
            if !silent {
                println!("Writing SVID #{i} to {}", dir.display());
            }
        }
    }
    Ok(())
}

fn load_config(path: &Path, join_token: Option<String>) -> Result<Config> {
    Ok(Config::load(path)?.with_join_token(join_token)?)
}

fn run_agent(cfg: Config) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // The configured level for plinth; transport crates stay quiet below info.
        let l = &cfg.log_level;
        tracing_subscriber::EnvFilter::new(format!(
            "{l},h2=info,hyper=info,hyper_util=info,tower=info,rustls=info,tonic=info"
        ))
    });
    // Colour only on a terminal: logs redirected to a file or journald stay plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = async {
            let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
            match term {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        plinth_agent::runtime::run(cfg, shutdown).await
    })?;
    Ok(())
}

/// The agent is healthy when its Workload API, called as a workload would (security header
/// included), answers: with SVIDs, or with PermissionDenied when this caller has no identity.
/// Anything else (no socket, no answer in time, Unavailable while the agent can't attest or
/// serve, any other error) is unhealthy.
async fn healthcheck(common: &Common) -> Result<()> {
    let socket = common.socket()?;
    let mut client = common.client()?;
    let call = async {
        let mut stream = client
            .fetch_x509svid(X509svidRequest {})
            .await?
            .into_inner();
        match stream.message().await? {
            Some(_) => Ok(()),
            None => Err(tonic::Status::unavailable(
                "the agent closed the stream without an answer",
            )),
        }
    };
    match tokio::time::timeout(common.timeout(), call).await {
        Err(_) => bail!(
            "no answer from the Workload API at {} within {:?}",
            socket.display(),
            common.timeout()
        ),
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.code() == tonic::Code::PermissionDenied => Ok(()),
        Ok(Err(e)) => {
            Err(status_err(e)).with_context(|| format!("Workload API at {}", socket.display()))
        }
    }
}

fn format_time(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!("{t} ({unix})"),
        Err(_) => unix.to_string(),
    }
}

// `svids_count` is deprecated in SPIRE's proto but still filled and shown, as SPIRE does.
#[allow(deprecated)]
fn info_json(info: &GetInfoResponse) -> serde_json::Value {
    let chain: Vec<serde_json::Value> = info
        .svid_chain
        .iter()
        .map(|c| {
            serde_json::json!({
                "id": c.id.as_ref().map(|id| serde_json::json!({
                    "trust_domain": id.trust_domain, "path": id.path
                })),
                "expires_at": c.expires_at,
                "subject": c.subject,
            })
        })
        .collect();
    serde_json::json!({
        "svid_chain": chain,
        "uptime": info.uptime,
        "svids_count": info.svids_count,
        "last_sync_success": info.last_sync_success,
        "cached_x509_svids_count": info.cached_x509_svids_count,
        "cached_jwt_svids_count": info.cached_jwt_svids_count,
        "cached_svidstore_x509_svids_count": info.cached_svidstore_x509_svids_count,
    })
}

fn print_info(info: &GetInfoResponse) {
    println!("Uptime:\t\t\t{}s", info.uptime);
    let last = if info.last_sync_success == 0 {
        "never".to_owned()
    } else {
        format_time(info.last_sync_success)
    };
    println!("Last sync success:\t{last}");
    println!("Cached X509-SVIDs:\t{}", info.cached_x509_svids_count);
    println!("Cached JWT-SVIDs:\t{}", info.cached_jwt_svids_count);
    println!(
        "Agent SVID chain:\t{} certificate(s)",
        info.svid_chain.len()
    );
    for (i, c) in info.svid_chain.iter().enumerate() {
        let id =
            c.id.as_ref()
                .map(|id| format!("spiffe://{}{}", id.trust_domain, id.path))
                .unwrap_or_else(|| "-".into());
        println!("  [{i}] SPIFFE ID:\t{id}");
        println!("      Subject:\t{}", c.subject);
        println!("      Expires at:\t{}", format_time(c.expires_at));
    }
}

async fn debug_info(socket: &Path, output: &str, timeout: Duration) -> Result<()> {
    let json = match output {
        "pretty" => false,
        "json" => true,
        other => bail!("invalid output format {other:?}; use pretty or json"),
    };
    let channel = plinth_agent::client::channel(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let mut client = DebugClient::new(channel);
    let call = client.get_info(GetInfoRequest {});
    let info = tokio::time::timeout(timeout, call)
        .await
        .with_context(|| format!("no answer from the admin socket {}", socket.display()))?
        .map_err(status_err)
        .with_context(|| format!("admin socket {}", socket.display()))?
        .into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&info_json(&info))?);
    } else {
        print_info(&info);
    }
    Ok(())
}

async fn run(command: Command) -> Result<()> {
    if let Command::Debug {
        command:
            DebugCommand::Info {
                socket_path,
                output,
                timeout,
            },
    } = &command
    {
        let socket = socket_path
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET_PATH));
        return debug_info(&socket, output, Duration::from_secs((*timeout).max(1))).await;
    }
    if let Command::Healthcheck(common) = &command {
        return match healthcheck(common).await {
            Ok(()) => {
                println!("Agent is healthy.");
                Ok(())
            }
            Err(e) => bail!("Agent is unhealthy: {e:#}"),
        };
    }
    let Command::Api { command } = command else {
        bail!("not an api command");
    };
    match command {
        ApiCommand::Fetch {
            what:
                FetchWhat::X509 {
                    common,
                    write,
                    silent,
                },
        } => {
            let mut client = common.client()?;
            let start = Instant::now();
            let resp = first_x509(&mut client, common.timeout()).await?;
            if !silent {
                println!(
                    "Received {} svid after {:?}\n",
                    resp.svids.len(),
                    start.elapsed()
                );
            }
            print_svids(&resp, write.as_deref(), silent)
        }
        ApiCommand::Fetch {
            what:
                FetchWhat::Jwt {
                    common,
                    audience,
                    spiffe_id,
                },
        } => {
            let mut client = common.client()?;
            let req = JwtsvidRequest {
                audience,
                spiffe_id: spiffe_id.unwrap_or_default(),
            };
            let resp = tokio::time::timeout(common.timeout(), client.fetch_jwtsvid(req))
                .await
                .context("timed out waiting for the Workload API")?
                .map_err(status_err)?
                .into_inner();
            for svid in resp.svids {
                // Printing the token is what the user asked for.
                println!("token({}):\n\t{}\n", svid.spiffe_id, svid.svid);
                if !svid.hint.is_empty() {
                    println!("hint:\t{}\n", svid.hint);
                }
            }
            Ok(())
        }
        ApiCommand::Fetch {
            what: FetchWhat::Bundles(common),
        } => {
            let mut client = common.client()?;
            let fut = async {
                let x509 = client
                    .fetch_x509_bundles(X509BundlesRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner()
                    .message()
                    .await
                    .map_err(status_err)?
                    .context("no X.509 bundles")?;
                let jwt = client
                    .fetch_jwt_bundles(JwtBundlesRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner()
                    .message()
                    .await
                    .map_err(status_err)?
                    .context("no JWT bundles")?;
                anyhow::Ok((x509, jwt))
            };
            let (x509, jwt) = tokio::time::timeout(common.timeout(), fut)
                .await
                .context("timed out waiting for the Workload API")??;
            for b in x509_bundles(&x509.bundles)?.iter() {
                println!("X.509 bundle of {}:\n{}", b.trust_domain(), b.x509_pem());
            }
            for b in BundleSet::try_from(&jwt)?.iter() {
                println!("JWT bundle of {}:\n{}\n", b.trust_domain(), b.to_jwks()?);
            }
            Ok(())
        }
        ApiCommand::Validate {
            what:
                ValidateWhat::Jwt {
                    common,
                    audience,
                    svid,
                },
        } => {
            let mut client = common.client()?;
            let req = ValidateJwtsvidRequest { audience, svid };
            let resp = tokio::time::timeout(common.timeout(), client.validate_jwtsvid(req))
                .await
                .context("timed out waiting for the Workload API")?
                .map_err(status_err)?
                .into_inner();
            println!("SVID is valid.");
            println!("SPIFFE ID : {}", resp.spiffe_id);
            let claims: Vec<String> = resp
                .claims
                .map(|c| c.fields.keys().cloned().collect())
                .unwrap_or_default();
            println!("Claims    : {}", claims.join(", "));
            Ok(())
        }
        ApiCommand::Watch(common) => {
            let mut client = common.client()?;
            let mut stream = client
                .fetch_x509svid(X509svidRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            while let Some(resp) = stream.message().await.map_err(status_err)? {
                println!("Received {} svid(s)", resp.svids.len());
                print_svids(&resp, None, false)?;
                std::io::stdout().flush()?;
            }
            bail!("the agent closed the stream")
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(go_style_args(std::env::args()));
    let report = |outcome: Result<()>| match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plinth-agent: {e:#}");
            ExitCode::FAILURE
        }
    };
    let command = match cli.command {
        Command::Run { config, join_token } => {
            return report(load_config(&config, join_token).and_then(run_agent))
        }
        Command::Validate { config } => {
            return report(load_config(&config, None).map(|_| {
                println!("Configuration is valid.");
            }))
        }
        api => api,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("plinth-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plinth-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_flags_become_clap_long_flags() {
        let args = [
            "plinth-agent",
            "api",
            "fetch",
            "jwt",
            "-audience",
            "a",
            "--timeout",
            "3",
        ]
        .map(String::from);
        assert_eq!(
            go_style_args(args.into_iter()),
            [
                "plinth-agent",
                "api",
                "fetch",
                "jwt",
                "--audience",
                "a",
                "--timeout",
                "3"
            ]
        );
        let args = ["x", "-socketPath=/a", "-", "-1", "--", "-svid"].map(String::from);
        assert_eq!(
            go_style_args(args.into_iter()),
            ["x", "--socketPath=/a", "-", "-1", "--", "-svid"]
        );
    }

    #[test]
    fn cli_parses_spire_spellings() {
        let args = go_style_args(
            [
                "plinth-agent",
                "api",
                "fetch",
                "jwt",
                "-audience",
                "a",
                "-audience",
                "b",
                "-spiffeID",
                "spiffe://example.org/w",
                "-socketPath",
                "/s",
            ]
            .map(String::from)
            .into_iter(),
        );
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string());
        let Ok(Cli {
            command:
                Command::Api {
                    command:
                        ApiCommand::Fetch {
                            what:
                                FetchWhat::Jwt {
                                    common,
                                    audience,
                                    spiffe_id,
                                },
                        },
                },
        }) = cli
        else {
            panic!("unexpected parse: {cli:?}")
        };
        assert_eq!(audience, ["a", "b"]);
        assert_eq!(spiffe_id.as_deref(), Some("spiffe://example.org/w"));
        assert_eq!(common.socket_path, Some(PathBuf::from("/s")));
    }
}
