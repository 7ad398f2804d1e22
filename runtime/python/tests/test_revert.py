"""Revert: a committed patch taken off the stack through an ordinary transaction."""

from __future__ import annotations

import pytest

import hotfleet

from conftest import fingerprint_module

BASE = """
class Player:
    def __init__(self, name):
        self.name = name
    def greet(self):
        return "hello " + self.name
def damage(x):
    return x
"""

GREET = """
class Player:
    def __init__(self, name):
        self.name = name
    def greet(self):
        return "welcome " + self.name
    def title(self):
        return "sir " + self.name
def damage(x):
    return x
"""

GREET_AGAIN = GREET.replace("welcome", "greetings")

STATS = """
def total(xs):
    return sum(xs)
"""


def _commit(rt, sources, txn_id):
    txn = rt.prepare(sources, txn_id=txn_id)
    txn.commit()
    return txn


def test_revert_of_the_top_brings_functions_and_classes_back_and_live_instances_keep_working(pkg):
    rt, m = pkg.load("zone", BASE)
    alice = m.Player("alice")
    before = fingerprint_module(m)
    base_digests = rt.live_digests()
    _commit(rt, {m.__name__: pkg.src(GREET)}, "p1")
    assert alice.greet() == "welcome alice" and alice.title() == "sir alice"

    txn = rt.prepare_revert("p1")
    assert txn.reverts == "p1" and txn.id == "revert-p1"
    assert any("restores code, not instance data" in n for n in txn.plan.to_dict()["notes"])
    assert [e.id for e in rt.patch_stack] == ["p1"], "prepare changes nothing live"
    txn.commit()

    assert alice.greet() == "hello alice" and not hasattr(m.Player, "title")
    assert m.Player("bob").greet() == "hello bob"
    assert rt.patch_stack == [] and rt.live_digests() == base_digests
    assert fingerprint_module(m) == before
    assert rt.reverted("p1") is not None and rt.transaction("p1") is None


def test_a_deeper_patch_is_reverted_when_the_patches_above_touch_none_of_its_modules(pkg):
    rt, m = pkg.load("zone", BASE)
    pkg.write("stats", STATS)
    s = pkg.imp("stats")
    _commit(rt, {m.__name__: pkg.src(GREET)}, "p1")
    _commit(rt, {s.__name__: pkg.src(STATS.replace("sum(xs)", "sum(xs) * 2"))}, "p2")

    rt.prepare_revert("p1").commit()

    assert m.Player("a").greet() == "hello a"
    assert s.total([1, 2]) == 6, "the patch above stays"
    assert [e.id for e in rt.patch_stack] == ["p2"]


def test_a_revert_under_a_patch_touching_its_modules_is_refused_naming_it(pkg):
    rt, m = pkg.load("zone", BASE)
    _commit(rt, {m.__name__: pkg.src(GREET)}, "p1")
    _commit(rt, {m.__name__: pkg.src(GREET_AGAIN)}, "p2")
    with pytest.raises(hotfleet.PrepareError) as info:
        rt.prepare_revert("p1")
    assert "p2" in str(info.value) and "touch its modules" in str(info.value)
    with pytest.raises(hotfleet.PrepareError, match="not on this process's patch stack"):
        rt.prepare_revert("nope")
    assert [e.id for e in rt.patch_stack] == ["p1", "p2"] and rt.pending is None
    assert m.Player("a").greet() == "greetings a"


def test_the_revert_of_the_top_restores_the_source_of_the_patch_beneath(pkg):
    rt, m = pkg.load("zone", BASE)
    _commit(rt, {m.__name__: pkg.src(GREET)}, "p1")
    digests = rt.live_digests()
    _commit(rt, {m.__name__: pkg.src(GREET_AGAIN)}, "p2")
    rt.prepare_revert("p2").commit()
    assert m.Player("a").greet() == "welcome a"
    assert rt.live_digests() == digests and [e.id for e in rt.patch_stack] == ["p1"]


def test_undoing_a_revert_is_exact_and_puts_the_entry_back_in_place(pkg):
    rt, m = pkg.load("zone", BASE)
    pkg.write("stats", STATS)
    s = pkg.imp("stats")
    _commit(rt, {m.__name__: pkg.src(GREET)}, "p1")
    _commit(rt, {s.__name__: pkg.src(STATS.replace("sum(xs)", "sum(xs) * 2"))}, "p2")
    alice = m.Player("alice")
    patched = fingerprint_module(m)
    digests = rt.live_digests()
    rt.prepare_revert("p1").commit()
    assert alice.greet() == "hello alice"

    report = rt.undo_revert("p1")

    assert report.errors == []
    assert fingerprint_module(m) == patched and rt.live_digests() == digests
    assert alice.greet() == "welcome alice"
    assert [e.id for e in rt.patch_stack] == ["p1", "p2"] and rt.reverted("p1") is None
    # p1 is an ordinary stack entry again: the top can still be rolled back, then p1
    rt.rollback()
    rt.rollback()
    assert alice.greet() == "hello alice" and rt.patch_stack == []
    with pytest.raises(hotfleet.RollbackError, match="no revert in force"):
        rt.undo_revert("p1")


def test_an_aborted_revert_changes_nothing_and_a_reapplied_patch_can_be_reverted_again(pkg):
    rt, m = pkg.load("zone", BASE)
    _commit(rt, {m.__name__: pkg.src(GREET)}, "p1")
    txn = rt.prepare_revert("p1")
    txn.abort()
    assert m.Player("a").greet() == "welcome a" and [e.id for e in rt.patch_stack] == ["p1"]
    rt.prepare_revert("p1").commit()
    _commit(rt, {m.__name__: pkg.src(GREET)}, "p1")
    assert rt.reverted("p1") is None, "the patch came back: its old revert is gone"
    rt.prepare_revert("p1").commit()
    assert m.Player("a").greet() == "hello a" and rt.patch_stack == []


def test_a_revert_queued_for_the_safe_point_and_undone_there(pkg):
    rt, m = pkg.load("zone", BASE)
    _commit(rt, {m.__name__: pkg.src(GREET)}, "p1")
    future = rt.request_commit(rt.prepare_revert("p1"))
    assert rt.safe_point() == 1 and future.result(0).txn_id == "revert-p1"
    assert m.Player("a").greet() == "hello a"
    undo = rt.request_undo_revert("p1")
    assert rt.safe_point() == 1 and undo.result(0).errors == []
    assert m.Player("a").greet() == "welcome a"
