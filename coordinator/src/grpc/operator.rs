//! The operator `Coordinator` service: what the `hotfleet` CLI calls.
//! Each handler: read the actor (the caller the server's gate
//! authenticated), decode (every field within its bound, [`crate::input`]),
//! call the domain, encode.
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

use super::{actor, caller, convert};
use crate::{
    error::Error,
    input::{self, MAX_BUILD, MAX_ID, MAX_REASON},
    patch_plan::PlanRequest,
    planner::Selector,
    reads::{NodeListing, PageRequest, RolloutView},
    registry::Liveness,
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

/// Most records one list reply carries, whatever the request asks.
pub const MAX_PAGE: usize = 1000;

/// Decoding: a text field within its bound, else `INVALID_ARGUMENT`.
fn bounded(field: &'static str, value: &str, max: usize) -> Result<(), Status> {
    input::text(field, value, max).map_err(|e| Error::from(e).into())
}

/// A requested page size: `default` for 0, at most [`MAX_PAGE`].
fn page(limit: u32, default: usize) -> usize {
    match limit {
        0 => default,
        n => (n as usize).min(MAX_PAGE),
    }
}

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
        let who = actor(&request)?;
        let req = request.into_inner();
        bounded("rollout_id", &req.rollout_id, MAX_ID)?;
        bounded("reason", &req.reason, MAX_REASON)?;
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
        let who = actor(&request)?;
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
        bounded("target_build", &build, MAX_BUILD)?;
        let patches = self.cluster.patches.list(&build).await?.into_iter().map(convert::patch_info).collect();
        Ok(Response::new(pb::ListPatchesResponse { patches }))
    }

    async fn get_patch(&self, request: Request<pb::GetPatchRequest>) -> Result<Response<pb::GetPatchResponse>, Status> {
        let patch_id = request.into_inner().patch_id;
        bounded("patch_id", &patch_id, MAX_ID)?;
        let record = self.cluster.patches.get(&patch_id).await?;
        Ok(Response::new(pb::GetPatchResponse { patch: Some(convert::patch_info(record)) }))
    }

    async fn list_stack(
        &self,
        request: Request<pb::ListStackRequest>,
    ) -> Result<Response<pb::ListStackResponse>, Status> {
        let build = request.into_inner().target_build;
        bounded("target_build", &build, MAX_BUILD)?;
        let lines = self.cluster.stack(&build).await?;
        Ok(Response::new(pb::ListStackResponse { patches: lines.into_iter().map(convert::stack_item).collect() }))
    }

    async fn plan_patch(
        &self,
        request: Request<pb::PlanPatchRequest>,
    ) -> Result<Response<pb::PlanPatchResponse>, Status> {
        let who = actor(&request)?;
        let req = request.into_inner();
        bounded("patch_id", &req.patch_id, MAX_ID)?;
        bounded("node_id", &req.node_id, MAX_ID)?;
        bounded("process_id", &req.process_id, MAX_ID)?;
        let ask = PlanRequest {
            patch_id: &req.patch_id,
            node_id: &req.node_id,
            process_id: &req.process_id,
            rollout_kind: crate::rollout::RolloutKind::Apply,
        };
        let plan = self.leader()?.plan_patch(ask, &who).await?;
        Ok(Response::new(convert::patch_plan(plan)))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let req = request.into_inner();
        let selector = Selector::parse(&req.selector).map_err(Error::from)?;
        // A token is the last node id of the previous page.
        bounded("page_token", &req.page_token, MAX_ID)?;
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
        let who = actor(&request)?;
        let req = request.into_inner();
        let spec = req.spec.ok_or_else(|| Status::invalid_argument("StartRolloutRequest.spec is missing"))?;
        let term = self.leader()?;
        let (state, plan) = if req.dry_run && !req.target_build.is_empty() {
            bounded("target_build", &req.target_build, MAX_BUILD)?;
            (term.engine.dry_run_unstored(spec, &who, &req.target_build).await?, None)
        } else {
            term.start_rollout(spec, &who, req.dry_run, req.plan_canary).await?
        };
        let view = self.cluster.view(state).await;
        Ok(Response::new(pb::StartRolloutResponse {
            rollout: Some(encode(&view)),
            canary_plan: plan.map(convert::patch_plan),
        }))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let req = request.into_inner();
        let limit = page(req.limit, 50);
        let frozen = self.cluster.frozen().await;
        let states = self.cluster.rollouts(req.active_only, limit).await?;
        let rollouts = states.iter().map(|s| convert::rollout(s, frozen)).collect();
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::GetRolloutResponse>, Status> {
        let rollout_id = request.into_inner().rollout_id;
        bounded("rollout_id", &rollout_id, MAX_ID)?;
        let view = self.cluster.view(self.cluster.rollout(&rollout_id).await?).await;
        Ok(Response::new(pb::GetRolloutResponse { rollout: Some(encode(&view)) }))
    }

    type WatchRolloutStream = RolloutStream;

    async fn watch_rollout(
        &self,
        request: Request<pb::WatchRolloutRequest>,
    ) -> Result<Response<RolloutStream>, Status> {
        let rollout_id = request.into_inner().rollout_id;
        bounded("rollout_id", &rollout_id, MAX_ID)?;
        let views = self.cluster.watch(&rollout_id).await?;
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
        let who = actor(&request)?;
        let reason = request.into_inner().reason;
        bounded("reason", &reason, MAX_REASON)?;
        let term = self.leader()?;
        Ok(Response::new(convert::freeze_status(term.engine.set_freeze(Some(reason), &who).await?)))
    }

    async fn unfreeze(&self, request: Request<pb::UnfreezeRequest>) -> Result<Response<pb::FreezeStatus>, Status> {
        let who = actor(&request)?;
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
        let req = request.into_inner();
        let before = (req.before_seq != 0).then_some(req.before_seq);
        let page = self.cluster.audit(page(req.limit, 100), before).await?;
        Ok(Response::new(pb::ListAuditResponse {
            records: page.records.into_iter().map(convert::audit_record).collect(),
            next_before_seq: page.next_before.unwrap_or(0),
        }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let who = actor(&request)?;
        let req = request.into_inner();
        bounded("node_id", &req.node_id, MAX_ID)?;
        bounded("reason", &req.reason, MAX_REASON)?;
        let node = self.leader()?.remove_node(&req.node_id, &who, &req.reason).await?;
        Ok(Response::new(pb::RemoveNodeResponse { was_alive: node.liveness == Liveness::Alive }))
    }

    async fn get_leader(&self, _request: Request<pb::GetLeaderRequest>) -> Result<Response<pb::LeaderStatus>, Status> {
        // One read answers both fields: the term can start or end between
        // two reads, and "leads, epoch 0" would be a contradiction.
        let (term, leader) = self.cluster.leadership();
        Ok(Response::new(pb::LeaderStatus {
            is_leader: term.is_some(),
            self_addr: self.cluster.self_addr.clone(),
            leader_addr: leader.as_ref().map(|l| l.addr.clone()).unwrap_or_default(),
            epoch: leader.map(|l| l.epoch).unwrap_or(0),
            store: self.cluster.backend().to_string(),
        }))
    }

    async fn who_am_i(&self, request: Request<pb::WhoAmIRequest>) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let caller = caller(&request)?;
        Ok(Response::new(pb::WhoAmIResponse {
            identity: caller.name.clone(),
            role: caller.role.map(|r| r.name().to_string()).unwrap_or_default(),
            credential: caller.credential_name().to_string(),
        }))
    }
}
