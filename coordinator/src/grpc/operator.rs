//! The operator `Coordinator` service: what the `hotfleet` CLI calls.
//! Each handler: read the actor, decode, call the domain, encode.
//!
//! Writes go to the leader's term ([`Cluster::leader_term`]: a follower
//! refuses them naming the leader). Reads are served by every coordinator
//! through [`crate::reads`], which decides between the leader's engine and
//! the store.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt};
use hotfleet_proto::v1::{self as pb, coordinator_server::Coordinator};
use prost::Message;
use tonic::{Request, Response, Status};

use super::{actor, convert};
use crate::{
    error::Error,
    planner::Selector,
    reads::{NodeListing, PageRequest, RolloutView},
    rollout::OperatorAction,
    term::{Cluster, Term},
};

/// The `Coordinator` (operator) service.
#[derive(Clone)]
pub struct OperatorService {
    pub cluster: Cluster,
}

/// Most encoded bytes of nodes in one `ListNodes` page: half the default
/// 4 MiB gRPC message limit, so a page fits any client with room to spare.
const PAGE_BYTES: usize = 2 * 1024 * 1024;

type RolloutStream = Pin<Box<dyn Stream<Item = Result<pb::Rollout, Status>> + Send + 'static>>;

fn encode(view: &RolloutView) -> pb::Rollout {
    convert::rollout(&view.state, view.frozen)
}

impl OperatorService {
    fn leader(&self) -> Result<Arc<Term>, Status> {
        Ok(self.cluster.leader_term()?)
    }

    /// Pause, resume, promote and abort: one path.
    async fn act(
        &self,
        request: Request<pb::RolloutActionRequest>,
        action: OperatorAction,
    ) -> Result<Response<pb::RolloutActionResponse>, Status> {
        let who = actor(&request);
        let req = request.into_inner();
        let state = self.leader()?.engine.act(&req.rollout_id, action, &who, &req.reason).await?;
        let view = self.cluster.view(state).await;
        Ok(Response::new(pb::RolloutActionResponse { rollout: Some(encode(&view)) }))
    }
}

#[tonic::async_trait]
impl Coordinator for OperatorService {
    async fn push_patch(
        &self,
        request: Request<pb::PushPatchRequest>,
    ) -> Result<Response<pb::PushPatchResponse>, Status> {
        let who = actor(&request);
        let bundle = request.into_inner().bundle;
        let term = self.leader()?;
        let (record, created) = term.patches.push(term.fence, &bundle, &who).await?;
        Ok(Response::new(pb::PushPatchResponse { patch: Some(convert::patch_info(record)), created }))
    }

    async fn list_patches(
        &self,
        request: Request<pb::ListPatchesRequest>,
    ) -> Result<Response<pb::ListPatchesResponse>, Status> {
        let build = request.into_inner().target_build;
        let patches = self.cluster.patches.list(&build).await?.into_iter().map(convert::patch_info).collect();
        Ok(Response::new(pb::ListPatchesResponse { patches }))
    }

