//! The participant against in-memory runtimes and patches: each interleaving
//! the coordinator relies on, without a process or a socket.

use std::{collections::HashMap, time::Duration};

use super::*;
use crate::testing::{bundle, bundle_on, participant_in, rig, rig_with, until, Behaviour, FakePatches, BUILD};

#[tokio::test]
async fn prepare_then_commit_applies_everywhere_once() {
    let rig = rig(&["a", "b"]);
    assert!(rig.run(Kind::Prepare).await.ok);
    assert_eq!(rig.participant.prepared().len(), 1);
    let answer = rig.run(Kind::Commit).await;
    assert!(answer.ok, "{answer:?}");
    assert_eq!(answer.processes.len(), 2);
    assert!(rig.participant.prepared().is_empty(), "a committed patch is no longer waiting");
    for p in ["a", "b"] {
        assert_eq!(rig.runtimes.count(p, "commit"), 1);
    }
}

#[tokio::test]
async fn an_older_epoch_is_refused_and_only_the_coordinators_announcement_raises_the_floor() {
    let rig = rig(&["a"]);
    rig.participant.observe_epoch(5).expect("the leader announces epoch 5");
    rig.participant.handle(rig.cmd(Kind::Abort, 5)).await.expect("epoch 5");
    let err = rig.participant.handle(rig.cmd(Kind::Prepare, 4)).await.expect_err("epoch 4 after 5");
    assert!(matches!(err, ParticipantError::Epoch(EpochError::Stale { got: 4, highest: 5 })), "{err}");
    assert_eq!(rig.runtimes.count("a", "prepare"), 0, "a refused command reaches no runtime");
    rig.participant.observe_epoch(9).expect("a new leader");
    rig.participant.handle(rig.cmd(Kind::Rollback, 9)).await.expect("epoch 9");
    assert_eq!(rig.participant.highest_epoch(), 9);
    assert_eq!(rig.participant.command_counts(), (2, 1));
    assert_eq!(EpochFence::load(rig.dir.path()).expect("reload").highest(), 9, "the floor survives a restart");
    // A leader's announced epoch fences too, before its first command.
    rig.participant.observe_epoch(12).expect("observe");
    assert!(rig.participant.handle(rig.cmd(Kind::Abort, 10)).await.is_err());
}

#[tokio::test]
async fn a_command_above_the_learned_epoch_is_refused_as_unknown_and_changes_nothing() {
    let rig = rig(&["a"]);
    let epoch_file = std::fs::read(rig.dir.path().join("epoch")).expect("epoch file");
    for kind in [Kind::Prepare, Kind::Commit, Kind::Abort, Kind::Rollback] {
        let err = rig.participant.handle(rig.cmd(kind, u64::MAX)).await.expect_err("never announced");
        assert!(matches!(err, ParticipantError::Epoch(EpochError::Unknown { got: u64::MAX, known: 1 })), "{err}");
    }
    assert_eq!(rig.participant.highest_epoch(), 1);
    assert_eq!(std::fs::read(rig.dir.path().join("epoch")).expect("epoch file"), epoch_file, "nothing written");
    for request in ["prepare", "commit", "abort", "rollback"] {
        assert_eq!(rig.runtimes.count("a", request), 0, "{request} reached a runtime");
    }
    // Nothing was retired either: the coordinator's own commands go through.
    assert!(rig.run(Kind::Prepare).await.ok);
    assert!(rig.run(Kind::Commit).await.ok);
    assert_eq!(rig.participant.command_counts(), (2, 0));
}

#[tokio::test]
async fn a_new_leaders_first_command_waits_for_the_heartbeat_that_learns_its_epoch() {
    let rig = rig(&["a"]);
    // The heartbeat loop: woken by the participant, it learns the new leader's epoch.
    let link = rig.participant.clone();
    let heartbeat = tokio::spawn(async move {
        link.changed().await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        link.observe_epoch(2).expect("observe");
    });
    let answer = rig.participant.handle(rig.cmd(Kind::Prepare, 2)).await.expect("admitted once learned");
    assert!(answer.ok, "{answer:?}");
    heartbeat.await.expect("heartbeat");
    assert_eq!(rig.participant.highest_epoch(), 2);
    // The old leader is now stale.
    let err = rig.participant.handle(rig.cmd(Kind::Commit, 1)).await.expect_err("deposed");
    assert!(matches!(err, ParticipantError::Epoch(EpochError::Stale { .. })), "{err}");
}

