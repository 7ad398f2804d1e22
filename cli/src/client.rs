//! Connecting to the coordinator and turning gRPC failures into exit codes.
//!
//! `--coordinator` is one address or a comma-separated list (an HA trio on
//! etcd). Before a command the CLI asks the first reachable coordinator who
//! leads (`GetLeader`) and talks to the leader; without a leader (an election
//! in progress) it stays on the reachable coordinator: reads are served by
//! every coordinator, and a write is refused with a clear message.

use std::time::Duration;

use anyhow::anyhow;
use hotfleet_proto::{
    address::endpoint_url,
    v1::{coordinator_client::CoordinatorClient, GetLeaderRequest, LeaderStatus},
};
use tonic::{metadata::MetadataValue, transport::Channel, Code, Status};

use crate::exit::{Failure, FAILED, REFUSED, UNREACHABLE};

/// One coordinator that does not answer within this is skipped (a paused or
/// partitioned process must not stall a runbook).
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the coordinator is and who is asking.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Coordinator address, or every coordinator's, comma-separated (the CLI finds the leader).
    #[arg(long, global = true, env = "HOTFLEET_COORDINATOR", default_value = "http://127.0.0.1:7700")]
    pub coordinator: String,
    /// Who you are, for the audit log.
    #[arg(long, global = true, env = "HOTFLEET_ACTOR")]
    pub actor: Option<String>,
}

async fn open(url: &str) -> Result<Channel, String> {
    let endpoint = Channel::from_shared(url.to_string())
        .map_err(|e| format!("not a valid address: {e}"))?
        .connect_timeout(ASK_TIMEOUT);
    match tokio::time::timeout(ASK_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", ASK_TIMEOUT.as_secs())),
    }
}

async fn ask_leader(channel: Channel) -> Result<LeaderStatus, Status> {
    let mut request = tonic::Request::new(GetLeaderRequest {});
    request.set_timeout(ASK_TIMEOUT);
    match tokio::time::timeout(ASK_TIMEOUT, CoordinatorClient::new(channel).get_leader(request)).await {
        Ok(result) => result.map(|r| r.into_inner()),
        Err(_) => Err(Status::deadline_exceeded("no answer")),
    }
}

impl Target {
    /// The configured coordinator addresses, as URLs.
    pub fn addresses(&self) -> Vec<String> {
        self.coordinator.split(',').map(str::trim).filter(|a| !a.is_empty()).map(endpoint_url).collect()
    }

    /// A client of the leader, or of a reachable follower while none leads.
    pub async fn connect(&self) -> Result<CoordinatorClient<Channel>, Failure> {
        let addresses = self.addresses();
        if addresses.is_empty() {
            return Err(Failure::refused(anyhow!(
                "--coordinator is empty: give one address or a comma-separated list"
            )));
        }
        let mut fallback: Option<Channel> = None;
        let mut errors = Vec::new();
        for addr in &addresses {
            let channel = match open(addr).await {
                Ok(channel) => channel,
                Err(e) => {
                    errors.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            match ask_leader(channel.clone()).await {
                Ok(status) if status.is_leader => return Ok(CoordinatorClient::new(channel)),
                Ok(status) if !status.leader_addr.is_empty() => {
                    let leader = endpoint_url(&status.leader_addr);
                    if let Ok(leader_channel) = open(&leader).await {
                        if ask_leader(leader_channel.clone()).await.is_ok_and(|s| s.is_leader) {
                            return Ok(CoordinatorClient::new(leader_channel));
                        }
                    }
                    fallback.get_or_insert(channel);
                }
                // A coordinator from before leader election: it is the one.
                Err(s) if s.code() == Code::Unimplemented => return Ok(CoordinatorClient::new(channel)),
                Ok(_) => {
                    fallback.get_or_insert(channel);
                }
                Err(s) => errors.push(format!("{addr}: {}", s.message())),
            }
        }
        if let Some(channel) = fallback {
            return Ok(CoordinatorClient::new(channel));
        }
        Err(Failure {
            code: UNREACHABLE,
            error: anyhow!(
                "cannot reach the coordinator ({})\n  is hotfleet-coordinator running? set --coordinator or HOTFLEET_COORDINATOR",
                errors.join("; ")
            ),
        })
    }

    /// Who leads, as the first reachable coordinator sees it.
    pub async fn leader_status(&self) -> Result<LeaderStatus, Failure> {
        let mut errors = Vec::new();
        for addr in self.addresses() {
            match open(&addr).await {
                Ok(channel) => match ask_leader(channel).await {
                    Ok(status) => return Ok(status),
                    Err(s) => errors.push(format!("{addr}: {}", s.message())),
                },
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(Failure { code: UNREACHABLE, error: anyhow!("cannot reach any coordinator ({})", errors.join("; ")) })
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

/// Whether a watch that failed with `status` is worth re-establishing on
/// another coordinator (its coordinator went away, or lost leadership).
pub fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Internal
    )
}
