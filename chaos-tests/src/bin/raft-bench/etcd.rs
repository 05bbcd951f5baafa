//! etcd's side: three `etcd` members on 127.0.0.1 (distinct client and peer ports, one data
//! directory each; etcd fsyncs its WAL before acknowledging by default), and a client that does
//! one `KV.Put` per write over gRPC with the same tonic stack plinth's client uses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tonic::transport::{Channel, Endpoint};

use crate::procs::{free_port, Proc};

#[allow(clippy::all, clippy::unwrap_used, missing_debug_implementations)] // generated code
mod pb {
    include!("gen/etcdserverpb.rs");
}

use pb::kv_client::KvClient;
use pb::maintenance_client::MaintenanceClient;

const CALL_LIMIT: Duration = Duration::from_secs(10);
const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// Three members; dropping it kills them.
#[derive(Debug)]
pub struct Cluster {
    endpoints: Vec<String>,
    procs: Vec<Proc>,
}

async fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    let ch = tokio::time::timeout(
        CALL_LIMIT,
        Endpoint::try_from(endpoint.to_owned())?.connect(),
    )
    .await
    .context("connecting to etcd: timeout")??;
    Ok(ch)
}

async fn status(endpoint: &str) -> anyhow::Result<pb::StatusResponse> {
    let ch = channel(endpoint).await?;
    let r = tokio::time::timeout(
        CALL_LIMIT,
        MaintenanceClient::new(ch).status(pb::StatusRequest {}),
    )
    .await
    .context("etcd status: timeout")??;
    Ok(r.into_inner())
}

impl Cluster {
    /// Starts the members with default timing (100 ms heartbeat, 1 s election timeout), each
    /// running Go code on at most `threads` threads (`GOMAXPROCS`), and waits until they agree
    /// on a leader.
    pub async fn start(bin: &Path, root: &Path, threads: usize) -> anyhow::Result<Self> {
        let mut peers = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..3 {
            peers.push(format!("http://127.0.0.1:{}", free_port("127.0.0.1")?));
            clients.push(format!("http://127.0.0.1:{}", free_port("127.0.0.1")?));
        }
        let initial: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}={p}"))
            .collect();
        let initial = initial.join(",");
        let mut procs = Vec::new();
        for i in 0..3 {
            let dir: PathBuf = root.join(format!("m{i}"));
            std::fs::create_dir_all(root)?;
            let mut cmd = Command::new(bin);
            cmd.env("GOMAXPROCS", threads.to_string());
            cmd.arg(format!("--name=m{i}"))
                .arg(format!("--data-dir={}", dir.display()))
                .arg(format!("--listen-client-urls={}", clients[i]))
                .arg(format!("--advertise-client-urls={}", clients[i]))
                .arg(format!("--listen-peer-urls={}", peers[i]))
                .arg(format!("--initial-advertise-peer-urls={}", peers[i]))
                .arg(format!("--initial-cluster={initial}"))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=raft-bench")
                .arg("--log-level=warn")
                .arg("--logger=zap");
            procs.push(Proc::spawn(&mut cmd, &root.join(format!("m{i}.log")))?);
        }
        let c = Self {
            endpoints: clients,
            procs,
        };
        c.leader_endpoint().await?;
        Ok(c)
    }

    /// CPU time and context switches the three members have used so far.
    pub fn usage(&self) -> crate::procs::Usage {
        crate::procs::usage(&self.procs)
    }

    /// The WAL fsyncs of all three members so far and their total time in microseconds, from
    /// each member's `etcd_disk_wal_fsync_duration_seconds` on its `/metrics` page.
    pub async fn wal_fsyncs(&self) -> anyhow::Result<(u64, u64)> {
        let mut total = (0, 0);
        for endpoint in &self.endpoints {
            let page = tokio::time::timeout(CALL_LIMIT, metrics_page(endpoint))
                .await
                .context("etcd /metrics: timeout")??;
            let (n, us) = wal_fsyncs(&page)
                .with_context(|| format!("{endpoint}/metrics has no WAL fsync histogram"))?;
            total = (total.0 + n, total.1 + us);
        }
        Ok(total)
    }

    /// The client URL of the member every member names as leader.
    pub async fn leader_endpoint(&self) -> anyhow::Result<String> {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let mut ids = Vec::new();
            let mut leaders = Vec::new();
            for e in &self.endpoints {
                match status(e).await {
                    Ok(s) => {
                        ids.push(s.header.map_or(0, |h| h.member_id));
                        leaders.push(s.leader);
                    }
                    Err(_) => break,
                }
            }
            if leaders.len() == 3 && leaders[0] != 0 && leaders.iter().all(|l| *l == leaders[0]) {
                if let Some(i) = ids.iter().position(|id| *id == leaders[0]) {
                    return Ok(self.endpoints[i].clone());
                }
            }
            if Instant::now() > deadline {
                bail!("etcd elected no leader within {WAIT_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One client: puts `bench/<run>/<client>/<seq>` with a `size`-byte value.
#[derive(Debug)]
pub struct Writer {
    client: KvClient<Channel>,
    prefix: String,
    value: Vec<u8>,
}

impl Writer {
    pub async fn connect(
        endpoint: &str,
        run: usize,
        client: usize,
        size: usize,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            client: KvClient::new(channel(endpoint).await?),
            prefix: format!("bench/r{run}/c{client}/"),
            value: vec![b'v'; size],
        })
    }

    pub async fn write(&mut self, seq: u64) -> Result<(), String> {
        let req = pb::PutRequest {
            key: format!("{}{seq:010}", self.prefix).into_bytes(),
            value: self.value.clone(),
            ..Default::default()
        };
        tokio::time::timeout(CALL_LIMIT, self.client.put(req))
            .await
            .map_err(|_| "timeout".to_owned())?
            .map(|_| ())
            .map_err(|s| s.to_string())
    }
}

/// The `/metrics` page of the member at `endpoint` (`http://host:port`), over plain HTTP/1.0.
async fn metrics_page(endpoint: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = endpoint
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// endpoint: {endpoint}"))?;
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("/metrics: no end of headers")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("/metrics: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// The WAL fsync count and total microseconds on a Prometheus text page, if it has both.
fn wal_fsyncs(page: &str) -> Option<(u64, u64)> {
    let value = |name: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let count = value("etcd_disk_wal_fsync_duration_seconds_count")?;
    let sum = value("etcd_disk_wal_fsync_duration_seconds_sum")?;
    Some((count as u64, (sum * 1e6).round() as u64))
}

#[cfg(test)]
mod tests {
    use super::wal_fsyncs;

    #[test]
    fn wal_fsyncs_reads_the_histogram_sum_and_count() {
        let page = "# HELP etcd_disk_wal_fsync_duration_seconds The latency distributions of fsync called by WAL.\n\
            # TYPE etcd_disk_wal_fsync_duration_seconds histogram\n\
            etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 6000\n\
            etcd_disk_wal_fsync_duration_seconds_sum 2.4324375\n\
            etcd_disk_wal_fsync_duration_seconds_count 6699\n\
            etcd_disk_wal_write_bytes_total 123\n";
        assert_eq!(wal_fsyncs(page), Some((6699, 2_432_438)));
        assert_eq!(
            wal_fsyncs("etcd_disk_wal_fsync_duration_seconds_count 3\n"),
            None
        );
        assert_eq!(wal_fsyncs(""), None);
    }
}
