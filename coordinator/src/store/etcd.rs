//! The etcd store: every record under one key prefix of an etcd cluster
//! (3.4 or 3.5), written only by the elected leader.
//!
//! Key layout (`P` is `--etcd-prefix`, default `/hotfleet/`):
//!
//! | key | value |
//! | --- | --- |
//! | `P leader` | the leader's address, bound to its lease (owned by `crate::leadership`) |
//! | `P nodes/<node>` | [`NodeRecord`] |
//! | `P patches/<id>` | [`PatchRecord`] |
//! | `P bundles/<id>/meta`, `P bundles/<id>/chunk-<i>` | bundle size + sha256, then the bytes in chunks of at most [`CHUNK_BYTES`] |
//! | `P rollouts/<id>` | [`Rollout`] without its plan (rewritten on every transition; a record written before plans were stored apart carries its own) |
//! | `P rollout-plans/<id>` | the rollout's plan, `RolloutPlan` (its steps and skipped nodes: fixed at the start, written once per leader) |
//! | `P rollout-nodes/<id>/n/<node>` | [`NodeState`] of one node of the rollout: written only when that node's state changed |
//! | `P rollout-nodes/<id>/s/<i>` (5 digits) | a finished rollout's node states once compacted ([`Store::compact_rollout`]): `{node id: NodeState}` without baselines, at most [`SUMMARY_CHUNK_BYTES`] each |
//! | `P rollout-nodes/<id>/<shard>` (2 digits) | the previous layout (read, never written): `{node id: NodeState}` of the nodes hashing to that shard |
//! | `P stacks/<build>` | the build's patch stack, `[StackEntry]` |
//! | `P audit/<seq>` (20 digits), `P audit-seq` | [`AuditEntry`]s and the last sequence number |
//! | `P freeze` | [`FreezeRecord`] |
//!
//! **Fencing.** A [`Batch`] is one etcd `Txn` whose first comparison is
//! `create_revision(P leader) == fence.epoch`: the epoch *is* the leader key's
//! create revision, so once the key expired or was replaced (another
//! coordinator leads) the comparison fails and nothing of the batch lands.
//! Only the leader writes, so read-modify-write keys (a patch stack, node
//! shards, the audit counter) are read first and guarded by a
//! `mod_revision` comparison in the same transaction; a conflict that is not
//! the fence (two of the leader's own batches racing) is re-planned and retried.
//!
//! **Sizes.** etcd refuses a request over 1.5 MiB and a transaction over 128
//! operations by default. Bundles are therefore written chunk by chunk, each
//! chunk its own fenced transaction, *before* the batch that stores the patch
//! record; a patch exists only once its record does (a coordinator dying in
//! between leaves invisible, content-addressed chunks that the next push
//! overwrites).
//!
//! **Node states, one key per node.** A step writes the states of the nodes it
//! changed and nothing else, so the bytes a rollout writes grow with what
//! changed (not nodes × steps, as the 16 rewritten shards of the previous
//! layout did; see docs/decisions.md). A batch whose per-node records (node
//! states, and node records from heartbeats) do not fit one transaction is
//! split ([`pack_nodes`]): the records that do not fit go first, in as many fenced transactions as needed (each within
//! [`MAX_TXN_OPS`] and [`MAX_TXN_BYTES`]), and the rest of the batch, with the
//! rollout record, goes last. The last transaction is the commit point: a
//! crash or a fenced write before it leaves some node states ahead of their
//! rollout record, which is safe because a node's desired state is an
//! over-approximation anyway (written before its command is sent; resuming
//! re-sends the phase's idempotent command, a rollback reverts whatever may
//! have been committed) and the write reports the failure, so the engine
//! does not move on. Only a single record too big for one request (a rollout
//! record of a few hundred thousand nodes) is refused, with [`StoreError::TooLarge`].
//!
//! **Previous layout.** A store written with node-state shards stays
//! readable: shard maps are read first and per-node keys and compacted
//! summaries override them, so a rollout resumed across the upgrade carries on
//! with per-node keys. Compaction deletes the shards with the rest.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, KvClient, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    AuditEntry, AuditRetention, Batch, Fence, FreezeRecord, NodeRecord, PatchRecord, RolloutPlan, StackEntry, Store,
    StoreError, Write, AUDIT_TRIM_BATCH,
};
use crate::rollout::{NodeState, Rollout};

/// Bytes per stored bundle chunk: one chunk per transaction, well under
/// etcd's 1.5 MiB request limit.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Largest compacted summary key of a finished rollout's node states.
pub const SUMMARY_CHUNK_BYTES: usize = 512 * 1024;
/// Largest transaction sent, in key + value bytes: etcd's default
/// `--max-request-bytes` (1.5 MiB) less room for the request's framing.
pub const MAX_TXN_BYTES: usize = 1_400_000;
/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// Largest response accepted from etcd (a prefix read of many records).
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
/// Room left in a batch's final transaction for its re-plan to grow.
const REPLAN_SLACK_BYTES: usize = 4096;
/// Re-plans of a batch whose read-modify-write keys changed under it.
const MAX_CONFLICT_RETRIES: usize = 16;

