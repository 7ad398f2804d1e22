//! The leader's term, and the role the gRPC adapters consult.
//!
//! A [`Term`] is everything that runs only while this coordinator leads: the
//! node registry (heartbeats), the rollout engine, the drift reconciler and
//! the sweeper, all built afresh for each won election with that
//! tenure's fence, on the tenure's [`TermStore`] and [`GuardedAgents`]. When
//! the tenure is lost the term is stopped at once (tasks aborted, like a
//! crash: every transition was recorded before it was acted on, so the next
//! leader resumes from the store); on shutdown it drains instead.
//!
//! [`Cluster`] is what the gRPC layer holds: the store (followers serve reads
//! from it), the current term if this coordinator leads, and who leads
//! otherwise, so a refused write can name the leader.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use hotfleet_patch::{Limits, TrustedKeys};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    agents::AgentClient,
    engine::{Engine, EngineConfig},
    error::Error,
    leadership::{GuardedAgents, LeaderInfo, LeaderView, LeaseGuard, Tenure, TermStore},
    node::NodeStatus,
    patch_plan::{self, PatchPlan, PlanContext, PlanRequest},
    patches::audit,
    patches::Patches,
    reconcile::Reconciler,
    registry::{NodeView, Registry, RegistryError},
    rollout::{ParseSpec, RolloutState},
    store::{AuditRetention, Batch, Fence, Store, StoreError, Write},
    sweeper::Sweeper,
};

/// What a term is built from (the same for every tenure of this process).
pub struct TermContext {
    pub store: Arc<dyn Store>,
    pub agents: Arc<dyn AgentClient>,
    pub trusted: TrustedKeys,
    pub limits: Limits,
    pub heartbeat_interval: Duration,
    pub lost_timeout: Duration,
    pub agent_timeout: Duration,
    /// Silence after which a lost node is forgotten (the sweeper).
    pub node_expiry: Duration,
    pub audit_retention: AuditRetention,
}

/// What the leader answers an agent's registration or heartbeat with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkAnswer {
    /// False when the node is unknown (it must register again).
    pub known: bool,
    pub epoch: u64,
    pub heartbeat_interval_seconds: u32,
    /// The unfinished rollouts this term drives on the node, whose prepares
    /// the agent renews: prepared state lives as long as its rollout.
    pub live_rollouts: Vec<String>,
    /// The heartbeat left out digests this term does not hold.
    pub send_digests: bool,
}

