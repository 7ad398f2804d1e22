//! Loopback gRPC tests of the AgentGateway and the patch store: a real
//! coordinator on 127.0.0.1:0, spoken to with the generated clients.

mod common;

use std::time::Duration;

use common::*;
use hotfleet_proto::v1::{
    FetchPatchRequest, GetPatchRequest, GetPatchStackRequest, HeartbeatRequest, ListAuditRequest, ListNodesRequest,
    ListPatchesRequest, NodeStatus, ProcessStatus, PushPatchRequest, RegisterRequest,
};
use prost::Message;
use tonic::{Code, Request};

fn node(id: &str, zone: &str) -> NodeStatus {
    NodeStatus {
        node_id: id.into(),
        labels: [("zone".to_string(), zone.to_string())].into(),
        advertise_addr: "127.0.0.1:1".into(),
        processes: vec![ProcessStatus {
            process_id: format!("{id}-p1"),
            pid: 4242,
            build: BUILD.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A push as `actor` would send it with the old actor header: the header is
/// ignored now (the actor comes from the credential; these loopback
/// coordinators run `--insecure`, so every audit line says `insecure`;
/// tests/security.rs checks certificate actors over real TLS).
fn push(bytes: Vec<u8>, actor: &str) -> Request<PushPatchRequest> {
    let mut r = Request::new(PushPatchRequest { bundle: bytes });
    r.metadata_mut().insert("x-hotfleet-actor", actor.parse().expect("ascii"));
    r
}

#[tokio::test]
async fn push_good_patch_then_fetch_it_in_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = key_in(&dir.path().join("keys"));
    let running = start(config(&dir.path().join("data"), vec![public])).await;
    let mut op = running.operator().await;

    // A big module so the download spans several 256 KiB chunks.
    let mut big = bundle("big", None);
    big = hotfleet_patch::Bundle::create(
        big.manifest.clone(),
        vec![("zone.combat".into(), format!("DATA = {:?}\n", "x".repeat(600 * 1024)))],
    )
    .expect("bundle");
    big.sign(&key);
    let bytes = big.encode();

    let first = op.push_patch(push(bytes.clone(), "alice")).await.expect("push").into_inner();
    assert!(first.created);
    let info = first.patch.expect("info");
    assert_eq!(info.patch_id, big.id());
    assert_eq!(info.target_build, BUILD);
    assert_eq!(info.pushed_by, "insecure", "the header is not the actor");
    assert_eq!(info.modules, ["zone.combat"]);

    // Idempotent by id.
    let again = op.push_patch(push(bytes.clone(), "bob")).await.expect("push again").into_inner();
    assert!(!again.created);
    assert_eq!(again.patch.expect("info").pushed_by, "insecure");

    let got = op.get_patch(GetPatchRequest { patch_id: big.id() }).await.expect("get").into_inner();
    assert_eq!(got.patch.expect("info").size_bytes, bytes.len() as u64);
    let listed = op.list_patches(ListPatchesRequest { target_build: BUILD.into() }).await.expect("list").into_inner();
    assert_eq!(listed.patches.len(), 1);
    let other = op.list_patches(ListPatchesRequest { target_build: "other".into() }).await.expect("list").into_inner();
    assert!(other.patches.is_empty());

    let mut gw = running.gateway().await;
    let mut stream = gw.fetch_patch(FetchPatchRequest { patch_id: big.id() }).await.expect("fetch").into_inner();
    let mut got = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.message().await.expect("chunk") {
        assert_eq!(chunk.total_size, bytes.len() as u64);
        assert_eq!(chunk.offset, got.len() as u64);
        assert!(chunk.data.len() <= 256 * 1024);
        got.extend_from_slice(&chunk.data);
        chunks += 1;
    }
    assert_eq!(got, bytes, "fetched bytes are the uploaded bundle");
    assert!(chunks >= 3, "{chunks} chunks");

    let missing = gw.fetch_patch(FetchPatchRequest { patch_id: "0".repeat(64) }).await.expect_err("missing");
    assert_eq!(missing.code(), Code::NotFound);
    let garbage = gw.fetch_patch(FetchPatchRequest { patch_id: "../etc/passwd".into() }).await.expect_err("bad id");
    assert_eq!(garbage.code(), Code::InvalidArgument);

    let audit = op.list_audit(ListAuditRequest { limit: 10, before_seq: 0 }).await.expect("audit").into_inner().records;
    assert_eq!(audit.len(), 2);
    assert!(audit[0].detail.contains("already stored"), "newest first: {audit:?}");
    assert!(audit.iter().all(|a| a.actor == "insecure"), "every audit line of an --insecure coordinator says so");
    assert_eq!(audit[1].action, "patch.push");
    assert!(audit.iter().all(|a| a.ok));
    running.stop().await;
}

#[tokio::test]
async fn refuses_tampered_unsigned_untrusted_oversized_and_garbage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = key_in(&dir.path().join("keys"));
    let (stranger, _) = key_in(&dir.path().join("stranger"));
    let mut cfg = config(&dir.path().join("data"), vec![public]);
    cfg.max_patch_bytes = 64 * 1024;
    let running = start(cfg).await;
    let mut op = running.operator().await;

    // Tampered: one byte of a module source changed after signing.
    let mut bytes = bundle("t", Some(&key)).encode();
    let pos = bytes.windows(6).position(|w| w == b"return").expect("source in bundle");
    bytes[pos] = b'R';
    let err = op.push_patch(push(bytes, "mallory")).await.expect_err("tampered");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("sha256"), "{}", err.message());

    let err = op.push_patch(push(bundle("u", None).encode(), "mallory")).await.expect_err("unsigned");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("not signed"), "{}", err.message());

    let err = op.push_patch(push(bundle("s", Some(&stranger)).encode(), "mallory")).await.expect_err("untrusted");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("not trusted"), "{}", err.message());

    let mut big = hotfleet_patch::Bundle::create(
        manifest("big"),
        vec![("zone.combat".into(), format!("DATA = {:?}\n", "x".repeat(100 * 1024)))],
    )
    .expect("bundle");
    big.sign(&key);
    let err = op.push_patch(push(big.encode(), "mallory")).await.expect_err("oversized");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("limit"), "{}", err.message());

    // Way past the transport limit too: still refused, never stored.
    let huge = vec![7u8; 2 * 1024 * 1024];
    let err = op.push_patch(push(huge, "mallory")).await.expect_err("huge");
    assert_ne!(err.code(), Code::Ok);

    let err = op.push_patch(push(b"garbage".to_vec(), "mallory")).await.expect_err("garbage");
    assert_eq!(err.code(), Code::InvalidArgument);

    let listed = op.list_patches(ListPatchesRequest::default()).await.expect("list").into_inner();
    assert!(listed.patches.is_empty(), "nothing refused was stored");

    // Refusals are audited, with the actor (never the header's "mallory").
    let audit = op.list_audit(ListAuditRequest { limit: 0, before_seq: 0 }).await.expect("audit").into_inner().records;
    assert!(audit.len() >= 5, "{audit:?}");
    assert!(audit.iter().all(|a| !a.ok && a.actor == "insecure" && a.detail.starts_with("refused")));

    // The log reads in pages that chain, newest first, and end.
    let mut seen = Vec::new();
    let mut before_seq = 0;
    loop {
        let page = op.list_audit(ListAuditRequest { limit: 2, before_seq }).await.expect("page").into_inner();
        assert!(page.records.len() <= 2);
        seen.extend(page.records.iter().map(|r| r.seq));
        if page.next_before_seq == 0 {
            break;
        }
        before_seq = page.next_before_seq;
    }
    let all: Vec<u64> = audit.iter().map(|r| r.seq).collect();
    assert_eq!(seen, all, "every record once, in order");
    running.stop().await;
}

