//! The patch store: verified uploads, stored by digest.
//!
//! An upload is decoded and checked (format, every module digest, size
//! limits) and its signature verified against the trusted keys *before*
//! anything is written. The id is the manifest digest, so pushing the same
//! bundle twice is a no-op and two different bundles can never share an id.
//! A push that would make its build's patch stack outgrow [`MAX_STACK_BYTES`]
//! is refused with the numbers: every game process of that build that starts
//! is sent the whole stack, so it must stay bounded.

use std::sync::Arc;

use hotfleet_patch::{Bundle, Limits, PatchError, TrustedKeys};

use crate::{
    clock::now_ms,
    error::{Error, Result},
    input::truncate,
    store::{AuditEntry, Batch, Fence, PatchRecord, Store, Write},
};

/// Most bundle bytes one build's patch stack may hold (its committed patches
/// plus the one pushed), documented in docs/decisions.md ("Local protocol").
pub const MAX_STACK_BYTES: u64 = 64 * 1024 * 1024;

/// Verifies and stores patches; reads them back for agents and operators.
#[derive(Clone)]
pub struct Patches {
    store: Arc<dyn Store>,
    trusted: Arc<TrustedKeys>,
    limits: Limits,
    max_stack_bytes: u64,
}

/// Most bytes of an audit entry's detail; its actor, action and target get
/// [`AUDIT_FIELD_BYTES`]. Entries are cut, never refused: an action is
/// audited whatever it carried, and no entry can grow the log by more.
pub const AUDIT_DETAIL_BYTES: usize = 2048;
pub const AUDIT_FIELD_BYTES: usize = 256;

/// An audit entry for an action done now, every field within its cap.
pub fn audit(actor: &str, action: &str, target: &str, detail: impl Into<String>, ok: bool) -> AuditEntry {
    AuditEntry {
        seq: 0,
        at_ms: now_ms(),
        actor: truncate(actor, AUDIT_FIELD_BYTES),
        action: truncate(action, AUDIT_FIELD_BYTES),
        target: truncate(target, AUDIT_FIELD_BYTES),
        detail: truncate(&detail.into(), AUDIT_DETAIL_BYTES),
        ok,
    }
}

impl Patches {
    pub fn new(store: Arc<dyn Store>, trusted: TrustedKeys, limits: Limits) -> Self {
        Self { store, trusted: Arc::new(trusted), limits, max_stack_bytes: MAX_STACK_BYTES }
    }

