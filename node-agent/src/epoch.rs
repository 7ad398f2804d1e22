//! The fencing epoch: the highest coordinator epoch this agent has seen,
//! persisted so a restarted agent still refuses a deposed coordinator.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    #[error("stale epoch {got}: this agent has already seen epoch {highest} (a newer coordinator leads; the command was refused)")]
    Stale { got: u64, highest: u64 },
    #[error("cannot persist the fencing epoch to {path}: {source}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fencing epoch file {path} is corrupt ({content:?}): fix or delete it")]
    Corrupt { path: PathBuf, content: String },
}

/// Highest epoch seen, backed by a file written atomically (temp + rename).
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

    /// Admits a command of `epoch`: refuses an older one, records a newer one
    /// durably before the command runs.
    pub fn admit(&mut self, epoch: u64) -> Result<(), EpochError> {
        if epoch < self.highest {
            return Err(EpochError::Stale { got: epoch, highest: self.highest });
        }
        if epoch > self.highest {
            self.persist(epoch)?;
            self.highest = epoch;
        }
        Ok(())
    }

    /// Raises the floor to `epoch` if it is newer (the leader announced it);
    /// an older one changes nothing. Returns whether it rose.
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
        fence.admit(3).expect("first");
        fence.admit(3).expect("same epoch again");
        assert!(matches!(fence.admit(2), Err(EpochError::Stale { got: 2, highest: 3 })));
        let mut reloaded = EpochFence::load(dir.path()).expect("reload");
        assert_eq!(reloaded.highest(), 3);
        assert!(reloaded.admit(1).is_err());
        reloaded.admit(9).expect("newer");
        assert!(!reloaded.raise(4).expect("older is a no-op"));
        assert!(reloaded.raise(12).expect("newer"));
        assert!(reloaded.admit(11).is_err(), "a raised floor refuses older epochs");
        assert_eq!(EpochFence::load(dir.path()).expect("reload").highest(), 12);
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tmp");
        fs::write(dir.path().join("epoch"), "banana").expect("write");
        let err = EpochFence::load(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
