//! `plinth-agent api ...` against a real Workload API: SPIRE's flag spellings, the
//! SPIFFE_ENDPOINT_SOCKET fallback, fetch jwt + validate jwt round trip, bundles, watch.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use common::*;

async fn cli(args: Vec<String>, env_socket: Option<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_plinth-agent"));
        c.args(&args).env_remove("SPIFFE_ENDPOINT_SOCKET");
        if let Some(s) = env_socket {
            c.env("SPIFFE_ENDPOINT_SOCKET", s);
        }
        c.output().unwrap()
    })
    .await
    .unwrap()
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn show(o: &Output) -> String {
    format!(
        "{:?}\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The command succeeded and its output holds every one of `needles`.
fn assert_prints(o: &Output, needles: &[&str]) {
    assert!(o.status.success(), "{}", show(o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for needle in needles {
        assert!(stdout.contains(needle), "{needle:?}: {}", show(o));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t80_fetch_and_validate_jwt_and_bundles() {
    let h = Harness::start().await;
    let mut e = entry("e1", "spiffe://example.org/cli", &[&my_selector()]);
    e.federates_with = vec![plinth_spiffe::TrustDomain::new(FED_TD).unwrap()];
    h.add(e);
    let sock = h.socket.to_str().unwrap();

    // -socketPath given, Go-style flags.
    let o = cli(
        args(&[
            "api",
            "fetch",
            "jwt",
            "-audience",
            "svc-a",
            "-spiffeID",
            "spiffe://example.org/cli",
            "-socketPath",
            sock,
        ]),
        None,
    )
    .await;
    assert!(o.status.success(), "{}", show(&o));
    let stdout = String::from_utf8(o.stdout.clone()).unwrap();
    assert!(
        stdout.contains("token(spiffe://example.org/cli)"),
        "{}",
        show(&o)
    );
    let token = stdout
        .lines()
        .map(str::trim)
        .find(|l| l.split('.').count() == 3 && !l.contains(' '))
        .unwrap()
        .to_owned();

    // The socket through SPIFFE_ENDPOINT_SOCKET.
    let env = Some(format!("unix://{sock}"));
    let o = cli(
        args(&[
            "api",
            "validate",
            "jwt",
            "-audience",
            "svc-a",
            "-svid",
            &token,
        ]),
        env.clone(),
    )
    .await;
    assert!(o.status.success(), "{}", show(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("SVID is valid."), "{}", show(&o));
    assert!(stdout.contains("spiffe://example.org/cli"), "{}", show(&o));

    let o = cli(
        args(&[
            "api",
            "validate",
            "jwt",
            "-audience",
            "other",
            "-svid",
            &token,
        ]),
        env.clone(),
    )
    .await;
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("audience"),
        "{}",
        show(&o)
    );

    let o = cli(args(&["api", "fetch", "bundles"]), env.clone()).await;
    assert_prints(
        &o,
        &[
            "X.509 bundle of example.org",
            "X.509 bundle of partner.test",
            "JWT bundle of example.org",
            JWT_KID,
            "BEGIN CERTIFICATE",
        ],
    );

    // The X509-SVID with the federated bundle its entry asks for: each CA's validity under
    // its trust domain, as SPIRE prints it.
    let o = cli(args(&["api", "fetch", "x509"]), env.clone()).await;
    assert_prints(
        &o,
        &[
            "SPIFFE ID:\t\tspiffe://example.org/cli\n",
            "SVID Valid After:\t20",
            "CA #1 Valid Until:\t20",
            &format!("[{FED_TD}] CA #1 Valid After:\t20"),
            &format!("[{FED_TD}] CA #1 Valid Until:\t20"),
        ],
    );

    // No socket anywhere: a clear error, not a hang.
    let o = cli(
        args(&[
            "api",
            "fetch",
            "x509",
            "-socketPath",
            "/nonexistent/api.sock",
            "-timeout",
            "2",
        ]),
        None,
    )
    .await;
    assert!(!o.status.success(), "{}", show(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t80_watch_prints_each_update() {
    let h = Harness::start().await;
    h.add(entry("e1", "spiffe://example.org/first", &[&my_selector()]));
    let mut child = Command::new(env!("CARGO_BIN_EXE_plinth-agent"))
        .args(["api", "watch", "-socketPath", h.socket.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    wait_for(&mut rx, "spiffe://example.org/first").await;
    h.add(entry(
        "e2",
        "spiffe://example.org/second",
        &[&my_selector()],
    ));
    wait_for(&mut rx, "spiffe://example.org/second").await;
    child.kill().unwrap();
    child.wait().unwrap();
}

async fn wait_for(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, needle: &str) {
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Some(l) = rx.recv().await {
            if l.contains(needle) {
                return;
            }
        }
        panic!("watch ended before printing {needle}");
    })
    .await
    .expect("watch printed nothing new")
}
