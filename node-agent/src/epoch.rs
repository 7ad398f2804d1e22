//! The fencing epoch: the highest coordinator epoch this agent has learned,
//! persisted so a restarted agent still refuses a deposed coordinator.
//!
//! The epoch is learned only over the agent's own link to its coordinator
//! (the leader's Register/Heartbeat answers, [`EpochFence::raise`]), never
//! from a command's epoch field: a command is admitted at the learned epoch,
//! refused as stale below it and as unknown above it
//! ([`EpochFence::admit`]). So a client that reaches the agent's port cannot
//! raise the floor (say to `u64::MAX`) and lock the real coordinator out.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    #[error("stale epoch {got}: this agent has already seen epoch {highest} (a newer coordinator leads; the command was refused)")]
    Stale { got: u64, highest: u64 },
    /// Above what the agent's coordinator has announced: a leader elected a
    /// moment ago (retry once the agent's next heartbeat has learned its
    /// epoch), or a client that is not the agent's coordinator.
    #[error("unknown epoch {got}: this agent's coordinator has announced epoch {known}; the command changed nothing (retry after the agent's next heartbeat has learned the new leader's epoch)")]
    Unknown { got: u64, known: u64 },
    #[error("cannot persist the fencing epoch to {path}: {source}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fencing epoch file {path} is corrupt ({content:?}): fix or delete it")]
    Corrupt { path: PathBuf, content: String },
}

/// Highest epoch learned, backed by a file written atomically (temp + rename).
#[derive(Debug)]
pub struct EpochFence {
    path: PathBuf,
    highest: u64,
}

impl EpochFence {
    pub fn load(data_dir: &Path) -> Result<Self, EpochError> {
        let path = data_dir.join("epoch");
        let highest = match fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|_| EpochError::Corrupt { path: path.clone(), content: text.chars().take(40).collect() })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(EpochError::Persist { path, source }),
        };
        Ok(Self { path, highest })
    }

    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Admits a command of `epoch`: only the learned epoch itself. Changes
    /// nothing, on disk or in memory, whatever the answer.
    pub fn admit(&self, epoch: u64) -> Result<(), EpochError> {
        if epoch < self.highest {
            return Err(EpochError::Stale { got: epoch, highest: self.highest });
        }
        if epoch > self.highest {
            return Err(EpochError::Unknown { got: epoch, known: self.highest });
        }
        Ok(())
    }

    /// Raises the floor to `epoch` if it is newer; an older one changes
    /// nothing. Returns whether it rose. Only for what the agent's own link
    /// to its coordinator learned (the leader's answer), never for a
    /// command's field.
    pub fn raise(&mut self, epoch: u64) -> Result<bool, EpochError> {
        if epoch <= self.highest {
            return Ok(false);
        }
        self.persist(epoch)?;
        self.highest = epoch;
        Ok(true)
    }

    fn persist(&self, epoch: u64) -> Result<(), EpochError> {
        let err = |source| EpochError::Persist { path: self.path.clone(), source };
        let tmp = self.path.with_extension("tmp");
        let mut file = fs::File::create(&tmp).map_err(err)?;
        file.write_all(format!("{epoch}\n").as_bytes()).map_err(err)?;
        file.sync_all().map_err(err)?;
        fs::rename(&tmp, &self.path).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_older_epochs_across_restarts() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut fence = EpochFence::load(dir.path()).expect("load");
        assert!(fence.raise(3).expect("learned"));
        fence.admit(3).expect("the learned epoch");
        fence.admit(3).expect("same epoch again");
        assert!(matches!(fence.admit(2), Err(EpochError::Stale { got: 2, highest: 3 })));
        let mut reloaded = EpochFence::load(dir.path()).expect("reload");
        assert_eq!(reloaded.highest(), 3);
        assert!(reloaded.admit(1).is_err());
        assert!(!reloaded.raise(2).expect("older is a no-op"));
        assert!(reloaded.raise(12).expect("newer"));
        assert!(reloaded.admit(11).is_err(), "a raised floor refuses older epochs");
        assert_eq!(EpochFence::load(dir.path()).expect("reload").highest(), 12);
    }

    #[test]
    fn a_command_above_the_learned_epoch_is_unknown_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut fence = EpochFence::load(dir.path()).expect("load");
        fence.raise(4).expect("learned");
        let before = fs::read(dir.path().join("epoch")).expect("epoch file");
        for epoch in [5, u64::MAX] {
            let err = fence.admit(epoch).expect_err("above the learned epoch");
            assert!(matches!(err, EpochError::Unknown { got, known: 4 } if got == epoch), "{err}");
            assert!(err.to_string().contains("retry"), "{err}");
        }
        assert_eq!(fence.highest(), 4);
        assert_eq!(fs::read(dir.path().join("epoch")).expect("epoch file"), before, "nothing written");
        fence.admit(4).expect("the learned epoch still works");
        // A fresh agent has learned nothing: only epoch 0 passes until its coordinator answers.
        let fresh = tempfile::tempdir().expect("tmp");
        let fence = EpochFence::load(fresh.path()).expect("load");
        assert!(matches!(fence.admit(1), Err(EpochError::Unknown { got: 1, known: 0 })));
        assert!(!fresh.path().join("epoch").exists());
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tmp");
        fs::write(dir.path().join("epoch"), "banana").expect("write");
        let err = EpochFence::load(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
