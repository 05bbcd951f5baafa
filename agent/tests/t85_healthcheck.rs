//! `plinth-agent healthcheck` (issue 5 item 6): healthy when the Workload API answers a call
//! made with the security header (SVIDs, or PermissionDenied for a caller without identity);
//! one error line and a non-zero exit when there is no socket, no answer, or no Workload API.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

async fn healthcheck(socket: &Path) -> Output {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_plinth-agent"))
            .arg("healthcheck")
            .arg("-socketPath")
            .arg(&socket)
            .args(["-timeout", "1"])
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn assert_healthy(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "Agent is healthy.\n");
}

/// Fails with exactly one line on stderr; returns it.
fn assert_unhealthy(o: &Output) -> String {
    assert!(!o.status.success());
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(
        err.starts_with("plinth-agent: Agent is unhealthy: "),
        "{err:?}"
    );
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t85_healthcheck_reports_a_serving_agent_healthy() {
    let h = Harness::start().await;
    // The caller has no identity: the Workload API still answers (PermissionDenied).
    assert_healthy(&healthcheck(&h.socket).await);
    // The caller has an SVID.
    h.add(entry("e1", "spiffe://example.org/hc", &[&my_selector()]));
    assert_healthy(&healthcheck(&h.socket).await);
    // SPIFFE_ENDPOINT_SOCKET is used without -socketPath.
    let socket = format!("unix://{}", h.socket.display());
    let o = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_plinth-agent"))
            .arg("healthcheck")
            .env("SPIFFE_ENDPOINT_SOCKET", socket)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_healthy(&o);

    // Once the agent has stopped serving, it is unhealthy.
    let socket = h.socket.clone();
    h.stop().await;
    assert_unhealthy(&healthcheck(&socket).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t85_healthcheck_fails_without_a_workload_api() {
    let dir = tempfile::tempdir().unwrap();

    // No socket at all.
    let missing = dir.path().join("missing.sock");
    let err = assert_unhealthy(&healthcheck(&missing).await);
    assert!(err.contains(&missing.display().to_string()), "{err}");

    // A socket whose listener accepts but never answers.
    let silent = dir.path().join("silent.sock");
    let listener = tokio::net::UnixListener::bind(&silent).unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            conns.push(c);
        }
    });
    let err = assert_unhealthy(&healthcheck(&silent).await);
    assert!(err.contains("no answer"), "{err}");
    held.abort();

    // A socket that is not a gRPC server: connections are closed at once.
    let closing = dir.path().join("closing.sock");
    let listener = tokio::net::UnixListener::bind(&closing).unwrap();
    let closer = tokio::spawn(async move {
        while let Ok((c, _)) = listener.accept().await {
            drop(c);
        }
    });
    assert_unhealthy(&healthcheck(&closing).await);
    closer.abort();
}