    /// The same, with another cap on a build's stack (tests use a small one).
    pub fn with_max_stack_bytes(mut self, max_stack_bytes: u64) -> Self {
        self.max_stack_bytes = max_stack_bytes;
        self
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
            Err(err) => return Err(self.refused(fence, actor, "", err).await),
        };
        let id = bundle.id();
        if let Some(existing) = self.store.patch(&id).await? {
            let entry = audit(actor, "patch.push", &id, "already stored (no change)", true);
            self.store.write(fence, Batch::new().with(Write::Audit(entry))).await?;
            return Ok((existing, false));
        }
        if let Err(err) = self.check_stack_size(&bundle, bytes.len() as u64).await {
            return Err(self.refused(fence, actor, &id, err).await);
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

    /// Audits and logs a refused push; returns its error.
    async fn refused(&self, fence: Fence, actor: &str, id: &str, err: Error) -> Error {
        let entry = audit(actor, "patch.push", id, format!("refused: {err}"), false);
        if let Err(store_err) = self.store.write(fence, Batch::new().with(Write::Audit(entry))).await {
            tracing::warn!(error = %store_err, "could not audit a refused patch push");
        }
        tracing::warn!(%actor, error = %err, "patch push refused");
        err
    }

    /// Refuses a new patch that would make its build's stack (the committed
    /// patches' bundles plus this one) hold more than the cap.
    async fn check_stack_size(&self, bundle: &Bundle, size: u64) -> Result<()> {
        let build = &bundle.manifest.target_build;
        let stack = self.store.patch_stack(build).await?;
        let mut stack_bytes = 0;
        for entry in &stack {
            stack_bytes += self.store.patch(&entry.patch_id).await?.map_or(0, |p| p.size_bytes);
        }
        if stack_bytes + size <= self.max_stack_bytes {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!(
            "patch refused: build {build}'s patch stack would hold {total} bytes ({count} committed patch(es), \
             {stack_bytes} bytes, plus this one, {size} bytes), over the {cap}-byte cap: every process of the \
             build that starts replays the whole stack; ship a new build that includes the patches instead",
            total = stack_bytes + size,
            count = stack.len(),
            cap = self.max_stack_bytes,
        )))
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
            return Err(Error::InvalidArgument(format!(
                "{} is not a patch id (64 lowercase hex digits)",
                crate::input::excerpt(patch_id)
            )));
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

#[cfg(test)]
mod tests {
    use hotfleet_patch::{Manifest, SigningKeyFile, MANIFEST_FORMAT};

    use super::*;
    use crate::store::{embedded::EmbeddedStore, StackEntry};

    fn signed(build: &str, n: usize, source_bytes: usize, key: &SigningKeyFile) -> Vec<u8> {
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            target_build: build.into(),
            parent: None,
            packages: vec!["zone".into()],
            modules: vec![],
            author: "sre@example".into(),
            created_at: "2026-11-30T00:00:00Z".into(),
            description: format!("patch {n}"),
        };
        let source = format!("# {n}\n{}\n", "x".repeat(source_bytes));
        let mut bundle = Bundle::create(manifest, vec![("zone.combat".into(), source)]).expect("bundle");
        bundle.sign(key);
        bundle.encode()
    }

    #[tokio::test]
    async fn a_push_that_would_outgrow_its_builds_stack_is_refused_with_the_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(dir.path()).expect("open"));
        let fence = store.acquire_epoch().await.expect("epoch");
        let key = SigningKeyFile::generate().expect("key");
        let patches = Patches::new(store.clone(), TrustedKeys::new(vec![key.public()]), Limits::default())
            .with_max_stack_bytes(25_000);

        // Two 10 kB patches committed on build b1: 20 kB of its 25 kB.
        for n in 0..2 {
            let (record, _) = patches.push(fence, &signed("b1", n, 10_000, &key), "sre").await.expect("push");
            let entry = StackEntry {
                patch_id: record.patch_id,
                target_build: "b1".into(),
                parent_patch_id: String::new(),
                description: String::new(),
                rollout_id: "r".into(),
                committed_at_ms: 1,
            };
            store.write(fence, Batch::new().with(Write::PushStack(entry))).await.expect("commit");
        }
        let third = signed("b1", 2, 10_000, &key);
        let err = patches.push(fence, &third, "sre").await.expect_err("over the cap");
        let message = err.to_string();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(message.contains("build b1") && message.contains("25000-byte cap"), "{message}");
        assert!(message.contains("2 committed patch(es)") && message.contains(&format!("{} bytes)", third.len())));
        let audit = store.audit(10, None).await.expect("audit");
        assert!(audit.iter().any(|a| !a.ok && a.detail.contains("25000-byte cap")), "the refusal is audited");
        assert_eq!(store.patches().await.expect("patches").len(), 2, "nothing stored");

        // Another build's stack is its own; a small patch still fits; a re-push of a stored one is a no-op.
        patches.push(fence, &third, "sre").await.expect_err("still over");
        patches.push(fence, &signed("b2", 2, 10_000, &key), "sre").await.expect("other build");
        patches.push(fence, &signed("b1", 3, 1_000, &key), "sre").await.expect("fits");
        let first = signed("b1", 0, 10_000, &key);
        assert!(!patches.push(fence, &first, "sre").await.expect("stored already").1);
    }
}
