//! The manifest: what a patch is, in canonical JSON.

use serde::{Deserialize, Serialize};

use crate::{validate_module_name, PatchError};

/// Format tag written into every manifest.
pub const MANIFEST_FORMAT: &str = "hotfleet-patch/1";

/// One module a patch carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleEntry {
    pub name: String,
    /// Lowercase hex sha256 of the module's UTF-8 source.
    pub sha256: String,
    pub size: u64,
}

/// The signed, hashed description of a patch. Field order is the canonical
/// JSON order; modules are kept sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// Build id of the game servers this patch applies to.
    pub target_build: String,
    /// Patch this one is built on, if any (patch stacks).
    pub parent: Option<String>,
    /// Top-level packages the modules live in.
    pub packages: Vec<String>,
    pub modules: Vec<ModuleEntry>,
    pub author: String,
    /// RFC 3339 UTC timestamp.
    pub created_at: String,
    pub description: String,
}

impl Manifest {
    /// The exact bytes that are hashed (patch id) and signed.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Serialising a struct of strings and vectors cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Structural checks every reader runs.
    pub fn validate(&self) -> Result<(), PatchError> {
        let bad = |msg: String| PatchError::InvalidManifest(msg);
        if self.format != MANIFEST_FORMAT {
            return Err(bad(format!("unknown format {:?} (this hotfleet reads {MANIFEST_FORMAT})", self.format)));
        }
        if self.target_build.trim().is_empty() {
            return Err(bad("target_build is empty".into()));
        }
        if let Some(parent) = &self.parent {
            if !crate::is_patch_id(parent) {
                return Err(bad(format!("parent {parent:?} is not a patch id")));
            }
        }
        if self.packages.is_empty() {
            return Err(bad("no packages declared".into()));
        }
        for pkg in &self.packages {
            if pkg.contains('.') {
                return Err(bad(format!("package {pkg:?} must be a top-level name")));
            }
            validate_module_name(pkg, std::slice::from_ref(pkg))?;
        }
        if self.modules.is_empty() {
            return Err(bad("the patch changes no module".into()));
        }
        for pair in self.modules.windows(2) {
            if pair[0].name >= pair[1].name {
                return Err(bad(format!("modules not sorted or duplicated at {:?}", pair[1].name)));
            }
        }
        for module in &self.modules {
            validate_module_name(&module.name, &self.packages)?;
            if module.sha256.len() != 64 || !module.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("module {}: sha256 is not 64 hex digits", module.name)));
            }
        }
        Ok(())
    }
}
