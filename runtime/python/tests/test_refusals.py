"""Refusals: prepare fails with a clear error and touches nothing live."""

from __future__ import annotations

import importlib
import math
import shutil
import sys
import types

import pytest

import hotfleet

BASE = """
import enum
COUNT = 1
TABLE = {"a": 1}
class Color(enum.Enum):
    RED = 1
class Base:
    def f(self):
        return 1
class Mob(Base):
    kind = "mob"
    def g(self):
        return super().f()
def make(scale):
    def inner(x):
        return x * scale
    return inner
handler = make(2)
def top(x=1):
    return x
"""


def live_state(mod: types.ModuleType) -> dict:
    """Identity snapshot of every function's code, every class dict and the module dict."""
    state = {"module": {k: id(v) for k, v in mod.__dict__.items()}}
    for name, value in mod.__dict__.items():
        if isinstance(value, types.FunctionType):
            state[f"fn {name}"] = (id(value.__code__), id(value.__defaults__), value.__qualname__)
        if isinstance(value, type) and value.__module__ == mod.__name__:
            state[f"class {name}"] = {k: id(v) for k, v in value.__dict__.items()}
            for k, v in value.__dict__.items():
                if isinstance(v, types.FunctionType):
                    state[f"fn {name}.{k}"] = (id(v.__code__), id(v.__defaults__))
    return state


BAD_PATCHES = {
    "syntax error": BASE.replace("return 1\nclass Mob", "return (1\nclass Mob"),
    "closure cells renamed": BASE.replace("def make(scale):\n    def inner(x):\n        return x * scale", "def make(factor):\n    def inner(x):\n        return x * factor"),
    "enum member added": BASE.replace("RED = 1\n", "RED = 1\n    GREEN = 2\n"),
    "bases changed": BASE.replace("class Mob(Base):", "class Mob:"),
    "default raises at staging": BASE.replace("def top(x=1):", "def top(x=undefined_name):"),
    "future import added": "from __future__ import annotations\n" + BASE,
}


@pytest.mark.parametrize("case", sorted(BAD_PATCHES))
def test_failed_prepare_leaves_everything_untouched(pkg, case):
    rt, m = pkg.load("world", BASE)
    before = live_state(m)
    digest = rt.live_digests()[m.__name__]
    with pytest.raises(hotfleet.PrepareError) as info:
        rt.prepare({m.__name__: BAD_PATCHES[case].lstrip("\n")})
    err = info.value
    assert err.module == m.__name__ and err.details and str(err)
    assert live_state(m) == before
    assert rt.live_digests()[m.__name__] == digest and rt.pending is None
    assert m.handler(3) == 6 and m.Mob().g() == 1


def test_successful_prepare_then_abort_touches_nothing(pkg):
    rt, m = pkg.load("world2", BASE)
    before = live_state(m)
    txn = rt.prepare({m.__name__: BASE.replace("return x * scale", "return x * scale * 10").replace("return 1\n", "return 100\n")})
    assert live_state(m) == before  # staged only
    assert m.handler(3) == 6
    txn.abort()
    assert txn.state == "aborted" and live_state(m) == before
    with pytest.raises(hotfleet.CommitError, match="aborted"):
        txn.commit()


def test_syntax_error_names_the_line(pkg):
    rt, m = pkg.load("syn", "def f():\n    return 1\n")
    with pytest.raises(hotfleet.PrepareError) as info:
        rt.prepare({m.__name__: "def f():\n    return 1\ndef g(:\n    pass\n"})
    assert info.value.lineno == 3 and "syntax error" in info.value.message
    assert info.value.to_dict()["lineno"] == 3


def test_module_outside_packages_is_refused(pkg):
    rt, m = pkg.load("inside", "X = 1\n")
    with pytest.raises(hotfleet.PrepareError, match="outside the managed packages"):
        rt.prepare({"json": "X = 1\n"})
    assert "X" not in sys.modules["json"].__dict__


def test_builtin_and_c_extension_modules_are_refused_untouched(pkg):
    # a C extension inside the managed package: a copy of the stdlib _json extension
    import _json

    ext = getattr(_json, "__file__", None)
    builtin = "itertools" if "itertools" in sys.builtin_module_names else "sys"
    rt_packages = [pkg.name, "math", builtin]
    name = None
    if ext and ext.endswith((".so", ".pyd")):
        target = pkg.dir / ("_json" + ext[ext.index(".", len(ext) - len(ext.split("/")[-1]) ):])
        shutil.copy(ext, target)
        importlib.invalidate_caches()
        name = pkg.mod("_json")
        importlib.import_module(name)
    rt = hotfleet.Runtime(packages=rt_packages)
    pkg.runtimes.append(rt)
    sqrt = math.sqrt
    with pytest.raises(hotfleet.PrepareError) as info:
        rt.prepare({"math": "def sqrt(x):\n    return 0\n"})
    assert "cannot be patched" in str(info.value) and "math" in rt.unpatchable
    assert math.sqrt is sqrt and math.sqrt(9) == 3.0
    with pytest.raises(hotfleet.PrepareError, match="builtin module"):
        rt.prepare({builtin: "X = 1\n"})
    assert not hasattr(sys.modules[builtin], "X")
    if name is not None:
        mod = sys.modules[name]
        scanner = mod.make_scanner
        with pytest.raises(hotfleet.PrepareError, match="C extension"):
            rt.prepare({name: "def make_scanner(ctx):\n    return None\n"})
        assert sys.modules[name] is mod and mod.make_scanner is scanner


