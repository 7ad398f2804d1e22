//! What `-o json|yaml` prints: one stable, documented object per thing the
//! CLI shows (schemas in `docs/schemas/`), never the wire messages as they
//! are. The wire's proto3 JSON writes 64-bit numbers as strings and enums as
//! `ROLLOUT_PHASE_WATCHING`; here numbers are numbers, enums are the words
//! the text output shows, every field is always present, and every document
//! carries `apiVersion` and `kind` so a script can check what it reads.
//!
//! A field added later is added here and to its schema; a field is never
//! renamed or removed within `hotfleet/v1`.

use std::collections::BTreeMap;

use hotfleet_proto::v1 as pb;
use serde::Serialize;

use crate::output::API_VERSION;

/// A document: `apiVersion`, `kind`, then the object's own fields.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Doc<T: Serialize> {
    api_version: &'static str,
    kind: &'static str,
    #[serde(flatten)]
    body: T,
}

/// A list document: `items`, plus what a list says beyond its items.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Items<T: Serialize> {
    items: Vec<T>,
}

pub fn doc<T: Serialize>(kind: &'static str, body: T) -> Doc<T> {
    Doc { api_version: API_VERSION, kind, body }
}

pub fn list<T: Serialize>(kind: &'static str, items: Vec<T>) -> Doc<Items<T>> {
    doc(kind, Items { items })
}

// ---- nodes -------------------------------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    node_id: String,
    /// `alive` or `lost`, as `nodes list` prints it.
    liveness: String,
    address: String,
    labels: BTreeMap<String, String>,
    last_heartbeat_ms: u64,
    registered_at_ms: u64,
    /// The live rollout holding the node, or null.
    active_rollout_id: Option<String>,
    processes: Vec<Process>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    process_id: String,
    pid: u32,
    build: String,
    patch_stack: Vec<String>,
    runtime_version: String,
    python_version: String,
    health: Health,
    /// `in-sync`, `drift`, `in-rollout`, or `unknown` (no report yet).
    drift: Drift,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    alive: bool,
    ticks: u64,
    tick_p50_ms: f64,
    tick_p99_ms: f64,
    exceptions_since: u64,
    game_ok: bool,
    game_detail: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Drift {
    state: String,
    missing: Vec<String>,
    extra: Vec<String>,
}

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_string())
}

impl From<&pb::NodeInfo> for Node {
    fn from(n: &pb::NodeInfo) -> Self {
        let status = n.status.clone().unwrap_or_default();
        let processes = status
            .processes
            .iter()
            .map(|p| {
                let h = p.health.clone().unwrap_or_default();
                let drift = n.drift.iter().find(|d| d.process_id == p.process_id);
                Process {
                    process_id: p.process_id.clone(),
                    pid: p.pid,
                    build: p.build.clone(),
                    patch_stack: p.patch_stack.clone(),
                    runtime_version: p.runtime_version.clone(),
                    python_version: p.python_version.clone(),
                    health: Health {
                        alive: h.alive,
                        ticks: h.ticks,
                        tick_p50_ms: h.tick_p50_ms,
                        tick_p99_ms: h.tick_p99_ms,
                        exceptions_since: h.exceptions_since,
                        game_ok: h.game_ok,
                        game_detail: h.game_detail,
                    },
                    drift: Drift {
                        state: drift.map(|d| d.state.clone()).filter(|s| !s.is_empty()).unwrap_or("unknown".into()),
                        missing: drift.map(|d| d.missing.clone()).unwrap_or_default(),
                        extra: drift.map(|d| d.extra.clone()).unwrap_or_default(),
                    },
                }
            })
            .collect();
        Node {
            node_id: status.node_id,
            liveness: n.liveness.clone(),
            address: status.advertise_addr,
            labels: status.labels.into_iter().collect(),
            last_heartbeat_ms: n.last_heartbeat_ms,
            registered_at_ms: n.registered_at_ms,
            active_rollout_id: non_empty(&n.active_rollout_id),
            processes,
        }
    }
}

/// `nodes list --summary`: every matching node, counted.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    total: u32,
    by_liveness: BTreeMap<String, u32>,
    by_build: BTreeMap<String, u32>,
}