#[tokio::test]
async fn without_trusted_keys_pushes_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, _) = key_in(&dir.path().join("keys"));
    let running = start(config(&dir.path().join("data"), vec![])).await;
    let mut op = running.operator().await;
    let err = op.push_patch(push(bundle("x", Some(&key)).encode(), "a")).await.expect_err("no keys");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("--trusted-key"), "{}", err.message());
    running.stop().await;
}

#[tokio::test]
async fn register_heartbeat_lose_and_rejoin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(config(dir.path(), vec![])).await;
    let mut gw = running.gateway().await;
    let mut op = running.operator().await;

    let hb = gw.heartbeat(HeartbeatRequest { node: Some(node("n1", "a")) }).await.expect("hb").into_inner();
    assert!(!hb.known, "unknown node is told to register");

    let reg = gw.register(RegisterRequest { node: Some(node("n1", "a")) }).await.expect("register").into_inner();
    assert!(reg.epoch >= 1);
    assert!(reg.heartbeat_interval_seconds >= 1);
    gw.register(RegisterRequest { node: Some(node("n2", "b")) }).await.expect("register");
    let hb = gw.heartbeat(HeartbeatRequest { node: Some(node("n1", "a")) }).await.expect("hb").into_inner();
    assert!(hb.known);
    assert_eq!(hb.epoch, reg.epoch);

    let nodes = op
        .list_nodes(ListNodesRequest { selector: "zone=a".into(), ..Default::default() })
        .await
        .expect("list")
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].status.as_ref().expect("status").node_id, "n1");
    assert_eq!(nodes[0].liveness, "alive");

    // Keep n1 beating; n2 goes silent and must be marked lost (3 x 100 ms).
    let lost = eventually(Duration::from_secs(5), || {
        let mut gw = gw.clone();
        let mut op = op.clone();
        async move {
            gw.heartbeat(HeartbeatRequest { node: Some(node("n1", "a")) }).await.expect("hb");
            let nodes = op.list_nodes(ListNodesRequest::default()).await.expect("list").into_inner().nodes;
            let by_id = |id: &str| {
                nodes.iter().find(|n| n.status.as_ref().is_some_and(|s| s.node_id == id)).map(|n| n.liveness.clone())
            };
            by_id("n2").as_deref() == Some("lost") && by_id("n1").as_deref() == Some("alive")
        }
    })
    .await;
    assert!(lost, "n2 was not marked lost while n1 stayed alive");

    // A heartbeat brings it back.
    gw.heartbeat(HeartbeatRequest { node: Some(node("n2", "b")) }).await.expect("hb");
    let nodes = op
        .list_nodes(ListNodesRequest { selector: "zone=b".into(), ..Default::default() })
        .await
        .expect("list")
        .into_inner()
        .nodes;
    assert_eq!(nodes[0].liveness, "alive");

    // Garbage registrations are refused clearly.
    let err = gw.register(RegisterRequest { node: None }).await.expect_err("no node");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = gw
        .register(RegisterRequest { node: Some(NodeStatus { node_id: "x".into(), ..Default::default() }) })
        .await
        .expect_err("no addr");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("advertise_addr"), "{}", err.message());
    running.stop().await;
}

