//! The participant's revert and rebase: which processes take them, the
//! refusals naming the patches in the way, and the revert's own steps.

use super::*;
use crate::testing::{bundle_on, bundle_touching, rig_with};

fn cmd(kind: Kind, rollout: &str, patch: &str, rollout_kind: RolloutKind) -> Command {
    Command::new(kind, rollout, patch, 1).of_kind(rollout_kind)
}

/// p1 (zone.combat) <- p2 (zone.chat) <- p3 (zone.combat): p2 is independent of p1, p3 is not.
fn three() -> [hotfleet_patch::Bundle; 3] {
    let p1 = bundle_on("1", None);
    let p2 = bundle_touching("2", Some(&p1.id()), "zone.chat");
    let p3 = bundle_touching("3", Some(&p2.id()), "zone.combat");
    [p1, p2, p3]
}

#[tokio::test]
async fn a_revert_goes_only_to_processes_that_run_the_patch_and_takes_it_off() {
    let [p1, p2, p3] = three();
    let (id1, id2) = (p1.id(), p2.id());
    let rig = rig_with(&["a", "b"], vec![p2, p1, p3]);
    rig.runtimes.set_stack("a", vec![id1.clone(), id2.clone()]);
    let vote = rig.participant.handle(cmd(Kind::Prepare, "rv", &id2, RolloutKind::Revert)).await.expect("admitted");
    assert!(vote.ok, "{vote:?}");
    assert_eq!((rig.runtimes.count("a", "revert-prepare"), rig.runtimes.count("b", "revert-prepare")), (1, 0));
    assert_eq!(rig.runtimes.count("a", "prepare"), 0, "no patch prepare: the runtime stages the revert itself");
    let done = rig.participant.handle(cmd(Kind::Commit, "rv", &id2, RolloutKind::Revert)).await.expect("admitted");
    assert!(done.ok && done.processes.len() == 1, "{done:?}");
    assert_eq!(rig.runtimes.processes()[0].patch_stack, std::slice::from_ref(&id1));
    // Its rollback undoes the revert (every process is asked; each knows whether it holds one).
    let undo = rig.participant.handle(cmd(Kind::Rollback, "rv", &id2, RolloutKind::Revert)).await.expect("admitted");
    assert!(undo.ok, "{undo:?}");
    assert_eq!(rig.runtimes.count("a", "revert-rollback"), 1);
    assert_eq!(rig.runtimes.count("a", "rollback"), 0, "never a rollback of the patch beneath");
    assert_eq!(rig.runtimes.processes()[0].patch_stack, [id1, id2]);
}

#[tokio::test]
async fn a_deeper_revert_is_refused_naming_the_patches_above_that_touch_its_modules() {
    let [p1, p2, p3] = three();
    let (id1, id2, id3) = (p1.id(), p2.id(), p3.id());
    let rig = rig_with(&["a"], vec![p1, p2, p3]);
    rig.runtimes.set_stack("a", vec![id1.clone(), id2.clone()]);
    // p2 (zone.chat) above p1 (zone.combat): independent, allowed.
    let vote = rig.participant.handle(cmd(Kind::Prepare, "r1", &id1, RolloutKind::Revert)).await.expect("admitted");
    assert!(vote.ok, "{vote:?}");
    rig.participant.handle(cmd(Kind::Abort, "r1", &id1, RolloutKind::Revert)).await.expect("admitted");
    assert_eq!(rig.runtimes.count("a", "revert-abort"), 1, "a revert's prepare is dropped as a revert");
    // p3 touches zone.combat too: refused, naming p3, nothing prepared.
    rig.runtimes.set_stack("a", vec![id1.clone(), id2.clone(), id3.clone()]);
    let vote = rig.participant.handle(cmd(Kind::Prepare, "r2", &id1, RolloutKind::Revert)).await.expect("admitted");
    assert!(!vote.ok && vote.reason.contains("the revert of patch"), "{vote:?}");
    let error = &vote.processes[0].error;
    assert!(
        error.contains(&id3[..12]) && !error.contains(&id2[..12]) && error.contains("touch its modules"),
        "{error}"
    );
    assert_eq!(rig.runtimes.count("a", "revert-prepare"), 1, "only the allowed revert reached the runtime");
    assert!(rig.participant.prepared().is_empty());
}

#[tokio::test]
async fn a_rebased_patch_goes_above_independent_patches_only_when_the_command_says_rebase() {
    let [p1, p2, p3] = three();
    let (id1, id2) = (p1.id(), p2.id());
    // Built on p1, touching zone.loot: p2 (zone.chat) is not in its way.
    let loot = bundle_touching("4", Some(&id1), "zone.loot");
    // Built on p1, touching zone.chat: p2 is in its way.
    let chat = bundle_touching("5", Some(&id1), "zone.chat");
    let (loot_id, chat_id) = (loot.id(), chat.id());
    let rig = rig_with(&["a"], vec![p1, p2, p3, loot, chat]);
    rig.runtimes.set_stack("a", vec![id1.clone(), id2.clone()]);

    let plain = rig.participant.handle(cmd(Kind::Prepare, "r1", &loot_id, RolloutKind::Apply)).await.expect("admitted");
    assert!(!plain.ok && plain.reason.contains("parent is not the top"), "without rebase: {plain:?}");
    let vote = rig.participant.handle(cmd(Kind::Prepare, "r2", &loot_id, RolloutKind::Rebase)).await.expect("admitted");
    assert!(vote.ok, "{vote:?}");
    assert!(rig.participant.handle(cmd(Kind::Commit, "r2", &loot_id, RolloutKind::Rebase)).await.expect("commit").ok);
    assert_eq!(rig.runtimes.processes()[0].patch_stack, [id1, id2.clone(), loot_id]);

    let vote = rig.participant.handle(cmd(Kind::Prepare, "r3", &chat_id, RolloutKind::Rebase)).await.expect("admitted");
    assert!(!vote.ok, "{vote:?}");
    let error = &vote.processes[0].error;
    assert!(error.contains("rebase of patch") && error.contains(&id2[..12]), "{error}");
    assert_eq!(rig.runtimes.count("a", "prepare"), 1);
}