#[tokio::test]
async fn the_same_command_twice_gets_the_first_answer_and_runs_once() {
    let rig = rig(&["a", "b"]);
    rig.runtimes.script("b", "commit", Behaviour::Fail);
    let prepared = rig.run(Kind::Prepare).await;
    assert_eq!(rig.run(Kind::Prepare).await, prepared);
    assert_eq!(rig.runtimes.count("a", "prepare"), 1);
    let first = rig.run(Kind::Commit).await;
    assert!(!first.ok);
    assert_eq!(first.reason, "1 of 2 process(es) failed");
    // Even after the runtime would now succeed, the retry repeats the first answer.
    rig.runtimes.script("b", "commit", Behaviour::Ok);
    assert_eq!(rig.run(Kind::Commit).await, first);
    assert_eq!(rig.runtimes.count("b", "commit"), 1);
    assert_eq!(rig.runtimes.count("a", "commit"), 1);
}

#[tokio::test]
async fn a_prepare_left_past_its_ttl_is_presumed_aborted() {
    let rig = rig(&["a"]);
    rig.prepare_for(Duration::from_millis(30)).await;
    rig.participant.expire_prepared().await;
    assert_eq!(rig.participant.prepared().len(), 1, "not expired yet");
    tokio::time::sleep(Duration::from_millis(60)).await;
    rig.participant.expire_prepared().await;
    assert!(rig.participant.prepared().is_empty());
    assert_eq!(rig.runtimes.count("a", "abort"), 1, "the runtime is told to drop it");
    let commit = rig.run(Kind::Commit).await;
    assert!(!commit.ok);
    assert!(commit.reason.contains("presumed abort"), "{}", commit.reason);
    assert_eq!(rig.runtimes.count("a", "commit"), 0);
}

#[tokio::test]
async fn a_runtime_dying_mid_commit_fails_only_its_own_outcome() {
    let rig = rig(&["a", "b", "c", "d"]);
    assert!(rig.run(Kind::Prepare).await.ok);
    rig.runtimes.script("b", "commit", Behaviour::Vanish);
    rig.runtimes.disconnect("d");
    let answer = rig.run(Kind::Commit).await;
    assert!(!answer.ok);
    assert_eq!(answer.reason, "2 of 4 process(es) failed");
    let by_id: HashMap<_, _> = answer.processes.iter().map(|o| (o.process_id.as_str(), o)).collect();
    assert!(by_id["a"].ok && by_id["c"].ok, "the others' commits stand: {answer:?}");
    assert_eq!(by_id["b"].error, "process b disconnected during commit");
    assert_eq!(by_id["d"].error, "process d disconnected after prepare");
    assert_eq!(rig.runtimes.processes().iter().filter(|p| p.patch_stack == [rig.patch.clone()]).count(), 2);
}

#[tokio::test]
async fn a_failed_prepare_votes_no_and_drops_what_did_prepare() {
    let rig = rig(&["a", "b"]);
    rig.runtimes.script("b", "prepare", Behaviour::Fail);
    let vote = rig.run(Kind::Prepare).await;
    assert!(!vote.ok);
    assert_eq!(rig.runtimes.count("a", "abort"), 1);
    assert_eq!(rig.runtimes.count("b", "abort"), 0, "b holds nothing");
    assert!(rig.participant.prepared().is_empty());
}

#[tokio::test]
async fn a_patch_nobody_can_fetch_or_run_is_refused_before_any_runtime() {
    let rig = rig(&["a"]);
    let unknown = Command::new(Kind::Prepare, "r1", "b".repeat(64), 1);
    let vote = rig.participant.handle(unknown).await.expect("admitted");
    assert!(!vote.ok && vote.reason.contains("not found"), "{vote:?}");
    let other_build = rig.runtimes.processes()[0].clone();
    rig.runtimes.disconnect("a");
    rig.runtimes.connect(Process { build: "zone-0.9".into(), ..other_build });
    let vote = rig.run(Kind::Prepare).await;
    assert!(vote.reason.contains("runs target build"), "{vote:?}");
    assert_eq!(rig.runtimes.count("a", "prepare"), 0);
}

