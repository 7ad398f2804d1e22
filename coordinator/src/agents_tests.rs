//! [`GrpcAgents`] against a loopback agent whose Health answers slowly: the
//! call bound grows with the fleet, and a call's deadline starts when it is
//! sent, not while it waits for a slot. And against an attached agent: its
//! calls go down its link, never over a dialled channel.

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
async fn the_semaphore_grows_as_agents_are_first_asked() {
    let agents = GrpcAgents::new(Duration::from_secs(1), 2, Transport::Insecure);
    assert_eq!(agents.in_flight_bound(), 2);
    for i in 0..40 {
        let target = Target { node_id: format!("n{i}"), addr: format!("127.0.0.1:{}", 1 + i) };
        agents.grow_bound(&target);
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

fn commit_cmd() -> Command {
    Command {
        kind: CommandKind::Commit,
        rollout_id: "r1".into(),
        patch_id: "p1".into(),
        epoch: 3,
        process_id: String::new(),
        rollout_kind: RolloutKind::Apply,
    }
}

#[tokio::test]
async fn an_attached_agent_is_asked_down_its_link_and_its_failures_read_as_a_unary_calls() {
    use hotfleet_proto::v1::{agent_answer::Answer, agent_call::Call, AgentAnswer, CallFailed};
    let agents = GrpcAgents::new(Duration::from_secs(5), 4, Transport::Insecure);
    let links = agents.links().expect("the gRPC client takes attached agents");
    let (link, mut calls) = links.attach("n1", &tokio_util::sync::CancellationToken::new());
    // Answers by what it is asked: a commit succeeds, an abort fails as a
    // stale epoch would, a rollback gets the wrong kind of answer.
    tokio::spawn(async move {
        while let Some(crate::agent_links::Outbound::Call(_, call)) = calls.recv().await {
            let answer = match call.call {
                Some(Call::Commit(r)) => {
                    assert_eq!(r.header.as_ref().map(|h| h.epoch), Some(3));
                    Answer::Commit(CommitResponse { ok: true, ..Default::default() })
                }
                Some(Call::Abort(_)) => Answer::Failed(CallFailed {
                    code: tonic::Code::FailedPrecondition as i32,
                    message: "epoch 3 is older than 4".into(),
                }),
                _ => Answer::Health(Default::default()),
            };
            link.answer(AgentAnswer { call_id: call.call_id, answer: Some(answer) });
        }
    });
    // Nothing listens at this address: only the link can answer.
    let to = Target { node_id: "n1".into(), addr: "127.0.0.1:9".into() };
    let d = Duration::from_secs(2);
    let committed = agents.send(&to, &commit_cmd(), d).await.expect("answered down the link");
    assert!(committed.ok);
    let refused = agents.send(&to, &commit_cmd().with_kind(CommandKind::Abort), d).await;
    assert!(matches!(&refused, Err(AgentError::Refused { reason, .. }) if reason.contains("older")), "{refused:?}");
    let mismatched = agents.send(&to, &commit_cmd().with_kind(CommandKind::Rollback), d).await;
    assert!(
        matches!(&mismatched, Err(AgentError::Refused { reason, .. }) if reason.contains("health answer")),
        "{mismatched:?}"
    );
    assert_eq!(agents.open_channels(), 0, "no connection was dialled");
    // Detached: the next call dials (and finds nobody there).
    links.detach("n1", &links.get("n1").expect("attached"));
    let dialled = agents.send(&to, &commit_cmd(), d).await;
    assert!(matches!(dialled, Err(AgentError::Unreachable { .. })), "{dialled:?}");
    assert_eq!(agents.open_channels(), 1);
}

#[tokio::test]
async fn an_attached_agent_that_never_answers_costs_its_deadline_and_no_more() {
    let agents = GrpcAgents::new(Duration::from_secs(5), 4, Transport::Insecure);
    let links = agents.links().expect("links");
    let (_link, _calls) = links.attach("n1", &tokio_util::sync::CancellationToken::new());
    let to = Target { node_id: "n1".into(), addr: "127.0.0.1:9".into() };
    let started = tokio::time::Instant::now();
    let silent = agents.send(&to, &commit_cmd(), Duration::from_millis(200)).await;
    assert!(matches!(silent, Err(AgentError::Deadline { ms: 200, .. })), "{silent:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(links.get("n1").map(|l| l.waiting()), Some(0), "the given-up call left nothing behind");
}
