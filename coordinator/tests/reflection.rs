//! Reflection lists exactly the services a coordinator serves: a stock
//! client (grpcurl, grpcio) must not be offered `hotfleet.v1.Agent`, which
//! only agents serve. Both reflection versions are asked.

mod common;

use common::*;
use hotfleet_coordinator::server::SERVED;
use tonic::transport::{Channel, Endpoint};
use tonic_reflection::pb::{v1, v1alpha};

const EXPECTED: [&str; 5] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "hotfleet.v1.AgentGateway",
    "hotfleet.v1.Coordinator",
];

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

async fn list_v1(channel: Channel) -> Vec<String> {
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut answers = client.server_reflection_info(tokio_stream::iter([request])).await.expect("v1").into_inner();
    let answer = answers.message().await.expect("v1 answer").expect("one answer");
    match answer.message_response {
        Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            sorted(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("v1: not a service list: {other:?}"),
    }
}

async fn list_v1alpha(channel: Channel) -> Vec<String> {
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut answers = client.server_reflection_info(tokio_stream::iter([request])).await.expect("v1alpha").into_inner();
    let answer = answers.message().await.expect("v1alpha answer").expect("one answer");
    match answer.message_response {
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            sorted(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("v1alpha: not a service list: {other:?}"),
    }
}

#[tokio::test]
async fn reflection_lists_exactly_the_served_services() {
    assert_eq!(sorted(SERVED.iter().map(|s| s.to_string()).collect()), EXPECTED);
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(config(&dir.path().join("data"), vec![])).await;
    let channel = Endpoint::from_shared(running.channel_uri()).expect("uri").connect().await.expect("connect");
    assert_eq!(list_v1(channel.clone()).await, EXPECTED);
    assert_eq!(list_v1alpha(channel.clone()).await, EXPECTED);
    // The health service listed answers (the coordinator's own service is SERVING).
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "hotfleet.v1.Coordinator".into() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(status.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    running.stop().await;
}
