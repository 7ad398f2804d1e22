//! Admission of a command before it runs: its epoch (learned only from the
//! agent's own coordinator link, see [`crate::epoch`]) and whether it
//! replays a (rollout, patch) pair this node has finished with (see
//! [`crate::finished`]). Part of the participant's one command path.

use std::time::{Duration, Instant};

use super::{short, Participant};
use crate::{
    command::{Command, Kind, ParticipantError},
    epoch::EpochError,
    finished::Ending,
};

/// How long a command naming an epoch above the learned one waits for the
/// agent's heartbeat to learn it (a leader elected a moment ago) before it
/// is refused as unknown; the coordinator retries an unknown epoch.
pub const EPOCH_LEARN_WAIT: Duration = Duration::from_secs(3);

/// At most one heartbeat asked for by unknown epochs per this interval, so a
/// flood of them cannot turn into a flood of heartbeats.
const EPOCH_REFRESH_SPACING: Duration = Duration::from_millis(200);

impl Participant {
    /// A command naming an epoch above the learned one: ask the coordinator
    /// now (an immediate heartbeat) and wait, bounded, for the epoch to be
    /// learned. A leader elected a moment ago gets its first command through;
    /// anything else is refused as unknown once the wait is over.
    pub(super) async fn learn_epoch(&self, epoch: u64) {
        let known = self.highest_epoch();
        if epoch <= known || self.epoch_wait.is_zero() {
            return;
        }
        let ask = {
            let mut state = self.state();
            let due = state.refresh_asked.is_none_or(|at| at.elapsed() >= EPOCH_REFRESH_SPACING);
            if due {
                state.refresh_asked = Some(Instant::now());
            }
            due
        };
        if ask {
            tracing::info!(
                epoch,
                known,
                "a command names an epoch this agent has not learned: asking the coordinator now"
            );
            self.changed.notify_one();
        }
        let mut learned = self.learned.subscribe();
        let _ = tokio::time::timeout(self.epoch_wait, learned.wait_for(|e| *e >= epoch)).await;
    }

    /// A Prepare or Commit of a pair retired here is refused; returns how
    /// the pair ended, if it did.
    pub(super) fn refuse_retired(&self, cmd: &Command) -> Result<Option<Ending>, ParticipantError> {
        let ending = self.state().finished.ending(&cmd.rollout_id, &cmd.patch_id);
        if applies(cmd) && ending == Some(Ending::Retired) {
            return Err(self.replayed(
                cmd,
                "was aborted or rolled back on this node: it cannot be prepared or committed again under that rollout",
            ));
        }
        Ok(ending)
    }

    /// After the remembered answers: a Prepare or Commit of a pair committed
    /// here whose answer is forgotten (a restart) is refused, not run again.
    pub(super) fn refuse_committed(&self, cmd: &Command, ending: Option<Ending>) -> Result<(), ParticipantError> {
        if applies(cmd) && ending == Some(Ending::Committed) {
            return Err(self.replayed(
                cmd,
                "was committed on this node already (its first answer is no longer remembered): it is not applied again",
            ));
        }
        Ok(())
    }

    fn replayed(&self, cmd: &Command, what: &str) -> ParticipantError {
        tracing::warn!(rollout = %cmd.rollout_id, patch = %short(&cmd.patch_id), "{} refused: replayed command", cmd.kind);
        ParticipantError::Replayed(format!(
            "{} refused on node {}: patch {} of rollout {} {what}",
            cmd.kind,
            self.node_id,
            short(&cmd.patch_id),
            cmd.rollout_id
        ))
    }

    /// The coordinator decided to abort or roll back this pair (whatever the
    /// outcome here): a Prepare or Commit of it is refused from now on. A
    /// rollback retires the patch under every rollout that committed it here.
    pub(super) fn retire(&self, cmd: &Command) {
        let mut state = self.state();
        let mut result = state.finished.record(&cmd.rollout_id, &cmd.patch_id, Ending::Retired);
        if result.is_ok() && cmd.kind == Kind::Rollback {
            result = state.finished.retire_patch(&cmd.patch_id);
        }
        if let Err(err) = result {
            // Not a reason to refuse an abort or rollback: they only take patches away.
            tracing::error!(error = %err, rollout = %cmd.rollout_id, "{} not recorded durably: a replay after a restart would not be recognised", cmd.kind);
        }
    }

    pub(super) fn admit(&self, cmd: &Command) -> Result<(), ParticipantError> {
        let mut state = self.state();
        match state.fence.admit(cmd.epoch) {
            Ok(()) => {
                state.admitted += 1;
                Ok(())
            }
            Err(err @ EpochError::Stale { .. }) => {
                state.refused_stale += 1;
                tracing::warn!(rollout = %cmd.rollout_id, epoch = cmd.epoch, highest = state.fence.highest(), "command refused: stale epoch from a deposed coordinator");
                Err(err.into())
            }
            Err(err @ EpochError::Unknown { .. }) => {
                tracing::warn!(rollout = %cmd.rollout_id, epoch = cmd.epoch, known = state.fence.highest(), "command refused: an epoch this agent's coordinator has not announced");
                Err(err.into())
            }
            Err(err) => Err(err.into()),
        }
    }
}

/// The kinds that would put a patch (back) on: the ones a replay could abuse.
fn applies(cmd: &Command) -> bool {
    matches!(cmd.kind, Kind::Prepare | Kind::Commit)
}
