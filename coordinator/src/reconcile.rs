//! Drift repair: desired vs observed, outside rollouts.
//!
//! What counts as drift is judged in `drift.rs` (the same judgment `nodes
//! list` shows). Two repairs, once the node heartbeats and no rollout owns it,
//! each recorded in the audit log:
//!
//! - **Extra patches** (a revert never reached the process: its agent was
//!   killed or partitioned while a rollout rolled back) are rolled back,
//!   newest first. Rollback is idempotent on the agent (a patch not on top of
//!   a stack is left alone), so a repeated attempt changes nothing twice.
//! - **Missing patches** (the process missed a rollout: its agent was away,
//!   the node was skipped as lost) are prepared and committed, one after the
//!   other in stack order, through the same agent commands a rollout sends
//!   (fenced by this term's epoch). A process that starts syncs its stack by
//!   itself (the runtime fetches it at connect); this repairs the ones that
//!   were already running when the stack moved on. Prepare and commit are
//!   idempotent on the runtime (a patch already on its stack answers ok), so
//!   racing a process's own sync is harmless.
//!
//! Extras go first: a missing patch can only go on top of the right prefix.
//!
//! Heartbeats lag what the agents did: a node reverted a moment ago may still
//! report the patch. So drift counts only when two heartbeats received after
//! this coordinator started, one after the other, both show it, and no
//! rollout owns the node; a coordinator that just started (and is resuming
//! rollouts from the store) waits one interval before its first look.
//!
//! An idle fleet costs a pass nothing per node: a pass judges only the nodes
//! the registry reports changed ([`Registry::take_changed`]) plus the ones it
//! is still watching (suspected drift, owned by a rollout, not heard from
//! since this coordinator started). Every node is judged again only when a
//! build's stored stack moved (one store read per build per pass) or a pass
//! could not read the store.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::{
    agents::{AgentClient, Command, CommandKind, Target},
    drift::{BuildStacks, StackState},
    engine::Engine,
    patches::audit,
    registry::{Liveness, Registry},
    store::{Batch, Fence, Store, Write},
};

/// How long to wait before trying the same repair again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// One repair of one process's drift.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Repair {
    /// Roll back this patch (the newest extra one).
    RollBack(String),
    /// Prepare and commit these, in order (every missing one).
    Apply(Vec<String>),
}

impl Repair {
    /// What to do about a drifted stack: extras first, then what is missing.
    fn of(state: &StackState) -> Option<Repair> {
        match state {
            StackState::Drift { extra, .. } if !extra.is_empty() => Some(Repair::RollBack(extra[0].clone())),
            StackState::Drift { missing, .. } if !missing.is_empty() => Some(Repair::Apply(missing.clone())),
            _ => None,
        }
    }
}

/// What the reconciler remembers between passes.
#[derive(Default)]
struct Memory {
    started_ms: u64,
    /// (node, repair) -> heartbeat time the drift was first seen at.
    suspects: HashMap<(String, Repair), u64>,
    /// (node, repair) -> when it was last sent.
    attempts: HashMap<(String, Repair), Instant>,
    /// Every node was judged once against `stacks`; until then (and after a
    /// pass the store failed) the next pass judges them all.
    judged_all: bool,
    /// Each build's stack as the last pass read it.
    stacks: HashMap<String, Vec<String>>,
    /// Nodes to judge next pass even if their report does not change.
    watch: HashSet<String>,
}

pub struct Reconciler {
    pub store: Arc<dyn Store>,
    pub fence: Fence,
    pub registry: Registry,
    pub engine: Engine,
    pub agents: Arc<dyn AgentClient>,
    pub deadline: Duration,
}

