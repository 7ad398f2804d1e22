//! The patch stack of each build as the fleet's desired state: which patch
//! may be rolled out next (the one whose parent is the stack's top), and the
//! stack as an operator lists it (who rolled each patch out, and when).
//!
//! Agents refuse a prepare whose manifest parent is not the top of a
//! process's stack; checking the same rule at `rollout start`, against the
//! store, refuses such a rollout before any node is touched and names the top
//! the patch must be built on. A revert (`rollout revert`) takes a patch off:
//! the top always, a deeper one when the patches above it touch none of its
//! modules; a rebase (`--rebase`) puts a patch built on an ancestor of the top
//! on top under the same independence rule. Refusals name the patches in the way.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    error::{Error, Result},
    rollout::RolloutKind,
    store::{PatchRecord, StackEntry, Store},
};

/// A rollout start the build's stack refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StackError {
    #[error("refused: patch {patch} names parent {parent} but the top of build {build}'s patch stack is {top}; build it on the top (`hotfleet patch build --parent {top_id}`) and push that")]
    NotOnTop { patch: String, parent: String, build: String, top: String, top_id: String },
    #[error("refused: patch {patch} is not on build {build}'s patch stack ({stack}): only a completed patch can be reverted (`hotfleet patch stack --build {build}`)")]
    NotOnStack { patch: String, build: String, stack: String },
    #[error("refused: patch {patch} is rebased on {parent}, which is not on build {build}'s patch stack; build it on a patch of the stack")]
    ParentMissing { patch: String, parent: String, build: String },
    #[error("refused: the {what} of patch {patch} is blocked by patches above it on build {build}'s stack that touch its modules: {blocking}; {hint}")]
    InTheWay { what: &'static str, patch: String, build: String, blocking: String, hint: &'static str },
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

/// Whether a rollout of `kind` may start with `patch` on its build's `stack`
/// (oldest first); `modules` names the modules of the stack's patches (a
/// patch whose record is gone touches none that are known).
pub fn check(
    stack: &[StackEntry],
    patch: &PatchRecord,
    kind: RolloutKind,
    modules: &BTreeMap<String, Vec<String>>,
) -> Result<(), StackError> {
    let position = |id: &str| stack.iter().position(|e| e.patch_id == id);
    let above = match kind {
        RolloutKind::Apply => return check_parent(stack, patch),
        RolloutKind::Rebase if patch.parent_patch_id.is_empty() => stack,
        RolloutKind::Rebase => match position(&patch.parent_patch_id) {
            _ if position(&patch.patch_id).is_some() => return Ok(()),
            Some(at) => &stack[at + 1..],
            None => {
                return Err(StackError::ParentMissing {
                    patch: short(&patch.patch_id),
                    parent: short(&patch.parent_patch_id),
                    build: patch.target_build.clone(),
                })
            }
        },
        RolloutKind::Revert => match position(&patch.patch_id) {
            Some(at) => &stack[at + 1..],
            None => {
                let ids: Vec<String> = stack.iter().map(|e| short(&e.patch_id)).collect();
                return Err(StackError::NotOnStack {
                    patch: short(&patch.patch_id),
                    build: patch.target_build.clone(),
                    stack: if ids.is_empty() { "it is empty".into() } else { format!("it holds {}", ids.join(", ")) },
                });
            }
        },
    };
    let mine: BTreeSet<&String> = patch.modules.iter().collect();
    let blocking: Vec<String> = above
        .iter()
        .filter(|e| modules.get(&e.patch_id).is_some_and(|m| m.iter().any(|m| mine.contains(m))))
        .map(|e| short(&e.patch_id))
        .collect();
    if blocking.is_empty() {
        return Ok(());
    }
    let (what, hint) = match kind {
        RolloutKind::Revert => ("revert", "revert those first, newest first"),
        _ => ("rebase", "build the patch on the top instead"),
    };
    Err(StackError::InTheWay {
        what,
        patch: short(&patch.patch_id),
        build: patch.target_build.clone(),
        blocking: blocking.join(", "),
        hint,
    })
}

