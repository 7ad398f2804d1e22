//! The agent's metrics, declared once (see `docs/metrics.md`): commands as
//! this node handled them, each runtime's prepare time and commit pause (as
//! the runtime measured them), and how long ago a coordinator last answered
//! a heartbeat. gRPC counts and latencies come from the tower layer
//! (`hotfleet_obs::grpc`).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hotfleet_obs::{
    metrics,
    metrics::{LATENCY, PAUSE},
    traces, Def, Kind,
};
use opentelemetry::KeyValue;

use crate::runtimes::StepReply;

pub static COMMANDS: Def = Def {
    name: "hotfleet_node_command_duration_seconds",
    help: "Time this node took to handle a coordinator command, by kind and answer (ok, refused, error).",
    kind: Kind::Histogram(LATENCY),
    labels: &["kind", "result"],
};
pub static RUNTIME_PREPARE: Def = Def {
    name: "hotfleet_runtime_prepare_seconds",
    help: "Time a game process's runtime took to prepare a patch, as it measured.",
    kind: Kind::Histogram(LATENCY),
    labels: &[],
};
pub static RUNTIME_PAUSE: Def = Def {
    name: "hotfleet_runtime_commit_pause_seconds",
    help: "How long a game process paused to apply a commit or rollback (its safe-point pause), by step.",
    kind: Kind::Histogram(PAUSE),
    labels: &["step"],
};
pub static HEARTBEAT_AGE: Def = Def {
    name: "hotfleet_node_heartbeat_age_seconds",
    help: "Seconds since a coordinator last answered this node's heartbeat (since start if none has).",
    kind: Kind::Gauge,
    labels: &[],
};

/// Milliseconds since the epoch of the last answered heartbeat (0: none yet).
static LAST_ANSWER_MS: AtomicU64 = AtomicU64::new(0);
static STARTED_MS: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// A coordinator answered a heartbeat or registration.
pub fn heartbeat_answered() {
    LAST_ANSWER_MS.store(now_ms(), Ordering::Relaxed);
}

/// Records one handled command.
pub fn command_took(kind: &str, result: &'static str, took: Duration) {
    metrics().observe_duration(&COMMANDS, &[kind, result], took);
}

/// Records what a runtime measured of one step, as metrics and (while
/// exporting) as a span under the current `runtime` span.
pub fn runtime_step(step: &str, reply: &StepReply) {
    let registry = metrics();
    let seconds = |ms: f64| Duration::from_secs_f64((ms / 1000.0).max(0.0));
    let attributes = vec![KeyValue::new("hotfleet.ok", reply.ok), KeyValue::new("hotfleet.step", step.to_string())];
    match step {
        "prepare" => {
            registry.observe(&RUNTIME_PREPARE, &[], reply.elapsed_ms / 1000.0);
            traces::emit_measured("runtime.prepare", seconds(reply.elapsed_ms), attributes);
        }
        "commit" | "rollback" => {
            registry.observe(&RUNTIME_PAUSE, &[step], reply.pause_ms / 1000.0);
            traces::emit_measured("runtime.pause", seconds(reply.pause_ms), attributes);
        }
        _ => {}
    }
}

/// Keeps the heartbeat age current at each scrape (the binary calls this once).
pub fn watch() {
    STARTED_MS.store(now_ms(), Ordering::Relaxed);
    metrics().on_scrape(|registry| {
        let last = LAST_ANSWER_MS.load(Ordering::Relaxed);
        let from = if last == 0 { STARTED_MS.load(Ordering::Relaxed) } else { last };
        registry.set(&HEARTBEAT_AGE, &[], now_ms().saturating_sub(from) as f64 / 1000.0);
    });
}
