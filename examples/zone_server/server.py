#!/usr/bin/env python3
"""The example MMO zone server: a 20 Hz tick loop serving players over TCP.

Run from the repository root::

    PYTHONPATH=runtime/python:examples/zone_server \\
        python examples/zone_server/server.py --zone elwynn --port 0 --port-file /tmp/elwynn.port

With ``HOTFLEET_AGENT_SOCKET`` set (or ``--agent-socket``) the process connects to the
local ``hotfleet-agent``, which brings the fleet's committed patch stack, and waits until it
is applied (``rt.wait_until_current``) before it accepts a single player. Without it, it serves normally and can still be patched in-process.

Threading model: everything that touches game state (the ``zone`` package) runs on the
main thread, inside the tick loop. Socket I/O is non-blocking and multiplexed with
``selectors`` in the same loop; a request is read whenever bytes arrive but served only in
the next tick, and hot patches are applied at the end of a tick (``rt.safe_point()``, run
by ``rt.tick()``), so a patch never lands in the middle of a request. The only other thread is the runtime's
agent link, which never touches game state.

The hotfleet integration is the runtime README's three lines, marked ``[hotfleet 1/3]`` etc.,
plus its ``rt.wait_until_current(timeout)`` before the player port opens.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import selectors
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `zone` lives next to this file
    sys.path.insert(0, str(HERE))

try:
    import hotfleet
except ImportError:  # not on PYTHONPATH: fall back to the runtime in this repository
    sys.path.insert(0, str(HERE.parent.parent / "runtime" / "python"))
    try:
        import hotfleet
    except ImportError:
        sys.stderr.write("error: cannot import hotfleet; run with "
                         "PYTHONPATH=runtime/python:examples/zone_server\n")
        raise SystemExit(2) from None

from zone import protocol, world  # noqa: E402  (needs the sys.path set-up above)

log = logging.getLogger("zone_server")

#: A request line longer than this is abuse; the connection is closed.
MAX_LINE = 64 * 1024
#: Replies a client has not read yet; beyond this it is too slow and is dropped.
MAX_OUTBUF = 4 * 1024 * 1024
#: Requests served per connection per tick; the rest wait for the next tick (fairness).
MAX_REQUESTS_PER_TICK = 64
#: Seconds a connection whose peer has gone keeps trying to deliver its last replies.
EOF_LINGER = 5.0

EXIT_SYNC_FAILED = 3


class Connection:
    """One player connection: its socket, buffers and protocol state."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.client = protocol.Client(address)
        #: The peer closed its side (or we gave up on it); leftovers still get served.
        self.eof = False
        #: Fully closed and unregistered.
        self.closed = False
        #: Selector events currently registered (0 = not registered).
        self.events = 0
        #: When the tick first saw ``eof`` (for EOF_LINGER).
        self.eof_seen: Optional[float] = None

    def queue(self, reply: Any) -> None:
        """Append one reply line to the send buffer."""
        self.outbuf += protocol.encode(reply)


