//! Connecting to the coordinator and turning gRPC failures into exit codes.
//!
//! `--coordinator` is one address or a comma-separated list (an HA trio on
//! etcd). Before a command the CLI asks the first reachable coordinator who
//! leads (`GetLeader`) and talks to the leader; without a leader (an election
//! in progress) it stays on the reachable coordinator: reads are served by
//! every coordinator, and a write is refused with a clear message.
//!
//! Every connection is mutual TLS (`--tls-ca`, plus `--tls-cert`/`--tls-key`
//! or a bearer `--token`) verifying the coordinator as
//! `--coordinator-identity`, or plaintext with an explicit `--insecure`.
//! Who the caller is comes from that credential alone.

use std::time::Duration;

use anyhow::anyhow;
use hotfleet_proto::{
    address::endpoint_url,
    tls::{OwnCert, TlsArgs, Transport, DEFAULT_COORDINATOR_IDENTITY},
    v1::{coordinator_client::CoordinatorClient, GetLeaderRequest, LeaderStatus},
};
use tonic::{metadata::MetadataValue, transport::Channel, Code, Status};

use crate::exit::{Failure, FAILED, REFUSED, UNREACHABLE};

/// One coordinator that does not answer within this is skipped (a paused or
/// partitioned process must not stall a runbook).
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the coordinator is and how to prove who is asking.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Coordinator address, or every coordinator's, comma-separated (the CLI finds the leader).
    #[arg(long, global = true, env = "HOTFLEET_COORDINATOR", default_value = "http://127.0.0.1:7700")]
    pub coordinator: String,
    /// TLS: --tls-ca with your certificate (--tls-cert, --tls-key) or a --token; or --insecure.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// A bearer token (instead of a client certificate; with --tls-ca).
    #[arg(long, global = true, env = "HOTFLEET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The identity (CN or DNS name) the coordinator's certificate must carry.
    #[arg(long, global = true, env = "HOTFLEET_COORDINATOR_IDENTITY", default_value = DEFAULT_COORDINATOR_IDENTITY)]
    pub coordinator_identity: String,
}

impl Target {
    /// A target for `coordinator` with the given transport flags (the demo).
    pub fn new(coordinator: String, tls: TlsArgs) -> Self {
        Target { coordinator, tls, token: None, coordinator_identity: DEFAULT_COORDINATOR_IDENTITY.into() }
    }

    /// The transport the flags ask for; refused (naming the flags) before any connection.
    fn transport(&self) -> Result<Transport, Failure> {
        let transport = self.tls.transport(OwnCert::Optional).map_err(|e| Failure::refused(anyhow!(e)))?;
        if self.token.is_some() && !transport.is_tls() {
            return Err(Failure::refused(anyhow!("--token needs TLS (--tls-ca): a token is never sent in plaintext")));
        }
        Ok(transport)
    }

    async fn open(&self, transport: &Transport, url: &str) -> Result<Channel, String> {
        let endpoint = transport
            .endpoint(url, &self.coordinator_identity)
            .map_err(|e| format!("not a valid address: {e}"))?
            .connect_timeout(ASK_TIMEOUT);
        match tokio::time::timeout(ASK_TIMEOUT, endpoint.connect()).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) => Err(format!("{e}{}", source_chain(&e))),
            Err(_) => Err(format!("no answer within {} s", ASK_TIMEOUT.as_secs())),
        }
    }

    async fn ask_leader(&self, channel: Channel) -> Result<LeaderStatus, Status> {
        let mut request = self.request(GetLeaderRequest {});
        request.set_timeout(ASK_TIMEOUT);
        match tokio::time::timeout(ASK_TIMEOUT, CoordinatorClient::new(channel).get_leader(request)).await {
            Ok(result) => result.map(|r| r.into_inner()),
            Err(_) => Err(Status::deadline_exceeded("no answer")),
        }
    }

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
        let transport = self.transport()?;
        let mut fallback: Option<Channel> = None;
        let mut errors = Vec::new();
        for addr in &addresses {
            let channel = match self.open(&transport, addr).await {
                Ok(channel) => channel,
                Err(e) => {
                    errors.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            match self.ask_leader(channel.clone()).await {
                Ok(status) if status.is_leader => return Ok(CoordinatorClient::new(channel)),
                Ok(status) if !status.leader_addr.is_empty() => {
                    let leader = endpoint_url(&status.leader_addr);
                    if let Ok(leader_channel) = self.open(&transport, &leader).await {
                        if self.ask_leader(leader_channel.clone()).await.is_ok_and(|s| s.is_leader) {
                            return Ok(CoordinatorClient::new(leader_channel));
                        }
                    }
                    fallback.get_or_insert(channel);
                }
                // A coordinator from before leader election: it is the one.
                Err(s) if s.code() == Code::Unimplemented => return Ok(CoordinatorClient::new(channel)),
                // Refused for who we are: no other coordinator will think otherwise.
                Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => {
                    return Err(failure(addr, s));
                }
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

    /// A client of the first reachable coordinator, leader or not (for
    /// questions any coordinator answers without a role, like WhoAmI).
    pub async fn connect_any(&self) -> Result<CoordinatorClient<Channel>, Failure> {
        let transport = self.transport()?;
        let mut errors = Vec::new();
        for addr in self.addresses() {
            match self.open(&transport, &addr).await {
                Ok(channel) => return Ok(CoordinatorClient::new(channel)),
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(Failure { code: UNREACHABLE, error: anyhow!("cannot reach any coordinator ({})", errors.join("; ")) })
    }

    /// Who leads, as the first reachable coordinator sees it.
    pub async fn leader_status(&self) -> Result<LeaderStatus, Failure> {
        let transport = self.transport()?;
        let mut errors = Vec::new();
        for addr in self.addresses() {
            match self.open(&transport, &addr).await {
                Ok(channel) => match self.ask_leader(channel).await {
                    Ok(status) => return Ok(status),
                    Err(s) => errors.push(format!("{addr}: {}", s.message())),
                },
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(Failure { code: UNREACHABLE, error: anyhow!("cannot reach any coordinator ({})", errors.join("; ")) })
    }

    /// Wraps a request with the bearer token, if one was given (a client
    /// certificate needs nothing here: the handshake carried it).
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            if let Ok(value) = MetadataValue::try_from(format!("Bearer {}", token.trim())) {
                request.metadata_mut().insert("authorization", value);
            }
        }
        request
    }
}

/// The causes under a transport error (a TLS failure hides in them).
fn source_chain(err: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut next = err.source();
    while let Some(cause) = next {
        out.push_str(&format!(": {cause}"));
        next = cause.source();
    }
    out
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
