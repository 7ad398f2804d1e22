"""Zone state: who is here, the monsters, the items on the ground, and the tick.

Everything here is touched only by the game thread (the server's tick loop), so no locks.
Fully deterministic: spawns, respawn timers and combat involve no randomness.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Tuple

from zone import combat, inventory, players

#: What the slow respawn placement costs per tick.
SLOW_TICK_SECONDS = 0.2

#: The zone is the square [-BOUND, BOUND] x [-BOUND, BOUND].
BOUND = 50
#: Farthest (euclidean) distance an attack reaches.
ATTACK_RANGE = 8.0
#: Farthest (euclidean) distance an item can be picked up from.
PICKUP_RANGE = 1.5
#: Where players appear on login (next to the training dummy).
SPAWN_POINT: Tuple[int, int] = (0, 0)

#: Monster kinds: stats and what a kill yields. The training dummy never dies and gives
#: nothing, so attacking it is a stable, repeatable damage probe.
MONSTER_KINDS: Dict[str, Dict[str, Any]] = {
    "training_dummy": {"max_hp": 1000, "armor": 4, "attack": 0, "xp": 0, "loot": None, "respawn_ticks": 0},
    "wolf": {"max_hp": 40, "armor": 2, "attack": 9, "xp": 25, "loot": "wolf_pelt", "respawn_ticks": 100},
    "boar": {"max_hp": 60, "armor": 3, "attack": 7, "xp": 35, "loot": "boar_tusk", "respawn_ticks": 160},
}

#: Monster id -> (kind, x, y). The dummy's id is what clients attack: ``dummy``.
MONSTER_SPAWNS: Dict[str, Tuple[str, int, int]] = {
    "dummy": ("training_dummy", 0, 0),
    "wolf-1": ("wolf", 5, 5),
    "wolf-2": ("wolf", -5, 5),
    "boar-1": ("boar", 6, -4),
}

#: Ground item spawns: (item, x, y, ticks until it reappears after being picked up).
ITEM_SPAWNS: List[Tuple[str, int, int, int]] = [
    ("potion", 1, 0, 60),
    ("herb", 0, 1, 40),
    ("iron_sword", 3, 3, 600),
]


class Monster:
    """A monster at a fixed spawn point; combat treats it like a player."""

    def __init__(self, monster_id: str, kind: str, x: int, y: int) -> None:
        stats = MONSTER_KINDS[kind]
        self.id = monster_id
        self.kind = kind
        self.x = x
        self.y = y
        self.max_hp = int(stats["max_hp"])
        self.hp = self.max_hp
        self.armor = int(stats["armor"])
        self.attack = int(stats["attack"])
        #: Tick at which a dead monster comes back (None while alive).
        self.respawn_at: Optional[int] = None

    @property
    def is_dummy(self) -> bool:
        """Training dummies cannot die: they reset to full hp instead."""
        return self.kind == "training_dummy"

    def attack_power(self) -> int:
        """Raw damage this monster's blows do."""
        return self.attack

    def take_damage(self, amount: int) -> int:
        """Lose up to ``amount`` hp (never below 0); returns the hp actually lost."""
        lost = min(self.hp, max(0, amount))
        self.hp -= lost
        return lost

    def is_alive(self) -> bool:
        """True while it has hit points left."""
        return self.hp > 0

    def to_dict(self) -> Dict[str, Any]:
        """What a client may see about this monster."""
        return {"id": self.id, "kind": self.kind, "hp": self.hp, "max_hp": self.max_hp,
                "armor": self.armor, "x": self.x, "y": self.y, "alive": self.is_alive()}


class GroundItem:
    """An item spawn point: holds its item until someone picks it up, then respawns."""

    def __init__(self, item: str, x: int, y: int, respawn_ticks: int) -> None:
        self.item = item
        self.x = x
        self.y = y
        self.respawn_ticks = respawn_ticks
        self.present = True
        self.respawn_at: Optional[int] = None


class ZoneError(Exception):
    """A request the game refuses (the message goes back to the client)."""


def distance(ax: float, ay: float, bx: float, by: float) -> float:
    """Euclidean distance between two points."""
    return math.hypot(ax - bx, ay - by)


