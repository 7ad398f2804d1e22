//! Patch download and verification.
//!
//! Bundles come from the coordinator's `FetchPatch` stream and are cached on
//! disk by digest (`<data-dir>/patches/<id>.hfpatch`). Before any runtime sees
//! a module, the bundle is decoded (structure, sizes, every module digest),
//! its id recomputed and compared to the id asked for, and its signature
//! checked against the keys this agent trusts. A cached file is re-verified
//! on every read: the cache is a convenience, never a trust anchor.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use async_trait::async_trait;
use hotfleet_patch::{Bundle, Limits, PatchError, TrustedKeys};
use hotfleet_proto::v1::{FetchPatchRequest, GetPatchStackRequest, PatchRef};

use crate::coordinators::Coordinators;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("patch id {0:?} is not a patch id (64 hex digits)")]
    BadId(String),
    #[error("no coordinator configured to fetch patch {0} from (start the agent with --coordinator)")]
    NoCoordinator(String),
    #[error("fetching patch {id} from the coordinator failed: {message}")]
    Transport { id: String, message: String },
    #[error("coordinator sent an inconsistent stream for patch {id}: {message}")]
    BadStream { id: String, message: String },
    #[error("bundle fetched for {wanted} is patch {got}: refused")]
    WrongPatch { wanted: String, got: String },
    #[error("patch {id} refused: {source}")]
    Invalid {
        id: String,
        #[source]
        source: PatchError,
    },
    #[error("patch cache {path}: {source}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the participant gets verified bundles from: the seam that lets it be
/// unit-tested without a coordinator.
#[async_trait]
pub trait Patches: Send + Sync + 'static {
    /// The bundle `id`, decoded and verified (digests, id, trusted signature).
    async fn fetch(&self, id: &str) -> Result<Bundle, FetchError>;
}

#[async_trait]
impl Patches for PatchSource {
    async fn fetch(&self, id: &str) -> Result<Bundle, FetchError> {
        self.get(id).await
    }
}

/// Fetches, caches and verifies patch bundles.
#[derive(Clone)]
pub struct PatchSource {
    cache_dir: PathBuf,
    trusted: TrustedKeys,
    limits: Limits,
    coordinator: Option<Coordinators>,
    timeout: Duration,
}

impl PatchSource {
    pub fn new(data_dir: &Path, trusted: TrustedKeys, coordinator: Option<Coordinators>) -> Result<Self, FetchError> {
        let cache_dir = data_dir.join("patches");
        std::fs::create_dir_all(&cache_dir).map_err(|source| FetchError::Cache { path: cache_dir.clone(), source })?;
        Ok(Self { cache_dir, trusted, limits: Limits::default(), coordinator, timeout: Duration::from_secs(30) })
    }

    /// The verified bundle for `id`, from the cache or the coordinator.
    pub async fn get(&self, id: &str) -> Result<Bundle, FetchError> {
        if !hotfleet_patch::is_patch_id(id) {
            return Err(FetchError::BadId(id.to_string()));
        }
        let path = self.cache_dir.join(format!("{id}.hfpatch"));
        if let Ok(bytes) = tokio::fs::read(&path).await {
            match self.check(id, &bytes) {
                Ok(bundle) => return Ok(bundle),
                Err(err) => {
                    tracing::warn!(patch = %id, error = %err, "cached bundle failed verification; fetching it again");
                    let _ = tokio::fs::remove_file(&path).await;
                }
            }
        }
        let bytes = self.download(id).await?;
        let bundle = self.check(id, &bytes)?;
        let tmp = path.with_extension("tmp");
        let write = async {
            tokio::fs::write(&tmp, &bytes).await?;
            tokio::fs::rename(&tmp, &path).await
        };
        if let Err(source) = write.await {
            // A full disk must not fail a prepare: the verified bundle is in memory.
            tracing::warn!(path = %path.display(), error = %source, "could not cache patch bundle");
        }
        Ok(bundle)
    }

