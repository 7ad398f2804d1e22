"""Players: the state each connected client owns in the zone.

Live ``Player`` instances survive hot patches: the runtime updates the class in place,
so a patch that changes a method changes it for every player already online, and a
patch that adds a field initializes it in ``__reload_instance__``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from zone import inventory

#: Hit points at level 1; each level adds ``HP_PER_LEVEL``.
BASE_HP = 100
HP_PER_LEVEL = 10
#: Attack power at level 0; each level adds ``ATTACK_PER_LEVEL``.
BASE_ATTACK = 10
ATTACK_PER_LEVEL = 2
#: Armor every adventurer starts with.
BASE_ARMOR = 2
#: Experience needed for level N+1 is ``XP_PER_LEVEL * N``.
XP_PER_LEVEL = 100
#: What a new character carries.
STARTING_ITEMS: Dict[str, int] = {"potion": 2}


def max_hp_for_level(level: int) -> int:
    """Maximum hit points of a character of ``level``."""
    return BASE_HP + HP_PER_LEVEL * (level - 1)


class Player:
    """One logged-in character."""

    def __init__(self, name: str, zone_name: str, x: int = 0, y: int = 0) -> None:
        self.name = name
        #: The zone this player is in (hooks and logs use it).
        self.zone_name = zone_name
        self.level = 1
        self.xp = 0
        self.max_hp = max_hp_for_level(self.level)
        self.hp = self.max_hp
        self.armor = BASE_ARMOR
        self.x = x
        self.y = y
        self.inventory = inventory.Inventory(dict(STARTING_ITEMS))
        self.weapon: Optional[str] = None
        self.kills = 0
        self.damage_dealt = 0

    def attack_power(self) -> int:
        """Raw damage before the defender's armor: level plus the equipped weapon."""
        bonus = 0
        if self.weapon is not None:
            bonus = int(inventory.ITEMS[self.weapon].get("attack_bonus", 0))
        return BASE_ATTACK + ATTACK_PER_LEVEL * self.level + bonus

    def is_alive(self) -> bool:
        """True while the player has hit points left."""
        return self.hp > 0

    def take_damage(self, amount: int) -> int:
        """Lose up to ``amount`` hp (never below 0); returns the hp actually lost."""
        lost = min(self.hp, max(0, amount))
        self.hp -= lost
        return lost

    def heal(self, amount: int) -> int:
        """Regain up to ``amount`` hp (never above max); returns the hp actually gained."""
        gained = min(self.max_hp - self.hp, max(0, amount))
        self.hp += gained
        return gained

    def gain_xp(self, amount: int) -> bool:
        """Add experience; returns True if the player levelled up (hp refilled)."""
        self.xp += amount
        levelled = False
        while self.xp >= XP_PER_LEVEL * self.level:
            self.xp -= XP_PER_LEVEL * self.level
            self.level += 1
            self.max_hp = max_hp_for_level(self.level)
            self.hp = self.max_hp
            levelled = True
        return levelled

    def move(self, dx: int, dy: int, bound: int) -> None:
        """Step by (dx, dy), staying inside the square zone of half-width ``bound``."""
        self.x = max(-bound, min(bound, self.x + dx))
        self.y = max(-bound, min(bound, self.y + dy))

    def to_dict(self) -> Dict[str, Any]:
        """Everything the client may see about itself, JSON-able."""
        return {
            "name": self.name,
            "zone": self.zone_name,
            "level": self.level,
            "xp": self.xp,
            "hp": self.hp,
            "max_hp": self.max_hp,
            "armor": self.armor,
            "attack_power": self.attack_power(),
            "x": self.x,
            "y": self.y,
            "weapon": self.weapon,
            "inventory": self.inventory.to_dict(),
            "kills": self.kills,
            "damage_dealt": self.damage_dealt,
        }
