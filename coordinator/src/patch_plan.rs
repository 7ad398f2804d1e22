//! A plan from a live process (`hotfleet patch plan`): one node's process(es)
//! of the patch's build prepare it, answer the runtime's plan (functions
//! replaced, classes updated, data kept or conflicting, hooks, refusals with
//! line numbers), and the prepare is aborted at once. Nothing is committed;
//! the prepare carries a short TTL, so an abort that does not arrive is
//! presumed by the agent soon after.
//!
//! It runs beside rollouts, never inside one: a node an active rollout holds
//! is refused (its runtime holds that rollout's prepare).

use std::time::Duration;

use crate::{
    agents::{AgentClient, Command, CommandKind, ProcessReply, Target},
    clock::now_ms,
    error::{Error, Result},
    patches::audit,
    registry::{Liveness, Registry},
    rollout::RolloutKind,
    store::{Batch, Fence, Store, Write},
};

/// How long an agent keeps a plan's prepare if the abort never arrives.
pub const PLAN_TTL_SECONDS: u32 = 30;
/// Deadline of the prepare and of the abort.
pub const PLAN_DEADLINE: Duration = Duration::from_secs(30);

/// A plan the fleet cannot give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanRefusal {
    #[error("refused: node {node} has no process {which}of build {build} (patch {patch} targets it){runs}")]
    NoProcess { node: String, which: String, build: String, patch: String, runs: String },
    #[error("refused: node {node} is lost (no heartbeat); plan on a live node")]
    Lost { node: String },
    #[error("refused: node {node} is in active rollout {rollout}; plan on another node, or once it ends")]
    Busy { node: String, rollout: String },
    /// The agent could not be asked (unreachable, deadline, refusal).
    #[error("no plan: {0}")]
    Agent(String),
}

/// What one node answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchPlan {
    pub patch_id: String,
    pub node_id: String,
    /// Every asked process prepared the patch.
    pub ok: bool,
    pub reason: String,
    pub processes: Vec<ProcessReply>,
    /// The prepare was aborted again (false: the agent drops it at its TTL).
    pub aborted: bool,
}

/// What a plan is asked of.
#[derive(Debug, Clone, Copy)]
pub struct PlanRequest<'a> {
    pub patch_id: &'a str,
    pub node_id: &'a str,
    /// One process, or empty: the node's processes of the patch's build.
    pub process_id: &'a str,
    /// The plan of applying the patch, or of reverting it (a revert's dry run).
    pub rollout_kind: RolloutKind,
}

/// Where a plan runs: the leader's store, registry and (guarded) agents;
/// `busy` names the active rollout holding a node, if any.
pub struct PlanContext<'a> {
    pub store: &'a dyn Store,
    pub fence: Fence,
    pub registry: &'a Registry,
    pub agents: &'a dyn AgentClient,
    pub busy: &'a (dyn Fn(&str) -> Option<String> + Sync),
}

