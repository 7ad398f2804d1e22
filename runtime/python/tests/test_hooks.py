"""Hooks: order, arguments, instance finding with frozen heaps and a disabled collector."""

from __future__ import annotations

import copy
import gc
import inspect
import pickle

import pytest

import hotfleet
from hotfleet.snapshot import class_snapshot

HOOKED = """
class Mob:
    def __init__(self, name):
        self.name = name
    def attack(self):
        return 1
    def __reload_instance__(self):
        pass
class Boss(Mob):
    pass
"""

HOOKED_V2 = HOOKED.replace("return 1", "return 2").replace(
    "    def __reload_instance__(self):\n        pass", "    def __reload_instance__(self):\n        self.patched = self.attack()"
)


def test_hooks_run_in_order_with_old_globals(pkg):
    rt, m = pkg.load(
        "order",
        """
        LOG = []
        LEVEL = 1
        class Mob:
            def go(self):
                return 1
        """,
    )
    mob = m.Mob()
    txn = rt.prepare({m.__name__: pkg.src("""
        LOG = []
        LEVEL = 2
        def __reload_module__(old):
            LOG.append(("module", old["LEVEL"], LEVEL, type(old).__name__))
            try:
                old["LEVEL"] = 5
            except TypeError:
                LOG.append("old is read-only")
        class Mob:
            def go(self):
                return 2
            @classmethod
            def __reload_class__(cls):
                LOG.append(("class", cls.__name__))
            def __reload_instance__(self):
                LOG.append(("instance", self.go()))
        """)})
    hooks = [i.obj for i in txn.plan.modules[0].of("hook")]
    assert hooks == ["__reload_module__(old)", "Mob.__reload_class__()", "Mob.__reload_instance__()"]
    report = txn.commit()
    assert m.LOG == [("module", 1, 2, "mappingproxy"), "old is read-only", ("class", "Mob"), ("instance", 2)]
    assert report.counts["module_hooks"] == 1 and report.counts["instances_hooked"] == 1
    assert mob.go() == 2


def test_instance_hook_reaches_subclass_instances_and_plan_counts_them(pkg):
    rt, m = pkg.load("mobs", HOOKED)
    mobs = [m.Mob("m1"), m.Mob("m2"), m.Boss("b1")]
    txn = rt.prepare({m.__name__: HOOKED_V2})
    hook = txn.plan.modules[0].of("hook")[0]
    assert hook.count == 3 and "tracked" in hook.detail
    report = txn.commit()
    assert [x.patched for x in mobs] == [2, 2, 2]
    assert report.counts["instances_hooked"] == 3 and report.instance_scans == []


def test_tracked_instances_found_after_gc_freeze(pkg, gc_state):
    rt, m = pkg.load("frozen", HOOKED)
    mobs = [m.Mob(str(i)) for i in range(200)]
    gc.collect()
    gc.freeze()
    assert not any(type(o) is m.Mob for o in gc.get_objects())  # what a heap scan would see
    report = rt.prepare({m.__name__: HOOKED_V2}).commit()
    assert report.counts["instances_hooked"] == 200 and report.instance_scans == []
    assert all(x.patched == 2 for x in mobs)
    assert gc.get_freeze_count() > 0


@pytest.mark.parametrize("tuning", ["freeze", "disable"])
def test_hook_added_by_patch_finds_existing_untracked_instances(pkg, gc_state, tuning):
    plain = HOOKED.replace("    def __reload_instance__(self):\n        pass\n", "")
    rt, m = pkg.load("added", plain)
    mobs = [m.Mob(str(i)) for i in range(300)] + [m.Boss("boss")]
    assert "__new__" not in m.Mob.__dict__  # classes without the hook pay nothing
    if tuning == "freeze":
        gc.collect()
        gc.freeze()
        frozen = gc.get_freeze_count()
    else:
        gc.disable()
    txn = rt.prepare({m.__name__: HOOKED_V2})
    hook = txn.plan.modules[0].of("hook")[0]
    assert "one-time heap scan" in hook.detail
    report = txn.commit()
    assert report.counts["instances_hooked"] == 301 and len(report.instance_scans) == 1
    assert all(x.patched == 2 for x in mobs)
    if tuning == "freeze":
        assert gc.get_freeze_count() >= frozen  # still frozen afterwards
    else:
        assert not gc.isenabled()
    # from now on new instances are tracked: the next commit needs no scan
    late = m.Mob("late")
    again = rt.prepare({m.__name__: HOOKED_V2.replace("return 2", "return 3")}).commit()
    assert again.instance_scans == [] and late.patched == 3 and mobs[0].patched == 3


