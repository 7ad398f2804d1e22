//! Agents attached to this leader: commands down the agent's own connection.
//!
//! Dialling every agent cost the coordinator an HTTP/2 connection per agent
//! (~42 KB each, measured in docs/performance.md) on top of the one each
//! agent holds for its heartbeats, and a connection set-up per agent for
//! every rollout after the idle ones were closed. An attached agent instead
//! opens `AgentGateway.Attach` over its heartbeat connection and the leader
//! sends that node's commands and health queries down it ([`Link::call`]),
//! matching each answer to its call by id. A node with no link is dialled as
//! before (`agents.rs`): an agent of an older build, or one between two
//! attachments.
//!
//! A link lives as long as its stream: the agent going away, the stream
//! breaking or the leader's term ending detaches it, and every call still
//! waiting on it fails at once as unreachable (the engine retries or rolls
//! back as it does for a lost reply: commands are idempotent per rollout,
//! and a stale one is fenced by its epoch). A node attaching again replaces
//! its earlier link.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use hotfleet_proto::v1::{agent_answer, agent_call, AgentAnswer, AgentCall};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// Calls queued for one agent's stream before a caller waits for room.
const QUEUED_CALLS: usize = 8;

/// Why a call on a link got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the agent's attached stream closed before it answered")]
    Closed,
}

/// One attached agent's stream.
pub struct Link {
    generation: u64,
    /// Cancelled when the stream is to end: the term it was opened under
    /// ended, or a newer attachment of the node replaced this one (rather
    /// than leaving it open and unused until the agent goes).
    over: CancellationToken,
    /// Calls not yet taken by the stream. A queue of its own rather than a
    /// tokio channel: a channel allocates ~800 bytes up front (a block of 32
    /// slots, cache-padded ends), for as long as its agent stays attached.
    /// Boxed: a queue keeps its capacity, and a call inline is several hundred bytes.
    queue: Mutex<Queue>,
    /// Room left in `queue`: a caller beyond it waits.
    room: Semaphore,
    queued: Notify,
    pending: Mutex<HashMap<u64, oneshot::Sender<agent_answer::Answer>>>,
    next_call: AtomicU64,
}

#[derive(Default)]
struct Queue {
    calls: VecDeque<Box<AgentCall>>,
    /// The stream is gone: nothing more is queued.
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a single map operation: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes its call from the pending map however the caller's wait ends
/// (answer, deadline, cancellation), so a late answer finds nothing.
struct Waiting<'a> {
    link: &'a Link,
    call_id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.link.pending).remove(&self.call_id);
    }
}

impl Link {
    /// Sends `call` and waits for its answer. The caller bounds the wait
    /// (its deadline); `timeout` tells the agent how long it has.
    pub async fn call(&self, call: agent_call::Call, timeout: Duration) -> Result<agent_answer::Answer, LinkError> {
        let call_id = self.next_call.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(call_id, tx);
        let _waiting = Waiting { link: self, call_id };
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let traceparent = hotfleet_obs::traces::current_traceparent();
        let message = Box::new(AgentCall { call_id, timeout_ms, call: Some(call), traceparent });
        let room = self.room.acquire().await.map_err(|_| LinkError::Closed)?;
        {
            let mut queue = lock(&self.queue);
            if queue.closed {
                return Err(LinkError::Closed);
            }
            queue.calls.push_back(message);
        }
        // Given back when the stream takes the call.
        room.forget();
        self.queued.notify_one();
        rx.await.map_err(|_| LinkError::Closed)
    }

    /// Hands an answer to the call waiting for it; false when no call waits
    /// (given up on, or an id this link never sent).
    pub fn answer(&self, answer: AgentAnswer) -> bool {
        let Some(body) = answer.answer else { return false };
        let Some(waiting) = lock(&self.pending).remove(&answer.call_id) else { return false };
        waiting.send(body).is_ok()
    }

