//! Reflection lists exactly the services a coordinator serves: a stock
//! client (grpcurl, grpcio) must not be offered `hotfleet.v1.Agent`, which
//! only agents serve. Both reflection versions are asked.

mod common;

use common::*;
use hotfleet_coordinator::server::SERVED;
use tonic::transport::Endpoint;
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

/// The service names one reflection version lists (the two versions are
/// separate generated types with the same shape).
macro_rules! list_services {
    ($version:ident, $channel:expr) => {{
        use $version::{server_reflection_request::MessageRequest, server_reflection_response::MessageResponse};
        let mut client = $version::server_reflection_client::ServerReflectionClient::new($channel);
        let request = $version::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = client.server_reflection_info(tokio_stream::iter([request])).await.expect("ask").into_inner();
        match answers.message().await.expect("answer").expect("one answer").message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                sorted(list.service.into_iter().map(|s| s.name).collect())
            }
            other => panic!("{}: not a service list: {other:?}", stringify!($version)),
        }
    }};
}

#[tokio::test]
async fn reflection_lists_exactly_the_served_services() {
    assert_eq!(sorted(SERVED.iter().map(|s| s.to_string()).collect()), EXPECTED);
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(config(&dir.path().join("data"), vec![])).await;
    let channel = Endpoint::from_shared(running.channel_uri()).expect("uri").connect().await.expect("connect");
    assert_eq!(list_services!(v1, channel.clone()), EXPECTED);
    assert_eq!(list_services!(v1alpha, channel.clone()), EXPECTED);
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