#[tokio::test]
async fn rollback_undoes_only_where_the_patch_is_on_top() {
    let rig = rig(&["a", "b", "c"]);
    let other = "c".repeat(64);
    rig.runtimes.set_stack("a", vec![rig.patch.clone()]);
    rig.runtimes.set_stack("b", vec![rig.patch.clone(), other]);
    let answer = rig.run(Kind::Rollback).await;
    assert!(!answer.ok);
    assert_eq!(answer.processes.len(), 2, "c never had it: {answer:?}");
    assert!(answer.processes.iter().any(|o| o.process_id == "b" && o.error.contains("not on top")));
    assert_eq!(rig.runtimes.count("a", "rollback"), 1);
    assert_eq!(rig.runtimes.count("b", "rollback"), 0);
}

#[tokio::test]
async fn abort_drops_the_prepare_and_is_ok_even_if_a_holder_vanished() {
    let rig = rig(&["a", "b"]);
    assert!(rig.run(Kind::Prepare).await.ok);
    rig.runtimes.disconnect("b");
    let answer = rig.run(Kind::Abort).await;
    assert!(answer.ok);
    assert_eq!(rig.runtimes.count("a", "abort"), 1);
    assert!(rig.participant.prepared().is_empty());
    let err = rig.participant.handle(rig.cmd(Kind::Commit, 1)).await.expect_err("nothing left to commit");
    assert!(matches!(err, ParticipantError::Replayed(_)), "{err}");
    assert_eq!(rig.runtimes.count("a", "commit"), 0);
}

#[tokio::test]
async fn a_commit_whose_caller_vanishes_runs_to_its_end_and_a_resend_gets_its_outcome() {
    let rig = rig(&["a", "b"]);
    assert!(rig.run(Kind::Prepare).await.ok);
    rig.runtimes.script("a", "commit", Behaviour::Wait);
    let participant = rig.participant.clone();
    let commit = rig.cmd(Kind::Commit, 1);
    let caller = tokio::spawn(async move { participant.handle(commit).await });
    until("the commit to reach the runtime", || rig.runtimes.count("a", "commit") == 1).await;
    // The leader dies with its connection: tonic drops the handler's future.
    caller.abort();
    assert!(caller.await.is_err_and(|e| e.is_cancelled()));
    // A new leader re-sends the same commit while the first is still running.
    rig.participant.observe_epoch(2).expect("the new leader's epoch, learned by heartbeat");
    let participant = rig.participant.clone();
    let resent = tokio::spawn(async move { participant.handle(Command::new(Kind::Commit, "r1", rig.patch, 2)).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(!resent.is_finished(), "the re-sent commit waits for the first one's outcome");
    rig.runtimes.release.add_permits(1);
    let answer =
        tokio::time::timeout(Duration::from_secs(5), resent).await.expect("answered").expect("task").expect("ok");
    assert!(answer.ok, "{answer:?}");
    assert_eq!(answer.processes.len(), 2);
    assert_eq!(rig.runtimes.count("a", "commit"), 1, "committed once");
    assert_eq!(rig.runtimes.count("b", "commit"), 1, "committed once");
}

#[tokio::test]
async fn a_rollback_before_any_process_reconnected_is_unknown_not_ok() {
    let rig = rig(&[]);
    let err = rig.participant.handle(rig.cmd(Kind::Rollback, 1)).await.expect_err("nothing to judge by yet");
    assert!(matches!(err, ParticipantError::Unknown(_)), "{err}");
    assert!(err.to_string().contains("retry"), "{err}");
    // The process comes back running the patch: the retried rollback does the work.
    rig.runtimes.connect(Process {
        process_id: "a".into(),
        build: BUILD.into(),
        patch_stack: vec![rig.patch.clone()],
        ..Default::default()
    });
    let answer = rig.run(Kind::Rollback).await;
    assert!(answer.ok, "{answer:?}");
    assert_eq!(rig.runtimes.count("a", "rollback"), 1);
}

#[tokio::test]
async fn any_command_naming_the_rollout_keeps_its_prepare_alive() {
    let rig = rig(&["a"]);
    rig.prepare_for(Duration::from_millis(150)).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        // E.g. the coordinator aborting another patch of the same rollout.
        let other = Command::new(Kind::Abort, "r1", "d".repeat(64), 1);
        rig.participant.handle(other).await.expect("abort");
        rig.participant.expire_prepared().await;
    }
    assert_eq!(rig.participant.prepared().len(), 1, "renewed past its first deadline");
    // A command for another rollout renews nothing.
    tokio::time::sleep(Duration::from_millis(90)).await;
    rig.participant.handle(Command::new(Kind::Abort, "r2", rig.patch.clone(), 1)).await.expect("abort");
    tokio::time::sleep(Duration::from_millis(90)).await;
    rig.participant.expire_prepared().await;
    assert!(rig.participant.prepared().is_empty());
}

#[tokio::test]
async fn an_expired_prepare_is_reported_at_once_and_named_by_a_late_commit() {
    let rig = rig(&["a"]);
    rig.prepare_for(Duration::from_millis(20)).await;
    let changed = rig.participant.changed();
    tokio::time::sleep(Duration::from_millis(40)).await;
    // The commit comes late, before the sweeper ran: it must not apply.
    let commit = rig.run(Kind::Commit).await;
    assert!(!commit.ok);
    assert!(commit.reason.contains("expired") && commit.reason.contains("TTL"), "{}", commit.reason);
    assert!(commit.reason.contains("presumed abort"), "{}", commit.reason);
    assert_eq!(rig.runtimes.count("a", "commit"), 0);
    assert_eq!(rig.runtimes.count("a", "abort"), 1, "the runtime dropped it");
    tokio::time::timeout(Duration::from_secs(1), changed).await.expect("a status change is signalled at once");
    let expired = rig.participant.recently_expired();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].rollout_id, "r1");
}

