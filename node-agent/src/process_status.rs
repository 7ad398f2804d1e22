//! What each game process last said it runs, refreshed in the background.
//!
//! A heartbeat must not depend on every process answering: one stopped or
//! silent process would otherwise hold up its node's heartbeats until the
//! coordinator declares the whole node lost. So each process is asked in a
//! task of its own (at most one query in flight per process), a report waits
//! for the answers only up to a budget, and whatever has not answered by then
//! is reported from the cache. A process whose query failed or timed out is
//! reported as that process's problem (not alive, with the reason) until it
//! answers again.
//!
//! A cached answer describes the process at one patch stack. Once a commit or
//! rollback has changed that stack (the session's stack is kept current by
//! both), the answer's live digests are no longer reported: an answer that was
//! composed before a rollback and delivered after it would otherwise show the
//! code that was just taken off. The digests come back with the next answer.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::join_all;
use hotfleet_proto::v1::{ProcessHealth, ProcessStatus};

use crate::{
    lock,
    runtimes::{LiveStatus, Process, Runtimes},
};

/// How long one process may take to answer a status or health query.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
struct Entry {
    live: Option<LiveStatus>,
    health: Option<ProcessHealth>,
    /// Why the last query failed, until one succeeds.
    problem: Option<String>,
    in_flight: bool,
}

/// Last known status per process id.
pub struct ProcessStatusCache {
    runtimes: Arc<dyn Runtimes>,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    query_timeout: Duration,
}

impl ProcessStatusCache {
    pub fn new(runtimes: Arc<dyn Runtimes>, query_timeout: Duration) -> Self {
        Self { runtimes, entries: Arc::default(), query_timeout }
    }

    /// Every connected process: asked afresh where no query is in flight,
    /// waiting at most `budget` for the answers; the rest from the cache.
    pub async fn statuses(&self, budget: Duration) -> Vec<ProcessStatus> {
        let processes = self.runtimes.processes();
        let started: Vec<_> = {
            let mut entries = lock(&self.entries);
            entries.retain(|id, _| processes.iter().any(|p| p.process_id == *id));
            processes
                .iter()
                .filter_map(|p| {
                    let entry = entries.entry(p.process_id.clone()).or_default();
                    (!entry.in_flight).then(|| {
                        entry.in_flight = true;
                        tokio::spawn(self.refresh(p.process_id.clone()))
                    })
                })
                .collect()
        };
        // Dropping the join handles at the budget does not cancel the queries:
        // their answers land in the cache for the next report.
        let _ = tokio::time::timeout(budget, join_all(started)).await;
        // Read the processes again: answers (and commits meanwhile) update their stacks.
        let entries = lock(&self.entries);
        self.runtimes
            .processes()
            .into_iter()
            .map(|p| {
                let entry = entries.get(&p.process_id);
                status_of(p, entry)
            })
            .collect()
    }

    fn refresh(&self, process_id: String) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (runtimes, entries, timeout) = (self.runtimes.clone(), self.entries.clone(), self.query_timeout);
        async move {
            let (live, health) =
                tokio::join!(runtimes.status(&process_id, timeout), runtimes.health(&process_id, 0, timeout));
            let mut entries = lock(&entries);
            let Some(entry) = entries.get_mut(&process_id) else { return };
            entry.in_flight = false;
            entry.problem = None;
            match live {
                Ok(live) => entry.live = Some(live),
                Err(err) => entry.problem = Some(err.to_string()),
            }
            match health {
                Ok(health) => entry.health = Some(health),
                Err(err) => entry.problem = Some(err.to_string()),
            }
        }
    }
}

fn status_of(process: Process, entry: Option<&Entry>) -> ProcessStatus {
    let live_digests = entry
        .and_then(|e| e.live.as_ref())
        .filter(|live| live.patch_stack == process.patch_stack)
        .map(|live| live.live_digests.clone())
        .unwrap_or_default();
    let mut health = entry.and_then(|e| e.health.clone());
    if let Some(problem) = entry.and_then(|e| e.problem.as_ref()) {
        // The wire status has no error field: a process that cannot answer
        // is reported as not alive, with the reason as its health detail.
        let last = health.unwrap_or_default();
        health = Some(ProcessHealth {
            alive: false,
            game_ok: false,
            game_detail: format!("not answering the agent: {problem}"),
            ..last
        });
    }
    ProcessStatus {
        process_id: process.process_id,
        pid: process.pid,
        build: process.build,
        // The session's stack: kept current by status answers and by commits alike.
        patch_stack: process.patch_stack,
        live_digests,
        health,
        runtime_version: process.runtime_version,
        python_version: process.python_version,
        live_digests_unchanged: false,
        live_digests_fingerprint: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Behaviour, FakeRuntimes};

    fn digests(statuses: &[ProcessStatus]) -> Vec<(String, String)> {
        statuses[0].live_digests.iter().map(|(m, d)| (m.clone(), d.clone())).collect()
    }

    #[tokio::test]
    async fn an_answer_from_before_a_commit_or_rollback_never_reports_its_digests() {
        let runtimes = FakeRuntimes::new(&["a"]);
        let cache = ProcessStatusCache::new(runtimes.clone(), Duration::from_secs(5));
        // Asked with an empty stack; the answer is held back.
        runtimes.script("a", "status", Behaviour::Wait);
        assert!(digests(&cache.statuses(Duration::from_millis(10)).await).is_empty());
        // A commit lands, then the answer from before it arrives.
        runtimes.set_stack("a", vec!["p1".into()]);
        runtimes.release.add_permits(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The next report's own query is slow too: the cache holds only the stale answer.
        let status = cache.statuses(Duration::from_millis(10)).await;
        assert_eq!(status[0].patch_stack, vec!["p1".to_string()]);
        assert!(digests(&status).is_empty(), "digests of the stack before the commit: {:?}", digests(&status));
        // Once the process answers at its current stack, its digests are reported again.
        runtimes.release.add_permits(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        runtimes.script("a", "status", Behaviour::Hang);
        let status = cache.statuses(Duration::from_millis(10)).await;
        assert_eq!(digests(&status), vec![("zone.combat".to_string(), "digest-of[p1]".to_string())]);
    }
}