#[tokio::test]
async fn registrations_and_patches_survive_a_restart_with_a_higher_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = key_in(&dir.path().join("keys"));
    let data = dir.path().join("data");
    let b = bundle("persist", Some(&key));
    let first_epoch = {
        let running = start(config(&data, vec![public.clone()])).await;
        let mut gw = running.gateway().await;
        let epoch = gw.register(RegisterRequest { node: Some(node("n1", "a")) }).await.expect("reg").into_inner().epoch;
        running.operator().await.push_patch(push(b.encode(), "a")).await.expect("push");
        running.stop().await;
        epoch
    };
    let running = start(config(&data, vec![public])).await;
    let mut gw = running.gateway().await;
    let hb = gw.heartbeat(HeartbeatRequest { node: Some(node("n1", "a")) }).await.expect("hb").into_inner();
    assert!(hb.known, "registration survived");
    assert!(hb.epoch > first_epoch, "restart bumps the epoch: {} -> {}", first_epoch, hb.epoch);
    let mut stream = gw.fetch_patch(FetchPatchRequest { patch_id: b.id() }).await.expect("fetch").into_inner();
    let chunk = stream.message().await.expect("chunk").expect("one chunk");
    assert_eq!(chunk.data, b.encode());
    let stack =
        gw.get_patch_stack(GetPatchStackRequest { target_build: BUILD.into() }).await.expect("stack").into_inner();
    assert!(stack.patches.is_empty());
    running.stop().await;
}

#[tokio::test]
async fn serves_standard_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(config(dir.path(), vec![])).await;
    let channel =
        tonic::transport::Endpoint::from_shared(running.channel_uri()).expect("uri").connect().await.expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest { service: "hotfleet.v1.AgentGateway".into() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(answer.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    running.stop().await;
}

/// Every page of `nodes list` under `selector`, each asked with `page_size`.
async fn all_pages(
    op: &mut hotfleet_proto::v1::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    selector: &str,
    page_size: u32,
) -> Vec<hotfleet_proto::v1::ListNodesResponse> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let request = ListNodesRequest { selector: selector.into(), page_size, page_token: token.clone() };
        let page = op.list_nodes(request).await.expect("list").into_inner();
        token = page.next_page_token.clone();
        pages.push(page);
        if token.is_empty() || pages.len() > 100 {
            return pages;
        }
    }
}

fn ids(page: &hotfleet_proto::v1::ListNodesResponse) -> Vec<String> {
    page.nodes.iter().map(|n| n.status.as_ref().map(|s| s.node_id.clone()).unwrap_or_default()).collect()
}

