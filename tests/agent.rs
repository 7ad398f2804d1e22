//! The node agent, driven over gRPC the way the coordinator drives it, with
//! real zone server processes connected to it and real players connected to
//! those. Patches come from a real coordinator (its `FetchPatch` stream).

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    time::Duration,
};

mod common;

use common::{coordinator_client, tls_channel};
use hotfleet_localfleet::*;
use hotfleet_proto::v1::{
    agent_client::AgentClient, AbortRequest, CommandHeader, CommitRequest, HealthRequest, PrepareRequest,
    PushPatchRequest, RollbackRequest, StatusRequest,
};
use serde_json::json;
use tonic::transport::Channel;

const BUILD: &str = "zone-1.0";

fn header(rollout: &str, patch: &str, epoch: u64) -> Option<CommandHeader> {
    Some(CommandHeader { rollout_id: rollout.into(), patch_id: patch.into(), epoch, ..Default::default() })
}

async fn agent_client(keys: &Keys, agent: &AgentProc) -> AgentClient<Channel> {
    common::agent_client(keys, agent).await
}

/// One node: a coordinator (patch source), an agent, `zones` zone servers, a player on each.
struct Node {
    layout: Layout,
    dir: TempDir,
    keys: Keys,
    coordinator: CoordinatorProc,
    agent: AgentProc,
    zones: Vec<ZoneProc>,
    players: Vec<Player>,
}

impl Node {
    async fn start(zones: usize) -> Node {
        let layout = Layout::for_workspace();
        let dir = tempfile::tempdir().expect("tmp");
        let keys = Keys::generate(&layout, dir.path()).expect("keygen");
        let port = free_port().expect("port");
        let coordinator = CoordinatorProc::start(&layout, dir.path(), &keys, port, &[]).expect("coordinator");
        let agent =
            AgentProc::start(&layout, dir.path(), "node-a", Some(&coordinator.url()), &keys, &[("region", "test")])
                .expect("agent");
        let zones: Vec<ZoneProc> = (0..zones)
            .map(|i| {
                ZoneProc::start(&layout, dir.path(), &format!("zone{i}"), Some(&agent.socket), BUILD, &[])
                    .expect("zone")
            })
            .collect();
        let players =
            zones.iter().map(|z| Player::connect(z.port, &format!("hero_{}", z.name)).expect("player")).collect();
        let node = Node { layout, dir, keys, coordinator, agent, zones, players };
        node.wait_processes(node.zones.len()).await;
        node
    }

