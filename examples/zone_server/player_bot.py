#!/usr/bin/env python3
"""Simulated players for the example zone server: a library and a CLI.

As a library::

    from player_bot import PlayerBot, attack_dummy, get_stats
    with PlayerBot("127.0.0.1", port, "alice") as bot:
        bot.login()
        damage = attack_dummy(bot)      # one attack on the training dummy -> damage dealt
        me = get_stats(bot)             # the full stats reply (player state, server pid)

As a CLI (the demo and the Rust tests spawn it)::

    python player_bot.py --port P --name N --count K --duration S

runs K bots (named N-0 .. N-(K-1), or just N when K is 1) that log in, then move,
attack the training dummy and ping every ``--interval`` seconds for S seconds, recording
every reply. The last stdout line is one JSON summary::

    {"ok": true, "connected_throughout": true, "bots": 1, "sent": 42, "received": 42,
     "timeouts": 0, "damage_values": [16, 8], "last_stats": {...}, "per_bot": [...]}

``damage_values`` lists the distinct damage numbers in the order they were first seen,
so a hot patch that changes the damage formula mid-run shows up as ``[16, 8]``. The exit
status is 0 only if every bot stayed connected the whole time (and no request went
unanswered); 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

#: Moves that walk a small square around the spawn point, so the bot stays in attack
#: range of the training dummy for ever.
PATROL = [(1, 0), (0, 1), (-1, 0), (0, -1)]


class BotError(Exception):
    """The server answered ``ok: false`` (or something unexpected) to a request."""


class Disconnected(BotError):
    """The connection to the server was lost."""


class PlayerBot:
    """One simulated player: a TCP connection speaking the zone's line-JSON protocol."""

    def __init__(self, host: str, port: int, name: str, timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.name = name
        self.timeout = timeout
        self.sock: Optional[socket.socket] = None
        self._buf = b""
        self._seq = 0
        #: Every reply received, in order.
        self.replies: List[Dict[str, Any]] = []
        #: Lines the server pushed without a request (e.g. the shutdown event).
        self.events: List[Dict[str, Any]] = []
        self.sent = 0
        self.received = 0
        self.timeouts = 0
        #: Why the connection was lost (None while it never was).
        self.lost_reason: Optional[str] = None
        self.connected_at: Optional[float] = None

    # -- connection ----------------------------------------------------------------

    def connect(self) -> "PlayerBot":
        """Open the TCP connection."""
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connected_at = time.monotonic()
        return self

    def close(self) -> None:
        """Close the connection (a deliberate close is not a lost connection)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "PlayerBot":
        return self if self.sock is not None else self.connect()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """True while the connection is open and was never lost."""
        return self.sock is not None and self.lost_reason is None

    def _lose(self, reason: str) -> Disconnected:
        if self.lost_reason is None:
            self.lost_reason = reason
        return Disconnected(f"{self.name}: connection lost: {reason}")

    # -- requests ------------------------------------------------------------------

    def request(self, kind: str, **fields: Any) -> Dict[str, Any]:
        """Send one request and return its reply (``ok`` may be false; see ``call``)."""
        if self.sock is None:
            raise Disconnected(f"{self.name}: not connected")
        if self.lost_reason is not None:
            raise Disconnected(f"{self.name}: connection lost: {self.lost_reason}")
        self._seq += 1
        seq = self._seq
        line = json.dumps({"type": kind, "seq": seq, **fields}).encode("utf-8") + b"\n"
        try:
            self.sock.sendall(line)
        except OSError as exc:
            raise self._lose(f"send failed: {exc}") from None
        self.sent += 1
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_line(deadline)
            if reply.get("seq") == seq:
                self.received += 1
                self.replies.append(reply)
                return reply
            if "seq" in reply and isinstance(reply["seq"], int) and reply["seq"] < seq:
                self.received += 1  # a late reply to a request that timed out
                self.replies.append(reply)
                continue
            self.events.append(reply)

    def _read_line(self, deadline: float) -> Dict[str, Any]:
        assert self.sock is not None
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.timeouts += 1
                raise BotError(f"{self.name}: no reply within {self.timeout:g}s")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                raise self._lose("server shut down" if self._server_shut_down() else f"receive failed: {exc}") from None
            if not data:
                raise self._lose("server shut down" if self._server_shut_down() else "server closed the connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            raise BotError(f"{self.name}: server sent a line that is not JSON: {line[:200]!r}") from None
        if isinstance(reply, dict) and reply.get("type") == "event":
            self.events.append(reply)
            return self._read_line(deadline)
        if not isinstance(reply, dict):
            raise BotError(f"{self.name}: server sent {reply!r}")
        return reply

    def _server_shut_down(self) -> bool:
        return any(e.get("event") == "shutdown" for e in self.events)

    def call(self, kind: str, **fields: Any) -> Dict[str, Any]:
        """Like ``request`` but raises BotError when the server answers ``ok: false``."""
        reply = self.request(kind, **fields)
        if not reply.get("ok"):
            raise BotError(f"{self.name}: {kind} refused: {reply.get('error')}")
        return reply

    def login(self) -> Dict[str, Any]:
        """Log in as ``self.name``; returns the reply (with the new player's state)."""
        return self.call("login", name=self.name)

    def move(self, dx: int, dy: int) -> Dict[str, Any]:
        """Step by (dx, dy), each -1, 0 or 1."""
        return self.call("move", dx=dx, dy=dy)

    def attack(self, target: str = "dummy") -> Dict[str, Any]:
        """Hit ``target`` once; the reply has ``damage`` and ``target_hp``."""
        return self.call("attack", target=target)

    def use_item(self, item: str) -> Dict[str, Any]:
        """Use (or equip) one ``item`` from the inventory."""
        return self.call("use_item", item=item)

    def pick_up(self, item: Optional[str] = None) -> Dict[str, Any]:
        """Pick up the nearest item in reach (or the named one)."""
        return self.call("pick_up", **({} if item is None else {"item": item}))

    def stats(self) -> Dict[str, Any]:
        """The full stats reply: ``player`` state, ``zone``, server ``pid``, ``tick``."""
        return self.call("stats")

    def ping(self) -> Dict[str, Any]:
        """Liveness round trip."""
        return self.call("ping")


def attack_dummy(bot: PlayerBot) -> int:
    """One attack on the training dummy; returns the damage dealt."""
    return int(bot.attack("dummy")["damage"])


def get_stats(bot: PlayerBot) -> Dict[str, Any]:
    """The bot's ``stats`` reply (player state and the server's pid)."""
    return bot.stats()


# --------------------------------------------------------------------------------------
# the CLI


def run_bot(host: str, port: int, name: str, duration: float, interval: float,
            timeout: float, verbose: bool = False) -> Dict[str, Any]:
    """Play for ``duration`` seconds; returns this bot's summary.

    A refused or unanswered request is recorded and play goes on; only a lost
    connection ends the run early.
    """
    bot = PlayerBot(host, port, name, timeout=timeout)
    damage_values: List[int] = []
    last_stats: Optional[Dict[str, Any]] = None
    errors: List[str] = []
    logged_in = False

    def attempt(action: Callable[[], Any]) -> Any:
        try:
            return action()
        except Disconnected:
            raise
        except BotError as exc:
            if len(errors) < 100:
                errors.append(str(exc))
            return None

    try:
        bot.connect()
        bot.login()
        logged_in = True
        last_stats = attempt(bot.stats)
        end = time.monotonic() + duration
        step = 0
        while time.monotonic() < end:
            dx, dy = PATROL[step % len(PATROL)]
            attempt(lambda: bot.move(dx, dy))  # noqa: B023  (called right here)
            damage = attempt(lambda: attack_dummy(bot))
            if damage is not None and damage not in damage_values:
                damage_values.append(damage)
                if verbose:
                    print(f"{name}: attack on dummy now deals {damage}", file=sys.stderr, flush=True)
            attempt(bot.ping)
            if step % 10 == 0:
                last_stats = attempt(bot.stats) or last_stats
            step += 1
            time.sleep(max(0.0, min(interval, end - time.monotonic())))
        last_stats = attempt(bot.stats) or last_stats
    except Disconnected as exc:
        errors.append(str(exc))
    except (BotError, OSError) as exc:  # could not connect or log in
        errors.append(f"{name}: {exc}")
    finally:
        bot.close()
    return {
        "name": name,
        "logged_in": logged_in,
        "connected_throughout": logged_in and bot.lost_reason is None,
        "lost_reason": bot.lost_reason,
        "sent": bot.sent,
        "received": bot.received,
        "timeouts": bot.timeouts,
        "errors": errors,
        "damage_values": damage_values,
        "last_stats": last_stats,
        "events": bot.events,
    }


def main(argv: Optional[List[str]] = None) -> int:
    """Run the bots; print the JSON summary; 0 only if none lost its connection."""
    p = argparse.ArgumentParser(description="simulated players for the hotfleet example zone server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="bot", help="player name (with -0, -1... when --count > 1)")
    p.add_argument("--count", type=int, default=1, help="number of bots (default 1)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds to play (default 5)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between action rounds (default 0.2)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for any reply (default 10)")
    p.add_argument("--verbose", action="store_true", help="report damage changes on stderr as they happen")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be at least 1")

    names = [args.name] if args.count == 1 else [f"{args.name}-{i}" for i in range(args.count)]
    results: List[Optional[Dict[str, Any]]] = [None] * len(names)

    def play(index: int) -> None:
        results[index] = run_bot(args.host, args.port, names[index], args.duration, args.interval,
                                 args.timeout, args.verbose)

    started = time.monotonic()
    threads = [threading.Thread(target=play, args=(i,), name=n) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_bot = [r for r in results if r is not None]
    damage_values: List[int] = []
    for r in per_bot:
        for d in r["damage_values"]:
            if d not in damage_values:
                damage_values.append(d)
    connected = len(per_bot) == len(names) and all(r["connected_throughout"] for r in per_bot)
    timeouts = sum(r["timeouts"] for r in per_bot)
    summary = {
        "ok": connected and timeouts == 0,
        "connected_throughout": connected,
        "bots": len(names),
        "duration_s": round(time.monotonic() - started, 3),
        "sent": sum(r["sent"] for r in per_bot),
        "received": sum(r["received"] for r in per_bot),
        "timeouts": timeouts,
        "damage_values": damage_values,
        "last_stats": per_bot[0]["last_stats"] if per_bot else None,
        "per_bot": per_bot,
    }
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
