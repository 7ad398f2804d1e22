//! The participant against in-memory runtimes and patches: each interleaving
//! the coordinator relies on, without a process or a socket.

use std::{collections::HashMap, time::Duration};

use super::*;
use crate::testing::{rig, until, Behaviour, BUILD};

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
async fn an_older_epoch_is_refused_and_a_newer_one_raises_the_persisted_floor() {
    let rig = rig(&["a"]);
    rig.participant.handle(rig.cmd(Kind::Abort, 5)).await.expect("epoch 5");
    let err = rig.participant.handle(rig.cmd(Kind::Prepare, 4)).await.expect_err("epoch 4 after 5");
    assert!(matches!(err, ParticipantError::Epoch(EpochError::Stale { got: 4, highest: 5 })), "{err}");
    assert_eq!(rig.runtimes.count("a", "prepare"), 0, "a refused command reaches no runtime");
    rig.participant.handle(rig.cmd(Kind::Rollback, 9)).await.expect("epoch 9");
    assert_eq!(rig.participant.highest_epoch(), 9);
    assert_eq!(rig.participant.command_counts(), (2, 1));
    assert_eq!(EpochFence::load(rig.dir.path()).expect("reload").highest(), 9, "the floor survives a restart");
    // A leader's announced epoch fences too, before its first command.
    rig.participant.observe_epoch(12).expect("observe");
    assert!(rig.participant.handle(rig.cmd(Kind::Abort, 10)).await.is_err());
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
    assert!(!rig.run(Kind::Commit).await.ok, "nothing left to commit");
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