impl From<&pb::NodesSummary> for Summary {
    fn from(s: &pb::NodesSummary) -> Self {
        Summary {
            total: s.total,
            by_liveness: s.by_liveness.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            by_build: s.by_build.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRemoval {
    pub node_id: String,
    pub was_alive: bool,
}

// ---- rollouts ----------------------------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Null for a dry run's plan: it names no rollout.
    rollout_id: Option<String>,
    patch_id: String,
    /// `apply`, `revert` (`rollout revert`) or `rebase` (`rollout start --rebase`)
    /// (not `kind`: that names the document).
    rollout_kind: &'static str,
    target_build: String,
    /// The word the text shows: `staged`, `preparing`, `committing`,
    /// `watching`, `waiting`, `completed`, `rolling-back`, `rolled-back`, `scheduled`.
    phase: &'static str,
    terminal: bool,
    paused: bool,
    current_step: u32,
    waiting_reason: Option<String>,
    /// End of the running health window (Unix ms), or null.
    window_ends_at_ms: Option<u64>,
    reason: Option<String>,
    faulty_nodes: Vec<String>,
    spec: Spec,
    steps: Vec<Step>,
    nodes: Vec<NodeInRollout>,
    skipped: Vec<Skipped>,
    events: Vec<Event>,
    created_by: String,
    created_at_ms: u64,
    updated_at_ms: u64,
    epoch: u64,
    generation: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    selector: String,
    canary: String,
    waves: Vec<String>,
    health_window_ms: u64,
    step_deadline_ms: u64,
    max_unhealthy: u32,
    pause_before: Vec<String>,
    tick_p99_factor: f64,
    tick_p99_floor_ms: f64,
    prepare_ttl_seconds: u32,
    description: String,
    /// A scheduled rollout's start (`--at`), Unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    start_at_ms: Option<u64>,
    /// Allowed windows (`--window`) and their time zone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    windows: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_tz: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    name: String,
    node_ids: Vec<String>,
    state: String,
    pause_before: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInRollout {
    node_id: String,
    step: String,
    desired: String,
    observed: String,
    error: String,
    health: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Skipped {
    node_id: String,
    reason: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    at_ms: u64,
    message: String,
}

impl From<&pb::Rollout> for Rollout {
    fn from(r: &pb::Rollout) -> Self {
        let spec = r.spec.clone().unwrap_or_default();
        Rollout {
            rollout_id: non_empty(&r.rollout_id),
            patch_id: spec.patch_id.clone(),
            rollout_kind: crate::rollout_cmd::kind_name(spec.kind()),
            target_build: r.target_build.clone(),
            phase: crate::rollout_cmd::phase_name(r.phase),
            terminal: r.terminal,
            paused: r.paused,
            current_step: r.current_step,
            waiting_reason: non_empty(&r.waiting_reason),
            window_ends_at_ms: (r.window_ends_at_ms > 0).then_some(r.window_ends_at_ms),
            reason: non_empty(&r.reason),
            faulty_nodes: r.faulty_nodes.clone(),
            spec: Spec {
                selector: if spec.selector.is_empty() { "all".into() } else { spec.selector },
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
                start_at_ms: (spec.start_at_ms > 0).then_some(spec.start_at_ms),
                windows: spec.windows,
                window_tz: non_empty(&spec.window_tz),
            },
            steps: r
                .steps
                .iter()
                .map(|s| Step {
                    name: s.name.clone(),
                    node_ids: s.node_ids.clone(),
                    state: s.state.clone(),
                    pause_before: s.pause_before,
                })
                .collect(),
            nodes: r
                .nodes
                .iter()
                .map(|n| NodeInRollout {
                    node_id: n.node_id.clone(),
                    step: n.step.clone(),
                    desired: n.desired.clone(),
                    observed: n.observed.clone(),
                    error: n.error.clone(),
                    health: n.health.clone(),
                })
                .collect(),
            skipped: r
                .skipped
                .iter()
                .map(|s| Skipped { node_id: s.node_id.clone(), reason: s.reason.clone() })
                .collect(),
            events: r.events.iter().map(|e| Event { at_ms: e.at_ms, message: e.message.clone() }).collect(),
            created_by: r.created_by.clone(),
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            epoch: r.epoch,
            generation: r.generation,
        }
    }
}

pub fn rollout(r: &pb::Rollout) -> Doc<Rollout> {
    doc("Rollout", Rollout::from(r))
}

// ---- patches, audit, fleet ---------------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Patch {
    patch_id: String,
    target_build: String,
    parent_patch_id: Option<String>,
    description: String,
    author: String,
    created_at: String,
    modules: Vec<String>,
    size_bytes: u64,
    signer_key_id: String,
    pushed_by: String,
    pushed_at_ms: u64,
}

impl From<&pb::PatchInfo> for Patch {
    fn from(p: &pb::PatchInfo) -> Self {
        Patch {
            patch_id: p.patch_id.clone(),
            target_build: p.target_build.clone(),
            parent_patch_id: non_empty(&p.parent_patch_id),
            description: p.description.clone(),
            author: p.author.clone(),
            created_at: p.created_at.clone(),
            modules: p.modules.clone(),
            size_bytes: p.size_bytes,
            signer_key_id: p.signer_key_id.clone(),
            pushed_by: p.pushed_by.clone(),
            pushed_at_ms: p.pushed_at_ms,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PushResult {
    pub created: bool,
    pub patch: Option<Patch>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    seq: u64,
    at_ms: u64,
    actor: String,
    action: String,
    target: String,
    detail: String,
    ok: bool,
}

impl From<&pb::AuditRecord> for AuditRecord {
    fn from(r: &pb::AuditRecord) -> Self {
        AuditRecord {
            seq: r.seq,
            at_ms: r.at_ms,
            actor: r.actor.clone(),
            action: r.action.clone(),
            target: r.target.clone(),
            detail: r.detail.clone(),
            ok: r.ok,
        }
    }
}

/// An audit page: its records, and the `--before` of the next (older) page, or null.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    pub items: Vec<AuditRecord>,
    pub next_before: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Freeze {
    frozen: bool,
    reason: String,
    by: String,
    since_ms: Option<u64>,
}

impl From<&pb::FreezeStatus> for Freeze {
    fn from(f: &pb::FreezeStatus) -> Self {
        Freeze {
            frozen: f.frozen,
            reason: f.reason.clone(),
            by: f.by.clone(),
            since_ms: (f.since_ms > 0).then_some(f.since_ms),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Leader {
    /// Null while no coordinator leads.
    leader_addr: Option<String>,
    epoch: u64,
    store: String,
    asked_addr: String,
    asked_is_leader: bool,
}

impl From<&pb::LeaderStatus> for Leader {
    fn from(l: &pb::LeaderStatus) -> Self {
        Leader {
            leader_addr: non_empty(&l.leader_addr),
            epoch: l.epoch,
            store: l.store.clone(),
            asked_addr: l.self_addr.clone(),
            asked_is_leader: l.is_leader,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WhoAmI {
    identity: String,
    role: String,
    credential: String,
}

impl From<&pb::WhoAmIResponse> for WhoAmI {
    fn from(w: &pb::WhoAmIResponse) -> Self {
        WhoAmI { identity: w.identity.clone(), role: w.role.clone(), credential: w.credential.clone() }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyPair {
    pub secret_key: String,
    pub public_key: String,
    pub key_id: String,
}

// ---- bundles (offline) -------------------------------------------------------

/// A bundle file as `patch build|sign|verify|show` see it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    id: String,
    /// The signing key's id, or null for an unsigned bundle.
    signer: Option<String>,
    manifest: Manifest,
    /// Module name -> source, with `patch show --sources` only (else null).
    sources: Option<BTreeMap<String, String>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    format: String,
    target_build: String,
    parent: Option<String>,
    packages: Vec<String>,
    modules: Vec<Module>,
    author: String,
    created_at: String,
    description: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Module {
    name: String,
    sha256: String,
    size: u64,
}

pub fn bundle(b: &hotfleet_patch::Bundle, sources: bool) -> Doc<Bundle> {
    let m = &b.manifest;
    doc(
        "Bundle",
        Bundle {
            id: b.id(),
            signer: b.signer_id(),
            manifest: Manifest {
                format: m.format.clone(),
                target_build: m.target_build.clone(),
                parent: m.parent.clone(),
                packages: m.packages.clone(),
                modules: m
                    .modules
                    .iter()
                    .map(|e| Module { name: e.name.clone(), sha256: e.sha256.clone(), size: e.size })
                    .collect(),
                author: m.author.clone(),
                created_at: m.created_at.clone(),
                description: m.description.clone(),
            },
            sources: sources.then(|| b.modules.iter().cloned().collect()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_numbers_enums_are_words_and_every_document_says_its_version() {
        let wire = pb::Rollout {
            rollout_id: "ro-1-2".into(),
            phase: pb::RolloutPhase::Watching as i32,
            epoch: 7,
            generation: 61,
            window_ends_at_ms: 1_000,
            ..Default::default()
        };
        let json = serde_json::to_value(rollout(&wire)).expect("encode");
        assert_eq!(json["apiVersion"], "hotfleet/v1");
        assert_eq!(json["kind"], "Rollout");
        assert_eq!(json["rolloutKind"], "apply");
        assert_eq!(json["phase"], "watching");
        assert_eq!(json["generation"], 61);
        assert_eq!(json["windowEndsAtMs"], 1_000);
        assert_eq!(json["waitingReason"], serde_json::Value::Null);
        assert_eq!(json["spec"]["selector"], "all");
        let dry = serde_json::to_value(rollout(&pb::Rollout::default())).expect("encode");
        assert_eq!(dry["rolloutId"], serde_json::Value::Null, "a dry run's plan names no rollout");
    }
}
