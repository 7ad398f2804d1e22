//! The node registry: which agents exist, where to reach them, what they run,
//! and whether they are alive.
//!
//! Registration is persisted (so a restarted coordinator still knows its
//! fleet); heartbeats are not (thousands of nodes every few seconds would be a
//! write storm) and only refresh the in-memory view. A node that misses
//! `lost_after` heartbeats is marked lost: the planner skips it and a rollout
//! holding it counts it against its failure policy. After a coordinator
//! restart (or a change of leader) every stored node gets a fresh grace
//! period, longer than the lost timeout by [`STARTUP_GRACE`]: agents find a
//! new leader only after their call to the old one gives up. The interval agents
//! are told is whole seconds (the protocol's unit), so loss is judged on
//! that rounded-up interval.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use hotfleet_proto::digests::FINGERPRINT_LEN;

use crate::{
    clock::now_ms,
    digests::DigestPool,
    input::{self, InputError},
    interned::StackPool,
    node::NodeStatus,
    node_writes::WriteBehind,
    planner::Candidate,
    store::{AuditEntry, Batch, Fence, NodeRecord, Store, StoreError, Write},
};

/// Extra silence allowed to nodes loaded from the store when a term starts:
/// the agents' heartbeat call timeout is at most 5 s, so an agent may spend
/// that long on the coordinator that just went away before it tries this one.
pub const STARTUP_GRACE: Duration = Duration::from_secs(5);

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid node registration: {0}")]
    Invalid(String),
    #[error("invalid node registration: {0}")]
    Input(#[from] InputError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Liveness of a node as the coordinator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Lost,
    /// Seen by a follower: heartbeats go to the leader, which alone judges.
    Unknown,
}

impl Liveness {
    pub fn name(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Lost => "lost",
            Liveness::Unknown => "unknown",
        }
    }
}

/// Every stored node as a follower sees it (liveness unknown), sorted by id.
pub async fn stored_views(store: &dyn Store) -> Result<Vec<NodeView>, StoreError> {
    let mut nodes: Vec<NodeView> = store
        .nodes()
        .await?
        .into_iter()
        .map(|r| NodeView {
            status: r.status,
            liveness: Liveness::Unknown,
            registered_at_ms: r.registered_at_ms,
            last_heartbeat_ms: r.last_heartbeat_ms,
        })
        .collect();
    nodes.sort_by(|a, b| a.status.node_id.cmp(&b.status.node_id));
    Ok(nodes)
}

/// A node as seen now.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub status: NodeStatus,
    pub liveness: Liveness,
    pub registered_at_ms: u64,
    pub last_heartbeat_ms: u64,
}

impl NodeView {
    /// What the planner needs.
    pub fn candidate(&self) -> Candidate {
        let mut builds: Vec<String> =
            self.status.processes.iter().map(|p| p.build.clone()).filter(|b| !b.is_empty()).collect();
        if let Some(b) = self.status.labels.get("build") {
            builds.push(b.clone());
        }
        builds.sort();
        builds.dedup();
        Candidate {
            node_id: self.status.node_id.clone(),
            labels: self.status.labels.clone(),
            builds,
            alive: self.liveness == Liveness::Alive,
            has_processes: !self.status.processes.is_empty(),
        }
    }
}

struct Entry {
    status: NodeStatus,
    registered_at_ms: u64,
    last_heartbeat_ms: u64,
    /// Last heartbeat, or (loaded from the store) the moment the grace
    /// period counts from: in the future by [`STARTUP_GRACE`].
    last_seen: Instant,
    lost: bool,
    /// The processes' digests were heard in this term (registered, or a
    /// heartbeat carried them): not so for a record loaded from the store,
    /// which keeps none.
    digests_heard: bool,
}

