//! The patch store: verified uploads, stored by digest.
//!
//! An upload is decoded and checked (format, every module digest, size
//! limits) and its signature verified against the trusted keys *before*
//! anything is written. The id is the manifest digest, so pushing the same
//! bundle twice is a no-op and two different bundles can never share an id.

use std::sync::Arc;

use hotfleet_patch::{Bundle, Limits, PatchError, TrustedKeys};

use crate::{
    clock::now_ms,
    error::{Error, Result},
    store::{AuditEntry, Batch, Fence, PatchRecord, Store, Write},
};

/// Verifies and stores patches; reads them back for agents and operators.
#[derive(Clone)]
pub struct Patches {
    store: Arc<dyn Store>,
    trusted: Arc<TrustedKeys>,
    limits: Limits,
}

/// An audit entry for an action done now.
pub fn audit(actor: &str, action: &str, target: &str, detail: impl Into<String>, ok: bool) -> AuditEntry {
    AuditEntry {
        seq: 0,
        at_ms: now_ms(),
        actor: actor.to_string(),
        action: action.to_string(),
        target: target.to_string(),
        detail: detail.into(),
        ok,
    }
}

impl Patches {
    pub fn new(store: Arc<dyn Store>, trusted: TrustedKeys, limits: Limits) -> Self {
        Self { store, trusted: Arc::new(trusted), limits }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Verifies and stores an uploaded bundle. Returns the record and whether
    /// it was new. Refusals are audited too (who tried to push what). Writes
    /// carry the leader's `fence`.
    pub async fn push(&self, fence: Fence, bytes: &[u8], actor: &str) -> Result<(PatchRecord, bool)> {
        let bundle = match self.verify(bytes) {
            Ok(bundle) => bundle,
            Err(err) => {
                let entry = audit(actor, "patch.push", "", format!("refused: {err}"), false);
                if let Err(store_err) = self.store.write(fence, Batch::new().with(Write::Audit(entry))).await {
                    tracing::warn!(error = %store_err, "could not audit a refused patch push");
                }
                tracing::warn!(%actor, error = %err, "patch push refused");
                return Err(err);
            }
        };
        let id = bundle.id();
        if let Some(existing) = self.store.patch(&id).await? {
            let entry = audit(actor, "patch.push", &id, "already stored (no change)", true);
            self.store.write(fence, Batch::new().with(Write::Audit(entry))).await?;
            return Ok((existing, false));
        }
        let manifest = &bundle.manifest;
        let record = PatchRecord {
            patch_id: id.clone(),
            target_build: manifest.target_build.clone(),
            parent_patch_id: manifest.parent.clone().unwrap_or_default(),
            description: manifest.description.clone(),
            author: manifest.author.clone(),
            created_at: manifest.created_at.clone(),
            modules: bundle.modules.iter().map(|(name, _)| name.clone()).collect(),
            size_bytes: bytes.len() as u64,
            signer_key_id: bundle.signer_id().unwrap_or_default(),
            pushed_by: actor.to_string(),
            pushed_at_ms: now_ms(),
        };
        let detail = format!(
            "build {}, {} module(s), signer {}",
            record.target_build,
            record.modules.len(),
            record.signer_key_id
        );
        let batch = Batch::new()
            .with(Write::PutPatch { record: record.clone(), bundle: bytes.to_vec() })
            .with(Write::Audit(audit(actor, "patch.push", &id, detail, true)));
        self.store.write(fence, batch).await?;
        tracing::info!(patch = %id, build = %record.target_build, %actor, "patch stored");
        Ok((record, true))
    }

    fn verify(&self, bytes: &[u8]) -> Result<Bundle> {
        let bundle = Bundle::decode(bytes, &self.limits)?;
        if self.trusted.is_empty() {
            return Err(Error::Patch(PatchError::Key {
                path: "--trusted-key".into(),
                reason: "this coordinator trusts no signing key; restart it with --trusted-key FILE|DIR (the .pub made by `hotfleet keygen`)".into(),
            }));
        }
        bundle.verify(&self.trusted)?;
        Ok(bundle)
    }

    pub async fn get(&self, patch_id: &str) -> Result<PatchRecord> {
        self.store.patch(patch_id).await?.ok_or_else(|| Error::NotFound { what: "patch", id: patch_id.to_string() })
    }

    /// Bundle bytes exactly as uploaded.
    pub async fn bundle(&self, patch_id: &str) -> Result<Vec<u8>> {
        if !hotfleet_patch::is_patch_id(patch_id) {
            return Err(Error::InvalidArgument(format!("{patch_id:?} is not a patch id (64 lowercase hex digits)")));
        }
        self.store
            .patch_bundle(patch_id)
            .await?
            .ok_or_else(|| Error::NotFound { what: "patch", id: patch_id.to_string() })
    }

    /// Newest first, optionally only one build's.
    pub async fn list(&self, target_build: &str) -> Result<Vec<PatchRecord>> {
        let mut all = self.store.patches().await?;
        all.retain(|p| target_build.is_empty() || p.target_build == target_build);
        all.sort_by(|a, b| b.pushed_at_ms.cmp(&a.pushed_at_ms).then_with(|| a.patch_id.cmp(&b.patch_id)));
        Ok(all)
    }
}
