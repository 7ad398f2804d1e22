//! The (rollout, patch) pairs this node is done with, remembered durably so
//! an old command cannot be played to the agent again:
//!
//! - **retired**: the coordinator aborted or rolled the pair back (or rolled
//!   the patch back under any rollout): a Prepare or Commit of it is refused,
//!   so a patch the fleet rolled back cannot be replayed onto this node;
//! - **committed**: its commit ran here: a Prepare or Commit of it whose
//!   first answer is no longer remembered (the agent restarted, or
//!   [`crate::answers`] forgot it) is refused rather than run again.
//!
//! Plain data with its own file (JSON lines, appended and synced per change,
//! compacted when it doubles): the participant decides what to record and
//! when. Bounded: the oldest pairs are forgotten first.

use std::{
    collections::{HashMap, VecDeque},
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// How many pairs are remembered.
pub const REMEMBERED_PAIRS: usize = 4096;

/// The file, inside the agent's data directory.
const FILE: &str = "finished.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum FinishedError {
    #[error("cannot record finished commands in {path}: {source}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How a pair ended on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ending {
    Committed,
    Retired,
}

/// One line of the file.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    rollout: String,
    patch: String,
    ending: Ending,
}

type Pair = (String, String);

/// The pairs this node is done with, oldest forgotten first.
#[derive(Debug)]
pub struct Finished {
    path: PathBuf,
    capacity: usize,
    endings: HashMap<Pair, Ending>,
    order: VecDeque<Pair>,
    /// Lines in the file (compacted once it holds twice the capacity).
    lines: usize,
}

impl Finished {
    /// Loads `finished.jsonl` from `data_dir` (none yet: nothing finished).
    /// A line that does not parse (a write torn by a crash) is skipped.
    pub fn load(data_dir: &Path) -> Result<Self, FinishedError> {
        Self::load_with_capacity(data_dir, REMEMBERED_PAIRS)
    }

    pub fn load_with_capacity(data_dir: &Path, capacity: usize) -> Result<Self, FinishedError> {
        let path = data_dir.join(FILE);
        let mut this = Self { path, capacity, endings: HashMap::new(), order: VecDeque::new(), lines: 0 };
        let text = match fs::read_to_string(&this.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(this),
            Err(source) => return Err(FinishedError::Persist { path: this.path, source }),
        };
        for raw in text.lines().filter(|l| !l.trim().is_empty()) {
            this.lines += 1;
            match serde_json::from_str::<Line>(raw) {
                Ok(line) => this.note((line.rollout, line.patch), line.ending),
                Err(err) => {
                    tracing::warn!(path = %this.path.display(), error = %err, "skipping an unreadable line of the finished-commands file")
                }
            }
        }
        if !text.is_empty() && !text.ends_with('\n') {
            // A torn last line: rewrite, so the next append starts a line of its own.
            this.rewrite()?;
        }
        Ok(this)
    }

    /// How the pair ended here, if remembered.
    pub fn ending(&self, rollout_id: &str, patch_id: &str) -> Option<Ending> {
        self.endings.get(&(rollout_id.to_string(), patch_id.to_string())).copied()
    }

    /// Records how a pair ended, durably (a retired pair stays retired).
    pub fn record(&mut self, rollout_id: &str, patch_id: &str, ending: Ending) -> Result<(), FinishedError> {
        let pair = (rollout_id.to_string(), patch_id.to_string());
        if self.endings.get(&pair).is_some_and(|e| *e == ending || *e == Ending::Retired) {
            return Ok(());
        }
        self.append(&[(&pair, ending)])?;
        self.note(pair, ending);
        self.compact_if_due()
    }

    /// The patch was rolled back: every pair of it committed here is retired
    /// too (a rollback may come under another rollout id, e.g. a drift repair).
    pub fn retire_patch(&mut self, patch_id: &str) -> Result<(), FinishedError> {
        let committed: Vec<Pair> = self
            .order
            .iter()
            .filter(|pair| pair.1 == patch_id && self.endings.get(*pair) == Some(&Ending::Committed))
            .cloned()
            .collect();
        if committed.is_empty() {
            return Ok(());
        }
        self.append(&committed.iter().map(|pair| (pair, Ending::Retired)).collect::<Vec<_>>())?;
        for pair in committed {
            self.note(pair, Ending::Retired);
        }
        self.compact_if_due()
    }

