"""The last in-place gaps (issue 12): each case a fresh import would handle, patched in place."""

from __future__ import annotations

import sys

import pytest


def test_changed_module_level_lambda_reaches_references_taken_before(pkg):
    rt, m = pkg.load(
        "lam",
        """
        h = lambda x: x + 1
        TABLE = {"h": h}
        """,
    )
    g = m.h
    txn = rt.prepare({m.__name__: pkg.src("""
        h = lambda x: x + 2
        TABLE = {"h": h}
        """)})
    txn.commit()
    assert g(1) == 3 and m.h is g and m.TABLE["h"](1) == 3
    rt.rollback()
    assert g(1) == 2 and m.h is g


@pytest.mark.parametrize("body", ["pass", '"""Only a docstring."""', "..."])
def test_class_with_an_empty_body_gains_methods(pkg, body):
    rt, m = pkg.load(
        "empty",
        f"""
        class Npc:
            {body}
        """,
    )
    npc = m.Npc()
    txn = rt.prepare({m.__name__: pkg.src("""
        class Npc:
            def greet(self):
                return "hello"
        """)})
    txn.commit()
    assert npc.greet() == "hello"
    rt.rollback()
    assert not hasattr(npc, "greet")


ABC_SOURCE = """
import abc

class Shape(abc.ABC):
    @abc.abstractmethod
    def area(self):
        ...

class Square(Shape):
    def area(self):
        return 4
"""


def test_abc_gains_and_loses_abstract_methods(pkg):
    rt, m = pkg.load("shapes", ABC_SOURCE)
    gained = ABC_SOURCE.replace(
        "        ...\n\nclass Square",
        "        ...\n\n    @abc.abstractmethod\n    def perimeter(self):\n        ...\n\nclass Square",
    )
    rt.prepare({m.__name__: pkg.src(gained)}).commit()
    assert m.Shape.__abstractmethods__ == frozenset({"area", "perimeter"})
    with pytest.raises(TypeError):
        m.Square()  # as a fresh import: Square does not implement perimeter
    rt.rollback()
    assert m.Square().area() == 4 and m.Shape.__abstractmethods__ == frozenset({"area"})
    lost = ABC_SOURCE.replace("    @abc.abstractmethod\n    def area(self):\n        ...\n", "    def area(self):\n        return 0\n")
    rt.prepare({m.__name__: pkg.src(lost)}).commit()
    assert m.Shape.__abstractmethods__ == frozenset() and m.Shape().area() == 0
    rt.rollback()
    with pytest.raises(TypeError):
        m.Shape()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="PEP 695 syntax needs Python 3.12")
def test_pep695_generic_functions_and_classes_patch_in_place(pkg):
    rt, m = pkg.load(
        "generic",
        """
        def first[T](items: list[T]) -> T:
            return items[0]

        class Box[T]:
            def __init__(self, v: T) -> None:
                self.v = v
            def get(self) -> T:
                return self.v
            def kind(self):
                return T.__name__
        """,
    )
    first, box, box_cls = m.first, m.Box(3), m.Box
    txn = rt.prepare({m.__name__: pkg.src("""
        def first[T](items: list[T], default: T | None = None) -> T:
            return items[-1] if items else default

        class Box[T]:
            def __init__(self, v: T) -> None:
                self.v = v
            def get(self) -> T:
                return self.v * 2
            def kind(self):
                return "kind " + T.__name__
            def put(self, v: T) -> None:
                self.v = v
        """)})
    assert txn.plan.refusals == []
    txn.commit()
    assert m.first is first and first([1, 2]) == 2 and first([], 5) == 5
    assert m.Box is box_cls and box.get() == 6 and box.kind() == "kind T"
    box.put(4)
    assert box.get() == 8 and box_cls.put.__annotations__["v"] is box_cls.__type_params__[0]
    rt.rollback()
    assert first([1, 2]) == 1 and box.get() == 4 and not hasattr(box_cls, "put")


CLOSURES = """
CALLBACKS = []
REGISTRY = {}

def make(k):
    def cb(x):
        return x + k
    return cb

def register(name, k):
    REGISTRY[name] = make(k)

CALLBACKS.append(make(1))
register("a", 2)
"""


def test_live_closures_stored_anywhere_run_the_changed_inner_body(pkg):
    rt, m = pkg.load("closures", CLOSURES)

    class Game:
        pass

    game = Game()
    game.on_hit = m.make(5)  # stored outside the module
    held = [m.make(7)]
    txn = rt.prepare({m.__name__: pkg.src(CLOSURES.replace("return x + k", "return x + k * 10"))})
    txn.commit()
    assert m.CALLBACKS[0](1) == 11 and m.REGISTRY["a"](1) == 21
    assert game.on_hit(1) == 51 and held[0](1) == 71
    assert m.make(3)(1) == 31
    rt.rollback()
    assert game.on_hit(1) == 6 and m.CALLBACKS[0](1) == 2
