//! The `docker` workload attestor: the caller's container ID from its cgroups (read through the
//! pinned `/proc/<pid>` directory), then the container's labels, environment and image from the
//! Docker Engine API (`GET /containers/<id>/json` over the daemon's Unix socket).
//!
//! Selectors, as SPIRE spells them:
//! - `docker:label:<key>:<value>` for every label;
//! - `docker:env:<KEY>=<value>` for every environment variable (SPIRE's raw `Config.Env` string);
//! - `docker:image_id:<Config.Image>` (the image reference the container was created from);
//! - `docker:image_config_digest:<Image>` (the `sha256:` image config digest).
//!
//! A caller that is not in a container gets no selectors. A caller that is in a container but
//! whose container the daemon cannot describe (daemon down, unknown container, bad answer) is not
//! attested at all: the error reaches the Workload API, which answers `Unavailable`.
//!
//! The agent must share the host's PID namespace, so that the PID SO_PEERCRED reports and the
//! `/proc` entry it opens are the workload's.
//!
//! HTTP is a minimal HTTP/1.1 client (one request per connection, `Connection: close`), with a
//! deadline and a response size cap: a daemon cannot make the agent read without bound.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use plinth_spiffe::{Selector, Selectors};
use serde::Deserialize;

use super::{cgroup, AttestError, Peer, WorkloadAttestor};

/// Where the Docker daemon listens unless configured.
pub const DEFAULT_DOCKER_SOCKET_PATH: &str = "/var/run/docker.sock";
/// Largest Docker API response accepted (headers and body).
pub const MAX_RESPONSE_LEN: usize = 4 * 1024 * 1024;
/// How long one Docker API call may take, connect to last byte.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the docker attestor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerAttestorConfig {
    pub docker_socket_path: PathBuf,
    pub timeout: Duration,
}

impl Default for DockerAttestorConfig {
    fn default() -> Self {
        Self {
            docker_socket_path: DEFAULT_DOCKER_SOCKET_PATH.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// The docker workload attestor.
#[derive(Debug, Clone, Default)]
pub struct DockerAttestor {
    config: DockerAttestorConfig,
}

fn api_err(reason: impl ToString) -> AttestError {
    AttestError::Read {
        what: "the caller's container from the Docker API".into(),
        reason: reason.to_string(),
    }
}

/// A parsed HTTP response: status code and (de-chunked) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a `Transfer-Encoding: chunked` body; fails on anything malformed or truncated.
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n").ok_or("truncated chunk size line")?;
        let size_line = std::str::from_utf8(&data[..line_end]).map_err(|_| "bad chunk size")?;
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailers (ignored) follow; the body is complete.
            return Ok(out);
        }
        if data.len() < size.saturating_add(2) || &data[size..size + 2] != b"\r\n" {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Parses a complete HTTP/1.x response (as read until the server closed the connection).
pub fn parse_http_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let head_end = find(raw, b"\r\n\r\n").ok_or("no end of the response headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "response headers not UTF-8")?;
    let body = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| format!("bad status line {status_line:?}"))?;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = content_length {
        if body.len() < n {
            return Err(format!("truncated body: {} of {n} bytes", body.len()));
        }
        body[..n].to_vec()
    } else {
        body.to_vec()
    };
    Ok(HttpResponse { status, body })
}

/// The parts of `GET /containers/<id>/json` the attestor uses.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerJson {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    config: Option<ContainerConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
}

fn selector(value: String) -> Result<Selector, AttestError> {
    Selector::new("docker", &value)
        .map_err(|e| AttestError::Invalid(format!("docker selector: {e}")))
}

/// The selectors for a container inspect document (the body of `GET /containers/<id>/json`).
pub fn selectors_from_inspect(body: &[u8]) -> Result<Selectors, AttestError> {
    let c: ContainerJson = serde_json::from_slice(body)
        .map_err(|e| api_err(format!("malformed container JSON: {e}")))?;
    let mut out = Selectors::new();
    let config = c.config.unwrap_or_default();
    for (k, v) in config.labels.unwrap_or_default() {
        out.insert(selector(format!("label:{k}:{v}"))?);
    }
    for e in config.env.unwrap_or_default() {
        if !e.is_empty() {
            out.insert(selector(format!("env:{e}"))?);
        }
    }
    if let Some(image) = config.image.filter(|s| !s.is_empty()) {
        out.insert(selector(format!("image_id:{image}"))?);
    }
    if let Some(digest) = c.image.filter(|s| !s.is_empty()) {
        out.insert(selector(format!("image_config_digest:{digest}"))?);
    }
    Ok(out)
}

impl DockerAttestor {
    pub fn new(config: DockerAttestorConfig) -> Self {
        Self { config }
    }

