"""Data: three-way literal updates, in-place tables, re-run statements, removed names, new modules."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

import hotfleet


def test_constant_taken_when_unchanged_kept_when_game_changed_it(pkg):
    rt, m = pkg.load(
        "tuning",
        """
        MAX_DAMAGE = 10
        SPAWN_RATE = 1.5
        MOTD = "hi"
        """,
    )
    m.SPAWN_RATE = 3.0  # the game retuned this one at run time
    txn = rt.prepare({m.__name__: pkg.src("""
        MAX_DAMAGE = 50
        SPAWN_RATE = 2.0
        MOTD = "hello"
        """)})
    plan = txn.plan.modules[0]
    assert {i.obj for i in plan.of("data")} == {"MAX_DAMAGE", "MOTD"}
    assert [i.obj for i in plan.of("conflict")] == ["SPAWN_RATE"]
    report = txn.commit()
    assert m.MAX_DAMAGE == 50 and m.MOTD == "hello" and m.SPAWN_RATE == 3.0
    assert report.counts["data_taken"] == 2 and report.counts["data_conflicts"] == 1
    assert report.conflicts[0]["obj"] == "SPAWN_RATE"


def test_strict_equality_true_is_not_one(pkg):
    rt, m = pkg.load("flags", "FLAG = 1\n")
    m.FLAG = True  # == 1, but the game changed its type
    rt.prepare({m.__name__: "FLAG = 2\n"}).commit()
    assert m.FLAG is True


def test_tables_updated_in_place_so_held_references_see_them(pkg):
    rt, m = pkg.load(
        "tables",
        """
        DROP_RATES = {"orc": 0.1, "troll": 0.2}
        ZONES = ["forest"]
        BANNED = {"cheater"}
        """,
    )
    held = (m.DROP_RATES, m.ZONES, m.BANNED)
    rt.prepare({m.__name__: pkg.src("""
        DROP_RATES = {"orc": 0.5, "troll": 0.2, "dragon": 0.01}
        ZONES = ["forest", "desert"]
        BANNED = {"cheater", "bot"}
        """)}).commit()
    assert held[0] is m.DROP_RATES and held[0] == {"orc": 0.5, "troll": 0.2, "dragon": 0.01}
    assert held[1] == ["forest", "desert"] and held[2] == {"cheater", "bot"}
    rt.rollback()
    assert held[0] == {"orc": 0.1, "troll": 0.2} and held[1] == ["forest"] and m.DROP_RATES is held[0]


def test_table_the_game_mutated_is_kept(pkg):
    rt, m = pkg.load("scores", 'SCORES = {"alice": 0}\n')
    m.SCORES["bob"] = 7  # built at run time
    txn = rt.prepare({m.__name__: 'SCORES = {"alice": 1}\n'})
    assert [i.obj for i in txn.plan.modules[0].of("conflict")] == ["SCORES"]
    txn.commit()
    assert m.SCORES == {"alice": 0, "bob": 7}


def test_unchanged_statements_are_not_rerun_changed_ones_are(pkg):
    pkg.write("log", "EVENTS = []\n")
    rt, m = pkg.load(
        "side",
        f"""
        from {pkg.name}.log import EVENTS
        EVENTS.append("import")
        WORLD = {{"players": []}}
        WORLD["players"].append("alice")
        SEED = len(EVENTS) * 10
        """,
    )
    log = pkg.imp("log")
    world = m.WORLD
    txn = rt.prepare({m.__name__: pkg.src(f"""
        from {pkg.name}.log import EVENTS
        EVENTS.append("import")
        WORLD = {{"players": []}}
        WORLD["players"].append("alice")
        SEED = len(EVENTS) * 100
        """)})
    assert [i.lineno for i in txn.plan.modules[0].of("rerun")] == [5]
    txn.commit()
    assert log.EVENTS == ["import"]  # not repeated
    assert m.WORLD is world and world["players"] == ["alice"]
    assert m.SEED == 100


def test_removed_names_are_removed_and_restored_on_rollback(pkg):
    rt, m = pkg.load(
        "removal",
        """
        import math
        OLD_CONST = 1
        def old_helper():
            return 1
        def kept():
            return 2
        """,
    )
    helper = m.old_helper
    txn = rt.prepare({m.__name__: pkg.src("""
        def kept():
            return 2
        """)})
    assert {i.obj for i in txn.plan.modules[0].of("removed")} == {"math", "OLD_CONST", "old_helper"}
    txn.commit()
    assert not hasattr(m, "old_helper") and not hasattr(m, "OLD_CONST") and not hasattr(m, "math")
    rt.rollback()
    assert m.old_helper is helper and m.OLD_CONST == 1 and m.math is sys.modules["math"]


def test_added_module_is_importable_and_usable_by_a_patched_module(pkg):
    rt, m = pkg.load(
        "game",
        """
        def loot():
            return None
        """,
    )
    loot_name = pkg.mod("loot")
    txn = rt.prepare({
        loot_name: pkg.src("""
            TABLE = {"orc": "axe"}
            def roll(kind):
                return TABLE[kind]
            """),
        m.__name__: pkg.src(f"""
            from {pkg.name} import loot as _loot
            def loot():
                return _loot.roll("orc")
            """),
    })
    assert txn.plan.module(loot_name).new_module
    assert loot_name not in sys.modules
    txn.commit()
    assert m.loot() == "axe"
    assert importlib.import_module(loot_name).TABLE == {"orc": "axe"}
    assert loot_name in rt.live_digests() and loot_name in rt.managed_modules()
    rt.rollback()
    assert loot_name not in sys.modules and not hasattr(sys.modules[pkg.name], "loot")
    assert m.loot() is None


def test_module_not_yet_imported_is_added_from_patch_text_not_disk(pkg):
    pkg.write("lazy", "VALUE = 'disk'\n")
    rt = pkg.runtime()
    with pytest.raises(hotfleet.PrepareError, match="parent package"):
        rt.prepare({pkg.mod("lazy"): "VALUE = 'patch'\n"})
    importlib.import_module(pkg.name)
    txn = rt.prepare({pkg.mod("lazy"): "VALUE = 'patch'\n"})
    assert txn.plan.modules[0].new_module
    txn.commit()
    assert importlib.import_module(pkg.mod("lazy")).VALUE == "patch"


def test_module_docstring_and_all(pkg):
    rt, m = pkg.load(
        "documented",
        '''
        """Old doc."""
        __all__ = ["a"]
        def a():
            return 1
        ''',
    )
    rt.prepare({m.__name__: pkg.src('''
        """New doc."""
        __all__ = ["a", "b"]
        def a():
            return 1
        def b():
            return 2
        ''')}).commit()
    assert m.__doc__ == "New doc." and m.__all__ == ["a", "b"] and m.b() == 2


def test_plan_is_json_and_readable_and_ids_are_canonical(pkg):
    rt, m = pkg.load("planned", "X = 1\ndef f():\n    return 1\n")
    sources = {m.__name__: "X = 2\ndef f():\n    return 2\ndef g():\n    return 3\n"}
    txn = rt.prepare(sources)
    assert txn.id == hotfleet.runtime.canonical_id(sources) and len(txn.id) == 64
    data = json.loads(json.dumps(txn.plan.to_dict()))
    mod = data["modules"][0]
    assert mod["functions_replaced"][0]["obj"] == "f" and mod["added"][0]["obj"] == "g"
    assert mod["data_updated"][0]["obj"] == "X" and data["counts"]["functions_replaced"] == 1
    text = str(txn.plan)
    assert "functions replaced" in text and "line 2: f" in text
    report = txn.commit()
    assert json.loads(json.dumps(report.to_dict()))["counts"]["functions_swapped"] == 1


def test_changed_import_statement_validated_at_prepare(pkg):
    rt, m = pkg.load("imports", "import json\n")
    with pytest.raises(hotfleet.PrepareError, match="ModuleNotFoundError"):
        rt.prepare({m.__name__: "import json\nimport no_such_module_hotfleet\n"})
    assert not hasattr(m, "no_such_module_hotfleet")
    rt.prepare({m.__name__: "import json\nimport base64 as b64\n"}).commit()
    assert m.b64 is sys.modules["base64"]


def test_batch_adds_a_subpackage_whose_modules_import_each_other(pkg):
    rt, m = pkg.load("core", "def spawn():\n    return None\n")
    sub = pkg.mod("loot")
    txn = rt.prepare({
        sub: "from .tables import RATES\n",
        f"{sub}.tables": "RATES = {'orc': 3}\n",
        f"{sub}.items": pkg.src("""
            from .tables import RATES
            class Item:
                def __init__(self, kind):
                    self.kind = kind
                def __reload_instance__(self):
                    self.rate = RATES[self.kind]
            STARTER = Item("orc")
            """),
        m.__name__: pkg.src(f"""
            from {pkg.name}.loot.items import Item
            def spawn():
                return Item("orc")
            """),
    })
    assert [mp.new_module for mp in txn.plan.modules] == [True, True, True, False]
    txn.commit()
    items = sys.modules[f"{sub}.items"]
    assert isinstance(m.spawn(), items.Item) and sys.modules[sub].RATES == {"orc": 3}
    # instances made by an added module's top level are tracked for later hooks
    report = rt.prepare({f"{sub}.items": rt.live_source(f"{sub}.items") + "# touched\nVERSION = 2\n"}).commit()
    assert report.instance_scans == []
    rt.prepare({f"{sub}.items": rt.live_source(f"{sub}.items").replace("self.rate = RATES[self.kind]", "self.rate = RATES[self.kind] * 10")}).commit()
    assert items.STARTER.rate == 30
    while rt.patch_stack:
        rt.rollback()
    assert sub not in sys.modules and f"{sub}.items" not in sys.modules and m.spawn() is None
