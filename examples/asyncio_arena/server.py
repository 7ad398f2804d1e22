#!/usr/bin/env python3
"""A small asyncio game, integrated with hotfleet from the runtime README's lines only.

Players connect over TCP and speak the zone server's line protocol, in part: ``login``,
``ping``, ``attack`` (the training dummy) and ``stats``, one JSON object per line each
way, ``seq`` echoed. Everything runs on the asyncio loop's thread; the game logic lives in
the ``arena`` package, the only one patches may touch.

The hotfleet integration, as the runtime README writes it for a framework-driven loop:
line 1 (``hotfleet.Runtime`` before the game package is imported), line 2
(``rt.connect()``) with the README's ``rt.wait_until_current(timeout)`` before the port
opens, and ``hotfleet.asyncio_safe_point(rt, loop)`` instead of line 3: it runs the safe
points on the loop and counts the ticks the agent's health gate needs.

Run from the repository root::

    PYTHONPATH=runtime/python:examples/asyncio_arena \\
        python examples/asyncio_arena/server.py --zone arena --port 0 --port-file /tmp/arena.port
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
from typing import Any, Dict, List, Optional

import hotfleet

rt = hotfleet.Runtime(packages=["arena"])  # [hotfleet 1/3] before importing the game package

from arena import rules  # noqa: E402  (imported after the runtime, as the README asks)

log = logging.getLogger("asyncio_arena")

EXIT_SYNC_FAILED = 3


def handle(request: Dict[str, Any], state: Dict[str, Any], zone: str) -> Dict[str, Any]:
    """One request -> its reply (on the loop's thread, like every game-state change)."""
    kind = request.get("type")
    reply: Dict[str, Any] = {"type": kind, "ok": True}
    if kind == "ping":
        reply.update(zone=zone, pid=os.getpid())
    elif kind == "login":
        state["player"] = rules.fighter(str(request.get("name", "anonymous")))
        reply.update(player=state["player"], zone=zone, pid=os.getpid())
    elif state.get("player") is None:
        reply.update(ok=False, error="log in first")
    elif kind == "attack":
        player = state["player"]
        dealt = rules.damage(player["attack_power"], rules.DUMMY_ARMOR)
        player["hits"] += 1
        player["damage_dealt"] += dealt
        reply.update(target="dummy", damage=dealt)
    elif kind == "stats":
        reply.update(player=state["player"], zone=zone, pid=os.getpid())
    else:
        reply.update(ok=False, error=f"unknown request type {kind!r}")
    if "seq" in request:
        reply["seq"] = request["seq"]
    return reply


async def serve_player(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, zone: str) -> None:
    state: Dict[str, Any] = {"player": None}
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            try:
                request = json.loads(line)
                reply = handle(request, state, zone) if isinstance(request, dict) else {
                    "type": "error", "ok": False, "error": "a request is a JSON object"}
            except ValueError as exc:
                reply = {"type": "error", "ok": False, "error": f"bad JSON: {exc}"}
            except Exception as exc:  # a bug in game logic must not kill the game
                rt.record_exception(exc)
                reply = {"type": "error", "ok": False, "error": f"internal error: {type(exc).__name__}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


def write_port_file(path: str, port: int) -> None:
    """Write the port atomically: readers see no file or the whole number."""
    fd, tmp = tempfile.mkstemp(prefix=".port-", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    handle_ = hotfleet.asyncio_safe_point(rt, loop)  # [hotfleet 3/3] instead of `with rt.tick()`
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(lambda r, w: serve_player(r, w, args.zone), args.host, args.port)
    port = server.sockets[0].getsockname()[1]
    if args.port_file:
        write_port_file(args.port_file, port)
    print(f"arena {args.zone} listening on {args.host}:{port} pid {os.getpid()}", flush=True)
    async with server:
        await stop.wait()
    handle_.close()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="hotfleet example: a small asyncio game")
    p.add_argument("--zone", default="arena", help="name shown to players")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    p.add_argument("--port-file", help="write the bound port here (atomically) once serving")
    p.add_argument("--sync-timeout", type=float, default=30.0,
                   help="seconds to wait for the build's patch stack before giving up")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("ARENA_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{args.zone} %(process)d] %(name)s: %(message)s")
    if os.environ.get("HOTFLEET_AGENT_SOCKET"):
        rt.connect()  # [hotfleet 2/3] to the local hotfleet agent; it brings the build's patch stack
        if not rt.wait_until_current(timeout=args.sync_timeout):
            log.error("hotfleet: patch stack not applied; refusing to serve unpatched code")
            return EXIT_SYNC_FAILED
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
