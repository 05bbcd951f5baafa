//! `/live` and `/ready` over plain HTTP/1.1, as SPIRE's health checks listener serves them.
//! Live: the process serves. Ready: in a cluster with a leader, and an active CA.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::api::ServerCore;
use crate::state::Replicated;

/// Largest request head read.
const MAX_HEAD: usize = 4096;

/// Readiness: a leader is known and this server can sign.
pub async fn is_ready<S: Replicated>(core: &ServerCore<S>) -> bool {
    core.ca.is_ready() && core.state.cluster_status().await.leader.is_some()
}

async fn answer<S: Replicated>(
    mut sock: tokio::net::TcpStream,
    core: Arc<ServerCore<S>>,
    live: Arc<str>,
    ready: Arc<str>,
) {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut n = 0;
    // Read until the end of the request head, a full buffer, or a short timeout (slow clients).
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while n < buf.len() {
            match sock.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    n += k;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    if read.is_err() {
        return;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, body) = if method != "GET" {
        ("405 Method Not Allowed", "method not allowed\n".to_string())
    } else if path == &*live {
        ("200 OK", "{\"live\":true}\n".to_string())
    } else if path == &*ready {
        if is_ready(&core).await {
            ("200 OK", "{\"ready\":true}\n".to_string())
        } else {
            ("503 Service Unavailable", "{\"ready\":false}\n".to_string())
        }
    } else {
        ("404 Not Found", "not found\n".to_string())
    };
    let resp = format!(
        "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
}

/// Serves until `stop` changes.
pub async fn serve<S: Replicated>(
    listener: TcpListener,
    core: Arc<ServerCore<S>>,
    live_path: String,
    ready_path: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let live: Arc<str> = live_path.into();
    let ready: Arc<str> = ready_path.into();
    loop {
        tokio::select! {
            r = listener.accept() => {
                if let Ok((sock, _)) = r {
                    tokio::spawn(answer(sock, core.clone(), live.clone(), ready.clone()));
                }
            }
            _ = stop.changed() => return,
        }
    }
}
