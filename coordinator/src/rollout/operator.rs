//! Operator commands on one rollout (pause, resume, promote, abort): one
//! [`OperatorAction`] kind, so the engine and the gRPC adapter each carry it
//! through one code path, and the transitions each command makes.

use super::{Changed, Phase, RolloutState, TransitionError};

/// What an operator can do to a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorAction {
    /// Hold before the next step.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Open the next closed manual gate.
    Promote,
    /// Roll everything back now.
    Abort,
}

impl OperatorAction {
    /// The name the audit log records.
    pub fn audit_name(self) -> &'static str {
        match self {
            OperatorAction::Pause => "rollout.pause",
            OperatorAction::Resume => "rollout.resume",
            OperatorAction::Promote => "rollout.promote",
            OperatorAction::Abort => "rollout.abort",
        }
    }
}

impl RolloutState {
    /// Applies an operator's action; `note` is the operator's reason.
    pub fn apply(
        &mut self,
        action: OperatorAction,
        actor: &str,
        note: &str,
        now_ms: u64,
    ) -> Result<Changed, TransitionError> {
        match action {
            OperatorAction::Pause => self.pause(actor, now_ms).map(|()| Vec::new()),
            OperatorAction::Resume => self.resume(actor, now_ms).map(|()| Vec::new()),
            OperatorAction::Promote => self.promote(actor, now_ms).map(|_| Vec::new()),
            OperatorAction::Abort => self.abort(actor, note, now_ms),
        }
    }

    /// Operator abort: accepted in every non-terminal state, idempotent while
    /// rolling back.
    pub fn abort(&mut self, actor: &str, note: &str, now_ms: u64) -> Result<Changed, TransitionError> {
        match &self.rollout.phase {
            Phase::RollingBack { .. } => Ok(Vec::new()),
            phase if phase.is_terminal() => {
                Err(TransitionError::Finished { id: self.rollout.id.clone(), outcome: phase.name().into() })
            }
            _ => {
                let reason =
                    if note.is_empty() { format!("aborted by {actor}") } else { format!("aborted by {actor}: {note}") };
                Ok(self.start_revert(reason, Vec::new(), now_ms))
            }
        }
    }

    fn operator_check(&self) -> Result<(), TransitionError> {
        match &self.rollout.phase {
            Phase::RollingBack { .. } => Err(TransitionError::RollingBack { id: self.rollout.id.clone() }),
            phase if phase.is_terminal() => {
                Err(TransitionError::Finished { id: self.rollout.id.clone(), outcome: phase.name().into() })
            }
            _ => Ok(()),
        }
    }

    pub fn pause(&mut self, actor: &str, now_ms: u64) -> Result<(), TransitionError> {
        self.operator_check()?;
        if !self.rollout.paused {
            self.rollout.paused = true;
            self.rollout.updated_at_ms = now_ms;
            self.rollout.event(now_ms, format!("paused by {actor}"));
        }
        Ok(())
    }

    pub fn resume(&mut self, actor: &str, now_ms: u64) -> Result<(), TransitionError> {
        self.operator_check()?;
        if self.rollout.paused {
            self.rollout.paused = false;
            self.rollout.updated_at_ms = now_ms;
            self.rollout.event(now_ms, format!("resumed by {actor}"));
        }
        Ok(())
    }

    /// Opens the next closed manual gate (the one the rollout waits at, or
    /// the next one ahead, so a runbook may promote early).
    pub fn promote(&mut self, actor: &str, now_ms: u64) -> Result<String, TransitionError> {
        self.operator_check()?;
        let from = match &self.rollout.phase {
            Phase::Scheduled { .. } | Phase::Staged | Phase::Preparing => 0,
            Phase::Waiting { next_step } => *next_step,
            Phase::Committing { step } | Phase::Watching { step, .. } => step + 1,
            _ => usize::MAX,
        };
        let gate = (from..self.rollout.steps.len())
            .find(|i| self.rollout.steps[*i].pause_before && !self.rollout.promoted.contains(i));
        match gate {
            Some(step) => {
                self.rollout.promoted.push(step);
                let name = self.rollout.steps[step].name.clone();
                self.rollout.updated_at_ms = now_ms;
                self.rollout.event(now_ms, format!("gate before {name} promoted by {actor}"));
                Ok(name)
            }
            None => {
                Err(TransitionError::NoGate { id: self.rollout.id.clone(), phase: self.rollout.phase.name().into() })
            }
        }
    }
}