/// What a heartbeat or registration found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heard {
    /// False: unknown node (it must register again).
    pub known: bool,
    /// The agent left out digests this registry does not hold.
    pub send_digests: bool,
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<RwLock<HashMap<String, Entry>>>,
    store: Arc<dyn Store>,
    fence: Fence,
    heartbeat_interval: Duration,
    lost_timeout: Duration,
    /// Heartbeats' record writes, off the heartbeat's path.
    writes: Arc<WriteBehind>,
    /// One copy of each distinct digest map and patch stack the fleet reports.
    alike: Arc<Alike>,
    /// Nodes whose stacks, builds or liveness changed since the last
    /// [`take_changed`](Self::take_changed): what the reconciler judges again
    /// (an idle fleet changes nothing, so an idle pass copies nothing).
    changed: Arc<Mutex<HashSet<String>>>,
}

fn validate(status: &NodeStatus) -> Result<(), RegistryError> {
    let id = &status.node_id;
    if id.is_empty() || id.len() > input::MAX_ID {
        return Err(RegistryError::Invalid(format!("node_id must be 1-{} characters", input::MAX_ID)));
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) {
        return Err(RegistryError::Invalid(format!(
            "node_id {} may only hold letters, digits and - _ . :",
            input::excerpt(id)
        )));
    }
    if status.advertise_addr.trim().is_empty() {
        return Err(RegistryError::Invalid(format!(
            "node {id} has no advertise_addr: the coordinator cannot reach its agent"
        )));
    }
    check_bounds(status)?;
    Ok(())
}

/// Every field a node reports within its bound ([`crate::input`]): the
/// status is stored and listed, so nothing in it may be unbounded.
fn check_bounds(status: &NodeStatus) -> Result<(), InputError> {
    use input::{count, text};
    text("advertise_addr", &status.advertise_addr, input::MAX_ADDR)?;
    count("labels", status.labels.len(), input::MAX_LABELS)?;
    for (key, value) in &status.labels {
        text("label key", key, input::MAX_LABEL_KEY)?;
        text("label value", value, input::MAX_LABEL_VALUE)?;
    }
    count("processes", status.processes.len(), input::MAX_PROCESSES)?;
    for p in &status.processes {
        text("process_id", &p.process_id, input::MAX_ID)?;
        text("build", &p.build, input::MAX_BUILD)?;
        text("runtime_version", &p.runtime_version, input::MAX_SHORT_TEXT)?;
        text("python_version", &p.python_version, input::MAX_SHORT_TEXT)?;
        count("patch_stack", p.patch_stack.len(), input::MAX_STACK)?;
        for patch in p.patch_stack.iter() {
            text("patch_stack entry", patch, input::MAX_ID)?;
        }
        count("live_digests", p.live_digests.len(), input::MAX_MODULES)?;
        text("live_digests_fingerprint", &p.live_digests_fingerprint, FINGERPRINT_LEN)?;
        for (module, digest) in p.live_digests.iter() {
            text("module name", module, input::MAX_SHORT_TEXT)?;
            text("module digest", digest, input::MAX_SHORT_TEXT)?;
        }
        if let Some(health) = &p.health {
            text("game_detail", &health.game_detail, input::MAX_SHORT_TEXT)?;
        }
    }
    for (field, list) in [("prepared", &status.prepared), ("expired", &status.expired)] {
        count(field, list.len(), input::MAX_PREPARED)?;
        for patch in list {
            text("rollout_id", &patch.rollout_id, input::MAX_ID)?;
            text("patch_id", &patch.patch_id, input::MAX_ID)?;
        }
    }
    Ok(())
}

/// What many nodes report alike, held once (see [`crate::interned`]).
#[derive(Default)]
struct Alike {
    digests: DigestPool,
    stacks: StackPool,
}

