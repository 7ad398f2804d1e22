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
//! next leader hears every node again). Remove goes through
//! [`WriteBehind::exclusive`], so a pending older record can never land
//! after it.
//!
//! Registrations are acknowledged only once written, but they need not be
//! written one by one: [`WriteBehind::put_durable`] groups the ones that
//! arrive together into one batch (a storm of N registrations costs about N
//! over the batch size writes, not N), and drops a pending heartbeat record
//! of the node that is not newer, so it cannot land after the registration.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use tokio::sync::oneshot;

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

/// A registration's record and who waits for it to be written.
struct Durable {
    record: NodeRecord,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Pending node records and the one flush that writes them.
pub struct WriteBehind {
    store: Arc<dyn Store>,
    fence: Fence,
    pending: Mutex<HashMap<String, NodeRecord>>,
    flushing: AtomicBool,
    /// Registrations waiting for their group write, oldest first.
    durable: Mutex<VecDeque<Durable>>,
    durable_flushing: AtomicBool,
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
            durable: Mutex::new(VecDeque::new()),
            durable_flushing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            order: tokio::sync::Mutex::new(()),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeRecord>> {
        // Every update is a single insert or removal: a poisoned map is whole.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn durable(&self) -> std::sync::MutexGuard<'_, VecDeque<Durable>> {
        self.durable.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ending(&self, reason: &str) -> StoreError {
        StoreError::NotLeading { epoch: self.fence.epoch, reason: reason.into() }
    }

    /// Writes `record` with the registrations that arrive with it and waits
    /// until it is in the store (see the module docs).
    pub async fn put_durable(self: &Arc<Self>, record: NodeRecord) -> Result<(), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.ending("the term is ending"));
        }
        let (done, written) = oneshot::channel();
        self.durable().push_back(Durable { record, done });
        if !self.durable_flushing.swap(true, Ordering::AcqRel) {
            // Spawned: a caller that goes away must not strand the others.
            tokio::spawn(Self::drain_durable(Arc::downgrade(self)));
        }
        written.await.unwrap_or_else(|_| Err(self.ending("the term ended before the write")))
    }

    async fn drain_durable(writer: Weak<Self>) {
        loop {
            let Some(me) = writer.upgrade() else { return };
            let order = me.order.lock().await;
            let batch = me.take_durable();
            if batch.is_empty() {
                drop(order);
                me.durable_flushing.store(false, Ordering::Release);
                // A put between the take and the store above: carry on for it
                // unless another drain took over.
                if me.durable().is_empty() || me.durable_flushing.swap(true, Ordering::AcqRel) {
                    return;
                }
                continue;
            }
            {
                let mut pending = me.pending();
                for d in &batch {
                    let id = d.record.node_id();
                    if pending.get(id).is_some_and(|p| p.last_heartbeat_ms <= d.record.last_heartbeat_ms) {
                        pending.remove(id);
                    }
                }
            }
            let writes = batch.iter().fold(Batch::new(), |b, d| b.with(Write::PutNode(d.record.clone())));
            let result = me.store.write(me.fence, writes).await.map(|_| ());
            drop(order);
            if let Err(err) = &result {
                tracing::warn!(error = %err, registrations = batch.len(), "registrations not written");
            }
            for d in batch {
                // The caller may have gone (its agent asks again).
                let _ = d.done.send(result.clone());
            }
        }
    }

    /// Takes waiting registrations up to [`BATCH_BYTES`] (at least one),
    /// stopping before a second record of one node: a store transaction may
    /// not name a key twice.
    fn take_durable(&self) -> Vec<Durable> {
        let mut queue = self.durable();
        let mut nodes = HashSet::new();
        let mut bytes = 0usize;
        let mut count = 0usize;
        for d in queue.iter() {
            let size = serde_json::to_vec(&d.record).map(|v| v.len()).unwrap_or(BATCH_BYTES);
            let id = d.record.node_id();
            if count > 0 && (bytes + size > BATCH_BYTES || nodes.contains(id)) {
                break;
            }
            nodes.insert(id);
            bytes += size;
            count += 1;
        }
        queue.drain(..count).collect()
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
        while self.flushing.load(Ordering::Acquire)
            || self.backlog() > 0
            || self.durable_flushing.load(Ordering::Acquire)
            || !self.durable().is_empty()
        {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{node::NodeStatus, store::embedded::EmbeddedStore};

    fn record(id: &str, heard_ms: u64, addr: &str) -> NodeRecord {
        let status = NodeStatus { node_id: id.into(), advertise_addr: addr.into(), ..Default::default() };
        NodeRecord { status, registered_at_ms: 1, last_heartbeat_ms: heard_ms }
    }

    async fn writer(dir: &std::path::Path) -> Arc<WriteBehind> {
        let store = Arc::new(EmbeddedStore::open(dir).expect("open"));
        let fence = store.acquire_epoch().await.expect("epoch");
        WriteBehind::new(store, fence)
    }

    async fn stored_addr(w: &WriteBehind, id: &str) -> Option<String> {
        let nodes = w.store.nodes().await.expect("nodes");
        nodes.into_iter().find(|r| r.node_id() == id).map(|r| r.status.advertise_addr)
    }

    #[tokio::test]
    async fn registrations_that_arrive_together_are_written_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = writer(dir.path()).await;
        // The store busy with another batch while 300 agents register.
        let held = w.order.lock().await;
        let waiting: Vec<_> = (0..300)
            .map(|i| {
                let w = w.clone();
                tokio::spawn(async move { w.put_durable(record(&format!("n{i}"), 1, "10.0.0.1:1")).await })
            })
            .collect();
        while w.durable().len() < 300 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(stored_addr(&w, "n0").await.is_none(), "nothing acknowledged before it is written");
        drop(held);
        for task in waiting {
            task.await.expect("task").expect("written");
        }
        assert_eq!(w.store.nodes().await.expect("nodes").len(), 300);
    }

    #[tokio::test]
    async fn a_batch_stops_before_a_second_record_of_one_node_and_at_its_byte_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = writer(dir.path()).await;
        let queue = |records: Vec<NodeRecord>| {
            let mut q = w.durable();
            for record in records {
                q.push_back(Durable { record, done: oneshot::channel().0 });
            }
        };
        queue((0..5).map(|i| record(&format!("n{i}"), 1, "a:1")).chain([record("n2", 2, "a:1")]).collect());
        assert_eq!(w.take_durable().len(), 5, "n2's second record waits for the next batch");
        assert_eq!(w.take_durable().len(), 1);
        // Records of ~100 KB: five fit under the limit, the sixth does not.
        let big = "x".repeat(100 * 1024);
        queue((0..8).map(|i| record(&format!("b{i}"), 1, &big)).collect());
        assert_eq!(w.take_durable().len(), 5);
        assert_eq!(w.take_durable().len(), 3);
        assert!(w.take_durable().is_empty());
    }

    #[tokio::test]
    async fn a_registration_drops_an_older_pending_record_and_keeps_a_newer_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = writer(dir.path()).await;
        let held = w.order.lock().await;
        // Heartbeat records queued behind the busy store (no flush started).
        w.pending().insert("old".into(), record("old", 5, "heartbeat:1"));
        w.pending().insert("new".into(), record("new", 50, "heartbeat:1"));
        let registering: Vec<_> = [("old", 10), ("new", 10)]
            .into_iter()
            .map(|(id, at)| {
                let w = w.clone();
                tokio::spawn(async move { w.put_durable(record(id, at, "register:1")).await })
            })
            .collect();
        while w.durable().len() < 2 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(held);
        for task in registering {
            task.await.expect("task").expect("written");
        }
        let pending: Vec<String> = w.pending().keys().cloned().collect();
        assert_eq!(pending, ["new"], "the older heartbeat record is dropped, the newer one still waits");
        assert_eq!(stored_addr(&w, "old").await.as_deref(), Some("register:1"));
    }

    #[tokio::test]
    async fn a_closed_writer_refuses_registrations_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = writer(dir.path()).await;
        w.close().await;
        let err = w.put_durable(record("n", 1, "a:1")).await.expect_err("closed");
        assert!(err.to_string().contains("no longer leads"), "{err}");
    }
}
