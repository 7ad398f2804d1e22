//! The coordinator's metrics: what it measures, declared once (see
//! `docs/metrics.md`). Code that acts records here through the process's
//! registry; what is cheaper to read than to track (nodes by state, their
//! heartbeat age, leadership) is read from the [`Cluster`] at each scrape by
//! [`watch`]. gRPC request counts and latencies come from the tower layer
//! (`hotfleet_obs::grpc`), not from here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hotfleet_obs::{
    metrics,
    metrics::{LATENCY, STEP},
    Def, Kind,
};

use crate::{agent_links::AgentLinks, term::Cluster};

pub static ROLLOUTS: Def = Def {
    name: "hotfleet_rollouts_total",
    help: "Rollouts that reached a terminal state, by outcome (completed, rolled-back).",
    kind: Kind::Counter,
    labels: &["outcome"],
};
pub static STEP_DURATION: Def = Def {
    name: "hotfleet_rollout_step_duration_seconds",
    help: "Time one driver step took (prepare, baseline, commit, watch, hold, revert, record).",
    kind: Kind::Histogram(STEP),
    labels: &["step"],
};
pub static AGENT_COMMAND: Def = Def {
    name: "hotfleet_agent_command_duration_seconds",
    help: "Time from sending a command to a node until its answer (retries included), by kind and result.",
    kind: Kind::Histogram(LATENCY),
    labels: &["kind", "result"],
};
pub static NODES: Def = Def {
    name: "hotfleet_nodes",
    help: "Registered nodes by liveness (alive, lost; unknown on a follower).",
    kind: Kind::Gauge,
    labels: &["state"],
};
pub static HEARTBEAT_AGE_MAX: Def = Def {
    name: "hotfleet_node_heartbeat_age_max_seconds",
    help: "Seconds since the last heartbeat of the alive node heard from longest ago.",
    kind: Kind::Gauge,
    labels: &[],
};
pub static STORE_WRITE: Def = Def {
    name: "hotfleet_store_write_duration_seconds",
    help: "Time one fenced batch write to the state store took, by backend and result.",
    kind: Kind::Histogram(LATENCY),
    labels: &["backend", "result"],
};
pub static STORE_WRITE_BYTES: Def = Def {
    name: "hotfleet_store_written_bytes_total",
    help: "Bytes written to the state store (encoded records and patch bundles), by backend.",
    kind: Kind::Counter,
    labels: &["backend"],
};
pub static STORE_RECORDS: Def = Def {
    name: "hotfleet_store_records_written_total",
    help: "Records in the fenced batches the state store took, by backend and kind (node, node_state, rollout, patch, stack, audit, freeze, node_removal).",
    kind: Kind::Counter,
    labels: &["backend", "record"],
};
pub static ATTACHED: Def = Def {
    name: "hotfleet_attached_agents",
    help: "Agents attached to this coordinator for their commands, by stream (own: the agent's Attach; relay: a relay's shared AttachRelayed stream). The rest are dialled.",
    kind: Kind::Gauge,
    labels: &["via"],
};
pub static LEADER: Def =
    Def { name: "hotfleet_leader", help: "1 while this coordinator leads, else 0.", kind: Kind::Gauge, labels: &[] };
pub static LEADER_EPOCH: Def = Def {
    name: "hotfleet_leader_epoch",
    help: "The epoch (fencing token) of the leader this coordinator knows of; 0 if none.",
    kind: Kind::Gauge,
    labels: &[],
};

/// Records how long one driver step took.
pub fn step_took(step: &'static str, took: Duration) {
    metrics().observe_duration(&STEP_DURATION, &[step], took);
}

/// Counts bytes a store backend is about to write (called where records are
/// encoded, so nothing is encoded twice to be measured).
pub fn store_wrote(backend: &'static str, bytes: usize) {
    metrics().add(&STORE_WRITE_BYTES, &[backend], bytes as f64);
}

/// Counts the records of a batch the store took (`records` from [`crate::store::Batch::records`]).
pub fn store_took(backend: &'static str, records: &[(&'static str, usize)]) {
    for (record, count) in records {
        metrics().add(&STORE_RECORDS, &[backend, record], *count as f64);
    }
}

/// Reads nodes and leadership from `cluster`, and attached agents from
/// `links`, before each scrape (the binary calls this once; library users
/// and tests need not).
pub fn watch(cluster: Cluster, links: Option<AgentLinks>) {
    metrics().on_scrape(move |registry| {
        if let Some(links) = &links {
            let (own, relayed) = links.counts();
            registry.set(&ATTACHED, &["own"], own as f64);
            registry.set(&ATTACHED, &["relay"], relayed as f64);
        }
        let (term, leader) = cluster.leadership();
        registry.set(&LEADER, &[], if term.is_some() { 1.0 } else { 0.0 });
        registry.set(&LEADER_EPOCH, &[], leader.map_or(0.0, |l| l.epoch as f64));
        registry.clear(&NODES);
        for state in ["alive", "lost"] {
            registry.set(&NODES, &[state], 0.0);
        }
        let Some(term) = term else { return };
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let mut oldest = 0u64;
        for node in term.registry.list() {
            registry.add(&NODES, &[node.liveness.name()], 1.0);
            if node.liveness == crate::registry::Liveness::Alive {
                oldest = oldest.max(now_ms.saturating_sub(node.last_heartbeat_ms));
            }
        }
        registry.set(&HEARTBEAT_AGE_MAX, &[], oldest as f64 / 1000.0);
    });
}
