"""Atomic commit, stale transactions, pending semantics, rollback stack, suspended frames."""

from __future__ import annotations

import asyncio
import json
import textwrap

import pytest

import hotfleet

from conftest import fingerprint_module


def test_failing_rerun_statement_restores_everything(pkg):
    rt, m = pkg.load(
        "atomic",
        """
        X = 1
        TABLE = {"a": 1}
        def f():
            return 1
        class K:
            def m(self):
                return 1
        """,
    )
    before = fingerprint_module(m)
    table = m.TABLE
    txn = rt.prepare({m.__name__: pkg.src("""
        X = 2
        TABLE = {"a": 2}
        def f():
            return 2
        class K:
            def m(self):
                return 2
            def added(self):
                return 3
        Y = int("not a number")
        """)})
    with pytest.raises(hotfleet.CommitError) as info:
        txn.commit()
    err = info.value
    assert err.module == m.__name__ and err.lineno == 10 and "ValueError" in err.message
    assert fingerprint_module(m) == before
    assert table == {"a": 1} and m.f() == 1 and not hasattr(m.K, "added")
    assert txn.state == "failed" and rt.patch_stack == [] and rt.pending is None


def test_failing_module_hook_restores_data_it_changed(pkg):
    rt, m = pkg.load(
        "hooked",
        """
        PLAYERS = {"alice": 1}
        LEVEL = 1
        """,
    )
    players = m.PLAYERS
    txn = rt.prepare({m.__name__: pkg.src("""
        PLAYERS = {"alice": 1}
        LEVEL = 1
        def __reload_module__(old):
            global LEVEL
            LEVEL = 99
            PLAYERS["bob"] = 2
            raise RuntimeError("migration bug")
        """)})
    with pytest.raises(hotfleet.CommitError) as info:
        txn.commit()
    assert info.value.obj == "__reload_module__" and info.value.lineno == 7
    assert m.LEVEL == 1 and not hasattr(m, "__reload_module__")
    # a deep mutation (PLAYERS is the same dict) is documented as not restorable
    assert m.PLAYERS is players


def test_failing_instance_hook_restores_earlier_instances(pkg):
    rt, m = pkg.load(
        "inst",
        """
        class Mob:
            def __init__(self, i):
                self.i = i
            def __reload_instance__(self):
                pass
        """,
    )
    mobs = [m.Mob(i) for i in range(5)]
    txn = rt.prepare({m.__name__: pkg.src("""
        class Mob:
            def __init__(self, i):
                self.i = i
            def __reload_instance__(self):
                self.mana = 10
                if self.i == 3:
                    raise ValueError("bad mob")
        """)})
    with pytest.raises(hotfleet.CommitError) as info:
        txn.commit()
    assert "__reload_instance__" in info.value.obj and info.value.lineno == 7
    assert all("mana" not in mob.__dict__ for mob in mobs)


def test_stale_transaction_is_refused_at_commit(pkg):
    rt, m = pkg.load("stale", "def f():\n    return 1\n")
    rt.prepare({m.__name__: "def f():\n    return 2\n"}, txn_id="p1").commit()
    second = rt.prepare({m.__name__: "def f():\n    return 3\n"}, txn_id="p2")
    rt.rollback()  # the live source changes behind the prepared transaction's back
    code = m.f.__code__
    with pytest.raises(hotfleet.CommitError, match="changed since prepare") as info:
        second.commit()
    assert info.value.module == m.__name__
    assert m.f() == 1 and m.f.__code__ is code and second.state == "failed"
    assert rt.pending is None and rt.patch_stack == []


def test_pending_semantics_and_idempotent_prepare(pkg):
    rt, m = pkg.load("pend", "def f():\n    return 1\n")
    v2 = {m.__name__: "def f():\n    return 2\n"}
    txn = rt.prepare(v2, txn_id="patch-1")
    assert rt.prepare(v2, txn_id="patch-1") is txn
    with pytest.raises(hotfleet.PrepareError, match="pending"):
        rt.prepare({m.__name__: "def f():\n    return 3\n"}, txn_id="patch-2")
    with pytest.raises(hotfleet.PrepareError, match="different sources"):
        rt.prepare({m.__name__: "def f():\n    return 3\n"}, txn_id="patch-1")
    txn.commit()
    assert rt.prepare(v2, txn_id="patch-1") is txn and txn.state == "committed"
    with pytest.raises(hotfleet.CommitError, match="committed"):
        txn.commit()
    with pytest.raises(hotfleet.CommitError, match="committed"):
        rt.request_commit(txn)
    with pytest.raises(hotfleet.HotfleetError, match="rollback"):
        txn.abort()
    other = rt.prepare({m.__name__: "def f():\n    return 3\n"}, txn_id="patch-2")
    other.abort()
    other.abort()  # idempotent
    with pytest.raises(hotfleet.CommitError, match="aborted"):
        rt.request_commit(other)
    assert m.f() == 2


