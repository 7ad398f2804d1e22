"""Tests of the runtime's agent link: a real AgentLink, a real Unix socket, a scripted peer.

The real agent is Rust and has its own integration tests; here a small peer written in
the test plays the agent, frame by frame, so every message the link sends can be checked
and every misbehaviour (garbage, oversized frames, refusals, disconnects) can be staged.
The peer encodes and decodes frames with its own few lines of code, not the link's codec,
so a symmetric bug in the codec cannot hide. Patches change a real module in a temporary
package, and a thread calling ``rt.safe_point()`` stands in for the game loop.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import struct
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hotfleet  # noqa: E402
from hotfleet import agent_link  # noqa: E402
from hotfleet.agent_link import AgentLink  # noqa: E402

TIMEOUT = 10.0


# --------------------------------------------------------------------------------------
# the scripted agent


def pack(frame: Any) -> bytes:
    """Frame ``frame`` the way runtime.proto says: 4-byte big-endian length + UTF-8 JSON."""
    payload = json.dumps(frame).encode("utf-8")
    return struct.pack(">I", len(payload)) + payload


class Peer:
    """One accepted connection from the link, driven by the test."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.next_id = 1000

    def send(self, frame: Any) -> None:
        self.sock.sendall(pack(frame))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int, deadline: float) -> bool:
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"peer waited {TIMEOUT}s for {n} bytes, has {len(self.buf)}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return False
            if not data:
                return False
            self.buf += data
        return True

    def recv(self, timeout: float = TIMEOUT) -> Dict[str, Any]:
        """The next frame from the link (fails the test on EOF or timeout)."""
        deadline = time.monotonic() + timeout
        assert self._fill(4, deadline), "link closed the connection"
        (size,) = struct.unpack(">I", self.buf[:4])
        assert size <= 16 * 1024 * 1024
        assert self._fill(4 + size, deadline), "link closed the connection mid-frame"
        payload, self.buf = self.buf[4:4 + size], self.buf[4 + size:]
        frame = json.loads(payload.decode("utf-8"))
        assert isinstance(frame, dict)
        return frame

    def expect(self, kind: str, timeout: float = TIMEOUT) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """The next frame, which must carry body ``kind``; returns (frame, body)."""
        frame = self.recv(timeout)
        assert kind in frame, f"expected {kind}, got {frame}"
        return frame, frame[kind]

    def handshake(self, welcome: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Read the hello, answer welcome; returns the hello body."""
        frame, hello = self.expect("hello")
        self.send({"id": 1, "replyTo": frame["id"],
                   "welcome": welcome or {"protocolVersion": 2, "nodeId": "node-test", "agentVersion": "test"}})
        return hello

    def request(self, kind: str, body: Dict[str, Any], reply: str, timeout: float = TIMEOUT,
                frame_id: Any = None) -> Dict[str, Any]:
        """Send a request, return the body of its reply (which must be ``reply``)."""
        self.next_id += 1
        fid = self.next_id if frame_id is None else frame_id
        self.send({"id": fid, kind: body})
        frame, got = self.expect(reply, timeout)
        assert frame["replyTo"] == int(fid)
        assert isinstance(frame["replyTo"], int), "ints must be emitted as JSON numbers"
        return got

    def closed_by_link(self, timeout: float = TIMEOUT) -> bool:
        """True once the link closed the connection (frames before that are discarded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return True
            if not data:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


class ScriptedAgent:
    """A Unix-socket listener standing in for hotfleet-agent."""

    def __init__(self, path: str, listen: bool = True) -> None:
        self.path = path
        self.listener: Optional[socket.socket] = None
        self.peers: List[Peer] = []
        if listen:
            self.listen()

    def listen(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)
        listener.listen(8)
        self.listener = listener

    def accept(self, timeout: float = TIMEOUT) -> Peer:
        assert self.listener is not None
        self.listener.settimeout(timeout)
        sock, _ = self.listener.accept()
        peer = Peer(sock)
        self.peers.append(peer)
        return peer

    def no_connection_within(self, seconds: float) -> bool:
        assert self.listener is not None
        self.listener.settimeout(seconds)
        try:
            sock, _ = self.listener.accept()
        except socket.timeout:
            return True
        self.peers.append(Peer(sock))
        return False

    def stop_listening(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.stop_listening()


# --------------------------------------------------------------------------------------
# fixtures: a real package to patch, a runtime, a game thread, the link


V1 = '''\
"""Game logic under test."""
RATE = 2


def damage(x):
    return x * RATE


class Counter:
    def bump(self):
        return 1
'''

V2 = V1.replace("return x * RATE\n", "return x * RATE + 1\n")
V3 = V2.replace("return 1\n", "return 10\n")
BROKEN = V1.replace("def damage(x):", "def damage(x)")


class Package:
    """A throwaway package ``<name>.logic`` imported into this process."""

    def __init__(self, root: Path) -> None:
        self.name = f"hflpkg_{secrets.token_hex(4)}"
        pkg = root / self.name
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "logic.py").write_text(V1)
        sys.path.insert(0, str(root))
        self.root = root
        self.module = importlib.import_module(f"{self.name}.logic")
        self.modname = f"{self.name}.logic"

    def cleanup(self) -> None:
        sys.path.remove(str(self.root))
        for name in [m for m in sys.modules if m == self.name or m.startswith(self.name + ".")]:
            del sys.modules[name]


class Game:
    """A thread standing in for the game loop: ticks and hits the safe point every 5 ms."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="game", daemon=True)
        self.thread_id: Optional[int] = None

    def _loop(self) -> None:
        self.thread_id = threading.get_ident()
        while not self.stopping.is_set():
            self.rt.safe_point()
            with self.rt.tick():
                time.sleep(0.001)
            time.sleep(0.004)

    def start(self) -> "Game":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Unix socket paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="hfl-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pkg(tmp_path: Path) -> Iterator[Package]:
    package = Package(tmp_path)
    yield package
    package.cleanup()


@pytest.fixture
def rt(pkg: Package) -> Iterator[Any]:
    runtime = hotfleet.Runtime(packages=[pkg.name], health=lambda: (True, "test game fine"))
    yield runtime
    runtime.close()  # uninstalls its import hook; the package is thrown away


@pytest.fixture
def agent(sockdir: str) -> Iterator[ScriptedAgent]:
    scripted = ScriptedAgent(os.path.join(sockdir, "agent.sock"))
    yield scripted
    scripted.close()


@pytest.fixture
def links() -> Iterator[Callable[..., AgentLink]]:
    """Factory for started links, all stopped at teardown."""
    made: List[AgentLink] = []

    def make(rt: Any, path: str, **kwargs: Any) -> AgentLink:
        kwargs.setdefault("backoff_initial", 0.02)
        kwargs.setdefault("backoff_max", 0.2)
        link = AgentLink(rt, path, **kwargs).start()
        made.append(link)
        return link

    yield make
    for link in made:
        link.stop()


@pytest.fixture
def game(rt: Any) -> Iterator[Game]:
    g = Game(rt).start()
    yield g
    g.stop()


def connect(links: Callable[..., AgentLink], rt: Any, agent: ScriptedAgent,
            **kwargs: Any) -> Tuple[AgentLink, Peer, Dict[str, Any]]:
    link = links(rt, agent.path, **kwargs)
    peer = agent.accept()
    hello = peer.handshake()
    assert link.wait_connected(TIMEOUT)
    return link, peer, hello


# --------------------------------------------------------------------------------------
# codec


def test_codec_encodes_length_prefixed_json_and_decodes_proto3_json_variants() -> None:
    wire = agent_link.encode_frame({"id": 7, "status": {"patchStack": ["a"]}})
    (size,) = struct.unpack(">I", wire[:4])
    assert size == len(wire) - 4
    assert json.loads(wire[4:]) == {"id": 7, "status": {"patchStack": ["a"]}}

    # 64-bit ints as strings, snake_case names, null body: all valid proto3 JSON.
    assert agent_link.decode_frame(b'{"id":"18446744073709551615","reply_to":"2","health_query":{"since":"9"}}') == (
        2**64 - 1, 2, "healthQuery", {"since": "9"})
    assert agent_link.decode_frame(b'{"id":3,"statusQuery":null}') == (3, 0, "statusQuery", {})
    # An unknown field next to a known body is ignored (forward compatibility).
    assert agent_link.decode_frame(b'{"id":3,"statusQuery":{},"traceparent":"x"}')[2] == "statusQuery"
    # The agent's trace context is returned apart; a non-string or oversized one is dropped.
    assert agent_link.decode_frame_traced(b'{"id":3,"statusQuery":{},"traceparent":"x"}') == (
        3, 0, "statusQuery", {}, "x")
    assert agent_link.decode_frame_traced(b'{"id":3,"statusQuery":{},"traceparent":7}')[4] == ""
    assert agent_link.decode_frame_traced(b'{"id":3,"statusQuery":{},"traceparent":"%s"}' % (b"a" * 200))[4] == ""

    cases = {
        b"\xff\xfe": "malformed",
        b"{not json": "malformed",
        b"[1,2]": "malformed",
        b'{"id":1}': "malformed",
        b'{"id":1,"prepare":{},"commit":{}}': "malformed",
        b'{"id":1,"prepare":[]}': "malformed",
        b'{"id":-1,"statusQuery":{}}': "malformed",
        b'{"id":true,"statusQuery":{}}': "malformed",
        b'{"id":5,"teleport":{}}': "unknown",
    }
    for payload, code in cases.items():
        with pytest.raises(agent_link.FrameError) as info:
            agent_link.decode_frame(payload)
        assert info.value.code == code, payload
    with pytest.raises(agent_link.FrameError) as info:
        agent_link.decode_frame(b'{"id":5,"teleport":{}}')
    assert info.value.frame_id == 5  # so the error can reply to it


def test_frame_reader_reassembles_split_frames_and_rejects_oversized_lengths() -> None:
    reader = agent_link.FrameReader()
    wire = pack({"id": 1, "statusQuery": {}}) + pack({"id": 2, "healthQuery": {"since": 0}})
    got: List[bytes] = []
    for i in range(len(wire)):  # one byte at a time: the worst a stream can do
        got.extend(reader.feed(wire[i:i + 1]))
    assert [json.loads(p)["id"] for p in got] == [1, 2]
    assert reader.pending == 0
    assert reader.feed(struct.pack(">I", 0)) == [b""]  # empty frame: framing intact
    with pytest.raises(agent_link.FramingError):
        agent_link.FrameReader().feed(struct.pack(">I", 16 * 1024 * 1024 + 1))
    assert agent_link.FrameReader().feed(struct.pack(">I", 3) + b"{}") == []  # incomplete, not an error


def test_the_frame_limit_counts_escaped_bytes() -> None:
    # 3 MiB of control characters is 18 MiB of JSON: refused on the sending side, naming
    # the encoded size, rather than sent and refused by the agent (costing the connection).
    text = "\x01" * (3 * 1024 * 1024)
    with pytest.raises(ValueError, match=f"frame of {6 * len(text) + 43} bytes exceeds the 16777216-byte limit"):
        agent_link.encode_frame({"id": 1, "replyTo": 2, "error": {"message": text}})
    fits = "\x01" * (2 * 1024 * 1024)  # 12 MiB escaped: fits
    assert len(agent_link.encode_frame({"id": 1, "error": {"message": fits}})) > 12 * 1024 * 1024


def test_missing_socket_path_is_a_clear_error(rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTFLEET_AGENT_SOCKET", raising=False)
    with pytest.raises(hotfleet.HotfleetError, match="HOTFLEET_AGENT_SOCKET"):
        AgentLink(rt)


# --------------------------------------------------------------------------------------
# handshake


def test_hello_welcome(rt: Any, pkg: Package, agent: ScriptedAgent, links: Callable[..., AgentLink],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTFLEET_BUILD", "zone-1.4.2")
    monkeypatch.setenv("HOTFLEET_AGENT_SOCKET", agent.path)
    link = links(rt, None)  # path from the environment
    peer = agent.accept()
    frame, hello = peer.expect("hello")
    assert isinstance(frame["id"], int) and frame["id"] > 0
    assert hello["protocolVersion"] == 2
    assert re.fullmatch(rf"{os.getpid()}-[0-9a-f]{{8}}", hello["processId"])
    assert hello["pid"] == os.getpid()
    assert hello["build"] == "zone-1.4.2"
    assert hello["packages"] == [pkg.name]
    assert hello["patchStack"] == []
    assert hello["runtimeVersion"]
    assert hello["pythonVersion"] == "%d.%d.%d" % sys.version_info[:3]
    assert not link.connected  # not before the welcome
    peer.send({"id": 1, "replyTo": frame["id"],
               "welcome": {"protocolVersion": 2, "nodeId": "n1", "agentVersion": "0.1.0"}})
    assert link.wait_connected(TIMEOUT)
    assert link.welcome is not None and link.welcome["nodeId"] == "n1"
    # The link serves requests on the same connection after the welcome.
    status = peer.request("statusQuery", {}, "status")
    assert status["patchStack"] == [] and status["preparedPatchId"] == ""
    assert pkg.modname in status["liveDigests"]


def test_build_argument_overrides_environment(rt: Any, agent: ScriptedAgent, links: Callable[..., AgentLink],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTFLEET_BUILD", "from-env")
    links(rt, agent.path, build="from-arg")
    assert agent.accept().handshake()["build"] == "from-arg"
    monkeypatch.delenv("HOTFLEET_BUILD")
    links(rt, agent.path)
    assert agent.accept().handshake()["build"] == "dev"


def test_version_refusal_is_logged_and_not_retried(rt: Any, agent: ScriptedAgent, links: Callable[..., AgentLink],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hotfleet.agent_link")
    link = links(rt, agent.path)
    peer = agent.accept()
    frame, _ = peer.expect("hello")
    peer.send({"id": 1, "replyTo": frame["id"],
               "error": {"code": "version", "message": "agent speaks local protocol v3 only"}})
    peer.close()
    assert not link.wait_connected(2.0)
    assert link.refused is not None and "v3 only" in link.refused
    assert agent.no_connection_within(1.0), "a refused runtime must not retry"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "hotfleet.agent_link"]
    assert errors and "refused" in errors[0].getMessage() and "not retrying" in errors[0].getMessage()
    with pytest.raises(hotfleet.HotfleetError, match="refused"):
        link.sync_patch_stack(timeout=0.5)


def test_welcome_with_another_protocol_version_is_refused(rt: Any, agent: ScriptedAgent,
                                                          links: Callable[..., AgentLink]) -> None:
    link = links(rt, agent.path)
    agent.accept().handshake({"protocolVersion": 3, "nodeId": "future"})
    assert not link.wait_connected(2.0)
    assert link.refused is not None and "v3" in link.refused and "v2" in link.refused
    assert agent.no_connection_within(0.5)


def test_other_refusals_are_retried(rt: Any, agent: ScriptedAgent, links: Callable[..., AgentLink]) -> None:
    link = links(rt, agent.path)
    first = agent.accept()
    frame, _ = first.expect("hello")
    first.send({"id": 1, "replyTo": frame["id"], "error": {"code": "busy", "message": "starting up"}})
    first.close()
    second = agent.accept()  # the link came back on its own
    second.handshake()
    assert link.wait_connected(TIMEOUT)
    assert link.refused is None


# --------------------------------------------------------------------------------------
# the patch lifecycle over the wire


def test_prepare_commit_rollback_round_trip_changes_a_real_module(
        rt: Any, pkg: Package, agent: ScriptedAgent, links: Callable[..., AgentLink], game: Game) -> None:
    link, peer, hello = connect(links, rt, agent)
    from_import = pkg.module.damage  # a reference taken before the patch, like `from m import f`
    counter = pkg.module.Counter()
    assert from_import(5) == 10
    before = peer.request("statusQuery", {}, "status")

    prep = peer.request("prepare", {"patchId": "p-fix", "modules": {pkg.modname: V2}}, "prepareResult",
                        frame_id="41")  # a 64-bit id as a JSON string, as pbjson sends it
    assert prep["ok"] is True, prep
    assert isinstance(json.loads(prep["detailJson"]), dict)  # the plan
    assert prep["elapsedMs"] >= 0
    assert from_import(5) == 10, "prepare must not touch live code"
    assert peer.request("statusQuery", {}, "status")["preparedPatchId"] == "p-fix"

    commit = peer.request("commit", {"patchId": "p-fix"}, "commitResult")
    assert commit["ok"] is True, commit
    assert commit["patchStack"] == ["p-fix"]
    assert isinstance(commit["pauseMs"], (int, float)) and commit["pauseMs"] >= 0
    assert isinstance(json.loads(commit["detailJson"]), dict)
    assert from_import(5) == 11 and pkg.module.damage is from_import, "same function object, new code"
    after = peer.request("statusQuery", {}, "status")
    assert after["patchStack"] == ["p-fix"] and after["preparedPatchId"] == ""
    assert after["liveDigests"][pkg.modname] != before["liveDigests"][pkg.modname]

    # A repeated commit (an agent retrying) answers like the first and changes nothing.
    again = peer.request("commit", {"patchId": "p-fix"}, "commitResult")
    assert again["ok"] is True and again["patchStack"] == ["p-fix"]

    rollback = peer.request("rollback", {"patchId": "p-fix"}, "rollbackResult")
    assert rollback["ok"] is True, rollback
    assert rollback["patchStack"] == []
    assert from_import(5) == 10
    assert counter.bump() == 1
    assert peer.request("statusQuery", {}, "status")["liveDigests"][pkg.modname] == before["liveDigests"][pkg.modname]


TRACEPARENT = "00-5c1e0a4b2f3d4e5f60718293a4b5c6d7-0123456789abcdef-01"


def test_a_requests_traceparent_comes_back_with_its_reply(
        rt: Any, pkg: Package, agent: ScriptedAgent, links: Callable[..., AgentLink], game: Game) -> None:
    link, peer, hello = connect(links, rt, agent)
    # The prepare is answered at once; the commit at a later safe point: both carry it back.
    peer.send({"id": 51, "traceparent": TRACEPARENT, "prepare": {"patchId": "p-t", "modules": {pkg.modname: V2}}})
    frame, prep = peer.expect("prepareResult")
    assert prep["ok"] is True, prep
    assert frame["replyTo"] == 51 and frame["traceparent"] == TRACEPARENT
    peer.send({"id": 52, "traceparent": TRACEPARENT, "commit": {"patchId": "p-t"}})
    frame, commit = peer.expect("commitResult")
    assert commit["ok"] is True and commit["pauseMs"] >= 0, commit
    assert frame["traceparent"] == TRACEPARENT
    # Without one (an agent that traces nothing) the reply has none.
    peer.send({"id": 53, "statusQuery": {}})
    frame, _ = peer.expect("status")
    assert "traceparent" not in frame


def test_commit_runs_on_the_game_thread(rt: Any, pkg: Package, agent: ScriptedAgent,
                                        links: Callable[..., AgentLink], game: Game) -> None:
    _, peer, _ = connect(links, rt, agent)
    # A hook would be the natural probe, but a method records its caller's thread just as well.
    probe = V1 + textwrap.dedent('''
        import threading
        COMMIT_THREAD = []


        def __reload_module__(old):
            COMMIT_THREAD.append(threading.get_ident())
        ''')
    assert peer.request("prepare", {"patchId": "p-probe", "modules": {pkg.modname: probe}}, "prepareResult")["ok"]
    assert peer.request("commit", {"patchId": "p-probe"}, "commitResult")["ok"]
    assert pkg.module.COMMIT_THREAD == [game.thread_id]


def test_prepare_failure_leaves_the_process_untouched(rt: Any, pkg: Package, agent: ScriptedAgent,
                                                      links: Callable[..., AgentLink], game: Game) -> None:
    _, peer, _ = connect(links, rt, agent)
    code_before = pkg.module.damage.__code__
    before = peer.request("statusQuery", {}, "status")
    result = peer.request("prepare", {"patchId": "p-bad", "modules": {pkg.modname: BROKEN}}, "prepareResult")
    assert result["ok"] is False
    assert result["errorKind"] == "prepare"
    assert result["error"]
    assert json.loads(result["detailJson"])["error"] == "PrepareError"  # structured, for the operator
    assert pkg.module.damage.__code__ is code_before
    assert peer.request("statusQuery", {}, "status") == before
    commit = peer.request("commit", {"patchId": "p-bad"}, "commitResult")
    assert commit["ok"] is False and commit["errorKind"] == "commit" and "not prepared" in commit["error"]
    outside = peer.request("prepare", {"patchId": "p-out", "modules": {"json": "X = 1\n"}}, "prepareResult")
    assert outside["ok"] is False and outside["errorKind"] == "prepare"


def test_abort_drops_the_prepared_patch(rt: Any, pkg: Package, agent: ScriptedAgent,
                                        links: Callable[..., AgentLink], game: Game) -> None:
    _, peer, _ = connect(links, rt, agent)
    assert peer.request("prepare", {"patchId": "p-x", "modules": {pkg.modname: V2}}, "prepareResult")["ok"]
    aborted = peer.request("abort", {"patchId": "p-x"}, "abortResult")
    assert aborted["ok"] is True and json.loads(aborted["detailJson"])["aborted"] is True
    assert peer.request("statusQuery", {}, "status")["preparedPatchId"] == ""
    again = peer.request("abort", {"patchId": "p-x"}, "abortResult")  # idempotent
    assert again["ok"] is True and json.loads(again["detailJson"])["aborted"] is False
    commit = peer.request("commit", {"patchId": "p-x"}, "commitResult")
    assert commit["ok"] is False
    assert pkg.module.damage(5) == 10


def test_a_prepared_patch_survives_an_agent_reconnect(rt: Any, pkg: Package, agent: ScriptedAgent,
                                                     links: Callable[..., AgentLink], game: Game) -> None:
    _, peer, _ = connect(links, rt, agent)
    assert peer.request("prepare", {"patchId": "p-r", "modules": {pkg.modname: V2}}, "prepareResult")["ok"]
    # One prepared transaction at a time: a second one is refused until the first is resolved.
    second = peer.request("prepare", {"patchId": "p-s", "modules": {pkg.modname: V3}}, "prepareResult")
    assert second["ok"] is False and second["errorKind"] == "prepare" and "p-r" in second["error"]
    peer.close()  # the agent restarts between prepare and commit
    again = agent.accept()
    again.handshake()
    status = again.request("statusQuery", {}, "status")
    assert status["preparedPatchId"] == "p-r" and status["patchStack"] == []
    # Preparing the same patch again is idempotent, and the commit goes through.
    assert again.request("prepare", {"patchId": "p-r", "modules": {pkg.modname: V2}}, "prepareResult")["ok"]
    assert again.request("commit", {"patchId": "p-r"}, "commitResult")["patchStack"] == ["p-r"]
    assert pkg.module.damage(5) == 11


def test_rollback_of_a_patch_only_prepared_here_drops_it_so_the_next_prepare_goes_through(
        rt: Any, pkg: Package, agent: ScriptedAgent, links: Callable[..., AgentLink], game: Game) -> None:
    # The fleet rolls back a patch whose commit never reached this process.
    _, peer, _ = connect(links, rt, agent)
    assert peer.request("prepare", {"patchId": "p-lost", "modules": {pkg.modname: V2}}, "prepareResult")["ok"]
    result = peer.request("rollback", {"patchId": "p-lost"}, "rollbackResult")
    assert result["ok"] is True and json.loads(result["detailJson"])["noop"] is True
    assert result["patchStack"] == [] and rt.pending is None
    assert pkg.module.damage(5) == 10
    # Nothing is left pending in the way of the next patch.
    assert peer.request("prepare", {"patchId": "p-next", "modules": {pkg.modname: V3}}, "prepareResult")["ok"]


def test_rollback_of_a_patch_this_process_does_not_run_touches_nothing(
        rt: Any, pkg: Package, agent: ScriptedAgent, links: Callable[..., AgentLink], game: Game) -> None:
    _, peer, _ = connect(links, rt, agent)
    assert peer.request("prepare", {"patchId": "p-a", "modules": {pkg.modname: V2}}, "prepareResult")["ok"]
    assert peer.request("commit", {"patchId": "p-a"}, "commitResult")["ok"]
    # The fleet rolls back p-b, which never committed here: p-a beneath must stay.
    result = peer.request("rollback", {"patchId": "p-b"}, "rollbackResult")
    assert result["ok"] is True and json.loads(result["detailJson"])["noop"] is True
    assert result["patchStack"] == ["p-a"]
    assert pkg.module.damage(5) == 11
    # Stacked patches roll back newest first; asking for the older one is refused.
    assert peer.request("prepare", {"patchId": "p-c", "modules": {pkg.modname: V3}}, "prepareResult")["ok"]
    assert peer.request("commit", {"patchId": "p-c"}, "commitResult")["patchStack"] == ["p-a", "p-c"]
    wrong = peer.request("rollback", {"patchId": "p-a"}, "rollbackResult")
    assert wrong["ok"] is False and wrong["errorKind"] == "rollback"
    assert pkg.module.Counter().bump() == 10
    assert peer.request("rollback", {"patchId": "p-c"}, "rollbackResult")["patchStack"] == ["p-a"]
    assert peer.request("rollback", {}, "rollbackResult")["patchStack"] == []  # no id: the newest
    assert pkg.module.damage(5) == 10 and pkg.module.Counter().bump() == 1


def test_health_is_answered_while_a_commit_waits_for_the_safe_point(
        rt: Any, pkg: Package, agent: ScriptedAgent, links: Callable[..., AgentLink]) -> None:
    _, peer, _ = connect(links, rt, agent)
    assert peer.request("prepare", {"patchId": "p-w", "modules": {pkg.modname: V2}}, "prepareResult")["ok"]
    peer.send({"id": 501, "commit": {"patchId": "p-w"}})
    # No game thread yet: the commit cannot land, but the link must keep serving.
    health = peer.request("healthQuery", {"since": "0"}, "health")
    assert health["alive"] is True and health["gameOk"] is True and health["gameDetail"] == "test game fine"
    for key in ("ticks", "mark", "exceptionsSince", "ticksSince"):
        assert isinstance(health[key], int)
    for key in ("tickP50Ms", "tickP99Ms"):
        assert isinstance(health[key], (int, float))
    assert pkg.module.damage(5) == 10
    game = Game(rt).start()
    try:
        frame, result = peer.expect("commitResult")
        assert frame["replyTo"] == 501 and result["ok"] is True
        assert pkg.module.damage(5) == 11
        deadline = time.monotonic() + TIMEOUT
        while peer.request("healthQuery", {"since": 0}, "health")["ticks"] == 0:
            assert time.monotonic() < deadline, "the game ticks, health must count it"
            time.sleep(0.01)
    finally:
        game.stop()


def test_health_reports_exceptions_since_a_mark(rt: Any, agent: ScriptedAgent,
                                                links: Callable[..., AgentLink], game: Game) -> None:
    _, peer, _ = connect(links, rt, agent)
    mark = rt.mark()
    rt.record_exception(RuntimeError("boom"))
    health = peer.request("healthQuery", {"since": str(mark)}, "health")
    assert health["exceptionsSince"] >= 1


# --------------------------------------------------------------------------------------
# misbehaving agents


def test_garbage_frames_get_errors_and_the_connection_survives(
        rt: Any, pkg: Package, agent: ScriptedAgent, links: Callable[..., AgentLink], game: Game) -> None:
    link, peer, _ = connect(links, rt, agent)

    def error_for(raw: bytes) -> Dict[str, Any]:
        peer.send_raw(struct.pack(">I", len(raw)) + raw)
        frame, body = peer.expect("error")
        body["_replyTo"] = frame.get("replyTo", 0)
        return body

    assert error_for(b"{this is not json")["code"] == "malformed"
    assert error_for(b"\xc3\x28")["code"] == "malformed"
    assert error_for(b"")["code"] == "malformed"
    assert error_for(b'"a string"')["code"] == "malformed"
    assert error_for(b'{"id": 9}')["code"] == "malformed"
    both = error_for(b'{"id": 10, "statusQuery": {}, "healthQuery": {}}')
    assert both["code"] == "malformed" and both["_replyTo"] == 10
    unknown = error_for(b'{"id": 11, "teleport": {"to": "mars"}}')
    assert unknown["code"] == "unknown" and unknown["_replyTo"] == 11 and "teleport" in unknown["message"]
    assert error_for(b'{"id": 12, "hello": {}}')["code"] == "unknown"  # a runtime->agent message
    assert error_for(b'{"statusQuery": {}}')["code"] == "malformed"  # a request needs an id
    bad_prepare = error_for(b'{"id": 13, "prepare": {"patchId": "p", "modules": {"m": 5}}}')
    assert bad_prepare["code"] == "malformed" and bad_prepare["_replyTo"] == 13
    assert error_for(b'{"id": 14, "healthQuery": {"since": "soon"}}')["code"] == "malformed"

    # Still the same connection, still serving, nothing changed.
    assert peer.request("statusQuery", {}, "status")["patchStack"] == []
    assert link.connected
    assert agent.no_connection_within(0.3)
    assert pkg.module.damage(5) == 10


def test_oversized_length_closes_and_reconnects(rt: Any, agent: ScriptedAgent,
                                                links: Callable[..., AgentLink], game: Game) -> None:
    link, peer, hello = connect(links, rt, agent)
    peer.send_raw(struct.pack(">I", 16 * 1024 * 1024 + 1) + b"{")
    assert peer.closed_by_link(), "an oversized frame must close the connection"
    again = agent.accept()
    second = again.handshake()
    assert second["processId"] == hello["processId"], "the process id is stable across reconnects"
    assert link.wait_connected(TIMEOUT)
    assert again.request("statusQuery", {}, "status")["patchStack"] == []


def test_agent_absent_at_start_then_appears(rt: Any, sockdir: str, links: Callable[..., AgentLink],
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hotfleet.agent_link")
    path = os.path.join(sockdir, "late.sock")
    late = ScriptedAgent(path, listen=False)
    try:
        link = links(rt, path)
        time.sleep(0.3)
        assert not link.connected
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "not reachable" in r.getMessage()]
        assert len(warnings) == 1, "an absent agent is reported once, not on every retry"
        late.listen()
        late.accept().handshake()
        assert link.wait_connected(TIMEOUT)
    finally:
        late.close()


def test_peer_disconnect_mid_request_then_reconnect(rt: Any, pkg: Package, agent: ScriptedAgent,
                                                    links: Callable[..., AgentLink]) -> None:
    link, peer, _ = connect(links, rt, agent)
    assert peer.request("prepare", {"patchId": "p-d", "modules": {pkg.modname: V2}}, "prepareResult")["ok"]
    peer.send({"id": 77, "commit": {"patchId": "p-d"}})
    time.sleep(0.1)  # the link has the request; the game has not reached a safe point
    peer.close()  # the agent dies mid-request
    game = Game(rt).start()
    try:
        again = agent.accept()
        hello = again.handshake()
        # The commit was queued before the disconnect: it landed, atomically, and the new
        # connection learns it from the hello.
        deadline = time.monotonic() + TIMEOUT
        while "p-d" not in hello["patchStack"] and time.monotonic() < deadline:
            status = again.request("statusQuery", {}, "status")
            hello["patchStack"] = status["patchStack"]
        assert hello["patchStack"] == ["p-d"]
        assert pkg.module.damage(5) == 11
        # The link serves the new connection normally.
        assert again.request("rollback", {"patchId": "p-d"}, "rollbackResult")["ok"]
        assert pkg.module.damage(5) == 10
    finally:
        game.stop()


def test_peer_disconnect_mid_frame_then_agent_restart(rt: Any, agent: ScriptedAgent,
                                                      links: Callable[..., AgentLink], game: Game) -> None:
    link, peer, _ = connect(links, rt, agent)
    whole = pack({"id": 5, "statusQuery": {}})
    peer.send_raw(whole[:7])  # half a frame, then the agent crashes
    peer.close()
    agent.stop_listening()  # and its socket is gone for a while
    time.sleep(0.3)
    assert not link.connected
    agent.listen()  # the agent restarts on the same path
    again = agent.accept()
    again.handshake()
    assert link.wait_connected(TIMEOUT)
    assert again.request("statusQuery", {}, "status")["patchStack"] == []


def test_stop_ends_the_link(rt: Any, agent: ScriptedAgent, links: Callable[..., AgentLink]) -> None:
    link, peer, _ = connect(links, rt, agent)
    link.stop()
    assert not link.connected
    assert peer.closed_by_link(2.0)
    assert agent.no_connection_within(0.3)


# --------------------------------------------------------------------------------------
# patch stack sync for a late-starting process


def send_pieces(peer: Peer, header: Dict[str, Any], patches: List[Dict[str, Any]], piece: int = 1 << 18) -> int:
    """Send the patches' sources as the agent does (protocol v2): ``sourcePart`` frames of at
    most ``piece`` characters, each with ``header`` (the id or replyTo tying them to their
    message). Returns how many were sent."""
    count = 0
    for patch in patches:
        for module, source in patch["modules"].items():
            for start in range(0, max(len(source), 1), piece):
                peer.send({**header, "sourcePart": {"patchId": patch["patchId"], "module": module,
                                                    "text": source[start:start + piece]}})
                count += 1
    return count


def answer_stack_query(peer: Peer, patches: Optional[List[Dict[str, Any]]], seen: List[Dict[str, Any]],
                       error: Optional[Dict[str, str]] = None, inline: bool = False) -> None:
    """Agent side of one sync: read a stackQuery, answer it (or not, if ``patches`` is None):
    the sources in pieces, then the stackReply (``inline``: all in the reply, as protocol v1)."""
    frame, body = peer.expect("stackQuery")
    seen.append(body)
    if error is not None:
        peer.send({"id": 2, "replyTo": frame["id"], "error": error})
    elif inline:
        peer.send({"id": "2", "replyTo": str(frame["id"]), "stackReply": {"patches": patches}})
    elif patches is not None:
        # ids as strings, as a 64-bit-faithful proto3 JSON encoder sends them
        parts = send_pieces(peer, {"replyTo": str(frame["id"])}, patches)
        listed = [{"patchId": p["patchId"]} for p in patches]
        peer.send({"id": "2", "replyTo": str(frame["id"]), "stackReply": {"patches": listed, "parts": parts}})


def serve_stack(agent: ScriptedAgent, patches: Optional[List[Dict[str, Any]]], seen: List[Dict[str, Any]],
                error: Optional[Dict[str, str]] = None) -> threading.Thread:
    """In a thread: accept the link, welcome it, answer one stackQuery."""

    def run() -> None:
        peer = agent.accept()
        peer.handshake()
        answer_stack_query(peer, patches, seen, error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sync_patch_stack_applies_the_fleet_stack_on_the_calling_thread(
        rt: Any, pkg: Package, agent: ScriptedAgent, links: Callable[..., AgentLink]) -> None:
    counter = pkg.module.Counter()
    stack = [
        {"patchId": "p-1", "modules": {pkg.modname: V2}},
        {"patchId": "p-2", "modules": {pkg.modname: V3}},
    ]
    seen: List[Dict[str, Any]] = []
    thread = serve_stack(agent, stack, seen)
    link = links(rt, agent.path, build="zone-7")
    # No game thread: sync commits on the caller, before the game loop runs.
    assert link.sync_patch_stack(timeout=TIMEOUT) == ["p-1", "p-2"]
    thread.join(TIMEOUT)
    assert seen == [{"build": "zone-7"}]
    assert [e.id for e in rt.patch_stack] == ["p-1", "p-2"]
    assert pkg.module.damage(5) == 11 and counter.bump() == 10

    # A second sync skips what is already applied.
    thread = threading.Thread(target=answer_stack_query, args=(agent.peers[0], stack, seen), daemon=True)
    thread.start()
    assert link.sync_patch_stack(timeout=TIMEOUT) == []
    thread.join(TIMEOUT)
    assert len(seen) == 2
    assert [e.id for e in rt.patch_stack] == ["p-1", "p-2"]


#: Source characters JSON escapes: a quote, a backslash (written twice in the string literal
#: below), a tab, two non-ASCII ones; 6 characters, 9 bytes of UTF-8.
BLOB_UNIT = '"\\\\\té€'


def big_patch(base: str, n: int) -> str:
    """``base`` plus a function returning ~6.3 MiB of escapable text."""
    return base + "\n\ndef blob():\n    return '''" + f"{n}:" + BLOB_UNIT * 700_000 + "'''\n"


def test_a_stack_over_the_frame_limit_reaches_the_stack_sync_intact(
        rt: Any, pkg: Package, agent: ScriptedAgent, links: Callable[..., AgentLink],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Three ordinary 6.3 MiB patches: one frame cannot carry them (issue 9); pieces can.
    patches = [{"patchId": f"p-{n}", "modules": {pkg.modname: big_patch(base, n)}}
               for n, base in enumerate([V2, V3, V3.replace("+ 1", "+ 2")], start=1)]
    assert all(len(p["modules"][pkg.modname].encode()) > 6_300_000 for p in patches)
    assert sum(len(json.dumps(p, ensure_ascii=False).encode()) for p in patches) > 16 * 1024 * 1024
    prepared: List[Tuple[str, Dict[str, str]]] = []
    real_prepare = rt.prepare

    def recording_prepare(modules: Dict[str, str], txn_id: str) -> Any:
        prepared.append((txn_id, modules))
        return real_prepare(modules, txn_id=txn_id)

    monkeypatch.setattr(rt, "prepare", recording_prepare)
    thread = serve_stack(agent, patches, [])
    link = links(rt, agent.path)
    assert link.sync_patch_stack(timeout=60.0) == ["p-1", "p-2", "p-3"]
    thread.join(TIMEOUT)
    assert prepared == [(p["patchId"], p["modules"]) for p in patches], "every source arrives intact"
    assert pkg.module.damage(5) == 12 and pkg.module.blob() == "3:" + BLOB_UNIT.replace("\\\\", "\\") * 700_000


def test_an_incomplete_stack_reply_fails_the_sync_clearly(rt: Any, pkg: Package, agent: ScriptedAgent,
                                                          links: Callable[..., AgentLink]) -> None:
    def run() -> None:
        peer = agent.accept()
        peer.handshake()
        frame, _ = peer.expect("stackQuery")
        sent = send_pieces(peer, {"replyTo": frame["id"]}, [{"patchId": "p-1", "modules": {pkg.modname: V2}}])
        peer.send({"id": 2, "replyTo": frame["id"], "stackReply": {"patches": [{"patchId": "p-1"}], "parts": sent + 1}})

    threading.Thread(target=run, daemon=True).start()
    link = links(rt, agent.path)
    with pytest.raises(hotfleet.HotfleetError, match=r"does not add up: expected 2 source pieces.*received 1"):
        link.sync_patch_stack(timeout=TIMEOUT)
    assert rt.patch_stack == [] and pkg.module.damage(5) == 10


def test_a_stack_reply_with_inline_sources_still_works(rt: Any, pkg: Package, agent: ScriptedAgent,
                                                       links: Callable[..., AgentLink]) -> None:
    def run() -> None:
        peer = agent.accept()
        peer.handshake()
        answer_stack_query(peer, [{"patchId": "p-1", "modules": {pkg.modname: V2}}], [], inline=True)

    threading.Thread(target=run, daemon=True).start()
    assert links(rt, agent.path).sync_patch_stack(timeout=TIMEOUT) == ["p-1"]
    assert pkg.module.damage(5) == 11


def test_a_prepare_arrives_in_pieces(rt: Any, pkg: Package, agent: ScriptedAgent,
                                     links: Callable[..., AgentLink]) -> None:
    links(rt, agent.path)
    peer = agent.accept()
    peer.handshake()
    patch = {"patchId": "p-big", "modules": {pkg.modname: big_patch(V2, 1)}}
    sent = send_pieces(peer, {"id": 77}, [patch])
    assert sent > 1
    result = peer.request("prepare", {"patchId": "p-big", "parts": sent}, "prepareResult", frame_id=77)
    assert result["ok"], result
    assert rt.prepared("p-big") is not None
    # Pieces that do not add up are refused, naming the request; nothing is prepared.
    send_pieces(peer, {"id": 78}, [{"patchId": "p-odd", "modules": {pkg.modname: V3}}])
    peer.send({"id": 78, "prepare": {"patchId": "p-odd", "parts": 5}})
    frame, error = peer.expect("error")
    assert frame["replyTo"] == 78 and error["code"] == "malformed" and "expected 5" in error["message"]
    assert rt.prepared("p-odd") is None


def test_sync_patch_stack_times_out_clearly(rt: Any, agent: ScriptedAgent, links: Callable[..., AgentLink]) -> None:
    seen: List[Dict[str, Any]] = []
    thread = serve_stack(agent, None, seen)  # receives the query, never answers
    link = links(rt, agent.path)
    started = time.monotonic()
    with pytest.raises(hotfleet.HotfleetError, match="did not answer within 1s"):
        link.sync_patch_stack(timeout=1.0)
    assert time.monotonic() - started < 3.0
    thread.join(TIMEOUT)
    assert seen and seen[0] == {"build": "dev"}


def test_sync_patch_stack_without_agent_fails_clearly(rt: Any, sockdir: str, links: Callable[..., AgentLink]) -> None:
    link = links(rt, os.path.join(sockdir, "nobody.sock"))
    with pytest.raises(hotfleet.HotfleetError, match="no connection to hotfleet-agent"):
        link.sync_patch_stack(timeout=0.5)


def test_sync_patch_stack_reports_a_failing_patch(rt: Any, pkg: Package, agent: ScriptedAgent,
                                                  links: Callable[..., AgentLink]) -> None:
    seen: List[Dict[str, Any]] = []
    serve_stack(agent, [
        {"patchId": "p-ok", "modules": {pkg.modname: V2}},
        {"patchId": "p-broken", "modules": {pkg.modname: BROKEN}},
    ], seen)
    link = links(rt, agent.path)
    with pytest.raises(hotfleet.HotfleetError, match=r"p-broken failed to prepare.*p-ok"):
        link.sync_patch_stack(timeout=TIMEOUT)
    assert [e.id for e in rt.patch_stack] == ["p-ok"]
    assert pkg.module.damage(5) == 11


def test_sync_patch_stack_surfaces_an_agent_error(rt: Any, agent: ScriptedAgent,
                                                  links: Callable[..., AgentLink]) -> None:
    seen: List[Dict[str, Any]] = []
    serve_stack(agent, None, seen, error={"code": "unknown_build", "message": "no stack for build dev"})
    link = links(rt, agent.path)
    with pytest.raises(hotfleet.HotfleetError, match="no stack for build dev"):
        link.sync_patch_stack(timeout=TIMEOUT)


# --------------------------------------------------------------------------------------
# games written only from the runtime README


@pytest.fixture
def readme(pkg: Package, agent: ScriptedAgent,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Tuple[Any, AgentLink]]]:
    """A game set up with nothing but the README: the environment, ``Runtime(...)`` and
    ``rt.connect()``; returns ``(rt, link)``. Stopped and closed at teardown."""
    made: List[Tuple[Any, AgentLink]] = []

    def make(build: str = "dev") -> Tuple[Any, AgentLink]:
        monkeypatch.setenv("HOTFLEET_AGENT_SOCKET", agent.path)
        monkeypatch.setenv("HOTFLEET_BUILD", build)
        rt = hotfleet.Runtime(packages=[pkg.name])
        made.append((rt, rt.connect()))
        return made[-1]

    yield make
    for rt, link in made:
        link.stop()
        rt.close()


def test_an_asyncio_game_written_from_the_readme_reports_ticks(
        pkg: Package, agent: ScriptedAgent, readme: Callable[..., Tuple[Any, AgentLink]]) -> None:
    # The README's three lines, with the asyncio helper "instead of line 3", and nothing else.
    import asyncio

    rt, link = readme()
    peer = agent.accept()
    peer.handshake()
    answer_stack_query(peer, [], [])  # connect() brings the process to its build's stack
    mark = rt.mark()

    async def game() -> None:
        handle = hotfleet.asyncio_safe_point(rt, asyncio.get_running_loop(), interval=0.02)
        await asyncio.sleep(0.3)  # the game's own coroutines run here
        handle.close()

    asyncio.run(game())
    health = peer.request("healthQuery", {"since": mark}, "health")
    # The coordinator's health gate needs ticks in its window, or it rolls back for
    # "no health data".
    assert health["ticks"] > 0 and health["ticksSince"] > 0, health
    assert health["alive"] is True
    assert rt.health()["tick_p99_ms"] is not None


def test_a_threadsafe_scheduler_game_reports_ticks(pkg: Package) -> None:
    import queue

    rt = hotfleet.Runtime(packages=[pkg.name])
    try:
        calls: "queue.Queue[Callable[[], None]]" = queue.Queue()  # the framework's thread-safe entry
        handle = hotfleet.threadsafe_scheduler(rt, calls.put, interval=0.02)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # the framework's own thread runs what it is handed
            try:
                calls.get(timeout=0.05)()
            except queue.Empty:
                pass
        handle.close()
        assert rt.health()["ticks"] > 0
    finally:
        rt.close()


# --------------------------------------------------------------------------------------
# no drift: connect() applies the build's patch stack


def test_connect_applies_the_build_stack_before_the_game_serves(
        pkg: Package, agent: ScriptedAgent, readme: Callable[..., Tuple[Any, AgentLink]]) -> None:
    counter = pkg.module.Counter()
    stack = [{"patchId": "p-1", "modules": {pkg.modname: V2}}, {"patchId": "p-2", "modules": {pkg.modname: V3}}]
    seen: List[Dict[str, Any]] = []
    thread = serve_stack(agent, stack, seen)
    rt, link = readme(build="zone-7")
    # A game that must not open its player port earlier waits, on its own thread; the
    # commits land here, at safe points the wait runs, before the game loop starts.
    assert rt.wait_until_current(TIMEOUT) is True
    thread.join(TIMEOUT)
    assert seen == [{"build": "zone-7"}]
    assert [e.id for e in rt.patch_stack] == ["p-1", "p-2"]
    assert pkg.module.damage(5) == 11 and counter.bump() == 10
    assert link.current


def test_a_game_that_just_ticks_gets_the_stack_at_its_first_safe_points(
        pkg: Package, agent: ScriptedAgent, readme: Callable[..., Tuple[Any, AgentLink]]) -> None:
    seen: List[Dict[str, Any]] = []
    serve_stack(agent, [{"patchId": "p-1", "modules": {pkg.modname: V2}}], seen)
    rt, link = readme()  # the README's three lines, no wait
    game = Game(rt).start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while pkg.module.damage(5) != 11:
            assert time.monotonic() < deadline, "the stack must land without the game asking"
            time.sleep(0.01)
        assert [e.id for e in rt.patch_stack] == ["p-1"]
        assert rt.wait_until_current(TIMEOUT) is True  # from another thread: waits, runs nothing
    finally:
        game.stop()


def test_stack_sync_retries_until_the_agent_can_serve_the_stack(
        pkg: Package, agent: ScriptedAgent, readme: Callable[..., Tuple[Any, AgentLink]]) -> None:
    seen: List[Dict[str, Any]] = []

    def run() -> None:
        peer = agent.accept()
        peer.handshake()
        answer_stack_query(peer, None, seen, error={"code": "unavailable", "message": "coordinator unreachable"})
        answer_stack_query(peer, [{"patchId": "p-1", "modules": {pkg.modname: V2}}], seen)

    threading.Thread(target=run, daemon=True).start()
    rt, link = readme()
    assert rt.wait_until_current(0.2) is False  # the first answer was an error
    assert not link.current and pkg.module.damage(5) == 10
    assert rt.wait_until_current(TIMEOUT) is True
    assert len(seen) == 2 and [e.id for e in rt.patch_stack] == ["p-1"]


def test_explicit_sync_still_works_beside_the_automatic_one(
        pkg: Package, agent: ScriptedAgent, readme: Callable[..., Tuple[Any, AgentLink]]) -> None:
    # Games written before connect() synced (the example zone server) call sync_patch_stack
    # on their thread: it joins the automatic sync (one stackQuery, commits on this thread).
    seen: List[Dict[str, Any]] = []
    serve_stack(agent, [{"patchId": "p-1", "modules": {pkg.modname: V2}}], seen)
    rt, link = readme()
    assert link.wait_connected(TIMEOUT)
    assert link.sync_patch_stack(timeout=TIMEOUT) == ["p-1"]
    assert [e.id for e in rt.patch_stack] == ["p-1"] and pkg.module.damage(5) == 11
    assert rt.wait_until_current(TIMEOUT) is True and len(seen) == 1


def test_explicit_sync_beside_the_automatic_one_reports_its_failure(
        pkg: Package, agent: ScriptedAgent, readme: Callable[..., Tuple[Any, AgentLink]]) -> None:
    # Two answers: when the automatic round failed before the explicit call joined, the
    # join kicks a retry, which asks the agent again (one answer made this test flaky).
    def run() -> None:
        peer = agent.accept()
        peer.handshake()
        answer_stack_query(peer, [{"patchId": "p-broken", "modules": {pkg.modname: BROKEN}}], [])
        try:
            answer_stack_query(peer, [{"patchId": "p-broken", "modules": {pkg.modname: BROKEN}}], [])
        except Exception:  # noqa: BLE001 - no retry came: the test ended and closed the link
            pass

    threading.Thread(target=run, daemon=True).start()
    rt, link = readme()
    started = time.monotonic()
    with pytest.raises(hotfleet.HotfleetError, match="p-broken failed to prepare"):
        link.sync_patch_stack(timeout=TIMEOUT)
    assert time.monotonic() - started < TIMEOUT / 2, "a failed round is reported at once"
    assert rt.patch_stack == [] and not link.current


def test_wait_until_current_needs_a_connection(rt: Any) -> None:
    with pytest.raises(hotfleet.HotfleetError, match="connect"):
        rt.wait_until_current(0.1)


def test_a_sync_round_that_breaks_unexpectedly_leaves_the_process_not_current(rt: Any) -> None:
    from hotfleet.stack_sync import StackSync

    def fetch(within: float, timeout: float) -> List[Any]:
        raise RuntimeError("bug in the fetch")

    sync = StackSync(rt, fetch)
    with pytest.raises(RuntimeError):
        sync.run_queued(1.0, lambda: False)
    assert not sync.current
    with pytest.raises(hotfleet.HotfleetError, match="RuntimeError: bug in the fetch"):
        sync.join(0.2, lambda: False)
    assert sync.wait(0.05, lambda: False) is False


def test_revert_prepare_commit_and_undo_over_the_link(
        rt: Any, pkg: Package, agent: ScriptedAgent, links: Callable[..., AgentLink], game: Game) -> None:
    link, peer, hello = connect(links, rt, agent)
    base = peer.request("statusQuery", {}, "status")["liveDigests"][pkg.modname]
    assert peer.request("prepare", {"patchId": "p-fix", "modules": {pkg.modname: V2}}, "prepareResult")["ok"]
    assert peer.request("commit", {"patchId": "p-fix"}, "commitResult")["ok"]
    assert pkg.module.damage(5) == 11

    # A process that does not run the patch has nothing to revert.
    noop = peer.request("prepare", {"patchId": "p-other", "revert": True}, "prepareResult")
    assert noop["ok"] is True and json.loads(noop["detailJson"])["noop"] is True

    prep = peer.request("prepare", {"patchId": "p-fix", "revert": True}, "prepareResult")
    assert prep["ok"] is True, prep
    assert "notes" in json.loads(prep["detailJson"]) and pkg.module.damage(5) == 11
    commit = peer.request("commit", {"patchId": "p-fix", "revert": True}, "commitResult")
    assert commit["ok"] is True and commit["patchStack"] == [], commit
    assert pkg.module.damage(5) == 10
    assert peer.request("statusQuery", {}, "status")["liveDigests"][pkg.modname] == base
    again = peer.request("commit", {"patchId": "p-fix", "revert": True}, "commitResult")
    assert again["ok"] is True and again["patchStack"] == []

    undo = peer.request("rollback", {"patchId": "p-fix", "revert": True}, "rollbackResult")
    assert undo["ok"] is True and undo["patchStack"] == ["p-fix"], undo
    assert pkg.module.damage(5) == 11
    twice = peer.request("rollback", {"patchId": "p-fix", "revert": True}, "rollbackResult")
    assert twice["ok"] is True and json.loads(twice["detailJson"])["noop"] is True

    # An aborted revert leaves the patch running.
    assert peer.request("prepare", {"patchId": "p-fix", "revert": True}, "prepareResult")["ok"]
    assert peer.request("abort", {"patchId": "p-fix", "revert": True}, "abortResult")["ok"]
    assert rt.pending is None and pkg.module.damage(5) == 11