/// Where and how to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `http://host:port` (or `https://`), one per member.
    pub endpoints: Vec<String>,
    /// Every key lives under it; ends with `/`.
    pub prefix: String,
    /// etcd authentication (user, password).
    pub user: Option<(String, String)>,
    /// CA bundle to verify etcd's certificate with.
    pub ca: Option<PathBuf>,
    /// Client certificate and key for etcd's mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Deadline of one etcd request.
    pub timeout: Duration,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        Self {
            endpoints,
            prefix: normalize_prefix(&prefix.into()),
            user: None,
            ca: None,
            cert: None,
            key: None,
            timeout: Duration::from_secs(5),
        }
    }
}

/// `p` with exactly one trailing `/` (and `/` alone for an empty prefix).
pub fn normalize_prefix(p: &str) -> String {
    let trimmed = p.trim_end_matches('/');
    format!("{trimmed}/")
}

/// Bundle bookkeeping stored beside the chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BundleMeta {
    size: u64,
    chunks: u64,
    sha256: String,
}

/// The etcd-backed [`Store`].
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    kv: KvClient,
    prefix: String,
    endpoints: String,
    timeout: Duration,
    /// Digest of the plan this process last wrote per rollout: a plan is
    /// written again only when it differs (or after a restart, once).
    plans_written: Arc<Mutex<HashMap<String, [u8; 32]>>>,
}

/// Refuses a transaction of `ops` operations, `compares` comparisons and
/// `bytes` bytes that etcd's default limits would refuse.
fn check_size(ops: usize, compares: usize, bytes: usize) -> Result<(), StoreError> {
    if ops > MAX_TXN_OPS || compares > MAX_TXN_OPS {
        return Err(StoreError::TooLarge(format!(
            "{ops} writes and {compares} comparisons in one transaction exceed etcd's default --max-txn-ops {MAX_TXN_OPS}"
        )));
    }
    if bytes > MAX_TXN_BYTES {
        return Err(StoreError::TooLarge(format!(
            "{bytes} bytes in one transaction exceed etcd's default --max-request-bytes (1.5 MiB): \
             a single record (the rollout's, with its plan) is too big for one etcd request; \
             split the rollout with --selector"
        )));
    }
    Ok(())
}

/// How a batch's node-state puts are spread over transactions: `last` go
/// with the rest of the batch (its final transaction, which already holds
/// `used_ops` operations and `used_bytes` bytes), `leading` are sent before
/// it, each its own transaction within etcd's limits. Puts are `(key, value)`.
#[derive(Debug, Default, PartialEq)]
pub struct NodePacking {
    pub leading: Vec<Vec<(String, Vec<u8>)>>,
    pub last: Vec<(String, Vec<u8>)>,
}

/// Bytes one put costs in a transaction (key, value and framing).
fn put_cost(key: &str, value: &[u8]) -> usize {
    key.len() + value.len() + 16
}

/// Splits `puts` so that every transaction stays within [`MAX_TXN_OPS`] and
/// [`MAX_TXN_BYTES`]: as many as fit join the final transaction, the rest
/// fill leading ones in key order. A put too big for any transaction is
/// refused (a node state is a few hundred bytes; only a corrupt one could be).
pub fn pack_nodes(puts: Vec<(String, Vec<u8>)>, used_ops: usize, used_bytes: usize) -> Result<NodePacking, StoreError> {
    let mut packing = NodePacking::default();
    let (mut last_ops, mut last_bytes) = (used_ops, used_bytes);
    let mut current: Vec<(String, Vec<u8>)> = Vec::new();
    let mut current_bytes = 0usize;
    for (key, value) in puts {
        let cost = put_cost(&key, &value);
        if cost > MAX_TXN_BYTES {
            return Err(StoreError::TooLarge(format!(
                "the record under {key} is {cost} bytes, over etcd's default --max-request-bytes (1.5 MiB)"
            )));
        }
        if last_ops < MAX_TXN_OPS && last_bytes + cost <= MAX_TXN_BYTES {
            last_ops += 1;
            last_bytes += cost;
            packing.last.push((key, value));
            continue;
        }
        if current.len() == MAX_TXN_OPS || current_bytes + cost > MAX_TXN_BYTES {
            packing.leading.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current_bytes += cost;
        current.push((key, value));
    }
    if !current.is_empty() {
        packing.leading.push(current);
    }
    Ok(packing)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Backend(e.to_string()))?;
    crate::telemetry::store_wrote("etcd", bytes.len());
    Ok(bytes)
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|err| StoreError::Corrupt { key: key.to_string(), reason: err.to_string() })
}

/// A read-modify-write key as the plan sees it: the value it started from
/// (guarded by its mod revision) and the value the batch leaves.
struct Rmw {
    mod_revision: i64,
    value: Option<Vec<u8>>,
    dirty: bool,
}

