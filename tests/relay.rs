//! Agents behind a `hotfleet-relay`: real coordinator(s), a real relay, six
//! real agents and Python zone servers with players connected, all over
//! mutual TLS. The relay carries every agent's calls over a few connections
//! and hands the coordinator the certificate of the agent it forwards for.
//!
//! - a rollout through the relay lands everywhere, players connected;
//! - a relay killed: every node behind it is lost; started again on its
//!   address, the agents come back through it and a rollout lands;
//! - with two coordinators on etcd, the leader killed: the relay follows the
//!   new leader and the fleet stays reachable;
//! - nobody but a relay the coordinator names may speak for another
//!   certificate, and an agent behind the relay still speaks only for itself.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use hotfleet_proto::{
    tls::{DEFAULT_COORDINATOR_IDENTITY, RELAYED_CERT_HEADER},
    v1::{agent_gateway_client::AgentGatewayClient, NodeStatus, RegisterRequest},
};
use tonic::Code;

on_both_stores!(a_rollout_through_a_relay_lands_everywhere_with_players_connected);

async fn a_rollout_through_a_relay_lands_everywhere_with_players_connected(backend: Backend) {
    let mut s = Scenario::start_relayed(backend);
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "1s");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 0, "completed: {rollout}");
    assert!(node_states(&rollout).iter().all(|(_, d, o)| d == "committed" && o == "committed"), "{rollout}");
    for (b, a) in before.iter().zip(s.damages()) {
        assert!(a < *b, "damage {b} -> {a}: the hotfix landed through the relay");
    }
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
    let relay_log = s.fleet.relay.as_ref().expect("relayed fleet").proc.log_text();
    assert!(relay_log.contains("hotfleet-relay serving"), "{relay_log}");
    // The agents' commands came down the relay's shared stream, not one stream each.
    assert!(relay_log.contains("carrying attached agents on one stream"), "{relay_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_and_started_again_brings_its_agents_back_and_the_next_rollout_lands() {
    let mut s = Scenario::start_relayed(Backend::Embedded);
    let relay = s.fleet.relay.as_mut().expect("relayed fleet");
    let addr = relay.grpc;
    relay.proc.kill();
    let urls = s.fleet.coordinator_urls();
    // Killed: the agents' heartbeats stop reaching the coordinator.
    wait_for("every node lost behind the dead relay", Duration::from_secs(30), None, || {
        let out = s.fleet.layout.cli(&["--output", "json", "--coordinator", &urls, "nodes", "list"]).ok()?;
        let nodes: serde_json::Value = serde_json::from_str(&out).ok()?;
        nodes["items"].as_array()?.iter().all(|n| n["liveness"] != "alive").then_some(())
    })
    .expect("nodes lost");
    let restarted = RelayProc::start(&s.fleet.layout, s.dir.path(), RELAY_NAME, addr, &urls, &s.fleet.keys)
        .expect("relay restarts on its address");
    s.fleet.relay = Some(restarted);
    s.fleet.wait_registered().expect("every agent back through the restarted relay");

    let patch = s.push("hotfix-damage");
    let (code, rollout) = s.watch(&s.start_rollout(&patch, "1s"));
    assert_eq!(code, 0, "the next rollout lands through the restarted relay: {rollout}");
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_follows_a_new_leader_when_the_old_one_is_killed() {
    let mut s = Scenario::start_relayed(Backend::Etcd { coordinators: 2 });
    let leader = leader_index(&s.fleet).await;
    s.fleet.coordinators[leader].proc.kill();
    let survivor = 1 - leader;
    let url = s.fleet.coordinators[survivor].url();
    // The survivor leads after the lease, and hears every node again through the relay.
    wait_for("every node alive at the new leader", Duration::from_secs(30), None, || {
        let out = s.fleet.layout.cli(&["--output", "json", "--coordinator", &url, "nodes", "list"]).ok()?;
        let nodes: serde_json::Value = serde_json::from_str(&out).ok()?;
        let items = nodes["items"].as_array()?;
        (items.len() == NODES && items.iter().all(|n| n["liveness"] == "alive")).then_some(())
    })
    .expect("nodes alive at the new leader");
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "1s");
    let (code, rollout) = s.watch_via(&url, &id);
    assert_eq!(code, 0, "the new leader commands the fleet through the relay: {rollout}");
    let relay_log = s.fleet.relay.as_ref().expect("relayed fleet").proc.log_text();
    assert!(relay_log.contains("following the leader"), "{relay_log}");
    assert_eq!(s.assert_consistent_via(&url, &[leader]).await.last(), Some(&patch));
}

