//! The etcd store and the election against a real etcd (started on loopback
//! with a temporary data dir, at etcd's default request and transaction
//! limits): batches round-trip, bundles bigger than one etcd request are
//! chunked, a step writes only the node states it changed (10,000 of them
//! split over transactions, never refused), finished rollouts compact, the
//! previous shard layout still reads, concurrent batches lose nothing, and a deposed leader's write fails the transaction compare
//! and lands nothing. Two real coordinators on loopback show what a follower
//! serves and refuses, and a graceful hand-over.

mod common;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use hotfleet_coordinator::{config::StoreKind, Coordinator};
use hotfleet_coordinator::{
    leadership::{Elector, EtcdBackend, LeaseElection, LeaseGuard, Tenure, TermStore},
    patches,
    planner::{self, Candidate, Selector, Size},
    rollout::{health::Baseline, shared, Desired, NodeState, Observed, RolloutSpec, RolloutState},
    store::{
        etcd::{EtcdOptions, EtcdStore, CHUNK_BYTES},
        AuditEntry, Batch, Fence, FreezeRecord, NodeRecord, PatchRecord, StackEntry, Store, StoreError, Write,
    },
};
use hotfleet_localfleet::EtcdProc;
use hotfleet_proto::v1::{GetLeaderRequest, ListPatchesRequest, NodeStatus, PushPatchRequest, RegisterRequest};
use tokio_util::sync::CancellationToken;
use tonic::Code;

struct Etcd {
    _dir: tempfile::TempDir,
    proc: EtcdProc,
}

fn etcd() -> Etcd {
    let dir = tempfile::tempdir().expect("tempdir");
    let proc = EtcdProc::start(dir.path()).expect("start etcd (scripts/test-all.sh installs etcd-server)");
    Etcd { _dir: dir, proc }
}

async fn store(etcd: &Etcd, prefix: &str) -> EtcdStore {
    EtcdStore::connect(&EtcdOptions::new(vec![etcd.proc.url()], prefix)).await.expect("connect")
}

fn election(store: &EtcdStore, addr: &str) -> LeaseElection<EtcdBackend> {
    let backend = EtcdBackend::new(store.client(), store.leader_key(), Duration::from_secs(3));
    LeaseElection::new(backend, addr.to_string(), Duration::from_secs(2))
}

async fn lead(store: &EtcdStore, addr: &str) -> (LeaseElection<EtcdBackend>, Tenure) {
    let e = election(store, addr);
    let tenure = e.campaign(&CancellationToken::new()).await.expect("elected");
    (e, tenure)
}

fn audit(action: &str) -> AuditEntry {
    patches::audit("sre", action, "", "", true)
}

fn patch_record(id: &str, description: &str, size: usize) -> PatchRecord {
    PatchRecord {
        patch_id: id.into(),
        target_build: "b1".into(),
        parent_patch_id: String::new(),
        description: description.into(),
        author: String::new(),
        created_at: String::new(),
        modules: vec!["zone.combat".into()],
        size_bytes: size as u64,
        signer_key_id: String::new(),
        pushed_by: "sre".into(),
        pushed_at_ms: 1,
    }
}

fn stack_entry(patch: &str) -> StackEntry {
    StackEntry {
        patch_id: patch.into(),
        target_build: "b1".into(),
        parent_patch_id: String::new(),
        description: String::new(),
        rollout_id: "r1".into(),
        committed_at_ms: 1,
    }
}