/// Everything that runs while this coordinator leads.
pub struct Term {
    pub fence: Fence,
    pub guard: LeaseGuard,
    pub registry: Registry,
    pub patches: Patches,
    pub engine: Engine,
    /// The term's fenced store and guarded agents (what `patch plan` uses).
    store: Arc<dyn Store>,
    agents: Arc<dyn AgentClient>,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Term {
    /// Builds the term of `tenure`: loads the fleet, starts the background
    /// tasks and resumes every unfinished rollout from the store.
    pub async fn start(ctx: &TermContext, tenure: &Tenure) -> Result<Arc<Term>, StoreError> {
        let fence = tenure.fence;
        let guard = tenure.guard.clone();
        let store: Arc<dyn Store> = Arc::new(TermStore::new(ctx.store.clone(), guard.clone()));
        let agents: Arc<dyn AgentClient> = Arc::new(GuardedAgents::new(ctx.agents.clone(), guard.clone()));
        let registry = Registry::load(store.clone(), fence, ctx.heartbeat_interval, ctx.lost_timeout).await?;
        let patches = Patches::new(store.clone(), ctx.trusted.clone(), ctx.limits);
        let cancel = CancellationToken::new();
        let engine = Engine::new(
            store.clone(),
            fence,
            registry.clone(),
            agents.clone(),
            EngineConfig::default(),
            cancel.child_token(),
        );
        let reconciler = Reconciler {
            store: store.clone(),
            fence,
            registry: registry.clone(),
            engine: engine.clone(),
            agents: agents.clone(),
            deadline: ctx.agent_timeout,
        };
        let sweeper = Sweeper {
            registry: registry.clone(),
            engine: engine.clone(),
            store: store.clone(),
            fence,
            node_expiry: ctx.node_expiry,
            audit: ctx.audit_retention,
        };
        let term = Arc::new(Term {
            fence,
            guard,
            registry,
            patches,
            engine,
            store,
            agents,
            cancel,
            tasks: Mutex::new(Vec::new()),
        });
        let resumed = match term.engine.resume().await {
            Ok(resumed) => resumed,
            Err(err) => {
                term.stop_now();
                return Err(err);
            }
        };
        // Only now: the reconciler leaves nodes of active rollouts alone, and
        // before `resume` it would take a resumed rollout's committed nodes
        // for drift and revert them.
        term.tasks.lock().unwrap_or_else(|e| e.into_inner()).extend([
            tokio::spawn(sweeper.run(term.cancel.child_token())),
            tokio::spawn(reconciler.run(term.cancel.child_token())),
        ]);
        tracing::info!(
            epoch = fence.epoch,
            nodes = term.registry.list().len(),
            resumed_rollouts = resumed,
            "leading: term started"
        );
        Ok(term)
    }

    /// An agent registers (persisted before it is acknowledged).
    pub async fn register(&self, status: NodeStatus) -> Result<LinkAnswer, RegistryError> {
        let node_id = status.node_id.clone();
        let heard = self.registry.register(status).await?;
        Ok(LinkAnswer { send_digests: heard.send_digests, ..self.link_answer(true, &node_id) })
    }

    /// An agent's heartbeat.
    pub async fn heartbeat(&self, status: NodeStatus) -> Result<LinkAnswer, RegistryError> {
        let node_id = status.node_id.clone();
        let heard = self.registry.hear(status).await?;
        Ok(LinkAnswer { send_digests: heard.send_digests, ..self.link_answer(heard.known, &node_id) })
    }

    fn link_answer(&self, known: bool, node_id: &str) -> LinkAnswer {
        LinkAnswer {
            known,
            epoch: self.registry.epoch(),
            heartbeat_interval_seconds: self.registry.heartbeat_interval_seconds(),
            live_rollouts: if known { self.engine.live_rollouts_of(node_id) } else { Vec::new() },
            send_digests: false,
        }
    }

    /// An operator removes a node: refused (and audited) while a live
    /// rollout holds it; otherwise its record goes, audited in the same
    /// batch. Returns the node as it was.
    /// Starts a rollout (or plans it: `dry_run`); `plan_canary` (dry runs
    /// only) also asks the first canary node for the runtime's plan.
    pub async fn start_rollout(
        &self,
        spec: impl ParseSpec,
        actor: &str,
        dry_run: bool,
        plan_canary: bool,
    ) -> Result<(RolloutState, Option<PatchPlan>), Error> {
        if plan_canary && !dry_run {
            return Err(Error::InvalidArgument(
                "--plan-canary goes with --dry-run (a real start prepares the canary anyway)".into(),
            ));
        }
        let state = self.engine.start(spec, actor, dry_run).await?;
        let canary = state.rollout.steps.first().and_then(|s| s.nodes.first()).cloned();
        let plan = match canary {
            Some(node) if plan_canary => {
                let ask = PlanRequest {
                    patch_id: &state.rollout.patch_id,
                    node_id: &node,
                    process_id: "",
                    rollout_kind: state.rollout.spec.kind,
                };
                Some(self.plan_patch(ask, actor).await?)
            }
            _ => None,
        };
        Ok((state, plan))
    }

    /// A plan from a live process of `req.node_id` ([`crate::patch_plan`]).
    pub async fn plan_patch(&self, req: PlanRequest<'_>, actor: &str) -> Result<PatchPlan, Error> {
        let engine = self.engine.clone();
        let busy = move |node: &str| engine.active_rollout_of(node);
        let ctx = PlanContext {
            store: self.store.as_ref(),
            fence: self.fence,
            registry: &self.registry,
            agents: self.agents.as_ref(),
            busy: &busy,
        };
        patch_plan::plan(&ctx, req, actor).await
    }

    pub async fn remove_node(&self, node_id: &str, actor: &str, reason: &str) -> Result<NodeView, Error> {
        let live = self.engine.live_rollouts_of(node_id);
        let note = if reason.is_empty() { String::new() } else { format!(" ({reason})") };
        if !live.is_empty() {
            let err = Error::NodeBusy { node: node_id.to_string(), rollouts: live.join(",") };
            let entry = audit(actor, "node.remove", node_id, format!("refused: {err}{note}"), false);
            if let Err(e) = self.registry.store().write(self.fence, Batch::new().with(Write::Audit(entry))).await {
                tracing::warn!(error = %e, "could not audit a refused node removal");
            }
            return Err(err);
        }
        let Some(node) = self.registry.get(node_id) else {
            return Err(Error::NotFound { what: "node", id: node_id.to_string() });
        };
        let detail = format!("removed ({}){note}", node.liveness.name());
        let entry = audit(actor, "node.remove", node_id, detail, true);
        self.registry
            .remove(node_id, entry)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::NotFound { what: "node", id: node_id.to_string() })
    }

