//! The docs cannot drift: the commands in `docs/runbook.md` and the
//! README run here, through `sh`, against a local fleet of build 1.4.2,
//! exactly as written, after the substitutions below (placeholders an SRE
//! fills in, a shorter health window for the test's wall time).
//!
//! Which blocks run: every `sh` block of the runbook (all of them drive a
//! fleet); in the README only the blocks marked runnable with the fence info
//! string `sh runnable` (its other `sh` blocks install, build, benchmark or
//! start servers, which the local fleet stands in for).
//!
//! The runbook's story: build and sign from a git range, stage, plan, roll
//! out with a gate before wave-2, abort at the gate (`rollout start --watch`
//! then exits 3, as the exit-code table says), freeze and unfreeze, read the
//! audit log. The README's: who am I, build, stage, roll out to the end.

#[macro_use]
mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// The word in a fence's info string (after `sh`) that marks a README block runnable.
const RUNNABLE: &str = "runnable";

/// Which fenced blocks a document's test runs.
#[derive(Clone, Copy)]
enum Blocks {
    /// Every `sh` block (the runbook).
    AllSh,
    /// Only `sh runnable` blocks (the README).
    Runnable,
}

/// The commands of `which` blocks, continuation lines joined, comments dropped.
fn commands(markdown: &str, which: Blocks) -> Vec<String> {
    let (mut out, mut inside, mut pending) = (Vec::new(), false, String::new());
    for line in markdown.lines() {
        if let Some(info) = line.trim_start().strip_prefix("```") {
            let mut words = info.split_whitespace();
            let sh = words.next() == Some("sh");
            inside = sh
                && match which {
                    Blocks::AllSh => true,
                    Blocks::Runnable => words.any(|w| w == RUNNABLE),
                };
            continue;
        }
        if !inside {
            continue;
        }
        // A comment is "  # ..." after the command (none of the commands quote a '#').
        let code = line.split(" #").next().unwrap_or_default().trim_end();
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head.trim_end());
            pending.push(' ');
            continue;
        }
        pending.push_str(code.trim_start());
        let command = std::mem::take(&mut pending).split_whitespace().collect::<Vec<_>>().join(" ");
        if !command.is_empty() {
            out.push(command);
        }
    }
    out
}

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=sre", "-c", "user.email=sre@example.invalid"])
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("git");
    assert!(status.success(), "git {args:?}");
}

struct Shell {
    work: PathBuf,
    env: Vec<(String, String)>,
}

