//! The embedded store: one redb file (`<data-dir>/coordinator.redb`).
//!
//! redb commits are durable (fsync) and atomic, so a coordinator killed at any
//! instant reopens to the last committed batch and nothing half-written. The
//! file is locked by redb: a second coordinator on the same data dir fails at
//! open instead of corrupting it. redb is synchronous, so every call runs on
//! tokio's blocking pool.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};

use super::{
    AuditEntry, AuditRetention, Batch, Fence, FreezeRecord, NodeRecord, PatchRecord, RolloutPlan, StackEntry, Store,
    StoreError, Write, AUDIT_TRIM_BATCH,
};
use crate::rollout::{NodeState, Rollout};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
const PATCHES: TableDefinition<&str, &[u8]> = TableDefinition::new("patches");
const BUNDLES: TableDefinition<&str, &[u8]> = TableDefinition::new("patch_bundles");
const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");
/// A rollout's plan ([`RolloutPlan`]), apart from its often rewritten record.
const ROLLOUT_PLANS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollout_plans");
/// Key: `<rollout id>/<node id>`; a rollout's nodes are one key range.
const ROLLOUT_NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("rollout_nodes");
/// Rollouts whose node states were compacted (value: when, Unix ms), so a
/// sweep does not read a finished rollout's nodes again.
const COMPACTED: TableDefinition<&str, u64> = TableDefinition::new("rollouts_compacted");
const STACKS: TableDefinition<&str, &[u8]> = TableDefinition::new("patch_stacks");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const SINGLETONS: TableDefinition<&str, &[u8]> = TableDefinition::new("singletons");

const EPOCH_KEY: &str = "epoch";
const AUDIT_SEQ_KEY: &str = "audit_seq";
const FREEZE_KEY: &str = "freeze";

/// File name inside the data directory.
pub const FILE_NAME: &str = "coordinator.redb";

/// The redb-backed [`Store`].
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
}

fn backend<E: std::fmt::Display>(err: E) -> StoreError {
    StoreError::Backend(err.to_string())
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let bytes = serde_json::to_vec(value).map_err(backend)?;
    crate::telemetry::store_wrote("embedded", bytes.len());
    Ok(bytes)
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|err| StoreError::Corrupt { key: key.to_string(), reason: err.to_string() })
}

/// redb's page cache. Its default is 1 GiB, a ceiling it fills with every
/// page a registration storm or a rollout touches, kept for the life of the
/// process: ~3 KB per node of the coordinator's memory (docs/performance.md,
/// ninth part). The store is read at a term's start and by the sweeper; the
/// operating system's file cache serves those reads as well.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let open_err =
            |reason: String| StoreError::Open { path: data_dir.join(FILE_NAME).display().to_string(), reason };
        std::fs::create_dir_all(data_dir).map_err(|e| open_err(format!("cannot create the data directory: {e}")))?;
        let path = data_dir.join(FILE_NAME);
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| open_err(format!("{e} (is another hotfleet-coordinator using this --data-dir?)")))?;
        // Create every table up front so readers never meet a missing table.
        let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        {
            let created: Result<(), redb::TableError> = (|| {
                txn.open_table(META)?;
                txn.open_table(NODES)?;
                txn.open_table(PATCHES)?;
                txn.open_table(BUNDLES)?;
                txn.open_table(ROLLOUTS)?;
                txn.open_table(ROLLOUT_PLANS)?;
                txn.open_table(ROLLOUT_NODES)?;
                txn.open_table(COMPACTED)?;
                txn.open_table(STACKS)?;
                txn.open_table(AUDIT)?;
                txn.open_table(SINGLETONS)?;
                Ok(())
            })();
            created.map_err(|e| open_err(e.to_string()))?;
        }
        txn.commit().map_err(|e| open_err(e.to_string()))?;
        Ok(Self { db: Arc::new(db), path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(backend)?
    }

    async fn read_one<T: DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let key = key.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(table).map_err(backend)?;
            match table.get(key.as_str()).map_err(backend)? {
                Some(value) => Ok(Some(decode(&key, value.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn read_all<T: DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
    ) -> Result<Vec<T>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(table).map_err(backend)?;
            let mut out = Vec::new();
            for row in table.iter().map_err(backend)? {
                let (key, value) = row.map_err(backend)?;
                out.push(decode(key.value(), value.value())?);
            }
            Ok(out)
        })
        .await
    }
}

