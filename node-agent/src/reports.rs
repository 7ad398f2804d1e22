//! What this node reports: its status (sent with every heartbeat and by the
//! `Status` call) and per-process health with one verdict for the node (the
//! `Health` call). Read-only: nothing here changes what a process runs.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, UNIX_EPOCH},
};

use futures::future::join_all;
use hotfleet_proto::v1::{NodeStatus, PreparedPatch, ProcessHealthReport, ProcessStatus};

use crate::{participant::Participant, runtimes::Runtimes};

/// Status and health queries must not hang a heartbeat.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Node identity reported in statuses.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node_id: String,
    pub labels: BTreeMap<String, String>,
    pub advertise_addr: String,
}

/// Builds this node's full status (also sent with every heartbeat).
pub async fn node_status(participant: &Participant, identity: &NodeIdentity) -> NodeStatus {
    let (commands_admitted, commands_refused_stale) = participant.command_counts();
    let prepared = participant
        .prepared()
        .into_iter()
        .map(|p| PreparedPatch {
            rollout_id: p.rollout_id,
            patch_id: p.patch_id,
            expires_at_ms: p.expires_at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        })
        .collect();
    NodeStatus {
        node_id: identity.node_id.clone(),
        labels: identity.labels.clone().into_iter().collect(),
        advertise_addr: identity.advertise_addr.clone(),
        processes: process_statuses(participant.runtimes().as_ref()).await,
        highest_epoch: participant.highest_epoch(),
        prepared,
        commands_admitted,
        commands_refused_stale,
    }
}

/// What every connected process runs, asked live.
pub async fn process_statuses(runtimes: &dyn Runtimes) -> Vec<ProcessStatus> {
    join_all(runtimes.processes().into_iter().map(|process| async move {
        let mut status = ProcessStatus {
            pid: process.pid,
            build: process.build,
            patch_stack: process.patch_stack,
            runtime_version: process.runtime_version,
            python_version: process.python_version,
            ..Default::default()
        };
        if let Ok(live) = runtimes.status(&process.process_id, QUERY_TIMEOUT).await {
            status.patch_stack = live.patch_stack;
            status.live_digests = live.live_digests;
        }
        if let Ok(health) = runtimes.health(&process.process_id, 0, QUERY_TIMEOUT).await {
            status.health = Some(health);
        }
        status.process_id = process.process_id;
        status
    }))
    .await
}

/// Per-process health since the given marks.
pub async fn health(runtimes: &dyn Runtimes, since: &HashMap<String, u64>) -> Vec<ProcessHealthReport> {
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
    use hotfleet_proto::v1::ProcessHealth;

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
