//! Domain records → protobuf messages (the operator API's view of them), and
//! the node status both ways (agents report it, operators list it).

use hotfleet_proto::v1 as pb;

use crate::{
    drift::{ProcessDrift, StackState},
    node::{NodeStatus, PreparedPatch, ProcessHealth, ProcessStatus},
    patch_plan::PatchPlan,
    reads::{NodeListing, NodesSummary},
    rollout::{Phase, RolloutKind, RolloutState},
    stack::StackLine,
    store::{AuditEntry, FreezeRecord, PatchRecord},
};

pub fn patch_info(p: PatchRecord) -> pb::PatchInfo {
    pb::PatchInfo {
        patch_id: p.patch_id,
        target_build: p.target_build,
        parent_patch_id: p.parent_patch_id,
        description: p.description,
        author: p.author,
        created_at: p.created_at,
        modules: p.modules,
        size_bytes: p.size_bytes,
        signer_key_id: p.signer_key_id,
        pushed_by: p.pushed_by,
        pushed_at_ms: p.pushed_at_ms,
    }
}

pub fn stack_item(line: StackLine) -> pb::StackItem {
    let StackLine { entry, rolled_out_by, started_at_ms, modules } = line;
    pb::StackItem {
        patch_id: entry.patch_id,
        parent_patch_id: entry.parent_patch_id,
        description: entry.description,
        modules,
        rollout_id: entry.rollout_id,
        rolled_out_by,
        started_at_ms,
        committed_at_ms: entry.committed_at_ms,
    }
}

pub fn patch_plan(plan: PatchPlan) -> pb::PlanPatchResponse {
    let processes = plan
        .processes
        .into_iter()
        .map(|p| pb::ProcessPlan {
            process_id: p.process_id,
            pid: p.pid,
            ok: p.ok,
            error: p.error,
            plan_json: p.detail_json,
        })
        .collect();
    pb::PlanPatchResponse {
        patch_id: plan.patch_id,
        node_id: plan.node_id,
        ok: plan.ok,
        reason: plan.reason,
        processes,
        aborted: plan.aborted,
    }
}

pub fn audit_record(a: AuditEntry) -> pb::AuditRecord {
    pb::AuditRecord {
        seq: a.seq,
        at_ms: a.at_ms,
        actor: a.actor,
        action: a.action,
        target: a.target,
        detail: a.detail,
        ok: a.ok,
    }
}

pub fn freeze_status(f: Option<FreezeRecord>) -> pb::FreezeStatus {
    match f {
        Some(f) => pb::FreezeStatus { frozen: true, reason: f.reason, by: f.by, since_ms: f.since_ms },
        None => pb::FreezeStatus::default(),
    }
}

pub fn node_info(listing: NodeListing) -> pb::NodeInfo {
    let NodeListing { node: n, owner, drift } = listing;
    pb::NodeInfo {
        liveness: n.liveness.name().to_string(),
        last_heartbeat_ms: n.last_heartbeat_ms,
        registered_at_ms: n.registered_at_ms,
        active_rollout_id: owner.unwrap_or_default(),
        status: Some(n.status.into()),
        drift: drift.into_iter().map(stack_drift).collect(),
    }
}

pub fn nodes_summary(s: NodesSummary) -> pb::NodesSummary {
    let count = |m: std::collections::BTreeMap<String, usize>| m.into_iter().map(|(k, v)| (k, v as u32)).collect();
    pb::NodesSummary { total: s.total as u32, by_liveness: count(s.by_liveness), by_build: count(s.by_build) }
}

fn stack_drift(d: ProcessDrift) -> pb::StackDrift {
    let state = d.state.name().to_string();
    let (missing, extra) = match d.state {
        StackState::Drift { missing, extra } => (missing, extra),
        _ => (Vec::new(), Vec::new()),
    };
    pb::StackDrift { process_id: d.process_id, pid: d.pid, build: d.build, state, missing, extra }
}

/// `From` both ways between a domain type and its proto message: the plain
/// fields move as they are, each mapped field through the same conversion in
/// either direction. Struct literals, so a field added on one side only does
/// not compile.
macro_rules! both_ways {
    ($domain:ty, $proto:ty { $($field:ident),* ; $($mapped:ident: |$v:ident| $conv:expr),* $(,)? }) => {
        impl From<$proto> for $domain {
            fn from(m: $proto) -> Self {
                Self { $($field: m.$field,)* $($mapped: { let $v = m.$mapped; $conv },)* }
            }
        }

        impl From<$domain> for $proto {
            fn from(m: $domain) -> Self {
                Self { $($field: m.$field,)* $($mapped: { let $v = m.$mapped; $conv },)* }
            }
        }
    };
}

both_ways!(NodeStatus, pb::NodeStatus {
    node_id, advertise_addr, highest_epoch, commands_admitted, commands_refused_stale;
    labels: |v| v.into_iter().collect(),
    processes: |v| v.into_iter().map(Into::into).collect(),
    prepared: |v| v.into_iter().map(Into::into).collect(),
    expired: |v| v.into_iter().map(Into::into).collect(),
});

both_ways!(ProcessStatus, pb::ProcessStatus {
    process_id, pid, build, runtime_version, python_version, live_digests_unchanged,
    live_digests_fingerprint;
    patch_stack: |v| v.into_iter().collect(),
    live_digests: |v| v.into_iter().collect(),
    health: |v| v.map(Into::into),
});