/// A write transaction, if `fence` still owns the store. The fence check
/// and the writes share it: nothing can bump the epoch in between (redb has a
/// single writer at a time).
fn fenced_write(db: &Database, fence: Fence) -> Result<redb::WriteTransaction, StoreError> {
    let txn = db.begin_write().map_err(backend)?;
    let current = {
        let meta = txn.open_table(META).map_err(backend)?;
        let current = meta.get(EPOCH_KEY).map_err(backend)?.map(|v| v.value()).unwrap_or(0);
        current
    };
    if current != fence.epoch {
        txn.abort().map_err(backend)?;
        return Err(StoreError::Fenced { ours: fence.epoch, current });
    }
    Ok(txn)
}

fn rollout_node_key(rollout_id: &str, node_id: &str) -> String {
    format!("{rollout_id}/{node_id}")
}

fn apply(txn: &redb::WriteTransaction, batch: Batch) -> Result<Vec<u64>, StoreError> {
    let mut seqs = Vec::new();
    for write in batch.writes {
        match write {
            Write::PutNode(node) => {
                let mut t = txn.open_table(NODES).map_err(backend)?;
                t.insert(node.node_id(), encode(&node)?.as_slice()).map_err(backend)?;
            }
            Write::RemoveNode(id) => {
                let mut t = txn.open_table(NODES).map_err(backend)?;
                t.remove(id.as_str()).map_err(backend)?;
            }
            Write::PutPatch { record, bundle } => {
                let mut patches = txn.open_table(PATCHES).map_err(backend)?;
                if patches.get(record.patch_id.as_str()).map_err(backend)?.is_some() {
                    continue;
                }
                patches.insert(record.patch_id.as_str(), encode(&record)?.as_slice()).map_err(backend)?;
                let mut bundles = txn.open_table(BUNDLES).map_err(backend)?;
                bundles.insert(record.patch_id.as_str(), bundle.as_slice()).map_err(backend)?;
                crate::telemetry::store_wrote("embedded", bundle.len());
            }
            Write::PutRollout(rollout) => {
                let (record, plan) = RolloutPlan::split(&rollout);
                let plan = serde_json::to_vec(&plan).map_err(backend)?;
                let mut plans = txn.open_table(ROLLOUT_PLANS).map_err(backend)?;
                let same =
                    plans.get(rollout.id.as_str()).map_err(backend)?.is_some_and(|v| v.value() == plan.as_slice());
                if !same {
                    crate::telemetry::store_wrote("embedded", plan.len());
                    plans.insert(rollout.id.as_str(), plan.as_slice()).map_err(backend)?;
                }
                let mut t = txn.open_table(ROLLOUTS).map_err(backend)?;
                t.insert(rollout.id.as_str(), encode(&record)?.as_slice()).map_err(backend)?;
            }
            Write::PutRolloutNodes { rollout_id, nodes } => {
                let mut t = txn.open_table(ROLLOUT_NODES).map_err(backend)?;
                for node in nodes {
                    let key = rollout_node_key(&rollout_id, &node.node_id);
                    t.insert(key.as_str(), encode(&node)?.as_slice()).map_err(backend)?;
                }
            }
            Write::PushStack(entry) => {
                let mut t = txn.open_table(STACKS).map_err(backend)?;
                let key = entry.target_build.clone();
                let mut stack: Vec<StackEntry> = match t.get(key.as_str()).map_err(backend)? {
                    Some(v) => decode(&key, v.value())?,
                    None => Vec::new(),
                };
                if !stack.iter().any(|e| e.patch_id == entry.patch_id) {
                    stack.push(entry);
                    t.insert(key.as_str(), encode(&stack)?.as_slice()).map_err(backend)?;
                }
            }
            Write::DropStack { target_build, patch_id } => {
                let mut t = txn.open_table(STACKS).map_err(backend)?;
                let stack: Option<Vec<StackEntry>> = match t.get(target_build.as_str()).map_err(backend)? {
                    Some(v) => Some(decode(&target_build, v.value())?),
                    None => None,
                };
                if let Some(mut stack) = stack.filter(|s| s.iter().any(|e| e.patch_id == patch_id)) {
                    stack.retain(|e| e.patch_id != patch_id);
                    t.insert(target_build.as_str(), encode(&stack)?.as_slice()).map_err(backend)?;
                }
            }
            Write::Audit(mut entry) => {
                let mut meta = txn.open_table(META).map_err(backend)?;
                let seq = meta.get(AUDIT_SEQ_KEY).map_err(backend)?.map(|v| v.value()).unwrap_or(0) + 1;
                meta.insert(AUDIT_SEQ_KEY, seq).map_err(backend)?;
                entry.seq = seq;
                let mut t = txn.open_table(AUDIT).map_err(backend)?;
                t.insert(seq, encode(&entry)?.as_slice()).map_err(backend)?;
                seqs.push(seq);
            }
            Write::SetFreeze(freeze) => {
                let mut t = txn.open_table(SINGLETONS).map_err(backend)?;
                match freeze {
                    Some(record) => {
                        t.insert(FREEZE_KEY, encode(&record)?.as_slice()).map_err(backend)?;
                    }
                    None => {
                        t.remove(FREEZE_KEY).map_err(backend)?;
                    }
                }
            }
        }
    }
    Ok(seqs)
}

