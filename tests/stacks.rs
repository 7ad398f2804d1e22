//! Issue 13 on a real fleet: the patch stack of a build is the fleet's
//! desired state. A completed rollout puts its patch on the stack, which
//! `hotfleet patch stack` lists with who rolled it out and when; a patch
//! whose parent is not the top is refused at `rollout start`, naming the
//! top, and changes nothing. `hotfleet patch plan` asks one live zone
//! server for the runtime's plan and leaves it unchanged. A rollout
//! scheduled with `--at` waits, listed as scheduled, survives its leader
//! going away, starts within a second of its time; one cancelled before its
//! time sends nothing. A window closing mid-rollout pauses it and the next
//! window completes it (windows of seconds). `rollout revert` takes the top
//! off (players see the old damage again, stay connected; a zone server
//! restarted afterwards starts without it), or a deeper patch nothing above
//! depends on; a revert under a patch touching its modules is refused,
//! naming it, and changes nothing; `--rebase` puts a patch built on an
//! ancestor back on top. Both stores.
//!
//! Ends with the consistency check of `common`.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;

on_both_stores!(
    the_stack_lists_who_rolled_out_each_patch_and_refuses_a_patch_off_its_top,
    a_plan_from_a_live_zone_server_shows_the_changes_and_commits_nothing,
    a_scheduled_rollout_starts_on_time_after_its_leader_goes_away,
    a_window_closing_mid_rollout_pauses_it_and_the_next_window_completes_it,
    reverting_the_top_brings_the_old_behaviour_back_and_later_processes_start_without_it,
    a_deeper_independent_patch_is_reverted_and_one_a_later_patch_depends_on_is_refused,
);

/// The same on two coordinators sharing etcd: the leader is killed before
/// the start time and the follower that takes over starts the rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_rollout_starts_on_time_across_a_leader_fail_over() {
    a_scheduled_rollout_starts_on_time_after_its_leader_goes_away(Backend::Etcd { coordinators: 2 }).await
}

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

/// Each process's (stack, live digests), and whether the agent holds a prepare.
async fn live(s: &Scenario) -> Vec<(Vec<String>, Vec<(String, String)>, usize)> {
    s.agent_statuses()
        .await
        .into_iter()
        .flat_map(|n| {
            let prepared = n.prepared.len();
            n.processes.into_iter().map(move |p| {
                let mut digests: Vec<(String, String)> = p.live_digests.into_iter().collect();
                digests.sort();
                (p.patch_stack, digests, prepared)
            })
        })
        .collect()
}

async fn a_plan_from_a_live_zone_server_shows_the_changes_and_commits_nothing(backend: Backend) {
    let mut s = Scenario::start_game(backend, Game::ZoneServer, 2, BUILD);
    let hotfix = s.push("hotfix-damage");
    let before = live(&s).await;
    let damage = s.damages();
    let process = s.agent_statuses().await[0].processes[0].process_id.clone();

    let out = s.fleet.cli(&["--output", "json", "patch", "plan", &hotfix, "--node", "node-1", "--process", &process]);
    let plan: serde_json::Value = serde_json::from_str(&ok(out.expect("plan"))).expect("plan json");
    assert_eq!(
        (plan["ok"].as_bool(), plan["aborted"].as_bool(), plan["committed"].as_bool()),
        (Some(true), Some(true), Some(false)),
        "{plan}"
    );
    let processes = plan["processes"].as_array().expect("processes");
    assert_eq!(processes.len(), 1, "one process asked: {plan}");
    assert_eq!(processes[0]["processId"], process.as_str());
    let modules = processes[0]["plan"]["modules"].as_array().expect("the runtime's plan");
    assert!(!modules.is_empty(), "{plan}");
    let replaced: Vec<&serde_json::Value> =
        modules.iter().flat_map(|m| m["functions_replaced"].as_array().into_iter().flatten()).collect();
    assert!(!replaced.is_empty() && replaced.iter().all(|f| f["lineno"].as_u64().is_some()), "{plan}");

    let text = ok(s.fleet.cli(&["patch", "plan", &hotfix, "--node", "node-2"]).expect("plan"));
    assert!(text.contains("functions replaced") && text.contains("nothing committed"), "{text}");

    // A dry run shows the canary's plan too.
    let out =
        ok(s.fleet.cli(&["--output", "json", "rollout", "start", &hotfix, "--dry-run", "--plan-canary"]).expect("dry"));
    let dry: serde_json::Value = serde_json::from_str(&out).expect("dry run json");
    let canary = dry["rollout"]["steps"][0]["nodeIds"][0].as_str().expect("a canary node");
    assert_eq!(dry["canaryPlan"]["nodeId"], canary, "{dry}");
    assert_eq!(dry["canaryPlan"]["ok"], true, "{dry}");
    assert!(dry["canaryPlan"]["processes"][0]["plan"]["modules"].as_array().is_some_and(|m| !m.is_empty()), "{dry}");

    // Nothing changed: same stacks, same live code, nothing left prepared, same behaviour.
    assert_eq!(live(&s).await, before, "live digests identical before and after");
    assert_eq!(s.damages(), damage, "the old behaviour still runs");
    let audit = ok(s.fleet.cli(&["--output", "json", "audit"]).expect("audit"));
    assert!(audit.contains("patch.plan"), "audited: {audit}");

    // A plan the fleet cannot give: refused, nothing sent.
    let out = s.fleet.cli(&["patch", "plan", &hotfix, "--node", "node-1", "--process", "nope"]).expect("plan");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("has no process \"nope\" of build"), "{err}");
    let out = s.fleet.cli(&["patch", "plan", &hotfix, "--node", "node-9"]).expect("plan");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not found"));

    assert!(s.assert_consistent(&[]).await.is_empty(), "no patch on the stack");
}

