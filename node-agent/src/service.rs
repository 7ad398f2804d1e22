//! The gRPC `Agent` service: decode into a domain [`Command`], call the
//! [`Participant`](crate::participant::Participant), encode the [`Answer`].
//! It decides nothing.

use std::{collections::HashMap, sync::Arc, time::Duration};

use hotfleet_proto::v1::{
    self as pb, agent_server::Agent, AbortRequest, AbortResponse, CommandHeader, CommitRequest, CommitResponse,
    HealthRequest, HealthResponse, PrepareRequest, PrepareResponse, RollbackRequest, RollbackResponse, StatusRequest,
    StatusResponse,
};
use tonic::{Request, Response, Status};

use crate::{
    command::{Answer, Command, Kind, ParticipantError, RolloutKind},
    epoch::EpochError,
    reports::{self, NodeReporter, STATUS_BUDGET},
};

pub struct AgentService {
    reporter: Arc<NodeReporter>,
}

impl AgentService {
    pub fn new(reporter: Arc<NodeReporter>) -> Self {
        Self { reporter }
    }

    /// Decodes a command, runs it, and hands back the answer's wire fields.
    async fn run(
        &self,
        kind: Kind,
        header: Option<CommandHeader>,
        ttl: Duration,
        process_id: String,
    ) -> Result<(bool, String, Vec<pb::ProcessOutcome>), Status> {
        let header = header.ok_or(ParticipantError::MissingHeader)?;
        let rollout_kind = match header.kind() {
            pb::RolloutKind::Apply => RolloutKind::Apply,
            pb::RolloutKind::Revert => RolloutKind::Revert,
            pb::RolloutKind::Rebase => RolloutKind::Rebase,
        };
        let command = Command {
            kind,
            rollout_id: header.rollout_id,
            patch_id: header.patch_id,
            epoch: header.epoch,
            ttl,
            process_id,
            rollout_kind,
        };
        let Answer { ok, reason, processes } = self.reporter.participant().handle(command).await?;
        Ok((ok, reason, processes.into_iter().map(encode_outcome).collect()))
    }
}

fn encode_outcome(o: crate::command::ProcessOutcome) -> pb::ProcessOutcome {
    pb::ProcessOutcome {
        process_id: o.process_id,
        pid: o.pid,
        ok: o.ok,
        error: o.error,
        pause_ms: o.pause_ms,
        prepare_ms: o.prepare_ms,
        detail_json: o.detail_json,
    }
}

impl From<ParticipantError> for Status {
    fn from(err: ParticipantError) -> Self {
        match err {
            ParticipantError::Epoch(EpochError::Stale { .. }) | ParticipantError::Replayed(_) => {
                Status::failed_precondition(err.to_string())
            }
            // "Retry": the coordinator reads UNAVAILABLE as a failed attempt, never as success
            // (an unknown epoch: once the agent's heartbeat has learned the new leader's).
            ParticipantError::Unknown(_) | ParticipantError::Epoch(EpochError::Unknown { .. }) => {
                Status::unavailable(err.to_string())
            }
            ParticipantError::Epoch(_) | ParticipantError::Internal { .. } => Status::internal(err.to_string()),
            ParticipantError::MissingHeader
            | ParticipantError::MissingRollout
            | ParticipantError::LongRollout(_)
            | ParticipantError::BadPatchId(_) => Status::invalid_argument(err.to_string()),
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn prepare(&self, request: Request<PrepareRequest>) -> Result<Response<PrepareResponse>, Status> {
        let request = request.into_inner();
        let ttl = Duration::from_secs(u64::from(request.ttl_seconds));
        let (vote_yes, reason, processes) = self.run(Kind::Prepare, request.header, ttl, request.process_id).await?;
        Ok(Response::new(PrepareResponse { vote_yes, reason, processes }))
    }

    async fn commit(&self, request: Request<CommitRequest>) -> Result<Response<CommitResponse>, Status> {
        let (ok, reason, processes) =
            self.run(Kind::Commit, request.into_inner().header, Duration::ZERO, String::new()).await?;
        Ok(Response::new(CommitResponse { ok, reason, processes }))
    }

    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<AbortResponse>, Status> {
        let (ok, reason, processes) =
            self.run(Kind::Abort, request.into_inner().header, Duration::ZERO, String::new()).await?;
        Ok(Response::new(AbortResponse { ok, reason, processes }))
    }

    async fn rollback(&self, request: Request<RollbackRequest>) -> Result<Response<RollbackResponse>, Status> {
        let (ok, reason, processes) =
            self.run(Kind::Rollback, request.into_inner().header, Duration::ZERO, String::new()).await?;
        Ok(Response::new(RollbackResponse { ok, reason, processes }))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse { node: Some(self.reporter.node_status(STATUS_BUDGET).await) }))
    }

    async fn health(&self, request: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let since: HashMap<String, u64> = request.into_inner().since.into_iter().collect();
        let processes = self.reporter.health(&since).await;
        let (healthy, summary) = reports::node_verdict(&processes);
        let node_id = self.reporter.identity().node_id.clone();
        Ok(Response::new(HealthResponse { node_id, processes, healthy, summary }))
    }
}