    /// `GET path` on the daemon socket; the raw response, at most [`MAX_RESPONSE_LEN`] bytes.
    fn get(&self, path: &str) -> Result<Vec<u8>, AttestError> {
        let deadline = Instant::now() + self.config.timeout;
        let mut stream = UnixStream::connect(&self.config.docker_socket_path).map_err(|e| {
            api_err(format!(
                "connect {}: {e}",
                self.config.docker_socket_path.display()
            ))
        })?;
        stream
            .set_write_timeout(Some(self.config.timeout))
            .map_err(api_err)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: plinth-agent\r\n\
             Accept: application/json\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).map_err(api_err)?;
        let mut raw = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| api_err("timed out"))?;
            stream.set_read_timeout(Some(left)).map_err(api_err)?;
            let n = match stream.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(api_err(e)),
            };
            if n == 0 {
                return Ok(raw);
            }
            if raw.len() + n > MAX_RESPONSE_LEN {
                return Err(api_err(format!(
                    "response larger than {MAX_RESPONSE_LEN} bytes"
                )));
            }
            raw.extend_from_slice(&buf[..n]);
        }
    }

    /// The selectors of the container `id` (64 hex digits, as the cgroup parser returns).
    pub fn container_selectors(&self, id: &str) -> Result<Selectors, AttestError> {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AttestError::Invalid(format!("bad container ID {id:?}")));
        }
        let raw = self.get(&format!("/containers/{id}/json"))?;
        let resp = parse_http_response(&raw).map_err(api_err)?;
        if resp.status != 200 {
            let msg = String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)])
                .trim()
                .to_owned();
            return Err(api_err(format!(
                "container {id}: HTTP {}: {msg}",
                resp.status
            )));
        }
        selectors_from_inspect(&resp.body)
    }
}

impl WorkloadAttestor for DockerAttestor {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn attest(&self, peer: &Peer) -> Result<Selectors, AttestError> {
        let cgroups = peer.read("cgroup")?;
        let id = cgroup::container_id(&cgroups)
            .map_err(|e| AttestError::Invalid(format!("cgroup: {e}")))?;
        match id {
            None => Ok(Selectors::new()),
            Some(id) => self.container_selectors(&id),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn strings(s: &Selectors) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn content_length_response() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 4\r\n\r\n{}\r\nEXTRA";
        let r = parse_http_response(raw).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"{}\r\n");
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}").is_err());
    }

    #[test]
    fn chunked_response() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n5;ext=1\r\n\":1}\n\r\n0\r\n\r\n";
        let r = parse_http_response(raw).unwrap();
        assert_eq!(r.body, b"{\"a\":1}\n");
        for bad in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd0\r\n\r\n",
        ] {
            assert!(parse_http_response(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn close_delimited_and_error_responses() {
        let r = parse_http_response(b"HTTP/1.0 404 Not Found\r\n\r\n{\"message\":\"no\"}").unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.body, b"{\"message\":\"no\"}");
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"[..],
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        ] {
            assert!(parse_http_response(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn selectors_from_a_container() {
        let body = br#"{"Id":"abc","Image":"sha256:2ee7","Config":{
            "Image":"registry.example/app:1.2",
            "Labels":{"app":"demo","com.example.team":"a:b"},
            "Env":["PATH=/bin","EMPTY=","X=1=2"]}}"#;
        let s = selectors_from_inspect(body).unwrap();
        assert_eq!(
            strings(&s),
            vec![
                "docker:env:EMPTY=",
                "docker:env:PATH=/bin",
                "docker:env:X=1=2",
                "docker:image_config_digest:sha256:2ee7",
                "docker:image_id:registry.example/app:1.2",
                "docker:label:app:demo",
                "docker:label:com.example.team:a:b",
            ]
        );
    }

    #[test]
    fn null_and_missing_fields_give_fewer_selectors() {
        let s =
            selectors_from_inspect(br#"{"Image":"sha256:1","Config":{"Labels":null,"Env":null}}"#)
                .unwrap();
        assert_eq!(strings(&s), vec!["docker:image_config_digest:sha256:1"]);
        assert!(selectors_from_inspect(b"{}").unwrap().is_empty());
        assert!(selectors_from_inspect(b"not json").is_err());
        // A label value with a control character cannot become a selector: refuse, don't drop.
        assert!(selectors_from_inspect(br#"{"Config":{"Labels":{"a":"x\ny"}}}"#).is_err());
    }

    #[test]
    fn daemon_failures_are_errors() {
        let a = DockerAttestor::new(DockerAttestorConfig {
            docker_socket_path: "/nonexistent/docker.sock".into(),
            ..DockerAttestorConfig::default()
        });
        let id = "a".repeat(64);
        assert!(matches!(
            a.container_selectors(&id),
            Err(AttestError::Read { .. })
        ));
        assert!(matches!(
            a.container_selectors("../../x"),
            Err(AttestError::Invalid(_))
        ));
    }

    #[test]
    fn responses_are_size_capped_and_timed() {
        use std::os::unix::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // A daemon that answers without end: the attestor stops at the cap.
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n");
            let junk = vec![b' '; 64 * 1024];
            while s.write_all(&junk).is_ok() {}
        });
        let a = DockerAttestor::new(DockerAttestorConfig {
            docker_socket_path: path,
            timeout: Duration::from_secs(30),
        });
        let e = a.container_selectors(&"b".repeat(64)).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        server.join().unwrap();
    }
}
