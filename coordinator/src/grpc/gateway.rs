//! `AgentGateway`: what agents call (register, heartbeat, fetch a patch, get
//! the fleet's patch stack, attach for commands).
//!
//! Registration and heartbeats go to the leader (its registry judges
//! liveness, and its answer names the rollouts whose prepares the agent
//! renews); a follower refuses them naming the leader, and the agent
//! follows. Patch downloads and patch stacks are reads: any coordinator
//! serves them from the store. A registration storm is served at the pace
//! the coordinator can take ([`crate::admission`]): the rest are told when to
//! come back. An agent attached to the leader gets its commands down its
//! own connection ([`crate::agent_links`]).

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use hotfleet_proto::{
    pushback,
    v1::{
        agent_answer, agent_gateway_server::AgentGateway, AgentAnswer, AgentCall, AttachHello, FetchPatchRequest,
        GetPatchStackRequest, GetPatchStackResponse, HeartbeatRequest, HeartbeatResponse, PatchChunk, PatchRef,
        RegisterRequest, RegisterResponse,
    },
};
use tonic::{Request, Response, Status, Streaming};

use super::caller;
use crate::{
    admission::Admission,
    agent_links::AgentLinks,
    auth::Caller,
    error::Error,
    input::{self, MAX_BUILD, MAX_ID},
    term::Cluster,
};

/// How long an attaching agent has to say who it is.
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// Registration and heartbeats speak for one node: only that node's
/// certificate may send them, so a node id can be neither invented nor
/// taken over from another address.
fn check_node<T>(request: &Request<T>, node_id: &str) -> Result<(), Status> {
    may_speak_for(&caller(request)?, node_id)
}

fn may_speak_for(caller: &Caller, node_id: &str) -> Result<(), Status> {
    if caller.speaks_for_node(node_id) {
        return Ok(());
    }
    let shown: String = node_id.chars().take(128).collect();
    Err(Status::permission_denied(format!(
        "certificate {:?} may not speak for node {shown:?}: an agent registers with its own node certificate",
        caller.name
    )))
}

