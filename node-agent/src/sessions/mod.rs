//! Runtime sessions: one per game process connected on the local Unix socket.
//!
//! Each connection starts with the runtime's `hello`; a wrong protocol version
//! or garbage is refused with an `error` frame and the connection closed. After
//! the handshake a session task multiplexes the agent's requests (matched to
//! replies by id) and the runtime's own requests (the patch stack it must run
//! before serving). A runtime that disconnects fails every request in flight
//! with [`SessionError::Disconnected`]; nothing else on the node is affected.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hotfleet_proto::{
    local::{read_frame, write_frame, FrameError},
    v1::{runtime_frame::Body, Hello, ProtocolError, RuntimeFrame, Welcome},
    RUNTIME_PROTOCOL_VERSION,
};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;

use crate::{
    lock,
    runtime_socket::PeerPolicy,
    stacks::{self, PatchSources},
};

/// How long a new connection has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error("process {0} disconnected")]
    Disconnected(String),
    #[error("process {process} did not answer within {timeout:?}")]
    Timeout { process: String, timeout: Duration },
    #[error("process {process} answered with a protocol error: {message}")]
    Protocol { process: String, message: String },
    #[error("process {process} answered {what} with an unexpected message")]
    Unexpected { process: String, what: &'static str },
}

/// Serves the runtime's own requests (the patch stack for a late start).
pub trait StackProvider: Send + Sync + 'static {
    /// The patch stack of `build`, oldest first, or why it is unavailable
    /// (the session cuts it into frames with [`stacks::reply_bodies`]).
    fn stack_for(&self, build: String) -> futures::future::BoxFuture<'static, Result<Vec<PatchSources>, String>>;
}

/// What the agent knows about a connected process, kept fresh by replies.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    pub hello: Hello,
    pub patch_stack: Vec<String>,
}

/// Handle to one runtime session.
#[derive(Clone)]
pub struct Session {
    pub process_id: String,
    info: Arc<Mutex<ProcessInfo>>,
    outgoing: mpsc::Sender<RuntimeFrame>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Body>>>>,
    next_id: Arc<AtomicU64>,
    closed: CancellationToken,
    /// When the agent first asked something the runtime has not said a word
    /// since (None: the runtime spoke after the last request).
    asked_since: Arc<Mutex<Option<Instant>>>,
}

/// Removes a request's reply slot however the request ends, so a caller
/// that gives up (a heartbeat past its budget) leaves nothing behind.
struct PendingSlot<'a> {
    pending: &'a Mutex<HashMap<u64, oneshot::Sender<Body>>>,
    id: u64,
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.id);
    }
}

impl Session {
    pub fn info(&self) -> ProcessInfo {
        lock(&self.info).clone()
    }

    pub fn pid(&self) -> u32 {
        lock(&self.info).hello.pid
    }

    pub fn build(&self) -> String {
        lock(&self.info).hello.build.clone()
    }

    /// Records the patch stack a runtime reported after a commit or rollback.
    pub fn set_patch_stack(&self, stack: Vec<String>) {
        lock(&self.info).patch_stack = stack;
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Sends a request and waits for its reply.
    pub async fn request(&self, body: Body, timeout: Duration) -> Result<Body, SessionError> {
        self.request_after(Vec::new(), body, timeout).await
    }

    /// Sends `ahead` (the `source_part`s a prepare carries), each with the
    /// request's id, then the request, and waits for its reply.
    pub async fn request_after(&self, ahead: Vec<Body>, body: Body, timeout: Duration) -> Result<Body, SessionError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let _slot = PendingSlot { pending: &self.pending, id };
        let traceparent = hotfleet_obs::traces::current_traceparent();
        for body in ahead.into_iter().chain([body]) {
            // The runtime carries the current (runtime) span's context through.
            let frame = RuntimeFrame { id, reply_to: 0, traceparent: traceparent.clone(), body: Some(body) };
            if self.closed.is_cancelled() || self.outgoing.send(frame).await.is_err() {
                return Err(SessionError::Disconnected(self.process_id.clone()));
            }
        }
        lock(&self.asked_since).get_or_insert_with(Instant::now);
        let reply = tokio::select! {
            reply = rx => reply.map_err(|_| SessionError::Disconnected(self.process_id.clone())),
            _ = tokio::time::sleep(timeout) => Err(SessionError::Timeout { process: self.process_id.clone(), timeout }),
            _ = self.closed.cancelled() => Err(SessionError::Disconnected(self.process_id.clone())),
        };
        match reply? {
            Body::Error(ProtocolError { message, .. }) => {
                Err(SessionError::Protocol { process: self.process_id.clone(), message })
            }
            other => Ok(other),
        }
    }
}