#[tokio::test]
async fn nodes_are_listed_in_pages_with_a_summary_of_every_match() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(config(dir.path(), vec![])).await;
    let mut gw = running.gateway().await;
    let mut op = running.operator().await;
    for i in 0..7 {
        let zone = if i % 2 == 0 { "a" } else { "b" };
        gw.register(RegisterRequest { node: Some(node(&format!("n{i}"), zone)) }).await.expect("register");
    }

    let pages = all_pages(&mut op, "all", 3).await;
    let listed: Vec<Vec<String>> = pages.iter().map(ids).collect();
    assert_eq!(listed, vec![vec!["n0", "n1", "n2"], vec!["n3", "n4", "n5"], vec!["n6"]]);
    for page in &pages {
        let summary = page.summary.clone().expect("summary");
        assert_eq!(summary.total, 7);
        assert_eq!(summary.by_liveness.get("alive"), Some(&7));
        assert_eq!(summary.by_build.get(BUILD), Some(&7));
    }

    // The summary counts what the selector matches; page size 0 is one whole answer.
    let pages = all_pages(&mut op, "zone=a", 0).await;
    assert_eq!(pages.len(), 1);
    assert_eq!(ids(&pages[0]), vec!["n0", "n2", "n4", "n6"]);
    assert_eq!(pages[0].summary.as_ref().map(|s| s.total), Some(4));
    running.stop().await;
}

#[tokio::test]
async fn a_page_ends_before_it_outgrows_a_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(config(dir.path(), vec![])).await;
    let mut gw = running.gateway().await;
    let mut op = running.operator().await;
    // 50 nodes of ~50 KB each (600 modules' digests): ~2.5 MB in all, more than one page holds.
    for i in 0..50 {
        let mut status = node(&format!("n{i:02}"), "a");
        status.processes[0].live_digests =
            (0..600).map(|m| (format!("zone.module_{m:04}"), format!("{:064x}", m))).collect();
        gw.register(RegisterRequest { node: Some(status) }).await.expect("register");
    }
    let pages = all_pages(&mut op, "all", 1000).await;
    assert!(pages.len() >= 2, "{} page(s)", pages.len());
    let listed: Vec<String> = pages.iter().flat_map(ids).collect();
    let expected: Vec<String> = (0..50).map(|i| format!("n{i:02}")).collect();
    assert_eq!(listed, expected, "every node once, in order");
    for page in &pages {
        assert!(page.encoded_len() < 3 * 1024 * 1024, "page of {} bytes", page.encoded_len());
    }
    running.stop().await;
}

#[tokio::test]
async fn the_embedded_audit_log_pages_and_keeps_its_retention() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = hotfleet_coordinator::store::embedded::EmbeddedStore::open(dir.path()).expect("open");
    let stale = store.acquire_epoch().await.expect("epoch");
    let fence = store.acquire_epoch().await.expect("epoch");
    audit_paging_and_retention(&store, fence, stale).await;
}

/// An attached agent gets its commands down its own stream. When it goes
/// away with a command unanswered, the caller learns at once, not at the
/// 30 s deadline, and the node is attached no more.
#[tokio::test]
async fn an_attached_stream_that_ends_fails_its_unanswered_call_at_once() {
    use hotfleet_proto::v1::{agent_answer, agent_call, AgentAnswer, AttachHello, PlanPatchRequest};

    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = key_in(&dir.path().join("keys"));
    let running = start(config(&dir.path().join("data"), vec![public])).await;
    let mut gw = running.gateway().await;
    let mut op = running.operator().await;
    gw.register(RegisterRequest { node: Some(node("n1", "a")) }).await.expect("register");
    let patch = bundle("planned", Some(&key));
    op.push_patch(push(patch.encode(), "alice")).await.expect("push");

    let (answers, outgoing) = tokio::sync::mpsc::channel(4);
    let hello =
        AgentAnswer { call_id: 0, answer: Some(agent_answer::Answer::Hello(AttachHello { node_id: "n1".into() })) };
    answers.send(hello).await.expect("queued");
    let mut calls =
        gw.attach(tokio_stream::wrappers::ReceiverStream::new(outgoing)).await.expect("attached").into_inner();

    let plan = tokio::spawn(async move {
        op.plan_patch(PlanPatchRequest { patch_id: patch.id(), node_id: "n1".into(), process_id: String::new() }).await
    });
    let call = tokio::time::timeout(Duration::from_secs(10), calls.message())
        .await
        .expect("a call within 10 s")
        .expect("the stream holds")
        .expect("a call");
    assert!(matches!(call.call, Some(agent_call::Call::Prepare(_))), "{call:?}");

    // The agent goes away without answering.
    let gone = std::time::Instant::now();
    drop(answers);
    drop(calls);
    let planned = tokio::time::timeout(Duration::from_secs(10), plan).await.expect("answered at once").expect("task");
    assert!(gone.elapsed() < Duration::from_secs(5), "took {:?}", gone.elapsed());
    let failed = match planned {
        Ok(reply) => {
            let reply = reply.into_inner();
            assert!(!reply.ok, "{reply:?}");
            reply.reason
        }
        Err(status) => status.message().to_string(),
    };
    assert!(failed.contains("attached stream closed before it answered"), "{failed}");
}
