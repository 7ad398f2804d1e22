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
//! A relay carries the agents it serves on one stream per connection
//! (`AgentGateway.AttachRelayed`, [`RelayedLinks`]): each of them is a link
//! like any other, its calls queued with the others of that stream and each
//! named by its node, so an agent there costs the leader a link rather than
//! an HTTP/2 stream with its tasks and buffers.
//!
//! A link lives as long as its attachment: the agent going away, the stream
//! breaking or the leader's term ending detaches it, and every call still
//! waiting on it fails at once as unreachable (the engine retries or rolls
//! back as it does for a lost reply: commands are idempotent per rollout,
//! and a stale one is fenced by its epoch). A node attaching again replaces
//! its earlier link.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use hotfleet_proto::v1::{agent_answer, agent_call, AgentAnswer, AgentCall, CallFailed};
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

/// One attached agent: its calls and the answers they wait for.
pub struct Link {
    node_id: Arc<str>,
    generation: u64,
    /// Cancelled when the agent's own stream is to end: the term it was
    /// opened under ended, or a newer attachment of the node replaced this
    /// one (rather than leaving it open and unused until the agent goes).
    over: CancellationToken,
    /// The stream its calls go down: the agent's own, or a relay's shared
    /// by many agents.
    outbox: Arc<Outbox>,
    /// Nothing more is sent: the link was replaced or detached.
    closed: AtomicBool,
    /// On a relay's shared stream rather than the agent's own.
    relayed: bool,
    /// Room left for this link's calls in the outbox: a caller beyond it waits.
    room: Semaphore,
    pending: Mutex<HashMap<u64, oneshot::Sender<agent_answer::Answer>>>,
    next_call: AtomicU64,
}

/// Calls not yet taken by a stream, in the order sent. A queue of its own
/// rather than a tokio channel: a channel allocates ~800 bytes up front (a
/// block of 32 slots, cache-padded ends), for as long as its agent stays
/// attached.
#[derive(Default)]
struct Outbox {
    queue: Mutex<OutQueue>,
    queued: Notify,
}

#[derive(Default)]
struct OutQueue {
    items: VecDeque<Outbound>,
    /// The stream is gone: nothing more is queued.
    closed: bool,
}

/// One item for a stream.
pub enum Outbound {
    /// A call for the link's agent (boxed: a call inline is several hundred
    /// bytes, and a queue keeps its capacity).
    Call(Arc<Link>, Box<AgentCall>),
    /// `node_id`'s attachment on this stream is over: replaced by a newer
    /// one (code 0) or refused. A relay ends that agent's stream with it.
    Ended { node_id: Arc<str>, why: CallFailed },
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

impl Outbox {
    /// Queues `item` unless the stream is gone.
    fn push(&self, item: Outbound) -> Result<(), LinkError> {
        {
            let mut queue = lock(&self.queue);
            if queue.closed {
                return Err(LinkError::Closed);
            }
            queue.items.push_back(item);
        }
        self.queued.notify_one();
        Ok(())
    }

    /// Queues nothing more, and closes the links whose calls were queued
    /// but never sent: those callers, and any waiting for room behind
    /// them, fail at once.
    fn close(&self) {
        let unsent: Vec<Outbound> = {
            let mut queue = lock(&self.queue);
            queue.closed = true;
            queue.items.drain(..).collect()
        };
        self.queued.notify_one();
        for item in unsent {
            if let Outbound::Call(link, _) = item {
                link.close();
            }
        }
    }
}

impl Link {
    /// The node this link attaches.
    pub fn node_id(&self) -> &Arc<str> {
        &self.node_id
    }