/// One batch turned into a transaction.
#[derive(Default)]
struct Plan {
    /// Final value per key (`None` deletes): one operation per key, as etcd
    /// refuses a transaction naming a key twice.
    puts: BTreeMap<String, Option<Vec<u8>>>,
    rmw: HashMap<String, Rmw>,
    /// Keys that must still be absent (put-if-absent).
    absent: Vec<String>,
    seqs: Vec<u64>,
    /// Plans this batch writes, by rollout id: remembered once it commits.
    plans: Vec<(String, [u8; 32])>,
}

impl Plan {
    /// Operations and bytes of the transaction this plan becomes.
    fn size(&self) -> (usize, usize) {
        let bytes = self.puts.iter().map(|(key, value)| put_cost(key, value.as_deref().unwrap_or_default())).sum();
        (self.puts.len(), bytes)
    }
}

enum Outcome {
    Committed,
    /// A read-modify-write key moved: plan again.
    Conflict,
}

impl EtcdStore {
    /// Connects (lazily: an unreachable etcd is retried by every call, it does
    /// not stop the coordinator from starting).
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, StoreError> {
        let open = |reason: String| StoreError::Open { path: opts.endpoints.join(","), reason };
        if opts.endpoints.is_empty() {
            return Err(open("no etcd endpoint given (--etcd-endpoints)".into()));
        }
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(opts.timeout)
            .with_timeout(opts.timeout)
            .with_keep_alive(Duration::from_secs(10), opts.timeout)
            // Writes and reads must reach the raft leader: a member cut off
            // from its quorum must not answer from a stale view.
            .with_require_leader(true);
        if let Some((user, password)) = &opts.user {
            // etcd's auth tokens expire (simple tokens after 5 minutes idle,
            // JWTs at their TTL): re-authenticate instead of failing every call.
            connect = connect.with_user(user.clone(), password.clone()).with_auto_token_refresh(true);
        }
        connect = with_tls(connect, opts).map_err(open)?;
        let client = Client::connect(&opts.endpoints, Some(connect))
            .await
            .map_err(|e| open(format!("{e} (check --etcd-endpoints and, with auth, --etcd-user/--etcd-password)")))?;
        let kv = client.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
        Ok(Self {
            client,
            kv,
            prefix: normalize_prefix(&opts.prefix),
            endpoints: opts.endpoints.join(","),
            timeout: opts.timeout,
            plans_written: Arc::default(),
        })
    }

    /// The etcd client (leader election shares the connection).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key whose create revision is the leader's epoch.
    pub fn leader_key(&self) -> String {
        self.key("leader")
    }

    fn key(&self, relative: &str) -> String {
        format!("{}{relative}", self.prefix)
    }

    fn rollout_nodes_prefix(&self, rollout_id: &str) -> String {
        self.key(&format!("rollout-nodes/{rollout_id}/"))
    }

    fn plans_written(&self) -> std::sync::MutexGuard<'_, HashMap<String, [u8; 32]>> {
        // One insert or lookup per critical section: a poisoned lock holds no half-update.
        self.plans_written.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn node_key(&self, rollout_id: &str, node_id: &str) -> String {
        format!("{}n/{node_id}", self.rollout_nodes_prefix(rollout_id))
    }

    fn summary_key(&self, rollout_id: &str, i: usize) -> String {
        format!("{}s/{i:05}", self.rollout_nodes_prefix(rollout_id))
    }

    fn bundle_meta_key(&self, patch_id: &str) -> String {
        self.key(&format!("bundles/{patch_id}/meta"))
    }

    fn chunk_key(&self, patch_id: &str, i: u64) -> String {
        self.key(&format!("bundles/{patch_id}/chunk-{i:05}"))
    }

    fn backend_err(&self, err: impl std::fmt::Display) -> StoreError {
        StoreError::Backend(format!("etcd at {}: {err}", self.endpoints))
    }