/// Index of the coordinator that leads now (by its port in `hotfleet leader`).
fn leader_index(s: &Scenario) -> usize {
    let out = ok(s.fleet.cli(&["--output", "json", "leader"]).expect("leader"));
    let status: serde_json::Value = serde_json::from_str(&out).expect("leader json");
    let addr = status["leaderAddr"].as_str().unwrap_or_default().to_string();
    let port = |i: usize| format!(":{}", s.fleet.coordinators[i].addr.port());
    (0..s.fleet.coordinators.len()).find(|&i| addr.ends_with(&port(i))).unwrap_or(0)
}

fn rfc3339_in(ahead: Duration) -> (String, u64) {
    let at = time::OffsetDateTime::now_utc() + ahead;
    let ms = (at.unix_timestamp_nanos() / 1_000_000) as u64;
    (at.format(&time::format_description::well_known::Rfc3339).expect("format"), ms)
}

async fn a_scheduled_rollout_starts_on_time_after_its_leader_goes_away(backend: Backend) {
    let mut s = Scenario::start_game(backend, Game::ZoneServer, 2, BUILD);
    let before = s.damages();
    let hotfix = s.push("hotfix-damage");

    // Bad times change nothing.
    let out = s.fleet.cli(&["rollout", "start", &hotfix, "--at", "2020-01-01T00:00:00Z"]).expect("start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is in the past"), "{err}");
    let out = s.fleet.cli(&["rollout", "start", &hotfix, "--at", "tomorrow"]).expect("start");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("RFC 3339"));

    // Cancelled before its time: nothing is sent.
    let (later, _) = rfc3339_in(Duration::from_secs(600));
    let out = ok(s.fleet.cli(&["--output", "json", "rollout", "start", &hotfix, "--at", &later]).expect("start"));
    let cancelled =
        serde_json::from_str::<serde_json::Value>(&out).expect("json")["rolloutId"].as_str().expect("id").to_string();
    ok(s.fleet.cli(&["rollout", "cancel", &cancelled, "--reason", "not tonight"]).expect("cancel"));
    let (code, done) = s.watch(&cancelled);
    assert_eq!(code, 3, "{done}");
    assert!(done["reason"].as_str().unwrap_or_default().contains("cancelled: not tonight"), "{done}");
    assert!(node_states(&done).iter().all(|(_, desired, _)| desired == "none"), "nothing sent: {done}");

    let (at, at_ms) = rfc3339_in(Duration::from_secs(5));
    let args = [
        "--output",
        "json",
        "rollout",
        "start",
        &hotfix,
        "--at",
        &at,
        "--health-window",
        "1s",
        "--step-deadline",
        "20s",
    ];
    let out = ok(s.fleet.cli(&args).expect("start"));
    let id =
        serde_json::from_str::<serde_json::Value>(&out).expect("json")["rolloutId"].as_str().expect("id").to_string();
    assert_eq!(phase(&s.status(&id)), "scheduled");
    let listed = ok(s.fleet.cli(&["rollout", "list"]).expect("list"));
    let line = listed.lines().find(|l| l.starts_with(&id)).unwrap_or_default().to_string();
    assert!(line.contains("scheduled") && line.contains("starts 20"), "{listed}");

    // The leader goes away before the time; the next one (or the same one restarted) starts it.
    let leader = leader_index(&s);
    let dir = s.dir.path().to_path_buf();
    s.fleet.restart_coordinator_at(leader, &dir).expect("restart the leader");
    assert_eq!(phase(&s.status(&id)), "scheduled", "still waiting for its time");
    assert_eq!(s.damages(), before, "nothing changed before its time");

    let (code, done) = s.watch(&id);
    assert_eq!(code, 0, "{done}");
    let started_ms = event_at(&done, "scheduled start reached");
    let late = started_ms.saturating_sub(at_ms);
    assert!(started_ms >= at_ms && late < 1000, "started {late} ms after {at}");
    assert!(s.damages().iter().zip(&before).all(|(a, b)| a < b), "the hotfix runs");
    assert_eq!(s.assert_consistent(&[]).await, vec![hotfix]);
}

