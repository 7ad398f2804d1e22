//! Issue 13 on a real fleet: the patch stack of a build is the fleet's
//! desired state. A completed rollout puts its patch on the stack, which
//! `hotfleet patch stack` lists with who rolled it out and when; a patch
//! whose parent is not the top is refused at `rollout start`, naming the
//! top, and changes nothing. Both stores.
//!
//! Ends with the consistency check of `common`.

#[macro_use]
mod common;

use common::*;

on_both_stores!(the_stack_lists_who_rolled_out_each_patch_and_refuses_a_patch_off_its_top);

fn stack(s: &Scenario) -> serde_json::Value {
    let out = ok(s.fleet.cli(&["--output", "json", "patch", "stack", "--build", BUILD]).expect("patch stack"));
    serde_json::from_str(&out).expect("stack json")
}

async fn the_stack_lists_who_rolled_out_each_patch_and_refuses_a_patch_off_its_top(backend: Backend) {
    let mut s = Scenario::start_game(backend, Game::ZoneServer, 2, BUILD);
    assert_eq!(stack(&s), serde_json::json!([]), "a fresh build's stack is empty");
    let hotfix = s.push("hotfix-damage");
    let (code, done) = s.watch(&s.start_rollout(&hotfix, "1s"));
    assert_eq!(code, 0, "{done}");

    let listed = stack(&s);
    let entries = listed.as_array().expect("a list");
    assert_eq!(entries.len(), 1, "{listed}");
    let top = &entries[0];
    assert_eq!(top["patchId"], hotfix.as_str());
    assert_eq!(top["rolloutId"], done["rolloutId"]);
    assert_eq!(top["rolledOutBy"], done["createdBy"], "who started the rollout: {listed}");
    assert!(!top["rolledOutBy"].as_str().unwrap_or_default().is_empty(), "{listed}");
    assert!(top["modules"].as_array().is_some_and(|m| !m.is_empty()), "{listed}");
    let text = ok(s.fleet.cli(&["patch", "stack", "--build", BUILD]).expect("patch stack"));
    assert!(text.contains(&hotfix[..12]) && text.contains("1 patch(es)"), "{text}");

    // A build's first patch (no parent) cannot go on top of the hotfix: refused, naming the top.
    let orphan = s.push("slow-tick");
    let out = s.fleet.cli(&["rollout", "start", &orphan]).expect("rollout start");
    assert!(!out.status.success(), "refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("parent none") && err.contains(&format!("--parent {hotfix}")), "{err}");
    let rollouts = ok(s.fleet.cli(&["--output", "json", "rollout", "list"]).expect("list"));
    assert!(!rollouts.contains(&orphan), "nothing was started: {rollouts}");
    assert_eq!(stack(&s), listed, "the stack is unchanged");

    assert_eq!(s.assert_consistent(&[]).await, vec![hotfix]);
}
