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
//! | `P rollouts/<id>` | [`Rollout`] |
//! | `P rollout-nodes/<id>/<shard>` | `{node id: NodeState}` of the rollout's nodes hashing to that shard ([`NODE_SHARDS`] shards) |
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
//! overwrites). A rollout's node states live in at most [`NODE_SHARDS`] keys,
//! so a step's batch is at most ~25 operations however many nodes it moves.
//! Its byte size is what bounds a rollout: every node state of a rollout fits
//! one request (a few thousand nodes at etcd's default limit, see the README);
//! a batch over the limit is refused here with a clear error, never half-sent.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
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
    AuditEntry, AuditRetention, Batch, Fence, FreezeRecord, NodeRecord, PatchRecord, StackEntry, Store, StoreError,
    Write, AUDIT_TRIM_BATCH,
};
use crate::rollout::{NodeState, Rollout};

/// Bytes per stored bundle chunk: one chunk per transaction, well under
/// etcd's 1.5 MiB request limit.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Keys a rollout's node states are spread over (by a stable hash of the
/// node id): bounds the operations of any step's transaction.
pub const NODE_SHARDS: u64 = 16;
/// Largest transaction sent, in key + value bytes: etcd's default
/// `--max-request-bytes` (1.5 MiB) less room for the request's framing.
pub const MAX_TXN_BYTES: usize = 1_400_000;
/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;
/// Largest response accepted from etcd (a prefix read of many records).
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
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
}

/// Stable across processes and releases (unlike std's randomised hasher):
/// the shard of a node must never move.
fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The shard key suffix of `node_id` within a rollout.
pub fn node_shard(node_id: &str) -> u64 {
    fnv1a(node_id) % NODE_SHARDS
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

    fn shard_key(&self, rollout_id: &str, shard: u64) -> String {
        format!("{}{shard:02}", self.rollout_nodes_prefix(rollout_id))
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
                Write::PutNode(node) => {
                    plan.puts.insert(self.key(&format!("nodes/{}", node.node_id())), Some(encode(node)?));
                }
                Write::RemoveNode(id) => {
                    plan.puts.insert(self.key(&format!("nodes/{id}")), None);
                }
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
                    plan.puts.insert(self.key(&format!("rollouts/{}", rollout.id)), Some(encode(rollout)?));
                }
                Write::PutRolloutNodes { rollout_id, nodes } => {
                    let mut by_shard: BTreeMap<u64, Vec<&NodeState>> = BTreeMap::new();
                    for node in nodes {
                        by_shard.entry(node_shard(&node.node_id)).or_default().push(node);
                    }
                    for (shard, nodes) in by_shard {
                        let key = self.shard_key(rollout_id, shard);
                        let entry = self.rmw(&mut plan, &key).await?;
                        let mut states: BTreeMap<String, NodeState> = match &entry.value {
                            Some(bytes) => decode(&key, bytes)?,
                            None => BTreeMap::new(),
                        };
                        for node in nodes {
                            states.insert(node.node_id.clone(), node.clone());
                        }
                        entry.value = Some(encode(&states)?);
                        entry.dirty = true;
                    }
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
                bytes += key.len() + value.as_ref().map_or(0, Vec::len) + 16;
                match value {
                    Some(value) => TxnOp::put(key.as_str(), value.clone(), None::<PutOptions>),
                    None => TxnOp::delete(key.as_str(), None),
                }
            })
            .collect();
        if ops.len() > MAX_TXN_OPS || compares.len() + 1 > MAX_TXN_OPS {
            return Err(StoreError::TooLarge(format!(
                "{} writes and {} comparisons in one transaction exceed etcd's default --max-txn-ops {MAX_TXN_OPS}",
                ops.len(),
                compares.len() + 1
            )));
        }
        if bytes > MAX_TXN_BYTES {
            return Err(StoreError::TooLarge(format!(
                "{bytes} bytes in one transaction exceed etcd's default --max-request-bytes (1.5 MiB): \
                 the rollout holds too many nodes for one etcd request; split it with --selector, \
                 or raise --max-request-bytes on every etcd member"
            )));
        }
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
        for _ in 0..MAX_CONFLICT_RETRIES {
            let plan = self.plan(&batch).await?;
            match self.commit(fence, &plan).await? {
                Outcome::Committed => return Ok(plan.seqs),
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
        self.get_json(&self.key(&format!("rollouts/{rollout_id}"))).await
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.list_json("rollouts/").await
    }

    async fn rollout_nodes(&self, rollout_id: &str) -> Result<BTreeMap<String, NodeState>, StoreError> {
        let mut out = BTreeMap::new();
        for kv in self.get_prefix(&self.rollout_nodes_prefix(rollout_id), GetOptions::new()).await? {
            let shard: BTreeMap<String, NodeState> = decode(&String::from_utf8_lossy(kv.key()), kv.value())?;
            out.extend(shard);
        }
        Ok(out)
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

    #[test]
    fn shards_are_stable_and_spread() {
        // Pinned: a shard that moved between releases would hide node states.
        assert_eq!(node_shard("node-1"), fnv1a("node-1") % NODE_SHARDS);
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        let used: std::collections::BTreeSet<u64> = (0..200).map(|i| node_shard(&format!("node-{i}"))).collect();
        assert_eq!(used.len() as u64, NODE_SHARDS, "200 nodes touch every shard");
    }
}