    /// Decodes and verifies `bytes` as patch `id`.
    pub fn check(&self, id: &str, bytes: &[u8]) -> Result<Bundle, FetchError> {
        let bundle =
            Bundle::decode(bytes, &self.limits).map_err(|source| FetchError::Invalid { id: id.to_string(), source })?;
        if bundle.id() != id {
            return Err(FetchError::WrongPatch { wanted: id.to_string(), got: bundle.id() });
        }
        bundle.verify(&self.trusted).map_err(|source| FetchError::Invalid { id: id.to_string(), source })?;
        Ok(bundle)
    }

    /// Downloads from the followed coordinator, then from the others: any
    /// coordinator serves patches (they are reads from the shared store).
    async fn download(&self, id: &str) -> Result<Vec<u8>, FetchError> {
        let coordinators = self.coordinator.as_ref().ok_or_else(|| FetchError::NoCoordinator(id.to_string()))?;
        let mut last = None;
        for (addr, client) in coordinators.all() {
            match self.download_from(id, client).await {
                Ok(bytes) => return Ok(bytes),
                // Only a transport failure is worth another coordinator: a
                // bad stream or a missing patch would be the same everywhere.
                Err(err @ FetchError::Transport { .. }) => {
                    tracing::debug!(coordinator = %addr, error = %err, "patch download failed; trying the next coordinator");
                    last = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last.unwrap_or_else(|| FetchError::NoCoordinator(id.to_string())))
    }

    async fn download_from(
        &self,
        id: &str,
        mut client: crate::coordinators::GatewayClient,
    ) -> Result<Vec<u8>, FetchError> {
        let transport = |message: String| FetchError::Transport { id: id.to_string(), message };
        let bad = |message: String| FetchError::BadStream { id: id.to_string(), message };
        let mut request = tonic::Request::new(FetchPatchRequest { patch_id: id.to_string() });
        request.set_timeout(self.timeout);
        let mut stream =
            client.fetch_patch(request).await.map_err(|s| transport(s.message().to_string()))?.into_inner();
        let mut bytes = Vec::new();
        let mut expected: Option<u64> = None;
        while let Some(chunk) = stream.message().await.map_err(|s| transport(s.message().to_string()))? {
            let total = *expected.get_or_insert(chunk.total_size);
            if chunk.total_size != total || chunk.offset != bytes.len() as u64 {
                return Err(bad(format!("chunk at offset {} does not follow {} bytes", chunk.offset, bytes.len())));
            }
            if total > self.limits.max_bundle_bytes as u64 || bytes.len() + chunk.data.len() > total as usize {
                return Err(bad(format!("stream exceeds its announced size {total}")));
            }
            bytes.extend_from_slice(&chunk.data);
        }
        if expected.is_some_and(|total| total != bytes.len() as u64) {
            return Err(bad("stream ended before the announced size".into()));
        }
        Ok(bytes)
    }

    /// The committed patch stack for `build`, oldest first, each bundle verified.
    pub async fn stack(&self, build: &str) -> Result<Vec<(PatchRef, Bundle)>, FetchError> {
        let coordinators = self.coordinator.as_ref().ok_or_else(|| FetchError::NoCoordinator("stack".into()))?;
        let mut refs = None;
        let mut last = String::new();
        for (addr, mut client) in coordinators.all() {
            let mut request = tonic::Request::new(GetPatchStackRequest { target_build: build.to_string() });
            request.set_timeout(self.timeout);
            match client.get_patch_stack(request).await {
                Ok(r) => {
                    refs = Some(r.into_inner().patches);
                    break;
                }
                Err(s) => last = format!("{addr}: {}", s.message()),
            }
        }
        let refs =
            refs.ok_or_else(|| FetchError::Transport { id: format!("stack of build {build}"), message: last })?;
        let mut out = Vec::with_capacity(refs.len());
        for patch in refs {
            let bundle = self.get(&patch.patch_id).await?;
            out.push((patch, bundle));
        }
        Ok(out)
    }
}