/// Asks for the plan (see the module docs) and audits it as `patch.plan`.
pub async fn plan(ctx: &PlanContext<'_>, req: PlanRequest<'_>, actor: &str) -> Result<PatchPlan> {
    if !hotfleet_patch::is_patch_id(req.patch_id) {
        return Err(Error::InvalidArgument(format!(
            "{} is not a patch id (64 lowercase hex digits)",
            crate::input::excerpt(req.patch_id)
        )));
    }
    let patch = ctx
        .store
        .patch(req.patch_id)
        .await?
        .ok_or_else(|| Error::NotFound { what: "patch", id: req.patch_id.to_string() })?;
    let node =
        ctx.registry.get(req.node_id).ok_or_else(|| Error::NotFound { what: "node", id: req.node_id.to_string() })?;
    let fits =
        |build: &str, id: &str| build == patch.target_build && (req.process_id.is_empty() || id == req.process_id);
    if !node.status.processes.iter().any(|p| fits(&p.build, &p.process_id)) {
        let runs: Vec<String> =
            node.status.processes.iter().map(|p| format!("{} on {}", p.process_id, p.build)).collect();
        return Err(PlanRefusal::NoProcess {
            node: req.node_id.to_string(),
            which: if req.process_id.is_empty() { String::new() } else { format!("{:?} ", req.process_id) },
            build: patch.target_build.clone(),
            patch: patch.patch_id.get(..12).unwrap_or(&patch.patch_id).to_string(),
            runs: if runs.is_empty() {
                "; it reports no process".into()
            } else {
                format!("; it runs {}", runs.join(", "))
            },
        }
        .into());
    }
    if node.liveness != Liveness::Alive {
        return Err(PlanRefusal::Lost { node: req.node_id.to_string() }.into());
    }
    if let Some(rollout) = (ctx.busy)(req.node_id) {
        return Err(PlanRefusal::Busy { node: req.node_id.to_string(), rollout }.into());
    }
    let target = Target { node_id: req.node_id.to_string(), addr: node.status.advertise_addr.clone() };
    let prepare = Command {
        kind: CommandKind::Prepare { ttl_seconds: PLAN_TTL_SECONDS },
        rollout_id: format!("plan-{}-{}", ctx.fence.epoch, now_ms()),
        patch_id: patch.patch_id.clone(),
        epoch: ctx.fence.epoch,
        process_id: req.process_id.to_string(),
        rollout_kind: req.rollout_kind,
    };
    let answer = ctx.agents.send(&target, &prepare, PLAN_DEADLINE).await;
    // Abort whatever the answer: a prepare that timed out may still have landed.
    let aborted = matches!(
        ctx.agents.send(&target, &prepare.with_kind(CommandKind::Abort), PLAN_DEADLINE).await,
        Ok(outcome) if outcome.ok
    );
    let outcome = answer.map_err(|e| PlanRefusal::Agent(e.to_string()))?;
    let plan = PatchPlan {
        patch_id: patch.patch_id.clone(),
        node_id: req.node_id.to_string(),
        ok: outcome.ok,
        reason: outcome.reason,
        processes: outcome.processes,
        aborted,
    };
    let detail = format!(
        "on node {} ({} process(es)): {}{}",
        plan.node_id,
        plan.processes.len(),
        if plan.ok { "prepared" } else { "refused" },
        if plan.aborted { ", aborted" } else { ", abort unanswered (dropped at its TTL)" }
    );
    let entry = audit(actor, "patch.plan", &plan.patch_id, detail, true);
    if let Err(e) = ctx.store.write(ctx.fence, Batch::new().with(Write::Audit(entry))).await {
        tracing::warn!(error = %e, "could not audit a patch plan");
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        sync::{Arc, Mutex},
    };

    use async_trait::async_trait;

    use super::*;
    use crate::{
        agents::{AgentError, HealthSample, Outcome},
        node::{NodeStatus, ProcessStatus},
        store::embedded::EmbeddedStore,
    };

    /// Answers every prepare with a plan per asked process; records what it was sent.
    #[derive(Default)]
    struct Agents {
        sent: Mutex<Vec<(&'static str, String, String)>>,
    }

    #[async_trait]
    impl AgentClient for Agents {
        async fn send(&self, _to: &Target, cmd: &Command, _d: Duration) -> Result<Outcome, AgentError> {
            self.sent.lock().expect("lock").push((cmd.kind.name(), cmd.rollout_id.clone(), cmd.process_id.clone()));
            let processes = vec![ProcessReply {
                process_id: cmd.process_id.clone(),
                ok: true,
                detail_json: r#"{"modules":[]}"#.into(),
                ..Default::default()
            }];
            Ok(Outcome { ok: true, reason: String::new(), processes })
        }

        async fn health(
            &self,
            _to: &Target,
            _since: &BTreeMap<String, u64>,
            _d: Duration,
        ) -> Result<Vec<HealthSample>, AgentError> {
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn a_plan_prepares_one_process_then_aborts_and_refuses_what_it_cannot_plan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).expect("store"));
        let fence = store.acquire_epoch().await.expect("epoch");
        let store: Arc<dyn Store> = store;
        let patch = "a".repeat(64);
        let record = crate::stack::tests::patch(&patch, "");
        store.write(fence, Batch::new().with(Write::PutPatch { record, bundle: vec![1] })).await.expect("patch");
        let registry = Registry::load(store.clone(), fence, Duration::from_secs(1), Duration::from_secs(60))
            .await
            .expect("registry");
        let process = |id: &str, build: &str| ProcessStatus {
            process_id: id.into(),
            pid: 7,
            build: build.into(),
            ..Default::default()
        };
        let node = NodeStatus {
            node_id: "n1".into(),
            advertise_addr: "n1:1".into(),
            processes: vec![process("p1", "b1"), process("p2", "b1"), process("q", "b2")],
            ..Default::default()
        };
        registry.register(node).await.expect("register");
        let agents = Agents::default();
        let free = |_: &str| None;
        let ctx = PlanContext { store: store.as_ref(), fence, registry: &registry, agents: &agents, busy: &free };
        let ask =
            |process_id| PlanRequest { patch_id: &patch, node_id: "n1", process_id, rollout_kind: RolloutKind::Apply };

        let got = plan(&ctx, ask("p2"), "sre").await.expect("plan");
        assert!(got.ok && got.aborted && got.processes.len() == 1, "{got:?}");
        let sent = agents.sent.lock().expect("lock").clone();
        assert_eq!(
            sent.iter().map(|(k, _, p)| (*k, p.as_str())).collect::<Vec<_>>(),
            [("prepare", "p2"), ("abort", "p2")]
        );
        assert!(sent[0].1.starts_with("plan-") && sent[0].1 == sent[1].1, "one plan id: {sent:?}");
        let audit = store.audit(10, None).await.expect("audit");
        assert!(audit.iter().any(|e| e.action == "patch.plan" && e.actor == "sre"), "{audit:?}");

        let refused = |err: Error| err.to_string();
        let err = refused(plan(&ctx, ask("q"), "sre").await.expect_err("q runs b2"));
        assert!(err.contains("no process \"q\" of build b1") && err.contains("q on b2"), "{err}");
        let err = refused(plan(&ctx, PlanRequest { node_id: "n9", ..ask("") }, "sre").await.expect_err("unknown node"));
        assert!(err.contains("node \"n9\" not found"), "{err}");
        let busy = |_: &str| Some("ro-1-1".to_string());
        let ctx = PlanContext { busy: &busy, ..ctx };
        let err = refused(plan(&ctx, ask(""), "sre").await.expect_err("busy"));
        assert!(err.contains("active rollout ro-1-1"), "{err}");
        assert_eq!(agents.sent.lock().expect("lock").len(), 2, "a refused plan sends nothing");
    }
}