    /// Sends `call` and waits for its answer. The caller bounds the wait
    /// (its deadline); `timeout` tells the agent how long it has.
    pub async fn call(
        self: &Arc<Self>,
        call: agent_call::Call,
        timeout: Duration,
    ) -> Result<agent_answer::Answer, LinkError> {
        let call_id = self.next_call.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(call_id, tx);
        let _waiting = Waiting { link: self, call_id };
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let traceparent = hotfleet_obs::traces::current_traceparent();
        let message = Box::new(AgentCall { call_id, timeout_ms, call: Some(call), traceparent });
        let room = self.room.acquire().await.map_err(|_| LinkError::Closed)?;
        if self.closed.load(Ordering::Acquire) {
            return Err(LinkError::Closed);
        }
        self.outbox.push(Outbound::Call(self.clone(), message))?;
        // Given back when the stream takes the call.
        room.forget();
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

    /// Cancelled once this link's own stream is to end (see the field).
    pub fn over(&self) -> CancellationToken {
        self.over.clone()
    }

    /// Sends nothing more: fails the callers waiting for room and every
    /// call waiting for an answer (dropping the senders wakes each with
    /// [`LinkError::Closed`]).
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.room.close();
        lock(&self.pending).clear();
    }
}

/// The items of one stream, in the order sent: one agent's own, or every
/// agent a relay carries on it. Dropped when the stream ends: calls not
/// yet sent then fail at once.
pub struct Outgoing {
    outbox: Arc<Outbox>,
}

impl Outgoing {
    /// The next item; `None` once the stream is closed. A call of a link
    /// closed since it was queued is skipped (its caller has already failed).
    pub async fn recv(&mut self) -> Option<Outbound> {
        loop {
            {
                let mut queue = lock(&self.outbox.queue);
                while let Some(item) = queue.items.pop_front() {
                    if let Outbound::Call(link, _) = &item {
                        link.room.add_permits(1);
                        if link.closed.load(Ordering::Acquire) {
                            continue;
                        }
                    }
                    return Some(item);
                }
                if queue.closed {
                    return None;
                }
            }
            // A push since the check left a permit: no wake-up is lost.
            self.outbox.queued.notified().await;
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.outbox.close();
    }
}

/// The links of the agents attached to this coordinator. Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct AgentLinks {
    links: Arc<Mutex<HashMap<Arc<str>, Arc<Link>>>>,
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

    /// Attaches `node_id` on a stream of its own for as long as `term` is
    /// not cancelled, replacing any earlier link (whose stream is then
    /// over). Returns the link and the calls to stream to the agent.
    pub fn attach(&self, node_id: &str, term: &CancellationToken) -> (Arc<Link>, Outgoing) {
        let outbox = Arc::new(Outbox::default());
        let link = self.attach_to(node_id, term, &outbox, false);
        (link, Outgoing { outbox })
    }

    /// A stream a relay carries many agents' attachments on
    /// ([`RelayedLinks::attach`]).
    pub fn relayed(&self) -> (RelayedLinks, Outgoing) {
        let outbox = Arc::new(Outbox::default());
        (RelayedLinks { links: self.clone(), outbox: outbox.clone(), attached: HashMap::new() }, Outgoing { outbox })
    }

    fn attach_to(&self, node_id: &str, term: &CancellationToken, outbox: &Arc<Outbox>, relayed: bool) -> Arc<Link> {
        let node_id: Arc<str> = node_id.into();
        let link = Arc::new(Link {
            node_id: node_id.clone(),
            generation: self.generations.fetch_add(1, Ordering::Relaxed),
            over: term.child_token(),
            outbox: outbox.clone(),
            closed: AtomicBool::new(false),
            relayed,
            room: Semaphore::new(QUEUED_CALLS),
            pending: Mutex::new(HashMap::new()),
            next_call: AtomicU64::new(0),
        });
        if let Some(earlier) = lock(&self.links).insert(node_id, link.clone()) {
            earlier.close();
            earlier.over.cancel();
            // A relay carrying it ends that agent's stream; an agent's own
            // stream ends with `over`, and a closed one takes nothing more.
            let why = CallFailed { code: 0, message: "the node attached again elsewhere".into() };
            let _ = earlier.outbox.push(Outbound::Ended { node_id: earlier.node_id.clone(), why });
        }
        link
    }

    /// The stream of `link` ended: forget it (unless a newer attachment
    /// already replaced it) and fail its waiting calls.
    pub fn detach(&self, node_id: &str, link: &Link) {
        let mut links = lock(&self.links);
        if links.get(node_id).is_some_and(|current| current.generation == link.generation) {
            links.remove(node_id);
        }
        drop(links);
        link.close();
    }

    /// Agents attached now.
    pub fn len(&self) -> usize {
        lock(&self.links).len()
    }

