"""Shared fixtures: a throw-away package on disk per test, and a runtime managing it."""

from __future__ import annotations

import gc
import importlib
import itertools
import linecache
import sys
import textwrap
import types
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

import hotfleet
from hotfleet.snapshot import class_snapshot

_counter = itertools.count()


class Pkg:
    """A unique package under ``tmp_path`` on ``sys.path``."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.dir = root / name
        self.dir.mkdir()
        (self.dir / "__init__.py").write_text("")
        self.runtimes: List[hotfleet.Runtime] = []

    def write(self, mod: str, source: str) -> str:
        """Write ``<pkg>/<mod>.py`` (dedented); return the dedented source."""
        text = textwrap.dedent(source).lstrip("\n")
        path = self.dir / (mod.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return text

    def src(self, source: str) -> str:
        """Dedent a new version of a source (as a patch carries it)."""
        return textwrap.dedent(source).lstrip("\n")

    def mod(self, mod: str) -> str:
        """Full dotted name of a submodule."""
        return f"{self.name}.{mod}"

    def imp(self, mod: str) -> types.ModuleType:
        """Import a submodule."""
        return importlib.import_module(self.mod(mod))

    def runtime(self, **kwargs: Any) -> hotfleet.Runtime:
        """A runtime managing this package (closed at teardown)."""
        rt = hotfleet.Runtime(packages=[self.name], **kwargs)
        self.runtimes.append(rt)
        return rt

    def load(self, mod: str, source: str, **kwargs: Any) -> "tuple[hotfleet.Runtime, types.ModuleType]":
        """Write a module, create the runtime, import the module (recorded at import)."""
        self.write(mod, source)
        rt = self.runtime(**kwargs)
        return rt, self.imp(mod)

    def cleanup(self) -> None:
        for rt in self.runtimes:
            rt.close()
        for key in [k for k in sys.modules if k == self.name or k.startswith(self.name + ".")]:
            del sys.modules[key]
        for key in [k for k in linecache.cache if isinstance(k, str) and str(self.root) in k]:
            linecache.cache.pop(key, None)


@pytest.fixture
def pkg(tmp_path: Path) -> Iterator[Pkg]:
    """A fresh package ``hfpkgN`` on ``sys.path``."""
    name = f"hfpkg{next(_counter)}_{id(tmp_path) % 100000}"
    p = Pkg(tmp_path, name)
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield p
    finally:
        p.cleanup()
        try:
            sys.path.remove(str(tmp_path))
        except ValueError:
            pass


@pytest.fixture
def gc_state() -> Iterator[None]:
    """Restore the collector's enabled/frozen state after a test that tunes it."""
    enabled = gc.isenabled()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()
        else:
            gc.disable()


def fingerprint_code(code: types.CodeType) -> tuple:
    """Comparable summary of a code object (nested code included)."""
    consts = tuple(fingerprint_code(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts)
    return (code.co_name, code.co_firstlineno, code.co_code, consts, code.co_names, code.co_freevars)


def fingerprint_value(value: Any) -> Any:
    if isinstance(value, types.FunctionType):
        return ("fn", id(value), fingerprint_code(value.__code__), repr(value.__defaults__), value.__qualname__)
    if isinstance(value, (staticmethod, classmethod)):
        return (type(value).__name__, id(value), fingerprint_value(value.__func__))
    if isinstance(value, property):
        return ("property", id(value), fingerprint_value(value.fget), fingerprint_value(value.fset))
    if isinstance(value, type):
        return ("class", id(value))
    if isinstance(value, (int, float, str, bytes, bool, type(None))):
        return ("v", type(value).__name__, repr(value))
    if isinstance(value, (dict, list, set, tuple)):
        return ("c", id(value), repr(value))
    return ("o", id(value))


def fingerprint_module(mod: types.ModuleType) -> Dict[str, Any]:
    """Module globals, class dicts and code of everything a module defines."""
    out: Dict[str, Any] = {}
    for key, value in mod.__dict__.items():
        if key in ("__builtins__",):
            continue
        out[key] = fingerprint_value(value)
        if isinstance(value, type) and value.__module__ == mod.__name__:
            # the logical class dict: hotfleet's __new__ stand-ins are instrumentation
            logical = class_snapshot(value)
            out[key + ".__dict__"] = {k: fingerprint_value(v) for k, v in logical.items() if k not in ("__dict__", "__weakref__")}
    return out