/// Two stacked patches: `first` (a build's first) and `second` on top of it.
fn stacked() -> (hotfleet_patch::Bundle, hotfleet_patch::Bundle) {
    let first = bundle("2");
    let second = bundle_on("3", Some(&first.id()));
    (first, second)
}

#[tokio::test]
async fn a_prepare_goes_only_on_top_of_the_parent_its_manifest_names() {
    let (first, second) = stacked();
    let (p1, p2) = (first.id(), second.id());
    let orphan = bundle("4");
    let rig = rig_with(&["a", "b"], vec![second, first, orphan.clone()]);
    // Neither process runs the parent yet: refused, naming both, and no runtime prepares.
    let vote = rig.run(Kind::Prepare).await;
    assert!(!vote.ok && vote.reason.contains("parent is not the top"), "{vote:?}");
    assert_eq!(vote.processes.len(), 2);
    assert!(vote.processes.iter().all(|o| o.error.contains(&p1[..12]) && o.error.contains("is empty")), "{vote:?}");
    assert_eq!(rig.runtimes.count("a", "prepare") + rig.runtimes.count("b", "prepare"), 0);
    assert!(rig.participant.prepared().is_empty());
    // One process has it on top, the other not: still nothing prepared anywhere.
    rig.runtimes.set_stack("a", vec![p1.clone()]);
    let vote = rig.participant.handle(Command::new(Kind::Prepare, "r2", p2.clone(), 1)).await.expect("admitted");
    assert!(!vote.ok && vote.processes.len() == 1 && vote.processes[0].process_id == "b", "{vote:?}");
    assert_eq!(rig.runtimes.count("a", "prepare"), 0);
    // Both on the parent: prepared and committed.
    rig.runtimes.set_stack("b", vec![p1.clone()]);
    assert!(rig.participant.handle(Command::new(Kind::Prepare, "r3", p2.clone(), 1)).await.expect("admitted").ok);
    assert!(rig.participant.handle(Command::new(Kind::Commit, "r3", p2.clone(), 1)).await.expect("admitted").ok);
    // A build's first patch (no parent) needs an empty stack.
    let vote = rig.participant.handle(Command::new(Kind::Prepare, "r4", orphan.id(), 1)).await.expect("admitted");
    assert!(!vote.ok && vote.processes.iter().all(|o| o.error.contains("parent none")), "{vote:?}");
    assert_eq!(rig.runtimes.count("a", "prepare"), 1, "only the fitting prepare reached a runtime");
}