/// A rollout over `n` nodes with realistic node states (a baseline per
/// process, an error and a health line each).
fn rollout(n: usize) -> RolloutState {
    let candidates: Vec<Candidate> = (0..n)
        .map(|i| Candidate {
            node_id: format!("zone-node-{i:05}"),
            labels: BTreeMap::new(),
            builds: vec!["b1".into()],
            alive: true,
            has_processes: true,
        })
        .collect();
    let waves = [Size::Percent(25.0), Size::Percent(50.0), Size::Percent(100.0)];
    let spec = RolloutSpec {
        patch_id: "p1".into(),
        selector: Selector::parse("all").expect("selector"),
        canary: Size::Count(1),
        waves: waves.to_vec(),
        health_window_ms: 1000,
        step_deadline_ms: 1000,
        max_unhealthy: 0,
        pause_before: vec![],
        gate: Default::default(),
        prepare_ttl_seconds: 0,
        description: String::new(),
        start_at_ms: 0,
        windows: Default::default(),
        kind: Default::default(),
    };
    let plan = planner::plan(&candidates, &spec, "b1").expect("plan");
    let mut state = RolloutState::new("ro-1-1".into(), spec, "b1".into(), plan, "sre".into(), 1, 1);
    for node in state.nodes.values_mut().map(Arc::make_mut) {
        node.baselines.insert(
            format!("{}:zone", node.node_id),
            Baseline {
                pid: 4242,
                mark: 123_456,
                tick_p99_ms: 3.25,
                game_ok: true,
                exceptions_total: 0,
                ticks_total: Some(98_765),
            },
        );
        node.health = "p99 3.1 ms (baseline 3.3 ms), 0 new exceptions, game ok".into();
        node.error = "process zone (pid 4242): prepare took 812 ms".into();
    }
    state
}

#[tokio::test]
async fn batches_round_trip_with_put_if_absent_and_idempotent_stack_pushes() {
    let etcd = etcd();
    let store = store(&etcd, "/roundtrip").await;
    let (_e, tenure) = lead(&store, "http://a").await;
    let fence = tenure.fence;
    let seqs = store
        .write(
            fence,
            Batch::new()
                .with(Write::PutPatch { record: patch_record("p1", "first", 3), bundle: b"abc".to_vec() })
                .with(Write::Audit(audit("push")))
                .with(Write::Audit(audit("push2"))),
        )
        .await
        .expect("write");
    assert_eq!(seqs, [1, 2]);
    let again = Write::PutPatch { record: patch_record("p1", "second", 3), bundle: b"xyz".to_vec() };
    store.write(fence, Batch::new().with(again)).await.expect("write");
    assert_eq!(store.patch("p1").await.expect("read").expect("present").description, "first");
    assert_eq!(store.patch_bundle("p1").await.expect("read").expect("present"), b"abc");
    assert_eq!(store.patch_bundle("nope").await.expect("read"), None);
    for _ in 0..2 {
        store.write(fence, Batch::new().with(Write::PushStack(stack_entry("p1")))).await.expect("push");
    }
    assert_eq!(store.patch_stack("b1").await.expect("stack"), vec![stack_entry("p1")]);
    let freeze = FreezeRecord { reason: "incident".into(), by: "sre".into(), since_ms: 9 };
    store.write(fence, Batch::new().with(Write::SetFreeze(Some(freeze.clone())))).await.expect("freeze");
    assert_eq!(store.freeze().await.expect("read"), Some(freeze));
    store.write(fence, Batch::new().with(Write::SetFreeze(None))).await.expect("unfreeze");
    assert_eq!(store.freeze().await.expect("read"), None);
    let log: Vec<(u64, String)> =
        store.audit(10, None).await.expect("audit").into_iter().map(|e| (e.seq, e.action)).collect();
    assert_eq!(log, [(2, "push2".to_string()), (1, "push".to_string())], "newest first");
    // Another prefix is another store.
    let other = self::store(&etcd, "/other/").await;
    assert!(other.patches().await.expect("list").is_empty());
}

#[tokio::test]
async fn the_etcd_audit_log_pages_and_keeps_its_retention() {
    let etcd = etcd();
    let store = store(&etcd, "/audit").await;
    let (_e, tenure) = lead(&store, "http://a").await;
    // Any epoch but the leader key's create revision is stale.
    let stale = Fence { epoch: tenure.fence.epoch + 1 };
    common::audit_paging_and_retention(&store, tenure.fence, stale).await;
}

