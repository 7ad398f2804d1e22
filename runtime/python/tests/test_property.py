"""Property-style test: random sequences of patches and rollbacks return exactly to earlier states."""

from __future__ import annotations

import copy
import random
from typing import Any, Dict, List, Tuple

import pytest

from conftest import fingerprint_module, fingerprint_value

FUNCS = ["f0", "f1", "f2", "f3"]
METHODS = ["m0", "m1", "m2"]


def render(g: Dict[str, Any]) -> str:
    """Module source for a genome."""
    out: List[str] = ["import functools"]
    out.append("\n" * g["pad"])
    out.append(f"RATE = {g['RATE']}")
    out.append(f"TABLE = {g['TABLE']!r}")
    out.append("def deco(fn):\n    @functools.wraps(fn)\n    def wrapper(*a):\n        return fn(*a)\n    return wrapper")
    for name in sorted(g["funcs"]):
        ret, pad = g["funcs"][name]
        out.append("\n" * pad + f"def {name}(x=1):\n    return x + {ret}")
    out.append(f"@deco\ndef wrapped():\n    return {g['wrapped']}")
    out.append(f"def make(k):\n    def inner():\n        return k + {g['closure']}\n    return inner")
    out.append("handler = make(100)")
    body = [f"    speed = {g['speed']}", "    def __init__(self):\n        self.v = 0"]
    for name in sorted(g["methods"]):
        body.append(f"    def {name}(self):\n        return {g['methods'][name]}")
    if g["hook"] is not None:
        body.append(f"    def __reload_instance__(self):\n        self.v = {g['hook']}")
    if g["prop"]:
        body.append(f"    @property\n    def power(self):\n        return self.speed * {g['prop']}")
    out.append("class Unit:\n" + "\n".join(body))
    out.append("UNITS = [Unit(), Unit()]")
    return "\n".join(out) + "\n"


def initial() -> Dict[str, Any]:
    return {
        "pad": 0,
        "RATE": 1,
        "TABLE": {"a": 1},
        "funcs": {"f0": (0, 0), "f1": (1, 0)},
        "wrapped": 0,
        "closure": 0,
        "speed": 1,
        "methods": {"m0": 0},
        "hook": None,
        "prop": 0,
    }


def mutate(rng: random.Random, g: Dict[str, Any]) -> Dict[str, Any]:
    g = copy.deepcopy(g)
    for _ in range(rng.randint(1, 4)):
        what = rng.choice(["pad", "RATE", "TABLE", "funcs", "wrapped", "closure", "speed", "methods", "hook", "prop", "move"])
        if what == "pad":
            g["pad"] = rng.randint(0, 3)
        elif what == "RATE":
            g["RATE"] = rng.randint(1, 9)
        elif what == "TABLE":
            g["TABLE"] = {k: rng.randint(0, 5) for k in rng.sample(["a", "b", "c"], rng.randint(1, 3))}
        elif what == "funcs":
            name = rng.choice(FUNCS[1:])
            if name in g["funcs"] and rng.random() < 0.4:
                del g["funcs"][name]
            else:
                g["funcs"][name] = (rng.randint(0, 9), g["funcs"].get(name, (0, 0))[1])
            g["funcs"]["f0"] = (rng.randint(0, 9), g["funcs"]["f0"][1])
        elif what == "move":
            name = rng.choice(sorted(g["funcs"]))
            g["funcs"][name] = (g["funcs"][name][0], rng.randint(0, 3))
        elif what == "wrapped":
            g["wrapped"] = rng.randint(0, 9)
        elif what == "closure":
            g["closure"] = rng.randint(0, 9)
        elif what == "speed":
            g["speed"] = rng.randint(1, 9)
        elif what == "methods":
            name = rng.choice(METHODS)
            if name != "m0" and name in g["methods"] and rng.random() < 0.4:
                del g["methods"][name]
            else:
                g["methods"][name] = rng.randint(0, 9)
        elif what == "hook":
            g["hook"] = None if (g["hook"] is not None and rng.random() < 0.4) else rng.randint(1, 9)
        elif what == "prop":
            g["prop"] = rng.randint(0, 3)
    return g


def state(m: Any, rt: Any) -> Tuple[Any, ...]:
    """Everything that must come back exactly: module, class dicts, code, instances, digests."""
    units = tuple(tuple(sorted((k, repr(v)) for k, v in u.__dict__.items())) for u in m.UNITS)
    handler = fingerprint_value(m.handler)
    wrapped_inner = fingerprint_value(m.wrapped.__wrapped__)
    return (fingerprint_module(m), units, handler, wrapped_inner, repr(m.TABLE), id(m.TABLE), rt.live_digests())


def check_behaviour(m: Any, g: Dict[str, Any]) -> None:
    assert m.RATE == g["RATE"] and m.TABLE == g["TABLE"]
    for name, (ret, _pad) in g["funcs"].items():
        assert getattr(m, name)() == 1 + ret
    for name in FUNCS:
        if name not in g["funcs"]:
            assert not hasattr(m, name)
    assert m.wrapped() == g["wrapped"] and m.handler() == 100 + g["closure"]
    unit = m.UNITS[0]
    assert m.Unit.speed == g["speed"]
    for name, ret in g["methods"].items():
        assert getattr(unit, name)() == ret
    if g["prop"]:
        assert unit.power == g["speed"] * g["prop"]


@pytest.mark.parametrize("seed", range(6))
def test_random_patches_and_rollbacks_return_to_each_earlier_state(pkg, seed):
    rng = random.Random(seed)
    g0 = initial()
    rt, m = pkg.load("game", render(g0))
    table = m.TABLE
    stack: List[Tuple[Dict[str, Any], Tuple[Any, ...]]] = [(g0, state(m, rt))]
    commits = rollbacks = 0
    for step in range(30):
        if len(stack) > 1 and rng.random() < 0.35:
            report = rt.rollback()
            assert report.conflicts == []
            stack.pop()
            rollbacks += 1
            g, expected = stack[-1]
            assert state(m, rt) == expected, f"seed {seed} step {step}: rollback did not restore the state"
            check_behaviour(m, g)
        else:
            g = mutate(rng, stack[-1][0])
            rt.prepare({m.__name__: render(g)}, txn_id=f"s{seed}-{step}").commit()
            commits += 1
            check_behaviour(m, g)
            stack.append((g, state(m, rt)))
    while len(stack) > 1:
        rt.rollback()
        stack.pop()
        assert state(m, rt) == stack[-1][1]
    assert m.TABLE is table and commits > 5 and rollbacks > 2
    assert rt.patch_stack == []
