//! The accept side of hotfleet's gRPC servers (coordinator and agent):
//! a bounded number of connections, and a deadline for each new connection
//! to send its first bytes.
//!
//! Why here and not in tonic's builder: tonic bounds requests, not sockets.
//! A peer that opens TCP connections and sends nothing (or drips its HTTP/2
//! preface a byte at a time) holds a file descriptor and a hyper task each,
//! for ever; 1,100 of them once made a coordinator unreachable. So:
//!
//! - **Handshake deadline**: a connection must deliver [`FIRST_BYTES`] bytes
//!   (the HTTP/2 client preface, or more than that of a TLS ClientHello)
//!   within the handshake timeout, else its reads fail and it is closed.
//! - **Maximum connections**: at the limit, a new connection evicts the
//!   oldest one that has not sent its first bytes yet (an idle flood cannot
//!   lock real clients out: each newcomer takes the place of an idler); if
//!   every open connection is established, the newcomer is closed at once.
//! - Accept errors (EMFILE) pause accepting briefly instead of spinning.
//!
//! What it does not stop: a peer that completes the handshake and then stays
//! idle (HTTP/2 keepalive pings, set on the tonic builder, close dead peers,
//! not live idle ones), and floods larger than the kernel's accept backlog.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{ready, Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::Sleep,
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes a new connection must send within the handshake timeout: the
/// length of the HTTP/2 client preface (`PRI * HTTP/2.0...`).
pub const FIRST_BYTES: usize = 24;

/// How long accepting pauses after an accept error (out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The accept-side limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

/// Open connections, and which of them have not sent their first bytes.
#[derive(Debug)]
struct Gate {
    max: usize,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    next_id: u64,
    open: usize,
    /// Connections still in their handshake, oldest first (ids grow).
    waiting: BTreeMap<u64, CancellationToken>,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // Every update is a few plain assignments: a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection, evicting the oldest one still in its
    /// handshake if the gate is full; `None` if every open one is established.
    fn admit(self: &Arc<Self>) -> Option<Ticket> {
        let mut state = self.lock();
        if state.open >= self.max {
            let (_, oldest) = state.waiting.pop_first()?;
            // Counted out now; its ticket sees the cancellation and does not
            // count itself out again.
            oldest.cancel();
            state.open -= 1;
        }
        state.open += 1;
        let id = state.next_id;
        state.next_id += 1;
        let evicted = CancellationToken::new();
        state.waiting.insert(id, evicted.clone());
        Some(Ticket { gate: self.clone(), id, evicted })
    }

    /// Open connections (diagnostics and tests).
    fn open(&self) -> usize {
        self.lock().open
    }
}

/// A connection's place in the [`Gate`], given back when it closes.
#[derive(Debug)]
struct Ticket {
    gate: Arc<Gate>,
    id: u64,
    evicted: CancellationToken,
}

impl Ticket {
    /// The first bytes arrived: never evicted from now on.
    fn established(&self) {
        self.gate.lock().waiting.remove(&self.id);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.waiting.remove(&self.id);
        if !self.evicted.is_cancelled() {
            state.open -= 1;
        }
    }
}

/// What a connection in its handshake waits on.
struct Handshake {
    deadline: Pin<Box<Sleep>>,
    evicted: Pin<Box<WaitForCancellationFutureOwned>>,
    seen: usize,
    timeout: Duration,
}

/// An accepted TCP connection under the limits: reads fail once the
/// handshake deadline passes (or the connection is evicted) before its first
/// bytes arrived, which makes the server close it.
pub struct LimitedConn {
    io: TcpStream,
    ticket: Ticket,
    handshake: Option<Handshake>,
}

impl LimitedConn {
    fn new(io: TcpStream, ticket: Ticket, timeout: Duration) -> Self {
        let evicted = Box::pin(ticket.evicted.clone().cancelled_owned());
        let deadline = Box::pin(tokio::time::sleep(timeout));
        Self { io, ticket, handshake: Some(Handshake { deadline, evicted, seen: 0, timeout }) }
    }
}

impl AsyncRead for LimitedConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(h) = &mut this.handshake {
            if h.evicted.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "closed: the connection limit was reached and this connection had sent nothing",
                )));
            }
            if h.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("closed: no handshake within {:?}", h.timeout),
                )));
            }
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if let Some(h) = &mut this.handshake {
            h.seen += buf.filled().len() - before;
            if h.seen >= FIRST_BYTES {
                this.handshake = None;
                this.ticket.established();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for LimitedConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for LimitedConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

/// The connections `listener` accepts, under `limits`: what a tonic server's
/// `serve_with_incoming_shutdown` takes.
pub struct Incoming {
    listener: TcpListener,
    gate: Arc<Gate>,
    limits: ConnLimits,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    pub fn new(listener: TcpListener, limits: ConnLimits) -> Self {
        let gate = Arc::new(Gate { max: limits.max_connections.max(1), state: Mutex::default() });
        Self { listener, gate, limits, backoff: None }
    }

    /// Connections open now (tests).
    pub fn counter(&self) -> impl Fn() -> usize + Send + Sync + 'static {
        let gate = self.gate.clone();
        move || gate.open()
    }
}

impl Stream for Incoming {
    type Item = io::Result<LimitedConn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(backoff) = &mut this.backoff {
                ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, peer)) => match this.gate.admit() {
                    Some(ticket) => {
                        let _ = stream.set_nodelay(true);
                        return Poll::Ready(Some(Ok(LimitedConn::new(stream, ticket, this.limits.handshake_timeout))));
                    }
                    None => {
                        tracing::warn!(%peer, max = this.gate.max, "connection refused: every connection slot is in use");
                        drop(stream);
                    }
                },
                Err(err) => {
                    // Out of descriptors (or a connection reset before accept):
                    // try again shortly rather than spin on the same error.
                    tracing::warn!(error = %err, "accept failed; pausing accepts for {ACCEPT_BACKOFF:?}");
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
            }
        }
    }
}

