"""In-place update of functions and classes.

The runtime never replaces a function object that the old source defined:
it swaps ``__code__`` (and defaults, docs, annotations) into the live object,
so every reference held anywhere (``from m import f``, callbacks, bound
methods, dict tables) runs the new code.  To find the live objects a
definition produced, :class:`FunctionIndex` walks what the module can reach
(globals, class dictionaries, decorator wrappers through ``__wrapped__`` and
closure cells, properties, static/class methods, one level into module-level
containers) and indexes functions by ``(co_name, co_firstlineno)``, which is
exactly where the recorded source says the definition starts.
"""

from __future__ import annotations

import functools
import os
import types
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

__all__ = ["FunctionIndex", "shift_code", "find_code", "resolve_class", "clear_caches", "same_filename"]

_MAX_DEPTH = 6
_MAX_CONTAINER = 10_000


def same_filename(a: str, b: str) -> bool:
    """True when two code filenames name the same file."""
    if a == b:
        return True
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


def shift_code(code: types.CodeType, delta: int) -> types.CodeType:
    """Return ``code`` with every line number moved by ``delta`` (nested code included).

    Line tables are relative to ``co_firstlineno`` on every supported
    version, so moving the first line moves them all.
    """
    if delta == 0:
        return code
    consts = tuple(shift_code(c, delta) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_firstlineno=code.co_firstlineno + delta, co_consts=consts)


def find_code(code: types.CodeType, name: str, firstlineno: int) -> Optional[types.CodeType]:
    """Find the nested code object ``name`` starting at ``firstlineno`` inside ``code``."""
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_name == name and const.co_firstlineno == firstlineno:
                return const
            found = find_code(const, name, firstlineno)
            if found is not None:
                return found
    return None


def resolve_class(module: types.ModuleType, chain: Sequence[str]) -> Optional[type]:
    """The live class ``chain`` (``["Outer", "Inner"]``) defined by ``module``, or None."""
    namespace: Any = module.__dict__
    obj: Any = None
    for name in chain:
        obj = namespace.get(name) if isinstance(namespace, dict) else namespace.get(name)
        if not isinstance(obj, type):
            return None
        namespace = obj.__dict__
    if obj is None:
        return None
    if not isinstance(obj, type):
        return None
    if getattr(obj, "__module__", None) != module.__name__ or obj.__qualname__ != ".".join(chain):
        return None
    return obj


def clear_caches(wrappers: Iterable[Any]) -> int:
    """Call ``cache_clear()`` on every wrapper that has one; return how many."""
    count = 0
    for w in wrappers:
        clear = getattr(w, "cache_clear", None)
        if callable(clear):
            clear()
            count += 1
    return count