#[tokio::test]
async fn bundles_larger_than_one_etcd_request_are_chunked() {
    let etcd = etcd();
    let store = store(&etcd, "/hotfleet/").await;
    let (_e, tenure) = lead(&store, "http://a").await;
    // 5.5 MiB: far over etcd's 1.5 MiB request limit.
    let bundle: Vec<u8> = (0..(5 * CHUNK_BYTES + CHUNK_BYTES / 2)).map(|i| (i * 31 % 251) as u8).collect();
    let record = patch_record("big", "big", bundle.len());
    store
        .write(tenure.fence, Batch::new().with(Write::PutPatch { record, bundle: bundle.clone() }))
        .await
        .expect("write");
    assert_eq!(store.patch_bundle("big").await.expect("read").expect("present"), bundle);
}

/// etcd's current revision and the mod revision of `key` (0: absent).
async fn revisions(store: &EtcdStore, key: &str) -> (i64, i64) {
    let mut kv = store.client().kv_client();
    let resp = kv.get(key, None).await.expect("get");
    let header = resp.header().expect("header").revision();
    (header, resp.kvs().first().map_or(0, |kv| kv.mod_revision()))
}

/// Keys under `relative` (below the store's prefix), in key order.
async fn keys_under(store: &EtcdStore, relative: &str) -> Vec<String> {
    let mut kv = store.client().kv_client();
    let prefix = format!("{}{relative}", store.prefix());
    let options = etcd_client::GetOptions::new().with_prefix().with_keys_only();
    let resp = kv.get(prefix.as_str(), Some(options)).await.expect("get");
    resp.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key())[prefix.len()..].to_string()).collect()
}

#[tokio::test]
async fn a_step_writes_only_the_node_states_it_changed() {
    let etcd = etcd();
    let store = store(&etcd, "/hotfleet/").await;
    let (_e, tenure) = lead(&store, "http://a").await;
    let state = rollout(1000);
    let all: Vec<NodeState> = state.nodes.values().map(|n| NodeState::clone(n)).collect();
    store.write(tenure.fence, Batch::rollout(&state.rollout, all.clone())).await.expect("start batch");
    assert_eq!(keys_under(&store, "rollout-nodes/ro-1-1/n/").await.len(), 1000, "one key per node");
    // A wave: half the nodes change; only their keys are written.
    let untouched = format!("{}rollout-nodes/ro-1-1/n/{}", store.prefix(), all[999].node_id);
    let (rev_before, untouched_before) = revisions(&store, &untouched).await;
    let plan_key = format!("{}rollout-plans/ro-1-1", store.prefix());
    let (_, plan_before) = revisions(&store, &plan_key).await;
    assert!(plan_before > 0, "the plan is stored apart from the record");
    let wave: Vec<NodeState> = all
        .iter()
        .take(500)
        .map(|n| NodeState { desired: Desired::Committed, observed: Observed::Committed, ..n.clone() })
        .collect();
    store.write(tenure.fence, Batch::rollout(&state.rollout, wave)).await.expect("wave batch");
    let (rev_after, untouched_after) = revisions(&store, &untouched).await;
    assert_eq!(untouched_after, untouched_before, "a node the step did not change is not rewritten");
    assert_eq!(revisions(&store, &plan_key).await.1, plan_before, "nor is the plan, fixed at the start");
    // 500 puts + the record: 4 transactions of at most 128 operations.
    assert_eq!(rev_after - rev_before, 4, "one etcd revision per transaction");
    let stored = store.rollout_nodes("ro-1-1").await.expect("nodes");
    assert_eq!(stored.len(), 1000);
    assert_eq!(stored.values().filter(|n| n.observed == Observed::Committed).count(), 500);
    assert_eq!(store.rollout("ro-1-1").await.expect("read").expect("present").steps.len(), state.rollout.steps.len());
}

