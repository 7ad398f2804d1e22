"""The runtime's side of the local protocol: a link from this game process to hotfleet-agent.

``rt.connect()`` starts an :class:`AgentLink`: a daemon thread that connects to the agent's
Unix socket (``socket_path`` or ``$HOTFLEET_AGENT_SOCKET``), introduces the process with a
``hello`` and then serves the agent's requests. The frames and their codec are in
:mod:`hotfleet.frames` (re-exported here); this module owns the connection and the threads.

Who runs what, and why:

* The link thread reads frames, runs ``rt.prepare`` (compiling and staging touch nothing
  live, so they may run off the game thread), answers health and status queries, and
  writes every frame. It never touches game state.
* Commits and rollbacks go through ``rt.request_commit`` / ``rt.request_rollback``: the
  game thread applies them at its next ``safe_point()``. The link does not wait for them
  on its own thread: the future's done-callback (which runs on the game thread) only
  queues the result and wakes the link thread, so the game never writes to a socket and
  a slow or stuck agent can never block a tick. Meanwhile the link keeps answering
  health queries, so the agent can watch a commit that takes a while to reach a tick.
* The link survives anything the agent does: an absent agent, a restart, garbage, a
  closed socket. It reconnects with capped exponential backoff and says so in the log
  (``hotfleet.agent_link``), throttled so a missing agent does not flood it. The one
  thing it does not retry is a refusal of its protocol version: that will not get better.
* The build's patch stack (:mod:`hotfleet.stack_sync`) is fetched through the link but
  applied elsewhere: by a small thread of its own that queues the commits for the game's
  safe points (``sync_stack``, what ``rt.connect()`` asks for), or by ``sync_patch_stack()``
  on the calling thread. The link thread never waits for a commit.
* Sources arrive in pieces (``sourcePart`` frames, :mod:`hotfleet.parts`) ahead of the
  ``prepare`` or ``stackReply`` they belong to; the link joins them before either is served.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import platform
import secrets
import selectors
import socket
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Tuple, Union

from .errors import CommitError, FrameError, FramingError, HandshakeRefused, HotfleetError, RollbackError
from .frames import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    FrameReader,
    decode_frame,
    decode_frame_traced,
    detail_json,
    encode_frame,
    error_detail_json,
    finite,
    get_field,
    parse_uint,
    require_modules,
    require_str,
    uint,
)
from .parts import SourceParts, fill_prepare, fill_stack_reply
from .revert import revert_id
from .stack_sync import StackPatch, StackSync

if TYPE_CHECKING:  # annotations only: the runtime imports this module lazily
    from . import Runtime

__all__ = [
    "AgentLink",
    "PROTOCOL_VERSION",
    "MAX_FRAME",
    "ENV_SOCKET",
    "ENV_BUILD",
    "FrameError",
    "FramingError",
    "FrameReader",
    "encode_frame",
    "decode_frame",
    "decode_frame_traced",
]

log = logging.getLogger("hotfleet.agent_link")

#: Environment variable naming the agent's socket.
ENV_SOCKET = "HOTFLEET_AGENT_SOCKET"
#: Environment variable naming this game server's build (the patch target).
ENV_BUILD = "HOTFLEET_BUILD"


class _Completion:
    """A commit or rollback future that finished; the link thread turns it into a reply."""

    __slots__ = ("session", "frame_id", "kind", "future", "started", "patch_id", "revert")

    def __init__(self, session: int, frame_id: int, kind: str, future: "Future[Any]",
                 started: float, patch_id: str, revert: bool = False) -> None:
        self.session = session
        self.frame_id = frame_id
        self.kind = kind
        self.future = future
        self.started = started
        self.patch_id = patch_id
        self.revert = revert  # the commit or undo of a revert of patch_id


class AgentLink:
    """A background connection from this process's runtime to the local hotfleet-agent.

    ``runtime`` is the process's ``hotfleet.Runtime``. ``socket_path`` defaults to
    ``$HOTFLEET_AGENT_SOCKET``; ``build`` (the game build the agent matches patches
    against) to ``$HOTFLEET_BUILD`` or ``"dev"``. Nothing happens until :meth:`start`.
    With ``sync_stack`` (what ``rt.connect()`` passes) a second thread applies the build's
    patch stack once connected (see :mod:`hotfleet.stack_sync`); ``sync_timeout`` bounds
    each fetch of the stack, ``sync_retry`` is the first pause after a failed round.
    """

    def __init__(
        self,
        runtime: "Runtime",
        socket_path: Optional[str] = None,
        *,
        build: Optional[str] = None,
        connect_timeout: float = 5.0,
        handshake_timeout: float = 10.0,
        io_timeout: float = 30.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        sync_stack: bool = False,
        sync_timeout: float = 30.0,
        sync_retry: float = 1.0,
    ) -> None:
        path = socket_path or os.environ.get(ENV_SOCKET)
        if not path:
            raise HotfleetError(f"no hotfleet-agent socket: pass socket_path or set {ENV_SOCKET}")
        self._rt = runtime
        #: Where the agent listens.
        self.socket_path: str = os.fspath(path)
        #: The build id reported in ``hello``.
        self.build: str = build or os.environ.get(ENV_BUILD) or "dev"
        #: ``"<pid>-<random>"``: stable across reconnects, so the agent recognizes a
        #: process that comes back and tells it apart from a new one with a reused pid.
        self.process_id: str = f"{os.getpid()}-{secrets.token_hex(4)}"
        #: Why the agent refused this runtime for good (None unless it did).
        self.refused: Optional[str] = None
        #: The agent's last ``welcome`` body.
        self.welcome: Optional[Dict[str, Any]] = None
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._io_timeout = io_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._sync_stack = sync_stack
        self._sync_timeout = sync_timeout
        self._sync_retry = sync_retry
        self._sync = StackSync(runtime, self._fetch_stack)
        self._parts = SourceParts()  # pieces of sources ahead of a prepare or stackReply (link thread)

        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()  # guards _pending, _outbox, _sock, _session
        self._ids = itertools.count(1)
        self._sock: Optional[socket.socket] = None
        self._session = 0  # bumped per connection; stale completions are not replied
        self._pending: Dict[int, "Future[Tuple[str, Dict[str, Any]]]"] = {}
        self._outbox: Deque[Dict[str, Any]] = collections.deque()
        self._completions: Deque[_Completion] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Owned by the link thread only:
        self._inflight: Dict[str, "Future[Any]"] = {}
        self._early: List[bytes] = []  # frames that arrived in the same read as the welcome
        self._current: Optional[Tuple[socket.socket, int]] = None  # (socket, session) being served
        # request id -> the agent's traceparent, until that request is answered
        self._traces: Dict[int, str] = {}
        self._handlers: Dict[str, Callable[[int, Dict[str, Any]], None]] = {
            "prepare": self._on_prepare,
            "commit": self._on_commit,
            "abort": self._on_abort,
            "rollback": self._on_rollback,
            "healthQuery": self._on_health_query,
            "statusQuery": self._on_status_query,
        }

    # -- public API ------------------------------------------------------------------

    def start(self) -> "AgentLink":
        """Start the background thread (idempotent); returns self."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hotfleet-agent-link", daemon=True)
                self._thread.start()
                if self._sync_stack:
                    threading.Thread(target=self._sync_loop, name="hotfleet-stack-sync", daemon=True).start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the connection and end the thread. Pending requests fail with HotfleetError."""
        self._stop.set()
        self._wake()
        self._sync.kick()
        with self._lock:
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if not thread.is_alive():
                self._wake_r.close()
                self._wake_w.close()

    @property
    def connected(self) -> bool:
        """True between the agent's ``welcome`` and the connection's end."""
        return self._connected.is_set()

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Wait until the agent welcomed this runtime; False on timeout, refusal or stop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._connected.is_set():
                return True
            if self.refused is not None or self._stop.is_set():
                return False
            remaining = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if remaining <= 0:
                return False
            self._connected.wait(remaining)

    @property
    def current(self) -> bool:
        """True once this process ran every patch of its build's stack (see stack_sync)."""
        return self._sync.current

    def wait_until_current(self, timeout: Optional[float] = None) -> bool:
        """Wait until the build's patch stack is applied; False on timeout, refusal or stop.
        On the game thread (or before the game loop) it runs the safe points meanwhile."""
        return self._sync.wait(timeout, lambda: self.refused is not None or self._stop.is_set())

    def sync_patch_stack(self, timeout: float = 10.0) -> List[str]:
        """Fetch the fleet's committed patch stack and apply what this process lacks.

        For a process that starts while patches are committed fleet-wide: call it on the
        game's thread before serving players (``rt.connect()`` does the same by itself;
        ``rt.wait_until_current()`` waits for it). Sends ``stackQuery``, and for every patch
        of the ``stackReply`` (oldest first) not already in ``rt.patch_stack``, prepares and
        commits it on the calling thread. Returns the ids applied, in order. On a link that
        syncs by itself (``rt.connect()``) it waits for that sync instead, running the safe
        points its commits need, and returns what it applied.

        Raises HotfleetError if the agent is not reachable, does not answer within
        ``timeout`` seconds, refuses, or a patch fails to prepare or commit. Patches
        applied before the failure stay applied (each commit is atomic; the error lists
        them); a process in that state should not serve players.
        """
        deadline = time.monotonic() + timeout
        if not self.wait_connected(timeout):
            why = f" (refused: {self.refused})" if self.refused else ""
            raise HotfleetError(f"patch stack sync: no connection to hotfleet-agent at {self.socket_path} "
                                f"within {timeout:g}s{why}")
        if self._sync_stack:  # the link syncs by itself: wait for that rather than ask twice
            return self._sync.join(timeout, self._stop.is_set, deadline)
        return self._sync.run_here(timeout, deadline)

    def _fetch_stack(self, within: float, timeout: float) -> List[StackPatch]:
        """Ask the agent for this build's patch stack (oldest first) within ``within`` s;
        errors name ``timeout``, the caller's whole budget."""
        future = self._request("stackQuery", {"build": self.build})
        try:
            kind, body = future.result(within)
        except FutureTimeout:
            with self._lock:
                self._pending = {k: v for k, v in self._pending.items() if v is not future}
            raise HotfleetError(f"patch stack sync: hotfleet-agent did not answer within {timeout:g}s") from None
        except HotfleetError as exc:
            raise HotfleetError(f"patch stack sync: {exc}") from None
        if kind == "error":
            raise HotfleetError(f"patch stack sync: hotfleet-agent refused: {get_field(body, 'message', '')} "
                                f"(code {get_field(body, 'code', '')!r})")
        if kind != "stackReply":
            raise HotfleetError(f"patch stack sync: expected stackReply, the agent sent {kind}")
        patches = get_field(body, "patches", None) or []
        if not isinstance(patches, list):
            raise HotfleetError("patch stack sync: stackReply.patches is not a list")
        wanted: List[StackPatch] = []
        for index, patch in enumerate(patches):
            if not isinstance(patch, dict):
                raise HotfleetError(f"patch stack sync: patch #{index} is not an object")
            try:
                wanted.append((require_str(patch, "patchId"), require_modules(patch)))
            except FrameError as exc:
                raise HotfleetError(f"patch stack sync: patch #{index}: {exc}") from None
        return wanted

    def _sync_loop(self) -> None:
        """The automatic sync (``sync_stack``): a round once connected, retried until one
        succeeds (the agent may not reach its coordinator yet); then this thread ends."""
        delay = self._sync_retry
        stopped = self._stop.is_set
        while not stopped():
            if not self.wait_connected(1.0):
                if self.refused is not None:
                    return
                continue
            try:
                applied = self._sync.run_queued(self._sync_timeout, stopped)
            except Exception as exc:  # never let this thread die: the process must get current
                if stopped():
                    return
                if isinstance(exc, HotfleetError):
                    log.warning("%s; retrying in %.1fs", exc, delay)
                else:
                    log.exception("patch stack sync failed unexpectedly; retrying in %.1fs", delay)
                self._sync.pause(delay)
                delay = min(delay * 2, self._backoff_max * 6)
                continue
            log.info("process is current with build %s's patch stack (%d applied: %s)",
                     self.build, len(applied), ", ".join(applied) or "none")
            return

    # -- plumbing shared with other threads --------------------------------------------

    def _next_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # buffer full (a wake-up is already pending) or closed
            pass

    def _request(self, kind: str, body: Dict[str, Any]) -> "Future[Tuple[str, Dict[str, Any]]]":
        """Send a request to the agent from any thread; the future gets ``(kind, body)`` of the reply."""
        future: "Future[Tuple[str, Dict[str, Any]]]" = Future()
        with self._lock:
            if not self._connected.is_set():
                future.set_exception(HotfleetError("not connected to hotfleet-agent"))
                return future
            frame_id = next(self._ids)
            self._pending[frame_id] = future
            self._outbox.append({"id": frame_id, kind: body})
        self._wake()
        return future

    def _stack_ids(self) -> List[str]:
        return [str(entry.id) for entry in self._rt.patch_stack]

    def _abort_prepared(self, patch_id: str) -> Tuple[bool, Optional[Exception]]:
        """Abort ``patch_id`` if the runtime holds it prepared (whoever prepared it: the
        agent, or an operator's console in-process). Returns (was prepared, abort error)."""
        txn = self._rt.prepared(patch_id)
        if txn is None:
            return False, None
        try:
            txn.abort()
        except Exception as exc:  # dropping a staging area should not fail; say so if it does
            log.exception("abort of %s failed", patch_id)
            return True, exc
        return True, None

    def _pending_id(self) -> str:
        """Id of the prepared, uncommitted transaction, as the runtime knows it."""
        pending = self._rt.pending
        return str(pending.id) if pending is not None else ""

    # -- the link thread -----------------------------------------------------------------

    def _run(self) -> None:
        delay = self._backoff_initial
        failures = 0
        last_report = 0.0
        while not self._stop.is_set():
            try:
                sock = self._open()
            except OSError as exc:
                failures += 1
                now = time.monotonic()
                if failures == 1:
                    log.warning("hotfleet-agent not reachable at %s (%s); retrying in the background",
                                self.socket_path, exc)
                    last_report = now
                elif now - last_report >= 60.0:
                    log.info("hotfleet-agent still not reachable at %s after %d attempts (%s)",
                             self.socket_path, failures, exc)
                    last_report = now
                else:
                    log.debug("connect to %s failed: %s", self.socket_path, exc)
                self._sleep(delay)
                delay = min(delay * 2, self._backoff_max)
                continue
            failures = 0
            established = False
            try:
                established = self._serve(sock)
            except HandshakeRefused as exc:
                if exc.permanent:
                    self.refused = str(exc)
                    log.error("hotfleet-agent at %s refused this runtime: %s; not retrying "
                              "(upgrade the runtime or the agent so their protocol versions match)",
                              self.socket_path, exc)
                    break
                log.error("hotfleet-agent at %s refused this runtime: %s; retrying", self.socket_path, exc)
            except (OSError, FramingError, FrameError) as exc:
                if not self._stop.is_set():
                    log.warning("connection to hotfleet-agent lost: %s; reconnecting", exc)
            except Exception:  # never let the link thread die: the process must stay patchable
                log.exception("agent link failed unexpectedly; reconnecting")
            finally:
                self._disconnect(sock)
            if established:
                delay = self._backoff_initial
            self._sleep(delay)
            delay = min(delay * 2, self._backoff_max)
        self._connected.clear()
        log.debug("agent link thread stopped")

    def _sleep(self, seconds: float) -> None:
        # A little jitter so a host's worth of processes do not reconnect in lockstep.
        self._stop.wait(seconds * (0.8 + 0.4 * secrets.randbelow(1000) / 1000))

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._connect_timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _disconnect(self, sock: socket.socket) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        with self._lock:
            self._sock = None
            self._session += 1
            pending, self._pending = self._pending, {}
            self._outbox.clear()
        self._parts.clear()
        self._traces.clear()
        for future in pending.values():
            if not future.done():
                future.set_exception(HotfleetError("connection to hotfleet-agent lost before it answered"))
        try:
            sock.close()
        except OSError:
            pass
        if was_connected and not self._stop.is_set():
            log.info("disconnected from hotfleet-agent at %s", self.socket_path)

    def _send(self, sock: socket.socket, frame: Dict[str, Any]) -> None:
        sock.sendall(encode_frame(frame))

    def _reply(self, sock: socket.socket, reply_to: int, kind: str, body: Dict[str, Any]) -> None:
        frame: Dict[str, Any] = {"id": self._next_id(), "replyTo": reply_to, kind: body}
        traceparent = self._traces.pop(reply_to, "")
        if traceparent:
            frame["traceparent"] = traceparent
        self._send(sock, frame)

    def _send_error(self, sock: socket.socket, reply_to: int, code: str, message: str) -> None:
        log.warning("protocol error (%s) on frame %d from the agent: %s", code, reply_to, message)
        self._reply(sock, reply_to, "error", {"message": message, "code": code})

    def _hello(self) -> Dict[str, Any]:
        packages = getattr(self._rt, "packages", None)
        if packages is None:
            packages = sorted({m.split(".")[0] for m in self._rt.managed_modules()})
        package = sys.modules.get(__package__ or "hotfleet")
        return {
            "protocolVersion": PROTOCOL_VERSION,
            "processId": self.process_id,
            "pid": os.getpid(),
            "build": self.build,
            "packages": [str(p) for p in packages],
            "patchStack": self._stack_ids(),
            "runtimeVersion": str(getattr(package, "__version__", "unknown")),
            "pythonVersion": platform.python_version(),
        }

    def _handshake(self, sock: socket.socket, reader: FrameReader) -> None:
        hello_id = self._next_id()
        self._send(sock, {"id": hello_id, "hello": self._hello()})
        deadline = time.monotonic() + self._handshake_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OSError(f"no welcome from hotfleet-agent within {self._handshake_timeout:g}s")
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise OSError("hotfleet-agent closed the connection during the handshake")
            payloads = reader.feed(data)
            if payloads:
                break
        _, _, kind, body = decode_frame(payloads[0])
        if kind == "error":
            code = str(get_field(body, "code", "") or "")
            message = str(get_field(body, "message", "") or "(no message)")
            raise HandshakeRefused(f"{message} (code {code!r})", permanent=(code == "version"))
        if kind != "welcome":
            raise OSError(f"hotfleet-agent answered hello with {kind}, expected welcome")
        version = parse_uint(get_field(body, "protocolVersion"), "protocolVersion")
        if version not in (0, PROTOCOL_VERSION):  # 0: proto3 JSON may omit the field
            raise HandshakeRefused(f"the agent speaks local protocol v{version}, this runtime v{PROTOCOL_VERSION}",
                           permanent=True)
        self.welcome = body
        # Frames that arrived right behind the welcome are served by the main loop.
        for payload in payloads[1:]:
            self._early.append(payload)

    def _serve(self, sock: socket.socket) -> bool:
        """Handshake then serve until the connection ends; True if it was established."""
        reader = FrameReader()
        self._early = []
        with self._lock:
            self._sock = sock  # so stop() can interrupt the handshake too
            session = self._session
        self._handshake(sock, reader)
        sock.settimeout(self._io_timeout)  # bounds sendall if the agent stops reading
        welcome = self.welcome or {}
        log.info("connected to hotfleet-agent at %s (node %s, agent %s) as process %s, build %s",
                 self.socket_path, get_field(welcome, "nodeId", "?") or "?",
                 get_field(welcome, "agentVersion", "?") or "?", self.process_id, self.build)
        self._connected.set()
        if self._stop.is_set():
            return True
        for payload in self._early:
            self._dispatch(sock, session, payload)
        selector = selectors.DefaultSelector()
        try:
            selector.register(sock, selectors.EVENT_READ, "agent")
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            while not self._stop.is_set():
                self._flush(sock, session)
                for key, _ in selector.select(timeout=1.0):
                    if key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                        continue
                    data = sock.recv(65536)
                    if not data:
                        if reader.pending:
                            log.warning("hotfleet-agent closed the connection in the middle of a frame")
                        else:
                            log.warning("hotfleet-agent closed the connection")
                        return True
                    try:
                        payloads = reader.feed(data)
                    except FramingError as exc:
                        log.warning("garbage from hotfleet-agent: %s; closing the connection and reconnecting", exc)
                        try:  # best effort: tell the agent why
                            self._reply(sock, 0, "error", {"message": str(exc), "code": "malformed"})
                        except OSError:
                            pass
                        return True
                    for payload in payloads:
                        self._dispatch(sock, session, payload)
        finally:
            selector.close()
        return True

    def _flush(self, sock: socket.socket, session: int) -> None:
        """Send queued requests and the replies of finished commits and rollbacks."""
        while True:
            with self._lock:
                frame = self._outbox.popleft() if self._outbox else None
            if frame is None:
                break
            self._send(sock, frame)
        while self._completions:
            self._complete(sock, session, self._completions.popleft())

    def _dispatch(self, sock: socket.socket, session: int, payload: bytes) -> None:
        try:
            frame_id, reply_to, kind, body, traceparent = decode_frame_traced(payload)
            if kind == "sourcePart":  # a piece of the prepare or stackReply that follows
                self._parts.add(SourceParts.key(frame_id, reply_to), body, frame_id)
                return
        except FrameError as exc:
            self._send_error(sock, exc.frame_id, exc.code, str(exc))
            return
        if reply_to:
            with self._lock:
                future = self._pending.pop(reply_to, None)
            outcome = self._joined_reply(frame_id, reply_to, kind, body)
            if future is None:
                log.debug("ignoring %s replying to unknown request %d", kind, reply_to)
            elif future.done():
                pass
            elif isinstance(outcome, HotfleetError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
            return
        if kind == "error":
            log.warning("hotfleet-agent reports a protocol error: %s (code %r)",
                        get_field(body, "message", ""), get_field(body, "code", ""))
            return
        handler = self._handlers.get(kind)
        if handler is None:
            self._send_error(sock, frame_id, "unknown", f"unexpected message {kind!r} from the agent")
            return
        if frame_id == 0:
            self._send_error(sock, 0, "malformed", f"{kind} request without an id")
            return
        self._current = (sock, session)
        if traceparent:
            # Handed back with this request's reply (now or at a later safe point).
            self._traces[frame_id] = traceparent
        try:
            if kind == "prepare":
                body = fill_prepare(body, self._parts.take(SourceParts.key(frame_id, 0), body, frame_id), frame_id)
            handler(frame_id, body)
        except FrameError as exc:
            self._send_error(sock, frame_id, exc.code, str(exc))
        except OSError:
            raise
        except Exception as exc:  # a bug here must cost one request, not the link
            log.exception("serving %s failed", kind)
            self._send_error(sock, frame_id, "internal", f"{type(exc).__name__}: {exc}")

    def _joined_reply(self, frame_id: int, reply_to: int, kind: str,
                      body: Dict[str, Any]) -> Union[Tuple[str, Dict[str, Any]], HotfleetError]:
        """A reply as its request's future gets it: a stackReply (the end marker) with the
        sources of the pieces ahead of it, joined even if the request was given up."""
        if kind != "stackReply":
            return kind, body
        try:
            sources = self._parts.take(SourceParts.key(frame_id, reply_to), body, frame_id)
            return kind, fill_stack_reply(body, sources)
        except FrameError as exc:
            return HotfleetError(f"the agent's stackReply does not add up: {exc}")

    # -- request handlers (link thread) ---------------------------------------------------

    def _result(self, frame_id: int, kind: str, body: Dict[str, Any]) -> None:
        assert self._current is not None
        sock, _ = self._current
        self._reply(sock, frame_id, kind, body)

    def _on_prepare(self, frame_id: int, body: Dict[str, Any]) -> None:
        if get_field(body, "revert", False):
            self._on_prepare_revert(frame_id, require_str(body, "patchId", frame_id))
            return
        patch_id = require_str(body, "patchId", frame_id)
        modules = require_modules(body, frame_id)
        started = time.perf_counter()
        if patch_id in self._stack_ids():
            # An agent that restarted may prepare again what this process already runs.
            self._result(frame_id, "prepareResult", {
                "ok": True, "elapsedMs": _ms(started),
                "detailJson": detail_json({"already_committed": True, "patch_id": patch_id}),
            })
            return
        self._prepare_reply(frame_id, f"{patch_id} ({len(modules)} modules)", started,
                            lambda: self._rt.prepare(modules, txn_id=patch_id))

    def _prepare_reply(self, frame_id: int, what: str, started: float, prepare: Callable[[], Any]) -> None:
        """Run ``prepare`` (a transaction or a revert) and answer with its plan or refusal."""
        try:
            txn = prepare()
        except HotfleetError as exc:  # PrepareError, or another runtime refusal
            log.warning("prepare of %s refused: %s", what, exc)
            result = {"ok": False, "error": str(exc), "errorKind": "prepare", "elapsedMs": _ms(started),
                      "detailJson": error_detail_json(exc)}
        except Exception as exc:  # a runtime bug; the live process is untouched by prepare
            log.exception("prepare of %s crashed", what)
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "errorKind": "internal",
                      "elapsedMs": _ms(started)}
        else:
            log.info("prepared %s in %.1f ms", what, _ms(started))
            result = {"ok": True, "elapsedMs": _ms(started), "detailJson": detail_json(txn.plan.to_dict())}
        self._result(frame_id, "prepareResult", result)

    def _on_prepare_revert(self, frame_id: int, patch_id: str) -> None:
        """Stage taking ``patch_id`` off the stack; a process that does not run it has nothing to do."""
        started = time.perf_counter()
        if patch_id not in self._stack_ids():
            self._result(frame_id, "prepareResult", {
                "ok": True, "elapsedMs": _ms(started),
                "detailJson": detail_json({"noop": True, "patch_id": patch_id,
                                           "reason": "patch is not on this process's stack"}),
            })
            return
        self._prepare_reply(frame_id, f"the revert of {patch_id}", started,
                            lambda: self._rt.prepare_revert(patch_id))

    def _on_commit(self, frame_id: int, body: Dict[str, Any]) -> None:
        patch_id = require_str(body, "patchId", frame_id)
        revert = bool(get_field(body, "revert", False))
        started = time.perf_counter()
        key = revert_id(patch_id) if revert else patch_id  # a revert is its own transaction
        future = self._inflight.get(key)
        if future is None:
            txn = self._rt.prepared(key)
            if txn is None:
                self._answer_unprepared_commit(frame_id, patch_id, revert, started)
                return
            try:
                future = self._rt.request_commit(txn)
            except HotfleetError as exc:  # e.g. the transaction was aborted meanwhile
                self._result(frame_id, "commitResult", {
                    "ok": False, "errorKind": "commit", "error": str(exc), "elapsedMs": _ms(started),
                    "patchStack": self._stack_ids(), "detailJson": error_detail_json(exc),
                })
                return
            self._inflight[key] = future
            what = f"the revert of {patch_id}" if revert else patch_id
            log.info("commit of %s requested; it lands at the next safe point", what)
        self._await(future, frame_id, "commitResult", started, patch_id, revert=revert)

    def _answer_unprepared_commit(self, frame_id: int, patch_id: str, revert: bool, started: float) -> None:
        """No transaction to commit: a repeat of a commit that already landed
        answers like the first (the patch is on the stack, or a revert's patch
        is off it); anything else is refused."""
        stack = self._stack_ids()
        landed = (patch_id not in stack) if revert else (patch_id in stack)
        if landed:
            detail = {"noop": True} if revert else {"already_committed": True}
            self._result(frame_id, "commitResult", {
                "ok": True, "elapsedMs": _ms(started), "patchStack": stack,
                "detailJson": detail_json({**detail, "patch_id": patch_id}),
            })
            return
        error = (f"the revert of {patch_id} is not prepared in this process" if revert
                 else f"patch {patch_id} is not prepared in this process (prepare it first)")
        self._result(frame_id, "commitResult", {
            "ok": False, "errorKind": "commit", "elapsedMs": _ms(started), "patchStack": stack, "error": error,
        })

    def _on_abort(self, frame_id: int, body: Dict[str, Any]) -> None:
        patch_id = require_str(body, "patchId", frame_id)
        started = time.perf_counter()
        if get_field(body, "revert", False):
            patch_id = revert_id(patch_id)  # the revert's own transaction
        if patch_id in self._inflight:
            self._result(frame_id, "abortResult", {
                "ok": False, "errorKind": "abort", "elapsedMs": _ms(started), "patchStack": self._stack_ids(),
                "error": f"patch {patch_id} is being committed; roll it back instead",
            })
            return
        aborted, error = self._abort_prepared(patch_id)
        if error is not None:
            self._result(frame_id, "abortResult", {
                "ok": False, "errorKind": "abort", "error": f"{type(error).__name__}: {error}",
                "elapsedMs": _ms(started), "patchStack": self._stack_ids(),
            })
            return
        if aborted:
            log.info("aborted prepared patch %s", patch_id)
        # Aborting what is not prepared is a no-op, so a repeated or late abort succeeds.
        self._result(frame_id, "abortResult", {
            "ok": True, "elapsedMs": _ms(started), "patchStack": self._stack_ids(),
            "detailJson": detail_json({"aborted": aborted, "patch_id": patch_id}),
        })

    def _on_rollback(self, frame_id: int, body: Dict[str, Any]) -> None:
        patch_id = str(get_field(body, "patchId", "") or "")
        started = time.perf_counter()
        if patch_id and get_field(body, "revert", False):
            self._on_undo_revert(frame_id, patch_id, started)
            return
        if patch_id and patch_id not in self._inflight and patch_id not in self._stack_ids():
            # This process does not run the patch (its commit failed and restored, or never
            # happened): rolling back must not undo the patch beneath it. Drop it if prepared.
            self._abort_prepared(patch_id)
            self._result(frame_id, "rollbackResult", {
                "ok": True, "elapsedMs": _ms(started), "patchStack": self._stack_ids(),
                "detailJson": detail_json({"noop": True, "patch_id": patch_id,
                                           "reason": "patch is not committed in this process"}),
            })
            return
        future = self._rt.request_rollback(expected_id=patch_id or None)
        log.info("rollback of %s requested; it lands at the next safe point", patch_id or "the newest patch")
        self._await(future, frame_id, "rollbackResult", started, patch_id)

    def _on_undo_revert(self, frame_id: int, patch_id: str, started: float) -> None:
        """Undo the revert of ``patch_id`` where it is in force; elsewhere the goal holds already."""
        if self._rt.reverted(patch_id) is None and revert_id(patch_id) not in self._inflight:
            self._abort_prepared(revert_id(patch_id))
            self._result(frame_id, "rollbackResult", {
                "ok": True, "elapsedMs": _ms(started), "patchStack": self._stack_ids(),
                "detailJson": detail_json({"noop": True, "patch_id": patch_id,
                                           "reason": "no revert of the patch in force in this process"}),
            })
            return
        future = self._rt.request_undo_revert(patch_id)
        log.info("undoing the revert of %s requested; it lands at the next safe point", patch_id)
        self._await(future, frame_id, "rollbackResult", started, patch_id, revert=True)

    def _on_health_query(self, frame_id: int, body: Dict[str, Any]) -> None:
        since = parse_uint(get_field(body, "since"), "since", frame_id)
        h = self._rt.health(since=since or None)
        detail = h.get("game_detail", "")
        self._result(frame_id, "health", {
            "alive": bool(h.get("alive", True)),
            "ticks": uint(h.get("ticks")),
            "tickP50Ms": finite(h.get("tick_p50_ms")),
            "tickP99Ms": finite(h.get("tick_p99_ms")),
            "exceptionsSince": uint(h.get("exceptions_since")),
            "mark": uint(h.get("mark")),
            "gameOk": bool(h.get("game_ok", True)),
            "gameDetail": detail if isinstance(detail, str) else detail_json(detail),
            "ticksSince": uint(h.get("ticks_since")),
        })

    def _on_status_query(self, frame_id: int, body: Dict[str, Any]) -> None:
        self._result(frame_id, "status", {
            "patchStack": self._stack_ids(),
            "liveDigests": {str(k): str(v) for k, v in self._rt.live_digests().items()},
            "preparedPatchId": self._pending_id(),
        })

    # -- commit/rollback completion ---------------------------------------------------------

    def _await(self, future: "Future[Any]", frame_id: int, kind: str, started: float, patch_id: str,
               revert: bool = False) -> None:
        session = self._session
        done = _Completion(session, frame_id, kind, future, started, patch_id, revert)

        def on_done(_: "Future[Any]") -> None:
            # Runs on the game thread (or here, if already done): queue and wake, nothing more.
            self._completions.append(done)
            self._wake()

        future.add_done_callback(on_done)

    def _complete(self, sock: socket.socket, session: int, done: _Completion) -> None:
        future = done.future
        stack = self._stack_ids()
        result: Dict[str, Any] = {"elapsedMs": _ms(done.started), "patchStack": stack}
        what = "commit" if done.kind == "commitResult" else "rollback"
        try:
            report = future.result()
        except (CommitError, RollbackError, HotfleetError) as exc:
            if what == "rollback" and not done.revert and done.patch_id and done.patch_id not in stack:
                # The patch is not running here (e.g. its queued commit failed): the goal
                # of the rollback holds, and nothing beneath it was touched.
                result.update(ok=True, detailJson=detail_json({"noop": True, "patch_id": done.patch_id,
                                                               "reason": str(exc)}))
            else:
                log.warning("%s of %s failed: %s", what, done.patch_id or "newest patch", exc)
                result.update(ok=False, error=str(exc), errorKind=what, detailJson=error_detail_json(exc))
        except BaseException as exc:  # includes CancelledError
            log.error("%s of %s failed unexpectedly: %r", what, done.patch_id or "newest patch", exc)
            result.update(ok=False, error=f"{type(exc).__name__}: {exc}", errorKind="internal")
        else:
            result.update(ok=True, pauseMs=finite(getattr(report, "pause_ms", 0.0)),
                          detailJson=detail_json(report.to_dict() if hasattr(report, "to_dict") else {}))
            log.info("%s of %s done (pause %.3f ms); patch stack %s", what, done.patch_id or "newest patch",
                     result["pauseMs"], stack)
        key = revert_id(done.patch_id) if done.revert else done.patch_id
        if done.kind == "commitResult" and self._inflight.get(key) is future:
            del self._inflight[key]
        if done.session != session:
            log.info("%s of %s finished after the agent connection that asked for it was lost "
                     "(ok=%s); the agent sees the result in hello/status", what, done.patch_id, result["ok"])
            return
        self._reply(sock, done.frame_id, done.kind, result)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
