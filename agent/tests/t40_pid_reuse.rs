//! Attack (reliability.md 10): the process that connected hands its socket to someone else and
//! exits. Calls on that connection must fail with Unavailable, and error paths leak no fds.
//! One test per file: it counts this process's open fds.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hyper_util::rt::TokioIo;
use plinth_agent::client::{SecurityHeader, WorkloadClient};
use plinth_api::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use plinth_api::workload::X509svidRequest;
use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use tonic::transport::Endpoint;

/// Connects to the Workload API socket from a python3 child, which passes the connected fd to us
/// over `ctl` (SCM_RIGHTS) and then exits at once (`exit_now`) or when we write to it.
const HANDOFF: &str = r#"
import socket, sys
api = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
api.connect(sys.argv[1])
ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
ctl.connect(sys.argv[2])
socket.send_fds(ctl, [b"x"], [api.fileno()])
api.close()
if sys.argv[3] == "wait":
    ctl.recv(1)
"#;

struct Handoff {
    child: std::process::Child,
    ctl: std::os::unix::net::UnixStream,
    fd: OwnedFd,
}

fn handoff(h: &Harness, mode: &str) -> Handoff {
    let ctl_path = h.dir.path().join(format!("ctl-{}.sock", rand_suffix()));
    let listener = std::os::unix::net::UnixListener::bind(&ctl_path).unwrap();
    let child = Command::new("python3")
        .args(["-c", HANDOFF])
        .arg(&h.socket)
        .arg(&ctl_path)
        .arg(mode)
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 must be installed");
    let (ctl, _) = listener.accept().unwrap();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut buf = [0u8; 1];
    recvmsg(
        &ctl,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )
    .unwrap();
    let mut fds: Vec<OwnedFd> = cmsg
        .drain()
        .filter_map(|m| match m {
            RecvAncillaryMessage::ScmRights(fds) => Some(fds.collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(fds.len(), 1, "the child passed its connection");
    Handoff {
        child,
        ctl,
        fd: fds.remove(0),
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst).to_string()
}

/// A Workload API client over an already connected socket.
async fn client_over(fd: OwnedFd) -> WorkloadClient {
    let std_stream = std::os::unix::net::UnixStream::from(fd);
    std_stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(std_stream).unwrap();
    let slot = Arc::new(Mutex::new(Some(stream)));
    let channel = Endpoint::try_from("http://workload.api")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let s = slot.lock().unwrap().take();
            async move {
                s.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the handed-off socket is used up"))
            }
        }))
        .await
        .unwrap();
    SpiffeWorkloadApiClient::with_interceptor(channel, SecurityHeader)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_caller_that_hands_off_its_socket_and_exits_gets_unavailable_without_fd_leaks() {
    let h = Harness::start().await;
    h.add(entry("e1", "spiffe://example.org/w", &[&my_selector()]));

    // Control: while the connecting process lives, a call on its handed-off socket works (the
    // python child runs as our uid, so it matches). This shows the mechanism, not the defence.
    let mut live = handoff(&h, "wait");
    {
        let mut c = client_over(live.fd.try_clone().unwrap()).await;
        let mut s = c
            .fetch_x509svid(X509svidRequest {})
            .await
            .unwrap()
            .into_inner();
        let resp = next(&mut s).await.unwrap().unwrap();
        assert_eq!(resp.svids[0].spiffe_id, "spiffe://example.org/w");
    }
    live.ctl.write_all(b"q").unwrap();
    assert!(live.child.wait().unwrap().success());
    drop(live);

    // Let the server finish with the control connection before counting fds.
    let baseline = stable_fds().await;

    for _ in 0..5 {
        let mut gone = handoff(&h, "exit");
        assert!(gone.child.wait().unwrap().success());
        let mut c = client_over(gone.fd.try_clone().unwrap()).await;
        let err = c.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(
            err.message().contains("exited or its PID was reused"),
            "{err:?}"
        );
        drop(c);
        drop(gone);
    }
    let after = settle_fds(baseline).await;
    assert!(
        after <= baseline,
        "fds leaked on the error path: {baseline} before, {after} after"
    );
}

/// The fd count once it has stopped changing (connections close asynchronously). Bounded.
async fn stable_fds() -> usize {
    let mut last = open_fds();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = open_fds();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Waits until the fd count is at most `target`; returns the last count. Bounded, so a leak
/// fails the test instead of hanging it.
async fn settle_fds(target: usize) -> usize {
    let mut last = open_fds();
    for _ in 0..200 {
        if last <= target {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = open_fds();
    }
    last
}
