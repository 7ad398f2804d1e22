//! hotfleet patch bundles.
//!
//! A patch is one file: a manifest (target build, parent patch, per-module
//! sha256, author, created-at, description), the new source of every module it
//! lists, and an ed25519 signature over the manifest. The patch id is the hex
//! sha256 of the manifest's canonical bytes, so a patch is content-addressed:
//! whoever holds the id can check the bundle they fetched is the one meant.
//!
//! Everything that reads a bundle goes through [`Bundle::decode`], which
//! refuses malformed, truncated, oversized or inconsistent input before any
//! caller sees a module; [`Bundle::verify`] then checks the signature against
//! the keys the caller trusts.

mod bundle;
mod error;
mod keys;
mod manifest;
mod modules;
pub mod source_tree;

pub use bundle::{Bundle, Limits, BUNDLE_MAGIC};
pub use error::PatchError;
pub use keys::{key_id, SigningKeyFile, TrustedKeys};
pub use manifest::{Manifest, ModuleEntry, MANIFEST_FORMAT};
pub use modules::validate_module_name;

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// Whether `id` looks like a patch id (64 lowercase hex digits).
pub fn is_patch_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
