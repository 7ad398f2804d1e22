//! Node records written behind heartbeats, so a heartbeat never waits on the
//! store.
//!
//! A heartbeat whose node changed what is persisted (address, labels,
//! processes, patch stacks) hands the record here and is answered at once:
//! under a rollout every node's stack changes together, and heartbeats that
//! queued behind the rollout's own writes were answered late enough for
//! healthy nodes to be declared lost. Records are coalesced per node (only
//! the newest is written) and flushed by one task at a time in batches that
//! fit any store's request limit. A failed write is retried unless a newer
//! record replaced it; a fenced or deposed writer drops what is pending (the
//! next leader hears every node again). Register and remove go through
//! [`WriteBehind::exclusive`], so a pending older record can never land
//! after them.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use crate::store::{Batch, Fence, NodeRecord, Store, StoreError, Write};

/// Most JSON bytes of node records in one batch: well under etcd's default
/// 1.5 MiB request limit.
const BATCH_BYTES: usize = 512 * 1024;
/// Pause before a failed batch is tried again.
const RETRY: Duration = Duration::from_millis(200);

/// What the flush does after a batch.
enum Next {
    More,
    Retry,
    Done,
}

/// Pending node records and the one flush that writes them.
pub struct WriteBehind {
    store: Arc<dyn Store>,
    fence: Fence,
    pending: Mutex<HashMap<String, NodeRecord>>,
    flushing: AtomicBool,
    /// The term is draining: later records are dropped (the next leader
    /// hears every node again).
    closed: AtomicBool,
    /// Held while a batch is written, and by register/remove: writes of one
    /// node never overtake each other.
    order: tokio::sync::Mutex<()>,
}

impl WriteBehind {
    pub fn new(store: Arc<dyn Store>, fence: Fence) -> Arc<Self> {
        Arc::new(Self {
            store,
            fence,
            pending: Mutex::new(HashMap::new()),
            flushing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            order: tokio::sync::Mutex::new(()),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeRecord>> {
        // Every update is a single insert or removal: a poisoned map is whole.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `record` (replacing an older one of its node) and makes sure a
    /// flush is running. Never waits.
    pub fn put(self: &Arc<Self>, record: NodeRecord) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        self.pending().insert(record.node_id().to_string(), record);
        if !self.flushing.swap(true, Ordering::AcqRel) {
            tokio::spawn(Self::drain(Arc::downgrade(self)));
        }
    }

    /// Drops `node_id`'s pending record and holds back every flush until the
    /// guard is dropped: for a write of that node that must be the last.
    pub async fn exclusive(&self, node_id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let guard = self.order.lock().await;
        self.pending().remove(node_id);
        guard
    }

    /// Records queued and not yet written.
    pub fn backlog(&self) -> usize {
        self.pending().len()
    }

    /// Takes no more records and waits until the queued ones are written:
    /// a clean stop leaves nothing behind, and no flush outlives the term
    /// (a restarted coordinator reopens the same embedded file).
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.flushed().await
    }

    /// Waits until everything queued so far is written (or dropped).
    pub async fn flushed(&self) {
        while self.flushing.load(Ordering::Acquire) || self.backlog() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writes batches until nothing is pending. Holds the writer only while
    /// it writes: once the term's registry is gone, so is the store handle
    /// (a restarted coordinator reopens the same embedded file).
    async fn drain(writer: Weak<Self>) {
        loop {
            let Some(me) = writer.upgrade() else { return };
            match me.write_batch().await {
                Next::More => {}
                Next::Done => return,
                Next::Retry => {
                    drop(me);
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    async fn write_batch(&self) -> Next {
        let order = self.order.lock().await;
        let batch = self.take_batch();
        if batch.is_empty() {
            drop(order);
            self.flushing.store(false, Ordering::Release);
            // A put between the take and the store above found the flag
            // still set: carry on for it unless another flush took over.
            if self.backlog() == 0 || self.flushing.swap(true, Ordering::AcqRel) {
                return Next::Done;
            }
            return Next::More;
        }
        let writes = batch.iter().cloned().fold(Batch::new(), |b, r| b.with(Write::PutNode(r)));
        let result = self.store.write(self.fence, writes).await;
        drop(order);
        match result {
            Ok(_) => Next::More,
            Err(err @ StoreError::TooLarge(_)) => {
                // Cannot succeed as it is; the node's next change writes it afresh.
                tracing::error!(error = %err, records = batch.len(), "node records dropped: too large for the store");
                Next::More
            }
            Err(err @ (StoreError::Fenced { .. } | StoreError::NotLeading { .. })) => {
                tracing::info!(error = %err, dropped = batch.len() + self.backlog(), "node records not written: no longer leading");
                self.pending().clear();
                Next::More
            }
            Err(err) => {
                tracing::warn!(error = %err, records = batch.len(), "node records not written; retrying");
                let mut pending = self.pending();
                for record in batch {
                    // A newer record of the node supersedes the failed one.
                    pending.entry(record.node_id().to_string()).or_insert(record);
                }
                Next::Retry
            }
        }
    }

    /// Takes pending records up to [`BATCH_BYTES`] (at least one).
    fn take_batch(&self) -> Vec<NodeRecord> {
        let mut pending = self.pending();
        let mut ids: Vec<String> = Vec::new();
        let mut bytes = 0usize;
        for (id, record) in pending.iter() {
            let size = serde_json::to_vec(record).map(|v| v.len()).unwrap_or(BATCH_BYTES);
            if !ids.is_empty() && bytes + size > BATCH_BYTES {
                break;
            }
            bytes += size;
            ids.push(id.clone());
        }
        ids.iter().filter_map(|id| pending.remove(id)).collect()
    }
}
