//! The one error type of patch handling; every variant says what is wrong and,
//! where it helps, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("not a hotfleet patch bundle (missing the HFPATCH1 header)")]
    NotABundle,
    #[error("patch bundle is corrupt or truncated: {0}")]
    Corrupt(String),
    #[error("patch manifest is invalid: {0}")]
    InvalidManifest(String),
    #[error("bundle is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("module {module}: {reason}")]
    InvalidModule { module: String, reason: String },
    #[error("module {module}: source does not match the manifest's sha256 (bundle tampered with or corrupted)")]
    DigestMismatch { module: String },
    #[error("patch {id} is not signed: sign it with `hotfleet patch sign --key KEY`")]
    Unsigned { id: String },
    #[error("patch {id} is signed by key {key_id}, which is not trusted here: add its public key to the trusted keys")]
    UntrustedSigner { id: String, key_id: String },
    #[error("patch {id}: signature is invalid (manifest changed after signing, or wrong key)")]
    BadSignature { id: String },
    #[error("key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Build(String),
}

impl PatchError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PatchError::Io { path: path.into(), source }
    }
}
