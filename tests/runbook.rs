//! The runbook cannot drift: every command in `docs/runbook.md`'s `sh`
//! blocks runs here, through `sh`, against a local fleet of build 1.4.2,
//! exactly as written, after the substitutions below (placeholders an SRE
//! fills in, a shorter health window for the test's wall time). The story:
//! build and sign from a git range, stage, plan, roll out with a gate before
//! wave-2, abort at the gate (`rollout start --watch` then exits 3, as the
//! exit-code table says), freeze and unfreeze, read the audit log.

#[macro_use]
mod common;

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// The `sh` blocks' commands, continuation lines joined, comments dropped.
fn commands(markdown: &str) -> Vec<String> {
    let (mut out, mut inside, mut pending) = (Vec::new(), false, String::new());
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            inside = line.trim() == "```sh";
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

struct Shell<'a> {
    work: &'a Path,
    env: Vec<(String, String)>,
}

impl Shell<'_> {
    fn command(&self, line: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(line).current_dir(self.work);
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
    assert_eq!(commands(text), ["hotfleet a --b --c d", "hotfleet e"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runbook_command_runs_against_a_local_fleet() {
    let s = Scenario::start_game(Backend::Embedded, Game::ZoneServer, NODES, "1.4.2");
    let layout = &s.fleet.layout;
    let work = s.dir.path().join("sre");
    // `src` is a git work tree: v1.4.2 as deployed, HEAD with the fix.
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

    let tls = s.fleet.keys.tls.operator("sre");
    let path = format!("{}:{}", layout.bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let env = [
        ("PATH", path),
        ("HOTFLEET_COORDINATOR", s.fleet.coordinator_urls()),
        ("HOTFLEET_TLS_CA", tls.ca.display().to_string()),
        ("HOTFLEET_TLS_CERT", tls.cert.display().to_string()),
        ("HOTFLEET_TLS_KEY", tls.key.display().to_string()),
    ];
    let shell = Shell { work: &work, env: env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect() };

    let runbook = std::fs::read_to_string(layout.repo.join("docs/runbook.md")).expect("runbook");
    let listed = commands(&runbook);
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

/// The id of the active rollout once it waits at the gate before `step`.
fn wait_for_gate(shell: &Shell<'_>, step: &str) -> String {
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