#[tokio::test]
async fn a_batch_of_ten_thousand_node_states_is_split_never_refused() {
    let etcd = etcd();
    let store = store(&etcd, "/hotfleet/").await;
    let (_e, tenure) = lead(&store, "http://a").await;
    // ~4.5 MB of node states: three times etcd's request limit.
    let state = rollout(10_000);
    let nodes: Vec<NodeState> = state.nodes.values().map(|n| NodeState::clone(n)).collect();
    let bytes: usize = nodes.iter().map(|n| serde_json::to_vec(n).expect("json").len()).sum();
    assert!(bytes > 3 * 1024 * 1024, "{bytes} bytes");
    store.write(tenure.fence, Batch::rollout(&state.rollout, nodes)).await.expect("split, not refused");
    assert_eq!(shared(store.rollout_nodes("ro-1-1").await.expect("nodes")), state.nodes);
    assert_eq!(store.rollout("ro-1-1").await.expect("read").expect("present"), state.rollout);

    // Only a single record too big for any request is refused, clearly, and
    // before any node state of its batch is sent.
    let mut record = state.rollout.clone();
    record.id = "ro-huge".into();
    record.spec.description = "x".repeat(2 * 1024 * 1024);
    let few: Vec<NodeState> = state.nodes.values().take(300).map(|n| NodeState::clone(n)).collect();
    match store.write(tenure.fence, Batch::rollout(&record, few)).await {
        Err(StoreError::TooLarge(why)) => assert!(why.contains("--max-request-bytes"), "{why}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(store.rollout("ro-huge").await.expect("read").is_none());
    assert!(keys_under(&store, "rollout-nodes/ro-huge/").await.is_empty(), "nothing of the refused batch landed");
}

#[tokio::test]
async fn a_batch_of_many_node_records_is_split_and_a_removal_still_wins() {
    let etcd = etcd();
    let store = store(&etcd, "/hotfleet/").await;
    let (_e, tenure) = lead(&store, "http://a").await;
    // What the heartbeat write-behind sends: up to 512 KiB of records, far
    // more than etcd's 128 operations per transaction.
    let records: Vec<NodeRecord> = (0..1000)
        .map(|i| NodeRecord {
            status: hotfleet_coordinator::node::NodeStatus {
                node_id: format!("zone-node-{i:05}"),
                advertise_addr: format!("http://10.0.{}.{}:7701", i / 250, i % 250),
                ..Default::default()
            },
            registered_at_ms: 1,
            last_heartbeat_ms: 2,
        })
        .collect();
    let mut batch = records.iter().cloned().fold(Batch::new(), |b, r| b.with(Write::PutNode(r)));
    // A removal later in the same batch wins over the node's put.
    batch.push(Write::RemoveNode("zone-node-00007".into()));
    store.write(tenure.fence, batch).await.expect("split, not refused");
    let stored = store.nodes().await.expect("nodes");
    assert_eq!(stored.len(), 999);
    assert!(stored.iter().all(|r| r.node_id() != "zone-node-00007"));
    assert_eq!(stored[0], records[0]);
}

#[tokio::test]
async fn finished_rollouts_compact_and_the_previous_shard_layout_still_reads() {
    let etcd = etcd();
    let store = store(&etcd, "/hotfleet/").await;
    let (_e, tenure) = lead(&store, "http://a").await;
    let mut state = rollout(300);
    // The previous layout: node states in shard keys `rollout-nodes/<id>/<NN>`.
    let mut shards: BTreeMap<String, BTreeMap<String, NodeState>> = BTreeMap::new();
    for (i, node) in state.nodes.values().enumerate() {
        shards.entry(format!("{:02}", i % 16)).or_default().insert(node.node_id.clone(), NodeState::clone(node));
    }
    let mut kv = store.client().kv_client();
    for (shard, nodes) in &shards {
        let key = format!("{}rollout-nodes/ro-1-1/{shard}", store.prefix());
        kv.put(key, serde_json::to_vec(nodes).expect("json"), None).await.expect("put");
    }
    // ... and the record with its plan inline.
    let record_key = format!("{}rollouts/ro-1-1", store.prefix());
    kv.put(record_key, serde_json::to_vec(&state.rollout).expect("json"), None).await.expect("put");
    assert_eq!(store.rollout("ro-1-1").await.expect("read"), Some(state.rollout.clone()));
    assert_eq!(store.rollouts().await.expect("list"), vec![state.rollout.clone()]);
    assert_eq!(shared(store.rollout_nodes("ro-1-1").await.expect("nodes")), state.nodes, "shards read as before");
    // A resumed rollout writes per-node keys, which override its shards.
    let first = state.nodes.keys().next().expect("a node").clone();
    let moved = Arc::make_mut(state.nodes.get_mut(&first).expect("node"));
    moved.observed = Observed::Committed;
    let moved = moved.clone();
    state.rollout.phase = hotfleet_coordinator::rollout::Phase::Completed;
    assert!(!store.compact_rollout(tenure.fence, "ro-1-1").await.expect("compact"), "not finished yet");
    store.write(tenure.fence, Batch::rollout(&state.rollout, vec![moved])).await.expect("step");
    assert_eq!(shared(store.rollout_nodes("ro-1-1").await.expect("nodes")), state.nodes);
    assert_eq!(store.rollouts().await.expect("list"), vec![state.rollout.clone()], "rewritten in the new layout");

    // A stale writer folds nothing.
    let stale = Fence { epoch: tenure.fence.epoch + 1 };
    let before = keys_under(&store, "rollout-nodes/ro-1-1/").await;
    assert!(matches!(store.compact_rollout(stale, "ro-1-1").await, Err(StoreError::Fenced { .. })));
    assert_eq!(keys_under(&store, "rollout-nodes/ro-1-1/").await, before);

    // Finished: folded into summary keys, shards and node keys gone.
    assert!(store.compact_rollout(tenure.fence, "ro-1-1").await.expect("compact"));
    let keys = keys_under(&store, "rollout-nodes/ro-1-1/").await;
    assert!(!keys.is_empty() && keys.iter().all(|k| k.starts_with("s/")), "{keys:?}");
    let summary: BTreeMap<String, NodeState> = state.nodes.iter().map(|(id, n)| (id.clone(), n.summary())).collect();
    assert_eq!(store.rollout_nodes("ro-1-1").await.expect("nodes"), summary);
    assert!(summary.values().all(|n| n.baselines.is_empty() && !n.health.is_empty()));
    assert!(!store.compact_rollout(tenure.fence, "ro-1-1").await.expect("compact"), "already compact");
}

#[tokio::test]
async fn concurrent_batches_of_the_leader_lose_nothing() {
    let etcd = etcd();
    let store = Arc::new(store(&etcd, "/hotfleet/").await);
    let (_e, tenure) = lead(&store, "http://a").await;
    let writes = (0..12).map(|i| {
        let store = store.clone();
        let fence = tenure.fence;
        tokio::spawn(async move {
            let batch = Batch::new()
                .with(Write::PushStack(stack_entry(&format!("p{i}"))))
                .with(Write::Audit(audit(&format!("a{i}"))));
            store.write(fence, batch).await
        })
    });
    for w in writes {
        w.await.expect("join").expect("write");
    }
    assert_eq!(store.patch_stack("b1").await.expect("stack").len(), 12, "read-modify-write conflicts are retried");
    let seqs: Vec<u64> = store.audit(100, None).await.expect("audit").iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=12).rev().collect::<Vec<_>>(), "unique, gap-free sequence numbers");
}

