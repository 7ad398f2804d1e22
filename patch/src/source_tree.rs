//! Picking a patch's modules from source trees: the `.py` files that differ
//! from a base tree or a git revision, or modules named explicitly.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{validate_module_name, PatchError};

/// Every module under `root/<package>` for each package: name -> source.
pub fn scan(root: &Path, packages: &[String]) -> Result<BTreeMap<String, String>, PatchError> {
    let mut out = BTreeMap::new();
    for package in packages {
        let single = root.join(format!("{package}.py"));
        if single.is_file() {
            out.insert(package.clone(), read_source(&single)?);
        }
        let dir = root.join(package);
        if dir.is_dir() {
            walk(&dir, package, &mut out)?;
        }
    }
    for name in out.keys() {
        validate_module_name(name, packages)?;
    }
    Ok(out)
}

fn walk(dir: &Path, dotted: &str, out: &mut BTreeMap<String, String>) -> Result<(), PatchError> {
    let mut entries: Vec<PathBuf> =
        fs::read_dir(dir).map_err(|e| PatchError::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if path.is_dir() {
            if name != "__pycache__" && !name.starts_with('.') {
                walk(&path, &format!("{dotted}.{name}"), out)?;
            }
        } else if let Some(stem) = name.strip_suffix(".py") {
            let module = if stem == "__init__" { dotted.to_string() } else { format!("{dotted}.{stem}") };
            out.insert(module, read_source(&path)?);
        }
    }
    Ok(())
}

fn read_source(path: &Path) -> Result<String, PatchError> {
    let bytes = fs::read(path).map_err(|e| PatchError::io(path, e))?;
    String::from_utf8(bytes).map_err(|_| PatchError::Build(format!("{}: source is not UTF-8", path.display())))
}

/// What a build picked, and what it noticed but cannot ship.
#[derive(Debug, Default)]
pub struct Picked {
    pub modules: Vec<(String, String)>,
    /// Modules present in the base but gone now: a hot patch cannot delete a module.
    pub removed: Vec<String>,
}

/// Modules of `root` that differ from (or are absent in) `base`.
pub fn changed_against_dir(root: &Path, base: &Path, packages: &[String]) -> Result<Picked, PatchError> {
    let new = scan(root, packages)?;
    let old = scan(base, packages)?;
    Ok(diff(new, &old))
}

/// A module of `old` missing from `new` counts as removed only when `new`
/// holds its top-level package (`zone/__init__.py`): a root holding just
/// the changed files (an overlay) removes nothing, it leaves the rest alone.
fn diff(new: BTreeMap<String, String>, old: &BTreeMap<String, String>) -> Picked {
    let package_kept = |name: &str| name.split('.').next().is_some_and(|top| top != name && new.contains_key(top));
    let removed = old.keys().filter(|name| !new.contains_key(*name) && package_kept(name)).cloned().collect();
    let modules = new.into_iter().filter(|(name, src)| old.get(name) != Some(src)).collect();
    Picked { modules, removed }
}

/// Modules changed in a git revision range `FROM..TO` (TO defaults to HEAD),
/// with their source as of TO. `root` is the source root inside a git work tree.
pub fn changed_in_git(root: &Path, range: &str, packages: &[String]) -> Result<Picked, PatchError> {
    let (from, to) = match range.split_once("..") {
        Some((from, to)) => (from, if to.is_empty() { "HEAD" } else { to }),
        None => (range, "HEAD"),
    };
    for rev in [from, to] {
        if rev.is_empty() || rev.starts_with('-') {
            return Err(PatchError::Build(format!("bad revision range {range:?}: expected FROM..TO")));
        }
    }
    let listing = git(root, &["diff", "--name-only", "--relative", "--no-renames", from, to, "--", "."])?;
    let mut picked = Picked::default();
    for path in listing.lines().filter(|p| p.ends_with(".py")) {
        let Some(module) = module_for_path(path) else { continue };
        if validate_module_name(&module, packages).is_err() {
            continue; // a changed file outside the declared packages is not part of this patch
        }
        match git(root, &["show", &format!("{to}:./{path}")]) {
            Ok(source) => picked.modules.push((module, source)),
            Err(_) => picked.removed.push(module),
        }
    }
    Ok(picked)
}

fn module_for_path(path: &str) -> Option<String> {
    let stem = path.strip_suffix(".py")?;
    let dotted = stem.replace('/', ".");
    Some(dotted.strip_suffix(".__init__").map(str::to_string).unwrap_or(dotted))
}

fn git(dir: &Path, args: &[&str]) -> Result<String, PatchError> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|err| PatchError::Build(format!("cannot run git: {err}")))?;
    if !output.status.success() {
        return Err(PatchError::Build(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    String::from_utf8(output.stdout).map_err(|_| PatchError::Build("git printed non-UTF-8 output".into()))
}

/// Sources of explicitly named modules from `root`.
pub fn named(root: &Path, names: &[String], packages: &[String]) -> Result<Picked, PatchError> {
    let all = scan(root, packages)?;
    let mut picked = Picked::default();
    for name in names {
        validate_module_name(name, packages)?;
        let source = all
            .get(name)
            .ok_or_else(|| PatchError::Build(format!("module {name} not found under {}", root.display())))?;
        picked.modules.push((name.clone(), source.clone()));
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_changed_and_new_modules_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (old, new) = (tmp.path().join("old/zone"), tmp.path().join("new/zone"));
        for dir in [&old, &new] {
            fs::create_dir_all(dir.join("ai")).expect("mkdir");
            fs::write(dir.join("__init__.py"), "").expect("write");
            fs::write(dir.join("same.py"), "x = 1\n").expect("write");
        }
        fs::write(old.join("combat.py"), "D = 1\n").expect("write");
        fs::write(new.join("combat.py"), "D = 2\n").expect("write");
        fs::write(new.join("ai/brain.py"), "y = 1\n").expect("write");
        fs::write(old.join("gone.py"), "z = 1\n").expect("write");
        let picked =
            changed_against_dir(&tmp.path().join("new"), &tmp.path().join("old"), &["zone".into()]).expect("diff");
        let names: Vec<_> = picked.modules.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["zone.ai.brain", "zone.combat"]);
        assert_eq!(picked.removed, ["zone.gone"]);
    }

    #[test]
    fn a_root_of_changed_files_only_removes_nothing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (old, new) = (tmp.path().join("old/zone"), tmp.path().join("new/zone"));
        for dir in [&old, &new] {
            fs::create_dir_all(dir).expect("mkdir");
        }
        fs::write(old.join("__init__.py"), "").expect("write");
        fs::write(old.join("world.py"), "W = 1\n").expect("write");
        fs::write(old.join("combat.py"), "D = 1\n").expect("write");
        fs::write(new.join("combat.py"), "D = 2\n").expect("write");
        let picked =
            changed_against_dir(&tmp.path().join("new"), &tmp.path().join("old"), &["zone".into()]).expect("diff");
        assert_eq!(picked.modules.len(), 1);
        assert!(picked.removed.is_empty(), "{:?}", picked.removed);
    }

    #[test]
    fn maps_paths_to_module_names() {
        assert_eq!(module_for_path("zone/__init__.py").as_deref(), Some("zone"));
        assert_eq!(module_for_path("zone/a/b.py").as_deref(), Some("zone.a.b"));
    }
}
