//! A coordinator's command to this node, and the node's answer, as domain
//! values: the gRPC adapter decodes requests into a [`Command`] and encodes
//! the [`Answer`], so the participant never sees a proto message.

use std::time::Duration;

use crate::epoch::EpochError;

#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    #[error(transparent)]
    Epoch(#[from] EpochError),
    #[error("command has no header (rollout id, patch id, epoch)")]
    MissingHeader,
    #[error("rollout id must not be empty")]
    MissingRollout,
    #[error("patch id {0:?} is not a patch id (64 hex digits)")]
    BadPatchId(String),
    /// The answer would depend on processes the agent has not seen yet.
    #[error("{0}")]
    Unknown(String),
    /// A Prepare or Commit of a pair this node has finished with (see
    /// [`crate::finished`]): an old command played again.
    #[error("{0}")]
    Replayed(String),
    #[error("rollout id of {0} bytes is too long (at most {MAX_ROLLOUT_ID} bytes)")]
    LongRollout(usize),
    #[error("command {kind} for rollout {rollout_id} failed inside the agent: {reason}")]
    Internal { kind: Kind, rollout_id: String, reason: String },
}

/// What a command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Phase 1: stage the patch everywhere it applies, vote.
    Prepare,
    /// Phase 2: apply what was prepared.
    Commit,
    /// Drop what was prepared; nothing live changes.
    Abort,
    /// Undo a committed patch where it is on top of the stack.
    Rollback,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Prepare => "prepare",
            Kind::Commit => "commit",
            Kind::Abort => "abort",
            Kind::Rollback => "rollback",
        })
    }
}

/// What the command's rollout does with its patch (the same for every
/// command of a rollout).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum RolloutKind {
    /// On top of the stack: the manifest's parent must be the top.
    #[default]
    Apply,
    /// Off the stack (`rollout revert`): each process restores what lies beneath it.
    Revert,
    /// On top although the manifest's parent is an ancestor of the top, when
    /// the patches above that parent touch none of its modules.
    Rebase,
}

/// One command from the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub kind: Kind,
    pub rollout_id: String,
    pub patch_id: String,
    /// The sending leader's fencing epoch.
    pub epoch: u64,
    /// Prepare only: how long the prepared patch may wait (zero: the agent's default).
    pub ttl: Duration,
    /// Prepare only: just this process prepares (a plan, `hotfleet patch
    /// plan --process`); empty: every process of the patch's build.
    pub process_id: String,
    pub rollout_kind: RolloutKind,
}

/// The longest rollout id accepted: ids are remembered, on disk too.
pub const MAX_ROLLOUT_ID: usize = 256;

/// Commands are idempotent per (rollout, patch, kind).
pub type CommandKey = (String, String, Kind);

impl Command {
    pub fn new(kind: Kind, rollout_id: impl Into<String>, patch_id: impl Into<String>, epoch: u64) -> Self {
        Self {
            kind,
            rollout_id: rollout_id.into(),
            patch_id: patch_id.into(),
            epoch,
            ttl: Duration::ZERO,
            process_id: String::new(),
            rollout_kind: RolloutKind::Apply,
        }
    }

    /// The same command for a rollout of another kind.
    pub fn of_kind(self, rollout_kind: RolloutKind) -> Self {
        Self { rollout_kind, ..self }
    }

    pub fn key(&self) -> CommandKey {
        (self.rollout_id.clone(), self.patch_id.clone(), self.kind)
    }

    /// Checks the fields before the command is admitted.
    pub fn validate(&self) -> Result<(), ParticipantError> {
        if self.rollout_id.is_empty() {
            return Err(ParticipantError::MissingRollout);
        }
        if self.rollout_id.len() > MAX_ROLLOUT_ID {
            return Err(ParticipantError::LongRollout(self.rollout_id.len()));
        }
        if !hotfleet_patch::is_patch_id(&self.patch_id) {
            return Err(ParticipantError::BadPatchId(self.patch_id.clone()));
        }
        Ok(())
    }
}

/// How one game process answered a command.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessOutcome {
    pub process_id: String,
    pub pid: u32,
    pub ok: bool,
    /// Why it failed (module, object, line where known).
    pub error: String,
    pub pause_ms: f64,
    pub prepare_ms: f64,
    /// JSON of the runtime's plan (prepare) or report (commit/rollback).
    pub detail_json: String,
}

/// A node's answer to one command (for a prepare, `ok` is the vote).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    pub ok: bool,
    pub reason: String,
    pub processes: Vec<ProcessOutcome>,
}

impl Answer {
    /// A failure before any process was asked.
    pub fn refused(reason: String) -> Self {
        Self { ok: false, reason, processes: vec![] }
    }

    /// Ok when every process is; otherwise a one-line summary (each failing
    /// process's own error travels in its outcome).
    pub fn from_outcomes(processes: Vec<ProcessOutcome>) -> Self {
        let failed = processes.iter().filter(|o| !o.ok).count();
        let reason =
            if failed == 0 { String::new() } else { format!("{failed} of {} process(es) failed", processes.len()) };
        Self { ok: failed == 0, reason, processes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_checked_before_admission() {
        let id = "a".repeat(64);
        assert!(Command::new(Kind::Commit, "r", id.clone(), 1).validate().is_ok());
        assert!(matches!(Command::new(Kind::Commit, "", id, 1).validate(), Err(ParticipantError::MissingRollout)));
        assert!(matches!(Command::new(Kind::Abort, "r", "xyz", 1).validate(), Err(ParticipantError::BadPatchId(_))));
        let long = "r".repeat(MAX_ROLLOUT_ID + 1);
        assert!(matches!(
            Command::new(Kind::Abort, long, "a".repeat(64), 1).validate(),
            Err(ParticipantError::LongRollout(_))
        ));
    }

    #[test]
    fn an_answer_is_ok_only_when_every_process_is() {
        let ok = ProcessOutcome { ok: true, ..Default::default() };
        let bad = ProcessOutcome { ok: false, ..Default::default() };
        assert_eq!(Answer::from_outcomes(vec![ok.clone()]).reason, "");
        let answer = Answer::from_outcomes(vec![ok, bad]);
        assert!(!answer.ok);
        assert_eq!(answer.reason, "1 of 2 process(es) failed");
        assert!(Answer::from_outcomes(vec![]).ok, "nothing to do is done");
    }
}