def test_two_rollbacks_undo_two_patches_then_stack_is_empty(pkg):
    rt, m = pkg.load(
        "stack",
        """
        RATE = 1
        def f():
            return "v1"
        """,
    )
    v1 = fingerprint_module(m)
    rt.prepare({m.__name__: 'RATE = 2\ndef f():\n    return "v2"\n'}, txn_id="p2").commit()
    v2 = fingerprint_module(m)
    rt.prepare({m.__name__: 'RATE = 3\ndef f():\n    return "v3"\ndef g():\n    return 1\n'}, txn_id="p3").commit()
    assert [e.id for e in rt.patch_stack] == ["p2", "p3"]
    entry = rt.patch_stack[-1]
    assert entry.digests[m.__name__] == rt.live_digests()[m.__name__]
    json.dumps([e.to_dict() for e in rt.patch_stack])
    report = rt.rollback()
    assert report.txn_id == "p3" and fingerprint_module(m) == v2 and m.f() == "v2"
    assert rt.live_digests()[m.__name__] == rt.patch_stack[-1].digests[m.__name__]
    rt.rollback()
    assert fingerprint_module(m) == v1 and m.f() == "v1" and m.RATE == 1
    with pytest.raises(hotfleet.RollbackError, match="empty"):
        rt.rollback()


@pytest.mark.parametrize("compacted", [False, True])
def test_rollback_restores_hook_data_but_keeps_what_the_game_changed_since(pkg, compacted):
    rt, m = pkg.load(
        "players",
        """
        class Player:
            def __init__(self, name):
                self.name = name
                self.hp = 10
            def __reload_instance__(self):
                pass
        """,
    )
    a, b = m.Player("a"), m.Player("b")
    rt.prepare({m.__name__: pkg.src("""
        class Player:
            def __init__(self, name):
                self.name = name
                self.hp = 10
                self.mana = 5
            def __reload_instance__(self):
                self.mana = 5
                self.hp = self.hp * 2
        """)}).commit()
    assert (a.hp, a.mana, b.hp) == (20, 5, 20)
    b.hp = 7  # gameplay after the commit
    if compacted:
        # what the next prepare does off the game thread: keep only what hooks changed
        rt.prepare({m.__name__: rt.live_source(m.__name__)}, txn_id="noop").abort()
        # this hook's writes are known from its code: the entry holds those attributes only
        fields = [e for e in rt.patch_stack[-1].journal._entries if type(e).__name__ == "_InstanceFieldsEntry"][0]
        assert fields.compacted and fields.names == ("hp", "mana") and len(fields.cols[0]) == 2
    report = rt.rollback()
    assert a.hp == 10 and "mana" not in a.__dict__
    assert b.hp == 7 and "mana" not in b.__dict__
    assert any(c["name"] == "hp" for c in report.conflicts)


def test_rollback_keeps_constant_changed_by_game_after_commit(pkg):
    rt, m = pkg.load("consts", "RATE = 1\nNAMES = ['a']\n")
    rt.prepare({m.__name__: "RATE = 2\nNAMES = ['a', 'b']\n"}).commit()
    m.RATE = 5
    m.NAMES.append("c")
    report = rt.rollback()
    assert m.RATE == 5 and m.NAMES == ["a", "b", "c"]
    assert {c["name"] for c in report.conflicts} == {"RATE", "NAMES"}


def test_suspended_generators_and_coroutines_finish_on_old_code(pkg):
    rt, m = pkg.load(
        "frames",
        """
        import asyncio
        def counter():
            yield "old-1"
            yield "old-2"
        async def job(event):
            await event.wait()
            return "old"
        """,
    )
    gen = m.counter()
    assert next(gen) == "old-1"

    async def scenario():
        event = asyncio.Event()
        task = asyncio.ensure_future(m.job(event))
        await asyncio.sleep(0)  # suspended at event.wait()
        rt.prepare({m.__name__: pkg.src("""
            import asyncio
            def counter():
                yield "new-1"
                yield "new-2"
            async def job(event):
                await event.wait()
                return "new"
            """)}).commit()
        event.set()
        old_result = await task
        event2 = asyncio.Event()
        event2.set()
        return old_result, await m.job(event2)

    assert asyncio.run(scenario()) == ("old", "new")
    assert next(gen) == "old-2"
    assert list(m.counter()) == ["new-1", "new-2"]


def test_commit_report_and_stack_entry_are_json(pkg):
    rt, m = pkg.load("report", "def f():\n    return 1\n")
    report = rt.prepare({m.__name__: "def f():\n    return 2\n"}, txn_id="r1").commit()
    data = json.loads(json.dumps(report.to_dict()))
    assert data["txn_id"] == "r1" and data["pause_ms"] >= 0 and data["counts"]["functions_swapped"] == 1
    entry = rt.patch_stack[0].to_dict()
    assert entry["id"] == "r1" and list(entry["digests"]) == [m.__name__]
    rb = rt.rollback().to_dict()
    assert rb["txn_id"] == "r1" and rb["restored_digests"][m.__name__] == entry["base_digests"][m.__name__]