/// Points each process's digests and patch stack at a shared copy: the one
/// the node already holds when unchanged (most heartbeats: no pool lookup),
/// else the pool's. `before` is the node's status held, if any, and
/// `digests_heard` whether its digests were heard in this term.
/// A process the agent marked unchanged (its map left out) keeps the map
/// held; one named by fingerprint takes the pool's map of that fingerprint.
/// Returns true when a map left out is not held (the agent must send them
/// all again); that process lists no digests until it does.
fn share_alike(alike: &Alike, status: &mut NodeStatus, before: Option<&NodeStatus>, digests_heard: bool) -> bool {
    let mut missing = false;
    for process in &mut status.processes {
        let previous = before.and_then(|b| b.processes.iter().find(|p| p.process_id == process.process_id));
        process.patch_stack = match previous {
            Some(p) if p.patch_stack == process.patch_stack => p.patch_stack.clone(),
            _ => alike.stacks.share(std::mem::take(&mut process.patch_stack)),
        };
        let pool = &alike.digests;
        let held = previous.filter(|_| digests_heard).map(|p| &p.live_digests);
        let unchanged = std::mem::take(&mut process.live_digests_unchanged);
        let fingerprint = std::mem::take(&mut process.live_digests_fingerprint);
        let named = !fingerprint.is_empty() && process.live_digests.is_empty();
        process.live_digests = match held {
            Some(held) if unchanged || (!named && *held == process.live_digests) => held.clone(),
            _ if named => pool.named(&fingerprint).unwrap_or_else(|| {
                missing = true;
                Default::default()
            }),
            _ => {
                missing |= unchanged;
                pool.share(std::mem::take(&mut process.live_digests))
            }
        };
    }
    missing
}

/// Whether a status change is worth a store write (identity, not figures).
fn identity_changed(old: &NodeStatus, new: &NodeStatus) -> bool {
    old.labels != new.labels
        || old.advertise_addr != new.advertise_addr
        || old.processes.len() != new.processes.len()
        || old
            .processes
            .iter()
            .zip(&new.processes)
            .any(|(a, b)| a.process_id != b.process_id || a.build != b.build || a.patch_stack != b.patch_stack)
}

impl Registry {
    /// Loads the persisted fleet; every node starts alive with a fresh grace
    /// period (the lost timeout plus [`STARTUP_GRACE`]).
    pub async fn load(
        store: Arc<dyn Store>,
        fence: Fence,
        heartbeat_interval: Duration,
        lost_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let now = Instant::now();
        let grace_from = now.checked_add(STARTUP_GRACE).unwrap_or(now);
        let mut map = HashMap::new();
        let alike = Arc::new(Alike::default());
        for mut record in store.nodes().await? {
            share_alike(&alike, &mut record.status, None, false);
            map.insert(
                record.status.node_id.clone(),
                Entry {
                    registered_at_ms: record.registered_at_ms,
                    last_heartbeat_ms: record.last_heartbeat_ms,
                    status: record.status,
                    last_seen: grace_from,
                    lost: false,
                    digests_heard: false,
                },
            );
        }
        let writes = WriteBehind::new(store.clone(), fence);
        Ok(Self {
            inner: Arc::new(RwLock::new(map)),
            store,
            fence,
            heartbeat_interval,
            lost_timeout,
            writes,
            alike,
            changed: Arc::default(),
        })
    }

    /// The store this term's registry writes to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    /// The interval agents are told, in the protocol's whole seconds.
    pub fn heartbeat_interval_seconds(&self) -> u32 {
        advertised_seconds(self.heartbeat_interval)
    }

    pub fn epoch(&self) -> u64 {
        self.fence.epoch
    }

    fn lock_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (every update is a single insert), so a poisoned lock is still usable.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Register (or re-register) a node. Persisted before it is acknowledged.
    /// `send_digests` when it named a map by fingerprint this leader does not hold.
    pub async fn register(&self, mut status: NodeStatus) -> Result<Heard, RegistryError> {
        validate(&status)?;
        let send_digests = share_alike(&self.alike, &mut status, None, false);
        let now = now_ms();
        let registered_at_ms = self.lock_read().get(&status.node_id).map(|e| e.registered_at_ms).unwrap_or(now);
        let record = NodeRecord { status: status.clone(), registered_at_ms, last_heartbeat_ms: now };
        self.writes.put_durable(record).await?;
        let was_lost = self.lock_write().insert(
            status.node_id.clone(),
            Entry {
                status: status.clone(),
                registered_at_ms,
                last_heartbeat_ms: now,
                last_seen: Instant::now(),
                lost: false,
                digests_heard: !send_digests,
            },
        );
        self.mark_changed(&status.node_id);
        tracing::info!(
            node = %status.node_id,
            addr = %status.advertise_addr,
            processes = status.processes.len(),
            rejoined = was_lost.is_some_and(|e| e.lost),
            "node registered"
        );
        Ok(Heard { known: true, send_digests })
    }

