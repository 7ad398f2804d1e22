"""Combat rules: how much damage one blow does and what happens when it lands.

Deterministic on purpose (no random crits or misses), so a test can compute the damage
of any attack from the two combatants' stats.
"""

from __future__ import annotations

from typing import Any, Dict, Protocol


#: No blow does less than this, however thick the armor.
MIN_DAMAGE = 1


class Combatant(Protocol):
    """What combat needs from an attacker or a defender (players and monsters both)."""

    armor: int
    hp: int

    def attack_power(self) -> int:
        """Raw damage before the defender's armor."""

    def take_damage(self, amount: int) -> int:
        """Lose up to ``amount`` hp; returns the hp actually lost."""

    def is_alive(self) -> bool:
        """True while it has hit points left."""


def mitigate(raw: int, armor: int) -> int:
    """Damage left after armor: each point of armor absorbs one point of damage."""
    # Hotfix: armor was added to the blow instead of absorbing it.
    return max(MIN_DAMAGE, raw - armor)


def compute_damage(attacker: Combatant, defender: Combatant) -> int:
    """Damage ``attacker`` deals to ``defender`` with one blow."""
    return mitigate(attacker.attack_power(), defender.armor)


def resolve_attack(attacker: Combatant, defender: Combatant) -> Dict[str, Any]:
    """Apply one blow; returns the damage dealt, the defender's hp after it, and whether it died."""
    damage = compute_damage(attacker, defender)
    lost = defender.take_damage(damage)
    return {"damage": damage, "hp_lost": lost, "target_hp": defender.hp, "killed": not defender.is_alive()}
