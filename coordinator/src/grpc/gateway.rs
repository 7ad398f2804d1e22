//! `AgentGateway`: what agents call (register, heartbeat, fetch a patch, get
//! the fleet's patch stack).
//!
//! Registration and heartbeats go to the leader (its registry judges
//! liveness, and its answer names the rollouts whose prepares the agent
//! renews); a follower refuses them naming the leader, and the agent
//! follows. Patch downloads and patch stacks are reads: any coordinator
//! serves them from the store. A registration storm is served at the pace
//! the coordinator can take ([`crate::admission`]): the rest are told when to
//! come back.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use hotfleet_proto::{
    pushback,
    v1::{
        agent_gateway_server::AgentGateway, FetchPatchRequest, GetPatchStackRequest, GetPatchStackResponse,
        HeartbeatRequest, HeartbeatResponse, PatchChunk, PatchRef, RegisterRequest, RegisterResponse,
    },
};
use tonic::{Request, Response, Status};

use super::caller;
use crate::{
    admission::Admission,
    error::Error,
    input::{self, MAX_BUILD, MAX_ID},
    term::Cluster,
};

/// Registration and heartbeats speak for one node: only that node's
/// certificate may send them, so a node id can be neither invented nor
/// taken over from another address.
fn check_node<T>(request: &Request<T>, node_id: &str) -> Result<(), Status> {
    let caller = caller(request)?;
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
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<PatchChunk, Status>> + Send + 'static>>;

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
        }))
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
