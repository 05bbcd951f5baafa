//! End to end: workloads under their own UIDs (made with `setpriv`, we run as root) call the
//! Workload API through the `plinth-agent api` CLI; an entry with `unix:uid:<uid>` (or user,
//! group, supplementary group, path, sha256 selectors) is served to that workload and to no
//! other.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use common::*;
use plinth_agent::attest::unix::{UnixAttestor, UnixAttestorConfig};
use sha2::{Digest, Sha256};

/// The CLI copied where other users can run it (the build directory is under /root).
fn cli_copy(h: &Harness) -> PathBuf {
    let bin = h.dir.path().join("plinth-agent");
    if !bin.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_plinth-agent"), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

/// Runs the CLI as `uid`/`gid` with supplementary `groups` (empty: none).
fn run_as(bin: &Path, uid: u32, gid: u32, groups: &[u32], args: &[&str]) -> Output {
    let groups_arg = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!(
            "--groups={}",
            groups
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg(groups_arg)
        .arg("--")
        .arg(bin)
        .args(args)
        .output()
        .expect("setpriv (util-linux) must be installed")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_entry_for_a_uid_is_served_to_that_uid_only() {
    let h = Harness::start().await;
    h.add(entry(
        "e-app",
        "spiffe://example.org/app",
        &["unix:uid:4242"],
    ));
    h.add(entry(
        "e-grp",
        "spiffe://example.org/app-extra",
        &["unix:uid:4242", "unix:supplementary_gid:5001"],
    ));
    h.add(entry(
        "e-root",
        "spiffe://example.org/root",
        &["unix:uid:0"],
    ));
    let bin = cli_copy(&h);
    let sock = h.socket.to_str().unwrap().to_owned();
    let out_dir = h.dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::set_permissions(&out_dir, std::fs::Permissions::from_mode(0o777)).unwrap();

    let (bin2, sock2, out2) = (bin.clone(), sock.clone(), out_dir.clone());
    let o = tokio::task::spawn_blocking(move || {
        run_as(
            &bin2,
            4242,
            4242,
            &[5000, 5001],
            &[
                "api",
                "fetch",
                "x509",
                "-socketPath",
                &sock2,
                "-write",
                out2.to_str().unwrap(),
            ],
        )
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("spiffe://example.org/app\n"),
        "{}",
        text(&o)
    );
    assert!(
        stdout.contains("spiffe://example.org/app-extra"),
        "{}",
        text(&o)
    );
    assert!(!stdout.contains("example.org/root"), "{}", text(&o));

    // The files: chain, key (0600, owned by the workload), bundle.
    let key = out_dir.join("svid.0.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let key = plinth_spiffe::PrivateKey::from_pkcs8_pem(&key_pem).unwrap();
    let chain_pem = std::fs::read_to_string(out_dir.join("svid.0.pem")).unwrap();
    let chain = plinth_spiffe::pem::parse_all(&chain_pem, "CERTIFICATE").unwrap();
    use plinth_spiffe::Signer;
    assert_eq!(
        plinth_spiffe::x509::cert_public_key_spki(&chain[0]).unwrap(),
        key.public_key_spki()
    );
    let bundle_pem = std::fs::read_to_string(out_dir.join("bundle.0.pem")).unwrap();
    assert_eq!(
        plinth_spiffe::pem::parse_all(&bundle_pem, "CERTIFICATE").unwrap(),
        vec![h.domain.ca.cert_der().to_vec()]
    );

    // Without the supplementary group only the uid entry applies.
    let (bin3, sock3) = (bin.clone(), sock.clone());
    let o = tokio::task::spawn_blocking(move || {
        run_as(
            &bin3,
            4242,
            4242,
            &[],
            &["api", "fetch", "x509", "-socketPath", &sock3],
        )
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("spiffe://example.org/app\n"),
        "{}",
        text(&o)
    );
    assert!(!stdout.contains("app-extra"), "{}", text(&o));
    // Validity printed as SPIRE's `api fetch x509` prints it, for the SVID and its CA.
    for line in [
        "SVID Valid After:\t20",
        "SVID Valid Until:\t20",
        "CA #1 Valid After:\t20",
        "CA #1 Valid Until:\t20",
    ] {
        assert!(stdout.contains(line), "{line:?} in {}", text(&o));
    }
    assert!(stdout.contains(" +0000 UTC\n"), "{}", text(&o));

    // Another uid gets nothing.
    let o = tokio::task::spawn_blocking(move || {
        run_as(
            &bin,
            4343,
            4343,
            &[],
            &["api", "fetch", "x509", "-socketPath", &sock],
        )
    })
    .await
    .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no identity issued"),
        "{}",
        text(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_names_path_and_sha256_selectors() {
    let etc = tempfile::tempdir().unwrap();
    let passwd = etc.path().join("passwd");
    let group = etc.path().join("group");
    std::fs::write(
        &passwd,
        "root:x:0:0::/root:/bin/sh\napp:x:4242:4242::/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(&group, "root:x:0:\nappgrp:x:4242:\nextra:x:5001:app\n").unwrap();
    let attestor = UnixAttestor::new(UnixAttestorConfig {
        discover_workload_path: true,
        sha256_size_limit: Some(512 * 1024 * 1024),
        passwd_path: passwd.clone(),
        group_path: group.clone(),
    });
    let h = Harness::start_with(vec![Arc::new(attestor)]).await;
    let bin = cli_copy(&h);
    let digest = hex::encode(Sha256::digest(std::fs::read(&bin).unwrap()));
    let path_sel = format!("unix:path:{}", bin.display());
    let sha_sel = format!("unix:sha256:{digest}");
    h.add(entry(
        "e-names",
        "spiffe://example.org/by-name",
        &[
            "unix:user:app",
            "unix:group:appgrp",
            "unix:supplementary_group:extra",
        ],
    ));
    h.add(entry(
        "e-bin",
        "spiffe://example.org/by-binary",
        &["unix:uid:4242", &path_sel, &sha_sel],
    ));
    h.add(entry(
        "e-wrong-hash",
        "spiffe://example.org/wrong-hash",
        &["unix:uid:4242", &format!("unix:sha256:{}", "0".repeat(64))],
    ));
    let sock = h.socket.to_str().unwrap().to_owned();
    let o = tokio::task::spawn_blocking(move || {
        run_as(
            &bin,
            4242,
            4242,
            &[5001],
            &["api", "fetch", "x509", "-socketPath", &sock],
        )
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("spiffe://example.org/by-name"),
        "{}",
        text(&o)
    );
    assert!(
        stdout.contains("spiffe://example.org/by-binary"),
        "{}",
        text(&o)
    );
    assert!(!stdout.contains("wrong-hash"), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_executable_over_the_hash_size_limit_fails_attestation() {
    let attestor = UnixAttestor::new(UnixAttestorConfig {
        sha256_size_limit: Some(1024),
        ..UnixAttestorConfig::default()
    });
    let h = Harness::start_with(vec![Arc::new(attestor)]).await;
    h.add(entry("e", "spiffe://example.org/w", &["unix:uid:4242"]));
    let bin = cli_copy(&h);
    let sock = h.socket.to_str().unwrap().to_owned();
    let o = tokio::task::spawn_blocking(move || {
        run_as(
            &bin,
            4242,
            4242,
            &[],
            &["api", "fetch", "x509", "-socketPath", &sock],
        )
    })
    .await
    .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("Unavailable") || stderr.contains("unavailable"),
        "{}",
        text(&o)
    );
    assert!(stderr.contains("size limit"), "{}", text(&o));
}
