//! [`GrpcAgents`] against a loopback agent whose Health answers slowly: the
//! call bound grows with the fleet, and a call's deadline starts when it is
//! sent, not while it waits for a slot.

use std::{collections::BTreeMap, time::Duration};

use hotfleet_proto::v1::{
    agent_server::{Agent, AgentServer},
    AbortRequest, AbortResponse, CommitRequest, CommitResponse, HealthRequest, HealthResponse, PrepareRequest,
    PrepareResponse, RollbackRequest, RollbackResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use super::*;

/// Answers Health after `delay`; every command is refused (unused here).
struct SlowHealth {
    delay: Duration,
}

#[tonic::async_trait]
impl Agent for SlowHealth {
    async fn prepare(&self, _: Request<PrepareRequest>) -> Result<Response<PrepareResponse>, Status> {
        Err(Status::unimplemented("test agent"))
    }
    async fn commit(&self, _: Request<CommitRequest>) -> Result<Response<CommitResponse>, Status> {
        Err(Status::unimplemented("test agent"))
    }
    async fn abort(&self, _: Request<AbortRequest>) -> Result<Response<AbortResponse>, Status> {
        Err(Status::unimplemented("test agent"))
    }
    async fn rollback(&self, _: Request<RollbackRequest>) -> Result<Response<RollbackResponse>, Status> {
        Err(Status::unimplemented("test agent"))
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Err(Status::unimplemented("test agent"))
    }
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        tokio::time::sleep(self.delay).await;
        Ok(Response::new(HealthResponse { node_id: "n1".into(), ..Default::default() }))
    }
}

async fn slow_agent(delay: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(SlowHealth { delay }))
            .serve_with_incoming(incoming),
    );
    addr
}

#[test]
fn the_call_bound_grows_with_the_fleet_up_to_a_cap() {
    assert_eq!(in_flight_limit(64, 0), 64);
    assert_eq!(in_flight_limit(64, 100), 64);
    assert_eq!(in_flight_limit(64, 1_000), 250);
    assert_eq!(in_flight_limit(64, 10_000), MAX_SCALED_IN_FLIGHT);
    // An operator's higher floor is kept; zero still allows one call.
    assert_eq!(in_flight_limit(2_000, 10_000), 2_000);
    assert_eq!(in_flight_limit(0, 0), 1);
}

#[tokio::test]
async fn the_semaphore_grows_as_agents_are_first_called() {
    let agents = GrpcAgents::new(Duration::from_secs(1), 2, Transport::Insecure);
    assert_eq!(agents.in_flight_bound(), 2);
    for i in 0..40 {
        let target = Target { node_id: format!("n{i}"), addr: format!("127.0.0.1:{}", 1 + i) };
        agents.channel(&target).expect("channel");
    }
    assert_eq!(agents.in_flight_bound(), 10);
    assert_eq!(agents.in_flight.available_permits(), 10);
}

#[tokio::test]
async fn a_fan_out_over_the_fleet_is_as_wide_as_the_bound_will_grow() {
    let agents = GrpcAgents::new(Duration::from_secs(1), 64, Transport::Insecure);
    assert_eq!(agents.width(10), 64, "the floor for a small fleet");
    assert_eq!(agents.width(1_000), 250, "before any channel is open");
    assert_eq!(agents.width(10_000), MAX_SCALED_IN_FLIGHT);
    assert_eq!(agents.open_channels(), 0);
}

#[tokio::test]
async fn waiting_for_a_slot_does_not_count_against_the_deadline() {
    // One slot, three calls of 200 ms each under a 350 ms deadline: they run
    // one after another (the last is sent ~400 ms after it was asked for),
    // and each answers well within its own deadline.
    let addr = slow_agent(Duration::from_millis(200)).await;
    let agents = GrpcAgents::new(Duration::from_secs(5), 1, Transport::Insecure);
    let target = Target { node_id: "n1".into(), addr };
    let since = BTreeMap::new();
    let started = tokio::time::Instant::now();
    let calls = (0..3).map(|_| agents.health(&target, &since, Duration::from_millis(350)));
    let results = futures::future::join_all(calls).await;
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    assert!(started.elapsed() >= Duration::from_millis(600), "the calls did not queue: {:?}", started.elapsed());
}

#[tokio::test]
async fn a_call_still_ends_at_its_deadline_once_sent() {
    let addr = slow_agent(Duration::from_secs(5)).await;
    let agents = GrpcAgents::new(Duration::from_secs(5), 1, Transport::Insecure);
    let target = Target { node_id: "n1".into(), addr };
    let started = tokio::time::Instant::now();
    let err = agents.health(&target, &BTreeMap::new(), Duration::from_millis(200)).await.expect_err("deadline");
    assert!(matches!(err, AgentError::Deadline { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}
