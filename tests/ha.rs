//! High availability on a real etcd (started on loopback by the test):
//! coordinators sharing one etcd, six agents, six Python zone servers with
//! players connected.
//!
//! - the leader is killed (SIGKILL) during wave 2: a follower takes over within
//!   the lease, resumes the rollout and finishes it; the figure is printed;
//! - the leader is killed (SIGKILL) the moment wave 2's commit goes out: the
//!   new leader re-sends it (agents answer a repeat with its first outcome)
//!   and completes the rollout;
//! - the leader is paused (SIGSTOP) longer than its lease: a new leader takes
//!   over and proceeds; the old one resumes (SIGCONT) and nothing it sends is
//!   applied, nothing it writes lands;
//! - etcd is down for 10 s mid-rollout: the coordinator sends nothing it could
//!   not record, then finishes once etcd is back, with nothing lost;
//! - a registration storm while etcd stalls: the registrations the
//!   coordinator cannot take now are told when to come back, the agents wait
//!   and come back, and every node registers once the store answers.
//!
//! Each ends with the consistency check of `common` (no process runs code the
//! store does not record; PIDs unchanged; players connected).

mod common;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use common::*;
use hotfleet_coordinator::store::{
    etcd::{EtcdOptions, EtcdStore},
    AuditEntry, Batch, Fence, FreezeRecord, Store, StoreError, Write,
};
use hotfleet_proto::{
    tls::DEFAULT_COORDINATOR_IDENTITY,
    v1::{
        agent_client::AgentClient, coordinator_client::CoordinatorClient, CommandHeader, CommitRequest, FreezeRequest,
        GetLeaderRequest, LeaderStatus, RollbackRequest, RolloutPhase, StatusRequest, WatchRolloutRequest,
    },
};
use tonic::Code;

/// Asks one coordinator who leads (bounded: it may be paused).
async fn ask(keys: &Keys, url: &str) -> Option<LeaderStatus> {
    let sre = keys.tls.operator("sre");
    let connect = tls_channel(&sre, url, DEFAULT_COORDINATOR_IDENTITY);
    let mut client = CoordinatorClient::new(tokio::time::timeout(Duration::from_secs(1), connect).await.ok()?.ok()?);
    let mut request = tonic::Request::new(GetLeaderRequest {});
    request.set_timeout(Duration::from_secs(1));
    let answer = tokio::time::timeout(Duration::from_secs(1), client.get_leader(request)).await.ok()?.ok()?;
    Some(answer.into_inner())
}

/// Index (into `fleet.coordinators`) and status of the one that says it leads,
/// among `candidates`.
async fn leader_among(fleet: &Fleet, candidates: &[usize]) -> Option<(usize, LeaderStatus)> {
    for &i in candidates {
        if let Some(status) = ask(&fleet.keys, &fleet.coordinators[i].url()).await {
            if status.is_leader {
                return Some((i, status));
            }
        }
    }
    None
}

