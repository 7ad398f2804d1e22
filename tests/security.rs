//! Mutual TLS, identities and roles, on real binaries: a coordinator and an
//! agent with certificates of a development CA (`hotfleet certs dev`), and
//! clients holding other certificates, none, or the old actor header.
//!
//! - anonymous operator calls are refused on a TLS coordinator;
//! - a viewer certificate cannot start a rollout (the error names role operator);
//! - an agent refuses a command from a client that is not the coordinator;
//! - a fake node cannot register, nor take over an existing node id;
//! - a node cannot attach as another node (to take its commands), nor attach without the hello;
//! - the audit actor is the certificate identity even when the old header is sent;
//! - a bearer token (stored hashed) acts with its role; an unknown one is refused;
//! - a server without TLS flags and without --insecure refuses to start.

mod common;

use std::{process::Command, time::Duration};

use common::*;
use hotfleet_proto::{
    tls::{OwnCert, TlsArgs, DEFAULT_COORDINATOR_IDENTITY},
    v1::{
        agent_answer, agent_client::AgentClient, agent_gateway_client::AgentGatewayClient,
        coordinator_client::CoordinatorClient, AgentAnswer, AttachHello, CommandHeader, CommitRequest, FreezeRequest,
        ListAuditRequest, ListNodesRequest, NodeStatus, RegisterRequest, StatusRequest, UnfreezeRequest, WhoAmIRequest,
    },
};
use tonic::{transport::Channel, Code};

/// A TLS coordinator with one registered agent (`node-1`), no game servers.
struct Secured {
    layout: Layout,
    _dir: TempDir,
    keys: Keys,
    coordinator: CoordinatorProc,
    agent: AgentProc,
}

impl Secured {
    async fn start() -> Secured {
        Self::start_with(|_, _| Vec::new()).await
    }

