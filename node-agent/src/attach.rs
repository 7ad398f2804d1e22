//! Commands down the agent's own connection.
//!
//! The agent opens `AgentGateway.Attach` to the coordinator it heartbeats to
//! (the same HTTP/2 connection) and says which node it is; the leader then
//! sends this node's commands and health queries down that stream instead
//! of dialling the agent, and each is answered on it by the same
//! [`AgentService`] that serves dialled calls, under the deadline the call
//! names. So a leader holds one connection per agent rather than two, and
//! an agent it cannot dial (NAT, a firewall) still gets its commands.
//!
//! The stream ends with the leader's term, the connection, or the agent: it
//! is opened again after a short wait, at whichever coordinator the
//! heartbeat loop follows by then. While it is down the leader dials the
//! agent's gRPC port as before, whose guard admits only the coordinator's
//! certificate; down this stream the peer is the coordinator whose
//! certificate the agent verified when it connected.

use std::{sync::Arc, time::Duration};

use hotfleet_obs::grpc::{record_call, server_span, Side};
use hotfleet_proto::{
    attach::method_of,
    v1::{
        agent_answer::Answer, agent_call::Call, agent_server::Agent, AgentAnswer, AgentCall, AttachHello, CallFailed,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{metadata::MetadataMap, Code, Extensions, Request, Status, Streaming};
use tracing::Instrument;

use crate::{coordinators::Coordinators, service::AgentService};

/// A call that names no deadline gets the one the agent's server gives a unary call.
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Answers queued for the stream before an answering task waits for room.
const QUEUED_ANSWERS: usize = 16;

/// `message` as a server would hand it to the service, with `extensions`.
fn request<T>(message: T, extensions: &Extensions) -> Request<T> {
    Request::from_parts(MetadataMap::new(), extensions.clone(), message)
}

/// Answers one call as the unary RPC of the same name on `service` would
/// have; `extensions` are what its requests carry (empty for the agent).
pub async fn answer<A: Agent>(service: &A, call: AgentCall, extensions: &Extensions) -> AgentAnswer {
    let (call_id, started) = (call.call_id, std::time::Instant::now());
    let method = call.call.as_ref().map_or("unknown", method_of);
    let span = server_span(method, &call.traceparent);
    let timeout = match call.timeout_ms {
        0 => DEFAULT_CALL_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)).min(DEFAULT_CALL_TIMEOUT),
    };
    let work = async {
        Ok::<_, Status>(match call.call {
            Some(Call::Prepare(r)) => Answer::Prepare(service.prepare(request(r, extensions)).await?.into_inner()),
            Some(Call::Commit(r)) => Answer::Commit(service.commit(request(r, extensions)).await?.into_inner()),
            Some(Call::Abort(r)) => Answer::Abort(service.abort(request(r, extensions)).await?.into_inner()),
            Some(Call::Rollback(r)) => Answer::Rollback(service.rollback(request(r, extensions)).await?.into_inner()),
            Some(Call::Health(r)) => Answer::Health(service.health(request(r, extensions)).await?.into_inner()),
            None => return Err(Status::invalid_argument("the call names no command")),
        })
    };
    let answer = match tokio::time::timeout(timeout, work).instrument(span).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(status)) => failed(&status),
        Err(_) => failed(&Status::deadline_exceeded(format!("no answer within the call's {} ms", timeout.as_millis()))),
    };
    // Counted as the dialled call it stands for would be.
    let code = match &answer {
        Answer::Failed(f) => Code::from(f.code),
        _ => Code::Ok,
    };
    record_call(Side::Server, method, code, started);
    AgentAnswer { call_id, answer: Some(answer) }
}

fn failed(status: &Status) -> Answer {
    Answer::Failed(CallFailed { code: status.code() as i32, message: status.message().to_string() })
}

/// The request side of an attachment, the hello naming `node_id` already
/// queued: the sender takes the answers, the stream goes to `Attach`.
pub fn opening(node_id: &str) -> (mpsc::Sender<AgentAnswer>, ReceiverStream<AgentAnswer>) {
    let (answers, outgoing) = mpsc::channel(QUEUED_ANSWERS);
    let hello = AgentAnswer { call_id: 0, answer: Some(Answer::Hello(AttachHello { node_id: node_id.to_string() })) };
    // Cannot fail: the receiver is right here and the queue is empty.
    let _ = answers.try_send(hello);
    (answers, ReceiverStream::new(outgoing))
}

