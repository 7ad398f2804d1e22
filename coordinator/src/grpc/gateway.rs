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

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt};
use hotfleet_proto::{
    pushback,
    v1::{
        agent_answer, agent_gateway_server::AgentGateway, AgentAnswer, AgentCall, AttachHello, FetchPatchRequest,
        GetPatchStackRequest, GetPatchStackResponse, HeartbeatRequest, HeartbeatResponse, PatchChunk, PatchRef,
        RegisterRequest, RegisterResponse, RelayedAnswer, RelayedCall,
    },
};
use tonic::{Request, Response, Status, Streaming};

use super::caller;
use crate::{
    admission::Admission,
    agent_links::{AgentLinks, Outbound, RelayedLinks},
    auth::{Caller, Credential},
    error::Error,
    input::{self, MAX_BUILD, MAX_ID},
    term::Cluster,
};

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
type RelayedCallStream = Pin<Box<dyn Stream<Item = Result<RelayedCall, Status>> + Send + 'static>>;

/// The attaching agent's first message: which node it speaks for.
async fn hello(answers: &mut Streaming<AgentAnswer>) -> Result<String, Status> {
    let (_, node_id) = hotfleet_proto::attach::hello(answers).await?;
    input::text("node_id", &node_id, MAX_ID).map_err(Error::from)?;
    Ok(node_id)
}

/// The next message of an attached stream (`from`: the node or relay, for
/// the log), or `None` once it ends, breaks or `over` is cancelled.
async fn next_until<T>(stream: &mut Streaming<T>, over: &tokio_util::sync::CancellationToken, from: &str) -> Option<T> {
    let message = tokio::select! {
        message = stream.message() => message,
        _ = over.cancelled() => return None,
    };
    message.unwrap_or_else(|status| {
        tracing::debug!(from, error = %status.message(), "attached stream broke");
        None
    })
}

/// Reads a relay's stream: each agent's hello attaches it (once its
/// certificate, which the relay verified, speaks for the node), each answer
/// goes to its call, and an agent's end detaches it; the stream's end
/// detaches every agent still on it. An agent refused is told so down the
/// stream, and the others stay attached.
async fn relayed_answers(
    mut answers: Streaming<RelayedAnswer>,
    mut relayed: RelayedLinks,
    relay: Caller,
    term: tokio_util::sync::CancellationToken,
) {
    while let Some(message) = next_until(&mut answers, &term, &relay.name).await {
        let RelayedAnswer { node_id, answer, agent_cert, detached } = message;
        if detached {
            relayed.detach(&node_id);
            continue;
        }
        match answer {
            Some(AgentAnswer { answer: Some(agent_answer::Answer::Hello(hello)), .. }) => {
                match relayed_agent(&relay, &node_id, &hello, &agent_cert) {
                    Ok(()) => relayed.attach(&node_id, &term),
                    Err(status) => relayed.refuse(&node_id, &status),
                }
            }
            Some(answer) => {
                let call_id = answer.call_id;
                if !relayed.answer(&node_id, answer) {
                    tracing::debug!(relay = %relay.name, node = %node_id, call_id, "an answer no call waits for");
                }
            }
            None => tracing::debug!(relay = %relay.name, node = %node_id, "a relayed message with no answer"),
        }
    }
    tracing::debug!(relay = %relay.name, agents = relayed.len(), "relay detached");
}

/// Whether the agent a relay attaches may speak for `node_id`: the hello
/// names the node the message does, and the certificate the agent showed
/// the relay names it (any node through an --insecure coordinator).
fn relayed_agent(relay: &Caller, node_id: &str, hello: &AttachHello, agent_cert: &[u8]) -> Result<(), Status> {
    input::text("node_id", node_id, MAX_ID).map_err(Error::from)?;
    if hello.node_id != node_id {
        return Err(Status::invalid_argument("the hello names another node than its relayed message"));
    }
    if relay.credential == Credential::Insecure {
        return Ok(());
    }
    let agent = crate::auth::gate::relayed_caller(&relay.name, agent_cert)?;
    may_speak_for(&agent, node_id)
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
            while let Some(answer) = next_until(&mut answers, &over, &node_id).await {
                let call_id = answer.call_id;
                if !link.answer(answer) {
                    tracing::debug!(node = %node_id, call_id, "an answer no call waits for (given up on, or never sent)");
                }
            }
            links.detach(&node_id, &link);
            tracing::debug!(node = %node_id, attached = links.len(), "agent detached");
        });
        // When the calls end the agent attaches again (to whoever leads).
        let calls = futures::stream::unfold(calls, |mut calls| async move {
            match calls.recv().await? {
                Outbound::Call(_, call) => Some((Ok(*call), calls)),
                // A newer attachment replaced this one.
                Outbound::Ended { .. } => None,
            }
        })
        .take_until(over.cancelled_owned());
        Ok(Response::new(Box::pin(calls)))
    }

    type AttachRelayedStream = RelayedCallStream;

    async fn attach_relayed(
        &self,
        request: Request<Streaming<RelayedAnswer>>,
    ) -> Result<Response<RelayedCallStream>, Status> {
        let relay = caller(&request)?;
        let Some(links) = self.links.clone() else {
            return Err(Status::unimplemented("this coordinator dials its agents: it takes no attached agents"));
        };
        let term = self.cluster.leader_term()?;
        let ended = term.ended();
        let (relayed, calls) = links.relayed();
        tracing::debug!(relay = %relay.name, "relay attached");
        tokio::spawn(relayed_answers(request.into_inner(), relayed, relay, ended.clone()));
        let calls = futures::stream::unfold(calls, |mut calls| async move {
            let relayed = match calls.recv().await? {
                Outbound::Call(link, call) => {
                    RelayedCall { node_id: link.node_id().to_string(), call: Some(*call), ended: None }
                }
                Outbound::Ended { node_id, why } => {
                    RelayedCall { node_id: node_id.to_string(), call: None, ended: Some(why) }
                }
            };
            Some((Ok(relayed), calls))
        })
        // When the term ends the relay's agents attach again (to whoever leads).
        .take_until(ended.cancelled_owned());
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