def test_instance_attributes_deleted_by_a_hook_come_back(pkg):
    rt, m = pkg.load(
        "deleting",
        """
        class Player:
            def __init__(self, i):
                self.i = i
                self.legacy = "old-field"
            def __reload_instance__(self):
                pass
        """,
    )
    players = [m.Player(i) for i in range(4)]
    new_src = rt.live_source(m.__name__).replace("pass", "del self.legacy\n        self.renamed = 'new-field'")
    rt.prepare({m.__name__: new_src}).commit()
    assert all(not hasattr(p, "legacy") and p.renamed == "new-field" for p in players)
    players[0].renamed = "game-changed"
    report = rt.rollback()
    assert all(p.legacy == "old-field" for p in players)
    assert [hasattr(p, "renamed") for p in players] == [True, False, False, False]
    assert [c["name"] for c in report.conflicts] == ["renamed"]
    failing = new_src.replace("self.renamed = 'new-field'", "self.renamed = 'new-field'\n        if self.i == 2:\n            raise KeyError(self.i)")
    with pytest.raises(hotfleet.CommitError):
        rt.prepare({m.__name__: failing}).commit()
    assert all(p.legacy == "old-field" for p in players) and not hasattr(players[1], "renamed")


def test_instance_dying_during_the_hooks_is_skipped_and_rollback_still_exact(pkg):
    # The first hooked instance drops the only references to the others: their
    # turn comes with a dead reference (the commit loop keeps its columns aligned).
    rt, m = pkg.load(
        "dying",
        """
        MOBS = []
        class Mob:
            def __init__(self, i):
                self.i = i
            def __reload_instance__(self):
                pass
        """,
    )
    m.MOBS.extend(m.Mob(i) for i in range(4))
    first = m.MOBS[0]
    report = rt.prepare({m.__name__: pkg.src("""
        MOBS = []
        class Mob:
            def __init__(self, i):
                self.i = i
            def __reload_instance__(self):
                self.mana = 3
                del MOBS[1:]
        """)}).commit()
    assert report.counts["instances_hooked"] == 1 and first.mana == 3 and m.MOBS == [first]
    assert rt.rollback().conflicts == [] and first.__dict__ == {"i": 0}


def test_hook_replacing_instance_dict_is_undone_on_failure_and_rollback(pkg):
    rt, m = pkg.load(
        "swapdict",
        """
        class Mob:
            def __init__(self, i):
                self.i = i
                self.hp = 10
            def __reload_instance__(self):
                pass
        """,
    )
    mobs = [m.Mob(i) for i in range(3)]
    hook = """
        class Mob:
            def __init__(self, i):
                self.i = i
                self.hp = 10
            def __reload_instance__(self):
                self.__dict__ = {"i": self.i, "mana": 1}
                if self.i == FAIL_AT:
                    raise ValueError("bad mob")
        """
    with pytest.raises(hotfleet.CommitError):
        rt.prepare({m.__name__: pkg.src("FAIL_AT = 2\n" + textwrap.dedent(hook))}).commit()
    assert [mob.__dict__ for mob in mobs] == [{"i": i, "hp": 10} for i in range(3)]
    rt.prepare({m.__name__: pkg.src("FAIL_AT = -1\n" + textwrap.dedent(hook))}).commit()
    assert [mob.__dict__ for mob in mobs] == [{"i": i, "mana": 1} for i in range(3)]
    rt.rollback()
    assert [(mob.i, mob.hp, hasattr(mob, "mana")) for mob in mobs] == [(i, 10, False) for i in range(3)]


def test_instances_with_custom_getattribute_take_the_general_hook_path(pkg):
    rt, m = pkg.load(
        "getattr",
        """
        class Mob:
            def __init__(self, i):
                self.i = i
            def __getattribute__(self, name):
                if name == "__dict__":
                    return {"fake": True}
                return object.__getattribute__(self, name)
            def __reload_instance__(self):
                pass
        """,
    )
    mobs = [m.Mob(i) for i in range(3)]
    src = rt.live_source(m.__name__).replace("pass", "self.mana = self.i * 2\n        if self.i == FAIL_AT:\n            raise ValueError('bad')")
    with pytest.raises(hotfleet.CommitError):
        rt.prepare({m.__name__: "FAIL_AT = 1\n" + src}).commit()
    assert all("mana" not in object.__getattribute__(mob, "__dict__") for mob in mobs)
    rt.prepare({m.__name__: "FAIL_AT = -1\n" + src}).commit()
    assert [mob.mana for mob in mobs] == [0, 2, 4]
    rt.rollback()
    assert all("mana" not in object.__getattribute__(mob, "__dict__") for mob in mobs)