    async fn wait_processes(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut client = agent_client(&self.keys, &self.agent).await;
            let status = client.status(StatusRequest {}).await.expect("status").into_inner();
            let count = status.node.map(|node| node.processes.len()).unwrap_or(0);
            if count == n {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{count} processes on the agent, expected {n}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn build(&self, name: &str, signed: bool) -> (std::path::PathBuf, String) {
        let source = self.layout.repo.join("examples/patches").join(name);
        let out = self.dir.path().join(format!("{name}-{signed}.hfpatch"));
        build_patch_with(&self.layout, &PatchBuild::zone(&source, &out, BUILD, name, signed.then_some(&self.keys)))
            .expect("build patch")
    }

    /// A signed bundle of `examples/patches/NAME/zone` made with the patch
    /// library directly: `hotfleet patch build` refuses a module that does not
    /// compile, so a bundle that gets one past it is made the way a broken
    /// or hostile tool would, to show the agent refuses it too.
    fn build_uncompiled(&self, name: &str) -> (Vec<u8>, String) {
        let source = self.layout.repo.join("examples/patches").join(name);
        let modules = hotfleet_patch::source_tree::scan(&source, &["zone".to_string()]).expect("modules");
        let manifest = hotfleet_patch::Manifest {
            format: hotfleet_patch::MANIFEST_FORMAT.to_string(),
            target_build: BUILD.into(),
            parent: None,
            packages: vec!["zone".into()],
            modules: vec![],
            author: "test".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            description: name.into(),
        };
        let mut bundle = hotfleet_patch::Bundle::create(manifest, modules.into_iter().collect()).expect("bundle");
        bundle.sign(&hotfleet_patch::SigningKeyFile::load(&self.keys.secret).expect("key"));
        (bundle.encode(), bundle.id())
    }

    async fn push_uncompiled(&self, name: &str) -> String {
        let (bundle, id) = self.build_uncompiled(name);
        let mut client = coordinator_client(&self.keys, &self.coordinator.url()).await;
        client.push_patch(PushPatchRequest { bundle }).await.expect("push patch");
        id
    }

    async fn push(&self, name: &str, signed: bool) -> String {
        let (path, id) = self.build(name, signed);
        let bundle = std::fs::read(path).expect("bundle");
        let mut client = coordinator_client(&self.keys, &self.coordinator.url()).await;
        let pushed = client.push_patch(PushPatchRequest { bundle }).await;
        if signed {
            pushed.expect("push patch");
        }
        id
    }
}

fn damage(player: &mut Player) -> i64 {
    player.hit_dummy().expect("attack the dummy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_commit_rollback_changes_what_players_see_without_dropping_them() {
    let mut node = Node::start(2).await;
    let before: Vec<i64> = node.players.iter_mut().map(damage).collect();
    let stats_before: Vec<_> = node.players.iter_mut().map(|p| p.stats().expect("stats")).collect();
    let patch = node.push("hotfix-damage", true).await;
    let mut agent = agent_client(&node.keys, &node.agent).await;

    let prepared = agent
        .prepare(PrepareRequest { header: header("r1", &patch, 1), ttl_seconds: 0, ..Default::default() })
        .await
        .expect("prepare")
        .into_inner();
    assert!(prepared.vote_yes, "prepare voted no: {}", prepared.reason);
    assert_eq!(prepared.processes.len(), 2);
    // Prepared but not committed: nothing live changed.
    let still: Vec<i64> = node.players.iter_mut().map(damage).collect();
    assert_eq!(still, before);

    let committed = agent.commit(CommitRequest { header: header("r1", &patch, 1) }).await.expect("commit").into_inner();
    assert!(committed.ok, "commit failed: {}", committed.reason);
    for outcome in &committed.processes {
        assert!(outcome.ok && outcome.pause_ms > 0.0 && outcome.pause_ms < 50.0, "bad outcome {outcome:?}");
    }
    // A repeated commit (lost reply, retry) answers the first answer and applies nothing twice.
    let again = agent.commit(CommitRequest { header: header("r1", &patch, 1) }).await.expect("commit").into_inner();
    assert_eq!(again.processes, committed.processes);

    let after: Vec<i64> = node.players.iter_mut().map(damage).collect();
    for (b, a) in before.iter().zip(&after) {
        assert!(a < b, "the hotfix must lower damage against the armored dummy: before {b}, after {a}");
    }
    // Same process, same connection, same player state (level, inventory, position).
    for (player, old) in node.players.iter_mut().zip(&stats_before) {
        let now = player.stats().expect("stats");
        assert_eq!(now["pid"], old["pid"]);
        for key in ["name", "level", "inventory", "x", "y", "xp"] {
            assert_eq!(now["player"][key], old["player"][key], "{key} changed");
        }
    }
    let status = agent.status(StatusRequest {}).await.expect("status").into_inner().node.expect("node");
    for process in &status.processes {
        assert_eq!(process.patch_stack, vec![patch.clone()]);
    }

    let rolled =
        agent.rollback(RollbackRequest { header: header("r1", &patch, 1) }).await.expect("rollback").into_inner();
    assert!(rolled.ok, "rollback failed: {}", rolled.reason);
    let back: Vec<i64> = node.players.iter_mut().map(damage).collect();
    assert_eq!(back, before, "rollback restores the old formula");
    for player in &mut node.players {
        assert!(player.connected());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_over_one_frame_once_escaped_reaches_the_runtimes_in_pieces() {
    // The damage hotfix plus four new modules of 1.9 MiB each (the module limit is 2 MiB)
    // of text JSON escapes: 7.6 MiB of bundle, some 20 MiB as one frame's JSON.
    let mut node = Node::start(1).await;
    let root = node.dir.path().join("big-patch");
    std::fs::create_dir_all(root.join("zone")).expect("mkdir");
    let hotfix = node.layout.repo.join("examples/patches/hotfix-damage/zone/combat.py");
    std::fs::copy(hotfix, root.join("zone/combat.py")).expect("copy");
    let text: String = ['"', '\\', '\u{1}', '\t'].iter().cycle().take(1_900_000).collect();
    for i in 0..4 {
        let source = format!("BLOB = r\"\"\"{text}\"\"\"\nSIZE = len(BLOB)\n");
        std::fs::write(root.join(format!("zone/blob{i}.py")), source).expect("write module");
    }
    let out = node.dir.path().join("big.hfpatch");
    let (path, patch) = build_patch_with(&node.layout, &PatchBuild::zone(&root, &out, BUILD, "big", Some(&node.keys)))
        .expect("build patch");
    let bundle = std::fs::read(path).expect("bundle");
    let mut coordinator = coordinator_client(&node.keys, &node.coordinator.url()).await;
    coordinator.push_patch(PushPatchRequest { bundle }).await.expect("push patch");

    let before = damage(&mut node.players[0]);
    let mut agent = agent_client(&node.keys, &node.agent).await;
    let prepared = agent
        .prepare(PrepareRequest { header: header("r-big", &patch, 1), ttl_seconds: 0, ..Default::default() })
        .await
        .expect("prepare")
        .into_inner();
    assert!(prepared.vote_yes, "prepare voted no: {}", prepared.reason);
    let committed =
        agent.commit(CommitRequest { header: header("r-big", &patch, 1) }).await.expect("commit").into_inner();
    assert!(committed.ok, "commit failed: {}", committed.reason);
    assert!(damage(&mut node.players[0]) < before, "the hotfix that came with the big modules is live");
    let status = agent.status(StatusRequest {}).await.expect("status").into_inner().node.expect("node");
    assert_eq!(status.processes[0].patch_stack, vec![patch]);
    assert!(status.processes[0].live_digests.contains_key("zone.blob3"), "{:?}", status.processes[0].live_digests);
    assert!(node.players[0].connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_prepare_leaves_every_process_untouched() {
    let mut node = Node::start(2).await;
    let before: Vec<i64> = node.players.iter_mut().map(damage).collect();
    let patch = node.push_uncompiled("syntax-error").await;
    let mut agent = agent_client(&node.keys, &node.agent).await;
    let answer = agent
        .prepare(PrepareRequest { header: header("r-syntax", &patch, 1), ttl_seconds: 0, ..Default::default() })
        .await
        .expect("prepare")
        .into_inner();
    assert!(!answer.vote_yes, "a patch with a syntax error must get a no vote");
    let errors: Vec<&str> = answer.processes.iter().map(|p| p.error.as_str()).collect();
    assert!(
        errors.len() == 2
            && errors.iter().all(|e| e.to_lowercase().contains("syntax error") && e.contains("zone.combat")),
        "{errors:?}"
    );
    // Commit of a patch that did not prepare is refused, and nothing changed.
    let commit =
        agent.commit(CommitRequest { header: header("r-syntax", &patch, 1) }).await.expect("commit").into_inner();
    assert!(!commit.ok);
    let after: Vec<i64> = node.players.iter_mut().map(damage).collect();
    assert_eq!(after, before);
    let status = agent.status(StatusRequest {}).await.expect("status").into_inner().node.expect("node");
    assert!(status.processes.iter().all(|p| p.patch_stack.is_empty()));
    assert!(status.prepared.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_or_unsigned_bundles_never_reach_a_runtime() {
    let mut node = Node::start(1).await;
    let before = damage(&mut node.players[0]);
    let mut agent = agent_client(&node.keys, &node.agent).await;

    // Unsigned: the coordinator refuses the upload, so the agent cannot fetch it.
    let unsigned = node.push("hotfix-damage", false).await;
    let answer = agent
        .prepare(PrepareRequest { header: header("r-unsigned", &unsigned, 1), ttl_seconds: 0, ..Default::default() })
        .await
        .expect("prepare")
        .into_inner();
    assert!(!answer.vote_yes && answer.processes.is_empty(), "{answer:?}");

    // Tampered copy in the agent's cache under the real id: re-verified, refused, refetched.
    let signed = node.push("hotfix-damage", true).await;
    // The very bundle just pushed (same id), with one byte of a module changed.
    let mut bytes = std::fs::read(node.dir.path().join("hotfix-damage-true.hfpatch")).expect("bundle");
    let pos = bytes.windows(6).position(|w| w == b"armor ").expect("source text in bundle");
    bytes[pos] = b'A';
    let cache = node.agent.data_dir.join("patches").join(format!("{signed}.hfpatch"));
    std::fs::create_dir_all(cache.parent().expect("dir")).expect("cache dir");
    std::fs::write(&cache, &bytes).expect("plant tampered bundle");
    let answer = agent
        .prepare(PrepareRequest { header: header("r-tampered", &signed, 1), ttl_seconds: 0, ..Default::default() })
        .await
        .expect("prepare")
        .into_inner();
    assert!(
        answer.vote_yes,
        "the agent must drop the tampered cache entry and fetch the real bundle: {}",
        answer.reason
    );
    assert!(node.agent.proc.log_text().contains("cached bundle failed verification"));
    agent.abort(AbortRequest { header: header("r-tampered", &signed, 1) }).await.expect("abort");

    // A patch id the coordinator does not have.
    let unknown = "ab".repeat(32);
    let answer = agent
        .prepare(PrepareRequest { header: header("r-unknown", &unknown, 1), ttl_seconds: 0, ..Default::default() })
        .await
        .expect("prepare")
        .into_inner();
    assert!(!answer.vote_yes);
    assert_eq!(damage(&mut node.players[0]), before, "nothing applied");
}

/// The agent's highest epoch, as its status reports it.
async fn highest_epoch(agent: &mut AgentClient<Channel>) -> u64 {
    agent.status(StatusRequest {}).await.expect("status").into_inner().node.expect("node").highest_epoch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epochs_are_refused_even_after_an_agent_restart() {
    let mut node = Node::start(1).await;
    let patch = node.push("hotfix-damage", true).await;
    let mut agent = agent_client(&node.keys, &node.agent).await;
    // The coordinator's first term is epoch 1, learned by the agent when it registered.
    agent.abort(AbortRequest { header: header("r-e", &patch, 1) }).await.expect("epoch 1 accepted");
    // A new term of the coordinator (same store: epoch 2) reaches the agent by heartbeat.
    let port = node.coordinator.addr.port();
    node.coordinator.proc.kill();
    node.coordinator = CoordinatorProc::start(&node.layout, node.dir.path(), &node.keys, port, &[]).expect("restart");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while highest_epoch(&mut agent).await < 2 {
        assert!(std::time::Instant::now() < deadline, "the agent never learned the coordinator's new epoch");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = agent
        .prepare(PrepareRequest { header: header("r-e", &patch, 1), ttl_seconds: 0, ..Default::default() })
        .await
        .expect_err("epoch 1 after 2 must be refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("stale epoch"), "{}", err.message());

    // Restart the agent on the same data dir with its coordinator gone: the fence survives.
    node.coordinator.proc.kill();
    node.agent.proc.kill();
    node.agent =
        AgentProc::start(&node.layout, node.dir.path(), "node-a", Some(&node.coordinator.url()), &node.keys, &[])
            .expect("agent restart");
    let mut agent = agent_client(&node.keys, &node.agent).await;
    assert_eq!(highest_epoch(&mut agent).await, 2);
    let err =
        agent.commit(CommitRequest { header: header("r-e2", &patch, 1) }).await.expect_err("old epoch after restart");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(node.players[0].connected(), "the zone server does not care that its agent restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_killed_mid_commit_is_reported_and_the_others_commit() {
    let mut node = Node::start(3).await;
    let before = damage(&mut node.players[0]);
    let patch = node.push("hotfix-damage", true).await;
    let mut agent = agent_client(&node.keys, &node.agent).await;
    let prepared = agent
        .prepare(PrepareRequest { header: header("r-kill", &patch, 1), ttl_seconds: 0, ..Default::default() })
        .await
        .expect("prepare")
        .into_inner();
    assert!(prepared.vote_yes, "{}", prepared.reason);

    // Freeze zone2's game thread so its commit waits for a safe point that never comes, then kill it.
    let victim_pid = node.zones[2].proc.pid();
    node.zones[2].proc.signal("STOP").expect("SIGSTOP");
    let (url, node_id, as_coordinator) = (node.agent.url(), node.agent.node_id.clone(), node.keys.tls.coordinator());
    let commit = tokio::spawn(async move {
        let mut agent = AgentClient::new(tls_channel(&as_coordinator, &url, &node_id).await.expect("agent"));
        agent.commit(CommitRequest { header: header("r-kill", &patch, 1) }).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.zones[2].proc.kill();
    let answer = commit.await.expect("join").expect("commit answered").into_inner();
    assert!(!answer.ok, "a process died mid-commit: the node must report failure");
    let failed: Vec<_> = answer.processes.iter().filter(|p| !p.ok).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].pid, victim_pid);
    assert!(failed[0].error.contains("disconnected"), "{}", failed[0].error);
    assert_eq!(answer.processes.iter().filter(|p| p.ok).count(), 2);
    // The survivors committed and keep serving.
    assert!(damage(&mut node.players[0]) < before);
    assert!(node.players[1].connected());
    assert!(node.agent.proc.alive(), "the agent survives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_either_socket_and_wrong_versions_change_nothing() {
    let mut node = Node::start(1).await;
    // Garbage instead of a hello: refused with an error frame, connection closed.
    let mut raw = UnixStream::connect(&node.agent.socket).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    raw.write_all(b"\x00\x00\x00\x05GET /").expect("write");
    let mut reply = Vec::new();
    let _ = raw.read_to_end(&mut reply);
    assert!(String::from_utf8_lossy(&reply).contains("malformed"), "{:?}", String::from_utf8_lossy(&reply));

    // An absurd length prefix: closed without reading 4 GiB.
    let mut raw = UnixStream::connect(&node.agent.socket).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    raw.write_all(&[0xff, 0xff, 0xff, 0xff]).expect("write");
    let mut reply = Vec::new();
    let _ = raw.read_to_end(&mut reply);

    // A runtime from the future: refused, told why.
    let hello = json!({"id": 1, "hello": {"protocolVersion": 99, "processId": "1-x", "pid": 1, "build": BUILD}});
    let body = hello.to_string().into_bytes();
    let mut raw = UnixStream::connect(&node.agent.socket).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    raw.write_all(&(body.len() as u32).to_be_bytes()).expect("write");
    raw.write_all(&body).expect("write");
    let mut reply = Vec::new();
    let _ = raw.read_to_end(&mut reply);
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("\"version\"") && text.contains("99"), "{text}");

    // Garbage on the gRPC port: the connection dies, the agent does not.
    let mut tcp = std::net::TcpStream::connect(node.agent.grpc).expect("connect grpc");
    tcp.write_all(b"\x16\x03\x01 hello? GET / HTTP/1.0\r\n\r\n").expect("write");
    let _ = tcp.read(&mut [0u8; 64]);

    // The real process is still served, and nothing else got registered.
    node.wait_processes(1).await;
    assert!(node.players[0].connected());
    assert!(node.agent.proc.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_connects_later_is_listed_at_once() {
    let node = Node::start(1).await;
    let late =
        ZoneProc::start(&node.layout, node.dir.path(), "late", Some(&node.agent.socket), BUILD, &[]).expect("zone");
    node.wait_processes(2).await;
    let mut agent = agent_client(&node.keys, &node.agent).await;
    let status = agent.status(StatusRequest {}).await.expect("status").into_inner().node.expect("node");
    let late_status = status.processes.iter().find(|p| p.pid == late.proc.pid()).expect("late process listed");
    assert_eq!(late_status.build, BUILD);
    assert!(late_status.live_digests.contains_key("zone.combat"), "{:?}", late_status.live_digests);
    assert!(late_status.health.as_ref().is_some_and(|h| h.alive));
    let health = agent.health(HealthRequest::default()).await.expect("health").into_inner();
    assert!(health.healthy, "{}", health.summary);
    assert_eq!(health.processes.len(), 2);
    assert_eq!(health.summary, "2 process(es) healthy");
    // One process frozen: its runtime cannot answer, and the node says which one.
    late.proc.signal("STOP").expect("SIGSTOP");
    let health = agent.health(HealthRequest::default()).await.expect("health").into_inner();
    late.proc.signal("CONT").expect("SIGCONT");
    assert!(!health.healthy, "{}", health.summary);
    assert!(health.summary.contains(&format!("pid {}", late.proc.pid())), "{}", health.summary);
    assert_eq!(status.labels.get("region").map(String::as_str), Some("test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_coordinator_is_logged_and_survived() {
    let mut node = Node::start(1).await;
    node.coordinator.proc.kill();
    wait_for("the agent to notice", Duration::from_secs(10), None, || {
        node.agent.proc.log_text().contains("coordinator unreachable").then_some(())
    })
    .expect("a clear log line");
    // Still serving its runtime and the gRPC API.
    node.wait_processes(1).await;
    assert!(node.players[0].connected());
    assert!(node.agent.proc.alive());
    // The coordinator returns on the same address and store: the agent registers again.
    let port = node.coordinator.addr.port();
    node.coordinator = CoordinatorProc::start(&node.layout, node.dir.path(), &node.keys, port, &[]).expect("restart");
    wait_for("re-registration", Duration::from_secs(15), None, || {
        node.agent.proc.log_text().contains("coordinator reachable again").then_some(())
    })
    .expect("the agent reconnects by itself");
}

/// One stuck game process (SIGSTOP: its runtime cannot answer) is that
/// process's problem, never a lost node: heartbeats report it from the agent's
/// cache within their bounded time, so the coordinator keeps the node alive
/// for longer than its lost timeout (3 × 2 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_process_never_makes_its_node_lost() {
    let node = Node::start(2).await;
    let mut coordinator = coordinator_client(&node.keys, &node.coordinator.url()).await;
    let stuck = node.zones[1].proc.pid();
    let listed = std::time::Instant::now();
    while node_a(&mut coordinator).await.status.expect("status").processes.len() < 2 {
        assert!(listed.elapsed() < Duration::from_secs(20), "the coordinator never saw both processes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.zones[1].proc.signal("STOP").expect("SIGSTOP");
    let stopped = std::time::Instant::now();
    let mut polls = 0;
    while stopped.elapsed() < Duration::from_secs(9) {
        let info = node_a(&mut coordinator).await;
        assert_eq!(info.liveness, "alive", "after {:?} with pid {stuck} stopped: {info:?}", stopped.elapsed());
        let processes = &info.status.as_ref().expect("status").processes;
        assert!(processes.iter().any(|p| p.pid == stuck), "the stuck process stays listed: {processes:?}");
        polls += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    node.zones[1].proc.signal("CONT").expect("SIGCONT");
    assert!(polls >= 20, "{polls} polls");
    let mut agent = agent_client(&node.keys, &node.agent).await;
    let health = agent.health(HealthRequest::default()).await.expect("health").into_inner();
    assert_eq!(health.processes.len(), 2, "{}", health.summary);
}

async fn node_a(
    coordinator: &mut hotfleet_proto::v1::coordinator_client::CoordinatorClient<Channel>,
) -> hotfleet_proto::v1::NodeInfo {
    let request = hotfleet_proto::v1::ListNodesRequest { selector: String::new(), ..Default::default() };
    let nodes = coordinator.list_nodes(request).await.expect("list nodes").into_inner().nodes;
    nodes.into_iter().find(|n| n.status.as_ref().is_some_and(|s| s.node_id == "node-a")).expect("node-a listed")
}
