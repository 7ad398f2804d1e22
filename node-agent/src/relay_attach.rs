//! The relay's attached agents, carried on one stream per upstream connection.
//!
//! An agent attaches to its relay as it would to the coordinator
//! (`AgentGateway.Attach`, its hello first). The relay does not forward that
//! stream as one HTTP/2 stream of its own: every agent on an upstream
//! connection goes on that connection's `AgentGateway.AttachRelayed`
//! stream, each message naming its node, and the relay hands each call that
//! comes down to its agent's stream. An attached stream held ~3.7 KB of the
//! coordinator per agent idle (h2's stream, hyper's task, the reader, the
//! codec: `docs/performance.md`); on the shared stream an agent is a link.
//!
//! The shared stream is opened with the first agent and again after it
//! ends; its end (the leader's term, the connection, the coordinator) ends
//! every agent's stream on it, and they attach again, as they would to a
//! coordinator. A coordinator from before `AttachRelayed` answers
//! UNIMPLEMENTED: the relay then forwards the agent's own stream as before.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use futures::{future::BoxFuture, stream::BoxStream, StreamExt as _};
use hotfleet_proto::{
    codec::SmallBuffers,
    tls::PeerCert,
    v1::{AgentAnswer, AgentCall, RelayedAnswer, RelayedCall},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{body::Body, codegen::http, Code, Request, Response, Status, Streaming};

use crate::coordinators::Coordinators;

/// Calls queued for one agent's stream; a call beyond (the agent reads too
/// slowly) is dropped, and the coordinator's deadline ends it.
const CALLS_PER_AGENT: usize = 32;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a single map operation: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where one agent's calls go: its stream to the relay. Boxed: a channel
/// allocates a block of 32 slots up front, and a call inline (or a status)
/// is a few hundred bytes.
type AgentCalls = mpsc::Sender<Box<Result<AgentCall, Status>>>;

/// One upstream connection's shared stream, opened when needed.
pub struct Carrier {
    coordinators: Coordinators,
    open: tokio::sync::Mutex<Option<Arc<Carried>>>,
    generations: AtomicU64,
}

/// An open shared stream and the agents on it.
pub struct Carried {
    /// The coordinator it was opened to.
    from: String,
    up: mpsc::UnboundedSender<RelayedAnswer>,
    /// Each agent's calls, by node, with the generation of its attachment
    /// (an agent attaching again replaces its earlier stream).
    agents: Mutex<HashMap<String, (u64, AgentCalls)>>,
    closed: AtomicBool,
}

impl Carrier {
    pub fn new(coordinators: Coordinators) -> Self {
        Self { coordinators, open: tokio::sync::Mutex::new(None), generations: AtomicU64::new(0) }
    }

    /// The open shared stream, opened now if there is none. `Err` with the
    /// coordinator asked when it could not be opened.
    pub async fn stream(&self) -> Result<Arc<Carried>, (String, Status)> {
        let mut open = self.open.lock().await;
        if let Some(carried) = open.as_ref().filter(|c| !c.closed.load(Ordering::Acquire)) {
            return Ok(carried.clone());
        }
        let (from, mut client) = self.coordinators.current();
        let (up, answers) = mpsc::unbounded_channel();
        let calls = match client.attach_relayed(UnboundedReceiverStream::new(answers)).await {
            Ok(calls) => calls.into_inner(),
            Err(status) => return Err((from, status)),
        };
        tracing::info!(coordinator = %from, "carrying attached agents on one stream");
        let carried =
            Arc::new(Carried { from, up, agents: Mutex::new(HashMap::new()), closed: AtomicBool::new(false) });
        tokio::spawn(carry_calls(self.coordinators.clone(), carried.clone(), calls));
        *open = Some(carried.clone());
        Ok(carried)
    }

    /// Agents on the open shared stream now.
    pub fn attached(&self) -> usize {
        match self.open.try_lock() {
            Ok(open) => open.as_ref().map_or(0, |carried| lock(&carried.agents).len()),
            // Being opened: no agent is on it yet.
            Err(_) => 0,
        }
    }

    /// Serves one agent's `Attach` (the HTTP request as it came) on
    /// `carried`; `cert` is the client certificate the agent presented (DER,
    /// none without TLS).
    pub async fn serve(
        &self,
        carried: Arc<Carried>,
        cert: Vec<u8>,
        request: http::Request<Body>,
    ) -> http::Response<Body> {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let agent = AgentAttach { carried, cert, generation };
        tonic::server::Grpc::new(SmallBuffers::<AgentCall, AgentAnswer>::default()).streaming(agent, request).await
    }
}

/// Hands each call down the shared stream to its agent, until the stream
/// ends; then ends every agent's stream (they attach again) and, when it
/// broke, moves on from that coordinator as any failed call does.
async fn carry_calls(coordinators: Coordinators, carried: Arc<Carried>, mut calls: Streaming<RelayedCall>) {
    let broke = loop {
        match calls.message().await {
            Ok(Some(relayed)) => carried.deliver(relayed),
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    carried.closed.store(true, Ordering::Release);
    let agents = std::mem::take(&mut *lock(&carried.agents));
    tracing::info!(coordinator = %carried.from, agents = agents.len(), "the shared attached stream ended; its agents attach again");
    drop(agents);
    if let Some(status) = broke {
        coordinators.after_error(&carried.from, &status);
    }
}

impl Carried {
    fn deliver(&self, relayed: RelayedCall) {
        let mut agents = lock(&self.agents);
        match (relayed.call, relayed.ended) {
            (Some(call), _) => {
                let Some((_, calls)) = agents.get(&relayed.node_id) else { return };
                match calls.try_send(Box::new(Ok(call))) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(node = %relayed.node_id, "an agent reads its calls too slowly: one is dropped (its deadline ends it)");
                    }
                    // The agent's stream just ended: its detach is on its way up.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            // The coordinator ended this agent's attachment: end its stream,
            // with the reason when it is one (code 0: attach again).
            (None, Some(why)) => {
                if let Some((_, calls)) = agents.remove(&relayed.node_id) {
                    if why.code != 0 {
                        let _ = calls.try_send(Box::new(Err(Status::new(Code::from(why.code), why.message))));
                    }
                }
            }
            (None, None) => {}
        }
    }

    /// The agent's stream of `generation` ended: tells the coordinator it
    /// left, unless a newer stream of the node replaced it or the
    /// coordinator ended it (then its entry is not this one's).
    fn leave(&self, node_id: &str, generation: u64) {
        let current = {
            let mut agents = lock(&self.agents);
            match agents.get(node_id) {
                Some((g, _)) if *g == generation => agents.remove(node_id).is_some(),
                _ => false,
            }
        };
        if current {
            self.send(node_id, None, Vec::new(), true);
        }
    }

    fn send(&self, node_id: &str, answer: Option<AgentAnswer>, agent_cert: Vec<u8>, detached: bool) -> bool {
        self.up.send(RelayedAnswer { node_id: node_id.to_string(), answer, agent_cert, detached }).is_ok()
    }
}

/// One agent's `Attach` to the relay.
struct AgentAttach {
    carried: Arc<Carried>,
    cert: Vec<u8>,
    generation: u64,
}

type CallStream = BoxStream<'static, Result<AgentCall, Status>>;

impl tonic::server::StreamingService<AgentAnswer> for AgentAttach {
    type Response = AgentCall;
    type ResponseStream = CallStream;
    type Future = BoxFuture<'static, Result<Response<CallStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<AgentAnswer>>) -> Self::Future {
        let (carried, cert, generation) = (self.carried.clone(), std::mem::take(&mut self.cert), self.generation);
        Box::pin(async move {
            let mut answers = request.into_inner();
            let (hello, node_id) = hotfleet_proto::attach::hello(&mut answers).await?;
            // The coordinator judges the certificate too; judged here first,
            // an agent naming another node cannot displace that node's stream.
            if !cert.is_empty() && !PeerCert::from_der(&cert).is_some_and(|c| c.is(&node_id)) {
                return Err(Status::permission_denied(format!(
                    "this certificate may not attach node {:?}: an agent attaches with its own node certificate",
                    node_id.chars().take(128).collect::<String>()
                )));
            }
            let (calls, outgoing) = mpsc::channel(CALLS_PER_AGENT);
            // An earlier stream of the same node on this one is replaced
            // (its sender dropped: it ends); the coordinator does the same.
            lock(&carried.agents).insert(node_id.clone(), (generation, calls));
            if !carried.send(&node_id, Some(hello), cert, false) {
                return Err(Status::unavailable("relay: the coordinator's stream just ended; attach again"));
            }
            tokio::spawn(carry_answers(carried, node_id, generation, answers));
            Ok(Response::new(ReceiverStream::new(outgoing).map(|call| *call).boxed()))
        })
    }
}

/// Carries one agent's answers up the shared stream until its stream ends,
/// then tells the coordinator it left (unless a newer stream of the same
/// node replaced it, or the coordinator ended it).
async fn carry_answers(carried: Arc<Carried>, node_id: String, generation: u64, mut answers: Streaming<AgentAnswer>) {
    while let Ok(Some(answer)) = answers.message().await {
        if !carried.send(&node_id, Some(answer), Vec::new(), false) {
            break;
        }
    }
    carried.leave(&node_id, generation);
}

#[cfg(test)]
mod tests {
    use hotfleet_proto::v1::CallFailed;

    use super::*;

    fn carried() -> (Arc<Carried>, mpsc::UnboundedReceiver<RelayedAnswer>) {
        let (up, answers) = mpsc::unbounded_channel();
        let carried = Arc::new(Carried {
            from: "c1".into(),
            up,
            agents: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        (carried, answers)
    }

    fn agent(carried: &Carried, node: &str, generation: u64) -> mpsc::Receiver<Box<Result<AgentCall, Status>>> {
        let (calls, received) = mpsc::channel(CALLS_PER_AGENT);
        lock(&carried.agents).insert(node.into(), (generation, calls));
        received
    }

    fn call(node: &str, call_id: u64) -> RelayedCall {
        RelayedCall { node_id: node.into(), call: Some(AgentCall { call_id, ..Default::default() }), ended: None }
    }

    fn ended(node: &str, code: Code) -> RelayedCall {
        RelayedCall {
            node_id: node.into(),
            call: None,
            ended: Some(CallFailed { code: code as i32, message: "because".into() }),
        }
    }

    #[tokio::test]
    async fn each_call_reaches_the_agent_it_names_and_no_other() {
        let (carried, _up) = carried();
        let (mut n1, mut n2) = (agent(&carried, "n1", 1), agent(&carried, "n2", 2));
        carried.deliver(call("n2", 7));
        carried.deliver(call("n1", 3));
        carried.deliver(call("n9", 1));
        assert_eq!(n1.recv().await.map(|c| c.map(|c| c.call_id).ok()), Some(Some(3)));
        assert_eq!(n2.recv().await.map(|c| c.map(|c| c.call_id).ok()), Some(Some(7)));
        assert!(n1.try_recv().is_err() && n2.try_recv().is_err(), "a call for a node not here goes nowhere");
    }

    #[tokio::test]
    async fn an_ended_attachment_ends_the_agents_stream_with_its_reason_or_quietly() {
        let (carried, _up) = carried();
        let (mut refused, mut replaced) = (agent(&carried, "n1", 1), agent(&carried, "n2", 2));
        carried.deliver(ended("n1", Code::PermissionDenied));
        carried.deliver(ended("n2", Code::Ok));
        let status = refused.recv().await.expect("the refusal").expect_err("a status");
        assert_eq!((status.code(), status.message()), (Code::PermissionDenied, "because"));
        assert!(refused.recv().await.is_none(), "then the stream ends");
        assert!(replaced.recv().await.is_none(), "ended quietly: the agent attaches again");
        assert!(lock(&carried.agents).is_empty());
    }

    #[tokio::test]
    async fn only_the_current_stream_of_a_node_leaving_detaches_it() {
        let (carried, mut up) = carried();
        let _old = agent(&carried, "n1", 1);
        let _new = agent(&carried, "n1", 2);
        carried.leave("n1", 1);
        assert!(up.try_recv().is_err(), "the replaced stream's end sends nothing up");
        assert!(lock(&carried.agents).contains_key("n1"), "and leaves the new one");
        carried.leave("n1", 2);
        let left = up.try_recv().expect("the current stream's end is sent up");
        assert_eq!((left.node_id.as_str(), left.detached), ("n1", true));
        carried.deliver(ended("n2", Code::Ok));
        carried.leave("n2", 3);
        assert!(up.try_recv().is_err(), "an agent the coordinator ended is not detached again");
    }
}
