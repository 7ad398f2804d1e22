//! In-memory doubles of the node's runtimes and patch source, shared by the
//! unit tests of the participant and of the reports.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use hotfleet_patch::{Bundle, Manifest, MANIFEST_FORMAT};
use hotfleet_proto::v1::ProcessHealth;

use crate::{
    command::{Answer, Command, Kind},
    epoch::EpochFence,
    finished::Finished,
    lock,
    participant::Participant,
    patches::{FetchError, Patches},
    runtimes::{LiveStatus, Process, Runtimes, Step, StepReply},
    sessions::SessionError,
};

pub(crate) const BUILD: &str = "zone-1.0";

/// How a fake process answers one kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behaviour {
    Ok,
    /// Answers with a failure of its own.
    Fail,
    /// Disconnects instead of answering.
    Vanish,
    /// Never answers: the request times out (a stopped process, a silent client).
    Hang,
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

    async fn behave(&self, process: &str, request: &'static str, timeout: Duration) -> Result<Behaviour, SessionError> {
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
            Behaviour::Hang => {
                tokio::time::sleep(timeout).await;
                Err(SessionError::Timeout { process: process.into(), timeout })
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

    async fn step(&self, process_id: &str, step: Step, timeout: Duration) -> Result<StepReply, SessionError> {
        // A revert's steps are counted apart ("revert-commit", ...).
        let what = match (&step, step.name()) {
            (Step::Revert(_), "prepare") => "revert-prepare",
            (Step::Revert(_), "commit") => "revert-commit",
            (Step::Revert(_), "abort") => "revert-abort",
            (Step::Revert(_), _) => "revert-rollback",
            (_, name) => name,
        };
        if self.behave(process_id, what, timeout).await? == Behaviour::Fail {
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
            Step::Revert(inner) => match inner.as_ref() {
                Step::Commit { patch_id } => stack.retain(|id| id != patch_id),
                Step::Rollback { patch_id } if !stack.contains(patch_id) => stack.push(patch_id.clone()),
                _ => {}
            },
            _ => {}
        }
        self.set_stack(process_id, stack.clone());
        Ok(StepReply { ok: true, patch_stack: stack, ..Default::default() })
    }

    async fn status(&self, process_id: &str, timeout: Duration) -> Result<LiveStatus, SessionError> {
        // The answer describes the process as it was when asked: one held back
        // (`Behaviour::Wait`) can arrive after a commit or rollback changed it.
        let stack = lock(&self.processes)
            .iter()
            .find(|p| p.process_id == process_id)
            .map(|p| p.patch_stack.clone())
            .unwrap_or_default();
        self.behave(process_id, "status", timeout).await?;
        let digest = format!("digest-of[{}]", stack.join(","));
        Ok(LiveStatus { patch_stack: stack, live_digests: HashMap::from([("zone.combat".to_string(), digest)]) })
    }

    async fn health(&self, process_id: &str, _since: u64, timeout: Duration) -> Result<ProcessHealth, SessionError> {
        self.behave(process_id, "health", timeout).await?;
        Ok(ProcessHealth { alive: true, game_ok: true, ..Default::default() })
    }
}

/// Verified bundles by id.
#[derive(Default)]
pub(crate) struct FakePatches {
    bundles: HashMap<String, Bundle>,
}

impl FakePatches {
    pub(crate) fn with(bundles: Vec<Bundle>) -> Self {
        Self { bundles: bundles.into_iter().map(|b| (b.id(), b)).collect() }
    }
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
    bundle_on(body, None)
}

/// A patch whose manifest names `parent` (None: a build's first patch).
pub(crate) fn bundle_on(body: &str, parent: Option<&str>) -> Bundle {
    bundle_touching(body, parent, "zone.combat")
}

/// [`bundle_on`] replacing `module`.
pub(crate) fn bundle_touching(body: &str, parent: Option<&str>, module: &str) -> Bundle {
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        target_build: BUILD.into(),
        parent: parent.map(str::to_string),
        packages: vec!["zone".into()],
        modules: vec![],
        author: "test".into(),
        created_at: "2026-12-01T00:00:00Z".into(),
        description: "test patch".into(),
    };
    Bundle::create(manifest, vec![(module.into(), format!("def f():\n    return {body}\n"))]).expect("bundle")
}

pub(crate) struct Rig {
    pub participant: Arc<Participant>,
    pub runtimes: Arc<FakeRuntimes>,
    pub patch: String,
    pub dir: tempfile::TempDir,
}

/// A node whose coordinator has announced epoch 1, serving one patch (a
/// build's first) to `processes`.
pub(crate) fn rig(processes: &[&str]) -> Rig {
    rig_with(processes, vec![bundle("2")])
}

/// [`rig`] serving `bundles`; the first is the rig's patch.
pub(crate) fn rig_with(processes: &[&str], bundles: Vec<Bundle>) -> Rig {
    let dir = tempfile::tempdir().expect("tmp");
    let runtimes = FakeRuntimes::new(processes);
    let id = bundles[0].id();
    let patches = FakePatches::with(bundles);
    let participant = Arc::new(participant_in(dir.path(), runtimes.clone(), Arc::new(patches)));
    participant.observe_epoch(1).expect("epoch");
    Rig { participant, runtimes, patch: id, dir }
}

/// A participant keeping its durable state in `dir` (a restart is another one on the same dir).
pub(crate) fn participant_in(
    dir: &std::path::Path,
    runtimes: Arc<FakeRuntimes>,
    patches: Arc<FakePatches>,
) -> Participant {
    let fence = EpochFence::load(dir).expect("fence");
    let finished = Finished::load(dir).expect("finished");
    Participant::new(
        "node-1".into(),
        runtimes,
        patches,
        fence,
        finished,
        Duration::from_secs(5),
        Duration::from_secs(60),
    )
    .with_epoch_wait(Duration::from_millis(200))
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

    /// Prepares the rig's patch with its own TTL; it must vote yes.
    pub(crate) async fn prepare_for(&self, ttl: Duration) {
        let mut prepare = self.cmd(Kind::Prepare, 1);
        prepare.ttl = ttl;
        assert!(self.participant.handle(prepare).await.expect("prepare").ok);
    }

    pub(crate) async fn run(&self, kind: Kind) -> Answer {
        self.participant.handle(self.cmd(kind, 1)).await.expect("admitted")
    }
}
