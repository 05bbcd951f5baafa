//! The container side of the harness: a server image built from a local binary (no registry:
//! the binary, the libraries `ldd` lists and the loader, loaded with `docker import`), a
//! private network with fixed addresses, and the faults containers make possible on top of
//! kill and pause: disconnecting a node from the network (a real partition).
//!
//! Everything runs through the `docker` command line; every container and network this module
//! creates carries the run's name prefix and is removed by [`DockerRun::cleanup`].

use std::path::Path;
use std::process::{Command, Stdio};

use crate::cluster::ClusterError;

fn docker(args: &[&str]) -> Result<String, ClusterError> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ClusterError::Api(format!("running docker: {e}")))?;
    if !out.status.success() {
        return Err(ClusterError::Api(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether a Docker engine answers.
pub fn available() -> bool {
    docker(&["version", "--format", "{{.Server.Version}}"]).is_ok()
}

/// Builds (or reuses) an image holding `bin` at /usr/local/bin/plinth-server with the shared
/// libraries it loads; returns its tag (`plinth-chaos-server:<size>-<mtime>`).
pub fn build_server_image(bin: &Path) -> Result<String, ClusterError> {
    let meta = std::fs::metadata(bin)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let tag = format!("plinth-chaos-server:{}-{mtime}", meta.len());
    if docker(&["image", "inspect", "--format", "{{.Id}}", &tag]).is_err() {
        import_server_image(bin, &tag)?;
    }
    // Older harness images (from earlier server builds) only take space: remove them (one
    // still used by a concurrent run stays: `docker rmi` refuses, which is fine).
    if let Ok(tags) = docker(&["images", "plinth-chaos-server", "--format", "{{.Tag}}"]) {
        for old in tags
            .lines()
            .filter(|t| format!("plinth-chaos-server:{t}") != tag)
        {
            let _ = docker(&["rmi", &format!("plinth-chaos-server:{old}")]);
        }
    }
    Ok(tag)
}

/// Assembles the root filesystem for `bin` and loads it as `tag`.
fn import_server_image(bin: &Path, tag: &str) -> Result<(), ClusterError> {
    let root = tempfile::Builder::new()
        .prefix("plinth-chaos-image-")
        .tempdir()?;
    let r = root.path();
    let copy = |src: &Path, dest: &str| -> Result<(), ClusterError> {
        let to = r.join(dest.trim_start_matches('/'));
        if let Some(d) = to.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::copy(std::fs::canonicalize(src)?, &to)?;
        Ok(())
    };
    copy(bin, "/usr/local/bin/plinth-server")?;
    let ldd = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| ClusterError::Api(format!("running ldd: {e}")))?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libfoo.so.1 => /lib/x/libfoo.so.1 (0x..)" or "/lib64/ld-linux-x86-64.so.2 (0x..)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            copy(Path::new(p), p)?;
        }
    }
    for d in ["tmp", "etc", "var/lib/plinth", "run/plinth/server"] {
        std::fs::create_dir_all(r.join(d))?;
    }
    std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/:/sbin/nologin\n")?;
    let tar = Command::new("tar")
        .arg("-C")
        .arg(r)
        .args(["--numeric-owner", "-cf", "-", "."])
        .stdout(Stdio::piped())
        .spawn()?;
    let Some(stdout) = tar.stdout else {
        return Err(ClusterError::Api("tar produced no output".into()));
    };
    let st = Command::new("docker")
        .args([
            "import",
            "--change",
            "ENTRYPOINT [\"/usr/local/bin/plinth-server\"]",
            "-",
            tag,
        ])
        .stdin(stdout)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        return Err(ClusterError::Api("docker import failed".into()));
    }
    Ok(())
}

/// A run's network and containers.
#[derive(Debug)]
pub struct DockerRun {
    pub prefix: String,
    pub network: String,
    /// The first three octets of the network (`10.a.b`).
    pub subnet: String,
    pub image: String,
    containers: Vec<String>,
}