/// Answers every call of an open attachment, each in its own task (a slow
/// commit never holds up a health query), until the stream ends: `Ok` when
/// the coordinator ended it, the status when it broke.
pub async fn answer_calls<A: Agent>(
    mut calls: Streaming<AgentCall>,
    service: Arc<A>,
    answers: mpsc::Sender<AgentAnswer>,
    extensions: Extensions,
) -> Result<(), Status> {
    while let Some(call) = calls.message().await? {
        let (service, answers, extensions) = (service.clone(), answers.clone(), extensions.clone());
        tokio::spawn(async move {
            // The stream may be gone by now: the coordinator counts that call unanswered.
            let _ = answers.send(answer(&*service, call, &extensions).await).await;
        });
    }
    Ok(())
}

/// Keeps this node attached to the coordinator it follows until `shutdown`,
/// from its first registration on (`registered`: see `coordinator_link`).
pub async fn run(
    coordinators: Coordinators,
    service: AgentService,
    node_id: String,
    retry: Duration,
    mut registered: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = registered.wait_for(|done| *done) => {}
        _ = shutdown.cancelled() => return,
    }
    let service = Arc::new(service);
    let mut refused_before = None;
    loop {
        let (addr, mut client) = coordinators.current();
        let (answers, outgoing) = opening(&node_id);
        let opened = tokio::select! {
            opened = client.attach(outgoing) => opened,
            _ = shutdown.cancelled() => return,
        };
        match opened {
            Ok(calls) => {
                tracing::info!(coordinator = %addr, "attached: commands come down this agent's own connection");
                refused_before = None;
                let ended = tokio::select! {
                    ended = answer_calls(calls.into_inner(), service.clone(), answers, Extensions::new()) => ended,
                    _ = shutdown.cancelled() => return,
                };
                match ended {
                    Ok(()) => {
                        tracing::info!(coordinator = %addr, "the coordinator ended the attached stream (its term ended); attaching again");
                    }
                    Err(status) => {
                        tracing::info!(coordinator = %addr, error = %status.message(), "the attached stream broke; attaching again");
                    }
                }
            }
            Err(status) => {
                // Logged once per kind of refusal: a follower, or a leader
                // that is down, is the heartbeat loop's to report.
                if refused_before != Some(status.code()) {
                    let reason = if status.code() == Code::Unimplemented {
                        "this coordinator only dials agents"
                    } else {
                        "commands come by dialling this agent meanwhile"
                    };
                    tracing::info!(coordinator = %addr, error = %status.message(), code = ?status.code(), "not attached: {reason}");
                    refused_before = Some(status.code());
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(hotfleet_proto::pushback::jittered(retry)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hotfleet_proto::v1::{CommitRequest, HealthRequest};

    use super::*;
    use crate::{
        reports::{NodeIdentity, NodeReporter},
        testing::rig,
    };

    #[tokio::test]
    async fn a_call_is_answered_as_its_unary_rpc_would_be() {
        let rig = rig(&["p1"]);
        let identity =
            NodeIdentity { node_id: "node-1".into(), labels: BTreeMap::new(), advertise_addr: String::new() };
        let service = AgentService::new(Arc::new(NodeReporter::new(rig.participant.clone(), identity)));
        let health = answer(
            &service,
            AgentCall {
                call_id: 3,
                timeout_ms: 1000,
                call: Some(Call::Health(HealthRequest::default())),
                traceparent: String::new(),
            },
            &Extensions::new(),
        )
        .await;
        assert_eq!(health.call_id, 3);
        assert!(matches!(health.answer, Some(Answer::Health(_))), "{health:?}");
        // A commit without its header is refused as the unary call refuses it.
        let commit = answer(
            &service,
            AgentCall {
                call_id: 4,
                timeout_ms: 1000,
                call: Some(Call::Commit(CommitRequest { header: None })),
                traceparent: String::new(),
            },
            &Extensions::new(),
        )
        .await;
        match commit.answer {
            Some(Answer::Failed(f)) => {
                assert_eq!(f.code, Code::InvalidArgument as i32);
                assert!(f.message.contains("header"), "{}", f.message);
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        let empty = answer(
            &service,
            AgentCall { call_id: 5, timeout_ms: 0, call: None, traceparent: String::new() },
            &Extensions::new(),
        )
        .await;
        assert!(
            matches!(empty.answer, Some(Answer::Failed(ref f)) if f.code == Code::InvalidArgument as i32),
            "{empty:?}"
        );
    }
}
