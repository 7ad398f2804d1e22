"""Arena rules: what one blow does to the training dummy."""

#: A fresh fighter's attack power and the dummy's armor.
ATTACK_POWER = 12
DUMMY_ARMOR = 4
#: No blow does less than this, however thick the armor.
MIN_DAMAGE = 1


def damage(attack: int, armor: int) -> int:
    """Damage left after armor: each point of armor absorbs one point of damage."""
    return max(MIN_DAMAGE, attack - armor)


def fighter(name: str) -> dict:
    """A new fighter's state, as ``stats`` shows it."""
    return {"name": name, "attack_power": ATTACK_POWER, "hits": 0, "damage_dealt": 0}