both_ways!(ProcessHealth, pb::ProcessHealth {
    alive, ticks, tick_p50_ms, tick_p99_ms, exceptions_since, mark, game_ok, game_detail, ticks_since;
});

both_ways!(PreparedPatch, pb::PreparedPatch { rollout_id, patch_id, expires_at_ms; });

fn phase(p: &Phase) -> pb::RolloutPhase {
    match p {
        Phase::Scheduled { .. } => pb::RolloutPhase::Scheduled,
        Phase::Staged => pb::RolloutPhase::Staged,
        Phase::Preparing => pb::RolloutPhase::Preparing,
        Phase::Waiting { .. } => pb::RolloutPhase::Waiting,
        Phase::Committing { .. } => pb::RolloutPhase::Committing,
        Phase::Watching { .. } => pb::RolloutPhase::Watching,
        Phase::Completed => pb::RolloutPhase::Completed,
        Phase::RollingBack { .. } => pb::RolloutPhase::RollingBack,
        Phase::RolledBack { .. } => pb::RolloutPhase::RolledBack,
    }
}

/// State of step `i` for display.
fn step_state(s: &RolloutState, i: usize) -> &'static str {
    match &s.rollout.phase {
        Phase::Scheduled { .. } | Phase::Staged | Phase::Preparing => "pending",
        Phase::Waiting { next_step } => {
            if i < *next_step {
                "done"
            } else {
                "pending"
            }
        }
        Phase::Committing { step } | Phase::Watching { step, .. } => {
            if i < *step {
                "done"
            } else if i == *step {
                if matches!(s.rollout.phase, Phase::Committing { .. }) {
                    "committing"
                } else {
                    "watching"
                }
            } else {
                "pending"
            }
        }
        Phase::Completed => "done",
        Phase::RollingBack { .. } | Phase::RolledBack { .. } => {
            let touched = s
                .rollout
                .steps
                .get(i)
                .is_some_and(|st| st.nodes.iter().any(|n| s.nodes.get(n).is_some_and(|ns| ns.commit_sent)));
            if touched {
                "rolled-back"
            } else {
                "skipped"
            }
        }
    }
}

pub fn rollout(s: &RolloutState, frozen: bool) -> pb::Rollout {
    let r = &s.rollout;
    let spec = &r.spec;
    let (reason, faulty) = match &r.phase {
        Phase::RollingBack { reason, faulty } | Phase::RolledBack { reason, faulty } => {
            (reason.clone(), faulty.clone())
        }
        _ => (String::new(), Vec::new()),
    };
    let window_ends_at_ms = match &r.phase {
        Phase::Watching { ends_at_ms, .. } => *ends_at_ms,
        _ => 0,
    };
    pb::Rollout {
        rollout_id: r.id.clone(),
        spec: Some(pb::RolloutSpec {
            patch_id: spec.patch_id.clone(),
            selector: spec.selector.to_string(),
            canary: spec.canary.to_string(),
            waves: spec.waves.iter().map(|w| w.to_string()).collect(),
            health_window_ms: spec.health_window_ms,
            step_deadline_ms: spec.step_deadline_ms,
            max_unhealthy: spec.max_unhealthy,
            pause_before: spec.pause_before.clone(),
            tick_p99_factor: spec.gate.p99_factor,
            tick_p99_floor_ms: spec.gate.p99_floor_ms,
            prepare_ttl_seconds: spec.prepare_ttl_seconds,
            description: spec.description.clone(),
            start_at_ms: spec.start_at_ms,
            windows: spec.windows.windows.iter().map(|w| w.to_string()).collect(),
            window_tz: if spec.windows.is_empty() { String::new() } else { spec.windows.tz.clone() },
            kind: match spec.kind {
                RolloutKind::Apply => pb::RolloutKind::Apply,
                RolloutKind::Revert => pb::RolloutKind::Revert,
                RolloutKind::Rebase => pb::RolloutKind::Rebase,
            }
            .into(),
        }),
        target_build: r.target_build.clone(),
        phase: phase(&r.phase) as i32,
        terminal: r.phase.is_terminal(),
        current_step: r.current_step() as u32,
        steps: r
            .steps
            .iter()
            .enumerate()
            .map(|(i, st)| pb::RolloutStep {
                name: st.name.clone(),
                node_ids: st.nodes.clone(),
                state: step_state(s, i).to_string(),
                pause_before: st.pause_before,
            })
            .collect(),
        waiting_reason: s.waiting_reason(frozen).unwrap_or_default(),
        paused: r.paused,
        reason,
        faulty_nodes: faulty,
        nodes: s
            .nodes
            .values()
            .map(|n| pb::NodeRolloutStatus {
                node_id: n.node_id.clone(),
                step: r.steps.get(n.step).map(|st| st.name.clone()).unwrap_or_default(),
                desired: n.desired.name().to_string(),
                observed: n.observed.name().to_string(),
                error: n.error.clone(),
                health: n.health.clone(),
            })
            .collect(),
        skipped: r
            .skipped
            .iter()
            .map(|k| pb::SkippedNode { node_id: k.node_id.clone(), reason: k.reason.clone() })
            .collect(),
        events: r.events.iter().map(|e| pb::RolloutEvent { at_ms: e.at_ms, message: e.message.clone() }).collect(),
        created_by: r.created_by.clone(),
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
        window_ends_at_ms,
        epoch: r.epoch,
        generation: r.generation,
    }
}