    /// A heartbeat. `Ok(false)`: unknown node (it must re-register).
    pub async fn heartbeat(&self, status: NodeStatus) -> Result<bool, RegistryError> {
        Ok(self.hear(status).await?.known)
    }

    /// A heartbeat, and whether the agent must send its digests again.
    pub async fn hear(&self, mut status: NodeStatus) -> Result<Heard, RegistryError> {
        validate(&status)?;
        let now = now_ms();
        let (persist, send_digests) = {
            let mut map = self.lock_write();
            let Some(entry) = map.get_mut(&status.node_id) else {
                return Ok(Heard { known: false, send_digests: false });
            };
            let send_digests = share_alike(&self.alike, &mut status, Some(&entry.status), entry.digests_heard);
            entry.digests_heard = !send_digests;
            let persist = identity_changed(&entry.status, &status);
            if entry.lost {
                tracing::info!(node = %status.node_id, "lost node is back");
            }
            if persist || entry.lost {
                self.mark_changed(&status.node_id);
            }
            // Copied only for a record to write: most heartbeats change nothing stored.
            let record = persist.then(|| NodeRecord {
                status: status.clone(),
                registered_at_ms: entry.registered_at_ms,
                last_heartbeat_ms: now,
            });
            entry.status = status;
            entry.last_heartbeat_ms = now;
            entry.last_seen = Instant::now();
            entry.lost = false;
            (record, send_digests)
        };
        if let Some(record) = persist {
            // Written behind: a heartbeat is answered without waiting on the store.
            self.writes.put(record);
        }
        Ok(Heard { known: true, send_digests })
    }

    /// Marks nodes lost that were silent longer than the lost timeout;
    /// returns the newly lost.
    pub fn sweep(&self) -> Vec<String> {
        let limit = self.lost_timeout;
        let mut newly = Vec::new();
        for (id, entry) in self.lock_write().iter_mut() {
            if !entry.lost && Instant::now().saturating_duration_since(entry.last_seen) > limit {
                entry.lost = true;
                newly.push(id.clone());
            }
        }
        for id in &newly {
            tracing::warn!(node = %id, missed_for = ?limit, "node lost: no heartbeat");
        }
        newly
    }

