//! Drift: a process's patch stack against its build's, judged in one place.
//!
//! The store records which patch stack each build runs (pushed when a
//! rollout completes). A process drifts when it runs something else: it
//! missed a rollout (its agent was away, it was skipped as lost) or a revert
//! never reached it. `nodes list` shows the judgment and the reconciler
//! (`reconcile.rs`) repairs it; both read it from here, so what an operator
//! is shown is what gets repaired.
//!
//! Only a common prefix counts as agreement: a process running `[A, C]` on a
//! build whose stack is `[A, B]` has `C` extra (rolled back first, newest
//! first: only the top of a stack can be) and `B` missing (then committed in
//! stack order).

use std::collections::HashMap;

use crate::{
    node::NodeStatus,
    store::{Store, StoreError},
};

/// How one process's patch stack compares with its build's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StackState {
    InSync,
    /// `missing` oldest first, `extra` newest first (the order each is repaired in).
    Drift {
        missing: Vec<String>,
        extra: Vec<String>,
    },
    /// An active rollout owns the node: its processes legitimately differ
    /// from the stored stack until the rollout ends.
    InRollout,
    /// The build's stack could not be read.
    Unknown,
}

impl StackState {
    /// The word `nodes list` shows (and the API carries).
    pub fn name(&self) -> &'static str {
        match self {
            StackState::InSync => "in-sync",
            StackState::Drift { .. } => "drift",
            StackState::InRollout => "in-rollout",
            StackState::Unknown => "unknown",
        }
    }
}

/// One process's judgment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessDrift {
    pub process_id: String,
    pub pid: u32,
    pub build: String,
    pub state: StackState,
}

/// `running` against `desired` (both oldest first).
pub fn compare(desired: &[String], running: &[String]) -> StackState {
    let common = desired.iter().zip(running).take_while(|(d, r)| d == r).count();
    let missing: Vec<String> = desired[common..].to_vec();
    let extra: Vec<String> = running[common..].iter().rev().cloned().collect();
    if missing.is_empty() && extra.is_empty() {
        StackState::InSync
    } else {
        StackState::Drift { missing, extra }
    }
}

/// Each build's stored stack, read once per pass or listing.
pub struct BuildStacks<'a> {
    store: &'a dyn Store,
    read: HashMap<String, Vec<String>>,
}

impl<'a> BuildStacks<'a> {
    pub fn new(store: &'a dyn Store) -> Self {
        Self { store, read: HashMap::new() }
    }

    /// The build's stack, patch ids oldest first.
    pub async fn of(&mut self, build: &str) -> Result<Vec<String>, StoreError> {
        if let Some(stack) = self.read.get(build) {
            return Ok(stack.clone());
        }
        let stack: Vec<String> = self.store.patch_stack(build).await?.into_iter().map(|e| e.patch_id).collect();
        self.read.insert(build.to_string(), stack.clone());
        Ok(stack)
    }

    /// Every build's stack read so far.
    pub fn into_read(self) -> HashMap<String, Vec<String>> {
        self.read
    }

    /// Every process of `node`; `in_rollout` when an active rollout owns it.
    /// A stack that cannot be read makes its processes `Unknown` (logged).
    pub async fn judge(&mut self, node: &NodeStatus, in_rollout: bool) -> Vec<ProcessDrift> {
        let mut out = Vec::with_capacity(node.processes.len());
        for process in &node.processes {
            let state = if in_rollout {
                StackState::InRollout
            } else {
                match self.of(&process.build).await {
                    Ok(desired) => compare(&desired, &process.patch_stack),
                    Err(err) => {
                        tracing::warn!(build = %process.build, error = %err, "cannot read the build's patch stack");
                        StackState::Unknown
                    }
                }
            };
            out.push(ProcessDrift {
                process_id: process.process_id.clone(),
                pid: process.pid,
                build: process.build.clone(),
                state,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn drift(missing: &[&str], extra: &[&str]) -> StackState {
        StackState::Drift { missing: ids(missing), extra: ids(extra) }
    }

    #[test]
    fn equal_stacks_are_in_sync() {
        assert_eq!(compare(&ids(&[]), &ids(&[])), StackState::InSync);
        assert_eq!(compare(&ids(&["a", "b"]), &ids(&["a", "b"])), StackState::InSync);
    }

    #[test]
    fn missing_patches_are_listed_oldest_first() {
        assert_eq!(compare(&ids(&["a", "b", "c"]), &ids(&["a"])), drift(&["b", "c"], &[]));
        assert_eq!(compare(&ids(&["a"]), &ids(&[])), drift(&["a"], &[]));
    }

    #[test]
    fn extra_patches_are_listed_newest_first() {
        assert_eq!(compare(&ids(&["a"]), &ids(&["a", "b", "c"])), drift(&[], &["c", "b"]));
        assert_eq!(compare(&ids(&[]), &ids(&["x"])), drift(&[], &["x"]));
    }

    #[test]
    fn a_diverging_stack_is_both_missing_and_extra_after_the_common_prefix() {
        assert_eq!(compare(&ids(&["a", "b"]), &ids(&["a", "c"])), drift(&["b"], &["c"]));
        assert_eq!(compare(&ids(&["a", "b"]), &ids(&["b", "a"])), drift(&["a", "b"], &["a", "b"]));
    }

    #[test]
    fn state_names_are_what_operators_see() {
        let names: Vec<&str> = [StackState::InSync, drift(&["a"], &[]), StackState::InRollout, StackState::Unknown]
            .iter()
            .map(StackState::name)
            .collect();
        assert_eq!(names, ["in-sync", "drift", "in-rollout", "unknown"]);
    }
}
