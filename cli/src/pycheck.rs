//! `patch build`'s syntax check: every module it packs is compiled by the
//! Python the fleet runs (`--python`), so a syntax error is refused on the
//! operator's machine instead of failing every node's prepare.
//!
//! The sources go to the interpreter as JSON on stdin; it answers one JSON
//! list of errors. Only `compile()` runs: nothing of the patch is executed.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{anyhow, Context};

/// Compiles each `(name, source)`; stays on what CPython 3.9 has.
const CHECK: &str = r#"
import json, sys
errors = []
for name, source in json.load(sys.stdin):
    try:
        compile(source, name.replace(".", "/") + ".py", "exec", dont_inherit=True)
    except SyntaxError as e:
        errors.append("%s line %s: %s" % (name, e.lineno, e.msg))
    except ValueError as e:
        errors.append("%s: %s" % (name, e))
json.dump(errors, sys.stdout)
"#;

/// The syntax errors of `modules` under `python` (empty: all compile), or
/// why the interpreter could not be asked.
pub fn syntax_errors(python: &str, modules: &[(String, String)]) -> anyhow::Result<Vec<String>> {
    let mut child = Command::new(python)
        .args(["-I", "-c", CHECK])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("cannot run {python} to compile the modules (give the fleet's Python with --python)")
        })?;
    let input = serde_json::to_vec(modules)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&input).with_context(|| format!("cannot send the modules to {python}"))?;
    }
    let out = child.wait_with_output().with_context(|| format!("{python} did not finish"))?;
    if !out.status.success() {
        return Err(anyhow!("{python} failed to compile the modules: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{python} answered something other than the check's JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, source: &str) -> (String, String) {
        (name.to_string(), source.to_string())
    }

    #[test]
    fn syntax_errors_name_the_module_and_line() {
        let modules = [module("zone.ok", "def f():\n    return 1\n"), module("zone.bad", "x = 1\ndef f(:\n    pass\n")];
        let errors = syntax_errors("python3", &modules).expect("python3 runs");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("zone.bad line 2: "), "{errors:?}");
    }

    #[test]
    fn a_missing_interpreter_is_an_error_naming_the_flag() {
        let err = syntax_errors("/nonexistent/python9", &[module("zone", "")]).expect_err("no interpreter");
        assert!(format!("{err:#}").contains("--python"), "{err:#}");
    }
}
