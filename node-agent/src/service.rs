//! The gRPC `Agent` service: decode, call the [`Participant`], encode.

use std::{collections::HashMap, time::Duration};

use hotfleet_proto::v1::{
    agent_server::Agent, AbortRequest, AbortResponse, CommitRequest, CommitResponse, HealthRequest, HealthResponse,
    NodeStatus, PrepareRequest, PrepareResponse, ProcessHealthReport, RollbackRequest, RollbackResponse, StatusRequest,
    StatusResponse,
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
        let (healthy, summary) = node_verdict(&processes);
        Ok(Response::new(HealthResponse { node_id: self.identity.node_id.clone(), processes, healthy, summary }))
    }
}

/// Aggregates per-process figures into one verdict for the node. No process
/// at all is unhealthy: a node that serves nothing is not a healthy game node.
pub fn node_verdict(processes: &[ProcessHealthReport]) -> (bool, String) {
    if processes.is_empty() {
        return (false, "no game process connected".into());
    }
    let problems: Vec<String> = processes
        .iter()
        .filter_map(|p| {
            let health = p.health.clone().unwrap_or_default();
            let why = if !p.reachable {
                format!("unreachable ({})", p.error)
            } else if !health.alive {
                "not ticking".to_string()
            } else if !health.game_ok {
                format!("game health failing: {}", health.game_detail)
            } else if health.exceptions_since > 0 {
                format!("{} unhandled exception(s)", health.exceptions_since)
            } else {
                return None;
            };
            Some(format!("process {} (pid {}): {why}", p.process_id, p.pid))
        })
        .collect();
    if problems.is_empty() {
        (true, format!("{} process(es) healthy", processes.len()))
    } else {
        (false, problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotfleet_proto::v1::ProcessHealth;

    fn report(id: &str, reachable: bool, alive: bool, game_ok: bool, exceptions: u64) -> ProcessHealthReport {
        ProcessHealthReport {
            process_id: id.into(),
            pid: 7,
            reachable,
            health: Some(ProcessHealth { alive, game_ok, exceptions_since: exceptions, ..Default::default() }),
            error: if reachable { String::new() } else { "disconnected".into() },
        }
    }

    #[test]
    fn node_is_healthy_only_when_every_process_is() {
        assert_eq!(node_verdict(&[report("a", true, true, true, 0)]), (true, "1 process(es) healthy".into()));
        assert!(!node_verdict(&[]).0, "a node without processes serves nothing");
        for bad in [
            report("b", false, true, true, 0),
            report("b", true, false, true, 0),
            report("b", true, true, false, 0),
            report("b", true, true, true, 2),
        ] {
            let (healthy, why) = node_verdict(&[report("a", true, true, true, 0), bad]);
            assert!(!healthy);
            assert!(why.starts_with("process b"), "{why}");
        }
    }
}
