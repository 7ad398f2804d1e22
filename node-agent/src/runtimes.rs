//! The runtimes of this node as the participant sees them: a set of game
//! processes, each able to take one transaction step or answer a query.
//!
//! [`Runtimes`] is the seam between the two-phase-commit participant and the
//! local socket, so the participant is unit-tested with an in-memory double
//! (a process that fails, hangs or vanishes mid-commit) instead of only with
//! real game processes. [`Sessions`] is the real set; the mapping to the local
//! protocol's frames lives here and nowhere else.

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use hotfleet_proto::{
    parts::source_parts,
    v1::{
        runtime_frame::Body, HealthQuery, ProcessHealth, RuntimeAbort, RuntimeCommit, RuntimePrepare, RuntimeResult,
        RuntimeRollback, StatusQuery,
    },
};

use crate::sessions::{SessionError, Sessions};

/// A connected game process, as it introduced itself (and its latest stack).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    pub process_id: String,
    pub pid: u32,
    pub build: String,
    /// Committed patch ids, oldest first, as last reported.
    pub patch_stack: Vec<String>,
    pub runtime_version: String,
    pub python_version: String,
}

/// Why a patch whose manifest names `parent` does not go on top of `stack`
/// (None: it does). No parent means a build's first patch: the stack must be
/// empty. A stack that already holds the patch fits: the runtime answers a
/// repeated prepare or commit as done and changes nothing.
pub fn misfit(stack: &[String], patch_id: &str, parent: Option<&str>) -> Option<String> {
    let top = stack.last().map(String::as_str);
    if top == parent || stack.iter().any(|id| id == patch_id) {
        return None;
    }
    let short = |id: &str| id.get(..12).unwrap_or(id).to_string();
    let parent = parent.map_or("none (a build's first patch)".to_string(), short);
    let top = top.map_or("empty".to_string(), short);
    Some(format!(
        "patch {} names parent {parent} but the top of its patch stack is {top} (build the patch on the stack it must follow: `hotfleet patch build --parent`)",
        short(patch_id)
    ))
}

/// One step of a patch transaction, sent to one runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Stage the modules (module name -> source); nothing live changes.
    Prepare {
        patch_id: String,
        modules: Vec<(String, String)>,
    },
    Commit {
        patch_id: String,
    },
    Abort {
        patch_id: String,
    },
    Rollback {
        patch_id: String,
    },
    /// The same step for the revert of `patch_id` (a prepare carries no
    /// modules: the runtime stages the sources beneath the patch itself).
    Revert(Box<Step>),
}

impl Step {
    /// The word logs and error messages use for this step.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Prepare { .. } => "prepare",
            Step::Commit { .. } => "commit",
            Step::Abort { .. } => "abort",
            Step::Rollback { .. } => "rollback",
            Step::Revert(step) => step.name(),
        }
    }

    /// This step for a rollout of `kind`: a revert's is wrapped.
    pub fn of(self, kind: crate::command::RolloutKind) -> Self {
        match kind {
            crate::command::RolloutKind::Revert => Step::Revert(Box::new(self)),
            _ => self,
        }
    }

    /// The request's body and what travels ahead of it: a prepare's sources,
    /// one piece of a module per `source_part` frame, so a bundle of any size
    /// (and any amount of JSON escaping) fits the frame limit.
    fn into_bodies(self) -> (Vec<Body>, Body) {
        match self {
            Step::Prepare { patch_id, modules } => {
                let ahead: Vec<Body> = source_parts(&patch_id, &modules).into_iter().map(Body::SourcePart).collect();
                let parts = ahead.len() as u32;
                (ahead, Body::Prepare(RuntimePrepare { patch_id, modules: Default::default(), parts, revert: false }))
            }
            Step::Commit { patch_id } => (Vec::new(), Body::Commit(RuntimeCommit { patch_id, revert: false })),
            Step::Abort { patch_id } => (Vec::new(), Body::Abort(RuntimeAbort { patch_id, revert: false })),
            Step::Rollback { patch_id } => (Vec::new(), Body::Rollback(RuntimeRollback { patch_id, revert: false })),
            Step::Revert(step) => {
                let (ahead, mut body) = step.into_bodies();
                match &mut body {
                    Body::Prepare(b) => b.revert = true,
                    Body::Commit(b) => b.revert = true,
                    Body::Abort(b) => b.revert = true,
                    Body::Rollback(b) => b.revert = true,
                    _ => {}
                }
                (ahead, body)
            }
        }
    }
}

/// How one runtime answered a [`Step`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepReply {
    pub ok: bool,
    /// The runtime's own message (module, object, line where known).
    pub error: String,
    /// Which kind of failure ("prepare", "commit", "protocol", ...).
    pub error_kind: String,
    pub pause_ms: f64,
    pub elapsed_ms: f64,
    /// JSON of the runtime's plan (prepare) or report (commit/rollback).
    pub detail_json: String,
    /// The process's patch stack after the step.
    pub patch_stack: Vec<String>,
}

