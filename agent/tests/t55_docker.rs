//! The docker workload attestor against the real Docker engine: a container labelled
//! `app=demo` gets the entry for `docker:label:app:demo` through the Workload API, a container
//! labelled `app=other` does not, and the selectors the attestor computes for a containerised
//! caller are the container's labels, environment and image. A caller outside any container gets
//! no docker selectors; a containerised caller whose daemon cannot be reached is not attested.
//!
//! No registry is needed: the image is imported from a tarball holding empty directories, and
//! the workload is the `plinth-agent` binary itself, bind-mounted with the host's libraries.
//! Docker must work here: without it this test fails, it does not skip.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use common::*;
use plinth_agent::attest::docker::{DockerAttestor, DockerAttestorConfig};
use plinth_agent::attest::unix::UnixAttestor;
use plinth_agent::attest::{Peer, WorkloadAttestor};
use plinth_spiffe::Selectors;

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI must be installed")
}

/// Everything this test made in Docker; removed on drop, also when the test fails.
struct DockerObjects {
    prefix: String,
    image: String,
    containers: std::sync::Mutex<Vec<String>>,
}

impl DockerObjects {
    /// Imports a tiny image (empty directories only) from a tarball.
    fn new(dir: &Path) -> Self {
        let v = docker(&["version"]);
        assert!(v.status.success(), "Docker must be usable: {}", text(&v));
        let prefix = format!("plinth-t55-{}", std::process::id());
        let root = dir.join("rootfs");
        for d in ["sock", "probe", "etc", "tmp"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let tar = dir.join("rootfs.tar");
        let o = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let image = format!("{prefix}:test");
        let objects = Self {
            prefix,
            image: image.clone(),
            containers: Default::default(),
        };
        let o = docker(&["import", tar.to_str().unwrap(), &image]);
        assert!(o.status.success(), "docker import: {}", text(&o));
        objects
    }

    /// Runs `plinth-agent <args>` in a new container; waits for it; its output.
    fn run(&self, name: &str, extra: &[&str], mounts: &[(&Path, &str)], args: &[&str]) -> Output {
        let name = format!("{}-{name}", self.prefix);
        self.containers.lock().unwrap().push(name.clone());
        let bin = env!("CARGO_BIN_EXE_plinth-agent");
        let mut cmd = Command::new("docker");
        cmd.args(["run", "--name", &name, "--network", "none"]);
        cmd.args(extra);
        cmd.args(["-v", &format!("{bin}:/plinth-agent:ro")]);
        // The binary is dynamically linked: lend it the host's libraries.
        for lib in ["/lib", "/lib64", "/usr/lib", "/usr/lib64"] {
            if Path::new(lib).exists() {
                cmd.args(["-v", &format!("{lib}:{lib}:ro")]);
            }
        }
        for (host, inside) in mounts {
            cmd.args(["-v", &format!("{}:{inside}", host.display())]);
        }
        cmd.arg(&self.image).arg("/plinth-agent").args(args);
        cmd.output().expect("docker run")
    }
}

impl Drop for DockerObjects {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.containers.lock().unwrap_or_else(|e| e.into_inner()));
        for name in names {
            let _ = docker(&["rm", "-f", &name]);
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

fn strings(s: &Selectors) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

/// Attests the caller of `stream` with `attestors`.
async fn attest_caller(
    stream: tokio::net::UnixStream,
    attestors: Vec<Arc<dyn WorkloadAttestor>>,
) -> Vec<Result<Selectors, String>> {
    let peer = Peer::from_stream(&stream).unwrap();
    let results = tokio::task::spawn_blocking(move || {
        attestors
            .iter()
            .map(|a| a.attest(&peer).map_err(|e| e.to_string()))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    drop(stream);
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t55_docker_label_entry_is_served_to_that_container_only() {
    let docker_attestor: Arc<dyn WorkloadAttestor> = Arc::new(DockerAttestor::default());
    let h = Harness::start_with(vec![
        Arc::new(UnixAttestor::default()),
        docker_attestor.clone(),
    ])
    .await;
    h.add(entry(
        "e-demo",
        "spiffe://example.org/demo",
        &["docker:label:app:demo"],
    ));
    h.add(entry(
        "e-demo-env",
        "spiffe://example.org/demo-env",
        &["docker:label:app:demo", "docker:env:PLINTH_T55=yes"],
    ));
    h.add(entry(
        "e-never",
        "spiffe://example.org/never",
        &["docker:label:app:nobody"],
    ));
    let objects = Arc::new(DockerObjects::new(h.dir.path()));
    let public = h.socket.parent().unwrap().to_path_buf();
    let fetch = ["api", "fetch", "x509", "-socketPath", "/sock/api.sock"];

    // The demo container gets its entries (and only those).
    let (o2, p2) = (objects.clone(), public.clone());
    let o = tokio::task::spawn_blocking(move || {
        o2.run(
            "demo",
            &["--label", "app=demo", "-e", "PLINTH_T55=yes"],
            &[(&p2, "/sock")],
            &fetch,
        )
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("spiffe://example.org/demo\n"),
        "{}",
        text(&o)
    );
    assert!(
        stdout.contains("spiffe://example.org/demo-env"),
        "{}",
        text(&o)
    );
    assert!(!stdout.contains("example.org/never"), "{}", text(&o));

    // Same label without the environment variable: the env entry is not served.
    let (o2, p2) = (objects.clone(), public.clone());
    let o = tokio::task::spawn_blocking(move || {
        o2.run(
            "demo-noenv",
            &["--label", "app=demo"],
            &[(&p2, "/sock")],
            &fetch,
        )
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("spiffe://example.org/demo\n"),
        "{}",
        text(&o)
    );
    assert!(!stdout.contains("demo-env"), "{}", text(&o));

    // Another label: nothing.
    let (o2, p2) = (objects.clone(), public.clone());
    let o = tokio::task::spawn_blocking(move || {
        o2.run(
            "other",
            &["--label", "app=other"],
            &[(&p2, "/sock")],
            &fetch,
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

    // The selectors themselves: a probe socket the container connects to; we attest the caller
    // with the docker attestor and with one whose daemon socket does not exist.
    let probe_dir = h.dir.path().join("probe");
    std::fs::create_dir(&probe_dir).unwrap();
    let listener = tokio::net::UnixListener::bind(probe_dir.join("probe.sock")).unwrap();
    let broken: Arc<dyn WorkloadAttestor> = Arc::new(DockerAttestor::new(DockerAttestorConfig {
        docker_socket_path: h.dir.path().join("no-docker.sock"),
        ..DockerAttestorConfig::default()
    }));
    let (o2, pd) = (objects.clone(), probe_dir.clone());
    let container = tokio::task::spawn_blocking(move || {
        o2.run(
            "probe",
            &[
                "--label",
                "app=demo",
                "--label",
                "tier=a:b",
                "-e",
                "PLINTH_T55=yes",
            ],
            &[(&pd, "/probe")],
            &["api", "fetch", "x509", "-socketPath", "/probe/probe.sock"],
        )
    });
    let mut container = std::pin::pin!(container);
    // The container either connects or exits (then its output says why).
    let stream = tokio::select! {
        accepted = listener.accept() => accepted.unwrap().0,
        exited = &mut container => panic!("the probe container never connected: {}", text(&exited.unwrap())),
    };
    let results = attest_caller(stream, vec![docker_attestor.clone(), broken.clone()]).await;
    let _ = container.await.unwrap();
    let selectors = strings(results[0].as_ref().unwrap());
    for want in [
        "docker:label:app:demo",
        "docker:label:tier:a:b",
        "docker:env:PLINTH_T55=yes",
    ] {
        assert!(
            selectors.iter().any(|s| s == want),
            "{want} in {selectors:?}"
        );
    }
    let image_id = docker(&["image", "inspect", "-f", "{{.Id}}", &objects.image]);
    assert!(image_id.status.success(), "{}", text(&image_id));
    let image_id = String::from_utf8_lossy(&image_id.stdout).trim().to_owned();
    assert!(
        selectors.contains(&format!("docker:image_config_digest:{image_id}")),
        "{selectors:?}"
    );
    assert!(
        selectors.contains(&format!("docker:image_id:{}", objects.image)),
        "{selectors:?}"
    );
    assert!(
        selectors.iter().all(|s| s.starts_with("docker:")),
        "{selectors:?}"
    );
    // In a container, but the daemon is unreachable: an attestation failure, not "no selectors".
    let err = results[1].as_ref().unwrap_err();
    assert!(err.contains("Docker API"), "{err}");

    // A caller outside any container: no docker selectors, and no error.
    let me = std::os::unix::net::UnixStream::connect(probe_dir.join("probe.sock")).unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    let results = attest_caller(stream, vec![docker_attestor, broken]).await;
    drop(me);
    for r in results {
        assert!(r.as_ref().unwrap().is_empty(), "{r:?}");
    }

    h.stop().await;
    drop(objects);
}
