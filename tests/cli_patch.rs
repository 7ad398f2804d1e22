//! The offline patch tooling through the real `hotfleet` binary: keygen, build
//! (from a base tree, a git range, or named modules), sign, verify, show, and
//! every way a bundle can be bad.

use std::{path::Path, process::Command};

use hotfleet_localfleet::Layout;
use serde_json::Value;

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

fn run(layout: &Layout, args: &[&str]) -> (i32, String, String) {
    let out = layout.cli_raw(args).expect("run hotfleet");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .status()
        .expect("git");
    assert!(status.success(), "git {args:?}");
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn keygen_build_sign_verify_show_round_trip() {
    let layout = Layout::for_workspace();
    let tmp = tempfile::tempdir().expect("tmp");
    let (old, new) = (tmp.path().join("old"), tmp.path().join("new"));
    for root in [&old, &new] {
        write(root, "zone/__init__.py", "");
        write(root, "zone/same.py", "X = 1\n");
    }
    write(&old, "zone/combat.py", "def dmg(a, b):\n    return a + b\n");
    write(&new, "zone/combat.py", "def dmg(a, b):\n    return a - b\n");
    write(&new, "zone/ai/brain.py", "def think():\n    return 1\n");

    let keys = tmp.path().join("keys");
    let (code, out, _) = run(&layout, &["keygen", "--out", &s(&keys)]);
    assert_eq!(code, 0);
    assert!(out.contains("key id"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(keys.join("hotfleet.key")).expect("key").permissions().mode();
        assert_eq!(mode & 0o077, 0, "the signing key is owner-only");
    }
    let (code, _, err) = run(&layout, &["keygen", "--out", &s(&keys)]);
    assert_eq!(code, 4, "refuses to overwrite a key: {err}");

    let bundle = tmp.path().join("p.hfpatch");
    let (code, out, err) = run(
        &layout,
        &[
            "--output",
            "json",
            "patch",
            "build",
            "--root",
            &s(&new),
            "--package",
            "zone",
            "--base",
            &s(&old),
            "--target-build",
            "b1",
            "--out",
            &s(&bundle),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let built: Value = serde_json::from_str(&out).expect("json");
    let modules: Vec<&str> =
        built["manifest"]["modules"].as_array().expect("modules").iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(modules, ["zone.ai.brain", "zone.combat"], "only changed and new modules");
    assert_eq!(built["signer"], Value::Null);

    let public = s(&keys.join("hotfleet.pub"));
    let (code, _, err) = run(&layout, &["patch", "verify", &s(&bundle), "--trusted-key", &public]);
    assert_eq!(code, 4, "unsigned bundles are refused");
    assert!(err.contains("not signed"), "{err}");

    let (code, _, err) = run(&layout, &["patch", "sign", &s(&bundle), "--key", &s(&keys.join("hotfleet.key"))]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(&layout, &["patch", "verify", &s(&bundle), "--trusted-key", &public]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(built["id"].as_str().expect("id")), "signing keeps the patch id");

    // Another key: untrusted.
    let other = tmp.path().join("other");
    run(&layout, &["keygen", "--out", &s(&other)]);
    let (code, _, err) =
        run(&layout, &["patch", "verify", &s(&bundle), "--trusted-key", &s(&other.join("hotfleet.pub"))]);
    assert_eq!(code, 4);
    assert!(err.contains("not trusted"), "{err}");

    let (code, out, _) = run(&layout, &["--output", "json", "patch", "show", &s(&bundle), "--sources"]);
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(shown["manifest"]["targetBuild"], "b1");
    assert!(shown["sources"]["zone.combat"].as_str().expect("source").contains("a - b"));
}

#[test]
fn bad_bundles_and_bad_input_are_refused_with_clear_errors() {
    let layout = Layout::for_workspace();
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("src");
    write(&root, "zone/combat.py", "X = 1\n");
    let keys = tmp.path().join("keys");
    run(&layout, &["keygen", "--out", &s(&keys)]);
    let bundle = tmp.path().join("p.hfpatch");
    let (code, _, err) = run(
        &layout,
        &[
            "patch",
            "build",
            "--root",
            &s(&root),
            "--package",
            "zone",
            "--module",
            "zone.combat",
            "--target-build",
            "b1",
            "--key",
            &s(&keys.join("hotfleet.key")),
            "--out",
            &s(&bundle),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::read(&bundle).expect("bundle");
    let public = s(&keys.join("hotfleet.pub"));
    let check = |name: &str, data: &[u8], needle: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, data).expect("write");
        for args in [
            vec!["patch", "show", path.to_str().expect("utf-8")],
            vec!["patch", "verify", path.to_str().expect("utf-8"), "--trusted-key", &public],
        ] {
            let (code, _, err) = run(&layout, &args);
            assert_eq!(code, 4, "{name}: {args:?} must refuse");
            assert!(err.contains(needle), "{name}: expected {needle:?} in {err}");
        }
    };
    check("truncated.hfpatch", &bytes[..bytes.len() / 2], "corrupt or truncated");
    check("garbage.hfpatch", b"not a patch at all", "not a hotfleet patch bundle");
    let mut tampered = bytes.clone();
    let pos = tampered.windows(5).position(|w| w == b"X = 1").expect("source in bundle");
    tampered[pos + 4] = b'9';
    check("tampered.hfpatch", &tampered, "does not match the manifest");

    // Module names: no paths, no outsiders, no traversal.
    for module in ["../etc/passwd", "os", "zone/combat", "zone..x"] {
        let (code, _, err) = run(
            &layout,
            &[
                "patch",
                "build",
                "--root",
                &s(&root),
                "--package",
                "zone",
                "--module",
                module,
                "--target-build",
                "b1",
                "--out",
                &s(&tmp.path().join("x.hfpatch")),
            ],
        );
        assert_eq!(code, 4, "module {module:?} must be refused: {err}");
        assert!(err.contains(module) || err.contains("outside"), "{err}");
    }
    // Nothing changed: refused, nothing written.
    let (code, _, err) = run(
        &layout,
        &[
            "patch",
            "build",
            "--root",
            &s(&root),
            "--package",
            "zone",
            "--base",
            &s(&root),
            "--target-build",
            "b1",
            "--out",
            &s(&tmp.path().join("empty.hfpatch")),
        ],
    );
    assert_eq!(code, 4);
    assert!(err.contains("no module changed"), "{err}");
    assert!(!tmp.path().join("empty.hfpatch").exists());
}

#[test]
fn build_from_a_git_range_ships_what_changed_at_the_second_revision() {
    let layout = Layout::for_workspace();
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = tmp.path().join("game");
    write(&repo, "src/zone/__init__.py", "");
    write(&repo, "src/zone/combat.py", "D = 1\n");
    write(&repo, "src/zone/loot.py", "L = 1\n");
    write(&repo, "README", "game\n");
    git(&repo, &["init", "-q"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-qm", "v1"]);
    git(&repo, &["tag", "v1"]);
    write(&repo, "src/zone/combat.py", "D = 2\n");
    write(&repo, "README", "game 2\n");
    git(&repo, &["commit", "-qam", "v2"]);
    // Uncommitted work must not leak into a patch built from a range.
    write(&repo, "src/zone/loot.py", "L = 999\n");
    let bundle = tmp.path().join("g.hfpatch");
    let (code, out, err) = run(
        &layout,
        &[
            "--output",
            "json",
            "patch",
            "build",
            "--root",
            &s(&repo.join("src")),
            "--package",
            "zone",
            "--git",
            "v1..HEAD",
            "--target-build",
            "b1",
            "--out",
            &s(&bundle),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let built: Value = serde_json::from_str(&out).expect("json");
    let modules: Vec<&str> =
        built["manifest"]["modules"].as_array().expect("modules").iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(modules, ["zone.combat"]);
    let (_, shown, _) = run(&layout, &["--output", "json", "patch", "show", &s(&bundle), "--sources"]);
    let shown: Value = serde_json::from_str(&shown).expect("json");
    assert_eq!(shown["sources"]["zone.combat"], "D = 2\n");
    let (code, _, err) = run(
        &layout,
        &[
            "patch",
            "build",
            "--root",
            &s(&repo.join("src")),
            "--package",
            "zone",
            "--git",
            "nope..HEAD",
            "--target-build",
            "b1",
            "--out",
            &s(&bundle),
        ],
    );
    assert_eq!(code, 4);
    assert!(err.contains("git"), "{err}");
}