impl From<RuntimeResult> for StepReply {
    fn from(r: RuntimeResult) -> Self {
        Self {
            ok: r.ok,
            error: r.error,
            error_kind: r.error_kind,
            pause_ms: r.pause_ms,
            elapsed_ms: r.elapsed_ms,
            detail_json: r.detail_json,
            patch_stack: r.patch_stack,
        }
    }
}

/// What a runtime runs right now, asked live.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveStatus {
    pub patch_stack: Vec<String>,
    /// module -> sha256 of the source the process runs.
    pub live_digests: HashMap<String, String>,
}

/// The game processes of this node.
#[async_trait]
pub trait Runtimes: Send + Sync + 'static {
    /// Every process connected now.
    fn processes(&self) -> Vec<Process>;
    /// Whether any process has connected since the agent started: until one
    /// has, the agent cannot tell an empty node from one still reconnecting.
    fn any_connected_since_start(&self) -> bool;
    /// Sends one transaction step to one process and waits for its answer.
    async fn step(&self, process_id: &str, step: Step, timeout: Duration) -> Result<StepReply, SessionError>;
    /// What the process runs (its reply also refreshes its known stack).
    async fn status(&self, process_id: &str, timeout: Duration) -> Result<LiveStatus, SessionError>;
    /// Health figures since `since` (0: since the process started).
    async fn health(&self, process_id: &str, since: u64, timeout: Duration) -> Result<ProcessHealth, SessionError>;
}

#[async_trait]
impl Runtimes for Sessions {
    fn processes(&self) -> Vec<Process> {
        self.list()
            .iter()
            .map(|session| {
                let info = session.info();
                Process {
                    process_id: session.process_id.clone(),
                    pid: info.hello.pid,
                    build: info.hello.build,
                    patch_stack: info.patch_stack,
                    runtime_version: info.hello.runtime_version,
                    python_version: info.hello.python_version,
                }
            })
            .collect()
    }

    fn any_connected_since_start(&self) -> bool {
        self.ever_connected()
    }

    async fn step(&self, process_id: &str, step: Step, timeout: Duration) -> Result<StepReply, SessionError> {
        let session = self.get(process_id).ok_or_else(|| SessionError::Disconnected(process_id.to_string()))?;
        let what = step.name();
        let updates_stack = match &step {
            Step::Revert(inner) => matches!(**inner, Step::Commit { .. } | Step::Rollback { .. }),
            other => matches!(other, Step::Commit { .. } | Step::Rollback { .. }),
        };
        let (ahead, body) = step.into_bodies();
        match session.request_after(ahead, body, timeout).await? {
            Body::PrepareResult(result)
            | Body::CommitResult(result)
            | Body::AbortResult(result)
            | Body::RollbackResult(result) => {
                if updates_stack {
                    session.set_patch_stack(result.patch_stack.clone());
                }
                Ok(result.into())
            }
            _ => Err(SessionError::Unexpected { process: process_id.to_string(), what }),
        }
    }

    async fn status(&self, process_id: &str, timeout: Duration) -> Result<LiveStatus, SessionError> {
        let session = self.get(process_id).ok_or_else(|| SessionError::Disconnected(process_id.to_string()))?;
        match session.request(Body::StatusQuery(StatusQuery {}), timeout).await? {
            Body::Status(reply) => {
                session.set_patch_stack(reply.patch_stack.clone());
                Ok(LiveStatus { patch_stack: reply.patch_stack, live_digests: reply.live_digests })
            }
            _ => Err(SessionError::Unexpected { process: process_id.to_string(), what: "a status query" }),
        }
    }

    async fn health(&self, process_id: &str, since: u64, timeout: Duration) -> Result<ProcessHealth, SessionError> {
        let session = self.get(process_id).ok_or_else(|| SessionError::Disconnected(process_id.to_string()))?;
        match session.request(Body::HealthQuery(HealthQuery { since }), timeout).await? {
            Body::Health(health) => Ok(health),
            _ => Err(SessionError::Unexpected { process: process_id.to_string(), what: "a health query" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_goes_only_on_top_of_the_parent_it_names() {
        let (p1, p2, p3) = ("1".repeat(64), "2".repeat(64), "3".repeat(64));
        assert_eq!(misfit(&[], &p1, None), None, "a build's first patch on an empty stack");
        assert_eq!(misfit(std::slice::from_ref(&p1), &p2, Some(&p1)), None);
        let why = misfit(std::slice::from_ref(&p1), &p2, None).expect("no parent needs an empty stack");
        assert!(why.contains("parent none") && why.contains("top of its patch stack is 111111111111"), "{why}");
        let why = misfit(&[], &p2, Some(&p1)).expect("the parent is missing");
        assert!(why.contains("parent 111111111111") && why.contains("is empty"), "{why}");
        let why = misfit(&[p1.clone(), p3.clone()], &p2, Some(&p1)).expect("another patch came on top");
        assert!(why.contains("parent 111111111111") && why.contains("is 333333333333"), "{why}");
        assert_eq!(
            misfit(&[p1.clone(), p2.clone()], &p2, Some(&p1)),
            None,
            "already there: the runtime answers it as done"
        );
    }
}