#[async_trait]
impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn write(&self, fence: Fence, batch: Batch) -> Result<Vec<u64>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.blocking(move |db| {
            let txn = fenced_write(db, fence)?;
            let seqs = apply(&txn, batch)?;
            txn.commit().map_err(backend)?;
            Ok(seqs)
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.read_all(NODES).await
    }

    async fn patch(&self, patch_id: &str) -> Result<Option<PatchRecord>, StoreError> {
        self.read_one(PATCHES, patch_id).await
    }

    async fn patch_bundle(&self, patch_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = patch_id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(BUNDLES).map_err(backend)?;
            Ok(table.get(key.as_str()).map_err(backend)?.map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn patches(&self) -> Result<Vec<PatchRecord>, StoreError> {
        self.read_all(PATCHES).await
    }

    async fn rollout(&self, rollout_id: &str) -> Result<Option<Rollout>, StoreError> {
        let id = rollout_id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let records = txn.open_table(ROLLOUTS).map_err(backend)?;
            let plans = txn.open_table(ROLLOUT_PLANS).map_err(backend)?;
            let Some(record) = records.get(id.as_str()).map_err(backend)? else { return Ok(None) };
            let plan = match plans.get(id.as_str()).map_err(backend)? {
                Some(plan) => Some(decode(&format!("plan {id}"), plan.value())?),
                None => None,
            };
            Ok(Some(RolloutPlan::join(decode(&id, record.value())?, plan)))
        })
        .await
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let records = txn.open_table(ROLLOUTS).map_err(backend)?;
            let plans = txn.open_table(ROLLOUT_PLANS).map_err(backend)?;
            let mut out = Vec::new();
            for row in records.iter().map_err(backend)? {
                let (key, value) = row.map_err(backend)?;
                let plan = match plans.get(key.value()).map_err(backend)? {
                    Some(plan) => Some(decode(&format!("plan {}", key.value()), plan.value())?),
                    None => None,
                };
                out.push(RolloutPlan::join(decode(key.value(), value.value())?, plan));
            }
            Ok(out)
        })
        .await
    }

    async fn rollout_nodes(&self, rollout_id: &str) -> Result<BTreeMap<String, NodeState>, StoreError> {
        let prefix = format!("{rollout_id}/");
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(ROLLOUT_NODES).map_err(backend)?;
            let mut out = BTreeMap::new();
            for row in table.range(prefix.as_str()..).map_err(backend)? {
                let (key, value) = row.map_err(backend)?;
                if !key.value().starts_with(&prefix) {
                    break;
                }
                let node: NodeState = decode(key.value(), value.value())?;
                out.insert(node.node_id.clone(), node);
            }
            Ok(out)
        })
        .await
    }

    async fn patch_stack(&self, target_build: &str) -> Result<Vec<StackEntry>, StoreError> {
        Ok(self.read_one(STACKS, target_build).await?.unwrap_or_default())
    }

    async fn audit(&self, limit: usize, before: Option<u64>) -> Result<Vec<AuditEntry>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(AUDIT).map_err(backend)?;
            let mut out = Vec::new();
            for row in table.range(..before.unwrap_or(u64::MAX)).map_err(backend)?.rev().take(limit) {
                let (key, value) = row.map_err(backend)?;
                out.push(decode(&format!("audit/{}", key.value()), value.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn trim_audit(&self, fence: Fence, retention: AuditRetention, now_ms: u64) -> Result<u64, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let (current, last) = {
                let meta = txn.open_table(META).map_err(backend)?;
                let current = meta.get(EPOCH_KEY).map_err(backend)?.map(|v| v.value()).unwrap_or(0);
                let last = meta.get(AUDIT_SEQ_KEY).map_err(backend)?.map(|v| v.value()).unwrap_or(0);
                (current, last)
            };
            if current != fence.epoch {
                txn.abort().map_err(backend)?;
                return Err(StoreError::Fenced { ours: fence.epoch, current });
            }
            let removed = {
                let mut table = txn.open_table(AUDIT).map_err(backend)?;
                // Oldest first; entries are in time order, so the first one
                // kept ends the run.
                let mut doomed = Vec::new();
                for row in table.iter().map_err(backend)?.take(AUDIT_TRIM_BATCH) {
                    let (key, value) = row.map_err(backend)?;
                    let entry: AuditEntry = decode(&format!("audit/{}", key.value()), value.value())?;
                    if !retention.expired(key.value(), entry.at_ms, last, now_ms) {
                        break;
                    }
                    doomed.push(key.value());
                }
                for seq in &doomed {
                    table.remove(seq).map_err(backend)?;
                }
                doomed.len() as u64
            };
            txn.commit().map_err(backend)?;
            Ok(removed)
        })
        .await
    }

    async fn freeze(&self) -> Result<Option<FreezeRecord>, StoreError> {
        self.read_one(SINGLETONS, FREEZE_KEY).await
    }

    async fn compact_rollout(&self, fence: Fence, rollout_id: &str) -> Result<bool, StoreError> {
        let id = rollout_id.to_string();
        self.blocking(move |db| {
            let txn = fenced_write(db, fence)?;
            let finished = {
                let rollouts = txn.open_table(ROLLOUTS).map_err(backend)?;
                let compacted = txn.open_table(COMPACTED).map_err(backend)?;
                let rollout: Option<Rollout> = match rollouts.get(id.as_str()).map_err(backend)? {
                    Some(value) => Some(decode(&id, value.value())?),
                    None => None,
                };
                let done = compacted.get(id.as_str()).map_err(backend)?.is_some();
                !done && rollout.is_some_and(|r| r.phase.is_terminal())
            };
            if !finished {
                txn.abort().map_err(backend)?;
                return Ok(false);
            }
            {
                let prefix = format!("{id}/");
                let mut table = txn.open_table(ROLLOUT_NODES).map_err(backend)?;
                let mut folded = Vec::new();
                for row in table.range(prefix.as_str()..).map_err(backend)? {
                    let (key, value) = row.map_err(backend)?;
                    if !key.value().starts_with(&prefix) {
                        break;
                    }
                    let node: NodeState = decode(key.value(), value.value())?;
                    let summary = node.summary();
                    if summary != node {
                        folded.push((key.value().to_string(), summary));
                    }
                }
                for (key, summary) in folded {
                    table.insert(key.as_str(), encode(&summary)?.as_slice()).map_err(backend)?;
                }
                let mut compacted = txn.open_table(COMPACTED).map_err(backend)?;
                compacted.insert(id.as_str(), crate::clock::now_ms()).map_err(backend)?;
            }
            txn.commit().map_err(backend)?;
            Ok(true)
        })
        .await
    }
}

