//! Signing keys, the development CA, and patch bundles, made with the
//! `hotfleet` CLI.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{DevCerts, FleetError, Layout, Result};

/// A fleet's key material: the patch signing key pair made by `hotfleet
/// keygen`, and the development CA every process's TLS certificate comes from.
#[derive(Debug, Clone)]
pub struct Keys {
    pub secret: PathBuf,
    pub public: PathBuf,
    pub tls: DevCerts,
}

impl Keys {
    pub fn generate(layout: &Layout, dir: &Path) -> Result<Keys> {
        let keys = dir.join("keys");
        layout.cli(&["keygen", "--out", &keys.display().to_string()])?;
        let tls = DevCerts::generate(layout, &dir.join("certs"))?;
        Ok(Keys { secret: keys.join("hotfleet.key"), public: keys.join("hotfleet.pub"), tls })
    }
}

/// What to build with `hotfleet patch build`.
#[derive(Debug, Clone, Copy)]
pub struct PatchBuild<'a> {
    pub package: &'a str,
    pub source_root: &'a Path,
    pub out: &'a Path,
    pub target_build: &'a str,
    pub description: &'a str,
    pub keys: Option<&'a Keys>,
    /// The patch this one goes on top of (None: the build's first patch;
    /// agents refuse a patch whose parent is not the top of a process's stack).
    pub parent: Option<&'a str>,
}

impl<'a> PatchBuild<'a> {
    /// A first patch for the example `zone` package, shipping every module
    /// under `source_root/zone`.
    pub fn zone(
        source_root: &'a Path,
        out: &'a Path,
        target_build: &'a str,
        description: &'a str,
        keys: Option<&'a Keys>,
    ) -> Self {
        Self { package: "zone", source_root, out, target_build, description, keys, parent: None }
    }
}

/// Builds the patch `build` describes with `hotfleet patch build`. Returns
/// (bundle path, patch id).
pub fn build_patch_with(layout: &Layout, build: &PatchBuild<'_>) -> Result<(PathBuf, String)> {
    let PatchBuild { package, source_root, out, target_build, description, keys, parent } = *build;
    let mut args = vec![
        "--output".to_string(),
        "json".into(),
        "patch".into(),
        "build".into(),
        "--root".into(),
        source_root.display().to_string(),
        "--package".into(),
        package.into(),
        "--target-build".into(),
        target_build.into(),
        "--out".into(),
        out.display().to_string(),
        "--description".into(),
        description.into(),
    ];
    // The same module discovery `patch build --base` uses.
    let modules = hotfleet_patch::source_tree::scan(source_root, &[package.to_string()]).map_err(|e| {
        FleetError::Io { what: format!("reading {}", source_root.display()), source: std::io::Error::other(e) }
    })?;
    for module in modules.into_keys() {
        args.push("--module".into());
        args.push(module);
    }
    if let Some(parent) = parent {
        args.push("--parent".into());
        args.push(parent.into());
    }
    if let Some(keys) = keys {
        args.push("--key".into());
        args.push(keys.secret.display().to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let built: Value = serde_json::from_str(&layout.cli(&refs)?)
        .map_err(|e| FleetError::Io { what: "reading patch build output".into(), source: std::io::Error::other(e) })?;
    let id = built["id"].as_str().unwrap_or_default().to_string();
    Ok((out.to_path_buf(), id))
}