    /// Runs one etcd call under the request deadline (the client's own
    /// timeout covers the request; this also covers a stalled connection).
    async fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(|e| self.backend_err(e)),
            Err(_) => Err(self.backend_err(format!("no answer within {} ms", self.timeout.as_millis()))),
        }
    }

    async fn get_kv(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self.kv.clone();
        let mut resp = self.call(kv.get(key, None)).await?;
        Ok(resp.take_kvs().into_iter().next())
    }

    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.get_kv(key).await? {
            Some(kv) => Ok(Some(decode(key, kv.value())?)),
            None => Ok(None),
        }
    }

    async fn get_prefix(&self, prefix: &str, options: GetOptions) -> Result<Vec<KeyValue>, StoreError> {
        let mut kv = self.kv.clone();
        let mut resp = self.call(kv.get(prefix, Some(options.with_prefix()))).await?;
        Ok(resp.take_kvs())
    }

    async fn list_json<T: DeserializeOwned>(&self, relative_prefix: &str) -> Result<Vec<T>, StoreError> {
        let prefix = self.key(relative_prefix);
        self.get_prefix(&prefix, GetOptions::new())
            .await?
            .iter()
            .map(|kv| decode(&String::from_utf8_lossy(kv.key()), kv.value()))
            .collect()
    }

    /// The fence comparison every transaction starts with, and the read
    /// that tells, when it fails, who holds the store now.
    fn fenced_txn(&self, fence: Fence, mut compares: Vec<Compare>, ops: Vec<TxnOp>) -> Txn {
        compares.insert(0, Compare::create_revision(self.leader_key(), CompareOp::Equal, fence.epoch as i64));
        Txn::new().when(compares).and_then(ops).or_else(vec![TxnOp::get(self.leader_key(), None)])
    }

    /// The epoch now holding the leader key, from a failed transaction's
    /// `or_else` read (0: nobody leads).
    fn current_epoch_of(resp: &etcd_client::TxnResponse) -> u64 {
        resp.op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(get) => Some(get.kvs().first().map(|kv| kv.create_revision() as u64).unwrap_or(0)),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// Writes the chunks of every new bundle of `batch` (each chunk one
    /// fenced transaction): bundles exceed one etcd request.
    async fn stage_bundles(&self, fence: Fence, batch: &Batch) -> Result<(), StoreError> {
        for write in &batch.writes {
            let Write::PutPatch { record, bundle } = write else { continue };
            if self.get_kv(&self.key(&format!("patches/{}", record.patch_id))).await?.is_some() {
                continue;
            }
            for (i, chunk) in bundle.chunks(CHUNK_BYTES).enumerate() {
                crate::telemetry::store_wrote("etcd", chunk.len());
                let op = TxnOp::put(self.chunk_key(&record.patch_id, i as u64), chunk.to_vec(), None);
                let mut kv = self.kv.clone();
                let resp = self.call(kv.txn(self.fenced_txn(fence, Vec::new(), vec![op]))).await?;
                if !resp.succeeded() {
                    return Err(StoreError::Fenced { ours: fence.epoch, current: Self::current_epoch_of(&resp) });
                }
            }
        }
        Ok(())
    }

    /// The value a read-modify-write key holds in this plan (read from etcd
    /// on first use, then as the batch left it).
    async fn rmw<'a>(&self, plan: &'a mut Plan, key: &str) -> Result<&'a mut Rmw, StoreError> {
        if !plan.rmw.contains_key(key) {
            let (mod_revision, value) = match self.get_kv(key).await? {
                Some(kv) => (kv.mod_revision(), Some(kv.value().to_vec())),
                None => (0, None),
            };
            plan.rmw.insert(key.to_string(), Rmw { mod_revision, value, dirty: false });
        }
        plan.rmw.get_mut(key).ok_or_else(|| StoreError::Backend("read-modify-write key vanished".into()))
    }

    async fn plan(&self, batch: &Batch) -> Result<Plan, StoreError> {
        let mut plan = Plan::default();
        let mut audit_seq: Option<u64> = None;
        for write in &batch.writes {
            match write {
                // Per-node records are packed separately (see `per_node_writes`):
                // they may need transactions of their own.
                Write::PutNode(_) | Write::RemoveNode(_) | Write::PutRolloutNodes { .. } => {}
                Write::PutPatch { record, bundle } => {
                    let key = self.key(&format!("patches/{}", record.patch_id));
                    if plan.puts.contains_key(&key) || self.get_kv(&key).await?.is_some() {
                        // Put-if-absent: the id is a digest, an existing record is the same patch.
                        continue;
                    }
                    let meta = BundleMeta {
                        size: bundle.len() as u64,
                        chunks: bundle.len().div_ceil(CHUNK_BYTES) as u64,
                        sha256: hex::encode(Sha256::digest(bundle)),
                    };
                    plan.puts.insert(self.bundle_meta_key(&record.patch_id), Some(encode(&meta)?));
                    plan.puts.insert(key.clone(), Some(encode(record)?));
                    plan.absent.push(key);
                }
                Write::PutRollout(rollout) => {
                    let (record, rollout_plan) = RolloutPlan::split(rollout);
                    let bytes = serde_json::to_vec(&rollout_plan).map_err(|e| StoreError::Backend(e.to_string()))?;
                    let digest: [u8; 32] = Sha256::digest(&bytes).into();
                    if self.plans_written().get(&rollout.id) != Some(&digest) {
                        crate::telemetry::store_wrote("etcd", bytes.len());
                        plan.puts.insert(self.key(&format!("rollout-plans/{}", rollout.id)), Some(bytes));
                        plan.plans.push((rollout.id.clone(), digest));
                    }
                    plan.puts.insert(self.key(&format!("rollouts/{}", rollout.id)), Some(encode(&record)?));
                }
                Write::PushStack(stack_entry) => {
                    let key = self.key(&format!("stacks/{}", stack_entry.target_build));
                    let entry = self.rmw(&mut plan, &key).await?;
                    let mut stack: Vec<StackEntry> = match &entry.value {
                        Some(bytes) => decode(&key, bytes)?,
                        None => Vec::new(),
                    };
                    // A resumed completion must not push the same patch twice.
                    if !stack.iter().any(|e| e.patch_id == stack_entry.patch_id) {
                        stack.push(stack_entry.clone());
                        entry.value = Some(encode(&stack)?);
                        entry.dirty = true;
                    }
                }
                Write::DropStack { target_build, patch_id } => {
                    let key = self.key(&format!("stacks/{target_build}"));
                    let entry = self.rmw(&mut plan, &key).await?;
                    let mut stack: Vec<StackEntry> = match &entry.value {
                        Some(bytes) => decode(&key, bytes)?,
                        None => Vec::new(),
                    };
                    if stack.iter().any(|e| &e.patch_id == patch_id) {
                        stack.retain(|e| &e.patch_id != patch_id);
                        entry.value = Some(encode(&stack)?);
                        entry.dirty = true;
                    }
                }
                Write::Audit(audit) => {
                    let seq = match audit_seq {
                        Some(seq) => seq + 1,
                        None => {
                            let key = self.key("audit-seq");
                            let entry = self.rmw(&mut plan, &key).await?;
                            let last = match &entry.value {
                                Some(bytes) => std::str::from_utf8(bytes)
                                    .ok()
                                    .and_then(|t| t.trim().parse::<u64>().ok())
                                    .ok_or_else(|| StoreError::Corrupt {
                                        key: key.clone(),
                                        reason: "not a sequence number".into(),
                                    })?,
                                None => 0,
                            };
                            last + 1
                        }
                    };
                    audit_seq = Some(seq);
                    let mut entry = audit.clone();
                    entry.seq = seq;
                    plan.puts.insert(self.key(&format!("audit/{seq:020}")), Some(encode(&entry)?));
                    plan.seqs.push(seq);
                }
                Write::SetFreeze(freeze) => {
                    let value = match freeze {
                        Some(record) => Some(encode(record)?),
                        None => None,
                    };
                    plan.puts.insert(self.key("freeze"), value);
                }
            }
        }
        if let Some(seq) = audit_seq {
            let key = self.key("audit-seq");
            let entry = self.rmw(&mut plan, &key).await?;
            entry.value = Some(seq.to_string().into_bytes());
            entry.dirty = true;
        }
        for (key, entry) in &plan.rmw {
            if entry.dirty {
                plan.puts.insert(key.clone(), entry.value.clone());
            }
        }
        Ok(plan)
    }

    /// The per-node records of `batch` (rollout node states and node
    /// records), in batch order, under their keys: the last write of a key
    /// wins (`None` deletes). These are the writes the store may split over
    /// transactions: each is a whole record of one node, read by key alone.
    fn per_node_writes(&self, batch: &Batch) -> Result<BTreeMap<String, Option<Vec<u8>>>, StoreError> {
        let mut writes = BTreeMap::new();
        for write in &batch.writes {
            match write {
                Write::PutRolloutNodes { rollout_id, nodes } => {
                    for node in nodes {
                        writes.insert(self.node_key(rollout_id, &node.node_id), Some(encode(node)?));
                    }
                }
                Write::PutNode(node) => {
                    writes.insert(self.key(&format!("nodes/{}", node.node_id())), Some(encode(node)?));
                }
                Write::RemoveNode(id) => {
                    writes.insert(self.key(&format!("nodes/{id}")), None);
                }
                _ => {}
            }
        }
        Ok(writes)
    }

    /// Blind puts and deletes in one fenced transaction (keys only the
    /// leader writes, nothing read first).
    async fn fenced_ops(&self, fence: Fence, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        let mut kv = self.kv.clone();
        let resp = self.call(kv.txn(self.fenced_txn(fence, Vec::new(), ops))).await?;
        if !resp.succeeded() {
            return Err(StoreError::Fenced { ours: fence.epoch, current: Self::current_epoch_of(&resp) });
        }
        Ok(())
    }

    async fn commit(&self, fence: Fence, plan: &Plan) -> Result<Outcome, StoreError> {
        let mut compares = Vec::new();
        for (key, entry) in &plan.rmw {
            if entry.dirty {
                compares.push(Compare::mod_revision(key.as_str(), CompareOp::Equal, entry.mod_revision));
            }
        }
        for key in &plan.absent {
            compares.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
        }
        let mut bytes = 0usize;
        let ops: Vec<TxnOp> = plan
            .puts
            .iter()
            .map(|(key, value)| {
                bytes += put_cost(key, value.as_deref().unwrap_or_default());
                match value {
                    Some(value) => TxnOp::put(key.as_str(), value.clone(), None::<PutOptions>),
                    None => TxnOp::delete(key.as_str(), None),
                }
            })
            .collect();
        check_size(ops.len(), compares.len() + 1, bytes)?;
        let mut kv = self.kv.clone();
        let resp = self.call(kv.txn(self.fenced_txn(fence, compares, ops))).await?;
        if resp.succeeded() {
            return Ok(Outcome::Committed);
        }
        let current = Self::current_epoch_of(&resp);
        if current != fence.epoch {
            return Err(StoreError::Fenced { ours: fence.epoch, current });
        }
        Ok(Outcome::Conflict)
    }
}