    fn note(&mut self, pair: Pair, ending: Ending) {
        if self.endings.insert(pair.clone(), ending).is_none() {
            self.order.push_back(pair);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.endings.remove(&old);
            }
        }
    }

    fn err(&self) -> impl Fn(std::io::Error) -> FinishedError + '_ {
        |source| FinishedError::Persist { path: self.path.clone(), source }
    }

    fn append(&mut self, lines: &[(&Pair, Ending)]) -> Result<(), FinishedError> {
        let mut text = String::new();
        for (pair, ending) in lines {
            text.push_str(&encode(pair, *ending));
        }
        let mut file = fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(self.err())?;
        file.write_all(text.as_bytes()).map_err(self.err())?;
        file.sync_data().map_err(self.err())?;
        self.lines += lines.len();
        Ok(())
    }

    /// Rewrites the file with what is remembered (temp + rename) once it has
    /// grown to twice the capacity.
    fn compact_if_due(&mut self) -> Result<(), FinishedError> {
        if self.lines < self.capacity.saturating_mul(2).max(1) {
            return Ok(());
        }
        self.rewrite()
    }

    fn rewrite(&mut self) -> Result<(), FinishedError> {
        let text: String = self.order.iter().map(|pair| encode(pair, self.endings[pair])).collect();
        let tmp = self.path.with_extension("tmp");
        let mut file = fs::File::create(&tmp).map_err(self.err())?;
        file.write_all(text.as_bytes()).map_err(self.err())?;
        file.sync_all().map_err(self.err())?;
        fs::rename(&tmp, &self.path).map_err(self.err())?;
        self.lines = self.order.len();
        Ok(())
    }
}

fn encode((rollout, patch): &Pair, ending: Ending) -> String {
    let line = Line { rollout: rollout.clone(), patch: patch.clone(), ending };
    // A struct of two strings and a unit enum always serializes.
    let mut text = serde_json::to_string(&line).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_survive_a_restart_and_a_retired_pair_stays_retired() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut finished = Finished::load(dir.path()).expect("load");
        assert_eq!(finished.ending("r1", "p"), None);
        finished.record("r1", "p", Ending::Committed).expect("record");
        finished.record("r2", "p", Ending::Retired).expect("record");
        finished.record("r2", "p", Ending::Committed).expect("no-op");
        let reloaded = Finished::load(dir.path()).expect("reload");
        assert_eq!(reloaded.ending("r1", "p"), Some(Ending::Committed));
        assert_eq!(reloaded.ending("r2", "p"), Some(Ending::Retired), "retired is final");
        assert_eq!(reloaded.ending("r1", "q"), None);
    }

    #[test]
    fn rolling_a_patch_back_retires_every_rollout_that_committed_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut finished = Finished::load(dir.path()).expect("load");
        finished.record("r1", "p", Ending::Committed).expect("record");
        finished.record("r2", "q", Ending::Committed).expect("record");
        finished.retire_patch("p").expect("retire");
        let reloaded = Finished::load(dir.path()).expect("reload");
        assert_eq!(reloaded.ending("r1", "p"), Some(Ending::Retired));
        assert_eq!(reloaded.ending("r2", "q"), Some(Ending::Committed), "another patch is untouched");
    }

    #[test]
    fn bounded_compacted_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut finished = Finished::load_with_capacity(dir.path(), 3).expect("load");
        for n in 0..10 {
            finished.record(&format!("r{n}"), "p", Ending::Retired).expect("record");
        }
        assert_eq!(finished.ending("r0", "p"), None, "the oldest is forgotten");
        let lines = fs::read_to_string(dir.path().join(FILE)).expect("file").lines().count();
        assert!(lines <= 6, "compacted at twice the capacity: {lines} lines");
        // A crash mid-append leaves half a line.
        fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .and_then(|mut f| f.write_all(b"{\"rollout\":\"r"))
            .expect("tear");
        let mut reloaded = Finished::load_with_capacity(dir.path(), 3).expect("reload");
        assert_eq!(reloaded.ending("r9", "p"), Some(Ending::Retired));
        assert_eq!(reloaded.ending("r7", "p"), Some(Ending::Retired));
        assert_eq!(reloaded.ending("r6", "p"), None);
        // The next record after the torn line is not lost to it.
        reloaded.record("r10", "p", Ending::Committed).expect("record");
        let again = Finished::load_with_capacity(dir.path(), 3).expect("reload");
        assert_eq!(again.ending("r10", "p"), Some(Ending::Committed));
    }
}
