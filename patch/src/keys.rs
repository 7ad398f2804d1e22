//! ed25519 keys: the signing key a release engineer keeps, and the set of
//! public keys an agent (or coordinator) trusts.
//!
//! Files are one line of text: `hotfleet-ed25519-secret:<64 hex>` or
//! `hotfleet-ed25519-public:<64 hex>`, so they diff, copy and mount as secrets
//! easily. A secret key file is written owner-only.

use std::{
    fs,
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::PatchError;

const SECRET_PREFIX: &str = "hotfleet-ed25519-secret:";
const PUBLIC_PREFIX: &str = "hotfleet-ed25519-public:";

/// Short, stable name of a public key: the first 16 hex digits of its sha256.
pub fn key_id(key: &VerifyingKey) -> String {
    crate::sha256_hex(key.as_bytes())[..16].to_string()
}

/// A signing key loaded from, or written to, a key file.
pub struct SigningKeyFile {
    key: SigningKey,
}

impl SigningKeyFile {
    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Result<Self, PatchError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|err| PatchError::Build(format!("no randomness available for a key: {err}")))?;
        Ok(Self { key: SigningKey::from_bytes(&seed) })
    }

    pub fn load(path: &Path) -> Result<Self, PatchError> {
        let bytes = read_key_line(path, SECRET_PREFIX)?;
        Ok(Self { key: SigningKey::from_bytes(&bytes) })
    }

    /// Writes `<dir>/hotfleet.key` (0600) and `<dir>/hotfleet.pub`; refuses to
    /// overwrite an existing key.
    pub fn write_pair(&self, dir: &Path) -> Result<(PathBuf, PathBuf), PatchError> {
        fs::create_dir_all(dir).map_err(|e| PatchError::io(dir, e))?;
        let secret = dir.join("hotfleet.key");
        let public = dir.join("hotfleet.pub");
        for path in [&secret, &public] {
            if path.exists() {
                return Err(PatchError::Key {
                    path: path.clone(),
                    reason: "already exists; refusing to overwrite a key".into(),
                });
            }
        }
        write_owner_only(&secret, &format!("{SECRET_PREFIX}{}\n", hex::encode(self.key.to_bytes())))?;
        fs::write(&public, format!("{PUBLIC_PREFIX}{}\n", hex::encode(self.public().as_bytes())))
            .map_err(|e| PatchError::io(&public, e))?;
        Ok((secret, public))
    }

    pub fn public(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

#[cfg(unix)]
fn write_owner_only(path: &Path, text: &str) -> Result<(), PatchError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| PatchError::io(path, e))?;
    file.write_all(text.as_bytes()).map_err(|e| PatchError::io(path, e))
}

#[cfg(not(unix))]
fn write_owner_only(path: &Path, text: &str) -> Result<(), PatchError> {
    fs::write(path, text).map_err(|e| PatchError::io(path, e))
}

fn read_key_line(path: &Path, prefix: &str) -> Result<[u8; 32], PatchError> {
    let text = fs::read_to_string(path).map_err(|e| PatchError::io(path, e))?;
    let key_err = |reason: &str| PatchError::Key { path: path.to_path_buf(), reason: reason.to_string() };
    let hex_part = text
        .trim()
        .strip_prefix(prefix)
        .ok_or_else(|| key_err(&format!("expected a line starting with {prefix:?} (made by `hotfleet keygen`)")))?;
    let bytes = hex::decode(hex_part).map_err(|_| key_err("key is not hex"))?;
    bytes.try_into().map_err(|_| key_err("key must be 32 bytes"))
}

/// The public keys whose signatures are accepted.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
}

impl TrustedKeys {
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        Self { keys }
    }

    /// Loads public key files; a directory contributes every `*.pub` inside it.
    pub fn load(paths: &[PathBuf]) -> Result<Self, PatchError> {
        let mut keys = Vec::new();
        for path in paths {
            if path.is_dir() {
                let entries = fs::read_dir(path).map_err(|e| PatchError::io(path, e))?;
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|entry| entry.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|ext| ext == "pub"))
                    .collect();
                files.sort();
                for file in files {
                    keys.push(Self::load_public(&file)?);
                }
            } else {
                keys.push(Self::load_public(path)?);
            }
        }
        Ok(Self { keys })
    }

    pub fn load_public(path: &Path) -> Result<VerifyingKey, PatchError> {
        let bytes = read_key_line(path, PUBLIC_PREFIX)?;
        VerifyingKey::from_bytes(&bytes)
            .map_err(|_| PatchError::Key { path: path.to_path_buf(), reason: "not a valid ed25519 public key".into() })
    }

    pub fn contains(&self, key: &VerifyingKey) -> bool {
        self.keys.iter().any(|k| k == key)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(key_id).collect()
    }
}