def test_instances_created_before_runtime_found_once_at_creation(pkg, gc_state):
    pkg.write("early", HOOKED)
    early = pkg.imp("early")  # imported before the runtime exists
    mobs = [early.Mob(str(i)) for i in range(50)]
    gc.collect()
    gc.freeze()
    rt = pkg.runtime()
    report = rt.prepare({early.__name__: HOOKED_V2}).commit()
    assert report.instance_scans == [] and report.counts["instances_hooked"] == 50
    assert all(x.patched == 2 for x in mobs)


def test_tracking_keeps_signature_pickling_copy_and_weakness(pkg):
    rt, m = pkg.load(
        "trk",
        """
        class Item:
            def __init__(self, name, qty=1):
                self.name = name
                self.qty = qty
            def __reload_instance__(self):
                pass
        """,
    )
    Item = m.Item
    assert isinstance(Item.__dict__["__new__"], staticmethod)  # tracker installed at import
    assert str(inspect.signature(Item)) == "(name, qty=1)"
    it = Item("potion", 3)
    clone = pickle.loads(pickle.dumps(it))
    dup = copy.copy(it)
    assert (clone.name, clone.qty, dup.qty) == ("potion", 3, 3)
    tracker = rt._tracker
    assert {id(x) for x in tracker.registry.instances(Item)} >= {id(it), id(clone), id(dup)}
    del clone, dup
    gc.collect()
    assert {id(x) for x in tracker.registry.instances(Item)} == {id(it)}


def test_changed_dunder_new_of_tracked_class_keeps_tracking(pkg):
    rt, m = pkg.load(
        "newer",
        """
        class Tok:
            def __new__(cls, *args):
                obj = super().__new__(cls)
                obj.tag = "old"
                return obj
            def __reload_instance__(self):
                pass
        """,
    )
    a = m.Tok()
    rt.prepare({m.__name__: pkg.src("""
        class Tok:
            def __new__(cls, *args):
                obj = super().__new__(cls)
                obj.tag = "new"
                return obj
            def __reload_instance__(self):
                self.seen = True
        """)}).commit()
    b = m.Tok()
    assert a.tag == "old" and b.tag == "new" and a.seen is True
    report = rt.prepare({m.__name__: rt.live_source(m.__name__).replace("self.seen = True", "self.seen = 2")}).commit()
    assert report.counts["instances_hooked"] == 2 and b.seen == 2


def test_slotted_class_without_weakref_is_found_by_scan(pkg):
    rt, m = pkg.load(
        "slots2",
        """
        class P:
            __slots__ = ("x",)
            def __init__(self, x):
                self.x = x
            def __reload_instance__(self):
                pass
        """,
    )
    ps = [m.P(i) for i in range(3)]
    report = rt.prepare({m.__name__: rt.live_source(m.__name__).replace("pass", "self.x = self.x * 10")}).commit()
    assert [p.x for p in ps] == [0, 10, 20] and report.counts["instances_hooked"] == 3
    rt.rollback()
    assert [p.x for p in ps] == [0, 1, 2]


@pytest.mark.parametrize("undo", ["rollback", "failed commit"])
def test_class_stays_constructible_after_a_tracker_patch_is_undone(pkg, undo):
    plain = HOOKED.replace("    def __reload_instance__(self):\n        pass\n", "")
    rt, m = pkg.load("undone", plain)
    old = m.Mob("old")
    new_src = HOOKED_V2 if undo == "rollback" else HOOKED_V2.replace("self.patched = self.attack()", "raise RuntimeError('bad hook')")
    txn = rt.prepare({m.__name__: new_src})
    if undo == "rollback":
        txn.commit()
        rt.rollback()
    else:
        with pytest.raises(hotfleet.CommitError):
            txn.commit()
    fresh, boss = m.Mob("fresh"), m.Boss("boss")  # CPython keeps tp_new overridden: must still work
    assert (fresh.name, boss.name, old.attack()) == ("fresh", "boss", 1)
    assert class_snapshot(m.Mob).get("__new__") is None and not hasattr(old, "patched")


def test_user_new_added_then_rolled_back_and_removed(pkg):
    rt, m = pkg.load("usernew", "class P:\n    def __init__(self, x):\n        self.x = x\n")
    rt.prepare({m.__name__: pkg.src("""
        class P:
            def __new__(cls, x):
                obj = super().__new__(cls)
                obj.made = True
                return obj
            def __init__(self, x):
                self.x = x
        """)}).commit()
    assert m.P(1).made is True
    rt.rollback()
    p = m.P(2)
    assert p.x == 2 and not hasattr(p, "made")
    rt.prepare({m.__name__: rt.live_source(m.__name__).replace("self.x = x", "self.x = x * 10")}).commit()
    assert m.P(3).x == 30
