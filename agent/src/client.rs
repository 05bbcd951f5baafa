//! A Workload API client over a Unix socket, for the `plinth-agent api` commands and tests.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use plinth_api::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use plinth_api::workload::{SECURITY_HEADER, SECURITY_HEADER_VALUE};
use tokio::net::UnixStream;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// Adds the `workload.spiffe.io: true` header to every call.
#[derive(Debug, Clone, Copy, Default)]
pub struct SecurityHeader;

impl tonic::service::Interceptor for SecurityHeader {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(
            SECURITY_HEADER,
            MetadataValue::from_static(SECURITY_HEADER_VALUE),
        );
        Ok(req)
    }
}

/// A Workload API client whose calls carry the security header.
pub type WorkloadClient = SpiffeWorkloadApiClient<InterceptedService<Channel, SecurityHeader>>;

/// Parses `unix:///abs/path` (the `SPIFFE_ENDPOINT_SOCKET` form) or a bare absolute path.
pub fn socket_path_from_addr(addr: &str) -> Option<PathBuf> {
    let path = addr.strip_prefix("unix://").unwrap_or(addr);
    let path = Path::new(path);
    path.is_absolute().then(|| path.to_owned())
}

/// A channel to the Workload API socket at `path` (connected lazily, reconnecting as needed).
pub fn channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    // The URI is required by tonic but unused: the connector dials the socket.
    Ok(
        Endpoint::try_from("http://workload.api")?.connect_with_connector_lazy(tower::service_fn(
            move |_| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            },
        )),
    )
}

/// A client with the security header, over the socket at `path`.
pub fn connect(path: &Path) -> Result<WorkloadClient, tonic::transport::Error> {
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        channel(path)?,
        SecurityHeader,
    ))
}
