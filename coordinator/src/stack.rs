//! The patch stack of each build as the fleet's desired state: which patch
//! may be rolled out next (the one whose parent is the stack's top), and the
//! stack as an operator lists it (who rolled each patch out, and when).
//!
//! Agents refuse a prepare whose manifest parent is not the top of a
//! process's stack; checking the same rule at `rollout start`, against the
//! store, refuses such a rollout before any node is touched and names the top
//! the patch must be built on.

use crate::{
    error::{Error, Result},
    store::{PatchRecord, StackEntry, Store},
};

/// A rollout start the build's stack refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StackError {
    #[error("refused: patch {patch} names parent {parent} but the top of build {build}'s patch stack is {top}; build it on the top (`hotfleet patch build --parent {top_id}`) and push that")]
    NotOnTop { patch: String, parent: String, build: String, top: String, top_id: String },
}

fn short(id: &str) -> String {
    id.get(..12).unwrap_or(id).to_string()
}

/// Whether `patch` may be rolled out onto `stack` (its build's, oldest
/// first): its parent must be the top (no parent: an empty stack). A patch
/// already on the stack passes: rolling it out again changes nothing on a
/// process that runs it and repairs one that does not.
pub fn check_parent(stack: &[StackEntry], patch: &PatchRecord) -> Result<(), StackError> {
    let top = stack.last().map(|e| e.patch_id.as_str()).unwrap_or_default();
    if patch.parent_patch_id == top || stack.iter().any(|e| e.patch_id == patch.patch_id) {
        return Ok(());
    }
    let name = |id: &str, none: &str| if id.is_empty() { none.to_string() } else { short(id) };
    Err(StackError::NotOnTop {
        patch: short(&patch.patch_id),
        parent: name(&patch.parent_patch_id, "none (a build's first patch)"),
        build: patch.target_build.clone(),
        top: name(top, "empty"),
        top_id: if top.is_empty() { "(none: omit --parent)".to_string() } else { top.to_string() },
    })
}

/// One patch of a build's stack as `hotfleet patch stack` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackLine {
    pub entry: StackEntry,
    /// Who started the rollout that completed it (empty if that rollout is gone).
    pub rolled_out_by: String,
    /// When that rollout started, Unix ms (0 if unknown).
    pub started_at_ms: u64,
    /// The modules the patch replaces (empty if its record is gone).
    pub modules: Vec<String>,
}

/// The build's stack, oldest first, with each patch's rollout and modules
/// from the store (records may have been trimmed: then those stay empty).
pub async fn listing(store: &dyn Store, build: &str) -> Result<Vec<StackLine>> {
    if build.is_empty() {
        return Err(Error::InvalidArgument("name the build whose patch stack to list (--build)".into()));
    }
    let mut lines = Vec::new();
    for entry in store.patch_stack(build).await? {
        let rollout = if entry.rollout_id.is_empty() { None } else { store.rollout(&entry.rollout_id).await? };
        let modules = store.patch(&entry.patch_id).await?.map(|p| p.modules).unwrap_or_default();
        lines.push(StackLine {
            rolled_out_by: rollout.as_ref().map(|r| r.created_by.clone()).unwrap_or_default(),
            started_at_ms: rollout.map(|r| r.created_at_ms).unwrap_or_default(),
            modules,
            entry,
        });
    }
    Ok(lines)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn id(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn entry(patch: &str, parent: &str) -> StackEntry {
        StackEntry {
            patch_id: patch.into(),
            target_build: "b1".into(),
            parent_patch_id: parent.into(),
            description: String::new(),
            rollout_id: String::new(),
            committed_at_ms: 1,
        }
    }

    /// A stored patch's record with only what these checks read.
    pub(crate) fn patch(patch: &str, parent: &str) -> PatchRecord {
        PatchRecord {
            patch_id: patch.into(),
            target_build: "b1".into(),
            parent_patch_id: parent.into(),
            description: String::new(),
            author: String::new(),
            created_at: String::new(),
            modules: vec![],
            size_bytes: 1,
            signer_key_id: String::new(),
            pushed_by: String::new(),
            pushed_at_ms: 0,
        }
    }

    #[test]
    fn a_patch_goes_only_on_the_top_of_its_builds_stack() {
        let (a, b, c) = (id('a'), id('b'), id('c'));
        check_parent(&[], &patch(&a, "")).expect("a build's first patch on an empty stack");
        let stack = [entry(&a, ""), entry(&b, &a)];
        check_parent(&stack, &patch(&c, &b)).expect("on the top");
        check_parent(&stack, &patch(&a, "")).expect("already on the stack");

        let err = check_parent(&stack, &patch(&c, &a)).expect_err("on a patch below the top").to_string();
        for part in ["patch cccccccccccc", "parent aaaaaaaaaaaa", "build b1", "top", "bbbbbbbbbbbb", &b] {
            assert!(err.contains(part), "{part:?} missing from: {err}");
        }
        let err = check_parent(&stack, &patch(&c, "")).expect_err("no parent on a non-empty stack").to_string();
        assert!(err.contains("parent none") && err.contains("--parent bbbbbbbbbbbb"), "{err}");
        let err = check_parent(&[], &patch(&c, &a)).expect_err("a parent the build never got").to_string();
        assert!(err.contains("stack is empty") && err.contains("omit --parent"), "{err}");
    }
}
