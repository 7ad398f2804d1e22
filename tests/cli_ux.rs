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

#[test]
fn patch_build_refuses_syntax_errors_and_an_overlay_base_removes_nothing() {
    let layout = Layout::for_workspace();
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("bad.hfpatch");
    let root = layout.repo.join("examples/patches/syntax-error");
    let args = ["patch", "build", "--root", &arg(&root), "--package", "zone", "--module", "zone.combat"];
    let (code, _, err) = run(&layout, &[&args[..], &["--target-build", BUILD, "--out", &arg(&out)]].concat());
    assert_eq!(code, 4, "refused: {err}");
    assert!(err.contains("zone.combat line ") && err.contains("do not compile with python3"), "{err}");
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

    // A dry run of a bundle the coordinator does not hold: refused, and nothing pushed.
    let path = bundle(&s.fleet.layout, s.dir.path(), "hotfix-damage", Some(&s.fleet.keys.secret));
    let (code, _, err) = cli(&["rollout", "start", &path, "--dry-run"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("a dry run pushes nothing") && err.contains("hotfleet patch push"), "{err}");
    let (_, patches, _) = cli(&["patch", "list"]);
    assert!(patches.trim().is_empty(), "the dry run pushed nothing: {patches}");

    let (code, pushed, err) = cli(&["patch", "push", &path]);
    assert_eq!(code, 0, "{err}");
    let id = pushed.split_whitespace().nth(2).expect("staged: patch ID").to_string();
    let waves = ["--canary", "1", "--waves", "10%,50%,100%"];
    let (code, plan, err) = cli(&[&["rollout", "start", &id, "--dry-run"], &waves[..]].concat());
    assert_eq!(code, 0, "{err}");
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