#[tokio::test]
async fn a_deposed_leader_writes_nothing_its_transaction_compare_fails() {
    let etcd = etcd();
    let store = Arc::new(store(&etcd, "/hotfleet/").await);
    let (_a, tenure_a) = lead(&store, "http://a").await;
    store.write(tenure_a.fence, Batch::new().with(Write::Audit(audit("by a")))).await.expect("a writes while leading");
    let b = Arc::new(election(&store, "http://b"));
    let campaigning = {
        let b = b.clone();
        tokio::spawn(async move { b.campaign(&CancellationToken::new()).await })
    };
    // a stalls (GC pause, SIGSTOP) and etcd drops its lease, as it would at
    // the end of the TTL.
    let mut client = store.client();
    let leader = client.get(store.leader_key(), None).await.expect("get").kvs()[0].clone();
    assert_eq!(leader.create_revision() as u64, tenure_a.fence.epoch, "the epoch is the key's create revision");
    client.lease_revoke(leader.lease()).await.expect("revoke");
    let tenure_b = tokio::time::timeout(Duration::from_secs(10), campaigning)
        .await
        .expect("b takes over")
        .expect("join")
        .expect("b leads");
    assert!(tenure_b.fence.epoch > tenure_a.fence.epoch);

    // a wakes and writes under its old fence: refused by the compare.
    let stale = Batch::new()
        .with(Write::SetFreeze(Some(FreezeRecord { reason: "stale".into(), by: "a".into(), since_ms: 1 })))
        .with(Write::Audit(audit("by a, deposed")))
        .with(Write::PutPatch { record: patch_record("pa", "from a", 3), bundle: b"abc".to_vec() });
    match store.write(tenure_a.fence, stale).await {
        Err(StoreError::Fenced { ours, current }) => {
            assert_eq!((ours, current), (tenure_a.fence.epoch, tenure_b.fence.epoch));
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert_eq!(store.freeze().await.expect("read"), None);
    assert!(store.patch("pa").await.expect("read").is_none());
    let log: Vec<String> = store.audit(10, None).await.expect("audit").into_iter().map(|e| e.action).collect();
    assert_eq!(log, ["by a"], "nothing of the deposed leader's batch landed");

    // Through its term's store the same refusal ends a's term at once.
    let guard = LeaseGuard::unbounded(tenure_a.fence.epoch);
    let term_store = TermStore::new(store.clone(), guard.clone());
    let refused = term_store.write(tenure_a.fence, Batch::new().with(Write::Audit(audit("again")))).await;
    assert!(matches!(refused, Err(StoreError::Fenced { .. })));
    assert!(guard.lost_token().is_cancelled());
    // b writes fine.
    store.write(tenure_b.fence, Batch::new().with(Write::Audit(audit("by b")))).await.expect("b writes");
    // A fence that never led is refused too.
    assert!(matches!(
        store.write(Fence { epoch: 1 }, Batch::new().with(Write::Audit(audit("x")))).await,
        Err(StoreError::Fenced { .. })
    ));
}

#[tokio::test]
async fn an_etcd_with_authentication_needs_the_user_and_password() {
    let etcd = etcd();
    let mut admin = etcd_client::Client::connect([etcd.proc.url()], None).await.expect("connect");
    admin.user_add("root", "root-secret", None).await.expect("root");
    admin.user_grant_role("root", "root").await.expect("root role");
    admin.user_add("hotfleet", "s3cret", None).await.expect("user");
    admin.role_add("hotfleet").await.expect("role");
    admin
        .role_grant_permission("hotfleet", etcd_client::Permission::read_write("/hotfleet/").with_prefix())
        .await
        .expect("grant");
    admin.user_grant_role("hotfleet", "hotfleet").await.expect("user role");
    admin.auth_enable().await.expect("auth on");

    let mut options = EtcdOptions::new(vec![etcd.proc.url()], "/hotfleet/");
    options.user = Some(("hotfleet".into(), "s3cret".into()));
    let store = EtcdStore::connect(&options).await.expect("authenticated connect");
    let (_e, tenure) = lead(&store, "http://a").await;
    store.write(tenure.fence, Batch::new().with(Write::Audit(audit("authenticated")))).await.expect("write");
    assert_eq!(store.audit(5, None).await.expect("read").len(), 1);

    // Without credentials nothing is read or written.
    let anonymous = self::store(&etcd, "/hotfleet/").await;
    assert!(anonymous.audit(5, None).await.is_err());
    options.user = Some(("hotfleet".into(), "wrong".into()));
    let err = EtcdStore::connect(&options).await.err().expect("wrong password refused");
    assert!(err.to_string().contains("--etcd-user"), "{err}");
}

/// A real coordinator on the etcd store, serving on 127.0.0.1:0.
async fn coordinator(etcd: &Etcd, dir: &std::path::Path, public: std::path::PathBuf) -> common::Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut config = common::config(dir, vec![public]);
    config.store = StoreKind::Etcd;
    config.etcd = Some(EtcdOptions::new(vec![etcd.proc.url()], "/hotfleet/"));
    config.leader_lease = Duration::from_secs(2);
    config.advertise_addr = Some(format!("http://{addr}"));
    common::serve_on(listener, Coordinator::build(config).await.expect("build"))
}

async fn leads(running: &common::Running) -> bool {
    let mut op = running.operator().await;
    op.get_leader(GetLeaderRequest {}).await.is_ok_and(|r| r.into_inner().is_leader)
}

#[tokio::test]
async fn a_follower_serves_reads_refuses_writes_naming_the_leader_and_takes_over_on_resign() {
    let etcd = etcd();
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = common::key_in(&dir.path().join("keys"));
    let first = coordinator(&etcd, &dir.path().join("a"), public.clone()).await;
    assert!(common::eventually(Duration::from_secs(10), || leads(&first)).await, "the first coordinator leads");
    let second = coordinator(&etcd, &dir.path().join("b"), public).await;
    let leader_url = first.channel_uri();

    let b = common::bundle("ha", Some(&key));
    first.operator().await.push_patch(PushPatchRequest { bundle: b.encode() }).await.expect("push to the leader");
    let mut follower = second.operator().await;
    let status = follower.get_leader(GetLeaderRequest {}).await.expect("get leader").into_inner();
    assert!(!status.is_leader);
    assert_eq!(status.leader_addr, leader_url);
    assert_eq!(status.store, "etcd");
    // Reads: from the shared store.
    let patches = follower.list_patches(ListPatchesRequest::default()).await.expect("list").into_inner().patches;
    assert_eq!(patches.len(), 1);
    // Writes and registrations: refused, naming the leader.
    let refused = follower.push_patch(PushPatchRequest { bundle: b.encode() }).await.expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains(&leader_url), "{}", refused.message());
    assert_eq!(refused.metadata().get("x-hotfleet-leader").and_then(|v| v.to_str().ok()), Some(leader_url.as_str()));
    let node = NodeStatus { node_id: "n1".into(), advertise_addr: "127.0.0.1:1".into(), ..Default::default() };
    let mut gateway = second.gateway().await;
    let refused = gateway.register(RegisterRequest { node: Some(node.clone()) }).await.expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let epoch =
        first.gateway().await.register(RegisterRequest { node: Some(node) }).await.expect("reg").into_inner().epoch;

    // A graceful stop resigns: the follower leads well before the lease would lapse.
    let stopped = std::time::Instant::now();
    first.stop().await;
    assert!(common::eventually(Duration::from_secs(5), || leads(&second)).await, "the follower takes over");
    assert!(stopped.elapsed() < Duration::from_secs(2), "hand-over took {:?}", stopped.elapsed());
    let status = follower.get_leader(GetLeaderRequest {}).await.expect("get leader").into_inner();
    assert!(status.epoch > epoch, "the new tenure's epoch is higher");
    let again = follower.push_patch(PushPatchRequest { bundle: b.encode() }).await.expect("now it writes");
    assert!(!again.into_inner().created, "the same patch, already stored by the first leader");
    second.stop().await;
}
