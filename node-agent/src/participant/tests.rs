//! The participant against in-memory runtimes and patches: each interleaving
//! the coordinator relies on, without a process or a socket.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use hotfleet_patch::{Bundle, Manifest, MANIFEST_FORMAT};
use hotfleet_proto::v1::ProcessHealth;

use super::*;
use crate::{
    patches::FetchError,
    runtimes::{LiveStatus, Process, Runtimes, Step, StepReply},
};

const BUILD: &str = "zone-1.0";

/// How a fake process answers one kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behaviour {
    Ok,
    /// Answers with a failure of its own.
    Fail,
    /// Disconnects instead of answering.
    Vanish,
    /// Answers once the test releases it.
    Wait,
}

/// Game processes in memory: scripted per (process, request), every call recorded.
pub(crate) struct FakeRuntimes {
    processes: Mutex<Vec<Process>>,
    script: Mutex<HashMap<(String, &'static str), Behaviour>>,
    calls: Mutex<Vec<(String, &'static str)>>,
    /// Permits for requests scripted to [`Behaviour::Wait`].
    pub release: tokio::sync::Semaphore,
    ever_connected: Mutex<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeRuntimes {
    pub(crate) fn new(ids: &[&str]) -> Arc<Self> {
        let processes = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Process {
                process_id: (*id).into(),
                pid: 100 + i as u32,
                build: BUILD.into(),
                ..Default::default()
            })
            .collect();
        Arc::new(Self {
            processes: Mutex::new(processes),
            script: Mutex::default(),
            calls: Mutex::default(),
            release: tokio::sync::Semaphore::new(0),
            ever_connected: Mutex::new(!ids.is_empty()),
        })
    }

    pub(crate) fn script(&self, process: &str, request: &'static str, behaviour: Behaviour) {
        lock(&self.script).insert((process.into(), request), behaviour);
    }

    pub(crate) fn connect(&self, process: Process) {
        *lock(&self.ever_connected) = true;
        lock(&self.processes).push(process);
    }

    pub(crate) fn disconnect(&self, process: &str) {
        lock(&self.processes).retain(|p| p.process_id != process);
    }

    pub(crate) fn set_stack(&self, process: &str, stack: Vec<String>) {
        for p in lock(&self.processes).iter_mut().filter(|p| p.process_id == process) {
            p.patch_stack = stack.clone();
        }
    }

    /// How many times `request` reached `process`.
    pub(crate) fn count(&self, process: &str, request: &str) -> usize {
        lock(&self.calls).iter().filter(|(p, r)| p == process && *r == request).count()
    }

    async fn behave(&self, process: &str, request: &'static str) -> Result<Behaviour, SessionError> {
        lock(&self.calls).push((process.into(), request));
        if !lock(&self.processes).iter().any(|p| p.process_id == process) {
            return Err(SessionError::Disconnected(process.into()));
        }
        let behaviour = lock(&self.script).get(&(process.to_string(), request)).copied().unwrap_or(Behaviour::Ok);
        match behaviour {
            Behaviour::Wait => {
                if let Ok(permit) = self.release.acquire().await {
                    permit.forget();
                }
                Ok(Behaviour::Ok)
            }
            Behaviour::Vanish => {
                self.disconnect(process);
                Err(SessionError::Disconnected(process.into()))
            }
            other => Ok(other),
        }
    }
}

#[async_trait]
impl Runtimes for FakeRuntimes {
    fn processes(&self) -> Vec<Process> {
        lock(&self.processes).clone()
    }

    fn any_connected_since_start(&self) -> bool {
        *lock(&self.ever_connected)
    }

    async fn step(&self, process_id: &str, step: Step, _timeout: Duration) -> Result<StepReply, SessionError> {
        let what = step.name();
        if self.behave(process_id, what).await? == Behaviour::Fail {
            return Ok(StepReply { ok: false, error: format!("{what} failed in {process_id}"), ..Default::default() });
        }
        let mut stack = lock(&self.processes)
            .iter()
            .find(|p| p.process_id == process_id)
            .map(|p| p.patch_stack.clone())
            .unwrap_or_default();
        match &step {
            Step::Commit { patch_id } => stack.push(patch_id.clone()),
            Step::Rollback { patch_id } => stack.retain(|id| id != patch_id),
            _ => {}
        }
        self.set_stack(process_id, stack.clone());
        Ok(StepReply { ok: true, patch_stack: stack, ..Default::default() })
    }

    async fn status(&self, process_id: &str, _timeout: Duration) -> Result<LiveStatus, SessionError> {
        self.behave(process_id, "status").await?;
        let stack = lock(&self.processes)
            .iter()
            .find(|p| p.process_id == process_id)
            .map(|p| p.patch_stack.clone())
            .unwrap_or_default();
        Ok(LiveStatus { patch_stack: stack, live_digests: HashMap::new() })
    }

    async fn health(&self, process_id: &str, _since: u64, _timeout: Duration) -> Result<ProcessHealth, SessionError> {
        self.behave(process_id, "health").await?;
        Ok(ProcessHealth { alive: true, game_ok: true, ..Default::default() })
    }
}

/// Verified bundles by id.
#[derive(Default)]
pub(crate) struct FakePatches {
    bundles: HashMap<String, Bundle>,
}

#[async_trait]
impl Patches for FakePatches {
    async fn fetch(&self, id: &str) -> Result<Bundle, FetchError> {
        self.bundles
            .get(id)
            .cloned()
            .ok_or_else(|| FetchError::Transport { id: id.into(), message: "not found".into() })
    }
}

pub(crate) fn bundle(body: &str) -> Bundle {
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        target_build: BUILD.into(),
        parent: None,
        packages: vec!["zone".into()],
        modules: vec![],
        author: "test".into(),
        created_at: "2026-12-01T00:00:00Z".into(),
        description: "test patch".into(),
    };
    Bundle::create(manifest, vec![("zone.combat".into(), format!("def f():\n    return {body}\n"))]).expect("bundle")
}

pub(crate) struct Rig {
    pub participant: Arc<Participant>,
    pub runtimes: Arc<FakeRuntimes>,
    pub patch: String,
    pub dir: tempfile::TempDir,
}

pub(crate) fn rig(processes: &[&str]) -> Rig {
    let dir = tempfile::tempdir().expect("tmp");
    let runtimes = FakeRuntimes::new(processes);
    let patch = bundle("2");
    let id = patch.id();
    let patches = FakePatches { bundles: HashMap::from([(id.clone(), patch)]) };
    let fence = EpochFence::load(dir.path()).expect("fence");
    let participant = Participant::new(
        "node-1".into(),
        runtimes.clone(),
        Arc::new(patches),
        fence,
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    Rig { participant: Arc::new(participant), runtimes, patch: id, dir }
}

/// Waits (bounded) until `done` holds.
pub(crate) async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

impl Rig {
    pub(crate) fn cmd(&self, kind: Kind, epoch: u64) -> Command {
        Command::new(kind, "r1", self.patch.clone(), epoch)
    }

    pub(crate) async fn run(&self, kind: Kind) -> Answer {
        self.participant.handle(self.cmd(kind, 1)).await.expect("admitted")
    }
}

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
    let mut prepare = rig.cmd(Kind::Prepare, 1);
    prepare.ttl = Duration::from_millis(30);
    assert!(rig.participant.handle(prepare).await.expect("prepare").ok);
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