/// `HH:MM:SS` (UTC) of now + `ahead`, and that instant in Unix ms.
fn utc_time_in(ahead: Duration) -> (String, u64) {
    let at = time::OffsetDateTime::now_utc() + ahead;
    let text = format!("{:02}:{:02}:{:02}", at.hour(), at.minute(), at.second());
    let ms = (at.replace_nanosecond(0).expect("whole second").unix_timestamp_nanos() / 1_000_000) as u64;
    (text, ms)
}

fn event_at(rollout: &serde_json::Value, starting: &str) -> u64 {
    let event = rollout["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["message"].as_str().unwrap_or_default().starts_with(starting))
        .unwrap_or_else(|| panic!("no event {starting:?}: {rollout}"));
    event["atMs"].as_u64().expect("atMs")
}

async fn a_window_closing_mid_rollout_pauses_it_and_the_next_window_completes_it(backend: Backend) {
    let mut s = Scenario::start_game(backend, Game::ZoneServer, 2, BUILD);
    let before = s.damages();
    let hotfix = s.push("hotfix-damage");
    let (w1_open, _) = utc_time_in(Duration::from_secs(3));
    let (w1_close, w1_close_ms) = utc_time_in(Duration::from_secs(6));
    let (w2_open, w2_open_ms) = utc_time_in(Duration::from_secs(13));
    let (w2_close, _) = utc_time_in(Duration::from_secs(40));
    let (first, second) = (format!("{w1_open}-{w1_close}"), format!("{w2_open}-{w2_close}"));
    // Canary, then wave-1; the canary's 4 s health window outlasts the first window.
    let args = [
        "--output",
        "json",
        "rollout",
        "start",
        &hotfix,
        "--canary",
        "1",
        "--waves",
        "100%",
        "--health-window",
        "4s",
        "--step-deadline",
        "20s",
        "--window",
        &first,
        "--window",
        &second,
        "--window-tz",
        "UTC",
    ];
    let out = ok(s.fleet.cli(&args).expect("start"));
    let id =
        serde_json::from_str::<serde_json::Value>(&out).expect("json")["rolloutId"].as_str().expect("id").to_string();
    let waiting = s.status(&id);
    assert!(waiting["waitingReason"].as_str().unwrap_or_default().contains("outside its window"), "{waiting}");

    // The first window closes during the canary's health window: held before wave-1, not failed.
    let held = s.wait_until(&id, "held by its window after the canary", |r| {
        phase(r) == "waiting" && r["waitingReason"].as_str().unwrap_or_default().contains("outside its window")
    });
    assert_eq!(step_name(&held), "wave-1", "{held}");
    let (code, done) = s.watch(&id);
    assert_eq!(code, 0, "the next window completes it: {done}");
    let canary_at = event_at(&done, "canary: committing");
    let wave_at = event_at(&done, "wave-1: committing");
    assert!(canary_at < w1_close_ms, "the canary went in the first window");
    assert!(wave_at >= w2_open_ms, "wave-1 waited for the second window ({wave_at} < {w2_open_ms})");
    assert!(s.damages().iter().zip(&before).all(|(a, b)| a < b), "the hotfix runs everywhere");
    assert_eq!(s.assert_consistent(&[]).await, vec![hotfix]);
}

/// Runs `hotfleet rollout ARGS…` (json) with short windows and a lenient tick
/// gate (load on a shared CI machine is not what these tests judge); its id.
fn start_kind(s: &Scenario, verb: &str, patch: &str, extra: &[&str]) -> String {
    let mut args = vec!["--output", "json", "rollout", verb, patch, "--canary", "1", "--waves", "100%"];
    args.extend(["--health-window", "1s", "--step-deadline", "20s", "--tick-p99-floor", "250ms"]);
    args.extend(extra);
    let out = ok(s.fleet.cli(&args).expect("rollout"));
    serde_json::from_str::<serde_json::Value>(&out).expect("json")["rolloutId"].as_str().expect("id").to_string()
}

fn stack_ids(s: &Scenario) -> Vec<String> {
    stack(s).as_array().into_iter().flatten().map(|e| e["patchId"].as_str().unwrap_or_default().to_string()).collect()
}

/// A patch tree of the zone server's `module` (e.g. "players.py") as shipped
/// (or as `from` patches it), plus a harmless function appended: a patch of
/// that module that changes no behaviour a test measures.
fn tree_touching(s: &Scenario, name: &str, module: &str, from: Option<&str>) -> std::path::PathBuf {
    let repo = &s.fleet.layout.repo;
    let source = match from {
        Some(patch) => repo.join("examples/patches").join(patch).join("zone").join(module),
        None => repo.join("examples/zone_server/zone").join(module),
    };
    let text = std::fs::read_to_string(&source).expect("zone module");
    let root = s.dir.path().join("trees").join(name);
    std::fs::create_dir_all(root.join("zone")).expect("tree");
    let added = format!("{text}\n\ndef {}() -> str:\n    return {name:?}\n", name.replace('-', "_"));
    std::fs::write(root.join("zone").join(module), added).expect("write module");
    root
}

async fn reverting_the_top_brings_the_old_behaviour_back_and_later_processes_start_without_it(backend: Backend) {
    let mut s = Scenario::start_game(backend, Game::ZoneServer, 2, BUILD);
    let before = s.damages();
    let hotfix = s.push("hotfix-damage");
    let (code, done) = s.watch(&start_kind(&s, "start", &hotfix, &[]));
    assert_eq!(code, 0, "{done}");
    assert!(s.damages().iter().zip(&before).all(|(a, b)| a < b), "the hotfix runs");

    // The canary's plan of the revert says what it restores; nothing changes.
    let out = s.fleet.cli(&["--output", "json", "rollout", "revert", &hotfix, "--dry-run", "--plan-canary"]);
    let dry: serde_json::Value = serde_json::from_str(&ok(out.expect("dry run"))).expect("json");
    let notes = dry["canaryPlan"]["processes"][0]["plan"]["notes"].to_string();
    assert!(notes.contains("restores code, not instance data"), "{dry}");
    assert_eq!(dry["rollout"]["rolloutKind"], "revert", "{dry}");
    assert_eq!(stack_ids(&s), std::slice::from_ref(&hotfix), "a dry run changes nothing");

    let id = start_kind(&s, "revert", &hotfix, &[]);
    let (code, done) = s.watch(&id);
    assert_eq!(code, 0, "the revert completes: {done}");
    assert_eq!(done["rolloutKind"], "revert", "{done}");
    assert_eq!(s.damages(), before, "players see the old damage again");
    assert!(stack_ids(&s).is_empty(), "the build's stack no longer holds it");
    let listed = ok(s.fleet.cli(&["rollout", "list"]).expect("list"));
    let line = listed.lines().find(|l| l.starts_with(&id)).unwrap_or_default().to_string();
    assert!(line.contains("completed") && line.contains("revert"), "{listed}");
    let shown = ok(s.fleet.cli(&["rollout", "describe", &id]).expect("describe"));
    assert!(shown.contains("kind revert"), "{shown}");
    // Nothing left to revert: refused, naming the empty stack.
    let out = s.fleet.cli(&["rollout", "revert", &hotfix]).expect("revert");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is not on build") && err.contains("(it is empty)"), "{err}");
    // Every process runs the shipped code (digests), players stayed connected.
    assert!(s.assert_consistent(&[]).await.is_empty());

    // A zone server started after the revert gets the stack without it.
    let dir = s.dir.path().to_path_buf();
    s.pids[1] = s.fleet.restart_zone(1, &dir, &[]).expect("zone-2 restarted");
    assert_eq!(s.fleet.nodes[1].probe.hit_dummy().expect("first hit"), before[1], "the shipped damage");
    assert!(s.assert_consistent(&[]).await.is_empty(), "the restarted process runs the shipped code");
}

async fn a_deeper_independent_patch_is_reverted_and_one_a_later_patch_depends_on_is_refused(backend: Backend) {
    let mut s = Scenario::start_game(backend, Game::ZoneServer, 2, BUILD);
    let before = s.damages();
    // hotfix (combat) <- motd (players) <- combat-note (combat, on the hotfix's code).
    let hotfix = s.push("hotfix-damage");
    let motd_tree = tree_touching(&s, "motd", "players.py", None);
    let motd = s.push_tree_on(&motd_tree, "motd", Some(&hotfix));
    let note_tree = tree_touching(&s, "combat-note", "combat.py", Some("hotfix-damage"));
    let note = s.push_tree_on(&note_tree, "combat-note", Some(&motd));
    for patch in [&hotfix, &motd, &note] {
        let (code, done) = s.watch(&start_kind(&s, "start", patch, &[]));
        assert_eq!(code, 0, "{done}");
    }
    let fixed = s.damages();
    assert!(fixed.iter().zip(&before).all(|(a, b)| a < b), "the hotfix runs");
    let rollouts = ok(s.fleet.cli(&["--output", "json", "rollout", "list"]).expect("list"));

    // The hotfix is under combat-note, which touches its module: refused, naming it; nothing changes.
    let out = s.fleet.cli(&["rollout", "revert", &hotfix]).expect("revert");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&note[..12]) && err.contains("touch its modules"), "{err}");
    assert!(!err.contains(&motd[..12]), "motd touches other modules: not in the way: {err}");
    assert_eq!(ok(s.fleet.cli(&["--output", "json", "rollout", "list"]).expect("list")), rollouts, "nothing started");
    assert_eq!(stack_ids(&s), [hotfix.clone(), motd.clone(), note.clone()]);

    // motd is deeper but nothing above it touches players.py: reverted.
    let (code, done) = s.watch(&start_kind(&s, "revert", &motd, &[]));
    assert_eq!(code, 0, "{done}");
    assert_eq!(stack_ids(&s), [hotfix.clone(), note.clone()]);
    assert_eq!(s.damages(), fixed, "the patches above stay");
    assert_eq!(s.assert_consistent(&[]).await, [hotfix.clone(), note.clone()], "digests: motd is gone everywhere");
    // A zone server started now gets the stack without motd, though combat-note's
    // manifest names motd as its parent.
    let dir = s.dir.path().to_path_buf();
    s.pids[0] = s.fleet.restart_zone(0, &dir, &[]).expect("zone-1 restarted");
    assert_eq!(s.fleet.nodes[0].probe.hit_dummy().expect("first hit"), fixed[0], "the hotfix from its first hit");
    assert_eq!(s.assert_consistent(&[]).await, [hotfix.clone(), note.clone()], "the restarted process too");

    // motd is built on the hotfix, now below the top: only --rebase puts it back on.
    let out = s.fleet.cli(&["rollout", "start", &motd]).expect("start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("top of build"), "{err}");
    let (code, done) = s.watch(&start_kind(&s, "start", &motd, &["--rebase"]));
    assert_eq!(code, 0, "{done}");
    assert_eq!(done["rolloutKind"], "rebase", "{done}");
    assert_eq!(s.assert_consistent(&[]).await, [hotfix, note, motd]);
}