#[tokio::test]
async fn a_process_that_cannot_say_its_stack_gets_nothing_prepared() {
    let rig = rig(&["a", "b"]);
    rig.runtimes.script("b", "status", Behaviour::Vanish);
    let vote = rig.run(Kind::Prepare).await;
    assert!(!vote.ok, "{vote:?}");
    assert!(vote.processes.iter().any(|o| o.process_id == "b" && o.error.contains("cannot read")), "{vote:?}");
    assert_eq!(rig.runtimes.count("a", "prepare"), 0);
}

#[tokio::test]
async fn an_aborted_pair_cannot_be_prepared_or_committed_again() {
    let rig = rig(&["a"]);
    assert!(rig.run(Kind::Prepare).await.ok);
    assert!(rig.run(Kind::Abort).await.ok);
    for kind in [Kind::Prepare, Kind::Commit] {
        let err = rig.participant.handle(rig.cmd(kind, 1)).await.expect_err("replayed");
        assert!(
            matches!(err, ParticipantError::Replayed(_)) && err.to_string().contains("aborted or rolled back"),
            "{err}"
        );
    }
    assert_eq!(rig.runtimes.count("a", "prepare"), 1);
    assert_eq!(rig.runtimes.count("a", "commit"), 0);
    // Abort again is harmless (the coordinator's retry gets its first answer).
    assert!(rig.run(Kind::Abort).await.ok);
}

#[tokio::test]
async fn a_rolled_back_patch_is_not_replayed_under_its_rollout_even_if_rolled_back_under_another() {
    let rig = rig(&["a"]);
    assert!(rig.run(Kind::Prepare).await.ok);
    assert!(rig.run(Kind::Commit).await.ok);
    // Rolled back by a drift repair under an id of its own.
    let repair = Command::new(Kind::Rollback, "reconcile-1-1", rig.patch.clone(), 1);
    assert!(rig.participant.handle(repair).await.expect("rollback").ok);
    assert!(rig.runtimes.processes()[0].patch_stack.is_empty());
    for kind in [Kind::Prepare, Kind::Commit] {
        let err = rig.participant.handle(rig.cmd(kind, 1)).await.expect_err("replayed");
        assert!(matches!(err, ParticipantError::Replayed(_)), "{err}");
    }
    assert_eq!(rig.runtimes.count("a", "commit"), 1, "applied once, never again");
    // A new rollout of the same patch (the operator's decision) is not a replay.
    let again = Command::new(Kind::Prepare, "r2", rig.patch.clone(), 1);
    assert!(rig.participant.handle(again).await.expect("admitted").ok);
}

#[tokio::test]
async fn replays_are_refused_after_a_restart_that_forgot_the_answers() {
    let rig = rig(&["a"]);
    assert!(rig.run(Kind::Prepare).await.ok);
    assert!(rig.run(Kind::Commit).await.ok);
    let aborted = Command::new(Kind::Abort, "r2", rig.patch.clone(), 1);
    assert!(rig.participant.handle(aborted).await.expect("abort").ok);
    // The agent restarts: same data dir, no remembered answers.
    let patches = Arc::new(FakePatches::with(vec![bundle("2")]));
    let restarted = Arc::new(participant_in(rig.dir.path(), rig.runtimes.clone(), patches));
    assert_eq!(restarted.highest_epoch(), 1, "the learned epoch survives");
    for (rollout, kind, why) in [
        ("r1", Kind::Prepare, "committed on this node already"),
        ("r1", Kind::Commit, "committed on this node already"),
        ("r2", Kind::Prepare, "aborted or rolled back"),
        ("r2", Kind::Commit, "aborted or rolled back"),
    ] {
        let err = restarted.handle(Command::new(kind, rollout, rig.patch.clone(), 1)).await.expect_err("replayed");
        assert!(err.to_string().contains(why), "{rollout} {kind}: {err}");
    }
    assert_eq!(rig.runtimes.count("a", "prepare"), 1);
    assert_eq!(rig.runtimes.count("a", "commit"), 1);
}