    async fn get_patch(&self, request: Request<pb::GetPatchRequest>) -> Result<Response<pb::GetPatchResponse>, Status> {
        let record = self.cluster.patches.get(&request.into_inner().patch_id).await?;
        Ok(Response::new(pb::GetPatchResponse { patch: Some(convert::patch_info(record)) }))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let req = request.into_inner();
        let selector = Selector::parse(&req.selector).map_err(Error::from)?;
        let page =
            PageRequest { after: (!req.page_token.is_empty()).then_some(req.page_token), size: req.page_size as usize };
        // A paged answer stays under PAGE_BYTES on the wire; an unpaged one
        // (older clients) is whole, as it always was.
        let paged = page.size > 0;
        let mut bytes = 0usize;
        let fits = |listing: &NodeListing| {
            bytes += convert::node_info(listing.clone()).encoded_len();
            !paged || bytes <= PAGE_BYTES
        };
        let found = self.cluster.nodes_page(&selector, &page, fits).await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: found.nodes.into_iter().map(convert::node_info).collect(),
            next_page_token: found.next.unwrap_or_default(),
            summary: Some(convert::nodes_summary(found.summary)),
        }))
    }

    async fn start_rollout(
        &self,
        request: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::StartRolloutResponse>, Status> {
        let who = actor(&request);
        let req = request.into_inner();
        let spec = req.spec.ok_or_else(|| Status::invalid_argument("StartRolloutRequest.spec is missing"))?;
        let term = self.leader()?;
        let view = self.cluster.view(term.engine.start(spec, &who, req.dry_run).await?).await;
        Ok(Response::new(pb::StartRolloutResponse { rollout: Some(encode(&view)) }))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let req = request.into_inner();
        let limit = if req.limit == 0 { 50 } else { req.limit as usize };
        let frozen = self.cluster.frozen().await;
        let states = self.cluster.rollouts(req.active_only, limit).await?;
        let rollouts = states.iter().map(|s| convert::rollout(s, frozen)).collect();
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::GetRolloutResponse>, Status> {
        let view = self.cluster.view(self.cluster.rollout(&request.into_inner().rollout_id).await?).await;
        Ok(Response::new(pb::GetRolloutResponse { rollout: Some(encode(&view)) }))
    }

    type WatchRolloutStream = RolloutStream;

    async fn watch_rollout(
        &self,
        request: Request<pb::WatchRolloutRequest>,
    ) -> Result<Response<RolloutStream>, Status> {
        let views = self.cluster.watch(&request.into_inner().rollout_id).await?;
        Ok(Response::new(Box::pin(views.map(|view| Ok(encode(&view))))))
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::RolloutActionResponse>, Status> {
        self.act(request, OperatorAction::Pause).await
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::RolloutActionResponse>, Status> {
        self.act(request, OperatorAction::Resume).await
    }

    async fn promote_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::RolloutActionResponse>, Status> {
        self.act(request, OperatorAction::Promote).await
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::RolloutActionResponse>, Status> {
        self.act(request, OperatorAction::Abort).await
    }

    async fn freeze(&self, request: Request<pb::FreezeRequest>) -> Result<Response<pb::FreezeStatus>, Status> {
        let who = actor(&request);
        let reason = request.into_inner().reason;
        let term = self.leader()?;
        Ok(Response::new(convert::freeze_status(term.engine.set_freeze(Some(reason), &who).await?)))
    }

    async fn unfreeze(&self, request: Request<pb::UnfreezeRequest>) -> Result<Response<pb::FreezeStatus>, Status> {
        let who = actor(&request);
        let term = self.leader()?;
        Ok(Response::new(convert::freeze_status(term.engine.set_freeze(None, &who).await?)))
    }

    async fn get_freeze(&self, _request: Request<pb::GetFreezeRequest>) -> Result<Response<pb::FreezeStatus>, Status> {
        Ok(Response::new(convert::freeze_status(self.cluster.freeze().await?)))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => 100,
            n => n as usize,
        };
        let records = self
            .cluster
            .store
            .audit(limit)
            .await
            .map_err(Error::from)?
            .into_iter()
            .map(convert::audit_record)
            .collect();
        Ok(Response::new(pb::ListAuditResponse { records }))
    }

    async fn get_leader(&self, _request: Request<pb::GetLeaderRequest>) -> Result<Response<pb::LeaderStatus>, Status> {
        let leader = self.cluster.leader();
        Ok(Response::new(pb::LeaderStatus {
            is_leader: self.cluster.term().is_some(),
            self_addr: self.cluster.self_addr.clone(),
            leader_addr: leader.as_ref().map(|l| l.addr.clone()).unwrap_or_default(),
            epoch: leader.map(|l| l.epoch).unwrap_or(0),
            store: self.cluster.backend().to_string(),
        }))
    }
}
