//! The operator `Coordinator` service: what the `hotfleet` CLI calls.
//! Each handler: read the actor, decode, call the domain, encode.
//!
//! Writes go to the leader's term ([`Cluster::leader_term`]: a follower
//! refuses them naming the leader). Reads are served by every coordinator:
//! live from the engine while leading, from the store otherwise, so an
//! operator can watch a rollout on any coordinator, across a fail-over.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use hotfleet_proto::v1::{self as pb, coordinator_server::Coordinator};
use tonic::{Request, Response, Status};

use super::{actor, convert};
use crate::{
    engine::{self, StartRequest},
    error::Error,
    planner::Selector,
    registry,
    rollout::RolloutState,
    term::{Cluster, Term},
};

/// How often a watch served from the store (a follower's) polls it.
const STORE_POLL: Duration = Duration::from_millis(300);

/// The `Coordinator` (operator) service.
#[derive(Clone)]
pub struct OperatorService {
    pub cluster: Cluster,
}

type RolloutStream = Pin<Box<dyn Stream<Item = Result<pb::Rollout, Status>> + Send + 'static>>;

impl OperatorService {
    async fn frozen(&self) -> bool {
        frozen(&self.cluster).await
    }

    async fn action_response(&self, state: RolloutState) -> Response<pb::RolloutActionResponse> {
        Response::new(pb::RolloutActionResponse { rollout: Some(convert::rollout(&state, self.frozen().await)) })
    }

    fn leader(&self) -> Result<Arc<Term>, Status> {
        Ok(self.cluster.leader_term()?)
    }
}

async fn frozen(cluster: &Cluster) -> bool {
    match cluster.term() {
        Some(term) => term.engine.freeze_status().is_some(),
        None => cluster.store.freeze().await.ok().flatten().is_some(),
    }
}

