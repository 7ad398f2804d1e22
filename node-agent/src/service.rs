//! The gRPC `Agent` service: decode, call the [`Participant`], encode.

use std::{collections::HashMap, time::Duration};

use hotfleet_proto::v1::{
    agent_server::Agent, AbortRequest, AbortResponse, CommitRequest, CommitResponse, HealthRequest, HealthResponse,
    NodeStatus, PrepareRequest, PrepareResponse, RollbackRequest, RollbackResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use crate::{
    epoch::EpochError,
    participant::{ParticipantError, SharedParticipant},
};

/// Node identity reported in statuses.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node_id: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub advertise_addr: String,
}

pub struct AgentService {
    participant: SharedParticipant,
    identity: NodeIdentity,
}

impl AgentService {
    pub fn new(participant: SharedParticipant, identity: NodeIdentity) -> Self {
        Self { participant, identity }
    }
}

/// Builds this node's full status (also sent with every heartbeat).
pub async fn node_status(participant: &SharedParticipant, identity: &NodeIdentity) -> NodeStatus {
    let (commands_admitted, commands_refused_stale) = participant.command_counts().await;
    NodeStatus {
        node_id: identity.node_id.clone(),
        labels: identity.labels.clone().into_iter().collect(),
        advertise_addr: identity.advertise_addr.clone(),
        processes: participant.process_statuses().await,
        highest_epoch: participant.highest_epoch().await,
        prepared: participant.prepared().await,
        commands_admitted,
        commands_refused_stale,
    }
}

impl From<ParticipantError> for Status {
    fn from(err: ParticipantError) -> Self {
        match err {
            ParticipantError::Epoch(EpochError::Stale { .. }) => Status::failed_precondition(err.to_string()),
            ParticipantError::Epoch(_) => Status::internal(err.to_string()),
            _ => Status::invalid_argument(err.to_string()),
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn prepare(&self, request: Request<PrepareRequest>) -> Result<Response<PrepareResponse>, Status> {
        let request = request.into_inner();
        let ttl = Duration::from_secs(u64::from(request.ttl_seconds));
        let answer = self.participant.prepare(request.header, ttl).await?;
        Ok(Response::new(PrepareResponse { vote_yes: answer.ok, reason: answer.reason, processes: answer.processes }))
    }

    async fn commit(&self, request: Request<CommitRequest>) -> Result<Response<CommitResponse>, Status> {
        let answer = self.participant.commit(request.into_inner().header).await?;
        Ok(Response::new(CommitResponse { ok: answer.ok, reason: answer.reason, processes: answer.processes }))
    }

    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<AbortResponse>, Status> {
        let answer = self.participant.abort(request.into_inner().header).await?;
        Ok(Response::new(AbortResponse { ok: answer.ok, reason: answer.reason, processes: answer.processes }))
    }

    async fn rollback(&self, request: Request<RollbackRequest>) -> Result<Response<RollbackResponse>, Status> {
        let answer = self.participant.rollback(request.into_inner().header).await?;
        Ok(Response::new(RollbackResponse { ok: answer.ok, reason: answer.reason, processes: answer.processes }))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse { node: Some(node_status(&self.participant, &self.identity).await) }))
    }

    async fn health(&self, request: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let since: HashMap<String, u64> = request.into_inner().since.into_iter().collect();
        let processes = self.participant.health(&since).await;
        Ok(Response::new(HealthResponse { node_id: self.identity.node_id.clone(), processes }))
    }
}
