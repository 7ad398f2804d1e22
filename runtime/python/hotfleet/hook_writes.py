"""Which attributes an ``__reload_instance__`` hook can change on its instance, read off
its bytecode, so a commit snapshots those few values instead of two whole ``__dict__``
copies per instance.

A hook qualifies when ``self`` never escapes: every load of it is consumed at once by an
attribute load (not a method load), store or delete (or the copy an augmented assignment
makes), it is never rebound or captured, and the hook takes no other arguments. Then the
only way the hook changes its instance is a ``STORE_ATTR``/``DELETE_ATTR``, and the names
of every such instruction in the hook (whatever object they target: a superset is
harmless) are all a snapshot needs. The instance's type must make those plain dict writes:
no ``__setattr__``/``__delattr__``/``__getattr__``/``__getattribute__`` of its own, and no
descriptor in the class for a name the hook stores or loads. Anything else returns None and
the commit takes the general path (whole copies), so the guarantees never depend on this
analysis being clever.
"""

from __future__ import annotations

import dis
import inspect
import sys
import types
from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple

__all__ = ["written_attrs", "attrs_for_type", "snapshotter"]

# generator, coroutine, iterable coroutine, async generator, *args, **kwargs
_REFUSED_FLAGS = 0x20 | 0x80 | 0x100 | 0x200 | 0x04 | 0x08
_SELF_LOADS = ("LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_LOAD_FAST", "STORE_FAST_LOAD_FAST")
_SELF_STORES = ("STORE_FAST", "DELETE_FAST", "STORE_FAST_STORE_FAST", "STORE_FAST_MAYBE_NULL", "LOAD_FAST_AND_CLEAR")
_SPECIAL = frozenset({"__dict__", "__class__", "__weakref__"})


def _names(instr: Any) -> Tuple[str, ...]:
    value = instr.argval
    return tuple(value) if isinstance(value, tuple) else (value,)


_METHOD_BIT = sys.version_info >= (3, 12)


def _is_method_load(instr: Any) -> bool:
    # 3.12+ folds LOAD_METHOD into LOAD_ATTR with the low bit of its argument set
    return instr.opname == "LOAD_METHOD" or (_METHOD_BIT and instr.opname == "LOAD_ATTR" and bool(instr.arg & 1))


def written_attrs(code: types.CodeType) -> Optional[Tuple[FrozenSet[str], FrozenSet[str]]]:
    """(names the hook may store or delete, names it loads from ``self``), or None when the
    hook's effect on its instance cannot be bounded that way."""
    if code.co_argcount != 1 or code.co_kwonlyargcount or code.co_flags & _REFUSED_FLAGS:
        return None
    me = code.co_varnames[0]
    if me in code.co_cellvars:
        return None
    instrs = [i for i in dis.get_instructions(code) if i.opname not in ("CACHE", "EXTENDED_ARG")]
    written = set()
    loaded = set()
    for k, instr in enumerate(instrs):
        op = instr.opname
        if op in ("STORE_ATTR", "DELETE_ATTR"):
            written.add(instr.argval)
            continue
        if op in _SELF_STORES:
            names = _names(instr)
            if op == "STORE_FAST_LOAD_FAST":
                names = names[:1]
            if me in names:
                return None
        if op not in _SELF_LOADS:
            continue
        names = _names(instr)
        if op == "STORE_FAST_LOAD_FAST":
            names = names[1:]
        if me not in names:
            continue
        if names[-1] != me or names.count(me) != 1:
            return None  # self under another value: consumed by something else
        nxt = instrs[k + 1] if k + 1 < len(instrs) else None
        if nxt is None:
            return None
        if nxt.opname in ("STORE_ATTR", "DELETE_ATTR"):
            continue
        if nxt.opname == "LOAD_ATTR" and not _is_method_load(nxt):
            loaded.add(nxt.argval)
            continue
        if nxt.opname in ("DUP_TOP", "COPY") and (nxt.opname == "DUP_TOP" or nxt.arg == 1):
            # augmented assignment: self copied, attribute loaded, later stored back
            after = instrs[k + 2] if k + 2 < len(instrs) else None
            if after is not None and after.opname == "LOAD_ATTR" and not _is_method_load(after):
                loaded.add(after.argval)
                continue
        return None
    if written & _SPECIAL or not all(isinstance(n, str) and n.isidentifier() for n in written | loaded):
        return None
    return frozenset(written), frozenset(loaded)


def attrs_for_type(hook: Any, tp: type) -> Optional[Tuple[str, ...]]:
    """The attribute names to snapshot on instances of ``tp`` around ``hook``, or None."""
    if not isinstance(hook, types.FunctionType):
        return None
    found = written_attrs(hook.__code__)
    if found is None:
        return None
    written, loaded = found
    if tp.__setattr__ is not object.__setattr__ or tp.__delattr__ is not object.__delattr__:  # type: ignore[comparison-overlap]
        return None
    if tp.__getattribute__ is not object.__getattribute__:  # type: ignore[comparison-overlap]
        return None
    if inspect.getattr_static(tp, "__getattr__", None) is not None:
        return None
    for name in written | loaded:
        attr = inspect.getattr_static(tp, name, _ABSENT)
        if attr is _ABSENT:
            continue
        kind = type(attr)
        if name in written and (hasattr(kind, "__set__") or hasattr(kind, "__delete__")):
            return None
        if name in loaded and hasattr(kind, "__get__"):
            return None
    return tuple(sorted(written))


_ABSENT = object()


_SNAPSHOTTERS: Dict[Tuple[str, ...], Callable[[Dict[str, Any], Callable[[Any], None]], None]] = {}


def snapshotter(names: Tuple[str, ...], missing: Any) -> Callable[[Dict[str, Any], Callable[[Any], None]], None]:
    """``f(d, add)``: ``add(d.get(name, missing))`` for each of ``names`` in order, generated
    once per name tuple. The per-instance snapshot is one call with the lookups inline and
    allocates nothing (values go to a flat column; a tuple per instance would be one more
    object for the collector to walk after the commit)."""
    found = _SNAPSHOTTERS.get(names)
    if found is None:
        if not all(isinstance(n, str) and n.isidentifier() for n in names):
            raise ValueError(f"not attribute names: {names!r}")
        lines = "".join(f"    add(get({n!r}, _missing))\n" for n in names)
        ns: Dict[str, Any] = {}
        exec(f"def snapshot(d, add, _missing=_missing):\n    get = d.get\n{lines}", {"_missing": missing}, ns)
        found = ns["snapshot"]
        _SNAPSHOTTERS[names] = found
    return found
