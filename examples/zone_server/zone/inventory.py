"""Items and the per-player inventory.

Item definitions are a module-level table so a hot patch can retune them: the runtime's
three-way data merge updates ``ITEMS`` in place unless the game changed it at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:  # only for annotations: avoids an import cycle with players
    from zone.players import Player

#: Item name -> definition. ``heal`` restores hp when used, ``attack_bonus`` is added to
#: the wielder's attack power when a weapon is equipped.
ITEMS: Dict[str, Dict[str, Any]] = {
    "potion": {"kind": "consumable", "heal": 30},
    "herb": {"kind": "consumable", "heal": 10},
    "iron_sword": {"kind": "weapon", "attack_bonus": 6},
    "wolf_pelt": {"kind": "loot"},
    "boar_tusk": {"kind": "loot"},
}

#: Distinct item kinds one inventory can hold.
CAPACITY = 20
#: Most of one item a single slot can stack.
STACK_LIMIT = 99


class InventoryError(Exception):
    """An inventory operation the player asked for is not possible (message for the client)."""


class Inventory:
    """A bag of stacked items: item name -> count."""

    def __init__(self, items: Optional[Dict[str, int]] = None) -> None:
        self.items: Dict[str, int] = {}
        for name, count in (items or {}).items():
            self.add(name, count)

    def count(self, name: str) -> int:
        """How many of ``name`` the bag holds."""
        return self.items.get(name, 0)

    def add(self, name: str, count: int = 1) -> None:
        """Put ``count`` of ``name`` into the bag, or raise InventoryError if it does not fit."""
        if name not in ITEMS:
            raise InventoryError(f"unknown item {name!r}")
        if count <= 0:
            raise InventoryError("count must be positive")
        if name not in self.items and len(self.items) >= CAPACITY:
            raise InventoryError("inventory full")
        if self.items.get(name, 0) + count > STACK_LIMIT:
            raise InventoryError(f"cannot carry more than {STACK_LIMIT} {name}")
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name: str, count: int = 1) -> None:
        """Take ``count`` of ``name`` out of the bag, or raise InventoryError."""
        have = self.items.get(name, 0)
        if count <= 0 or have < count:
            raise InventoryError(f"you have {have} {name}")
        if have == count:
            del self.items[name]
        else:
            self.items[name] = have - count

    def to_dict(self) -> Dict[str, int]:
        """A JSON-able copy, sorted so replies are stable."""
        return dict(sorted(self.items.items()))


def use_item(player: "Player", name: str) -> Dict[str, Any]:
    """Use one ``name`` from ``player``'s bag; returns what happened (for the reply).

    Consumables are used up; a weapon is equipped (the previous weapon goes back into
    the bag). Loot cannot be used.
    """
    definition = ITEMS.get(name)
    if definition is None:
        raise InventoryError(f"unknown item {name!r}")
    if player.inventory.count(name) < 1:
        raise InventoryError(f"you have no {name}")
    kind = definition["kind"]
    if kind == "consumable":
        player.inventory.remove(name)
        healed = player.heal(int(definition.get("heal", 0)))
        return {"item": name, "effect": "heal", "healed": healed, "hp": player.hp}
    if kind == "weapon":
        player.inventory.remove(name)
        previous = player.weapon
        player.weapon = name
        if previous is not None:
            player.inventory.add(previous)
        return {"item": name, "effect": "equip", "weapon": name, "attack_power": player.attack_power()}
    raise InventoryError(f"{name} cannot be used")