/// Every connected session, by process id.
#[derive(Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<BTreeMap<String, Session>>>,
    /// Set by the first hello this agent accepted.
    ever_connected: Arc<AtomicBool>,
}

impl Sessions {
    /// Whether any runtime has completed its handshake since these sessions were made.
    pub fn ever_connected(&self) -> bool {
        self.ever_connected.load(Ordering::Relaxed)
    }

    pub fn list(&self) -> Vec<Session> {
        lock(&self.inner).values().filter(|s| !s.is_closed()).cloned().collect()
    }

    pub fn get(&self, process_id: &str) -> Option<Session> {
        lock(&self.inner).get(process_id).filter(|s| !s.is_closed()).cloned()
    }

    fn insert(&self, session: Session) -> Option<Session> {
        self.ever_connected.store(true, Ordering::Relaxed);
        lock(&self.inner).insert(session.process_id.clone(), session)
    }

    fn remove(&self, process_id: &str, session: &Session) {
        let mut map = lock(&self.inner);
        // A process that reconnected under the same id must not be removed by its old session.
        if map.get(process_id).is_some_and(|s| Arc::ptr_eq(&s.pending, &session.pending)) {
            map.remove(process_id);
        }
    }
}

/// Accepts runtime connections until `shutdown`, each only from a peer uid
/// `peers` allows (a refused one is told why and closed). A runtime that
/// says nothing for `idle_timeout` although asked (a silent client, a
/// stopped process) has its session closed; it reconnects once it runs again.
pub async fn serve(
    listener: UnixListener,
    sessions: Sessions,
    node_id: String,
    stacks: Arc<dyn StackProvider>,
    idle_timeout: Duration,
    peers: PeerPolicy,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                if let Err(refused) = peers.check(&stream) {
                    tracing::warn!(error = %refused, "runtime connection refused");
                    tokio::spawn(turn_away(stream, refused.to_string()));
                    continue;
                }
                let (sessions, node_id, stacks, shutdown) =
                    (sessions.clone(), node_id.clone(), stacks.clone(), shutdown.clone());
                tokio::spawn(
                    async move { run_connection(stream, sessions, node_id, stacks, idle_timeout, shutdown).await },
                );
            }
            Err(err) => {
                tracing::warn!(error = %err, "accepting a runtime connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn run_connection(
    stream: UnixStream,
    sessions: Sessions,
    node_id: String,
    stacks: Arc<dyn StackProvider>,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) {
    let (mut reader, mut writer) = stream.into_split();
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut reader)).await {
        Ok(Ok(Some(RuntimeFrame { id, body: Some(Body::Hello(hello)), .. }))) => (id, hello),
        Ok(Ok(None)) => return,
        Ok(Ok(Some(_))) => {
            tracing::warn!("runtime connection did not start with hello; refused");
            refuse(&mut writer, 0, "malformed", "the first frame must be hello").await;
            return;
        }
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "garbage on the runtime socket; connection refused");
            refuse(&mut writer, 0, "malformed", &err.to_string()).await;
            return;
        }
        Err(_) => {
            tracing::warn!("runtime connection sent no hello within {HELLO_TIMEOUT:?}; closed");
            return;
        }
    };
    let (hello_id, hello) = hello;
    if hello.protocol_version != RUNTIME_PROTOCOL_VERSION {
        tracing::warn!(
            pid = hello.pid,
            version = hello.protocol_version,
            "runtime speaks local protocol version {}, this agent speaks {RUNTIME_PROTOCOL_VERSION}; refused",
            hello.protocol_version
        );
        let message = format!(
            "this agent speaks local protocol version {RUNTIME_PROTOCOL_VERSION}, the runtime speaks {}: upgrade the older side",
            hello.protocol_version
        );
        refuse(&mut writer, hello_id, "version", &message).await;
        return;
    }
    if hello.process_id.is_empty() {
        refuse(&mut writer, hello_id, "malformed", "hello without a process id").await;
        return;
    }
    let welcome = RuntimeFrame {
        id: 0,
        reply_to: hello_id,
        traceparent: String::new(),
        body: Some(Body::Welcome(Welcome {
            protocol_version: RUNTIME_PROTOCOL_VERSION,
            node_id,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        })),
    };
    if write_frame(&mut writer, &welcome).await.is_err() {
        return;
    }

    let (outgoing, mut outgoing_rx) = mpsc::channel::<RuntimeFrame>(64);
    let closed = shutdown.child_token();
    let session = Session {
        process_id: hello.process_id.clone(),
        info: Arc::new(Mutex::new(ProcessInfo { patch_stack: hello.patch_stack.clone(), hello: hello.clone() })),
        outgoing: outgoing.clone(),
        pending: Arc::default(),
        next_id: Arc::new(AtomicU64::new(1)),
        closed: closed.clone(),
        asked_since: Arc::default(),
    };
    if let Some(old) = sessions.insert(session.clone()) {
        old.closed.cancel();
    }
    tracing::info!(process = %hello.process_id, pid = hello.pid, build = %hello.build, stack = ?hello.patch_stack, "runtime connected");

    let writer_closed = closed.clone();
    let writer_task = tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                frame = outgoing_rx.recv() => frame,
                _ = writer_closed.cancelled() => None,
            };
            let Some(frame) = frame else { break };
            if let Err(err) = write_frame(&mut writer, &frame).await {
                tracing::warn!(error = %err, "writing to a runtime failed");
                writer_closed.cancel();
                break;
            }
        }
    });

    let mut idle_check = tokio::time::interval((idle_timeout / 4).max(Duration::from_millis(10)));
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut reader) => frame,
            _ = closed.cancelled() => break,
            _ = idle_check.tick() => {
                let silent_for = lock(&session.asked_since).map(|asked| asked.elapsed());
                if silent_for.is_some_and(|silent| silent > idle_timeout) {
                    tracing::warn!(process = %session.process_id, pid = session.pid(), ?idle_timeout, "runtime silent although asked; closing its session (it reconnects once it runs again)");
                    break;
                }
                continue;
            }
        };
        // Any word from the runtime shows it is not stuck.
        *lock(&session.asked_since) = None;
        match frame {
            Ok(None) => break,
            Ok(Some(frame)) if frame.reply_to != 0 => {
                let waiter = lock(&session.pending).remove(&frame.reply_to);
                match (waiter, frame.body) {
                    (Some(waiter), Some(body)) => {
                        let _ = waiter.send(body);
                    }
                    (Some(waiter), None) => {
                        let _ = waiter.send(Body::Error(ProtocolError {
                            message: "reply without a body".into(),
                            code: "malformed".into(),
                        }));
                    }
                    (None, _) => tracing::debug!(process = %session.process_id, "late reply ignored"),
                }
            }
            Ok(Some(RuntimeFrame { id, body: Some(Body::StackQuery(query)), .. })) => {
                let (stacks, outgoing) = (stacks.clone(), outgoing.clone());
                tokio::spawn(async move {
                    // One piece per frame, the end marker last: the frames of one
                    // sender keep their order on the channel.
                    for body in stacks::reply_bodies(stacks.stack_for(query.build).await) {
                        if outgoing
                            .send(RuntimeFrame { id: 0, reply_to: id, traceparent: String::new(), body: Some(body) })
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
            Ok(Some(frame)) => {
                tracing::warn!(process = %session.process_id, "runtime sent an unexpected request; answered with an error");
                let _ = outgoing.send(error_frame(frame.id, "unknown", "the agent does not serve this request")).await;
            }
            Err(err) if err.is_recoverable() => {
                tracing::warn!(process = %session.process_id, error = %err, "malformed frame from runtime; answered with an error");
                let _ = outgoing.send(error_frame(0, "malformed", &err.to_string())).await;
            }
            Err(err) => {
                log_fatal(&session.process_id, &err);
                break;
            }
        }
    }
    closed.cancel();
    let _ = writer_task.await;
    sessions.remove(&session.process_id, &session);
    lock(&session.pending).clear();
    tracing::info!(process = %session.process_id, pid = session.pid(), "runtime disconnected");
}

fn log_fatal(process: &str, err: &FrameError) {
    tracing::warn!(process = %process, error = %err, "runtime connection broken; closing it");
}

fn error_frame(reply_to: u64, code: &str, message: &str) -> RuntimeFrame {
    RuntimeFrame {
        id: 0,
        reply_to,
        traceparent: String::new(),
        body: Some(Body::Error(ProtocolError { message: message.to_string(), code: code.to_string() })),
    }
}

/// Tells a refused peer why (briefly: it is not trusted) and closes.
async fn turn_away(mut stream: UnixStream, message: String) {
    let frame = error_frame(0, "forbidden", &message);
    let _ = tokio::time::timeout(Duration::from_secs(1), write_frame(&mut stream, &frame)).await;
}

async fn refuse(writer: &mut tokio::net::unix::OwnedWriteHalf, reply_to: u64, code: &str, message: &str) {
    let _ = write_frame(writer, &error_frame(reply_to, code, message)).await;
}

#[cfg(test)]
mod tests;