    /// `extra(layout, dir)` gives more coordinator flags (made before it starts).
    async fn start_with(extra: impl Fn(&Layout, &std::path::Path) -> Vec<String>) -> Secured {
        let layout = Layout::for_workspace();
        let dir = tempfile::tempdir().expect("tmp");
        let keys = Keys::generate(&layout, dir.path()).expect("keys and certificates");
        let port = free_port().expect("port");
        let mut flags = vec!["--heartbeat-interval".to_string(), "300ms".into()];
        flags.extend(extra(&layout, dir.path()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let coordinator = CoordinatorProc::start(&layout, dir.path(), &keys, port, &flags).expect("coordinator");
        let agent =
            AgentProc::start(&layout, dir.path(), "node-1", Some(&coordinator.url()), &keys, &[]).expect("agent");
        let s = Secured { layout, _dir: dir, keys, coordinator, agent };
        s.wait_registered().await;
        s
    }

    async fn wait_registered(&self) {
        let mut op = coordinator_client(&self.keys, &self.coordinator.url()).await;
        for _ in 0..100 {
            let nodes = op.list_nodes(ListNodesRequest::default()).await.expect("list nodes").into_inner().nodes;
            if nodes.iter().any(|n| n.status.as_ref().is_some_and(|st| st.node_id == "node-1") && n.liveness == "alive")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("node-1 never registered over TLS");
    }

    /// The CLI as operator `name`, with `args`.
    fn cli_as(&self, name: &str, args: &[&str]) -> std::process::Output {
        let url = self.coordinator.url();
        let mut full: Vec<String> = vec!["--coordinator".into(), url];
        full.extend(self.keys.tls.operator(name).flags());
        full.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        self.layout.cli_raw(&refs).expect("run hotfleet")
    }

    /// A gateway client holding `who`'s certificate.
    async fn gateway_as(&self, who: &TlsFiles) -> AgentGatewayClient<Channel> {
        let channel =
            tls_channel(who, &self.coordinator.url(), DEFAULT_COORDINATOR_IDENTITY).await.expect("gateway channel");
        AgentGatewayClient::new(channel)
    }
}

/// A channel that trusts the CA but presents no client certificate.
async fn anonymous_channel(keys: &Keys, url: &str) -> Channel {
    let ca_only = TlsArgs { tls_ca: Some(keys.tls.coordinator().ca), ..TlsArgs::default() };
    let transport = ca_only.transport(OwnCert::Optional).expect("transport");
    transport.endpoint(url, DEFAULT_COORDINATOR_IDENTITY).expect("endpoint").connect().await.expect("connect")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_operator_calls_are_refused_on_a_tls_coordinator() {
    let s = Secured::start().await;
    let url = s.coordinator.url();
    let mut anonymous = CoordinatorClient::new(anonymous_channel(&s.keys, &url).await);
    let freeze = anonymous.freeze(FreezeRequest { reason: "anonymous".into() }).await.expect_err("refused");
    assert_eq!(freeze.code(), Code::Unauthenticated, "{freeze:?}");
    assert!(freeze.message().contains("needs role operator"), "{}", freeze.message());
    let read = anonymous.list_nodes(ListNodesRequest::default()).await.expect_err("reads need a role too");
    assert_eq!(read.code(), Code::Unauthenticated);
    let unfreeze = anonymous.unfreeze(UnfreezeRequest {}).await.expect_err("refused");
    assert_eq!(unfreeze.code(), Code::Unauthenticated);

    // Plaintext to the TLS port, and a certificate of another CA, never get a call through.
    let plain = CoordinatorClient::connect(url.clone()).await;
    if let Ok(mut plain) = plain {
        assert!(plain.freeze(FreezeRequest::default()).await.is_err(), "plaintext call answered");
    }
    let stranger = DevCerts::generate(&s.layout, &s._dir.path().join("other-ca")).expect("another CA");
    let foreign = TlsFiles { ca: s.keys.tls.coordinator().ca, ..stranger.operator("sre") };
    if let Ok(channel) = tls_channel(&foreign, &url, DEFAULT_COORDINATOR_IDENTITY).await {
        let mut foreign = CoordinatorClient::new(channel);
        assert!(foreign.freeze(FreezeRequest::default()).await.is_err(), "another CA's certificate was served");
    }
    let mut op = coordinator_client(&s.keys, &url).await;
    let frozen = op.get_freeze(hotfleet_proto::v1::GetFreezeRequest {}).await.expect("read").into_inner();
    assert!(!frozen.frozen, "no anonymous call changed anything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_certificate_cannot_start_a_rollout() {
    let s = Secured::start().await;
    let out = s.cli_as("viewer", &["rollout", "start", &"a".repeat(64), "--canary", "1"]);
    assert_eq!(out.status.code(), Some(4), "refused: {}", stderr(&out));
    assert!(stderr(&out).contains("needs role operator"), "{}", stderr(&out));
    assert!(stderr(&out).contains("viewer (role viewer)"), "{}", stderr(&out));

    let me = s.cli_as("viewer", &["--output", "json", "auth", "whoami"]);
    let me: serde_json::Value = serde_json::from_slice(&me.stdout).expect("whoami json");
    assert_eq!((me["identity"].as_str(), me["role"].as_str()), (Some("viewer"), Some("viewer")));
    assert_eq!(me["credential"], "certificate");
    // A viewer still reads.
    assert!(s.cli_as("viewer", &["nodes", "list"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_commands_from_anyone_but_the_coordinator() {
    let s = Secured::start().await;
    let url = s.agent.url();
    let commit = || CommitRequest {
        header: Some(CommandHeader {
            rollout_id: "r-x".into(),
            patch_id: "0".repeat(64),
            epoch: u64::MAX,
            ..Default::default()
        }),
    };
    // An operator with every role, another node, both of the right CA: not the coordinator.
    for who in [s.keys.tls.operator("sre"), s.keys.tls.node(&s.layout, "node-2").expect("node-2 cert")] {
        let mut agent = AgentClient::new(tls_channel(&who, &url, "node-1").await.expect("handshake"));
        let refused = agent.commit(commit()).await.expect_err("not the coordinator");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("only from its coordinator"), "{}", refused.message());
    }
    // No client certificate at all: the handshake itself fails.
    let ca_only = TlsArgs { tls_ca: Some(s.keys.tls.coordinator().ca), ..TlsArgs::default() };
    let endpoint = ca_only.transport(OwnCert::Optional).expect("t").endpoint(&url, "node-1").expect("endpoint");
    if let Ok(channel) = endpoint.connect().await {
        assert!(AgentClient::new(channel).commit(commit()).await.is_err(), "anonymous commit answered");
    }
    // The coordinator's certificate is obeyed, and nothing before it changed the epoch.
    let mut coordinator = agent_client(&s.keys, &s.agent).await;
    let status = coordinator.status(StatusRequest {}).await.expect("status").into_inner().node.expect("node");
    assert!(status.highest_epoch < 1000, "a refused command moved the epoch: {}", status.highest_epoch);
    assert_eq!(status.commands_admitted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_node_cannot_register_or_take_over_a_node_id() {
    let s = Secured::start().await;
    let register = |node_id: &str| RegisterRequest {
        node: Some(NodeStatus { node_id: node_id.into(), advertise_addr: "127.0.0.1:1".into(), ..Default::default() }),
    };
    let node2 = s.keys.tls.node(&s.layout, "node-2").expect("node-2 cert");
    let mut fake = s.gateway_as(&node2).await;
    let takeover = fake.register(register("node-1")).await.expect_err("take over node-1");
    assert_eq!(takeover.code(), Code::PermissionDenied, "{takeover:?}");
    let invented = fake.register(register("canary-0")).await.expect_err("invent a node");
    assert_eq!(invented.code(), Code::PermissionDenied, "{invented:?}");
    // An admin operator is no node either; no certificate is nobody.
    let mut admin = s.gateway_as(&s.keys.tls.operator("sre")).await;
    assert_eq!(admin.register(register("node-1")).await.expect_err("operator").code(), Code::PermissionDenied);
    let mut anonymous = AgentGatewayClient::new(anonymous_channel(&s.keys, &s.coordinator.url()).await);
    assert_eq!(anonymous.register(register("node-1")).await.expect_err("anon").code(), Code::Unauthenticated);

    let mut op = coordinator_client(&s.keys, &s.coordinator.url()).await;
    let nodes = op.list_nodes(ListNodesRequest::default()).await.expect("nodes").into_inner().nodes;
    let statuses: Vec<NodeStatus> = nodes.into_iter().filter_map(|n| n.status).collect();
    let ids: Vec<&str> = statuses.iter().map(|n| n.node_id.as_str()).collect();
    assert_eq!(ids, ["node-1"], "no node was invented");
    assert_eq!(statuses[0].advertise_addr, s.agent.grpc.to_string(), "node-1 still points at its own agent");
}

/// Attaching speaks for a node as registering does: another node's
/// certificate cannot take node-1's commands, an operator's cannot either,
/// and a stream that does not start by naming its node is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_attach_as_another_nor_without_the_hello() {
    let s = Secured::start().await;
    let hello = |node_id: &str| AgentAnswer {
        call_id: 0,
        answer: Some(agent_answer::Answer::Hello(AttachHello { node_id: node_id.into() })),
    };
    let node2 = s.keys.tls.node(&s.layout, "node-2").expect("node-2 cert");
    let mut fake = s.gateway_as(&node2).await;
    let takeover = fake.attach(tokio_stream::iter(vec![hello("node-1")])).await.expect_err("take node-1's commands");
    assert_eq!(takeover.code(), Code::PermissionDenied, "{takeover:?}");
    let garbage = AgentAnswer { call_id: 7, answer: None };
    let no_hello = fake.attach(tokio_stream::iter(vec![garbage])).await.expect_err("no hello");
    assert_eq!(no_hello.code(), Code::InvalidArgument, "{no_hello:?}");
    assert!(no_hello.message().contains("hello"), "{no_hello:?}");
    let mut admin = s.gateway_as(&s.keys.tls.operator("sre")).await;
    let operator = admin.attach(tokio_stream::iter(vec![hello("node-1")])).await.expect_err("an operator");
    assert_eq!(operator.code(), Code::PermissionDenied, "{operator:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_actor_is_the_certificate_identity_even_with_the_old_header() {
    let s = Secured::start().await;
    let mut oncall = coordinator_client_as(&s.keys, "oncall", &s.coordinator.url()).await;
    let mut request = tonic::Request::new(FreezeRequest { reason: "tournament".into() });
    request.metadata_mut().insert("x-hotfleet-actor", "alice-the-sre".parse().expect("ascii"));
    let frozen = oncall.freeze(request).await.expect("an operator may freeze").into_inner();
    assert_eq!(frozen.by, "oncall");
    let me = oncall.who_am_i(WhoAmIRequest {}).await.expect("whoami").into_inner();
    assert_eq!((me.identity.as_str(), me.role.as_str()), ("oncall", "operator"));

    let audit =
        oncall.list_audit(ListAuditRequest { limit: 10, before_seq: 0 }).await.expect("audit").into_inner().records;
    let freeze = audit.iter().find(|r| r.action.contains("freeze")).expect("freeze audited");
    assert_eq!(freeze.actor, "oncall");
    assert!(audit.iter().all(|r| r.actor != "alice-the-sre"), "{audit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_acts_with_its_role_and_an_unknown_one_is_refused() {
    let token = std::sync::Mutex::new(String::new());
    let s = Secured::start_with(|layout, dir| {
        let file = dir.join("tokens").display().to_string();
        let made = layout.cli(&["auth", "token", "create", "ci-bot", "--role", "viewer", "--tokens", &file]);
        *token.lock().expect("lock") = made.expect("token create").trim().to_string();
        let text = std::fs::read_to_string(&file).expect("tokens file");
        assert!(!text.contains(token.lock().expect("lock").as_str()), "only the hash is stored");
        vec!["--tokens".into(), file]
    })
    .await;
    let token = token.into_inner().expect("token");
    let ca = s.keys.tls.coordinator().ca.display().to_string();
    let url = s.coordinator.url();
    let as_token = |t: &str, args: &[&str]| {
        let mut full = vec!["--coordinator", &url, "--tls-ca", &ca, "--token", t];
        full.extend_from_slice(args);
        s.layout.cli_raw(&full).expect("run hotfleet")
    };
    let me = as_token(&token, &["auth", "whoami"]);
    let me = String::from_utf8_lossy(&me.stdout).into_owned();
    assert!(me.contains("identity    ci-bot") && me.contains("role        viewer") && me.contains("token"), "{me}");
    assert!(as_token(&token, &["nodes", "list"]).status.success(), "a viewer token reads");
    let freeze = as_token(&token, &["freeze", "--reason", "x"]);
    assert_eq!(freeze.status.code(), Some(4));
    assert!(stderr(&freeze).contains("ci-bot (role viewer)") && stderr(&freeze).contains("needs role operator"));
    let unknown = as_token("hft_guessed", &["nodes", "list"]);
    assert_eq!(unknown.status.code(), Some(4));
    assert!(stderr(&unknown).contains("unknown bearer token"), "{}", stderr(&unknown));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_without_tls_flags_or_insecure_refuse_to_start() {
    let layout = Layout::for_workspace();
    let dir = tempfile::tempdir().expect("tmp");
    let keys = Keys::generate(&layout, dir.path()).expect("keys");
    let run =
        |bin: &str, args: &[&str]| Command::new(layout.bin(bin).expect("binary")).args(args).output().expect("run");
    let data = dir.path().join("data").display().to_string();
    let public = keys.public.display().to_string();
    let coordinator = run("hotfleet-coordinator", &["--listen", "127.0.0.1:0", "--data-dir", &data]);
    assert!(!coordinator.status.success());
    let text = stderr(&coordinator);
    assert!(text.contains("--tls-ca, --tls-cert and --tls-key") && text.contains("--insecure"), "{text}");

    let socket = dir.path().join("a.sock").display().to_string();
    let agent_args = ["--listen", "127.0.0.1:0", "--runtime-socket", &socket, "--data-dir", &data];
    let agent = run("hotfleet-agent", &[&agent_args[..], &["--trusted-key", &public]].concat());
    assert!(!agent.status.success());
    assert!(stderr(&agent).contains("--tls-ca, --tls-cert and --tls-key"), "{}", stderr(&agent));

    let ca = keys.tls.coordinator().ca.display().to_string();
    let partial = run("hotfleet-coordinator", &["--listen", "127.0.0.1:0", "--data-dir", &data, "--tls-ca", &ca]);
    assert!(stderr(&partial).contains("missing --tls-cert and --tls-key"), "{}", stderr(&partial));

    let both =
        run("hotfleet-coordinator", &["--listen", "127.0.0.1:0", "--data-dir", &data, "--tls-ca", &ca, "--insecure"]);
    assert!(stderr(&both).contains("--insecure contradicts --tls-ca"), "{}", stderr(&both));

    // --insecure starts, says so, and treats the caller as admin.
    let port = free_port().expect("port");
    let mut cmd = Command::new(layout.bin("hotfleet-coordinator").expect("binary"));
    let addr = format!("127.0.0.1:{port}");
    cmd.args(["--listen", &addr, "--data-dir", &data, "--insecure"]);
    let proc = Proc::spawn("insecure-coordinator", cmd, dir.path()).expect("spawn");
    let me = wait_for("the insecure coordinator", Duration::from_secs(20), Some(&proc.log), || {
        let out = layout.cli_raw(&["--coordinator", &addr, "--insecure", "auth", "whoami"]).ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .expect("whoami");
    assert!(me.contains("identity    insecure") && me.contains("role        admin"), "{me}");
    assert!(proc.log_text().contains("--insecure: plaintext gRPC"), "the start warns");
}