class FunctionIndex:
    """Index of the live functions a module's source defined, by first line."""

    def __init__(
        self, module: types.ModuleType, filename: str, courtesy: Optional[Callable[[], None]] = None
    ) -> None:
        self.module = module
        self.filename = filename
        self._filenames: Set[str] = {filename}
        self.by_key: Dict[Tuple[str, int], List[types.FunctionType]] = {}
        self.by_line: Dict[int, List[types.FunctionType]] = {}
        self.caches: Dict[int, List[Any]] = {}
        self._seen: Set[int] = set()
        self._fn_seen: Set[int] = set()
        self._courtesy = courtesy
        self._build()

    # -- queries -----------------------------------------------------------

    def find(self, name: str, firstlineno: int) -> List[types.FunctionType]:
        """Live functions compiled from a definition ``name`` starting at ``firstlineno``."""
        return list(self.by_key.get((name, firstlineno), ()))

    def in_range(self, first: int, last: int) -> List[types.FunctionType]:
        """Live functions whose definition starts within lines ``first..last``."""
        out: List[types.FunctionType] = []
        for line in range(first, last + 1):
            out.extend(self.by_line.get(line, ()))
        return out

    def caches_of(self, fn: types.FunctionType) -> List[Any]:
        """Caching wrappers (lru_cache ...) found around ``fn``."""
        return list(self.caches.get(id(fn), ()))

    def all_functions(self) -> List[types.FunctionType]:
        """Every indexed function."""
        out: List[types.FunctionType] = []
        for fns in self.by_key.values():
            out.extend(fns)
        return out

    # -- building ----------------------------------------------------------

    def _is_ours(self, code: types.CodeType) -> bool:
        fname = code.co_filename
        if fname in self._filenames:
            return True
        if same_filename(fname, self.filename):
            self._filenames.add(fname)
            return True
        return False

    def _record(self, fn: types.FunctionType, via: Tuple[Any, ...]) -> None:
        if id(fn) in self._fn_seen:
            if via:
                self.caches.setdefault(id(fn), []).extend(w for w in via if w not in self.caches.get(id(fn), []))
            return
        self._fn_seen.add(id(fn))
        code = fn.__code__
        self.by_key.setdefault((code.co_name, code.co_firstlineno), []).append(fn)
        self.by_line.setdefault(code.co_firstlineno, []).append(fn)
        if via:
            self.caches.setdefault(id(fn), []).extend(via)

    def _build(self) -> None:
        modname = self.module.__name__
        for value in list(self.module.__dict__.values()):
            if self._courtesy is not None:
                self._courtesy()  # built off the game thread, a module can take milliseconds
            self._walk(value, 0, (), top=True, modname=modname)

    def _walk(self, obj: Any, depth: int, via: Tuple[Any, ...], top: bool, modname: str) -> None:
        if depth > _MAX_DEPTH or obj is None:
            return
        if isinstance(obj, (str, bytes, int, float, complex, bool, types.ModuleType)):
            return
        if isinstance(obj, types.FunctionType):
            # Functions may be reached along several paths; cache wrappers
            # seen on the way must all be remembered.
            if self._is_ours(obj.__code__):
                self._record(obj, via)
            key = id(obj)
            if key in self._seen:
                return
            self._seen.add(key)
            fdict = obj.__dict__
            wrapped = fdict.get("__wrapped__")
            if wrapped is not None:
                self._walk(wrapped, depth + 1, via, False, modname)
            registry = fdict.get("registry")
            if registry is not None and hasattr(registry, "values"):
                try:
                    for impl in list(registry.values()):
                        self._walk(impl, depth + 1, via, False, modname)
                except Exception:
                    pass
            for cell in obj.__closure__ or ():
                try:
                    content = cell.cell_contents
                except ValueError:
                    continue
                if isinstance(content, (types.FunctionType, staticmethod, classmethod, functools.partial)) or _has_wrapped(
                    content
                ):
                    self._walk(content, depth + 1, via, False, modname)
            return
        key = id(obj)
        if key in self._seen:
            return
        self._seen.add(key)
        if isinstance(obj, (staticmethod, classmethod)):
            self._walk(obj.__func__, depth + 1, via, False, modname)
            return
        if isinstance(obj, property):
            for part in (obj.fget, obj.fset, obj.fdel):
                self._walk(part, depth + 1, via, False, modname)
            return
        if isinstance(obj, types.MethodType):
            self._walk(obj.__func__, depth + 1, via, False, modname)
            return
        if isinstance(obj, (functools.partial, functools.partialmethod)):
            self._walk(obj.func, depth + 1, via, False, modname)
            return
        if isinstance(obj, functools.cached_property):
            self._walk(obj.func, depth + 1, via, False, modname)
            return
        if isinstance(obj, type):
            if obj.__module__ == modname and "<locals>" not in obj.__qualname__:
                for value in list(obj.__dict__.values()):
                    self._walk(value, depth + 1, via, True, modname)
            return
        if isinstance(obj, dict):
            if top and len(obj) <= _MAX_CONTAINER:
                for value in list(obj.values()):
                    self._walk(value, depth + 1, via, False, modname)
            return
        if isinstance(obj, (list, tuple, set, frozenset)):
            if top and len(obj) <= _MAX_CONTAINER:
                for value in list(obj):
                    self._walk(value, depth + 1, via, False, modname)
            return
        if getattr(type(obj), "_hotfleet_new", False):
            # our own stand-in/instance tracker in front of a class's __new__
            self._walk(obj.__wrapped__, depth + 1, via, False, modname)
            return
        # Any other object: caching wrappers and decorator objects keep the
        # function in their __dict__ (``__wrapped__``, ``func``, ...).
        try:
            odict = object.__getattribute__(obj, "__dict__")
        except AttributeError:
            odict = None
        if not isinstance(odict, dict) or len(odict) > _MAX_CONTAINER:
            return
        new_via = via + (obj,) if callable(getattr(type(obj), "cache_clear", None)) else via
        if not top and "__wrapped__" not in odict:
            return
        for value in list(odict.values()):
            if isinstance(
                value,
                (types.FunctionType, staticmethod, classmethod, property, types.MethodType, functools.partial),
            ) or _has_wrapped(value):
                self._walk(value, depth + 1, new_via, False, modname)


def _has_wrapped(value: Any) -> bool:
    """True for a (non-class) object that keeps a ``__wrapped__`` in its own ``__dict__``."""
    if value is None or isinstance(value, type):
        return False
    try:
        odict = object.__getattribute__(value, "__dict__")
    except Exception:
        return False
    return isinstance(odict, dict) and "__wrapped__" in odict
