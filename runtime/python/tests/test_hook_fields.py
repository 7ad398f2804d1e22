"""The cheap instance-hook path: a hook whose writes to its instance are known from its
bytecode has only those attributes recorded; anything the analysis cannot bound takes the
general path (whole ``__dict__`` copies). Same guarantees either way."""

from __future__ import annotations

import pytest

import hotfleet
from hotfleet import transaction
from hotfleet.hook_writes import attrs_for_type


def _helper(obj):
    obj.hp = 0


class Plain:
    def simple(self):
        self.gen = 1
        if self.hp < 0:
            self.hp = 0
        self.calls += 1
        del self.tmp

    def calls_method(self):
        self.heal()

    def passes_self(self):
        _helper(self)

    def aliases_self(self):
        me = self
        me.hp = 1

    def takes_method(self):
        heal = self.heal
        heal()

    def heal(self):
        self.hp = 100


class WithProperty:
    @property
    def hp(self):
        return 1

    @hp.setter
    def hp(self, value):
        self.other = value

    def hook(self):
        self.hp = 2


class WithSetattr:
    def __setattr__(self, name, value):
        object.__setattr__(self, "seen", name)
        object.__setattr__(self, name, value)

    def hook(self):
        self.hp = 2


def test_written_attributes_are_read_off_the_hook():
    assert attrs_for_type(Plain.simple, Plain) == ("calls", "gen", "hp", "tmp")


@pytest.mark.parametrize("hook", ["calls_method", "passes_self", "aliases_self", "takes_method"])
def test_a_hook_whose_instance_escapes_is_not_bounded(hook):
    assert attrs_for_type(getattr(Plain, hook), Plain) is None


def test_descriptors_and_setattr_overrides_are_not_bounded():
    assert attrs_for_type(WithProperty.hook, WithProperty) is None
    assert attrs_for_type(WithSetattr.hook, WithSetattr) is None


SOURCE = """
class Mob:
    def __init__(self, i):
        self.i = i
        self.hp = 10
        self.tmp = "x"
    def __reload_instance__(self):
        pass
"""

PATCHED = SOURCE.replace(
    "        pass\n",
    """        self.mana = 5
        self.hp = self.hp * 2
        del self.tmp
        if self.i == FAIL_AT:
            raise ValueError("bad mob")
""",
) + "FAIL_AT = -1\n"


@pytest.fixture
def no_general_path(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the general (whole __dict__ copy) path ran")

    # the general path snapshots with dict.copy: the loop must only ever get the getter
    original = transaction._hook_loop

    def only_fields(hook, refs, cols, snap, dead_row):
        if snap is dict.copy:
            refuse()
        return original(hook, refs, cols, snap, dead_row)

    monkeypatch.setattr(transaction, "_hook_loop", only_fields)


def test_failing_hook_restores_every_instance_exactly(pkg, no_general_path):
    rt, m = pkg.load("mobs", SOURCE)
    mobs = [m.Mob(i) for i in range(6)]
    before = [dict(mob.__dict__) for mob in mobs]
    txn = rt.prepare({m.__name__: pkg.src(PATCHED.replace("FAIL_AT = -1", "FAIL_AT = 3"))})
    with pytest.raises(hotfleet.CommitError):
        txn.commit()
    assert [dict(mob.__dict__) for mob in mobs] == before
    assert all(mob.__dict__["tmp"] == "x" for mob in mobs)


def test_rollback_restores_hooked_attributes_but_keeps_game_changes(pkg, no_general_path):
    rt, m = pkg.load("mobs2", SOURCE)
    a, b = m.Mob(1), m.Mob(2)
    rt.prepare({m.__name__: pkg.src(PATCHED)}).commit()
    assert (a.hp, a.mana, "tmp" in a.__dict__) == (20, 5, False)
    b.hp = 7  # gameplay after the commit
    report = rt.rollback()
    assert a.__dict__ == {"i": 1, "hp": 10, "tmp": "x"}
    assert b.hp == 7 and "mana" not in b.__dict__ and b.tmp == "x"
    assert [c["name"] for c in report.conflicts] == ["hp"]
