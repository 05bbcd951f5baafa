//! The `plinth-server` binary.

use clap::Parser;
use plinth_server::cli::{self, Cli, Cmd};
use plinth_server::config::Config;

/// mimalloc in place of glibc's malloc: allocation and free were about 12% of the leader's
/// CPU under load in `raft-bench` (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.to_ascii_lowercase()));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Runs a command on a runtime of its own: `run` on the one its config asks for
/// (`[server] worker_threads`), the others on tokio's default.
fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse_from(cli::normalize_args(std::env::args()));
    match cli.command {
        Cmd::Validate(a) => {
            Config::load(&a.config, a.expand_env)?;
            println!("Configuration is valid.");
            Ok(())
        }
        Cmd::Run(a) => {
            let cfg = Config::load(&a.config, a.expand_env)?;
            init_tracing(&cfg.file.server.log_level);
            let rt = plinth_server::run::runtime(cfg.file.server.worker_threads)?;
            tracing::info!(
                worker_threads = rt.metrics().num_workers(),
                "starting the runtime"
            );
            rt.block_on(async {
                let server = plinth_server::run::start(cfg).await?;
                shutdown_signal().await;
                tracing::info!("stopping");
                server.shutdown().await
            })
        }
        other => plinth_server::run::runtime(None)?.block_on(cli::client(other)),
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}