/// The index of the coordinator that leads now.
async fn leader_index(fleet: &Fleet) -> usize {
    for _ in 0..100 {
        for (i, c) in fleet.coordinators.iter().enumerate() {
            let mut client = coordinator_client(&fleet.keys, &c.url()).await;
            if let Ok(status) = client.get_leader(hotfleet_proto::v1::GetLeaderRequest {}).await {
                if status.into_inner().is_leader {
                    return i;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no coordinator leads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_named_relay_speaks_for_another_certificate_and_a_relayed_agent_only_for_itself() {
    let s = Scenario::start_relayed(Backend::Embedded);
    let keys = &s.fleet.keys;
    let register = |node_id: &str| RegisterRequest {
        node: Some(NodeStatus { node_id: node_id.into(), advertise_addr: "127.0.0.1:1".into(), ..Default::default() }),
    };
    let node2_der = {
        use rustls_pki_types::{pem::PemObject, CertificateDer};
        let files = keys.tls.node(&s.fleet.layout, "node-2").expect("node-2 cert");
        hex::encode(CertificateDer::from_pem_file(&files.cert).expect("pem").as_ref())
    };
    let claiming = |node_id: &str| {
        let mut request = tonic::Request::new(register(node_id));
        request.metadata_mut().insert(RELAYED_CERT_HEADER, node2_der.parse().expect("ascii"));
        request
    };

    // node-1's own certificate, straight to the coordinator, claiming to relay node-2.
    let node1 = keys.tls.node(&s.fleet.layout, "node-1").expect("node-1 cert");
    let coordinator = s.fleet.coordinator().url();
    let channel = tls_channel(&node1, &coordinator, DEFAULT_COORDINATOR_IDENTITY).await.expect("channel");
    let forged = AgentGatewayClient::new(channel).register(claiming("node-2")).await.expect_err("forged relay");
    assert_eq!(forged.code(), Code::PermissionDenied, "{forged:?}");
    assert!(forged.message().contains("not a trusted relay"), "{forged:?}");

    // node-1 through the relay: its header is replaced by its own certificate.
    let relay = s.fleet.relay.as_ref().expect("relayed fleet");
    let channel = tls_channel(&node1, &relay.url(), RELAY_NAME).await.expect("channel to the relay");
    let mut via_relay = AgentGatewayClient::new(channel);
    let takeover = via_relay.register(claiming("node-2")).await.expect_err("node-1 as node-2");
    assert_eq!(takeover.code(), Code::PermissionDenied, "{takeover:?}");

    // An operator's certificate cannot use the relay's trust for operator calls.
    let sre = keys.tls.operator("sre");
    let channel = tls_channel(&sre, &relay.url(), RELAY_NAME).await.expect("channel to the relay");
    let mut operator = hotfleet_proto::v1::coordinator_client::CoordinatorClient::new(channel);
    let refused = operator.list_nodes(hotfleet_proto::v1::ListNodesRequest::default()).await.expect_err("not relayed");
    assert_eq!(refused.code(), Code::Unimplemented, "the relay serves the agents' service only: {refused:?}");

    // Nothing changed: node-2 still points at its own agent.
    let out = s.fleet.layout.cli(&["--output", "json", "--coordinator", &coordinator, "nodes", "list"]).expect("list");
    let nodes: serde_json::Value = serde_json::from_str(&out).expect("json");
    let node2 = nodes["items"].as_array().expect("items").iter().find(|n| n["nodeId"] == "node-2").expect("node-2");
    assert_ne!(node2["address"], "127.0.0.1:1", "{node2}");
}

/// A relay's shared stream of agents: only a trusted relay opens it, never
/// through a relay; an agent on it attaches only with a certificate naming
/// its node, and one refused is told so down the stream while the others
/// stay attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_trusted_relay_opens_a_shared_stream_and_each_agent_on_it_speaks_only_for_itself() {
    use hotfleet_proto::v1::{agent_answer, AgentAnswer, AttachHello, RelayedAnswer};
    let s = Scenario::start_relayed(Backend::Embedded);
    let keys = &s.fleet.keys;
    let coordinator = s.fleet.coordinator().url();
    let der_of = |node: &str| {
        use rustls_pki_types::{pem::PemObject, CertificateDer};
        let files = keys.tls.node(&s.fleet.layout, node).expect("node cert");
        CertificateDer::from_pem_file(&files.cert).expect("pem").as_ref().to_vec()
    };
    let hello = |node_id: &str, cert: Vec<u8>| RelayedAnswer {
        node_id: node_id.into(),
        answer: Some(AgentAnswer {
            call_id: 0,
            answer: Some(agent_answer::Answer::Hello(AttachHello { node_id: node_id.into() })),
        }),
        agent_cert: cert,
        detached: false,
    };

    // An agent's certificate, straight to the coordinator: not a relay.
    let node1 = keys.tls.node(&s.fleet.layout, "node-1").expect("node-1 cert");
    let channel = tls_channel(&node1, &coordinator, DEFAULT_COORDINATOR_IDENTITY).await.expect("channel");
    let refused = AgentGatewayClient::new(channel)
        .attach_relayed(tokio_stream::iter(vec![hello("node-2", der_of("node-2"))]))
        .await
        .expect_err("an agent is not a relay");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("not a trusted relay"), "{refused:?}");

    // The same through the relay: the relay does not carry it.
    let relay = s.fleet.relay.as_ref().expect("relayed fleet");
    let channel = tls_channel(&node1, &relay.url(), RELAY_NAME).await.expect("channel to the relay");
    let refused = AgentGatewayClient::new(channel)
        .attach_relayed(tokio_stream::iter(vec![hello("node-2", der_of("node-2"))]))
        .await
        .expect_err("not through a relay");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // node-1 attaching through the relay as node-2: refused at the relay.
    let channel = tls_channel(&node1, &relay.url(), RELAY_NAME).await.expect("channel to the relay");
    let as_node2 =
        AgentAnswer { call_id: 0, answer: Some(agent_answer::Answer::Hello(AttachHello { node_id: "node-2".into() })) };
    let refused = AgentGatewayClient::new(channel)
        .attach(tokio_stream::iter(vec![as_node2]))
        .await
        .expect_err("node-1 may not attach as node-2");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // The trusted relay's certificate: node-2 with node-1's certificate is
    // refused down the stream, and nothing attaches for it.
    let relay_cert = keys.tls.relay(&s.fleet.layout, RELAY_NAME).expect("relay cert");
    let channel = tls_channel(&relay_cert, &coordinator, DEFAULT_COORDINATOR_IDENTITY).await.expect("channel");
    let (up, answers) = tokio::sync::mpsc::unbounded_channel();
    up.send(hello("node-2", der_of("node-1"))).expect("queued");
    let mut calls = AgentGatewayClient::new(channel)
        .attach_relayed(tokio_stream::wrappers::UnboundedReceiverStream::new(answers))
        .await
        .expect("the trusted relay opens it")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), calls.message())
        .await
        .expect("an answer in time")
        .expect("the stream stays open")
        .expect("a message");
    assert_eq!(first.node_id, "node-2");
    let ended = first.ended.expect("node-2's attachment is refused");
    assert_eq!(Code::from(ended.code), Code::PermissionDenied, "{ended:?}");
    assert!(ended.message.contains("may not speak for node"), "{ended:?}");
    drop(up);
}