/// A rollout's current state: live on the leader, from the store elsewhere.
async fn rollout_state(cluster: &Cluster, id: &str) -> Result<RolloutState, Error> {
    match cluster.term() {
        Some(term) => term.engine.get(id).await,
        None => engine::stored_state(cluster.store.as_ref(), id).await,
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
        let selector = Selector::parse(&request.into_inner().selector).map_err(Error::from)?;
        let nodes = match self.cluster.term() {
            Some(term) => term
                .registry
                .list()
                .into_iter()
                .filter(|n| selector.matches(&n.candidate().labels))
                .map(|n| {
                    let active = term.engine.active_rollout_of(&n.status.node_id);
                    convert::node_info(n, active)
                })
                .collect(),
            None => {
                // A follower: the stored fleet, liveness left to the leader.
                let store = self.cluster.store.as_ref();
                let active = engine::stored_list(store, true, usize::MAX).await?;
                registry::stored_views(store)
                    .await
                    .map_err(Error::from)?
                    .into_iter()
                    .filter(|n| selector.matches(&n.candidate().labels))
                    .map(|n| {
                        let owner = active
                            .iter()
                            .find(|s| s.rollout.all_nodes().any(|id| *id == n.status.node_id))
                            .map(|s| s.rollout.id.clone());
                        convert::node_info(n, owner)
                    })
                    .collect()
            }
        };
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
        let term = self.leader()?;
        let state = term.engine.start(start, &who, req.dry_run).await?;
        Ok(Response::new(pb::StartRolloutResponse { rollout: Some(convert::rollout(&state, self.frozen().await)) }))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let req = request.into_inner();
        let limit = if req.limit == 0 { 50 } else { req.limit as usize };
        let frozen = self.frozen().await;
        let states = match self.cluster.term() {
            Some(term) => term.engine.list(req.active_only, limit).await?,
            None => engine::stored_list(self.cluster.store.as_ref(), req.active_only, limit).await?,
        };
        let rollouts = states.iter().map(|s| convert::rollout(s, frozen)).collect();
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::GetRolloutResponse>, Status> {
        let state = rollout_state(&self.cluster, &request.into_inner().rollout_id).await?;
        Ok(Response::new(pb::GetRolloutResponse { rollout: Some(convert::rollout(&state, self.frozen().await)) }))
    }

    type WatchRolloutStream = RolloutStream;

    async fn watch_rollout(
        &self,
        request: Request<pb::WatchRolloutRequest>,
    ) -> Result<Response<RolloutStream>, Status> {
        let id = request.into_inner().rollout_id;
        // NOT_FOUND up front, not as a stream error.
        let first = rollout_state(&self.cluster, &id).await?;
        let cluster = self.cluster.clone();
        let stream = async_stream(move |tx| async move {
            let send = |state: &RolloutState, frozen: bool| tx.send(Ok(convert::rollout(state, frozen)));
            if send(&first, frozen(&cluster).await).await.is_err() || first.rollout.phase.is_terminal() {
                return;
            }
            let mut last = (first.rollout.generation, first.rollout.epoch);
            loop {
                // Live snapshots while this coordinator leads and drives it.
                if let Some(term) = cluster.term() {
                    if let Some(mut rx) = term.engine.subscribe(&id) {
                        let ended = term.ended();
                        loop {
                            let state = rx.borrow_and_update().clone();
                            let key = (state.rollout.generation, state.rollout.epoch);
                            if key != last {
                                last = key;
                                let frozen = term.engine.freeze_status().is_some();
                                if send(&state, frozen).await.is_err() {
                                    return;
                                }
                            }
                            if state.rollout.phase.is_terminal() {
                                return;
                            }
                            tokio::select! {
                                changed = rx.changed() => if changed.is_err() { break },
                                _ = ended.cancelled() => break,
                            }
                        }
                        // The driver finished, or the term ended: read the store next.
                    }
                }
                // A follower (or between terms): follow the store.
                match engine::stored_state(cluster.store.as_ref(), &id).await {
                    Ok(state) => {
                        let key = (state.rollout.generation, state.rollout.epoch);
                        if key != last {
                            last = key;
                            if send(&state, frozen(&cluster).await).await.is_err() {
                                return;
                            }
                        }
                        if state.rollout.phase.is_terminal() {
                            return;
                        }
                    }
                    // The store is unreachable: keep the watch open, keep trying.
                    Err(err) => tracing::debug!(rollout = %id, error = %err, "watch: store read failed; retrying"),
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(STORE_POLL).await;
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
        let term = self.leader()?;
        let state = term.engine.pause(&req.rollout_id, &who, &req.reason).await?;
        Ok(self.action_response(state).await)
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::RolloutActionResponse>, Status> {
        let who = actor(&request);
        let req = request.into_inner();
        let term = self.leader()?;
        let state = term.engine.resume_rollout(&req.rollout_id, &who, &req.reason).await?;
        Ok(self.action_response(state).await)
    }

    async fn promote_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::RolloutActionResponse>, Status> {
        let who = actor(&request);
        let req = request.into_inner();
        let term = self.leader()?;
        let state = term.engine.promote(&req.rollout_id, &who, &req.reason).await?;
        Ok(self.action_response(state).await)
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::RolloutActionResponse>, Status> {
        let who = actor(&request);
        let req = request.into_inner();
        let term = self.leader()?;
        let state = term.engine.abort(&req.rollout_id, &who, &req.reason).await?;
        Ok(self.action_response(state).await)
    }

    async fn freeze(&self, request: Request<pb::FreezeRequest>) -> Result<Response<pb::FreezeStatus>, Status> {
        let who = actor(&request);
        let reason = request.into_inner().reason;
        let reason = if reason.trim().is_empty() { "no reason given".to_string() } else { reason };
        let term = self.leader()?;
        Ok(Response::new(convert::freeze_status(term.engine.set_freeze(Some(reason), &who).await?)))
    }

    async fn unfreeze(&self, request: Request<pb::UnfreezeRequest>) -> Result<Response<pb::FreezeStatus>, Status> {
        let who = actor(&request);
        let term = self.leader()?;
        Ok(Response::new(convert::freeze_status(term.engine.set_freeze(None, &who).await?)))
    }

    async fn get_freeze(&self, _request: Request<pb::GetFreezeRequest>) -> Result<Response<pb::FreezeStatus>, Status> {
        let status = match self.cluster.term() {
            Some(term) => term.engine.freeze_status(),
            None => self.cluster.store.freeze().await.map_err(Error::from)?,
        };
        Ok(Response::new(convert::freeze_status(status)))
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
