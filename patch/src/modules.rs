//! Module-name rules: a patch may only name dotted Python identifiers inside
//! the packages it declares, so a bundle can never point a runtime at a path.

use crate::PatchError;

/// Longest module name accepted.
pub const MAX_MODULE_NAME: usize = 200;

const PYTHON_KEYWORDS: &[&str] = &[
    "False", "None", "True", "and", "as", "assert", "async", "await", "break", "class", "continue", "def", "del",
    "elif", "else", "except", "finally", "for", "from", "global", "if", "import", "in", "is", "lambda", "nonlocal",
    "not", "or", "pass", "raise", "return", "try", "while", "with", "yield",
];

/// Checks `name` is a dotted identifier equal to, or under, one of `packages`.
pub fn validate_module_name(name: &str, packages: &[String]) -> Result<(), PatchError> {
    let invalid = |reason: &str| PatchError::InvalidModule { module: name.to_string(), reason: reason.to_string() };
    if name.is_empty() {
        return Err(invalid("empty module name"));
    }
    if name.len() > MAX_MODULE_NAME {
        return Err(invalid("module name too long"));
    }
    for part in name.split('.') {
        let mut chars = part.chars();
        let starts_ok = chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic());
        if !starts_ok || !chars.all(|c| c == '_' || c.is_ascii_alphanumeric()) {
            return Err(invalid("must be a dotted Python identifier (no paths, no '..', no leading or trailing dot)"));
        }
        if PYTHON_KEYWORDS.contains(&part) {
            return Err(invalid("a Python keyword cannot be a module name"));
        }
    }
    let inside = packages
        .iter()
        .any(|pkg| name == pkg || name.strip_prefix(pkg.as_str()).is_some_and(|rest| rest.starts_with('.')));
    if !inside {
        return Err(invalid(&format!("is outside the patch's packages ({})", packages.join(", "))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Vec<String> {
        vec!["zone".to_string()]
    }

    #[test]
    fn accepts_package_and_submodules() {
        for ok in ["zone", "zone.combat", "zone.ai.pathing", "zone._private"] {
            validate_module_name(ok, &zone()).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn refuses_paths_traversal_and_outsiders() {
        for bad in [
            "",
            "../zone",
            "/etc/passwd",
            "zone/combat",
            "zone..x",
            ".zone",
            "zone.",
            "zonex",
            "os",
            "zone.class",
            "zone.1x",
            "zone.c\u{e9}",
        ] {
            assert!(validate_module_name(bad, &zone()).is_err(), "{bad:?} accepted");
        }
    }
}
