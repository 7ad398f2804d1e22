//! Where on a process's patch stack a change goes, beyond "on the top": a
//! revert of a patch deeper than the top, and a rebased patch whose manifest
//! parent is an ancestor of the top. Both are allowed only when the patches
//! above (the reverted patch, or the named parent) touch none of the patch's
//! modules: their sources then sit on modules the change leaves alone.
//!
//! Pure over stacks and module lists, so the participant asks the runtimes
//! and the patch source, and these rules are unit-tested on their own. The
//! coordinator checks the same rules against its store at `rollout start`.

use std::collections::BTreeSet;

/// A patch above the change on a process's stack, with the modules it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Above {
    pub patch_id: String,
    pub modules: Vec<String>,
}

/// The patches of `above` that touch one of `modules`: the patches in the way.
pub fn in_the_way(modules: &[String], above: &[Above]) -> Vec<String> {
    let mine: BTreeSet<&str> = modules.iter().map(String::as_str).collect();
    above.iter().filter(|a| a.modules.iter().any(|m| mine.contains(m.as_str()))).map(|a| a.patch_id.clone()).collect()
}

/// What a revert of `patch_id` finds on `stack`: nothing to do (not on it),
/// or the ids above it, whose modules decide whether it may go.
pub fn above_reverted<'a>(stack: &'a [String], patch_id: &str) -> Option<&'a [String]> {
    stack.iter().position(|id| id == patch_id).map(|at| &stack[at + 1..])
}

/// The ids above a rebased patch's manifest `parent` on `stack` (the whole
/// stack when it names none), or why it cannot go there: the parent is not
/// on the stack. `Ok(None)`: the patch is on the stack already (a repeat).
pub fn above_parent<'a>(
    stack: &'a [String],
    patch_id: &str,
    parent: Option<&str>,
) -> Result<Option<&'a [String]>, String> {
    if stack.iter().any(|id| id == patch_id) {
        return Ok(None);
    }
    match parent {
        None => Ok(Some(stack)),
        Some(parent) => match stack.iter().position(|id| id == parent) {
            Some(at) => Ok(Some(&stack[at + 1..])),
            None => Err(format!(
                "patch {} is rebased on {} but that patch is not on its patch stack",
                short(patch_id),
                short(parent)
            )),
        },
    }
}

/// The refusal naming the patches in the way (`what`: "revert" or "rebase").
pub fn refusal(what: &str, patch_id: &str, in_the_way: &[String]) -> String {
    let names: Vec<&str> = in_the_way.iter().map(|id| short(id)).collect();
    format!("{what} of patch {} refused: patches above it touch its modules ({})", short(patch_id), names.join(", "))
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn above(id: &str, modules: &[&str]) -> Above {
        Above { patch_id: id.into(), modules: modules.iter().map(|m| m.to_string()).collect() }
    }

    fn ids(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_patches_touching_the_same_modules_are_in_the_way() {
        let mine = ids(&["zone.combat", "zone.loot"]);
        let stack = [above("p2", &["zone.chat"]), above("p3", &["zone.loot"]), above("p4", &["zone.combat"])];
        assert_eq!(in_the_way(&mine, &stack), ["p3", "p4"]);
        assert!(in_the_way(&mine, &stack[..1]).is_empty(), "independent patches above");
        assert!(in_the_way(&mine, &[]).is_empty(), "the top");
    }

    #[test]
    fn a_revert_looks_above_the_patch_and_not_at_all_when_it_is_not_there() {
        let stack = ids(&["p1", "p2", "p3"]);
        assert_eq!(above_reverted(&stack, "p1"), Some(&stack[1..]));
        assert_eq!(above_reverted(&stack, "p3"), Some(&stack[3..]), "the top: nothing above");
        assert_eq!(above_reverted(&stack, "p9"), None);
    }

    #[test]
    fn a_rebase_looks_above_its_parent_which_must_be_on_the_stack() {
        let stack = ids(&["p1", "p2", "p3"]);
        assert_eq!(above_parent(&stack, "p9", Some("p1")), Ok(Some(&stack[1..])));
        assert_eq!(above_parent(&stack, "p9", None), Ok(Some(&stack[..])), "a first patch: all are above");
        assert_eq!(above_parent(&stack, "p2", Some("p1")), Ok(None), "already there");
        let err = above_parent(&stack, "p9", Some("p7")).expect_err("parent missing");
        assert!(err.contains("rebased on p7") && err.contains("not on its patch stack"), "{err}");
        let why = refusal("rebase", "p9", &ids(&["p2", "p3"]));
        assert_eq!(why, "rebase of patch p9 refused: patches above it touch its modules (p2, p3)");
    }
}