impl EmbeddedStore {
    /// Becomes the store's writer: bumps and persists the epoch and returns
    /// the fence every later write must carry. Called once per coordinator
    /// start, so a restarted coordinator out-ranks its previous incarnation.
    pub async fn acquire_epoch(&self) -> Result<Fence, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_write().map_err(backend)?;
            let epoch = {
                let mut meta = txn.open_table(META).map_err(backend)?;
                let epoch = meta.get(EPOCH_KEY).map_err(backend)?.map(|v| v.value()).unwrap_or(0) + 1;
                meta.insert(EPOCH_KEY, epoch).map_err(backend)?;
                epoch
            };
            txn.commit().map_err(backend)?;
            Ok(Fence { epoch })
        })
        .await
    }

    /// The epoch that currently owns the store.
    pub async fn current_epoch(&self) -> Result<u64, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let meta = txn.open_table(META).map_err(backend)?;
            Ok(meta.get(EPOCH_KEY).map_err(backend)?.map(|v| v.value()).unwrap_or(0))
        })
        .await
    }

    /// Number of stored audit entries (diagnostics and tests).
    pub async fn audit_len(&self) -> Result<u64, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(AUDIT).map_err(backend)?;
            table.len().map_err(backend)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit(action: &str) -> AuditEntry {
        crate::patches::audit("sre", action, "", "", true)
    }

    #[tokio::test]
    async fn epoch_bumps_on_every_open_and_fences_the_old_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = {
            let store = EmbeddedStore::open(dir.path()).expect("open");
            let fence = store.acquire_epoch().await.expect("epoch");
            store.write(fence, Batch::new().with(Write::Audit(audit("a")))).await.expect("write");
            fence
        };
        let store = EmbeddedStore::open(dir.path()).expect("reopen");
        let second = store.acquire_epoch().await.expect("epoch");
        assert_eq!(second.epoch, first.epoch + 1);
        let err = store.write(first, Batch::new().with(Write::Audit(audit("stale")))).await.expect_err("fenced");
        assert!(matches!(err, StoreError::Fenced { ours, current } if ours == first.epoch && current == second.epoch));
        // Nothing of the refused batch landed.
        let log = store.audit(10, None).await.expect("audit");
        assert_eq!(log.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["a"]);
    }

    #[tokio::test]
    async fn batches_are_atomic_and_patch_put_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let fence = store.acquire_epoch().await.expect("epoch");
        let record = PatchRecord {
            patch_id: "p1".into(),
            target_build: "b".into(),
            parent_patch_id: String::new(),
            description: "first".into(),
            author: String::new(),
            created_at: String::new(),
            modules: vec![],
            size_bytes: 3,
            signer_key_id: String::new(),
            pushed_by: "a".into(),
            pushed_at_ms: 1,
        };
        let seqs = store
            .write(
                fence,
                Batch::new()
                    .with(Write::PutPatch { record: record.clone(), bundle: b"abc".to_vec() })
                    .with(Write::Audit(audit("push")))
                    .with(Write::Audit(audit("push2"))),
            )
            .await
            .expect("write");
        assert_eq!(seqs, [1, 2]);
        let again = PatchRecord { description: "second".into(), ..record };
        store
            .write(fence, Batch::new().with(Write::PutPatch { record: again, bundle: b"xyz".to_vec() }))
            .await
            .expect("write");
        assert_eq!(store.patch("p1").await.expect("read").expect("present").description, "first");
        assert_eq!(store.patch_bundle("p1").await.expect("read").expect("present"), b"abc");
        assert_eq!(store.audit(1, None).await.expect("audit")[0].action, "push2");
        assert_eq!(store.audit_len().await.expect("len"), 2);
    }

    #[tokio::test]
    async fn stack_push_is_idempotent_and_freeze_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let fence = store.acquire_epoch().await.expect("epoch");
        let entry = StackEntry {
            patch_id: "p1".into(),
            target_build: "b1".into(),
            parent_patch_id: String::new(),
            description: String::new(),
            rollout_id: "r".into(),
            committed_at_ms: 5,
        };
        for _ in 0..2 {
            store.write(fence, Batch::new().with(Write::PushStack(entry.clone()))).await.expect("push");
        }
        assert_eq!(store.patch_stack("b1").await.expect("stack"), vec![entry.clone()]);
        assert!(store.patch_stack("other").await.expect("stack").is_empty());
        // A completed revert takes it off, once (a resumed completion changes nothing).
        let second = StackEntry { patch_id: "p2".into(), ..entry.clone() };
        store.write(fence, Batch::new().with(Write::PushStack(second.clone()))).await.expect("push");
        for _ in 0..2 {
            let drop = Write::DropStack { target_build: "b1".into(), patch_id: "p1".into() };
            store.write(fence, Batch::new().with(drop)).await.expect("drop");
        }
        assert_eq!(store.patch_stack("b1").await.expect("stack"), vec![second]);

        let freeze = FreezeRecord { reason: "incident".into(), by: "sre".into(), since_ms: 9 };
        store.write(fence, Batch::new().with(Write::SetFreeze(Some(freeze.clone())))).await.expect("freeze");
        assert_eq!(store.freeze().await.expect("read"), Some(freeze));
        store.write(fence, Batch::new().with(Write::SetFreeze(None))).await.expect("unfreeze");
        assert_eq!(store.freeze().await.expect("read"), None);
    }

    #[tokio::test]
    async fn second_open_of_a_locked_dir_fails_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = EmbeddedStore::open(dir.path()).expect("open");
        match EmbeddedStore::open(dir.path()) {
            Err(err) => assert!(err.to_string().contains("another hotfleet-coordinator"), "{err}"),
            Ok(_) => panic!("second open of the same data dir succeeded"),
        }
    }
}