/// Polls until one of `candidates` leads; returns it and when it was seen.
async fn await_leader(fleet: &Fleet, candidates: &[usize], within: Duration) -> (usize, LeaderStatus, Instant) {
    let deadline = Instant::now() + within;
    loop {
        if let Some((i, status)) = leader_among(fleet, candidates).await {
            return (i, status, Instant::now());
        }
        assert!(Instant::now() < deadline, "no coordinator of {candidates:?} took over within {within:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn urls_of(fleet: &Fleet, which: &[usize]) -> String {
    which.iter().map(|&i| fleet.coordinators[i].url()).collect::<Vec<_>>().join(",")
}

fn others(n: usize, but: usize) -> Vec<usize> {
    (0..n).filter(|&i| i != but).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_during_wave_two_fails_over_within_the_lease_and_ends_consistent() {
    let mut s = Scenario::start(Backend::Etcd { coordinators: 3 });
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "3s");
    let at_kill = s.wait_until(&id, "wave-2", |r| step_name(r) == "wave-2");
    let all: Vec<usize> = (0..3).collect();
    let (old, old_status) = leader_among(&s.fleet, &all).await.expect("a leader");

    s.fleet.coordinators[old].proc.kill();
    let killed = Instant::now();
    let survivors = others(3, old);
    let (new, status, elected) = await_leader(&s.fleet, &survivors, LEASE * 3).await;
    let takeover = elected - killed;
    // The new leader acts: its first write to the rollout carries its epoch.
    let urls = urls_of(&s.fleet, &survivors);
    let acted = loop {
        let r = s.status_via(&urls, &id);
        if epoch_of(&r) == status.epoch || r["terminal"] == true {
            break Instant::now();
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "the new leader never wrote to the rollout: {r}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    eprintln!(
        "FAILOVER leader killed during {}: coordinator {} leads (epoch {} -> {}) after {} ms, first rollout write after {} ms (lease {} ms)",
        step_name(&at_kill),
        s.fleet.coordinators[new].url(),
        old_status.epoch,
        status.epoch,
        takeover.as_millis(),
        (acted - killed).as_millis(),
        LEASE.as_millis()
    );
    assert!(status.epoch > old_status.epoch, "a new tenure has a higher epoch");
    // etcd revokes an expired lease on its next lessor tick (every 500 ms):
    // the lease bounds the takeover up to that tick and a poll.
    assert!(takeover < LEASE + Duration::from_millis(1500), "takeover took {takeover:?} with a {LEASE:?} lease");

    let (code, rollout) = s.watch_via(&urls, &id);
    assert_eq!(code, 0, "the new leader finishes the rollout: {rollout}");
    assert_eq!(epoch_of(&rollout), status.epoch, "finished by the new leader");
    let after = s.damages();
    assert!(after.iter().zip(&before).all(|(a, b)| a < b), "the hotfix runs everywhere: {before:?} -> {after:?}");
    assert_eq!(s.assert_consistent_via(&urls, &[]).await, vec![patch]);
    for agent in s.agent_statuses().await {
        assert_eq!(agent.highest_epoch, status.epoch, "{} fences at the new leader's epoch", agent.node_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_the_moment_wave_two_commits_the_new_leader_completes_the_rollout() {
    let mut s = Scenario::start(Backend::Etcd { coordinators: 3 });
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "1s");
    let all: Vec<usize> = (0..3).collect();
    let (old, old_status) = leader_among(&s.fleet, &all).await.expect("a leader");
    // The leader's own watch: Committing is recorded just before the
    // commits are sent, so it arrives as they go out.
    let mut leader = coordinator_client(&s.fleet.keys, &s.fleet.coordinators[old].url()).await;
    let mut stream =
        leader.watch_rollout(WatchRolloutRequest { rollout_id: id.clone() }).await.expect("watch").into_inner();
    let mut wave_two: Vec<String> = Vec::new();
    let mut agents = Vec::new();
    let mut admitted_before = Vec::new();
    loop {
        let r = tokio::time::timeout(Duration::from_secs(40), stream.message())
            .await
            .expect("a snapshot in time")
            .expect("the watch stream")
            .expect("a snapshot before the end");
        if agents.is_empty() && r.phase == RolloutPhase::Watching as i32 {
            // Prepared everywhere: the next command wave 2's agents admit is its commit.
            wave_two = r.steps.get(2).map(|s| s.node_ids.clone()).expect("a wave-2 step");
            for node in s.fleet.nodes.iter().filter(|n| wave_two.contains(&n.agent.node_id)) {
                agents.push(agent_client(&s.fleet.keys, &node.agent).await);
            }
            admitted_before = admitted(&mut agents).await;
        }
        let step = r.steps.get(r.current_step as usize).map(|s| s.name.clone()).unwrap_or_default();
        if r.phase == RolloutPhase::Committing as i32 && step == "wave-2" {
            break;
        }
        let past = r.current_step > 2 || (r.current_step == 2 && r.phase == RolloutPhase::Watching as i32);
        assert!(!past && !r.terminal, "missed wave-2's commit: {r:?}");
    }
    // kill -9 the moment a wave-2 agent has admitted the commit: the agent
    // is applying it while its caller dies.
    let seen = Instant::now();
    while admitted(&mut agents).await.iter().zip(&admitted_before).all(|(now, was)| now == was) {
        assert!(seen.elapsed() < Duration::from_secs(5), "wave 2's commit never reached its agents");
    }
    eprintln!("WAVE-2 COMMIT admitted {} ms after Committing was recorded: leader killed", seen.elapsed().as_millis());
    s.fleet.coordinators[old].proc.kill();
    let survivors = others(3, old);
    let (_, status, _) = await_leader(&s.fleet, &survivors, LEASE * 3).await;
    assert!(status.epoch > old_status.epoch);
    let urls = urls_of(&s.fleet, &survivors);
    let (code, rollout) = s.watch_via(&urls, &id);
    assert_eq!(code, 0, "the new leader completes the rollout: {rollout}");
    assert_eq!(phase(&rollout), "completed");
    assert_eq!(epoch_of(&rollout), status.epoch, "finished by the new leader");
    // Which leader's commit ran on each wave-2 node (an agent logs a command
    // when it runs it, not when it answers a repeat from memory): the killed
    // one's if it ran before the agent first heard of the new leader's epoch.
    for node in s.fleet.nodes.iter().filter(|n| wave_two.contains(&n.agent.node_id)) {
        let log = without_colours(&node.agent.proc.log_text());
        let lines: Vec<&str> = log.lines().collect();
        let commit = format!("commit rollout={id} ");
        assert_eq!(
            lines.iter().filter(|l| l.contains(&commit)).count(),
            1,
            "the commit ran once on {}",
            node.agent.node_id
        );
        let ran = lines.iter().position(|l| l.contains(&commit));
        let new_epoch = format!("epoch={}", status.epoch);
        let heard = lines.iter().position(|l| l.split_whitespace().any(|w| w == new_epoch));
        let by = match (ran, heard) {
            (Some(r), Some(h)) if r < h => "the killed leader",
            (Some(_), _) => "the new leader",
            (None, _) => "nobody (?)",
        };
        eprintln!("WAVE-2 COMMIT {}: ran once, sent by {by}", node.agent.node_id);
    }
    let after = s.damages();
    assert!(after.iter().zip(&before).all(|(a, b)| a < b), "the hotfix runs everywhere: {before:?} -> {after:?}");
    assert_eq!(s.assert_consistent_via(&urls, &[]).await, vec![patch]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_is_fenced_out_when_it_wakes() {
    let mut s = Scenario::start(Backend::Etcd { coordinators: 3 });
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "4s");
    // Commands with the first leader's epoch reached the canary and wave 1.
    s.wait_until(&id, "wave-1 health window", |r| step_name(r) == "wave-1" && phase(r) == "watching");
    let all: Vec<usize> = (0..3).collect();
    let (old, old_status) = leader_among(&s.fleet, &all).await.expect("a leader");
    let old_url = s.fleet.coordinators[old].url();
    let survivors = others(3, old);
    let urls = urls_of(&s.fleet, &survivors);

    s.fleet.coordinators[old].proc.signal("STOP").expect("SIGSTOP");
    let paused = Instant::now();
    let (new, status, _) = await_leader(&s.fleet, &survivors, LEASE * 3).await;
    let new_url = s.fleet.coordinators[new].url();
    assert!(status.epoch > old_status.epoch);
    // The new leader proceeds: writes to the rollout, and every agent heard its epoch.
    loop {
        let r = s.status_via(&urls, &id);
        if epoch_of(&r) == status.epoch {
            break;
        }
        assert!(paused.elapsed() < Duration::from_secs(30), "the new leader does not proceed: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let floor_deadline = Instant::now() + Duration::from_secs(10);
    while s.agent_statuses().await.iter().any(|n| n.highest_epoch < status.epoch) {
        assert!(Instant::now() < floor_deadline, "agents did not learn the new epoch");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Paused well past its lease.
    let pause = LEASE * 2;
    if paused.elapsed() < pause {
        tokio::time::sleep(pause - paused.elapsed()).await;
    }
    let refused_before: Vec<u64> = s.agent_statuses().await.iter().map(|n| n.commands_refused_stale).collect();
    let stored_before = s.status_via(&urls, &id);

    s.fleet.coordinators[old].proc.signal("CONT").expect("SIGCONT");
    // It wakes with its lease long expired on its own clock: it steps down
    // at once and follows the new leader.
    let woke = Instant::now();
    loop {
        if let Some(view) = ask(&s.fleet.keys, &old_url).await {
            if !view.is_leader && view.leader_addr == new_url {
                break;
            }
        }
        assert!(woke.elapsed() < Duration::from_secs(10), "the old leader never stepped down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A write sent to it is refused, naming the new leader.
    let mut old_client = coordinator_client(&s.fleet.keys, &old_url).await;
    let refused = old_client.freeze(FreezeRequest { reason: "from the old leader".into() }).await.expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(refused.metadata().get("x-hotfleet-leader").and_then(|v| v.to_str().ok()), Some(new_url.as_str()));

    // Nothing it sends is applied: whatever the old leader still had in
    // flight, and the old epoch's commands sent now on its behalf (what a
    // deposed leader that never noticed would send) are refused by every agent.
    for node in &s.fleet.nodes {
        let mut agent = agent_client(&s.fleet.keys, &node.agent).await;
        let header = || {
            Some(CommandHeader {
                rollout_id: id.clone(),
                patch_id: patch.clone(),
                epoch: old_status.epoch,
                ..Default::default()
            })
        };
        let commit = agent.commit(CommitRequest { header: header() }).await.expect_err("stale commit");
        assert_eq!(commit.code(), Code::FailedPrecondition, "{}: {commit:?}", node.agent.node_id);
        assert!(commit.message().contains("stale epoch"), "{}", commit.message());
        let rollback = agent.rollback(RollbackRequest { header: header() }).await.expect_err("stale rollback");
        assert_eq!(rollback.code(), Code::FailedPrecondition);
    }
    let refused_after: Vec<u64> = s.agent_statuses().await.iter().map(|n| n.commands_refused_stale).collect();
    for (i, (b, a)) in refused_before.iter().zip(&refused_after).enumerate() {
        assert!(*a >= b + 2, "node-{} refused both stale commands ({b} -> {a})", i + 1);
    }

    // Nothing it writes lands: a batch under its fence fails the transaction
    // compare and leaves the store as it was.
    let etcd = s.fleet.etcd.as_ref().expect("etcd");
    let store = EtcdStore::connect(&EtcdOptions::new(vec![etcd.url()], "/hotfleet/")).await.expect("etcd store");
    let audit_before = store.audit(1000, None).await.expect("audit").len();
    let stale = Batch::new()
        .with(Write::SetFreeze(Some(FreezeRecord { reason: "stale".into(), by: "old-leader".into(), since_ms: 1 })))
        .with(Write::Audit(AuditEntry {
            seq: 0,
            at_ms: 1,
            actor: "old-leader".into(),
            action: "fleet.freeze".into(),
            target: "fleet".into(),
            detail: String::new(),
            ok: true,
        }));
    match store.write(Fence { epoch: old_status.epoch }, stale).await {
        Err(StoreError::Fenced { ours, current }) => {
            assert_eq!(ours, old_status.epoch);
            assert_eq!(current, status.epoch, "the new leader's key holds the store");
        }
        other => panic!("a write under the deposed leader's fence must be fenced, got {other:?}"),
    }
    assert_eq!(store.freeze().await.expect("freeze"), None);
    assert_eq!(store.audit(1000, None).await.expect("audit").len(), audit_before);
    // Every rollout write since the take-over is the new leader's.
    let stored = store.rollout(&id).await.expect("read").expect("rollout");
    assert!(stored.epoch >= status.epoch, "rollout last written by epoch {}", stored.epoch);
    let gen_before: u64 = stored_before["generation"].as_u64().unwrap_or(0);
    assert!(stored.generation >= gen_before);

    let (code, rollout) = s.watch_via(&urls, &id);
    assert_eq!(code, 0, "the new leader finishes the rollout: {rollout}");
    // The old leader, awake through the rest of the rollout, recorded no
    // transition and had no command admitted: every agent's floor is the new
    // epoch, and its own guard stops it before sending anything.
    let log = s.fleet.coordinators[old].proc.log_text();
    let after_loss = log_after(&log, "leadership lost");
    assert!(!after_loss.is_empty(), "old leader's log:\n{log}");
    for line in after_loss.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(12) {
        eprintln!("OLD LEADER {line}");
    }
    assert!(!after_loss.contains("rollout transition"), "the old leader wrote after losing its lease:\n{after_loss}");
    assert!(!after_loss.contains("term started"), "the old leader must not lead again while the new one lives");
    let after = s.damages();
    assert!(after.iter().zip(&before).all(|(a, b)| a < b));
    assert_eq!(s.assert_consistent_via(&urls, &[]).await, vec![patch]);
}

/// Commands each agent has admitted so far.
async fn admitted(agents: &mut [AgentClient<tonic::transport::Channel>]) -> Vec<u64> {
    let mut out = Vec::new();
    for agent in agents {
        let status = agent.status(StatusRequest {}).await.expect("agent status").into_inner();
        out.push(status.node.map(|n| n.commands_admitted).unwrap_or_default());
    }
    out
}

/// `text` without ANSI colour sequences (an agent's log is coloured).
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_escape = false;
    for c in text.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (false, c) => out.push(c),
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    out
}

/// The part of a log after the first line containing `marker` (empty if none).
fn log_after<'a>(log: &'a str, marker: &str) -> &'a str {
    log.find(marker).map(|i| &log[i..]).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_ten_seconds_mid_rollout_holds_still_then_finishes_with_nothing_lost() {
    let mut s = Scenario::start(Backend::Etcd { coordinators: 1 });
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "3s");
    let at_outage = s.wait_until(&id, "wave-1 health window", |r| step_name(r) == "wave-1" && phase(r) == "watching");
    let committed_before: Vec<String> =
        node_states(&at_outage).into_iter().filter(|(_, d, _)| d == "committed").map(|(n, _, _)| n).collect();
    let stacks = |statuses: &[hotfleet_proto::v1::NodeStatus]| -> BTreeMap<String, Vec<String>> {
        statuses.iter().map(|n| (n.node_id.clone(), n.processes[0].patch_stack.clone())).collect()
    };

    s.fleet.etcd.as_mut().expect("etcd").kill();
    let down = Instant::now();
    // Whatever was in flight when etcd went away has landed by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = s.agent_statuses().await;
    tokio::time::sleep(Duration::from_secs(10) - down.elapsed()).await;
    let last = s.agent_statuses().await;
    let sent: Vec<u64> = last.iter().zip(&first).map(|(l, f)| l.commands_admitted - f.commands_admitted).collect();
    assert!(sent.iter().all(|&n| n == 0), "commands sent while the store was down: {sent:?}");
    assert_eq!(stacks(&last), stacks(&first), "no process changed code while the store was down");
    let log = s.fleet.coordinator().proc.log_text();
    assert!(
        log.contains("holding still") || log.contains("leadership lost"),
        "the coordinator noticed the outage:\n{log}"
    );

    s.fleet.etcd.as_mut().expect("etcd").start_again().expect("etcd back on the same data");
    let back = s.status(&id);
    // Nothing recorded before the outage was lost.
    let gen = |r: &serde_json::Value| r["generation"].as_u64().unwrap_or(0);
    assert!(gen(&back) >= gen(&at_outage), "generation went back: {} -> {}", gen(&at_outage), gen(&back));
    for node in &committed_before {
        assert!(
            node_states(&back).iter().any(|(n, d, _)| n == node && d == "committed"),
            "{node}'s recorded commit survived the outage: {back}"
        );
    }
    let (code, rollout) = s.watch(&id);
    eprintln!("ETCD OUTAGE rollout ended {} (exit {code}) after etcd was down 10 s", phase(&rollout));
    assert_eq!(code, 0, "the coordinator finishes the rollout once etcd is back: {rollout}");
    let after = s.damages();
    assert!(after.iter().zip(&before).all(|(a, b)| a < b));
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
    let audit = ok(s.fleet.cli(&["--output", "json", "audit"]).expect("audit"));
    assert!(audit.contains("rollout.start") && audit.contains("patch.push"), "audit survived: {audit}");
}

/// Every agent restarts (a registration storm) while etcd is stopped
/// (SIGSTOP, shorter than the lease): the coordinator serves one registration
/// at a time (`--registrations-in-flight 1`), the one it took waits on the
/// store, and the others are told to come back later instead of queueing.
/// The agents wait the time asked (jittered) and register once etcd answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_storm_while_etcd_stalls_is_told_to_come_back_and_every_node_registers() {
    let flags = ["--heartbeat-interval", "500ms", "--leader-lease", "3s", "--registrations-in-flight", "1"];
    let mut s =
        Scenario::start_small_on(Backend::Etcd { coordinators: 1 }, 4, flags.iter().map(|f| f.to_string()).collect());
    let keys = s.fleet.keys.clone();
    s.fleet.etcd.as_ref().expect("etcd").proc.signal("STOP").expect("SIGSTOP etcd");
    let stalled = Instant::now();
    for i in 0..4 {
        s.restart_agent(i, &keys);
    }
    // Long enough for every restarted agent to have asked at least once.
    let busy = |s: &Scenario| {
        s.fleet.nodes.iter().filter(|n| n.agent.proc.log_text().contains("coordinator busy with registrations")).count()
    };
    while busy(&s) == 0 && stalled.elapsed() < Duration::from_millis(2_500) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let told = busy(&s);
    s.fleet.etcd.as_ref().expect("etcd").proc.signal("CONT").expect("SIGCONT etcd");
    assert!(told >= 1, "no agent was told to come back while one registration waited on the store");
    // Each restarted agent registers again (its log keeps its first life's lines).
    let registered = |s: &Scenario| {
        s.fleet
            .nodes
            .iter()
            .filter(|n| n.agent.proc.log_text().matches("registered with the coordinator").count() >= 2)
            .count()
    };
    let resumed = Instant::now();
    while registered(&s) < 4 {
        assert!(resumed.elapsed() < Duration::from_secs(30), "only {} of 4 agents registered again", registered(&s));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.fleet.wait_registered().expect("every node alive with its zone server");
    let listed = ok(s.fleet.cli(&["--output", "json", "nodes", "list"]).expect("nodes list"));
    let doc: serde_json::Value = serde_json::from_str(&listed).expect("json");
    let items = doc["items"].as_array().expect("items");
    assert_eq!(items.len(), 4, "{listed}");
    assert!(items.iter().all(|n| n["liveness"] == "alive"), "every node alive: {listed}");
    eprintln!("REGISTRATION STORM: {told} of 4 agents told to come back while etcd was stopped");
}
