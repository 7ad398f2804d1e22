//! The operator `Coordinator` service: what the `hotfleet` CLI calls.
//! Each handler: read the actor, decode, call the domain, encode.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use hotfleet_proto::v1::{self as pb, coordinator_server::Coordinator};
use tonic::{Request, Response, Status};

use super::{actor, convert};
use crate::{
    engine::{Engine, StartRequest},
    error::Error,
    patches::Patches,
    planner::Selector,
    registry::Registry,
    store::Store,
};

/// The `Coordinator` (operator) service.
#[derive(Clone)]
pub struct OperatorService {
    pub registry: Registry,
    pub patches: Patches,
    pub engine: Engine,
    pub store: Arc<dyn Store>,
}

type RolloutStream = Pin<Box<dyn Stream<Item = Result<pb::Rollout, Status>> + Send + 'static>>;

impl OperatorService {
    fn frozen(&self) -> bool {
        self.engine.freeze_status().is_some()
    }

    fn action_response(&self, state: crate::rollout::RolloutState) -> Response<pb::RolloutActionResponse> {
        Response::new(pb::RolloutActionResponse { rollout: Some(convert::rollout(&state, self.frozen())) })
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
        let (record, created) = self.patches.push(&bundle, &who).await?;
        Ok(Response::new(pb::PushPatchResponse { patch: Some(convert::patch_info(record)), created }))
    }

    async fn list_patches(
        &self,
        request: Request<pb::ListPatchesRequest>,
    ) -> Result<Response<pb::ListPatchesResponse>, Status> {
        let build = request.into_inner().target_build;
        let patches = self.patches.list(&build).await?.into_iter().map(convert::patch_info).collect();
        Ok(Response::new(pb::ListPatchesResponse { patches }))
    }

    async fn get_patch(&self, request: Request<pb::GetPatchRequest>) -> Result<Response<pb::GetPatchResponse>, Status> {
        let record = self.patches.get(&request.into_inner().patch_id).await?;
        Ok(Response::new(pb::GetPatchResponse { patch: Some(convert::patch_info(record)) }))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let selector = Selector::parse(&request.into_inner().selector).map_err(Error::from)?;
        let nodes = self
            .registry
            .list()
            .into_iter()
            .filter(|n| selector.matches(&n.candidate().labels))
            .map(|n| {
                let active = self.engine.active_rollout_of(&n.status.node_id);
                convert::node_info(n, active)
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn start_rollout(
        &self,
        request: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::StartRolloutResponse>, Status> {
        let who = actor(&request);
        let req = request.into_inner();
        let spec = req.spec.ok_or_else(|| Status::invalid_argument("StartRolloutRequest.spec is missing"))?;
        let start = StartRequest {
            patch_id: spec.patch_id,
            selector: spec.selector,
            canary: spec.canary,
            waves: spec.waves,
            health_window_ms: spec.health_window_ms,
            step_deadline_ms: spec.step_deadline_ms,
            max_unhealthy: spec.max_unhealthy,
            pause_before: spec.pause_before,
            tick_p99_factor: spec.tick_p99_factor,
            tick_p99_floor_ms: spec.tick_p99_floor_ms,
            prepare_ttl_seconds: spec.prepare_ttl_seconds,
            description: spec.description,
        };
        let state = self.engine.start(start, &who, req.dry_run).await?;
        Ok(Response::new(pb::StartRolloutResponse { rollout: Some(convert::rollout(&state, self.frozen())) }))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let req = request.into_inner();
        let limit = if req.limit == 0 { 50 } else { req.limit as usize };
        let frozen = self.frozen();
        let rollouts =
            self.engine.list(req.active_only, limit).await?.iter().map(|s| convert::rollout(s, frozen)).collect();
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::GetRolloutResponse>, Status> {
        let state = self.engine.get(&request.into_inner().rollout_id).await?;
        Ok(Response::new(pb::GetRolloutResponse { rollout: Some(convert::rollout(&state, self.frozen())) }))
    }

    type WatchRolloutStream = RolloutStream;

    async fn watch_rollout(
        &self,
        request: Request<pb::WatchRolloutRequest>,
    ) -> Result<Response<RolloutStream>, Status> {
        let id = request.into_inner().rollout_id;
        let engine = self.engine.clone();
        let Some(mut rx) = engine.subscribe(&id) else {
            // Not active: one final snapshot (or NOT_FOUND).
            let state = engine.get(&id).await?;
            let frozen = self.frozen();
            let once = futures::stream::iter(vec![Ok(convert::rollout(&state, frozen))]);
            return Ok(Response::new(Box::pin(once)));
        };
        let stream = async_stream(move |tx| async move {
            loop {
                let state = rx.borrow_and_update().clone();
                let terminal = state.rollout.phase.is_terminal();
                let frozen = engine.freeze_status().is_some();
                if tx.send(Ok(convert::rollout(&state, frozen))).await.is_err() || terminal {
                    return;
                }
                if rx.changed().await.is_err() {
                    // Driver gone (finished or shutting down): send the final word.
                    if let Ok(state) = engine.get(&state.rollout.id).await {
                        let _ = tx.send(Ok(convert::rollout(&state, frozen))).await;
                    }
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::RolloutActionResponse>, Status> {
        let who = actor(&request);
        let req = request.into_inner();
        Ok(self.action_response(self.engine.pause(&req.rollout_id, &who, &req.reason).await?))
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::RolloutActionResponse>, Status> {
        let who = actor(&request);
        let req = request.into_inner();
        Ok(self.action_response(self.engine.resume_rollout(&req.rollout_id, &who, &req.reason).await?))
    }

    async fn promote_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::RolloutActionResponse>, Status> {
        let who = actor(&request);
        let req = request.into_inner();
        Ok(self.action_response(self.engine.promote(&req.rollout_id, &who, &req.reason).await?))
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::RolloutActionResponse>, Status> {
        let who = actor(&request);
        let req = request.into_inner();
        Ok(self.action_response(self.engine.abort(&req.rollout_id, &who, &req.reason).await?))
    }

    async fn freeze(&self, request: Request<pb::FreezeRequest>) -> Result<Response<pb::FreezeStatus>, Status> {
        let who = actor(&request);
        let reason = request.into_inner().reason;
        let reason = if reason.trim().is_empty() { "no reason given".to_string() } else { reason };
        Ok(Response::new(convert::freeze_status(self.engine.set_freeze(Some(reason), &who).await?)))
    }

    async fn unfreeze(&self, request: Request<pb::UnfreezeRequest>) -> Result<Response<pb::FreezeStatus>, Status> {
        let who = actor(&request);
        Ok(Response::new(convert::freeze_status(self.engine.set_freeze(None, &who).await?)))
    }

    async fn get_freeze(&self, _request: Request<pb::GetFreezeRequest>) -> Result<Response<pb::FreezeStatus>, Status> {
        Ok(Response::new(convert::freeze_status(self.engine.freeze_status())))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => 100,
            n => n as usize,
        };
        let records =
            self.store.audit(limit).await.map_err(Error::from)?.into_iter().map(convert::audit_record).collect();
        Ok(Response::new(pb::ListAuditResponse { records }))
    }
}

/// A stream fed by a spawned producer through a small channel; the producer
/// stops when the client goes away (send fails).
fn async_stream<F, Fut>(producer: F) -> RolloutStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::Rollout, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(producer(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