impl DockerRun {
    /// Creates a private network on a random 10.x.y.0/24 (retrying on overlaps).
    pub fn create(image: String) -> Result<Self, ClusterError> {
        let prefix = format!("plinth-chaos-{:08x}", rand::random::<u32>());
        let mut last = String::new();
        for _ in 0..10 {
            let subnet = format!(
                "10.{}.{}",
                rand::random::<u8>() % 200 + 20,
                rand::random::<u8>()
            );
            let cidr = format!("{subnet}.0/24");
            match docker(&["network", "create", "--subnet", &cidr, &prefix]) {
                Ok(_) => {
                    return Ok(Self {
                        network: prefix.clone(),
                        prefix,
                        subnet,
                        image,
                        containers: Vec::new(),
                    })
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(ClusterError::Api(format!("creating a network: {last}")))
    }

    pub fn container(&self, node: u64) -> String {
        format!("{}-n{node}", self.prefix)
    }

    pub fn ip(&self, node: u64) -> String {
        format!("{}.{}", self.subnet, 10 + node.min(200))
    }

    /// Creates and starts a server container with `base` (config, data, admin socket)
    /// bind-mounted, running as the harness's user so its socket is ours to use.
    pub fn run_server(&mut self, node: u64, base: &Path) -> Result<(), ClusterError> {
        let name = self.container(node);
        let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?);
        let gid = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata("/proc/self")?);
        let user = format!("{uid}:{gid}");
        let ip = self.ip(node);
        let v_conf = format!(
            "{}:/etc/plinth/server.toml:ro",
            base.join("server.toml").display()
        );
        let v_data = format!("{}:/var/lib/plinth", base.join("data").display());
        let v_admin = format!("{}:/run/plinth/server", base.join("admin").display());
        docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &format!("n{node}"),
            "--user",
            &user,
            "--network",
            &self.network,
            "--ip",
            &ip,
            "-v",
            &v_conf,
            "-v",
            &v_data,
            "-v",
            &v_admin,
            &self.image,
            "run",
            "-config",
            "/etc/plinth/server.toml",
        ])?;
        self.containers.push(name);
        Ok(())
    }

    pub fn kill(&self, node: u64) -> Result<(), ClusterError> {
        docker(&["kill", "--signal", "KILL", &self.container(node)]).map(|_| ())
    }

    pub fn start(&self, node: u64) -> Result<(), ClusterError> {
        docker(&["start", &self.container(node)]).map(|_| ())
    }

    pub fn pause(&self, node: u64) -> Result<(), ClusterError> {
        docker(&["pause", &self.container(node)]).map(|_| ())
    }

    pub fn unpause(&self, node: u64) -> Result<(), ClusterError> {
        docker(&["unpause", &self.container(node)]).map(|_| ())
    }

    /// Cuts the node off the network: it keeps running, alone (a minority of one).
    pub fn disconnect(&self, node: u64) -> Result<(), ClusterError> {
        docker(&[
            "network",
            "disconnect",
            "--force",
            &self.network,
            &self.container(node),
        ])
        .map(|_| ())
    }

    /// Connects the node again, at its old address.
    pub fn connect(&self, node: u64) -> Result<(), ClusterError> {
        docker(&[
            "network",
            "connect",
            "--ip",
            &self.ip(node),
            &self.network,
            &self.container(node),
        ])
        .map(|_| ())
    }

    /// Runs iptables in the container's network namespace, from the host (needs root,
    /// `nsenter` and `iptables` on the host; the kernel here has no netem, so packet loss is
    /// made with the `statistic` match).
    fn iptables(&self, node: u64, args: &[&str]) -> Result<(), ClusterError> {
        let pid = docker(&[
            "inspect",
            "--format",
            "{{.State.Pid}}",
            &self.container(node),
        ])?;
        let out = Command::new("nsenter")
            .args(["-t", &pid, "-n", "iptables"])
            .args(args)
            .output()
            .map_err(|e| ClusterError::Api(format!("running nsenter iptables: {e}")))?;
        if !out.status.success() {
            return Err(ClusterError::Api(format!(
                "iptables {} on node {node}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Drops this share of the node's packets, both ways.
    pub fn lossy(&self, node: u64, probability: f64) -> Result<(), ClusterError> {
        let p = format!("{probability:.2}");
        for chain in ["INPUT", "OUTPUT"] {
            self.iptables(
                node,
                &[
                    "-A",
                    chain,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ],
            )?;
        }
        Ok(())
    }

    /// The node hears nothing from the cluster network but still sends (a one-way link).
    pub fn deaf(&self, node: u64) -> Result<(), ClusterError> {
        let net = format!("{}.0/24", self.subnet);
        self.iptables(node, &["-A", "INPUT", "-s", &net, "-j", "DROP"])
    }

    /// Removes every rule `lossy` and `deaf` added.
    pub fn clear_rules(&self, node: u64) -> Result<(), ClusterError> {
        self.iptables(node, &["-F", "INPUT"])?;
        self.iptables(node, &["-F", "OUTPUT"])
    }

    /// Removes the node's container.
    pub fn remove(&mut self, node: u64) -> Result<(), ClusterError> {
        let name = self.container(node);
        self.containers.retain(|c| *c != name);
        docker(&["rm", "-f", &name]).map(|_| ())
    }

    /// The container's log (for failure reports).
    pub fn logs(&self, node: u64) -> String {
        Command::new("docker")
            .args(["logs", &self.container(node)])
            .output()
            .map(|o| {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                s
            })
            .unwrap_or_default()
    }

    /// Containers this run created and has not removed.
    pub fn containers(&self) -> &[String] {
        &self.containers
    }

    /// Removes every container and the network.
    pub fn cleanup(&mut self) {
        for c in std::mem::take(&mut self.containers) {
            let _ = docker(&["rm", "-f", &c]);
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}

impl Drop for DockerRun {
    fn drop(&mut self) {
        self.cleanup();
    }
}