impl Shell {
    /// An SRE's working directory next to `s`'s fleet, acting as `operator`:
    /// `src` is a git work tree (v1.4.2 as deployed, HEAD with the fix),
    /// `keys/` holds the fleet's release key pair, and the environment names
    /// the coordinator and the operator's certificate.
    fn for_sre(s: &Scenario, operator: &str) -> Shell {
        let layout = &s.fleet.layout;
        let work = s.dir.path().join(operator);
        let src = work.join("src");
        std::fs::create_dir_all(&src).expect("mkdir");
        let copy = |from: &Path, to: &Path| {
            let status = Command::new("cp").arg("-r").arg(from).arg(to).status().expect("cp");
            assert!(status.success());
        };
        copy(&layout.repo.join("examples/zone_server/zone"), &src.join("zone"));
        git(&src, &["init", "-q"]);
        git(&src, &["add", "."]);
        git(&src, &["commit", "-qm", "1.4.2"]);
        git(&src, &["tag", "v1.4.2"]);
        copy(&layout.repo.join("examples/patches/hotfix-damage/zone/combat.py"), &src.join("zone/combat.py"));
        git(&src, &["commit", "-qam", "armor absorbs damage"]);
        std::fs::create_dir_all(work.join("keys")).expect("mkdir");
        std::fs::copy(&s.fleet.keys.public, work.join("keys/hotfleet.pub")).expect("trusted key");
        std::fs::copy(&s.fleet.keys.secret, work.join("keys/hotfleet.key")).expect("release key");

        let tls = s.fleet.keys.tls.operator(operator);
        let path = format!("{}:{}", layout.bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let env = [
            ("PATH", path),
            ("HOTFLEET_COORDINATOR", s.fleet.coordinator_urls()),
            ("HOTFLEET_TLS_CA", tls.ca.display().to_string()),
            ("HOTFLEET_TLS_CERT", tls.cert.display().to_string()),
            ("HOTFLEET_TLS_KEY", tls.key.display().to_string()),
        ];
        Shell { work, env: env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect() }
    }

    fn command(&self, line: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(line).current_dir(&self.work);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    fn run(&self, line: &str) -> Output {
        self.command(line).output().expect("sh")
    }

    fn spawn(&self, line: &str) -> Child {
        self.command(line).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("sh")
    }
}

#[test]
fn the_runbook_commands_parse_as_one_per_line() {
    let text = "x\n```sh\nhotfleet a --b \\\n    --c d   # why\nhotfleet e\n```\n`hotfleet not-a-block`\n";
    assert_eq!(commands(text, Blocks::AllSh), ["hotfleet a --b --c d", "hotfleet e"]);
    assert!(commands(text, Blocks::Runnable).is_empty(), "an unmarked block is not run from the README");
    let readme = "```sh\ncargo build\n```\n```sh runnable\nhotfleet a # why\n```\n```text runnable\nnot sh\n```\n";
    assert_eq!(commands(readme, Blocks::Runnable), ["hotfleet a"]);
    assert_eq!(commands(readme, Blocks::AllSh), ["cargo build", "hotfleet a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runbook_command_runs_against_a_local_fleet() {
    let s = Scenario::start_game(Backend::Embedded, Game::ZoneServer, NODES, "1.4.2");
    let layout = &s.fleet.layout;
    let shell = Shell::for_sre(&s, "sre");

    let runbook = std::fs::read_to_string(layout.repo.join("docs/runbook.md")).expect("runbook");
    let listed = commands(&runbook, Blocks::AllSh);
    assert!(listed.len() >= 12, "the runbook's commands: {listed:?}");
    let (mut patch_id, mut rollout_id, mut watching) = (String::new(), String::new(), None::<Child>);
    for written in &listed {
        let line = written
            .replace("/secure/hotfleet.key", &s.fleet.keys.secret.display().to_string())
            .replace("<patch-id>", &patch_id)
            .replace("<id>", &rollout_id)
            .replace("--health-window 60s", "--health-window 500ms");
        assert!(line.starts_with("hotfleet "), "every runbook command is a hotfleet command: {line}");
        if line.contains(" --watch") {
            // Held at the gate before wave-2 until the abort below.
            watching = Some(shell.spawn(&line));
            rollout_id = wait_for_gate(&shell, "wave-2");
            continue;
        }
        let out = shell.run(&line);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "runbook command failed: {written}\n{stdout}{stderr}");
        if line.starts_with("hotfleet patch push") {
            patch_id = stdout.split_whitespace().nth(2).expect("staged: patch ID").to_string();
        }
        if line.contains("--dry-run") {
            assert!(stdout.contains("wave-2") && !stdout.contains("note"), "6 nodes fit the runbook's waves: {stdout}");
        }
    }
    let watch = watching.expect("the runbook rolls out with --watch").wait_with_output().expect("watch");
    assert_eq!(watch.status.code(), Some(3), "aborted: exit 3 ({})", String::from_utf8_lossy(&watch.stderr));
    let audit = ok(shell.run("hotfleet audit --limit 50"));
    for action in ["patch.push", "rollout.start", "rollout.abort", "fleet.freeze", "fleet.unfreeze"] {
        assert!(audit.contains(action), "{action} audited: {audit}");
    }
}

/// The README's runnable block, as `oncall` (an operator, as the README's
/// alice is): the local fleet stands in for its set-up block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runnable_readme_command_runs_against_a_local_fleet() {
    let s = Scenario::start_game(Backend::Embedded, Game::ZoneServer, NODES, "1.4.2");
    let shell = Shell::for_sre(&s, "oncall");
    let readme = std::fs::read_to_string(s.fleet.layout.repo.join("README.md")).expect("README");
    let listed = commands(&readme, Blocks::Runnable);
    assert!(listed.len() >= 4, "the README's runnable commands: {listed:?}");
    let mut patch_id = String::new();
    for written in &listed {
        let line = written.replace("<patch-id>", &patch_id).replace("--health-window 30s", "--health-window 500ms");
        assert!(line.starts_with("hotfleet "), "every runnable README command is a hotfleet command: {line}");
        let out = shell.run(&line);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "README command failed: {written}\n{stdout}{stderr}");
        if line.starts_with("hotfleet auth whoami") {
            assert!(stdout.contains("oncall") && stdout.contains("operator"), "{stdout}");
        }
        if line.starts_with("hotfleet patch push") {
            patch_id = stdout.split_whitespace().nth(2).expect("staged: patch ID").to_string();
        }
        if line.contains(" --watch") {
            assert!(stdout.contains("COMPLETED"), "the README's rollout runs to the end: {stdout}");
        }
    }
    assert!(!patch_id.is_empty(), "the README stages a patch");
}

/// The id of the active rollout once it waits at the gate before `step`.
fn wait_for_gate(shell: &Shell, step: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let out = shell.run("hotfleet -o json rollout list --active");
        if let Ok(list) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            let waiting = list["items"].as_array().and_then(|items| {
                items.iter().find(|r| r["waitingReason"].as_str().is_some_and(|w| w.contains(step))).cloned()
            });
            if let Some(rollout) = waiting {
                return rollout["rolloutId"].as_str().expect("id").to_string();
            }
        }
        assert!(Instant::now() < deadline, "no rollout reached the gate before {step}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