/// `requested` connections, or fewer if the open-files limit (raised to its
/// hard limit first) cannot hold them beside `reserved` other descriptors;
/// a lowered figure is logged with how to raise it.
#[cfg(unix)]
pub fn fit_max_connections(requested: usize, reserved: u64) -> usize {
    match raise_nofile_limit() {
        Ok(soft) if (requested as u64).saturating_add(reserved) > soft => {
            let fitting = soft.saturating_sub(reserved).max(1) as usize;
            tracing::warn!(
                requested,
                open_files_limit = soft,
                max_connections = fitting,
                "--max-connections lowered to fit the open-files limit (raise `ulimit -Hn` for more)"
            );
            fitting
        }
        Ok(_) => requested,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read or raise the open-files limit");
            requested
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit, so
/// `--max-connections` is not cut short by a low default (often 1024).
/// Returns the soft limit now in force.
#[cfg(unix)]
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every unix
    Ok(limit.rlim_cur as u64)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn serve(limits: ConnLimits) -> (std::net::SocketAddr, impl Fn() -> usize) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let incoming = Incoming::new(listener, limits);
        let open = incoming.counter();
        // An echo server: whatever a connection sends comes back.
        tokio::spawn(incoming.for_each(|conn| async move {
            let Ok(mut conn) = conn else { return };
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }));
        (addr, open)
    }

    /// Reads until EOF or error; true if the peer closed within `limit`.
    async fn closed_within(conn: &mut TcpStream, limit: Duration) -> bool {
        let mut buf = [0u8; 64];
        let until = Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(until.into(), conn.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn silent_and_dripping_connections_are_closed_at_the_handshake_deadline() {
        let limits = ConnLimits { max_connections: 16, handshake_timeout: Duration::from_millis(300) };
        let (addr, open) = serve(limits).await;
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        assert!(closed_within(&mut silent, Duration::from_secs(2)).await, "a silent connection is closed");

        let mut drip = TcpStream::connect(addr).await.expect("connect");
        let started = Instant::now();
        for byte in b"PRI * HTTP/2.0\r\n" {
            if drip.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(closed_within(&mut drip, Duration::from_secs(2)).await, "a dripped preface is closed");
        assert!(started.elapsed() < Duration::from_secs(2));

        let mut fast = TcpStream::connect(addr).await.expect("connect");
        fast.write_all(&[b'x'; FIRST_BYTES]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(500)).await;
        fast.write_all(b"still here").await.expect("write");
        let mut buf = vec![0u8; FIRST_BYTES + 10];
        fast.read_exact(&mut buf).await.expect("echo after the deadline: established");
        drop((silent, drip));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(open(), 1, "closed connections give their place back");
    }

    #[tokio::test]
    async fn at_the_limit_idlers_make_room_and_established_connections_stay() {
        let limits = ConnLimits { max_connections: 4, handshake_timeout: Duration::from_secs(30) };
        let (addr, open) = serve(limits).await;
        let mut established = Vec::new();
        for _ in 0..2 {
            let mut conn = TcpStream::connect(addr).await.expect("connect");
            conn.write_all(&[b'x'; FIRST_BYTES]).await.expect("write");
            let mut buf = [0u8; FIRST_BYTES];
            conn.read_exact(&mut buf).await.expect("echo");
            established.push(conn);
        }
        let mut idlers = Vec::new();
        for _ in 0..20 {
            idlers.push(TcpStream::connect(addr).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(open() <= 4, "{} open", open());
        // A real client still gets in, and the established ones still answer.
        let mut late = TcpStream::connect(addr).await.expect("connect");
        late.write_all(&[b'y'; FIRST_BYTES]).await.expect("write");
        let mut buf = [0u8; FIRST_BYTES];
        late.read_exact(&mut buf).await.expect("the late client is served");
        for conn in &mut established {
            conn.write_all(b"ping").await.expect("write");
            let mut buf = [0u8; 4];
            conn.read_exact(&mut buf).await.expect("established connections are never evicted");
        }
        assert!(closed_within(&mut idlers[0], Duration::from_secs(1)).await, "the oldest idler made room");
    }
}