impl Reconciler {
    /// Checks every alive node not owned by a rollout, every heartbeat interval.
    pub async fn run(self, cancel: CancellationToken) {
        let mut memory = Memory { started_ms: crate::clock::now_ms(), ..Memory::default() };
        let interval = self.registry.heartbeat_interval();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {
                    self.pass(&mut memory).await;
                }
            }
        }
    }

    /// One pass; returns how many nodes it judged.
    async fn pass(&self, memory: &mut Memory) -> usize {
        memory.attempts.retain(|_, at| at.elapsed() < RETRY_AFTER);
        let changed = self.registry.take_changed();
        let mut stacks = BuildStacks::new(self.store.as_ref());
        let mut judge_all = !memory.judged_all;
        for (build, seen) in &memory.stacks {
            match stacks.of(build).await {
                Ok(now) => judge_all |= now != *seen,
                Err(err) => {
                    tracing::warn!(%build, error = %err, "cannot read the build's patch stack");
                    memory.judged_all = false;
                    return 0;
                }
            }
        }
        let to_judge: Vec<String> = if judge_all {
            self.registry.ids()
        } else {
            changed.into_iter().chain(std::mem::take(&mut memory.watch)).collect::<HashSet<_>>().into_iter().collect()
        };
        let mut watch = HashSet::new();
        let mut seen_now = HashMap::new();
        for node_id in &to_judge {
            // A lost node is judged again once it is back (that is a change).
            let Some(node) = self.registry.get(node_id).filter(|n| n.liveness == Liveness::Alive) else { continue };
            if node.last_heartbeat_ms < memory.started_ms || self.engine.active_rollout_of(node_id).is_some() {
                watch.insert(node_id.clone());
                continue;
            }
            for process in stacks.judge(&node.status, false).await {
                if process.state == StackState::Unknown {
                    // The store is unreachable: judge nothing until it answers, then everything.
                    memory.judged_all = false;
                    return 0;
                }
                let Some(repair) = Repair::of(&process.state) else { continue };
                watch.insert(node_id.clone());
                let key = (node_id.clone(), repair.clone());
                seen_now.insert(key.clone(), node.last_heartbeat_ms);
                let confirmed = memory.suspects.get(&key).is_some_and(|first| *first < node.last_heartbeat_ms);
                if !confirmed || memory.attempts.contains_key(&key) {
                    continue;
                }
                memory.attempts.insert(key, Instant::now());
                let target = Target { node_id: node_id.clone(), addr: node.status.advertise_addr.clone() };
                match repair {
                    Repair::RollBack(patch) => self.revert(&target, process.pid, &patch).await,
                    Repair::Apply(patches) => self.apply(&target, process.pid, &process.build, &patches).await,
                }
            }
        }
        // Keep the first sighting of drift that persists; forget drift that
        // went away (every suspect is watched, so each was judged again).
        memory.suspects =
            seen_now.into_iter().map(|(k, ts)| (k.clone(), memory.suspects.get(&k).copied().unwrap_or(ts))).collect();
        memory.watch = watch;
        memory.stacks = stacks.into_read();
        memory.judged_all = true;
        to_judge.len()
    }

    /// A command of this term: its own rollout id per repair, this term's epoch.
    fn command(&self, kind: CommandKind, rollout_id: &str, patch: &str) -> Command {
        Command {
            kind,
            rollout_id: rollout_id.to_string(),
            patch_id: patch.to_string(),
            epoch: self.fence.epoch,
            process_id: String::new(),
            // Missing patches go on in stack order; a rebased one's parent is
            // below the top, which the rebase rule allows (and an ordinary one passes).
            rollout_kind: crate::rollout::RolloutKind::Rebase,
        }
    }

    fn repair_id(&self) -> String {
        format!("reconcile-{}-{}", self.fence.epoch, crate::clock::now_ms())
    }

    /// Sends `cmd`; `Err` says why it did not succeed.
    async fn send(&self, target: &Target, cmd: &Command) -> Result<(), String> {
        match self.agents.send(target, cmd, self.deadline).await {
            Ok(outcome) if outcome.ok => Ok(()),
            Ok(outcome) => Err(outcome.reason),
            Err(err) => Err(err.to_string()),
        }
    }

    async fn revert(&self, target: &Target, pid: u32, patch: &str) {
        tracing::warn!(node = %target.node_id, pid, patch = %patch, "process runs a patch the store does not record; rolling it back");
        let cmd = self.command(CommandKind::Rollback, &self.repair_id(), patch);
        let (ok, detail) = match self.send(target, &cmd).await {
            Ok(()) => (true, format!("rolled back on pid {pid}: not on the store's patch stack")),
            Err(reason) => (false, format!("rollback on pid {pid} failed: {reason}")),
        };
        self.record(target, "reconcile.rollback", patch, detail, ok).await;
    }

    /// Prepares and commits each missing patch in stack order; stops at the
    /// first that fails (the next ones need it) or once a rollout owns the node.
    async fn apply(&self, target: &Target, pid: u32, build: &str, patches: &[String]) {
        let rollout_id = self.repair_id();
        for patch in patches {
            if let Some(owner) = self.engine.active_rollout_of(&target.node_id) {
                tracing::info!(node = %target.node_id, rollout = %owner, "drift repair left to the rollout that now owns the node");
                return;
            }
            tracing::warn!(node = %target.node_id, pid, patch = %patch, %build, "process lacks a patch of its build's stack; committing it");
            let prepare = self.command(CommandKind::Prepare { ttl_seconds: 0 }, &rollout_id, patch);
            let result = match self.send(target, &prepare).await {
                Err(reason) => Err(format!("prepare failed: {reason}")),
                Ok(()) => match self.send(target, &prepare.with_kind(CommandKind::Commit)).await {
                    Ok(()) => Ok(()),
                    Err(reason) => {
                        // Drop the prepared copies; a later pass starts afresh.
                        let _ = self.send(target, &prepare.with_kind(CommandKind::Abort)).await;
                        Err(format!("commit failed: {reason}"))
                    }
                },
            };
            let ok = result.is_ok();
            let detail = match result {
                Ok(()) => format!("committed on pid {pid}: on build {build}'s patch stack, missing on the process"),
                Err(reason) => format!("pid {pid}: {reason}"),
            };
            self.record(target, "reconcile.commit", patch, detail, ok).await;
            if !ok {
                return;
            }
        }
    }

    async fn record(&self, target: &Target, action: &str, patch: &str, detail: String, ok: bool) {
        if ok {
            tracing::info!(node = %target.node_id, patch = %patch, %detail, "drift repaired");
        } else {
            tracing::warn!(node = %target.node_id, patch = %patch, %detail, "drift repair failed; will retry");
        }
        let entry = audit("coordinator", action, patch, format!("{}: {detail}", target.node_id), ok);
        if let Err(err) = self.store.write(self.fence, Batch::new().with(Write::Audit(entry))).await {
            tracing::warn!(error = %err, "reconcile: audit write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Mutex};

    use async_trait::async_trait;

    use super::*;
    use crate::{
        agents::{AgentError, HealthSample, Outcome},
        engine::EngineConfig,
        node::{NodeStatus, ProcessStatus},
        store::{embedded::EmbeddedStore, StackEntry},
    };

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Records every command; fails the commit of `fail_commit`.
    #[derive(Default)]
    struct Recorder {
        sent: Mutex<Vec<Command>>,
        fail_commit: Option<String>,
    }

    impl Recorder {
        fn sent(&self) -> Vec<(String, String)> {
            let sent = self.sent.lock().expect("lock");
            sent.iter().map(|c| (c.kind.name().to_string(), c.patch_id.clone())).collect()
        }
    }

    #[async_trait]
    impl AgentClient for Recorder {
        async fn send(&self, _to: &Target, cmd: &Command, _d: Duration) -> Result<Outcome, AgentError> {
            self.sent.lock().expect("lock").push(cmd.clone());
            let failed = cmd.kind == CommandKind::Commit && self.fail_commit.as_deref() == Some(cmd.patch_id.as_str());
            Ok(Outcome {
                ok: !failed,
                reason: if failed { "hook raised".into() } else { String::new() },
                ..Outcome::default()
            })
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

    fn status(running: &[&str]) -> NodeStatus {
        NodeStatus {
            node_id: "n1".into(),
            advertise_addr: "n1:1".into(),
            processes: vec![ProcessStatus {
                process_id: "n1-p".into(),
                pid: 100,
                build: "b1".into(),
                patch_stack: ids(running).into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A reconciler over a fresh store whose build b1 has `stack`, node n1 running `running`.
    async fn reconciler(agents: Arc<Recorder>, stack: &[&str], running: &[&str]) -> (tempfile::TempDir, Reconciler) {
        let dir = tempfile::tempdir().expect("tempdir");
        let embedded = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let fence = embedded.acquire_epoch().await.expect("epoch");
        let store: Arc<dyn Store> = embedded;
        let mut batch = Batch::new();
        for id in stack {
            batch.push(Write::PushStack(StackEntry {
                patch_id: id.to_string(),
                target_build: "b1".into(),
                parent_patch_id: String::new(),
                description: String::new(),
                rollout_id: "r".into(),
                committed_at_ms: 1,
            }));
        }
        store.write(fence, batch).await.expect("stack");
        let registry = Registry::load(store.clone(), fence, Duration::from_millis(50), Duration::from_secs(60))
            .await
            .expect("registry");
        registry.register(status(running)).await.expect("register");
        let engine = Engine::new(
            store.clone(),
            fence,
            registry.clone(),
            agents.clone(),
            EngineConfig::default(),
            CancellationToken::new(),
        );
        let reconciler = Reconciler { store, fence, registry, engine, agents, deadline: Duration::from_secs(1) };
        (dir, reconciler)
    }

    /// A later heartbeat with the same report (heartbeat times are in ms).
    async fn heartbeat(r: &Reconciler, running: &[&str]) {
        tokio::time::sleep(Duration::from_millis(3)).await;
        r.registry.heartbeat(status(running)).await.expect("heartbeat");
    }

    async fn audited(r: &Reconciler, action: &str) -> Vec<bool> {
        let entries = r.store.audit(100, None).await.expect("audit");
        entries.iter().filter(|e| e.action == action).map(|e| e.ok).collect()
    }

    #[tokio::test]
    async fn missing_patches_are_committed_in_stack_order_once_two_heartbeats_show_them() {
        let agents = Arc::new(Recorder::default());
        let (_dir, r) = reconciler(agents.clone(), &["p1", "p2", "p3"], &["p1"]).await;
        let mut memory = Memory::default();
        r.pass(&mut memory).await;
        assert!(agents.sent().is_empty(), "one heartbeat is not enough: it may predate a sync");
        heartbeat(&r, &["p1"]).await;
        r.pass(&mut memory).await;
        let kinds = [("prepare", "p2"), ("commit", "p2"), ("prepare", "p3"), ("commit", "p3")];
        let expected: Vec<(String, String)> = kinds.iter().map(|(k, p)| (k.to_string(), p.to_string())).collect();
        assert_eq!(agents.sent(), expected);
        let sent = agents.sent.lock().expect("lock").clone();
        assert!(sent.iter().all(|c| c.epoch == r.fence.epoch && c.rollout_id == sent[0].rollout_id));
        assert!(sent[0].rollout_id.starts_with("reconcile-"), "{}", sent[0].rollout_id);
        assert_eq!(audited(&r, "reconcile.commit").await, [true, true]);
        r.pass(&mut memory).await;
        assert_eq!(agents.sent().len(), 4, "not repeated while the retry pause runs");
    }

    #[tokio::test]
    async fn a_failed_commit_is_aborted_audited_and_stops_the_repair() {
        let agents = Arc::new(Recorder { fail_commit: Some("p1".into()), ..Recorder::default() });
        let (_dir, r) = reconciler(agents.clone(), &["p1", "p2"], &[]).await;
        let mut memory = Memory::default();
        r.pass(&mut memory).await;
        heartbeat(&r, &[]).await;
        r.pass(&mut memory).await;
        let expected: Vec<(String, String)> = [("prepare", "p1"), ("commit", "p1"), ("abort", "p1")]
            .iter()
            .map(|(k, p)| (k.to_string(), p.to_string()))
            .collect();
        assert_eq!(agents.sent(), expected, "p2 needs p1 under it");
        assert_eq!(audited(&r, "reconcile.commit").await, [false]);
    }

    #[tokio::test]
    async fn extras_are_rolled_back_before_missing_patches_are_applied() {
        let agents = Arc::new(Recorder::default());
        let (_dir, r) = reconciler(agents.clone(), &["p1", "p2"], &["p1", "x"]).await;
        let mut memory = Memory::default();
        r.pass(&mut memory).await;
        heartbeat(&r, &["p1", "x"]).await;
        r.pass(&mut memory).await;
        assert_eq!(agents.sent(), vec![("rollback".to_string(), "x".to_string())]);
        assert_eq!(audited(&r, "reconcile.rollback").await, [true]);
    }

    #[tokio::test]
    async fn an_idle_pass_judges_only_nodes_that_changed_unless_a_stack_moved() {
        let agents = Arc::new(Recorder::default());
        let (_dir, r) = reconciler(agents.clone(), &["p1"], &["p1"]).await;
        let other = |id: &str| NodeStatus { node_id: id.into(), advertise_addr: format!("{id}:1"), ..status(&["p1"]) };
        for id in ["n2", "n3"] {
            r.registry.register(other(id)).await.expect("register");
        }
        let mut memory = Memory::default();
        assert_eq!(r.pass(&mut memory).await, 3, "the first pass judges every node");
        assert_eq!(r.pass(&mut memory).await, 0, "nothing changed: nothing judged");
        heartbeat(&r, &["p1"]).await;
        assert_eq!(r.pass(&mut memory).await, 0, "a heartbeat with the same stack is no change");
        heartbeat(&r, &["p1", "x"]).await;
        assert_eq!(r.pass(&mut memory).await, 1, "n1's stack changed");
        assert!(agents.sent().is_empty(), "one sighting is not enough");
        heartbeat(&r, &["p1", "x"]).await;
        assert_eq!(r.pass(&mut memory).await, 1, "a suspect is watched without a change");
        assert_eq!(agents.sent(), vec![("rollback".to_string(), "x".to_string())]);
        heartbeat(&r, &["p1"]).await;
        assert_eq!(r.pass(&mut memory).await, 1, "repaired: judged once more");
        assert_eq!(r.pass(&mut memory).await, 0, "in sync: no longer watched");
        let entry = StackEntry {
            patch_id: "p2".into(),
            target_build: "b1".into(),
            parent_patch_id: "p1".into(),
            description: String::new(),
            rollout_id: "r2".into(),
            committed_at_ms: 2,
        };
        r.store.write(r.fence, Batch::new().with(Write::PushStack(entry))).await.expect("push");
        assert_eq!(r.pass(&mut memory).await, 3, "the build's stack moved: every node is judged");
    }

    #[test]
    fn extras_are_rolled_back_newest_first_before_anything_is_applied() {
        let state = StackState::Drift { missing: ids(&["b"]), extra: ids(&["d", "c"]) };
        assert_eq!(Repair::of(&state), Some(Repair::RollBack("d".into())));
    }

    #[test]
    fn missing_patches_are_applied_in_stack_order() {
        let state = StackState::Drift { missing: ids(&["b", "c"]), extra: Vec::new() };
        assert_eq!(Repair::of(&state), Some(Repair::Apply(ids(&["b", "c"]))));
    }

    #[test]
    fn nothing_to_repair_unless_drifted() {
        for state in [StackState::InSync, StackState::InRollout, StackState::Unknown] {
            assert_eq!(Repair::of(&state), None, "{state:?}");
        }
    }
}