/// A rollout's node states from every key under `prefix` (its
/// `rollout-nodes/<id>/`): the previous layout's shards first, then compacted
/// summaries, then per-node keys, each overriding the one before.
fn merge_node_keys(prefix: &str, kvs: &[KeyValue]) -> Result<BTreeMap<String, NodeState>, StoreError> {
    let (mut shards, mut summaries, mut loose) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for kv in kvs {
        let key = String::from_utf8_lossy(kv.key());
        let relative = key.strip_prefix(prefix).unwrap_or(&key);
        if relative.starts_with("n/") {
            let node: NodeState = decode(&key, kv.value())?;
            loose.insert(node.node_id.clone(), node);
        } else if relative.starts_with("s/") {
            summaries.extend(decode::<BTreeMap<String, NodeState>>(&key, kv.value())?);
        } else {
            shards.extend(decode::<BTreeMap<String, NodeState>>(&key, kv.value())?);
        }
    }
    shards.extend(summaries);
    shards.extend(loose);
    Ok(shards)
}

/// `states` as JSON maps of at most [`SUMMARY_CHUNK_BYTES`] each (a state is
/// measured alone; the map adds a few bytes per entry).
fn summary_chunks(states: impl Iterator<Item = NodeState>) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut chunks = Vec::new();
    let mut current: BTreeMap<String, NodeState> = BTreeMap::new();
    let mut bytes = 0;
    for state in states {
        let size =
            serde_json::to_vec(&state).map_err(|e| StoreError::Backend(e.to_string()))?.len() + state.node_id.len() + 4;
        if !current.is_empty() && bytes + size > SUMMARY_CHUNK_BYTES {
            chunks.push(encode(&std::mem::take(&mut current))?);
            bytes = 0;
        }
        bytes += size;
        current.insert(state.node_id.clone(), state);
    }
    if !current.is_empty() {
        chunks.push(encode(&current)?);
    }
    Ok(chunks)
}