class ZoneServer:
    """The tick loop, the listening socket and the player connections."""

    def __init__(self, zone_name: str, runtime: "hotfleet.Runtime", tick_hz: float) -> None:
        self.zone = world.Zone(zone_name)
        self.rt = runtime
        self.period = 1.0 / tick_hz
        self.selector = selectors.DefaultSelector()
        self.listener: Optional[socket.socket] = None
        self.connections: List[Connection] = []
        self.stopping = False
        self._last_error_log = 0.0

    # -- game health, read by the runtime (from the agent link's thread) -------------

    def game_health(self) -> Tuple[bool, str]:
        """The game's own view of its health: it is fine if it is ticking and serving."""
        return True, f"zone {self.zone.name}: {len(self.zone.players)} players online, tick {self.zone.tick_count}"

    # -- sockets -----------------------------------------------------------------------

    def bind(self, host: str, port: int) -> Tuple[str, int]:
        """Bind and listen; returns the bound address (port 0 picks a free port)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.listener = listener
        bound = listener.getsockname()
        return bound[0], bound[1]

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving who we have
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, f"{addr[0]}:{addr[1]}")
            self.connections.append(conn)
            self._update_interest(conn)
            log.info("connection from %s", conn.address)

    def _read(self, conn: Connection) -> None:
        while not conn.eof:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("connection %s: read failed: %s", conn.address, exc)
                conn.eof = True
                return
            if not data:
                conn.eof = True
                return
            conn.inbuf += data
            if len(conn.inbuf) > MAX_LINE and b"\n" not in conn.inbuf:
                conn.outbuf += protocol.encode({"type": "error", "ok": False, "error": "line too long"})
                conn.inbuf.clear()
                conn.eof = True  # stop reading; the tick closes it after the error is sent

    def _flush(self, conn: Connection) -> None:
        while conn.outbuf and not conn.closed:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.info("connection %s: write failed: %s", conn.address, exc)
                conn.outbuf.clear()
                conn.eof = True
                break
            del conn.outbuf[:sent]
        if len(conn.outbuf) > MAX_OUTBUF:
            log.warning("connection %s: client does not read its replies; dropping it", conn.address)
            conn.outbuf.clear()
            conn.eof = True
        self._update_interest(conn)

    def _update_interest(self, conn: Connection) -> None:
        """Register for what the connection needs: reads until EOF, writes while replies wait.

        A connection at EOF with nothing to send is unregistered: a closed socket is
        always readable and would make ``select`` spin until the tick closes it.
        """
        if conn.closed:
            return
        wanted = 0 if conn.eof else selectors.EVENT_READ
        if conn.outbuf:
            wanted |= selectors.EVENT_WRITE
        if wanted == conn.events:
            return
        if conn.events == 0:
            self.selector.register(conn.sock, wanted, conn)
        elif wanted == 0:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, wanted, conn)
        conn.events = wanted

    def poll_io(self, timeout: float) -> None:
        """Wait up to ``timeout`` for socket events; accept, read and write (no game state)."""
        try:
            events = self.selector.select(timeout)
        except InterruptedError:
            return
        for key, mask in events:
            if key.data is None:
                self._accept()
                continue
            conn: Connection = key.data
            if mask & selectors.EVENT_READ:
                self._read(conn)
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            else:
                self._update_interest(conn)

    def _close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            self.selector.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()

    # -- the game thread's work ----------------------------------------------------------

    def serve_requests(self) -> None:
        """Serve every complete request line; forget players whose connection is gone."""
        for conn in self.connections:
            served = 0
            while served < MAX_REQUESTS_PER_TICK:
                newline = conn.inbuf.find(b"\n")
                if newline < 0:
                    break
                line = bytes(conn.inbuf[:newline])
                del conn.inbuf[: newline + 1]
                served += 1
                if not line.strip():
                    continue
                try:
                    reply = protocol.handle_line(self.zone, conn.client, line)
                except Exception as exc:  # a bug in game logic must not kill the zone
                    self.rt.record_exception(exc)
                    self._log_error("request from %s failed", conn.address)
                    reply = {"type": "error", "ok": False, "error": f"internal error: {type(exc).__name__}"}
                conn.queue(reply)
        alive: List[Connection] = []
        now = time.monotonic()
        for conn in self.connections:
            if conn.eof and conn.eof_seen is None:
                conn.eof_seen = now
            if conn.eof_seen is not None and (
                    (not conn.outbuf and b"\n" not in conn.inbuf) or now - conn.eof_seen > EOF_LINGER):
                if conn.client.player is not None:
                    log.info("%s (%s) left", conn.client.player.name, conn.address)
                    self.zone.remove_player(conn.client.player.name)
                    conn.client.player = None
                self._close(conn)
            else:
                alive.append(conn)
        self.connections = alive

    def _log_error(self, message: str, *args: Any) -> None:
        # A patch that raises every tick would otherwise write 20 tracebacks a second.
        now = time.monotonic()
        if now - self._last_error_log >= 5.0:
            self._last_error_log = now
            log.exception(message, *args)

    def run(self) -> None:
        """The tick loop; returns after ``stop()``."""
        next_tick = time.monotonic()
        while not self.stopping:
            self.poll_io(max(0.0, next_tick - time.monotonic()))
            if time.monotonic() < next_tick:
                continue
            # [hotfleet 3/3] times the tick for the health figures, records an exception that
            # escapes it, and ends with rt.safe_point(): queued commits and rollbacks land
            # there, between two ticks, on this thread.
            with self.rt.tick():
                self.serve_requests()
                try:
                    self.zone.tick()
                except Exception as exc:  # recorded for the health gate; the zone keeps running
                    self.rt.record_exception(exc)
                    self._log_error("zone tick %d failed", self.zone.tick_count)
            for conn in self.connections:
                if conn.outbuf:
                    self._flush(conn)
            # Late ticks are not made up in a burst: the loop just resumes its rhythm.
            next_tick = max(next_tick + self.period, time.monotonic())
        self._shutdown()

    def stop(self, signum: int = 0, frame: Optional[FrameType] = None) -> None:
        """Ask the loop to finish (signal-handler safe: it only sets a flag)."""
        self.stopping = True

    def _shutdown(self) -> None:
        log.info("zone %s shutting down (%d players online)", self.zone.name, len(self.zone.players))
        for conn in self.connections:
            conn.queue({"type": "event", "ok": True, "event": "shutdown", "zone": self.zone.name})
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(c.outbuf and not c.eof for c in self.connections):
            self.poll_io(0.05)
            for conn in self.connections:
                if conn.outbuf:
                    self._flush(conn)
        for conn in self.connections:
            self._close(conn)
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
        self.selector.close()


def write_port_file(path: str, port: int) -> None:
    """Write the port atomically: readers see no file or the whole number, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".port-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description="hotfleet example MMO zone server")
    p.add_argument("--zone", required=True, help="zone name (shown to players, used by the demo)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one (default)")
    p.add_argument("--port-file", help="write the bound port here (atomically) once serving")
    p.add_argument("--tick-hz", type=float, default=20.0, help="ticks per second (default 20)")
    p.add_argument("--agent-socket", help="hotfleet-agent socket (default: $HOTFLEET_AGENT_SOCKET)")
    p.add_argument("--build", help="build id reported to the agent (default: $HOTFLEET_BUILD or 'dev')")
    p.add_argument("--sync-timeout", type=float, default=30.0,
                   help="seconds to wait for the agent and the patch stack before giving up (default 30)")
    p.add_argument("--allow-unsynced", action="store_true",
                   help="serve players even if the patch stack could not be fetched")
    p.add_argument("--log-level", default=os.environ.get("ZONE_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    if not args.tick_hz > 0:
        p.error("--tick-hz must be positive")
    if not 0 <= args.port <= 65535:
        p.error("--port must be 0..65535")
    return args


def sync_with_agent(rt: "hotfleet.Runtime", socket_path: Optional[str], timeout: float) -> bool:
    """Connect to the agent; True once this process runs its build's whole patch stack.

    ``rt.connect()`` fetches and applies the stack by itself; waiting here (on the game
    thread, before the loop: it runs the safe points the commits need) only keeps the
    player port closed until then.
    """
    rt.connect(socket_path)  # [hotfleet 2/3] talk to the local agent; it brings the stack
    if not rt.wait_until_current(timeout=timeout):
        log.error("patch stack not applied within %.0fs (agent at %s)", timeout,
                  socket_path or os.environ.get("HOTFLEET_AGENT_SOCKET"))
        return False
    log.info("patch stack in sync: %s", ", ".join(e.id for e in rt.patch_stack) or "empty")
    return True


def main(argv: Optional[List[str]] = None) -> int:
    """Start the zone, serve until SIGTERM/SIGINT, exit 0."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s [{args.zone} %(process)d] %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.build:
        os.environ["HOTFLEET_BUILD"] = args.build  # the agent link reads it

    server: Optional[ZoneServer] = None

    def game_health() -> Tuple[bool, str]:
        return server.game_health() if server is not None else (True, "starting")

    rt = hotfleet.Runtime(packages=["zone"], health=game_health)  # [hotfleet 1/3]
    server = ZoneServer(args.zone, rt, args.tick_hz)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)

    socket_path = args.agent_socket or os.environ.get("HOTFLEET_AGENT_SOCKET")
    if socket_path:
        # Before the first player: a process started while patches are live fleet-wide
        # must run them too, or it would serve old (buggy) code.
        if not sync_with_agent(rt, socket_path, args.sync_timeout) and not args.allow_unsynced:
            log.error("refusing to serve players unpatched (use --allow-unsynced to override)")
            return EXIT_SYNC_FAILED
    else:
        log.info("no HOTFLEET_AGENT_SOCKET: running without an agent")

    try:
        host, port = server.bind(args.host, args.port)
    except OSError as exc:
        log.error("cannot bind %s:%d: %s", args.host, args.port, exc)
        return 1
    if args.port_file:
        write_port_file(args.port_file, port)
    print(f"zone {args.zone} listening on {host}:{port} pid {os.getpid()}", flush=True)
    server.run()
    log.info("zone %s stopped", args.zone)
    return 0


if __name__ == "__main__":
    sys.exit(main())