class Zone:
    """One zone: its players, monsters and ground items, advanced by ``tick()``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tick_count = 0
        self.players: Dict[str, players.Player] = {}
        self.monsters: Dict[str, Monster] = {
            mid: Monster(mid, kind, x, y) for mid, (kind, x, y) in MONSTER_SPAWNS.items()
        }
        self.ground: List[GroundItem] = [GroundItem(*spawn) for spawn in ITEM_SPAWNS]

    # -- players ---------------------------------------------------------------------

    def add_player(self, name: str) -> players.Player:
        """Create ``name``'s character at the spawn point; refuses a name already online."""
        if name in self.players:
            raise ZoneError(f"{name} is already online in {self.name}")
        player = players.Player(name, self.name, *SPAWN_POINT)
        self.players[name] = player
        return player

    def remove_player(self, name: str) -> None:
        """Forget a player who left (no persistence in this example)."""
        self.players.pop(name, None)

    # -- actions -----------------------------------------------------------------------

    def attack(self, player: players.Player, target_id: str) -> Dict[str, Any]:
        """``player`` hits the monster ``target_id`` once; returns the reply fields."""
        target = self.monsters.get(target_id)
        if target is None:
            if target_id in self.players:
                raise ZoneError("no PvP in this zone")
            raise ZoneError(f"no such target {target_id!r}")
        if not target.is_alive():
            raise ZoneError(f"{target_id} is dead")
        if distance(player.x, player.y, target.x, target.y) > ATTACK_RANGE:
            raise ZoneError(f"{target_id} is out of range")
        outcome = combat.resolve_attack(player, target)
        player.damage_dealt += outcome["hp_lost"]
        reply: Dict[str, Any] = {"target": target_id, "damage": outcome["damage"],
                                 "target_hp": outcome["target_hp"], "killed": outcome["killed"]}
        if outcome["killed"]:
            if target.is_dummy:
                # A dummy "dies" only to get back up: it is a damage probe, not a quest.
                target.hp = target.max_hp
                reply["killed"] = False
                reply["target_reset"] = True
            else:
                stats = MONSTER_KINDS[target.kind]
                target.respawn_at = self.tick_count + int(stats["respawn_ticks"])
                player.kills += 1
                reply["xp"] = int(stats["xp"])
                reply["level_up"] = player.gain_xp(int(stats["xp"]))
                loot = stats["loot"]
                if loot is not None:
                    try:
                        player.inventory.add(loot)
                        reply["loot"] = loot
                    except inventory.InventoryError:
                        reply["loot"] = None  # a full bag loses the loot, not the kill
        return reply

    def pick_up(self, player: players.Player, item: Optional[str] = None) -> Dict[str, Any]:
        """Pick up the nearest item in reach (or the named one); returns the reply fields."""
        candidates = [
            g for g in self.ground
            if g.present and (item is None or g.item == item)
            and distance(player.x, player.y, g.x, g.y) <= PICKUP_RANGE
        ]
        if not candidates:
            raise ZoneError("nothing to pick up here" if item is None else f"no {item} in reach")
        candidates.sort(key=lambda g: (distance(player.x, player.y, g.x, g.y), g.item))
        found = candidates[0]
        try:
            player.inventory.add(found.item)
        except inventory.InventoryError as exc:
            raise ZoneError(str(exc)) from exc
        found.present = False
        found.respawn_at = self.tick_count + found.respawn_ticks
        return {"item": found.item, "inventory": player.inventory.to_dict()}

    # -- time --------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance the zone by one tick: respawn monsters and items whose timer ran out."""
        self.tick_count += 1
        now = self.tick_count
        # "Smarter" respawn placement that costs ~60 ms per tick: the health gate must catch it.
        time.sleep(SLOW_TICK_SECONDS)
        for monster in self.monsters.values():
            if monster.respawn_at is not None and now >= monster.respawn_at:
                monster.hp = monster.max_hp
                monster.respawn_at = None
        for ground in self.ground:
            if not ground.present and ground.respawn_at is not None and now >= ground.respawn_at:
                ground.present = True
                ground.respawn_at = None

    def snapshot(self) -> Dict[str, Any]:
        """A JSON-able summary of the zone (the ``look`` reply and health detail)."""
        return {
            "zone": self.name,
            "tick": self.tick_count,
            "players": sorted(self.players),
            "monsters": [m.to_dict() for m in self.monsters.values()],
            "items": [{"item": g.item, "x": g.x, "y": g.y} for g in self.ground if g.present],
        }
