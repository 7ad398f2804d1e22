//! Issue 14 through the real `hotfleet` binary, as an SRE used to kubectl
//! meets it: a closed pipe, kubectl selectors, a dry run without side
//! effects, merged waves said out loud, `patch build` refusing what every
//! node would refuse, and the output layer (`-o json|yaml`, JSON errors).

#[macro_use]
mod common;

use std::{
    io::Read,
    path::Path,
    process::{Command, Stdio},
};

use common::*;

fn run(layout: &Layout, args: &[&str]) -> (i32, String, String) {
    let out = layout.cli_raw(args).expect("run hotfleet");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn arg(p: &Path) -> String {
    p.display().to_string()
}

/// A bundle of `examples/patches/NAME`'s `zone.combat` (offline), signed with `key` if given.
fn bundle(layout: &Layout, dir: &Path, name: &str, key: Option<&Path>) -> String {
    let out = dir.join(format!("{name}.hfpatch"));
    let root = layout.repo.join("examples/patches").join(name);
    let mut args: Vec<String> =
        ["patch", "build", "--package", "zone", "--module", "zone.combat", "--target-build", BUILD]
            .map(String::from)
            .into();
    args.extend(["--root".into(), arg(&root), "--out".into(), arg(&out)]);
    if let Some(key) = key {
        args.extend(["--key".into(), arg(key)]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = run(layout, &args);
    assert_eq!(code, 0, "{err}");
    arg(&out)
}

#[test]
fn a_closed_pipe_ends_the_cli_quietly() {
    let layout = Layout::for_workspace();
    let tmp = tempfile::tempdir().expect("tmp");
    // More source than a pipe buffers: some write surely comes after the reader left.
    let root = tmp.path().join("src");
    std::fs::create_dir_all(root.join("zone")).expect("mkdir");
    std::fs::write(root.join("zone/big.py"), "X = 1\n".repeat(40_000)).expect("write");
    let out = tmp.path().join("big.hfpatch");
    let args = ["patch", "build", "--root", &arg(&root), "--package", "zone", "--module", "zone.big"];
    let (code, _, err) = run(&layout, &[&args[..], &["--target-build", BUILD, "--out", &arg(&out)]].concat());
    assert_eq!(code, 0, "{err}");
    // `hotfleet patch show X --sources | head -1`: the reader goes away at once.
    let mut child = Command::new(layout.bin("hotfleet").expect("bin"))
        .args(["patch", "show", &arg(&out), "--sources"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let mut stderr = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read");
    let status = child.wait().expect("wait");
    assert!(stderr.is_empty(), "no panic, no message: {stderr}");
    use std::os::unix::process::ExitStatusExt;
    // Ended by SIGPIPE like any Unix tool (a shell reports 141).
    assert_eq!(status.signal(), Some(13), "{status:?}");
}

/// A coordinator going away mid-call must be an error the CLI handles (a
/// watch reconnects), never SIGPIPE: the sockets are written with `writev`,
/// which raises it on a connection the peer has just closed. Found as a
/// `rollout watch` that died silently (killed by a signal, no output) when
/// the leader it watched was stopped.
#[test]
fn the_cli_ignores_sigpipe_while_it_talks_to_a_coordinator() {
    let layout = Layout::for_workspace();
    // A "coordinator" that takes the connection and never answers: the CLI waits.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", silent.local_addr().expect("addr"));
    let mut child = Command::new(layout.bin("hotfleet").expect("bin"))
        .args(["--insecure", "--coordinator", &url, "rollout", "watch", "ro-1-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let _held = silent.accept().expect("the CLI connects");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("proc status");
    let _ = child.kill();
    let _ = child.wait();
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .expect("SigIgn in /proc/PID/status");
    assert_ne!(ignored & (1 << (13 - 1)), 0, "SIGPIPE (13) is ignored: SigIgn {ignored:#x}");
}

#[test]
fn patch_build_refuses_syntax_errors_and_an_overlay_base_removes_nothing() {
    let layout = Layout::for_workspace();
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("bad.hfpatch");
    let root = layout.repo.join("examples/patches/syntax-error");
    let args = ["patch", "build", "--root", &arg(&root), "--package", "zone", "--module", "zone.combat"];
    let (code, _, err) = run(&layout, &[&args[..], &["--target-build", BUILD, "--out", &arg(&out)]].concat());
    assert_eq!(code, 4, "refused: {err}");
    // The default interpreter is $HOTFLEET_PYTHON when set (the test script sets a full path), else python3.
    assert!(err.contains("zone.combat line ") && err.contains("do not compile with "), "{err}");
    assert!(!out.exists(), "nothing written");

    let (code, _, err) = run(
        &layout,
        &[&args[..], &["--python", "/nonexistent/python", "--target-build", BUILD, "--out", &arg(&out)]].concat(),
    );
    assert_eq!(code, 4);
    assert!(err.contains("--python"), "{err}");

    // A root of just the changed file against the deployed tree: one module, no "removed" noise.
    let overlay = layout.repo.join("examples/patches/hotfix-damage");
    let base = layout.repo.join("examples/zone_server");
    let args = ["patch", "build", "--root", &arg(&overlay), "--base", &arg(&base), "--package", "zone"];
    let (code, built, err) = run(&layout, &[&args[..], &["--target-build", BUILD, "--out", &arg(&out)]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(built.contains("zone.combat") && !err.contains("removed"), "{built}\n{err}");
}

#[test]
fn an_invalid_selector_is_refused_before_anything_is_sent() {
    let layout = Layout::for_workspace();
    // Nothing listens there: the refusal comes first.
    for (selector, why) in [("zone in a", "parenthesised"), ("=eu", "no label key"), ("zone=a,zone=b", "twice")] {
        let (code, _, err) = run(&layout, &["--coordinator", "http://127.0.0.1:9", "nodes", "list", "-l", selector]);
        assert_eq!(code, 4, "{selector}: {err}");
        assert!(err.contains("invalid selector") && err.contains(why), "{selector}: {err}");
    }
}

on_both_stores!(selectors_dry_run_and_merged_waves,);

/// One small fleet for the read-mostly checks: kubectl selectors, the empty
/// match, a dry run that stores and pushes nothing, merged waves, and the
/// unknown-build warning of `patch build`.
async fn selectors_dry_run_and_merged_waves(backend: Backend) {
    let s = Scenario::start_game(backend, Game::ZoneServer, 3, BUILD);
    let cli = |args: &[&str]| {
        let out = s.fleet.cli(args).expect("cli");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let node_lines = |out: &str| out.lines().filter(|l| l.starts_with("node-")).map(String::from).collect::<Vec<_>>();

    let (code, all, err) = cli(&["nodes", "list"]);
    assert_eq!(code, 0, "{err}");
    let eu = node_lines(&all).iter().filter(|l| l.contains("region=eu")).count();
    for (selector, want) in [
        ("region!=eu", 3 - eu),
        ("region==eu", eu),
        ("region in (eu,us)", 3),
        ("region notin (eu)", 3 - eu),
        ("zone", 3),
        ("!zone", 0),
    ] {
        let (code, out, err) = cli(&["nodes", "list", "-l", selector]);
        assert_eq!(code, 0, "{selector}: {err}");
        assert_eq!(node_lines(&out).len(), want, "{selector}: {out}");
        if selector == "region!=eu" {
            assert!(node_lines(&out).iter().all(|l| !l.contains("region=eu")), "{out}");
        }
    }
    let (_, out, _) = cli(&["nodes", "list", "--selector", "region=ue"]);
    assert_eq!(out.trim(), "no node matches region=ue (3 nodes registered)");

    // A dry run of a bundle the coordinator does not hold: the plan, and nothing pushed.
    let path = bundle(&s.fleet.layout, s.dir.path(), "hotfix-damage", Some(&s.fleet.keys.secret));
    let waves = ["--canary", "1", "--waves", "10%,50%,100%"];
    let (code, local_plan, err) = cli(&[&["rollout", "start", &path, "--dry-run"], &waves[..]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(local_plan.starts_with("plan (dry run: nothing started, nothing pushed)"), "{local_plan}");
    assert!(!local_plan.contains("ro-"), "no rollout id: {local_plan}");
    let (_, patches, _) = cli(&["patch", "list"]);
    assert!(patches.trim().is_empty(), "the dry run pushed nothing: {patches}");
    // A local bundle that does not verify is refused before anything is sent.
    let broken = s.dir.path().join("broken.hfpatch");
    std::fs::write(&broken, b"not a bundle").expect("write");
    let (code, _, err) = cli(&["rollout", "start", &arg(&broken), "--dry-run"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("is not a valid patch"), "{err}");

    let (code, pushed, err) = cli(&["patch", "push", &path]);
    assert_eq!(code, 0, "{err}");
    let id = pushed.split_whitespace().nth(2).expect("staged: patch ID").to_string();
    // The 12 digits `nodes list` shows stand for the whole id.
    let (code, plan, err) = cli(&[&["rollout", "start", &id[..12], "--dry-run"], &waves[..]].concat());
    assert_eq!(code, 0, "{err}");
    assert_eq!(plan, local_plan, "the stored patch plans as its local bundle did");
    assert!(plan.starts_with("plan (dry run: nothing started, nothing pushed)"), "{plan}");
    assert!(!plan.contains("ro-"), "no rollout id: {plan}");
    let steps: Vec<&str> = plan.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(steps, ["plan", "canary", "wave-1", "wave-3", "note"], "{plan}");
    assert!(
        plan.contains("note     wave-2 (50%) adds no node to the 2 target(s) after the canary: merged into wave-3"),
        "{plan}"
    );

    let (code, _, err) =
        cli(&[&["rollout", "start", &id, "--dry-run", "--pause-before", "wave-2"], &waves[..]].concat());
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("unknown step \"wave-2\"") && err.contains("merged into wave-3"), "{err}");
    let (_, rollouts, _) = cli(&["rollout", "list"]);
    assert!(rollouts.trim().is_empty(), "dry runs store no rollout: {rollouts}");

    // A build no node runs: built all the same, with a warning.
    let out = s.dir.path().join("typo.hfpatch");
    let root = s.fleet.layout.repo.join("examples/patches/hotfix-damage");
    let args = ["patch", "build", "--root", &arg(&root), "--package", "zone", "--module", "zone.combat"];
    let (code, _, err) = cli(&[&args[..], &["--target-build", "zone-9.9", "--out", &arg(&out)]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: no node of the coordinator runs build zone-9.9") && err.contains(BUILD), "{err}");
    let (code, _, err) = cli(&[&args[..], &["--target-build", BUILD, "--out", &arg(&out)]].concat());
    assert_eq!(code, 0);
    assert!(!err.contains("warning"), "{err}");
}

/// `hotfleet ARGS` against the scenario's fleet with stdout on a terminal
/// (`script` gives it a pty); what the terminal received.
fn on_a_terminal(s: &Scenario, args: &[&str]) -> String {
    let mut command =
        vec![arg(&s.fleet.layout.bin("hotfleet").expect("bin")), "--coordinator".into(), s.fleet.coordinator_urls()];
    command.extend(s.fleet.layout.cli_flags.iter().cloned());
    command.extend(args.iter().map(|a| a.to_string()));
    let out = Command::new("script").args(["-qec", &command.join(" "), "/dev/null"]).output().expect("script");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `rollout watch` on a terminal: the health window counts down every
/// second, though the coordinator sends a snapshot only when the rollout
/// changes (the tree is redrawn from the last one).
#[test]
fn watch_on_a_terminal_counts_the_health_window_down() {
    let mut s = Scenario::start_game(Backend::Embedded, Game::ZoneServer, 2, BUILD);
    let patch = s.push("hotfix-damage");
    let started =
        ok(s.fleet.cli(&["rollout", "start", &patch, "--canary", "1", "--health-window", "4s"]).expect("cli"));
    let id = started.split_whitespace().nth(2).expect("started rollout ID").to_string();
    let drawn = on_a_terminal(&s, &["rollout", "watch", &id]);
    assert!(drawn.contains("COMPLETED"), "{drawn}");
    // Each countdown value drawn, in order, once per run of equal values.
    let mut shown: Vec<&str> = drawn
        .split("(health window 4s, ")
        .skip(1)
        .filter_map(|rest| rest.split_once(" left)").map(|(left, _)| left))
        .collect();
    shown.dedup();
    for left in ["3s", "2s", "1s"] {
        assert!(shown.contains(&left), "the countdown moves every second, not only per snapshot: {shown:?}\n{drawn}");
    }
}

/// Every command's `-o json` against its schema in `docs/schemas/` (checked
/// by `scripts/check_json_schema.py` with the `jsonschema` package), a
/// failure's JSON on stderr, and `-o yaml` reading back as the same object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_prints_json_matching_its_schema() {
    let s = Scenario::start_game(Backend::Embedded, Game::ZoneServer, 3, BUILD);
    let mut checked: Vec<serde_json::Value> = Vec::new();
    let mut check = |kind: &str, args: &[&str], layout: Option<&Layout>| -> String {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let out = match layout {
            Some(layout) => layout.cli_raw(&full),
            None => s.fleet.cli(&full),
        }
        .expect("cli");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let printed = if kind == "Error" {
            assert!(!out.status.success(), "{args:?} fails");
            stderr
        } else {
            assert!(out.status.success(), "{args:?}: {stderr}");
            stdout
        };
        checked.push(serde_json::json!({"command": args.join(" "), "kind": kind, "json": printed}));
        printed
    };
    let offline = Layout::for_workspace();
    let keys = s.dir.path().join("keys-json");
    check("KeyPair", &["keygen", "--out", &arg(&keys)], Some(&offline));
    let root = s.fleet.layout.repo.join("examples/patches/hotfix-damage");
    let bundle = s.dir.path().join("fix.hfpatch");
    let build = ["patch", "build", "--root", &arg(&root), "--package", "zone", "--module", "zone.combat"];
    check("Bundle", &[&build[..], &["--target-build", BUILD, "--out", &arg(&bundle)]].concat(), Some(&offline));
    let key = arg(&s.fleet.keys.secret);
    check("Bundle", &["patch", "sign", &arg(&bundle), "--key", &key], Some(&offline));
    check("Bundle", &["patch", "verify", &arg(&bundle), "--trusted-key", &arg(&s.fleet.keys.public)], Some(&offline));
    check("Bundle", &["patch", "show", &arg(&bundle), "--sources"], Some(&offline));
    let pushed: serde_json::Value =
        serde_json::from_str(&check("PushResult", &["patch", "push", &arg(&bundle)], None)).expect("json");
    let patch = pushed["patch"]["patchId"].as_str().expect("patch id").to_string();
    check("PatchList", &["patch", "list"], None);
    check("NodeList", &["nodes", "list"], None);
    check("NodesSummary", &["nodes", "list", "--summary"], None);
    check("Rollout", &["rollout", "start", &patch, "--dry-run"], None);
    let start = ["rollout", "start", &patch, "--canary", "1", "--health-window", "300ms", "--pause-before", "wave-1"];
    let started: serde_json::Value = serde_json::from_str(&check("Rollout", &start, None)).expect("json");
    let id = started["rolloutId"].as_str().expect("rollout id").to_string();
    s.wait_until(&id, "the gate", |r| r["waitingReason"].as_str().is_some_and(|w| w.contains("gate before wave-1")));
    check("Rollout", &["rollout", "status", &id], None);
    check("Rollout", &["rollout", "describe", &id], None);
    check("RolloutList", &["rollout", "list"], None);
    // Text: why it waits; the spec's windows as flags take them; the fleet's freeze.
    let text = |args: &[&str]| ok(s.fleet.cli(args).expect("cli"));
    let status = text(&["rollout", "status", &id]);
    assert!(status.contains("WAITING  (waiting: manual gate before wave-1 (hotfleet rollout promote))"), "{status}");
    let described = text(&["rollout", "describe", &id]);
    for part in ["health window 300ms", "step deadline 1m", "selector all", "events:", "staged by sre"] {
        assert!(described.contains(part), "{part}: {described}");
    }
    check("Freeze", &["freeze", "--reason", "schema test"], None);
    let listed = text(&["rollout", "list"]);
    assert!(listed.starts_with("fleet    FROZEN by sre: schema test"), "{listed}");
    check("Freeze", &["unfreeze"], None);
    check("Rollout", &["rollout", "pause", &id], None);
    check("Rollout", &["rollout", "resume", &id], None);
    check("Rollout", &["rollout", "promote", &id], None);
    check("Rollout", &["rollout", "watch", &id], None);
    // `watch` on a terminal draws the tree with per-step progress; piped, plain lines.
    let piped = text(&["rollout", "watch", &id]);
    assert!(!piped.contains("├─") && !piped.contains('\x1b'), "{piped}");
    let drawn = on_a_terminal(&s, &["rollout", "watch", &id]);
    for part in ["├─ canary   [##########] 1/1  done", "└─ wave-1   [##########] 2/2  done"] {
        assert!(drawn.contains(part), "{part}: {drawn}");
    }
    let listed = text(&["rollout", "list"]);
    assert!(listed.contains(&id) && listed.contains(" nodes 3 "), "finished rollouts count their nodes: {listed}");
    // A unique prefix stands for the id; a typo is answered with the nearest.
    let prefix = &id[..id.len() - 1];
    let shown = s.fleet.cli(&["rollout", "status", prefix]).expect("status");
    assert!(String::from_utf8_lossy(&shown.stdout).contains(&format!("rollout  {id}  COMPLETED")), "{shown:?}");
    let typo = format!("{prefix}9");
    let missing = s.fleet.cli(&["rollout", "describe", &typo]).expect("describe");
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(4), "{err}");
    assert!(err.contains(&format!("rollout \"{typo}\" not found; did you mean {id}?")), "{err}");
    check("AuditPage", &["audit", "--limit", "5"], None);
    check("Leader", &["leader"], None);
    check("WhoAmI", &["auth", "whoami"], None);
    // Its agent still runs (and registers again): the answer says so.
    check("NodeRemoval", &["nodes", "remove", "node-3"], None);
    check("Error", &["rollout", "status", "ro-9-9"], None);
    check("Error", &["nodes", "list", "-l", "zone in a"], Some(&offline));

    // -o yaml is the same object: a static one, and an error.
    let yaml_of = |args: &[&str]| {
        let out = offline.cli_raw(&[&["-o", "yaml"], args].concat()).expect("cli");
        let text = if out.status.success() { out.stdout } else { out.stderr };
        String::from_utf8_lossy(&text).into_owned()
    };
    let show = ["patch", "show", &arg(&bundle), "--sources"];
    let json = String::from_utf8_lossy(&offline.cli_raw(&[&["-o", "json"], &show[..]].concat()).expect("cli").stdout)
        .into_owned();
    checked.push(
        serde_json::json!({"command": "patch show (yaml)", "kind": "Bundle", "json": json, "yaml": yaml_of(&show)}),
    );
    let bad = ["nodes", "list", "-l", "=eu"];
    let json = String::from_utf8_lossy(&offline.cli_raw(&[&["-o", "json"], &bad[..]].concat()).expect("cli").stderr)
        .into_owned();
    checked.push(serde_json::json!({"command": "error (yaml)", "kind": "Error", "json": json, "yaml": yaml_of(&bad)}));

    let list = s.dir.path().join("checked.json");
    std::fs::write(&list, serde_json::to_vec(&checked).expect("encode")).expect("write");
    let script = s.fleet.layout.repo.join("scripts/check_json_schema.py");
    let python = std::env::var("HOTFLEET_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python).arg(script).arg(&list).output().expect("run the schema check");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schema check failed (needs `pip install jsonschema pyyaml`):\n{report}");
}

#[test]
fn completion_scripts_and_the_man_page_come_from_the_clap_definitions() {
    let layout = Layout::for_workspace();
    for (shell, marker) in
        [("bash", "complete -F _hotfleet"), ("zsh", "#compdef hotfleet"), ("fish", "complete -c hotfleet")]
    {
        let (code, script, err) = run(&layout, &["completion", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(script.contains(marker), "{shell}: {}", &script[..script.len().min(300)]);
        assert!(script.contains("rollout") && script.contains("describe"), "{shell} knows the subcommands");
    }
    let (code, page, err) = run(&layout, &["man"]);
    assert_eq!(code, 0, "{err}");
    assert!(page.contains(".TH hotfleet 1") && page.contains("completion"), "{}", &page[..page.len().min(300)]);
    let (code, _, err) = run(&layout, &["completion", "tcsh"]);
    assert_eq!(code, 2, "an unknown shell is a usage error: {err}");
}