    /// Agents attached now on their own streams, and on relays' streams.
    pub fn counts(&self) -> (usize, usize) {
        let links = lock(&self.links);
        let relayed = links.values().filter(|link| link.relayed).count();
        (links.len() - relayed, relayed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The agents a relay attached over one stream (`AgentGateway.AttachRelayed`):
/// each a [`Link`] like an agent on its own stream, their calls all going
/// down the relay's. Dropped when the stream ends: every agent still on it
/// is detached.
pub struct RelayedLinks {
    links: AgentLinks,
    outbox: Arc<Outbox>,
    attached: HashMap<Arc<str>, Arc<Link>>,
}

impl RelayedLinks {
    /// Attaches `node_id` on this stream for as long as `term` is not
    /// cancelled. The same node attaching again on it ends its earlier
    /// attachment first (its agent's stream to the relay was replaced).
    pub fn attach(&mut self, node_id: &str, term: &CancellationToken) {
        self.detach(node_id);
        let link = self.links.attach_to(node_id, term, &self.outbox, true);
        self.attached.insert(link.node_id.clone(), link);
    }

    /// Hands an answer of `node_id`'s agent to the call waiting for it;
    /// false when the node is not attached on this stream or no call waits.
    pub fn answer(&self, node_id: &str, answer: AgentAnswer) -> bool {
        self.attached.get(node_id).is_some_and(|link| link.answer(answer))
    }

    /// Tells the relay `node_id`'s agent may not attach, and why.
    pub fn refuse(&self, node_id: &str, status: &tonic::Status) {
        let why = CallFailed { code: status.code() as i32, message: status.message().to_string() };
        let _ = self.outbox.push(Outbound::Ended { node_id: node_id.into(), why });
    }

    /// `node_id`'s agent left the relay: its attachment is over.
    pub fn detach(&mut self, node_id: &str) {
        if let Some(link) = self.attached.remove(node_id) {
            self.links.detach(node_id, &link);
        }
    }

    /// Agents attached on this stream now.
    pub fn len(&self) -> usize {
        self.attached.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attached.is_empty()
    }
}

impl Drop for RelayedLinks {
    fn drop(&mut self) {
        for (node_id, link) in self.attached.drain() {
            self.links.detach(&node_id, &link);
        }
    }
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
                calls.push(sent_call(outgoing.recv().await));
            }
            // Answered out of order.
            for call in calls.iter().rev() {
                let body = match call.call {
                    Some(agent_call::Call::Commit(_)) => answered(call.call_id),
                    _ => health_answer(call.call_id),
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
        assert_eq!(lock(&link.outbox.queue).items.len(), QUEUED_CALLS, "two callers wait for room");
        let taken = sent_call(outgoing.recv().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(lock(&link.outbox.queue).items.len(), QUEUED_CALLS, "taking one made room for one more");
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

    fn sent_call(item: Option<Outbound>) -> Box<AgentCall> {
        match item {
            Some(Outbound::Call(_, call)) => call,
            _ => panic!("a call"),
        }
    }

    #[tokio::test]
    async fn a_refused_agent_is_named_down_the_relays_stream_and_nothing_is_attached() {
        let links = AgentLinks::new();
        let (relayed, mut outgoing) = links.relayed();
        relayed.refuse("n9", &tonic::Status::permission_denied("not yours"));
        match outgoing.recv().await {
            Some(Outbound::Ended { node_id, why }) => {
                assert_eq!(
                    (&*node_id, why.code, why.message.as_str()),
                    ("n9", tonic::Code::PermissionDenied as i32, "not yours")
                )
            }
            _ => panic!("the refusal"),
        }
        assert!(links.is_empty());
    }

    fn health_answer(call_id: u64) -> AgentAnswer {
        AgentAnswer { call_id, answer: Some(agent_answer::Answer::Health(Default::default())) }
    }

    #[tokio::test]
    async fn a_relays_stream_carries_each_agents_calls_and_routes_each_answer_to_its_node() {
        let links = AgentLinks::new();
        let term = CancellationToken::new();
        let (mut relayed, mut outgoing) = links.relayed();
        relayed.attach("n1", &term);
        relayed.attach("n2", &term);
        assert_eq!((links.len(), relayed.len()), (2, 2));
        let (_own_link, _own) = links.attach("n3", &term);
        assert_eq!(links.counts(), (1, 2), "one on its own stream, two on the relay's");
        let (n1, n2) = (links.get("n1").expect("n1"), links.get("n2").expect("n2"));
        let c1 = tokio::spawn(async move { n1.call(commit(), Duration::from_secs(1)).await });
        let c2 = tokio::spawn(async move {
            n2.call(agent_call::Call::Health(HealthRequest::default()), Duration::from_secs(1)).await
        });
        let mut sent = Vec::new();
        for _ in 0..2 {
            match outgoing.recv().await {
                Some(Outbound::Call(link, call)) => sent.push((link.node_id().to_string(), call.call_id)),
                _ => panic!("a call"),
            }
        }
        sent.sort();
        // Both links numbered their first call 1: only the node tells them apart.
        assert_eq!(sent, vec![("n1".to_string(), 1), ("n2".to_string(), 1)]);
        assert!(relayed.answer("n2", health_answer(1)));
        assert!(relayed.answer("n1", answered(1)));
        assert!(!relayed.answer("n3", answered(1)), "a node not on this stream");
        assert!(matches!(c1.await.expect("c1"), Ok(agent_answer::Answer::Commit(_))));
        assert!(matches!(c2.await.expect("c2"), Ok(agent_answer::Answer::Health(_))));
    }

    #[tokio::test]
    async fn a_relayed_agent_that_leaves_fails_its_calls_and_the_relays_end_detaches_the_rest() {
        let links = AgentLinks::new();
        let term = CancellationToken::new();
        let (mut relayed, mut outgoing) = links.relayed();
        relayed.attach("n1", &term);
        relayed.attach("n2", &term);
        let n1 = links.get("n1").expect("n1");
        let waiting = tokio::spawn(async move { n1.call(commit(), Duration::from_secs(5)).await });
        outgoing.recv().await.expect("sent");
        relayed.detach("n1");
        assert_eq!(waiting.await.expect("caller"), Err(LinkError::Closed));
        assert!(links.get("n1").is_none());
        assert!(links.get("n2").is_some(), "the other agent stays attached");
        let n2 = links.get("n2").expect("n2");
        drop((relayed, outgoing));
        assert!(links.is_empty(), "the relay's stream ended: every agent on it is detached");
        assert_eq!(n2.call(commit(), Duration::from_secs(5)).await, Err(LinkError::Closed));
    }

    #[tokio::test]
    async fn a_node_attaching_elsewhere_ends_its_relayed_attachment_and_its_unsent_calls_are_never_sent() {
        let links = AgentLinks::new();
        let term = CancellationToken::new();
        let (mut relayed, mut outgoing) = links.relayed();
        relayed.attach("n1", &term);
        let old = links.get("n1").expect("n1");
        let queued = {
            let old = old.clone();
            tokio::spawn(async move { old.call(commit(), Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The agent reached the leader another way (its own stream, another relay).
        let (_new, _own) = links.attach("n1", &term);
        assert_eq!(queued.await.expect("caller"), Err(LinkError::Closed));
        // The queued call is skipped, and the relay is told n1's attachment ended.
        match outgoing.recv().await {
            Some(Outbound::Ended { node_id, why }) => assert_eq!((&*node_id, why.code), ("n1", 0)),
            _ => panic!("the end of n1's attachment"),
        }
        // The relay's detach of its n1 then leaves the new link alone.
        relayed.detach("n1");
        assert!(links.get("n1").is_some_and(|l| !Arc::ptr_eq(&l, &old)));
    }

    #[tokio::test]
    async fn the_same_node_attaching_again_on_a_relays_stream_replaces_its_link_without_an_end() {
        let links = AgentLinks::new();
        let term = CancellationToken::new();
        let (mut relayed, mut outgoing) = links.relayed();
        relayed.attach("n1", &term);
        let first = links.get("n1").expect("n1");
        relayed.attach("n1", &term);
        let second = links.get("n1").expect("n1");
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(first.call(commit(), Duration::from_secs(1)).await, Err(LinkError::Closed));
        let call = {
            let second = second.clone();
            tokio::spawn(async move { second.call(commit(), Duration::from_secs(1)).await })
        };
        assert!(matches!(outgoing.recv().await, Some(Outbound::Call(..))), "the new link's call, and no end before it");
        assert!(relayed.answer("n1", answered(1)));
        assert!(call.await.expect("caller").is_ok());
    }
}