    /// Nodes silent for longer than `after` (lost, since `after` is longer
    /// than the lost timeout), sorted by id: the sweeper's expiry candidates.
    pub fn expired(&self, after: Duration) -> Vec<String> {
        let now = Instant::now();
        let mut ids: Vec<String> = self
            .lock_read()
            .iter()
            .filter(|(_, e)| e.lost && now.saturating_duration_since(e.last_seen) > after)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Forgets a node: its record and `audit` are written in one batch, then
    /// it leaves the registry. `None` if the node is unknown (nothing written).
    /// Whether a live rollout holds it is the caller's to check.
    pub async fn remove(&self, node_id: &str, audit: AuditEntry) -> Result<Option<NodeView>, StoreError> {
        let Some(node) = self.get(node_id) else { return Ok(None) };
        let batch = Batch::new().with(Write::RemoveNode(node_id.to_string())).with(Write::Audit(audit));
        let _order = self.writes.exclusive(node_id).await;
        self.store.write(self.fence, batch).await?;
        self.lock_write().remove(node_id);
        tracing::info!(node = %node_id, liveness = node.liveness.name(), "node removed");
        Ok(Some(node))
    }

    /// Waits until heartbeats' record writes so far have reached the store.
    pub async fn flushed(&self) {
        self.writes.flushed().await
    }

    /// The term drains: heartbeats' records still queued are written, later
    /// ones are not (see [`WriteBehind::close`]).
    pub async fn close_writes(&self) {
        self.writes.close().await
    }

    /// `f` of a node's last reported status and when it was heard, without
    /// copying the status (the health gate reads thousands per check).
    pub fn with_status<R>(&self, node_id: &str, f: impl FnOnce(&NodeStatus, u64) -> R) -> Option<R> {
        self.lock_read().get(node_id).map(|e| f(&e.status, e.last_heartbeat_ms))
    }

    pub fn get(&self, node_id: &str) -> Option<NodeView> {
        self.lock_read().get(node_id).map(view)
    }

    pub fn is_lost(&self, node_id: &str) -> bool {
        self.lock_read().get(node_id).is_none_or(|e| e.lost)
    }

    /// Every node's id (unsorted): no status is copied.
    pub fn ids(&self) -> Vec<String> {
        self.lock_read().keys().cloned().collect()
    }

    /// Nodes registered, back from lost, or whose processes, builds or patch
    /// stacks changed since the last call (figures alone are not a change).
    /// One reader per term: the reconciler.
    pub fn take_changed(&self) -> HashSet<String> {
        std::mem::take(&mut *self.changed.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn mark_changed(&self, node_id: &str) {
        self.changed.lock().unwrap_or_else(|e| e.into_inner()).insert(node_id.to_string());
    }

    /// Every node, sorted by id.
    pub fn list(&self) -> Vec<NodeView> {
        let mut nodes: Vec<NodeView> = self.lock_read().values().map(view).collect();
        nodes.sort_by(|a, b| a.status.node_id.cmp(&b.status.node_id));
        nodes
    }

    /// How often [`sweep`](Self::sweep) should run: a quarter of the lost
    /// timeout, between 10 ms and 1 s.
    pub fn sweep_interval(&self) -> Duration {
        (self.lost_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

/// `interval` rounded up to whole seconds, at least 1.
pub fn advertised_seconds(interval: Duration) -> u32 {
    (interval.as_secs_f64().ceil() as u32).max(1)
}

fn view(entry: &Entry) -> NodeView {
    NodeView {
        status: entry.status.clone(),
        liveness: if entry.lost { Liveness::Lost } else { Liveness::Alive },
        registered_at_ms: entry.registered_at_ms,
        last_heartbeat_ms: entry.last_heartbeat_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn status(id: &str) -> NodeStatus {
        NodeStatus { node_id: id.into(), advertise_addr: "127.0.0.1:1".into(), ..Default::default() }
    }

    async fn registry(dir: &std::path::Path, interval_ms: u64) -> Registry {
        let store = Arc::new(EmbeddedStore::open(dir).expect("open"));
        let fence = store.acquire_epoch().await.expect("epoch");
        Registry::load(store, fence, Duration::from_millis(interval_ms), Duration::from_millis(interval_ms * 3))
            .await
            .expect("load")
    }

    #[tokio::test]
    async fn register_heartbeat_and_lose() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = registry(dir.path(), 20).await;
        assert!(!reg.heartbeat(status("n1")).await.expect("hb"), "unknown node must re-register");
        reg.register(status("n1")).await.expect("register");
        assert!(reg.heartbeat(status("n1")).await.expect("hb"));
        assert!(!reg.is_lost("n1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(reg.sweep(), ["n1"]);
        assert!(reg.is_lost("n1"));
        assert!(reg.sweep().is_empty(), "reported once");
        assert!(reg.heartbeat(status("n1")).await.expect("hb"));
        assert!(!reg.is_lost("n1"), "a heartbeat revives a lost node");
    }

    fn with_digests(id: &str, patch: &str) -> NodeStatus {
        let mut s = status(id);
        s.processes.push(crate::node::ProcessStatus {
            process_id: format!("{id}-p"),
            patch_stack: vec![patch.into()].into(),
            live_digests: (0..32).map(|m| (format!("game.mod_{m}"), format!("{patch}-{m:060}"))).collect(),
            ..Default::default()
        });
        s
    }

    fn digests_of(reg: &Registry, id: &str) -> crate::digests::Digests {
        reg.get(id).expect("known").status.processes[0].live_digests.clone()
    }

    fn stack_of(reg: &Registry, id: &str) -> crate::interned::PatchStack {
        reg.get(id).expect("known").status.processes[0].patch_stack.clone()
    }

    #[tokio::test]
    async fn nodes_on_one_stack_share_one_digest_map_and_one_stack_and_a_new_term_learns_the_map_from_heartbeats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids: Vec<String> = (0..50).map(|i| format!("n{i}")).collect();
        {
            let reg = registry(dir.path(), 1000).await;
            for id in &ids {
                reg.register(with_digests(id, "p1")).await.expect("register");
                assert!(reg.heartbeat(with_digests(id, "p1")).await.expect("hb"));
            }
            let first = digests_of(&reg, "n0");
            assert!(ids.iter().all(|id| digests_of(&reg, id).shares(&first)), "one map for 50 nodes");
            let stack = stack_of(&reg, "n0");
            assert!(ids.iter().all(|id| stack_of(&reg, id).shares(&stack)), "one patch stack for 50 nodes");
            // Half the fleet moves to the next patch: two maps, each shared.
            for id in &ids[..25] {
                assert!(reg.heartbeat(with_digests(id, "p2")).await.expect("hb"));
            }
            let moved = digests_of(&reg, "n0");
            assert!(!moved.shares(&first));
            assert!(ids[..25].iter().all(|id| digests_of(&reg, id).shares(&moved)));
            assert!(ids[25..].iter().all(|id| digests_of(&reg, id).shares(&digests_of(&reg, "n49"))));
            let moved_stack = stack_of(&reg, "n0");
            assert!(!moved_stack.shares(&stack) && *moved_stack == ["p2".to_string()]);
            assert!(ids[..25].iter().all(|id| stack_of(&reg, id).shares(&moved_stack)));
            assert_eq!(moved.len(), 32, "the map itself is whole");
            reg.flushed().await;
        }
        // Digests are not stored: a new term knows them from the next heartbeat on.
        let reg = registry(dir.path(), 1000).await;
        assert!(ids.iter().all(|id| digests_of(&reg, id).is_empty()));
        for (i, id) in ids.iter().enumerate() {
            assert!(reg.heartbeat(with_digests(id, if i < 25 { "p2" } else { "p1" })).await.expect("hb"));
        }
        assert!(
            ids[1..25].iter().all(|id| stack_of(&reg, id).shares(&stack_of(&reg, "n0"))),
            "loaded stacks are shared too"
        );
        let (a, b) = (digests_of(&reg, "n0"), digests_of(&reg, "n49"));
        assert!(!a.shares(&b));
        assert!(ids[..25].iter().all(|id| digests_of(&reg, id).shares(&a)));
        assert!(ids[25..].iter().all(|id| digests_of(&reg, id).shares(&b)));
    }

    /// The heartbeat of an agent whose leader holds its digests: left out.
    fn unchanged(id: &str, patch: &str) -> NodeStatus {
        let mut s = with_digests(id, patch);
        s.processes[0].live_digests = Default::default();
        s.processes[0].live_digests_unchanged = true;
        s
    }

    #[tokio::test]
    async fn digests_left_out_as_unchanged_are_kept_and_a_term_without_them_asks_for_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let reg = registry(dir.path(), 1000).await;
            reg.register(with_digests("n1", "p1")).await.expect("register");
            let heard = reg.hear(unchanged("n1", "p1")).await.expect("hb");
            assert_eq!(heard, Heard { known: true, send_digests: false });
            assert_eq!(digests_of(&reg, "n1").len(), 32, "the map held is kept");
            assert!(!reg.get("n1").expect("known").status.processes[0].live_digests_unchanged, "never kept");
            // A changed map comes whole and replaces it.
            assert!(!reg.hear(with_digests("n1", "p2")).await.expect("hb").send_digests);
            assert_eq!(digests_of(&reg, "n1"), with_digests("x", "p2").processes[0].live_digests);
            reg.flushed().await;
        }
        // A new term holds no digests (they are not stored): it asks for them,
        // keeps none meanwhile, and holds them from the next full heartbeat.
        let reg = registry(dir.path(), 1000).await;
        assert_eq!(reg.hear(unchanged("n1", "p2")).await.expect("hb"), Heard { known: true, send_digests: true });
        assert!(digests_of(&reg, "n1").is_empty());
        assert!(reg.hear(unchanged("n1", "p2")).await.expect("hb").send_digests, "asked again until they come");
        assert!(!reg.hear(with_digests("n1", "p2")).await.expect("hb").send_digests);
        assert_eq!(digests_of(&reg, "n1").len(), 32);
        assert!(!reg.hear(unchanged("n1", "p2")).await.expect("hb").send_digests);
        assert_eq!(digests_of(&reg, "n1").len(), 32);
        // A process it never heard of, marked unchanged, is asked for too.
        let mut other = unchanged("n1", "p2");
        other.processes[0].process_id = "n1-new".into();
        assert!(reg.hear(other).await.expect("hb").send_digests);
    }

    /// A status naming its map by fingerprint, as an agent sends a changed one.
    fn named(id: &str, patch: &str) -> NodeStatus {
        let mut s = with_digests(id, patch);
        let map = std::mem::take(&mut s.processes[0].live_digests);
        s.processes[0].live_digests_fingerprint = hotfleet_proto::digests::fingerprint(map.iter());
        s
    }

    #[tokio::test]
    async fn a_map_named_by_fingerprint_is_the_one_another_node_sent_and_an_unheard_one_is_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = registry(dir.path(), 1000).await;
        // Nobody sent p1's map: the registration is taken, its digests asked for.
        assert_eq!(reg.register(named("n1", "p1")).await.expect("register"), Heard { known: true, send_digests: true });
        assert!(digests_of(&reg, "n1").is_empty(), "no digests listed rather than wrong ones");
        assert!(!reg.hear(with_digests("n1", "p1")).await.expect("hb").send_digests, "sent whole: held");
        // Every other node names it and gets the shared copy.
        for id in ["n2", "n3"] {
            assert!(!reg.register(named(id, "p1")).await.expect("register").send_digests);
            assert!(digests_of(&reg, id).shares(&digests_of(&reg, "n1")));
        }
        assert!(reg.get("n2").expect("known").status.processes[0].live_digests_fingerprint.is_empty(), "never kept");
        // A patch lands: the first to report names a map nobody sent yet.
        assert!(reg.hear(named("n1", "p2")).await.expect("hb").send_digests);
        assert!(digests_of(&reg, "n1").is_empty(), "the old map is not listed for the new stack");
        assert!(!reg.hear(with_digests("n1", "p2")).await.expect("hb").send_digests);
        assert!(!reg.hear(named("n2", "p2")).await.expect("hb").send_digests, "the others name it");
        assert!(digests_of(&reg, "n2").shares(&digests_of(&reg, "n1")));
        assert_eq!(digests_of(&reg, "n2"), with_digests("x", "p2").processes[0].live_digests);
        // A fingerprint that is not one is refused, and changes nothing.
        let mut bad = named("n3", "p2");
        bad.processes[0].live_digests_fingerprint = "f".repeat(hotfleet_proto::digests::FINGERPRINT_LEN + 1);
        assert!(matches!(reg.hear(bad).await, Err(RegistryError::Input(_))));
        assert_eq!(digests_of(&reg, "n3"), with_digests("x", "p1").processes[0].live_digests);
    }

    #[tokio::test]
    async fn stored_nodes_are_not_judged_lost_in_the_startup_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let reg = registry(dir.path(), 20).await;
            reg.register(status("n1")).await.expect("register");
        }
        // A new term: n1's agent has not found this coordinator yet.
        let reg = registry(dir.path(), 20).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(reg.sweep().is_empty(), "silent for 200 ms, past the 60 ms lost timeout, but within the grace");
        assert!(!reg.is_lost("n1"));
        // Its first heartbeat ends the grace: from now on, the lost timeout alone.
        assert!(reg.heartbeat(status("n1")).await.expect("hb"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(reg.sweep(), ["n1"]);
    }

    #[tokio::test]
    async fn registrations_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let reg = registry(dir.path(), 1000).await;
            let mut s = status("n2");
            s.labels.insert("zone".into(), "a".into());
            reg.register(s).await.expect("register");
        }
        let reg = registry(dir.path(), 1000).await;
        let node = reg.get("n2").expect("remembered");
        assert_eq!(node.status.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(node.liveness, Liveness::Alive);
    }

    #[tokio::test]
    async fn removal_forgets_the_node_in_the_store_too_and_expiry_names_long_lost_nodes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = registry(dir.path(), 10).await;
        for id in ["n1", "n2"] {
            reg.register(status(id)).await.expect("register");
        }
        let audit = crate::patches::audit("sre", "node.remove", "n1", "", true);
        assert!(reg.remove("n1", audit.clone()).await.expect("remove").is_some());
        assert!(reg.remove("n1", audit).await.expect("again").is_none(), "unknown: nothing to remove");
        assert!(reg.get("n1").is_none());
        let stored: Vec<String> =
            reg.store.nodes().await.expect("nodes").iter().map(|r| r.node_id().to_string()).collect();
        assert_eq!(stored, ["n2"]);
        assert!(!reg.heartbeat(status("n1")).await.expect("hb"), "a removed node must register again");
        assert!(reg.expired(Duration::from_millis(50)).is_empty(), "n2 is not lost yet");
        tokio::time::sleep(Duration::from_millis(120)).await;
        reg.sweep();
        assert_eq!(reg.expired(Duration::from_millis(50)), ["n2"]);
        assert!(reg.expired(Duration::from_secs(60)).is_empty());
    }

    fn with_stack(id: &str, stack: &[&str]) -> NodeStatus {
        let process = crate::node::ProcessStatus {
            process_id: "p".into(),
            patch_stack: stack.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        NodeStatus { processes: vec![process], ..status(id) }
    }

    async fn stored_stack(reg: &Registry, id: &str) -> Option<Vec<String>> {
        let nodes = reg.store.nodes().await.expect("nodes");
        let node = nodes.into_iter().find(|r| r.node_id() == id)?;
        Some(node.status.processes.first().map(|p| p.patch_stack.to_vec()).unwrap_or_default())
    }

    #[tokio::test]
    async fn a_heartbeat_never_waits_on_its_record_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = registry(dir.path(), 1000).await;
        reg.register(with_stack("n1", &[])).await.expect("register");
        // Every write of node records held back, as behind a busy store.
        let held = reg.writes.exclusive("someone-else").await;
        for stack in [&["p1"][..], &["p1", "p2"]] {
            let beat = tokio::time::timeout(Duration::from_secs(1), reg.heartbeat(with_stack("n1", stack)));
            assert!(beat.await.expect("answered at once").expect("hb"));
        }
        assert_eq!(stored_stack(&reg, "n1").await, Some(vec![]), "not written yet");
        assert_eq!(reg.writes.backlog(), 1, "coalesced: only the newest record waits");
        drop(held);
        reg.flushed().await;
        assert_eq!(stored_stack(&reg, "n1").await, Some(vec!["p1".to_string(), "p2".to_string()]));
    }

    #[tokio::test]
    async fn a_record_written_behind_never_lands_after_the_nodes_removal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = registry(dir.path(), 1000).await;
        reg.register(with_stack("n1", &[])).await.expect("register");
        let held = reg.writes.exclusive("someone-else").await;
        let removing = {
            let reg = reg.clone();
            tokio::spawn(
                async move { reg.remove("n1", crate::patches::audit("sre", "node.remove", "n1", "", true)).await },
            )
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Heard while the removal waits its turn: queued behind it.
        assert!(reg.heartbeat(with_stack("n1", &["p1"])).await.expect("hb"));
        drop(held);
        assert!(removing.await.expect("task").expect("remove").is_some());
        reg.flushed().await;
        assert_eq!(stored_stack(&reg, "n1").await, None, "the removal is the last write");
    }

    #[tokio::test]
    async fn refuses_bad_registrations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = registry(dir.path(), 1000).await;
        for bad in [status(""), status("a b"), NodeStatus { advertise_addr: String::new(), ..status("n") }] {
            assert!(matches!(reg.register(bad).await, Err(RegistryError::Invalid(_))));
        }
        let mut huge = status("n");
        huge.labels.insert("zone".into(), "z".repeat(4 << 20));
        let err = reg.register(huge).await.expect_err("4 MB label");
        assert!(matches!(err, RegistryError::Input(_)));
        assert!(err.to_string().len() < 200, "{err}");
        let mut many = status("n");
        many.processes = vec![Default::default(); input::MAX_PROCESSES + 1];
        assert!(matches!(reg.register(many).await, Err(RegistryError::Input(_))));
        assert!(reg.list().is_empty(), "nothing refused was registered");
    }
}