def test_batch_fails_as_a_whole_first_module_untouched(pkg):
    pkg.write("first", "def f():\n    return 1\nX = 1\n")
    rt, second = pkg.load("second", "class K:\n    __slots__ = ('a',)\n")
    first = pkg.imp("first")
    before = live_state(first)
    with pytest.raises(hotfleet.PrepareError) as info:
        rt.prepare({
            first.__name__: "def f():\n    return 2\nX = 2\n",
            second.__name__: "class K:\n    __slots__ = ('a', 'b')\n",
        })
    assert info.value.module == second.__name__
    assert live_state(first) == before and first.f() == 1 and first.X == 1
    assert rt.pending is None


def test_every_refusal_of_a_batch_is_reported(pkg):
    pkg.write("a", "def f():\n    return 1\n")
    rt, b = pkg.load("b", "def g():\n    return 1\n")
    pkg.imp("a")
    with pytest.raises(hotfleet.PrepareError) as info:
        rt.prepare({pkg.mod("a"): "def f(:\n", pkg.mod("b"): "def g(:\n"})
    assert {d["module"] for d in info.value.details} == {pkg.mod("a"), pkg.mod("b")}


def test_patching_the_runtime_itself_is_refused():
    with pytest.raises(hotfleet.HotfleetError):
        hotfleet.Runtime(packages=["hotfleet"])


def test_overlapping_runtimes_are_refused(pkg):
    rt = pkg.runtime()
    with pytest.raises(hotfleet.HotfleetError, match="already managed"):
        hotfleet.Runtime(packages=[pkg.name + ".sub"])
    rt.close()
    other = hotfleet.Runtime(packages=[pkg.name])
    other.close()


def test_monkeypatched_live_function_is_kept_and_reported(pkg):
    rt, m = pkg.load("monkey", "def f():\n    return 1\n")
    m.f = lambda: "monkey"
    txn = rt.prepare({m.__name__: "def f():\n    return 2\n"})
    assert [i.obj for i in txn.plan.modules[0].of("conflict")] == ["f"]
    txn.commit()
    assert m.f() == "monkey"


def test_module_whose_file_changed_before_the_runtime_existed_is_refused(pkg):
    pkg.write("drift", "def f():\n    return 1\n")
    drift = pkg.imp("drift")
    pkg.write("drift", "def f():\n    return 2  # deployed after import\n")
    rt = pkg.runtime()
    assert "file changed after import" in rt.unpatchable[drift.__name__]
    assert drift.__name__ not in rt.managed_modules()
    with pytest.raises(hotfleet.PrepareError, match="file changed after import"):
        rt.prepare({drift.__name__: "def f():\n    return 3\n"})
    assert drift.f() == 1


def test_module_imported_before_the_runtime_is_patchable(pkg):
    pkg.write("before", "import functools\n@functools.lru_cache()\ndef f():\n    return 1\nclass K:\n    def m(self):\n        return 1\n")
    before = pkg.imp("before")
    rt = pkg.runtime()
    assert before.__name__ in rt.managed_modules()
    rt.prepare({before.__name__: "import functools\n@functools.lru_cache()\ndef f():\n    return 2\nclass K:\n    def m(self):\n        return 2\n"}).commit()
    assert before.f() == 2 and before.K().m() == 2


LAYOUTS = {
    "enum member removed": (
        "import enum\nclass E(enum.Enum):\n    A = 1\n    B = 2\n",
        "import enum\nclass E(enum.Enum):\n    A = 1\n",
        "enum member",
    ),
    "protocol member removed": (
        "from typing import Protocol\nclass P(Protocol):\n    def a(self) -> int:\n        return 1\n    def b(self) -> int:\n        return 2\n",
        "from typing import Protocol\nclass P(Protocol):\n    def a(self) -> int:\n        return 1\n",
        "protocol member",
    ),
    "__slots__ removed": (
        "class S:\n    __slots__ = ('x',)\n    def f(self):\n        return 1\n",
        "class S:\n    def f(self):\n        return 1\n",
        "__slots__",
    ),
    "slotted dataclass gains a field": (
        "from dataclasses import dataclass\n@dataclass\nclass D:\n    __slots__ = ('x',)\n    x: int\n",
        "from dataclasses import dataclass\n@dataclass\nclass D:\n    __slots__ = ('x',)\n    x: int\n    y: int = 0\n",
        "slot",
    ),
    "metaclass added": (
        "class M(type):\n    pass\nclass K:\n    pass\n",
        "class M(type):\n    pass\nclass K(metaclass=M):\n    pass\n",
        "metaclass",
    ),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_layout_changes_are_refused_untouched(pkg, case):
    before_src, after_src, words = LAYOUTS[case]
    rt, m = pkg.load("layout", before_src)
    before = live_state(m)
    with pytest.raises(hotfleet.PrepareError) as info:
        rt.prepare({m.__name__: after_src})
    assert words in str(info.value) and info.value.hint
    assert live_state(m) == before