fn with_tls(connect: ConnectOptions, opts: &EtcdOptions) -> Result<ConnectOptions, String> {
    use etcd_client::{Certificate, Identity, TlsOptions};
    let uses_tls = opts.endpoints.iter().any(|e| e.starts_with("https://"));
    if !uses_tls && opts.ca.is_none() && opts.cert.is_none() {
        return Ok(connect);
    }
    let read = |path: &PathBuf| std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    let mut tls = TlsOptions::new();
    if let Some(ca) = &opts.ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    match (&opts.cert, &opts.key) {
        (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?)),
        (None, None) => {}
        _ => return Err("--etcd-cert and --etcd-key go together".into()),
    }
    Ok(connect.with_tls(tls))
}

#[async_trait]
impl Store for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    async fn write(&self, fence: Fence, batch: Batch) -> Result<Vec<u64>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.stage_bundles(fence, &batch).await?;
        let mut first = Some(self.plan(&batch).await?);
        let (mut ops, mut bytes) = first.as_ref().map_or((0, 0), Plan::size);
        // Deletes stay in the final transaction: a node removed with its
        // audit entry goes in one.
        let (puts, deletes): (Vec<_>, Vec<_>) =
            self.per_node_writes(&batch)?.into_iter().partition(|(_, v)| v.is_some());
        let deletes: Vec<String> = deletes.into_iter().map(|(key, _)| key).collect();
        ops += deletes.len();
        bytes += deletes.iter().map(|key| put_cost(key, &[])).sum::<usize>();
        // A batch whose other records cannot fit is refused before any of its
        // per-node records is sent.
        check_size(ops, 0, bytes)?;
        let puts = puts.into_iter().filter_map(|(key, value)| Some((key, value?))).collect();
        // Room for a re-planned final transaction to grow a little (an audit
        // sequence number, a stack entry pushed meanwhile).
        let packing = pack_nodes(puts, ops, bytes + REPLAN_SLACK_BYTES)?;
        // Node states that do not fit the final transaction land first: the
        // final one, with the rollout record, is the commit point.
        for txn in packing.leading {
            let ops = txn.into_iter().map(|(key, value)| TxnOp::put(key, value, None)).collect();
            self.fenced_ops(fence, ops).await?;
        }
        for _ in 0..MAX_CONFLICT_RETRIES {
            let mut plan = match first.take() {
                Some(plan) => plan,
                None => self.plan(&batch).await?,
            };
            for (key, value) in &packing.last {
                plan.puts.insert(key.clone(), Some(value.clone()));
            }
            for key in &deletes {
                plan.puts.insert(key.clone(), None);
            }
            match self.commit(fence, &plan).await? {
                Outcome::Committed => {
                    self.plans_written().extend(plan.plans);
                    return Ok(plan.seqs);
                }
                Outcome::Conflict => tokio::task::yield_now().await,
            }
        }
        Err(self.backend_err(format!(
            "a batch kept conflicting with concurrent writes after {MAX_CONFLICT_RETRIES} attempts"
        )))
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.list_json("nodes/").await
    }

    async fn patch(&self, patch_id: &str) -> Result<Option<PatchRecord>, StoreError> {
        self.get_json(&self.key(&format!("patches/{patch_id}"))).await
    }

    async fn patch_bundle(&self, patch_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        // The record is written last: without it the patch does not exist,
        // whatever chunks an interrupted push left behind.
        if self.patch(patch_id).await?.is_none() {
            return Ok(None);
        }
        let meta_key = self.bundle_meta_key(patch_id);
        let Some(meta) = self.get_json::<BundleMeta>(&meta_key).await? else {
            return Err(StoreError::Corrupt { key: meta_key, reason: "patch record without bundle".into() });
        };
        let mut bytes = Vec::with_capacity(meta.size as usize);
        // One chunk per request: a whole bundle may exceed a response limit.
        for i in 0..meta.chunks {
            let key = self.chunk_key(patch_id, i);
            let kv = self
                .get_kv(&key)
                .await?
                .ok_or_else(|| StoreError::Corrupt { key: key.clone(), reason: "bundle chunk missing".into() })?;
            bytes.extend_from_slice(kv.value());
        }
        if bytes.len() as u64 != meta.size || hex::encode(Sha256::digest(&bytes)) != meta.sha256 {
            return Err(StoreError::Corrupt {
                key: meta_key,
                reason: "bundle chunks do not add up to the stored digest".into(),
            });
        }
        Ok(Some(bytes))
    }

    async fn patches(&self) -> Result<Vec<PatchRecord>, StoreError> {
        self.list_json("patches/").await
    }

    async fn rollout(&self, rollout_id: &str) -> Result<Option<Rollout>, StoreError> {
        let Some(record) = self.get_json::<Rollout>(&self.key(&format!("rollouts/{rollout_id}"))).await? else {
            return Ok(None);
        };
        let plan = self.get_json(&self.key(&format!("rollout-plans/{rollout_id}"))).await?;
        Ok(Some(RolloutPlan::join(record, plan)))
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let plans_prefix = self.key("rollout-plans/");
        let mut plans: HashMap<String, RolloutPlan> = HashMap::new();
        for kv in self.get_prefix(&plans_prefix, GetOptions::new()).await? {
            let key = String::from_utf8_lossy(kv.key()).to_string();
            let plan = decode(&key, kv.value())?;
            plans.insert(key[plans_prefix.len()..].to_string(), plan);
        }
        let records: Vec<Rollout> = self.list_json("rollouts/").await?;
        Ok(records
            .into_iter()
            .map(|r| {
                let plan = plans.remove(&r.id);
                RolloutPlan::join(r, plan)
            })
            .collect())
    }

    async fn rollout_nodes(&self, rollout_id: &str) -> Result<BTreeMap<String, NodeState>, StoreError> {
        let prefix = self.rollout_nodes_prefix(rollout_id);
        merge_node_keys(&prefix, &self.get_prefix(&prefix, GetOptions::new()).await?)
    }

    async fn compact_rollout(&self, fence: Fence, rollout_id: &str) -> Result<bool, StoreError> {
        match self.rollout(rollout_id).await? {
            Some(rollout) if rollout.phase.is_terminal() => {}
            _ => return Ok(false),
        }
        let prefix = self.rollout_nodes_prefix(rollout_id);
        let kvs = self.get_prefix(&prefix, GetOptions::new()).await?;
        let loose =
            kvs.iter().any(|kv| !kv.key().strip_prefix(prefix.as_bytes()).unwrap_or_default().starts_with(b"s/"));
        if !loose {
            return Ok(false);
        }
        let states = merge_node_keys(&prefix, &kvs)?;
        let chunks = summary_chunks(states.values().map(NodeState::summary))?;
        // The summary lands first (a node key, where still present, overrides
        // it with the same state), then one transaction deletes the node keys,
        // the previous layout's shards and any summary chunk past the new ones.
        for (i, chunk) in chunks.iter().enumerate() {
            let op = TxnOp::put(self.summary_key(rollout_id, i), chunk.clone(), None);
            self.fenced_ops(fence, vec![op]).await?;
        }
        let summaries = format!("{prefix}s/");
        let deletes = vec![
            TxnOp::delete(prefix.as_str(), Some(DeleteOptions::new().with_range(summaries.as_str()))),
            TxnOp::delete(
                self.summary_key(rollout_id, chunks.len()),
                Some(DeleteOptions::new().with_range(format!("{prefix}s0"))),
            ),
        ];
        self.fenced_ops(fence, deletes).await?;
        Ok(true)
    }

    async fn patch_stack(&self, target_build: &str) -> Result<Vec<StackEntry>, StoreError> {
        Ok(self.get_json(&self.key(&format!("stacks/{target_build}"))).await?.unwrap_or_default())
    }

    async fn audit(&self, limit: usize, before: Option<u64>) -> Result<Vec<AuditEntry>, StoreError> {
        let options = GetOptions::new().with_sort(SortTarget::Key, SortOrder::Descend).with_limit(limit as i64);
        let kvs = match before {
            None => self.get_prefix(&self.key("audit/"), options).await?,
            Some(before) => {
                // Keys are zero-padded: key order is sequence order.
                let end = self.key(&format!("audit/{before:020}"));
                let mut kv = self.kv.clone();
                self.call(kv.get(self.key("audit/"), Some(options.with_range(end)))).await?.take_kvs()
            }
        };
        kvs.iter().map(|kv| decode(&String::from_utf8_lossy(kv.key()), kv.value())).collect()
    }

    async fn trim_audit(&self, fence: Fence, retention: AuditRetention, now_ms: u64) -> Result<u64, StoreError> {
        let last = match self.get_kv(&self.key("audit-seq")).await? {
            Some(kv) => std::str::from_utf8(kv.value()).ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or(0),
            None => return Ok(0),
        };
        let oldest =
            GetOptions::new().with_sort(SortTarget::Key, SortOrder::Ascend).with_limit(AUDIT_TRIM_BATCH as i64);
        let mut doomed: Option<u64> = None;
        let mut count = 0;
        for kv in self.get_prefix(&self.key("audit/"), oldest).await? {
            let entry: AuditEntry = decode(&String::from_utf8_lossy(kv.key()), kv.value())?;
            if !retention.expired(entry.seq, entry.at_ms, last, now_ms) {
                break;
            }
            doomed = Some(entry.seq);
            count += 1;
        }
        let Some(through) = doomed else { return Ok(0) };
        // One range delete, fenced like every write.
        let end = self.key(&format!("audit/{:020}", through.saturating_add(1)));
        let delete = TxnOp::delete(self.key("audit/"), Some(DeleteOptions::new().with_range(end)));
        let mut kv = self.kv.clone();
        let resp = self.call(kv.txn(self.fenced_txn(fence, Vec::new(), vec![delete]))).await?;
        if !resp.succeeded() {
            return Err(StoreError::Fenced { ours: fence.epoch, current: Self::current_epoch_of(&resp) });
        }
        Ok(count)
    }

    async fn freeze(&self) -> Result<Option<FreezeRecord>, StoreError> {
        self.get_json(&self.key("freeze")).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_end_in_exactly_one_slash() {
        assert_eq!(normalize_prefix("/hotfleet"), "/hotfleet/");
        assert_eq!(normalize_prefix("/hotfleet//"), "/hotfleet/");
        assert_eq!(normalize_prefix(""), "/");
    }

    fn puts(n: usize, value_bytes: usize) -> Vec<(String, Vec<u8>)> {
        (0..n).map(|i| (format!("/hotfleet/rollout-nodes/r/n/node-{i:05}"), vec![b'x'; value_bytes])).collect()
    }

    #[test]
    fn node_states_that_fit_ride_with_the_batch() {
        let packing = pack_nodes(puts(100, 400), 2, 10_000).expect("pack");
        assert!(packing.leading.is_empty());
        assert_eq!(packing.last.len(), 100);
    }

    #[test]
    fn a_batch_of_ten_thousand_node_states_is_split_within_etcds_limits() {
        let all = puts(10_000, 600);
        let packing = pack_nodes(all.clone(), 3, 20_000).expect("pack");
        assert_eq!(packing.last.len(), MAX_TXN_OPS - 3, "the final transaction is filled first");
        for txn in &packing.leading {
            assert!(txn.len() <= MAX_TXN_OPS);
            assert!(txn.iter().map(|(k, v)| put_cost(k, v)).sum::<usize>() <= MAX_TXN_BYTES);
        }
        // Every put exactly once, none lost.
        let mut seen: Vec<_> = packing.leading.into_iter().flatten().chain(packing.last).collect();
        seen.sort();
        assert_eq!(seen, all);
    }

    #[test]
    fn big_node_states_split_by_bytes_and_an_impossible_one_is_refused() {
        let packing = pack_nodes(puts(10, 500_000), 0, 0).expect("pack");
        assert_eq!(packing.last.len(), 2);
        assert!(
            packing.leading.iter().all(|t| t.len() == 2),
            "{:?}",
            packing.leading.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert!(matches!(pack_nodes(puts(1, MAX_TXN_BYTES), 0, 0), Err(StoreError::TooLarge(_))));
    }
}