/// [`check`] against the store: the build's stack and its patches' modules.
pub async fn check_start(store: &dyn Store, patch: &PatchRecord, kind: RolloutKind) -> Result<()> {
    let stack = store.patch_stack(&patch.target_build).await?;
    let mut modules = BTreeMap::new();
    if kind != RolloutKind::Apply {
        for entry in &stack {
            if let Some(record) = store.patch(&entry.patch_id).await? {
                modules.insert(entry.patch_id.clone(), record.modules);
            }
        }
    }
    Ok(check(&stack, patch, kind, &modules)?)
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

    /// a (combat) <- b (chat) <- c (combat): b is independent of a, c is not.
    fn three() -> (Vec<StackEntry>, BTreeMap<String, Vec<String>>) {
        let (a, b, c) = (id('a'), id('b'), id('c'));
        let stack = vec![entry(&a, ""), entry(&b, &a), entry(&c, &b)];
        let modules = [(a, "zone.combat"), (b, "zone.chat"), (c, "zone.combat")]
            .into_iter()
            .map(|(id, m)| (id, vec![m.to_string()]))
            .collect();
        (stack, modules)
    }

    fn touching(patch_id: &str, parent: &str, module: &str) -> PatchRecord {
        PatchRecord { modules: vec![module.into()], ..patch(patch_id, parent) }
    }

    #[test]
    fn a_revert_takes_the_top_or_a_deeper_patch_nothing_above_depends_on() {
        let (stack, modules) = three();
        let (a, b, c) = (id('a'), id('b'), id('c'));
        let revert = |p: &PatchRecord, n: usize| check(&stack[..n], p, RolloutKind::Revert, &modules);
        revert(&touching(&c, &b, "zone.combat"), 3).expect("the top");
        revert(&touching(&b, &a, "zone.chat"), 3).expect("c touches combat only");
        revert(&touching(&a, "", "zone.combat"), 2).expect("only b (chat) above");
        let err = revert(&touching(&a, "", "zone.combat"), 3).expect_err("c touches combat").to_string();
        for part in ["revert of patch aaaaaaaaaaaa", "build b1", "touch its modules: cccccccccccc", "newest first"] {
            assert!(err.contains(part), "{part:?} missing from: {err}");
        }
        assert!(!err.contains("bbbbbbbbbbbb"), "an independent patch is not in the way: {err}");
        let err = revert(&touching(&id('d'), &c, "zone.combat"), 3).expect_err("not on the stack").to_string();
        assert!(
            err.contains(
                "dddddddddddd is not on build b1's patch stack (it holds aaaaaaaaaaaa, bbbbbbbbbbbb, cccccccccccc)"
            ),
            "{err}"
        );
        let err = revert(&touching(&a, "", "zone.combat"), 0).expect_err("empty").to_string();
        assert!(err.contains("(it is empty)"), "{err}");
    }

    #[test]
    fn a_rebase_goes_above_independent_patches_onto_a_parent_of_the_stack() {
        let (stack, modules) = three();
        let (a, b, c, d) = (id('a'), id('b'), id('c'), id('d'));
        let rebase = |p: &PatchRecord| check(&stack, p, RolloutKind::Rebase, &modules);
        rebase(&touching(&d, &b, "zone.loot")).expect("b's descendants touch no loot");
        rebase(&touching(&d, &a, "zone.loot")).expect("on the first patch");
        rebase(&touching(&d, "", "zone.loot")).expect("a build's first patch, rebased on the whole stack");
        rebase(&touching(&d, &c, "zone.combat")).expect("on the top it is an ordinary patch");
        rebase(&touching(&b, &a, "zone.chat")).expect("already on the stack");
        let err = rebase(&touching(&d, &a, "zone.chat")).expect_err("b touches chat").to_string();
        assert!(err.contains("rebase of patch dddddddddddd"), "{err}");
        assert!(err.contains(": bbbbbbbbbbbb;") && err.contains("on the top instead"), "{err}");
        let err = rebase(&touching(&d, &a, "zone.combat")).expect_err("c touches combat").to_string();
        assert!(err.contains(": cccccccccccc;"), "{err}");
        let err = rebase(&touching(&d, &id('e'), "zone.loot")).expect_err("unknown parent").to_string();
        assert!(err.contains("rebased on eeeeeeeeeeee, which is not on build b1's patch stack"), "{err}");
        // Without --rebase the ordinary rule holds.
        check(&stack, &touching(&d, &a, "zone.loot"), RolloutKind::Apply, &modules).expect_err("not the top");
    }
}