    /// Calls waiting for an answer now.
    pub fn waiting(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Cancelled once this link's stream is to end (see the field).
    pub fn over(&self) -> CancellationToken {
        self.over.clone()
    }

    /// Queues nothing more, and fails the callers waiting for room and
    /// those whose call was queued but never sent.
    fn close_queue(&self) {
        let unsent: Vec<Box<AgentCall>> = {
            let mut queue = lock(&self.queue);
            queue.closed = true;
            queue.calls.drain(..).collect()
        };
        self.room.close();
        self.queued.notify_one();
        let mut pending = lock(&self.pending);
        for call in unsent {
            pending.remove(&call.call_id);
        }
    }
}

/// The calls of one link, in the order sent, for its agent's stream. Dropped
/// when the stream ends: calls not yet sent then fail at once.
pub struct Outgoing {
    link: Arc<Link>,
}

impl Outgoing {
    /// The next call; `None` once the link is closed.
    pub async fn recv(&mut self) -> Option<Box<AgentCall>> {
        loop {
            {
                let mut queue = lock(&self.link.queue);
                if let Some(call) = queue.calls.pop_front() {
                    drop(queue);
                    self.link.room.add_permits(1);
                    return Some(call);
                }
                if queue.closed {
                    return None;
                }
            }
            // A call queued since the check left a permit: no wake-up is lost.
            self.link.queued.notified().await;
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.link.close_queue();
    }
}

/// The links of the agents attached to this coordinator. Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct AgentLinks {
    links: Arc<Mutex<HashMap<String, Arc<Link>>>>,
    generations: Arc<AtomicU64>,
}

impl AgentLinks {
    pub fn new() -> Self {
        Self::default()
    }

    /// `node_id`'s link, if attached.
    pub fn get(&self, node_id: &str) -> Option<Arc<Link>> {
        lock(&self.links).get(node_id).cloned()
    }

    /// Attaches `node_id` for as long as `term` is not cancelled, replacing
    /// any earlier link (whose stream is then over). Returns the link and
    /// the calls to stream to the agent.
    pub fn attach(&self, node_id: &str, term: &CancellationToken) -> (Arc<Link>, Outgoing) {
        let link = Arc::new(Link {
            generation: self.generations.fetch_add(1, Ordering::Relaxed),
            over: term.child_token(),
            queue: Mutex::new(Queue::default()),
            room: Semaphore::new(QUEUED_CALLS),
            queued: Notify::new(),
            pending: Mutex::new(HashMap::new()),
            next_call: AtomicU64::new(0),
        });
        if let Some(earlier) = lock(&self.links).insert(node_id.to_string(), link.clone()) {
            earlier.over.cancel();
            fail_waiting(&earlier);
        }
        let outgoing = Outgoing { link: link.clone() };
        (link, outgoing)
    }

    /// The stream of `link` ended: forget it (unless a newer attachment
    /// already replaced it) and fail its waiting calls.
    pub fn detach(&self, node_id: &str, link: &Link) {
        let mut links = lock(&self.links);
        if links.get(node_id).is_some_and(|current| current.generation == link.generation) {
            links.remove(node_id);
        }
        drop(links);
        fail_waiting(link);
    }

