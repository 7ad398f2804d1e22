//! What this node reports: its status (sent with every heartbeat and by the
//! `Status` call) and per-process health with one verdict for the node (the
//! `Health` call). Read-only: nothing here changes what a process runs.
//! Process statuses come from [`ProcessStatusCache`], so a report waits for
//! its processes only up to a budget.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::future::join_all;
use hotfleet_proto::v1::{NodeStatus, PreparedPatch, ProcessHealthReport};

use crate::{
    participant::SharedParticipant,
    process_status::{ProcessStatusCache, QUERY_TIMEOUT},
    runtimes::Runtimes,
};

/// Node identity reported in statuses.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node_id: String,
    pub labels: BTreeMap<String, String>,
    pub advertise_addr: String,
}

/// How long the `Status` call waits for processes to answer before it
/// reports the rest from the cache.
pub const STATUS_BUDGET: Duration = Duration::from_secs(1);

/// How many of the latest expired prepares each status reports.
const REPORTED_EXPIRED: usize = 16;

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Builds this node's reports; shared by the gRPC service and the heartbeats.
pub struct NodeReporter {
    participant: SharedParticipant,
    identity: NodeIdentity,
    processes: ProcessStatusCache,
}

impl NodeReporter {
    pub fn new(participant: SharedParticipant, identity: NodeIdentity) -> Self {
        let processes = ProcessStatusCache::new(participant.runtimes().clone(), QUERY_TIMEOUT);
        Self { participant, identity, processes }
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    pub fn participant(&self) -> &SharedParticipant {
        &self.participant
    }

    /// This node's full status, waiting at most `budget` for its processes.
    pub async fn node_status(&self, budget: Duration) -> NodeStatus {
        let processes = self.processes.statuses(budget).await;
        let (commands_admitted, commands_refused_stale) = self.participant.command_counts();
        let prepared = self
            .participant
            .prepared()
            .into_iter()
            .map(|p| PreparedPatch {
                rollout_id: p.rollout_id,
                patch_id: p.patch_id,
                expires_at_ms: unix_ms(p.expires_at),
            })
            .collect();
        // The newest expiries only: one rollout holds a node at a time, so
        // the coordinator needs the latest few, not the agent's whole memory.
        let expired = self.participant.recently_expired();
        let expired = expired[expired.len().saturating_sub(REPORTED_EXPIRED)..]
            .iter()
            .map(|e| PreparedPatch {
                rollout_id: e.rollout_id.clone(),
                patch_id: e.patch_id.clone(),
                expires_at_ms: unix_ms(e.expired_at),
            })
            .collect();
        NodeStatus {
            node_id: self.identity.node_id.clone(),
            labels: self.identity.labels.clone().into_iter().collect(),
            advertise_addr: self.identity.advertise_addr.clone(),
            processes,
            highest_epoch: self.participant.highest_epoch(),
            prepared,
            expired,
            commands_admitted,
            commands_refused_stale,
        }
    }

    /// Per-process health since the given marks.
    pub async fn health(&self, since: &HashMap<String, u64>) -> Vec<ProcessHealthReport> {
        health(self.participant.runtimes().as_ref(), since).await
    }
}

/// Per-process health since the given marks, asked live.
async fn health(runtimes: &dyn Runtimes, since: &HashMap<String, u64>) -> Vec<ProcessHealthReport> {
    join_all(runtimes.processes().into_iter().map(|process| async move {
        let mark = since.get(&process.process_id).copied().unwrap_or(0);
        let mut report = ProcessHealthReport { pid: process.pid, ..Default::default() };
        match runtimes.health(&process.process_id, mark, QUERY_TIMEOUT).await {
            Ok(health) => {
                report.reachable = true;
                report.health = Some(health);
            }
            Err(err) => report.error = err.to_string(),
        }
        report.process_id = process.process_id;
        report
    }))
    .await
}

/// Aggregates per-process figures into one verdict for the node. No process
/// at all is unhealthy: a node that serves nothing is not a healthy game node.
pub fn node_verdict(processes: &[ProcessHealthReport]) -> (bool, String) {
    if processes.is_empty() {
        return (false, "no game process connected".into());
    }
    let problems: Vec<String> = processes
        .iter()
        .filter_map(|p| {
            let health = p.health.clone().unwrap_or_default();
            let why = if !p.reachable {
                format!("unreachable ({})", p.error)
            } else if !health.alive {
                "not ticking".to_string()
            } else if !health.game_ok {
                format!("game health failing: {}", health.game_detail)
            } else if health.exceptions_since > 0 {
                format!("{} unhandled exception(s)", health.exceptions_since)
            } else {
                return None;
            };
            Some(format!("process {} (pid {}): {why}", p.process_id, p.pid))
        })
        .collect();
    if problems.is_empty() {
        (true, format!("{} process(es) healthy", processes.len()))
    } else {
        (false, problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{rig, Behaviour};
    use hotfleet_proto::v1::ProcessHealth;

    #[tokio::test]
    async fn a_process_that_never_answers_cannot_hold_up_the_heartbeat() {
        let rig = rig(&["a", "b"]);
        rig.runtimes.script("b", "status", Behaviour::Hang);
        rig.runtimes.script("b", "health", Behaviour::Hang);
        let identity =
            NodeIdentity { node_id: "node-1".into(), labels: BTreeMap::new(), advertise_addr: String::new() };
        let reporter = NodeReporter {
            processes: ProcessStatusCache::new(rig.participant.runtimes().clone(), Duration::from_millis(100)),
            participant: rig.participant.clone(),
            identity,
        };
        let started = std::time::Instant::now();
        let status = reporter.node_status(Duration::from_millis(50)).await;
        assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
        assert_eq!(status.processes.len(), 2, "a silent process is still listed");
        assert!(status.processes[0].health.as_ref().is_some_and(|h| h.alive));
        // Asked again while its query is still out: it is not asked twice.
        reporter.node_status(Duration::from_millis(10)).await;
        assert_eq!(rig.runtimes.count("b", "status"), 1);
        // Once its query has timed out, the status names the process and why.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let status = reporter.node_status(Duration::from_millis(50)).await;
        let b = status.processes.iter().find(|p| p.process_id == "b").expect("b listed");
        let health = b.health.clone().expect("health");
        assert!(!health.alive, "{health:?}");
        assert!(health.game_detail.contains("process b did not answer"), "{}", health.game_detail);
        assert!(status.processes.iter().any(|p| p.process_id == "a" && p.health.as_ref().is_some_and(|h| h.alive)));
        assert_eq!(rig.runtimes.count("b", "status"), 2, "asked afresh after its query ended");
    }

    #[tokio::test]
    async fn an_expired_prepare_is_reported_as_expired_not_prepared() {
        let rig = rig(&["a"]);
        let identity =
            NodeIdentity { node_id: "node-1".into(), labels: BTreeMap::new(), advertise_addr: String::new() };
        let reporter = NodeReporter::new(rig.participant.clone(), identity);
        rig.prepare_for(Duration::from_millis(30)).await;
        let status = reporter.node_status(Duration::from_millis(50)).await;
        assert_eq!((status.prepared.len(), status.expired.len()), (1, 0));
        tokio::time::sleep(Duration::from_millis(60)).await;
        rig.participant.expire_prepared().await;
        let status = reporter.node_status(Duration::from_millis(50)).await;
        assert!(status.prepared.is_empty());
        assert_eq!(status.expired.len(), 1);
        let expired = &status.expired[0];
        assert_eq!((expired.rollout_id.as_str(), expired.patch_id.as_str()), ("r1", rig.patch.as_str()));
        assert!(expired.expires_at_ms > 0, "when it expired");
    }

    fn report(id: &str, reachable: bool, alive: bool, game_ok: bool, exceptions: u64) -> ProcessHealthReport {
        ProcessHealthReport {
            process_id: id.into(),
            pid: 7,
            reachable,
            health: Some(ProcessHealth { alive, game_ok, exceptions_since: exceptions, ..Default::default() }),
            error: if reachable { String::new() } else { "disconnected".into() },
        }
    }

    #[test]
    fn node_is_healthy_only_when_every_process_is() {
        assert_eq!(node_verdict(&[report("a", true, true, true, 0)]), (true, "1 process(es) healthy".into()));
        assert!(!node_verdict(&[]).0, "a node without processes serves nothing");
        for bad in [
            report("b", false, true, true, 0),
            report("b", true, false, true, 0),
            report("b", true, true, false, 0),
            report("b", true, true, true, 2),
        ] {
            let (healthy, why) = node_verdict(&[report("a", true, true, true, 0), bad]);
            assert!(!healthy);
            assert!(why.starts_with("process b"), "{why}");
        }
    }
}
