//! Connecting to the coordinator and turning gRPC failures into exit codes.

use std::time::Duration;

use anyhow::anyhow;
use hotfleet_proto::v1::coordinator_client::CoordinatorClient;
use tonic::{metadata::MetadataValue, transport::Channel, Code, Status};

use crate::exit::{Failure, FAILED, REFUSED, UNREACHABLE};

/// Where the coordinator is and who is asking.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Coordinator address.
    #[arg(long, global = true, env = "HOTFLEET_COORDINATOR", default_value = "http://127.0.0.1:7700")]
    pub coordinator: String,
    /// Who you are, for the audit log.
    #[arg(long, global = true, env = "HOTFLEET_ACTOR")]
    pub actor: Option<String>,
}

impl Target {
    pub async fn connect(&self) -> Result<CoordinatorClient<Channel>, Failure> {
        let url = if self.coordinator.contains("://") {
            self.coordinator.clone()
        } else {
            format!("http://{}", self.coordinator)
        };
        let endpoint = Channel::from_shared(url.clone())
            .map_err(|e| Failure::refused(anyhow!("--coordinator {url:?} is not a valid address: {e}")))?
            .connect_timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|e| Failure {
            code: UNREACHABLE,
            error: anyhow!(
                "cannot reach the coordinator at {url}: {e}\n  is hotfleet-coordinator running? set --coordinator or HOTFLEET_COORDINATOR"
            ),
        })?;
        Ok(CoordinatorClient::new(channel))
    }

    /// Wraps a request with the actor metadata the audit log records.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let actor = self.actor.clone().or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "anonymous".into());
        if let Ok(value) = MetadataValue::try_from(actor.as_str()) {
            request.metadata_mut().insert("x-hotfleet-actor", value);
        }
        request
    }
}

/// Maps a gRPC status to a failure with the exit code a runbook branches on.
pub fn failure(context: &str, status: Status) -> Failure {
    let code = match status.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::NotFound
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::OutOfRange => REFUSED,
        Code::Unavailable => UNREACHABLE,
        _ => FAILED,
    };
    Failure { code, error: anyhow!("{context}: {} ({:?})", status.message(), status.code()) }
}