/// Bytes per `PatchChunk`: small enough for any default message limit.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// The `AgentGateway` service.
#[derive(Clone)]
pub struct GatewayService {
    pub cluster: Cluster,
    /// How many registrations are served at once ([`crate::admission`]).
    pub admission: Arc<Admission>,
    /// Attached agents' links (`None`: this coordinator only dials agents).
    pub links: Option<AgentLinks>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<PatchChunk, Status>> + Send + 'static>>;
type CallStream = Pin<Box<dyn Stream<Item = Result<AgentCall, Status>> + Send + 'static>>;

/// The attaching agent's first message: which node it speaks for.
async fn hello(answers: &mut Streaming<AgentAnswer>) -> Result<String, Status> {
    let first = tokio::time::timeout(HELLO_WAIT, answers.message())
        .await
        .map_err(|_| {
            Status::deadline_exceeded("no hello within 10 s: an attaching agent first says which node it is")
        })??
        .ok_or_else(|| Status::invalid_argument("the stream ended before the hello"))?;
    match first.answer {
        Some(agent_answer::Answer::Hello(AttachHello { node_id })) => {
            input::text("node_id", &node_id, MAX_ID).map_err(Error::from)?;
            Ok(node_id)
        }
        _ => Err(Status::invalid_argument("the first message on Attach must be the hello naming the node")),
    }
}

#[tonic::async_trait]
impl AgentGateway for GatewayService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let node_id = request.get_ref().node.as_ref().map(|n| n.node_id.clone()).unwrap_or_default();
        check_node(&request, &node_id)?;
        let node =
            request.into_inner().node.ok_or_else(|| Status::invalid_argument("RegisterRequest.node is missing"))?;
        let _admitted = self.admission.enter().map_err(|busy| pushback::busy(busy.message(), busy.wait))?;
        let answer = self.cluster.leader_term()?.register(node.into()).await?;
        Ok(Response::new(RegisterResponse {
            heartbeat_interval_seconds: answer.heartbeat_interval_seconds,
            epoch: answer.epoch,
            live_rollouts: answer.live_rollouts,
            send_digests: answer.send_digests,
        }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let node_id = request.get_ref().node.as_ref().map(|n| n.node_id.clone()).unwrap_or_default();
        check_node(&request, &node_id)?;
        let node =
            request.into_inner().node.ok_or_else(|| Status::invalid_argument("HeartbeatRequest.node is missing"))?;
        let answer = self.cluster.leader_term()?.heartbeat(node.into()).await?;
        Ok(Response::new(HeartbeatResponse {
            known: answer.known,
            epoch: answer.epoch,
            live_rollouts: answer.live_rollouts,
            send_digests: answer.send_digests,
        }))
    }

    type AttachStream = CallStream;

    async fn attach(&self, request: Request<Streaming<AgentAnswer>>) -> Result<Response<CallStream>, Status> {
        let caller = caller(&request)?;
        let Some(links) = self.links.clone() else {
            return Err(Status::unimplemented("this coordinator dials its agents: it takes no attached agents"));
        };
        let mut answers = request.into_inner();
        let node_id = hello(&mut answers).await?;
        may_speak_for(&caller, &node_id)?;
        // A follower refuses naming the leader, as it does heartbeats.
        let term = self.cluster.leader_term()?;
        let (link, calls) = links.attach(&node_id, &term.ended());
        tracing::debug!(node = %node_id, attached = links.len(), "agent attached");
        // Over with the term, or once the node attached again.
        let over = link.over();
        tokio::spawn(async move {
            let over = link.over();
            loop {
                let answer = tokio::select! {
                    answer = answers.message() => answer,
                    _ = over.cancelled() => break,
                };
                match answer {
                    Ok(Some(answer)) => {
                        let call_id = answer.call_id;
                        if !link.answer(answer) {
                            tracing::debug!(node = %node_id, call_id, "an answer no call waits for (given up on, or never sent)");
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(node = %node_id, error = %status.message(), "attached stream broke");
                        break;
                    }
                }
            }
            links.detach(&node_id, &link);
            tracing::debug!(node = %node_id, attached = links.len(), "agent detached");
        });
        // When the calls end the agent attaches again (to whoever leads).
        let calls =
            futures::stream::unfold(
                calls,
                |mut calls| async move { calls.recv().await.map(|call| (Ok(*call), calls)) },
            )
            .take_until(over.cancelled_owned());
        Ok(Response::new(Box::pin(calls)))
    }

    type FetchPatchStream = ChunkStream;

    async fn fetch_patch(&self, request: Request<FetchPatchRequest>) -> Result<Response<ChunkStream>, Status> {
        let patch_id = request.into_inner().patch_id;
        input::text("patch_id", &patch_id, MAX_ID).map_err(Error::from)?;
        let bytes = self.cluster.patches.bundle(&patch_id).await?;
        let total_size = bytes.len() as u64;
        let chunks: Vec<Result<PatchChunk, Status>> = bytes
            .chunks(CHUNK_BYTES)
            .enumerate()
            .map(|(i, data)| Ok(PatchChunk { total_size, offset: (i * CHUNK_BYTES) as u64, data: data.to_vec() }))
            .collect();
        tracing::debug!(patch = %patch_id, bytes = total_size, chunks = chunks.len(), "serving patch");
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn get_patch_stack(
        &self,
        request: Request<GetPatchStackRequest>,
    ) -> Result<Response<GetPatchStackResponse>, Status> {
        let build = request.into_inner().target_build;
        if build.trim().is_empty() {
            return Err(Status::invalid_argument("target_build is empty"));
        }
        input::text("target_build", &build, MAX_BUILD).map_err(Error::from)?;
        let stack = self.cluster.store.patch_stack(&build).await.map_err(Error::from)?;
        let patches = stack
            .into_iter()
            .map(|e| PatchRef {
                patch_id: e.patch_id,
                target_build: e.target_build,
                parent_patch_id: e.parent_patch_id,
                description: e.description,
            })
            .collect();
        Ok(Response::new(GetPatchStackResponse { patches }))
    }
}