    /// Cancelled when the term ends (lost or shut down).
    pub fn ended(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Leadership is gone: stop everything now, without waiting for anything
    /// in flight (it is all recorded; the next leader resumes it).
    pub fn stop_now(&self) {
        self.cancel.cancel();
        self.engine.abort_all();
        for task in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            task.abort();
        }
    }

    /// Shutdown: stop starting new work and wait (bounded) for what runs.
    pub async fn drain(&self, timeout: Duration) {
        self.cancel.cancel();
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let (engine, registry) = (self.engine.clone(), self.registry.clone());
        let all = async move {
            engine.join().await;
            for task in tasks {
                let _ = task.await;
            }
            registry.close_writes().await;
        };
        if tokio::time::timeout(timeout, all).await.is_err() {
            tracing::warn!(?timeout, "drain timed out; exiting with work in flight (it resumes on the next leader)");
            self.engine.abort_all();
        } else {
            tracing::info!("drained");
        }
    }
}

/// The coordinator as the gRPC adapters see it.
#[derive(Clone)]
pub struct Cluster {
    pub store: Arc<dyn Store>,
    /// Reads of patches (any role).
    pub patches: Patches,
    /// The address this coordinator advertises.
    pub self_addr: String,
    term: watch::Receiver<Option<Arc<Term>>>,
    view: watch::Receiver<LeaderView>,
    /// Cancelled when this process shuts down: open watches end, so the
    /// gRPC server can stop (their clients reconnect elsewhere or later).
    closing: CancellationToken,
}

impl Cluster {
    pub fn new(
        store: Arc<dyn Store>,
        patches: Patches,
        self_addr: String,
        term: watch::Receiver<Option<Arc<Term>>>,
        view: watch::Receiver<LeaderView>,
        closing: CancellationToken,
    ) -> Self {
        Self { store, patches, self_addr, term, view, closing }
    }

    /// Cancelled once this process shuts down.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// This coordinator's term, while it leads.
    pub fn term(&self) -> Option<Arc<Term>> {
        self.term.borrow().clone().filter(|t| !t.cancel.is_cancelled())
    }

    /// The term, or the refusal a follower answers writes with.
    pub fn leader_term(&self) -> Result<Arc<Term>, Error> {
        self.term().ok_or_else(|| Error::NotLeader { this: self.self_addr.clone(), leader: self.leader() })
    }

    /// Who leads, as far as this coordinator knows.
    pub fn leader(&self) -> Option<LeaderInfo> {
        self.leadership().1
    }

    /// This coordinator's term (while it leads) and who leads, from one read
    /// of the term (so the two never disagree).
    pub fn leadership(&self) -> (Option<Arc<Term>>, Option<LeaderInfo>) {
        let term = self.term();
        let leader = match &term {
            Some(term) => Some(LeaderInfo { addr: self.self_addr.clone(), epoch: term.fence.epoch }),
            None => self.view.borrow().leader.clone().filter(|l| l.addr != self.self_addr),
        };
        (term, leader)
    }

    pub fn backend(&self) -> &'static str {
        self.store.backend()
    }
}
