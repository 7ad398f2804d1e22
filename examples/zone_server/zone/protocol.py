"""The player protocol: one JSON object per line each way, request -> reply.

Every request is ``{"type": T, ...fields, "seq": optional}``; every reply carries the same
``type``, ``"ok": true|false`` (``"error"`` says why when false) and echoes ``seq`` when the
request had one, so a client can match replies to requests. Requests:

=========  ==========================  =================================================
type       fields                      reply fields (when ok)
=========  ==========================  =================================================
login      name                        player, zone, pid
move       dx, dy (each -1, 0 or 1)    x, y
attack     target (a monster id)       target, damage, target_hp, killed (+ xp, loot...)
use_item   item                        item, effect, ...
pick_up    item (optional)             item, inventory
stats                                  player, zone, pid, tick
look                                   zone, tick, players, monsters, items
ping                                   zone, pid, tick
=========  ==========================  =================================================

A line that is not a JSON object, an unknown type or bad fields get ``ok: false`` and the
connection stays open.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, Optional

from zone import inventory, players, world

#: Player names: letters, digits, ``_`` and ``-``, 1 to 32 characters.
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class ProtocolError(Exception):
    """A request that is malformed or not allowed right now."""


class Client:
    """Per-connection protocol state: which player (if any) this connection controls."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.player: Optional[players.Player] = None


def _require_player(client: Client) -> players.Player:
    if client.player is None:
        raise ProtocolError("log in first")
    return client.player


def _int_field(msg: Dict[str, Any], key: str, default: Optional[int] = None) -> int:
    value = msg.get(key, default)
    # bool is an int subclass in Python; "dx": true is a client bug, not a step.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{key!r} must be an integer")
    return value


def _str_field(msg: Dict[str, Any], key: str) -> str:
    value = msg.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{key!r} must be a non-empty string")
    return value


def on_login(zone: world.Zone, client: Client, msg: Dict[str, Any]) -> Dict[str, Any]:
    """Create the player for this connection."""
    if client.player is not None:
        raise ProtocolError(f"already logged in as {client.player.name}")
    name = _str_field(msg, "name")
    if not NAME_RE.match(name):
        raise ProtocolError("name must be 1-32 letters, digits, '_' or '-'")
    client.player = zone.add_player(name)
    return {"player": client.player.to_dict(), "zone": zone.name, "pid": os.getpid()}


def on_move(zone: world.Zone, client: Client, msg: Dict[str, Any]) -> Dict[str, Any]:
    """Step at most one unit per axis (a speed limit, so clients cannot teleport)."""
    player = _require_player(client)
    dx = _int_field(msg, "dx", 0)
    dy = _int_field(msg, "dy", 0)
    if abs(dx) > 1 or abs(dy) > 1:
        raise ProtocolError("dx and dy must each be -1, 0 or 1")
    player.move(dx, dy, world.BOUND)
    return {"x": player.x, "y": player.y}


def on_attack(zone: world.Zone, client: Client, msg: Dict[str, Any]) -> Dict[str, Any]:
    """Hit a monster once."""
    return zone.attack(_require_player(client), _str_field(msg, "target"))


def on_use_item(zone: world.Zone, client: Client, msg: Dict[str, Any]) -> Dict[str, Any]:
    """Use a consumable or equip a weapon."""
    return inventory.use_item(_require_player(client), _str_field(msg, "item"))


def on_pick_up(zone: world.Zone, client: Client, msg: Dict[str, Any]) -> Dict[str, Any]:
    """Pick up the nearest item in reach, or the named one."""
    item = msg.get("item")
    if item is not None and not isinstance(item, str):
        raise ProtocolError("'item' must be a string")
    return zone.pick_up(_require_player(client), item)


def on_stats(zone: world.Zone, client: Client, msg: Dict[str, Any]) -> Dict[str, Any]:
    """The player's full state, plus which process serves it (tests check the pid)."""
    player = _require_player(client)
    return {"player": player.to_dict(), "zone": zone.name, "pid": os.getpid(), "tick": zone.tick_count}


def on_look(zone: world.Zone, client: Client, msg: Dict[str, Any]) -> Dict[str, Any]:
    """What is in the zone."""
    return zone.snapshot()


def on_ping(zone: world.Zone, client: Client, msg: Dict[str, Any]) -> Dict[str, Any]:
    """Liveness probe; works before login."""
    return {"zone": zone.name, "pid": os.getpid(), "tick": zone.tick_count}


Handler = Callable[[world.Zone, Client, Dict[str, Any]], Dict[str, Any]]

#: Request type -> handler.
HANDLERS: Dict[str, Handler] = {
    "login": on_login,
    "move": on_move,
    "attack": on_attack,
    "use_item": on_use_item,
    "pick_up": on_pick_up,
    "stats": on_stats,
    "look": on_look,
    "ping": on_ping,
}


def handle_message(zone: world.Zone, client: Client, msg: Any) -> Dict[str, Any]:
    """Serve one decoded request; always returns a reply (errors become ``ok: false``)."""
    if not isinstance(msg, dict):
        return {"type": "error", "ok": False, "error": "a message must be a JSON object"}
    kind = msg.get("type")
    reply: Dict[str, Any] = {"type": kind if isinstance(kind, str) else "error"}
    if "seq" in msg:
        reply["seq"] = msg["seq"]
    handler = HANDLERS.get(kind) if isinstance(kind, str) else None
    if handler is None:
        reply.update(ok=False, error=f"unknown message type {kind!r}")
        return reply
    try:
        body = handler(zone, client, msg)
    except (ProtocolError, world.ZoneError, inventory.InventoryError) as exc:
        reply.update(ok=False, error=str(exc))
        return reply
    reply["ok"] = True
    reply.update(body)
    return reply


def handle_line(zone: world.Zone, client: Client, line: bytes) -> Dict[str, Any]:
    """Decode one request line and serve it."""
    try:
        msg = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return {"type": "error", "ok": False, "error": f"not JSON: {exc}"}
    return handle_message(zone, client, msg)


def encode(reply: Dict[str, Any]) -> bytes:
    """One reply line."""
    return json.dumps(reply, separators=(",", ":")).encode("utf-8") + b"\n"