    /// Agents attached now.
    pub fn len(&self) -> usize {
        lock(&self.links).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Dropping the senders wakes each waiting caller with [`LinkError::Closed`].
fn fail_waiting(link: &Link) {
    link.close_queue();
    lock(&link.pending).clear();
}

#[cfg(test)]
mod tests {
    use hotfleet_proto::v1::{CommitRequest, CommitResponse, HealthRequest};

    use super::*;

    fn commit() -> agent_call::Call {
        agent_call::Call::Commit(CommitRequest { header: None })
    }

    fn answered(call_id: u64) -> AgentAnswer {
        AgentAnswer {
            call_id,
            answer: Some(agent_answer::Answer::Commit(CommitResponse { ok: true, ..Default::default() })),
        }
    }

    #[tokio::test]
    async fn each_answer_reaches_the_call_it_names() {
        let links = AgentLinks::new();
        let (link, mut outgoing) = links.attach("n1", &CancellationToken::new());
        let agent = tokio::spawn(async move {
            let mut calls = Vec::new();
            for _ in 0..2 {
                calls.push(outgoing.recv().await.expect("a call"));
            }
            // Answered out of order.
            for call in calls.iter().rev() {
                let body = match call.call {
                    Some(agent_call::Call::Commit(_)) => answered(call.call_id),
                    _ => AgentAnswer {
                        call_id: call.call_id,
                        answer: Some(agent_answer::Answer::Health(Default::default())),
                    },
                };
                assert!(link.answer(body));
            }
            (link, calls)
        });
        let first = links.get("n1").expect("attached");
        let second = first.clone();
        let (a, b) = tokio::join!(
            first.call(commit(), Duration::from_secs(1)),
            second.call(agent_call::Call::Health(HealthRequest::default()), Duration::from_secs(1)),
        );
        assert!(matches!(a, Ok(agent_answer::Answer::Commit(_))), "{a:?}");
        assert!(matches!(b, Ok(agent_answer::Answer::Health(_))), "{b:?}");
        let (link, calls) = agent.await.expect("agent");
        assert_eq!(calls[0].timeout_ms, 1000, "the agent is told the deadline");
        assert_eq!(link.waiting(), 0);
    }

    #[tokio::test]
    async fn a_closed_stream_fails_the_waiting_calls_and_detaches() {
        let links = AgentLinks::new();
        let (link, mut outgoing) = links.attach("n1", &CancellationToken::new());
        let caller = {
            let link = link.clone();
            tokio::spawn(async move { link.call(commit(), Duration::from_secs(5)).await })
        };
        outgoing.recv().await.expect("sent");
        links.detach("n1", &link);
        assert_eq!(caller.await.expect("caller"), Err(LinkError::Closed));
        assert!(links.get("n1").is_none());
    }

    #[tokio::test]
    async fn a_full_queue_holds_callers_until_the_stream_takes_a_call_and_its_end_fails_them() {
        let links = AgentLinks::new();
        let (link, mut outgoing) = links.attach("n1", &CancellationToken::new());
        let callers: Vec<_> = (0..QUEUED_CALLS + 2)
            .map(|_| {
                let link = link.clone();
                tokio::spawn(async move { link.call(commit(), Duration::from_secs(5)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(lock(&link.queue).calls.len(), QUEUED_CALLS, "two callers wait for room");
        let taken = outgoing.recv().await.expect("a call");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(lock(&link.queue).calls.len(), QUEUED_CALLS, "taking one made room for one more");
        assert!(link.answer(answered(taken.call_id)));
        // The stream ends: every caller whose call was not sent fails at
        // once, queued or waiting for room, and so does a call made after.
        drop(outgoing);
        let mut answered_calls = 0;
        for caller in callers {
            match caller.await.expect("caller") {
                Ok(_) => answered_calls += 1,
                Err(e) => assert_eq!(e, LinkError::Closed),
            }
        }
        assert_eq!(answered_calls, 1);
        assert_eq!(link.call(commit(), Duration::from_secs(5)).await, Err(LinkError::Closed));
    }

    #[tokio::test]
    async fn answers_nobody_waits_for_are_dropped() {
        let links = AgentLinks::new();
        let (link, _outgoing) = links.attach("n1", &CancellationToken::new());
        assert!(!link.answer(answered(7)), "an id never sent");
        assert!(!link.answer(AgentAnswer { call_id: 1, answer: None }), "no body");
        // A call given up on (its caller's deadline) leaves nothing behind.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(20), link.call(commit(), Duration::from_secs(1))).await;
        assert!(gave_up.is_err());
        assert_eq!(link.waiting(), 0);
        assert!(!link.answer(answered(1)), "the late answer finds no caller");
    }

    #[tokio::test]
    async fn attaching_again_replaces_the_link_and_only_the_current_one_detaches() {
        let links = AgentLinks::new();
        let (old, _old_out) = links.attach("n1", &CancellationToken::new());
        let (new, _new_out) = links.attach("n1", &CancellationToken::new());
        assert!(old.over().is_cancelled(), "the old stream is told to end");
        assert!(!new.over().is_cancelled());
        links.detach("n1", &old);
        assert!(links.get("n1").is_some_and(|l| Arc::ptr_eq(&l, &new)), "the old stream's end keeps the new link");
        links.detach("n1", &new);
        assert!(links.is_empty());
    }
}