#[tokio::test]
async fn a_prepare_naming_one_process_reaches_only_that_process() {
    let rig = rig(&["a", "b"]);
    let mut plan = rig.cmd(Kind::Prepare, 1);
    plan.process_id = "b".into();
    let vote = rig.participant.handle(plan.clone()).await.expect("admitted");
    assert!(vote.ok && vote.processes.len() == 1 && vote.processes[0].process_id == "b", "{vote:?}");
    assert_eq!((rig.runtimes.count("a", "prepare"), rig.runtimes.count("b", "prepare")), (0, 1));
    let abort = Command::new(Kind::Abort, plan.rollout_id.clone(), plan.patch_id.clone(), 1);
    assert!(rig.participant.handle(abort).await.expect("admitted").ok);
    assert_eq!(rig.runtimes.count("b", "abort"), 1, "the abort reaches the one that prepared");

    let mut stranger = Command::new(Kind::Prepare, "r9", plan.patch_id.clone(), 1);
    stranger.process_id = "zz".into();
    let vote = rig.participant.handle(stranger).await.expect("admitted");
    assert!(!vote.ok && vote.reason.contains("no process \"zz\""), "{vote:?}");
    assert_eq!(rig.runtimes.count("a", "prepare") + rig.runtimes.count("b", "prepare"), 1, "nothing more prepared");
}

#[tokio::test]
async fn a_rollback_of_a_node_whose_commit_never_arrived_drops_the_runtimes_prepared_copy() {
    // The coordinator rolls back every node a commit was sent to: a node
    // whose commit was lost on the way holds the patch prepared in its
    // runtimes, and they must be told to drop it, or the next prepare finds
    // a transaction still pending.
    let rig = rig(&["a", "b"]);
    assert!(rig.run(Kind::Prepare).await.ok);
    let answer = rig.run(Kind::Rollback).await;
    assert!(answer.ok, "{answer:?}");
    assert_eq!(answer.processes.len(), 2, "both holders answer: {answer:?}");
    assert!(rig.participant.prepared().is_empty());
    for p in ["a", "b"] {
        assert_eq!(rig.runtimes.count(p, "rollback"), 1, "process {p} was told to drop its prepared copy");
        assert_eq!(rig.runtimes.count(p, "commit"), 0);
    }
}

#[tokio::test]
async fn with_no_record_of_the_prepare_every_process_is_told_to_drop_it() {
    // A restarted agent has forgotten its prepares; its processes have not.
    let rig = rig(&["a", "b", "c"]);
    rig.runtimes.set_stack("a", vec![rig.patch.clone()]);
    let answer = rig.run(Kind::Rollback).await;
    assert!(answer.ok, "{answer:?}");
    assert_eq!(answer.processes.len(), 1, "only the undo is the rollback's answer: {answer:?}");
    for p in ["a", "b", "c"] {
        assert_eq!(rig.runtimes.count(p, "rollback"), 1, "process {p}");
    }
    let answer = rig.participant.handle(Command::new(Kind::Abort, "r2", rig.patch.clone(), 1)).await.expect("abort");
    assert!(answer.ok, "{answer:?}");
    for p in ["a", "b", "c"] {
        assert_eq!(rig.runtimes.count(p, "abort"), 1, "process {p}");
    }
}

#[tokio::test]
async fn a_cleanup_never_drops_a_prepare_another_rollout_holds() {
    let rig = rig(&["a", "b"]);
    assert!(rig.run(Kind::Prepare).await.ok);
    // Another rollout's abort of the same patch, with no record of its own.
    let answer =
        rig.participant.handle(Command::new(Kind::Abort, "r-other", rig.patch.clone(), 1)).await.expect("abort");
    assert!(answer.ok, "{answer:?}");
    for p in ["a", "b"] {
        assert_eq!(rig.runtimes.count(p, "abort"), 0, "process {p} holds r1's prepare");
    }
    assert_eq!(rig.participant.prepared().len(), 1);
    assert!(rig.run(Kind::Commit).await.ok, "r1 still commits");
}
