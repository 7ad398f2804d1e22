"""The journal: a record of everything a commit replaced, and how to put it back.

Every change a commit makes goes through a journal entry that keeps the old
and the new value.  Undo comes in two strengths:

* **strict** (a commit failed half-way): everything is put back, the process
  is exactly as before the commit;
* **three-way** (``rollback`` later): code is put back unconditionally, but a
  piece of data is only put back when it still holds what the commit (or a
  hook) set; when the game changed it since, the live value is kept and the
  entry is reported as a conflict, so a rollback never wipes game progress.
"""

from __future__ import annotations

import functools
import inspect
import operator
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, MutableMapping, Optional, Tuple

__all__ = [
    "MISSING",
    "Journal",
    "same_value",
    "class_get",
    "class_set",
    "class_put",
    "class_snapshot",
    "InheritedNew",
    "new_standin",
    "FunctionState",
    "InstanceState",
    "Conflict",
]


class _Missing:
    """Marks an absent key/attribute (distinct from None)."""

    _instance: Optional["_Missing"] = None

    def __new__(cls) -> "_Missing":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<missing>"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()


def same_value(a: Any, b: Any) -> bool:
    """Strict value equality for literal data: types must match at every level.

    ``1 == 1.0 == True`` must not count as "unchanged" when deciding whether
    the game touched a constant.
    """
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return False
        return all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b or (a != a and b != b)
    try:
        return bool(a == b)
    except Exception:
        return False


class InheritedNew:
    """Stands in a class's ``__dict__`` as ``__new__`` where the runtime must not delete it.

    CPython quirk: once a class has had its own ``__new__``, deleting it
    leaves the type's ``tp_new`` slot dispatching through ``__new__`` lookup,
    and ``object.__new__`` then refuses constructor arguments
    (``TypeError: object.__new__() takes exactly one argument``).  So the
    runtime never deletes ``__new__``: it installs this callable, which does
    what inheriting would do (or calls ``prev_entry``, the class's own
    ``__new__`` as written in its source).  :func:`class_get` and
    :func:`class_put` see through it, so journals and plans deal with the
    logical value.  The instance tracker is a subclass.
    """

    __slots__ = ("owner", "prev_entry", "__weakref__")
    _hotfleet_new = True

    def __init__(self, owner: type, prev_entry: Any = None) -> None:
        self.owner = owner
        self.prev_entry: Any = MISSING if prev_entry is None else prev_entry

    def _create(self, cls: type, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        prev = self.prev_entry
        if prev is MISSING:
            nxt = super(self.owner, cls).__new__  # type: ignore[arg-type]  # owner is a class
            # object.__new__ refuses extra arguments once __new__ is overridden.
            return nxt(cls) if nxt is object.__new__ else nxt(cls, *args, **kwargs)
        func = prev.__func__ if isinstance(prev, staticmethod) else prev
        return func(cls, *args, **kwargs)

    def __call__(self, cls: type, *args: Any, **kwargs: Any) -> Any:
        return self._create(cls, args, kwargs)

    @property
    def __wrapped__(self) -> Any:
        """The class's own ``__new__`` (None when it has none)."""
        prev = self.prev_entry
        if prev is MISSING:
            return None
        return prev.__func__ if isinstance(prev, staticmethod) else prev

    @property
    def __signature__(self) -> inspect.Signature:
        """Keep ``inspect.signature(cls)`` what it would be without this stand-in."""
        wrapped = self.__wrapped__
        if wrapped is not None:
            return inspect.signature(wrapped)
        init = getattr(self.owner, "__init__")
        if init is object.__init__:
            return inspect.Signature([inspect.Parameter("cls", inspect.Parameter.POSITIONAL_ONLY)])
        return inspect.signature(init)

    def __repr__(self) -> str:
        return f"<hotfleet {type(self).__name__} of {self.owner.__module__}.{self.owner.__qualname__}>"


def new_standin(value: Any) -> Optional[InheritedNew]:
    """The :class:`InheritedNew` inside a raw ``__new__`` class-dict entry, or None."""
    if isinstance(value, staticmethod):
        func: Any = value.__func__
        if isinstance(func, InheritedNew):
            return func
    return None


def class_get(cls: type, key: str) -> Any:
    """Logical value of ``key`` in the class's own ``__dict__`` (MISSING when absent)."""
    value = cls.__dict__.get(key, MISSING)
    if key == "__new__":
        standin = new_standin(value)
        if standin is not None:
            return standin.prev_entry
    return value


def class_set(cls: type, key: str, value: Any) -> None:
    """Set a class attribute bypassing metaclass ``__setattr__`` overrides.

    ``type.__setattr__`` also refreshes CPython's type caches and slots
    (``__init__``, ``__eq__`` ...), which writing the dict directly would not.
    """
    type.__setattr__(cls, key, value)


def class_put(cls: type, key: str, value: Any) -> None:
    """Set (MISSING: delete) the logical value of a class attribute.

    ``__new__`` is never deleted (see :class:`InheritedNew`); when a stand-in
    is installed, only its ``prev_entry`` changes.
    """
    if key == "__new__":
        standin = new_standin(cls.__dict__.get("__new__"))
        if standin is not None:
            standin.prev_entry = value
            return
        if value is MISSING:
            if "__new__" in cls.__dict__:
                type.__setattr__(cls, "__new__", staticmethod(InheritedNew(cls)))
            return
    if value is MISSING:
        if key in cls.__dict__:
            type.__delattr__(cls, key)
    else:
        type.__setattr__(cls, key, value)


def class_snapshot(cls: type) -> Dict[str, Any]:
    """Logical copy of a class's own ``__dict__`` (stand-ins resolved)."""
    out = dict(cls.__dict__)
    if "__new__" in out:
        logical = class_get(cls, "__new__")
        if logical is MISSING:
            del out["__new__"]
        else:
            out["__new__"] = logical
    return out


@dataclass
class Conflict:
    """A piece of data a rollback left alone because it changed after the commit."""

    where: str
    name: str
    reason: str

    def to_dict(self) -> Dict[str, str]:
        """JSON-able form."""
        return {"where": self.where, "name": self.name, "reason": self.reason}


_FN_ATTRS = ("__code__", "__defaults__", "__kwdefaults__", "__doc__", "__annotations__", "__qualname__")


@dataclass
class FunctionState:
    """The replaceable attributes of a function object."""

    code: types.CodeType
    defaults: Optional[Tuple[Any, ...]]
    kwdefaults: Optional[Dict[str, Any]]
    doc: Optional[str]
    annotations: Dict[str, Any]
    qualname: str

    @classmethod
    def of(cls, fn: types.FunctionType) -> "FunctionState":
        """Capture ``fn``'s current state."""
        return cls(fn.__code__, fn.__defaults__, fn.__kwdefaults__, fn.__doc__, fn.__annotations__, fn.__qualname__)

    def apply(self, fn: types.FunctionType) -> None:
        """Put this state into ``fn`` (identity of ``fn`` kept)."""
        fn.__code__ = self.code
        fn.__defaults__ = self.defaults
        fn.__kwdefaults__ = self.kwdefaults
        fn.__doc__ = self.doc
        fn.__annotations__ = self.annotations
        fn.__qualname__ = self.qualname


_SLOT_CACHE: Dict[type, Tuple[Tuple[str, Any], ...]] = {}


def _slot_descriptors(tp: type) -> Tuple[Tuple[str, Any], ...]:
    """(name, member descriptor) for every ``__slots__`` entry along the MRO."""
    cached = _SLOT_CACHE.get(tp)
    if cached is not None:
        return cached
    out: List[Tuple[str, Any]] = []
    seen = set()
    for klass in tp.__mro__:
        slots = klass.__dict__.get("__slots__")
        if slots is None:
            continue
        if isinstance(slots, str):
            slots = (slots,)
        for slot in slots:
            if slot in ("__dict__", "__weakref__"):
                continue
            mangled = slot
            if slot.startswith("__") and not slot.endswith("__"):
                mangled = "_" + klass.__name__.lstrip("_") + slot
            descr = klass.__dict__.get(mangled)
            if descr is not None and hasattr(descr, "__get__") and mangled not in seen:
                seen.add(mangled)
                out.append((mangled, descr))
    result = tuple(out)
    _SLOT_CACHE[tp] = result
    return result


class InstanceState:
    """Shallow copy of an instance's ``__dict__`` and slot values (one level: nested objects are shared).

    Taking it costs one C-level dict copy, which keeps instance hooks cheap
    on tens of thousands of instances; differences are only computed when a
    journal entry is undone.
    """

    __slots__ = ("dict_copy", "slots")

    def __init__(self, dict_copy: Optional[Dict[str, Any]], slots: Optional[Dict[str, Any]]) -> None:
        self.dict_copy = dict_copy
        self.slots = slots

    @classmethod
    def capture(cls, obj: Any) -> "InstanceState":
        """Copy ``obj``'s attributes."""
        try:
            copy: Optional[Dict[str, Any]] = object.__getattribute__(obj, "__dict__").copy()
        except AttributeError:
            copy = None
        descriptors = _slot_descriptors(type(obj))
        slots: Optional[Dict[str, Any]] = None
        if descriptors:
            slots = {}
            for name, descr in descriptors:
                try:
                    slots[name] = descr.__get__(obj, type(obj))
                except AttributeError:
                    slots[name] = MISSING
        return cls(copy, slots)

    def same_as(self, other: "InstanceState") -> bool:
        """True when both states hold the very same objects under the same names."""
        return _same_mapping(self.dict_copy, other.dict_copy) and _same_mapping(self.slots, other.slots)


def _same_mapping(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]]) -> bool:
    if a is None or b is None:
        return a is b
    # C-level iteration: same keys in the same order holding identical values
    return len(a) == len(b) and a.keys() == b.keys() and all(map(operator.is_, a.values(), b.values()))


def instance_changes(before: InstanceState, after: InstanceState) -> Dict[Tuple[str, str], Tuple[Any, Any]]:
    """(kind, name) -> (old, new) for every attribute that differs between two states."""
    out: Dict[Tuple[str, str], Tuple[Any, Any]] = {}
    for kind, old_map, new_map in (("dict", before.dict_copy, after.dict_copy), ("slot", before.slots, after.slots)):
        old_map = old_map or {}
        new_map = new_map or {}
        for key, new in new_map.items():
            old = old_map.get(key, MISSING)
            if old is not new:
                out[(kind, key)] = (old, new)
        for key, old in old_map.items():
            if key not in new_map and old is not MISSING:
                out[(kind, key)] = (old, MISSING)
    return out


def has_slots(tp: type) -> bool:
    """True when instances of ``tp`` keep attributes in ``__slots__``."""
    return bool(_slot_descriptors(tp))


def plain_dict_type(tp: type) -> bool:
    """True when ``obj.__dict__`` is the instance's real attribute dict and holds all of it.

    That is: no ``__slots__`` values, a ``__dict__``, no ``__getattribute__``
    override and the standard ``__dict__`` descriptor, so ``obj.__dict__``
    (what the commit's C-level snapshot loop reads) is exactly what
    ``object.__getattribute__(obj, "__dict__")`` (what undo writes) returns.
    """
    # Not cached: a patch may give the class a __getattribute__ later.
    descr = None
    for klass in tp.__mro__:
        if "__dict__" in klass.__dict__:
            descr = klass.__dict__["__dict__"]
            break
    return (
        not has_slots(tp)
        and tp.__dictoffset__ != 0
        and tp.__getattribute__ is object.__getattribute__  # type: ignore[comparison-overlap]
        and isinstance(descr, types.GetSetDescriptorType)
    )


def _instance_get(obj: Any, kind: str, name: str) -> Any:
    if kind == "dict":
        return object.__getattribute__(obj, "__dict__").get(name, MISSING)
    for slot, descr in _slot_descriptors(type(obj)):
        if slot == name:
            try:
                return descr.__get__(obj, type(obj))
            except AttributeError:
                return MISSING
    return MISSING


def _instance_put(obj: Any, kind: str, name: str, value: Any) -> None:
    if kind == "dict":
        d = object.__getattribute__(obj, "__dict__")
        if value is MISSING:
            d.pop(name, None)
        else:
            d[name] = value
        return
    for slot, descr in _slot_descriptors(type(obj)):
        if slot == name:
            if value is MISSING:
                try:
                    descr.__delete__(obj)
                except AttributeError:
                    pass
            else:
                descr.__set__(obj, value)
            return


class _Entry:
    """One reversible change."""

    __slots__ = ()

    def undo(self, strict: bool, conflicts: List[Conflict]) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class _FunctionEntry(_Entry):
    __slots__ = ("fn", "old", "new_code")

    def __init__(self, fn: types.FunctionType, old: FunctionState, new_code: types.CodeType) -> None:
        self.fn = fn
        self.old = old
        self.new_code = new_code

    def undo(self, strict: bool, conflicts: List[Conflict]) -> None:
        # Code is ours: always put the previous version back.
        self.old.apply(self.fn)


class _CodeBatchEntry(_Entry):
    """``__code__`` replaced in many functions at once (relocations), as two columns:
    the functions and the code each ran before. Undo puts every previous code back."""

    __slots__ = ("fns", "olds")

    def __init__(self) -> None:
        self.fns: List[types.FunctionType] = []
        self.olds: List[types.CodeType] = []

    def undo(self, strict: bool, conflicts: List[Conflict]) -> None:
        # Code is ours: always put the previous version back.
        for fn, old in zip(reversed(self.fns), reversed(self.olds)):
            fn.__code__ = old


class _SwapBatchEntry(_Entry):
    """Code, docstring and qualified name replaced in functions whose defaults and
    annotations stay (the common changed ``def``): one row per function."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: List[Tuple[types.FunctionType, types.CodeType, Optional[str], str]] = []

    def undo(self, strict: bool, conflicts: List[Conflict]) -> None:
        for fn, code, doc, qualname in reversed(self.rows):
            fn.__code__ = code
            fn.__doc__ = doc
            fn.__qualname__ = qualname


class _MappingEntry(_Entry):
    __slots__ = ("where", "getter", "setter", "key", "old", "new")

    def __init__(
        self,
        where: str,
        getter: Callable[[str], Any],
        setter: Callable[[str, Any], None],
        key: str,
        old: Any,
        new: Any,
    ) -> None:
        self.where = where
        self.getter = getter
        self.setter = setter
        self.key = key
        self.old = old
        self.new = new

    def undo(self, strict: bool, conflicts: List[Conflict]) -> None:
        current = self.getter(self.key)
        if strict or current is self.new:
            if current is not self.old:
                self.setter(self.key, self.old)
        elif current is not self.old:
            conflicts.append(Conflict(self.where, self.key, "changed after the commit; live value kept"))


class _ContainerEntry(_Entry):
    __slots__ = ("where", "name", "container", "old", "new")

    def __init__(self, where: str, name: str, container: Any, old: Any, new: Any) -> None:
        self.where = where
        self.name = name
        self.container = container
        self.old = old
        self.new = new

    def undo(self, strict: bool, conflicts: List[Conflict]) -> None:
        if strict or same_value(_contents(self.container), self.new):
            _fill(self.container, self.old)
        elif not same_value(_contents(self.container), self.old):
            conflicts.append(Conflict(self.where, self.name, "contents changed after the commit; live contents kept"))


class _InstanceEntry(_Entry):
    __slots__ = ("ref", "tname", "before", "after")

    def __init__(self, obj: Any, before: InstanceState, after: InstanceState) -> None:
        self.ref = reference(obj)
        self.tname = type(obj).__qualname__
        self.before = before
        self.after = after

    def undo(self, strict: bool, conflicts: List[Conflict]) -> None:
        obj = self.ref()
        if obj is None:
            return
        label = f"{self.tname} instance at {id(obj):#x}"
        for (kind, name), (old, new) in instance_changes(self.before, self.after).items():
            current = _instance_get(obj, kind, name)
            if strict or current is new:
                if current is not old:
                    _instance_put(obj, kind, name, old)
            elif current is not old:
                conflicts.append(Conflict(label, name, "instance attribute changed after the commit; live value kept"))


class StrongRef:
    """A reference with the ``weakref.ref`` call interface that keeps its object alive.

    Used for instances that cannot be weakly referenced.
    """

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj


def reference(obj: Any) -> Callable[[], Any]:
    """A weak reference to ``obj``, or a :class:`StrongRef` when it cannot have one."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return StrongRef(obj)


class _InstanceBatchEntry(_Entry):
    """What instance hooks changed on many instances, as three columns:
    references, ``__dict__`` copies before and after each hook call.

    Recording costs two C-level dict copies per instance (references are the
    registry's own); differences are only computed on undo, or by
    :meth:`compact` off the game thread (the copies are private, so any thread
    may compare them).
    """

    __slots__ = ("cols", "compacted")

    def __init__(self) -> None:
        # One attribute holding the three columns: replacing it is atomic, so a
        # compaction on another thread never leaves the columns misaligned.
        self.cols: Tuple[List[Callable[[], Any]], List[Dict[str, Any]], List[Dict[str, Any]]] = ([], [], [])
        self.compacted = False

    @property
    def refs(self) -> List[Callable[[], Any]]:
        """References to the recorded instances."""
        return self.cols[0]

    @property
    def befores(self) -> List[Dict[str, Any]]:
        """``__dict__`` copies taken before each hook call."""
        return self.cols[1]

    @property
    def afters(self) -> List[Dict[str, Any]]:
        """``__dict__`` copies taken after each hook call."""
        return self.cols[2]

    def add(self, obj: Any, before: Dict[str, Any], after: Dict[str, Any]) -> None:
        """Record one instance (the commit loop appends to the columns directly)."""
        self.refs.append(reference(obj))
        self.befores.append(before)
        self.afters.append(after)

    def extend(self, refs: List[Callable[[], Any]], befores: List[Dict[str, Any]], afters: List[Dict[str, Any]]) -> None:
        """Record a whole group of instances (aligned columns)."""
        self.refs.extend(refs)
        self.befores.extend(befores)
        self.afters.extend(afters)

    def rows(self) -> List[Tuple[Callable[[], Any], Dict[str, Any], Dict[str, Any]]]:
        """(reference, before, after) per recorded instance."""
        refs, befores, afters = self.cols
        return list(zip(refs, befores, afters))

    def compact(self, courtesy: Optional[Callable[[], None]] = None) -> None:
        """Keep only the attributes that changed (bounds the memory a stack entry holds);
        ``courtesy`` is called every few hundred instances (it runs off the game thread)."""
        if self.compacted:
            return
        refs: List[Callable[[], Any]] = []
        befores: List[Dict[str, Any]] = []
        afters: List[Dict[str, Any]] = []
        cur_refs, cur_befores, cur_afters = self.cols
        for i, (ref, before, after) in enumerate(zip(cur_refs, cur_befores, cur_afters)):
            if courtesy is not None and not i & 255:
                courtesy()
            old_part: Dict[str, Any] = {}
            new_part: Dict[str, Any] = {}
            for key, new in after.items():
                old = before.get(key, MISSING)
                if old is not new:
                    old_part[key] = old
                    new_part[key] = new
            for key, old in before.items():
                if key not in after:
                    old_part[key] = old
                    new_part[key] = MISSING
            if old_part:
                refs.append(ref)
                befores.append(old_part)
                afters.append(new_part)
        self.cols = (refs, befores, afters)
        self.compacted = True

    def undo(self, strict: bool, conflicts: List[Conflict]) -> None:
        # Once per recorded instance: keep it to a walk over the (few) keys.
        for obj, current_dict, before, after in _live_rows(self.cols):
            added = 0
            for key, new in after.items():
                old = before.get(key, MISSING)
                if old is new:
                    continue
                if old is MISSING:
                    added += 1
                # The common case (the game left the value alone) is inlined:
                # a call per restored attribute is a large share of a
                # rollback over tens of thousands of instances.
                current = current_dict.get(key, MISSING)
                if current is new or strict:
                    if current is not old:
                        _dict_put(current_dict, key, old)
                elif current is not old:
                    _restore_attr(obj, current_dict, key, old, new, strict, conflicts)
            if len(before) + added > len(after):  # the hook deleted attributes
                for key in before.keys() - after.keys():
                    _restore_attr(obj, current_dict, key, before[key], MISSING, strict, conflicts)


def _live_rows(cols: Tuple[List[Any], List[Any], List[Any]]) -> Iterator[Tuple[Any, Dict[str, Any], Any, Any]]:
    """(instance, its ``__dict__``, before, after) for each recorded row, newest first,
    skipping instances that died or lost their ``__dict__``."""
    refs, befores, afters = cols
    for ref, before, after in zip(reversed(refs), reversed(befores), reversed(afters)):
        obj = ref()
        if obj is None:
            continue
        try:
            current_dict = object.__getattribute__(obj, "__dict__")
        except AttributeError:
            continue
        yield obj, current_dict, before, after


def _restore_attr(
    obj: Any, current_dict: Dict[str, Any], key: str, old: Any, new: Any, strict: bool, conflicts: List[Conflict]
) -> None:
    """Put ``old`` back under ``key`` if the attribute still holds ``new`` (or ``strict``),
    else record a conflict (the game changed it since)."""
    current = current_dict.get(key, MISSING)
    if strict or current is new:
        if current is not old:
            _dict_put(current_dict, key, old)
    elif current is not old:
        conflicts.append(
            Conflict(
                f"{type(obj).__qualname__} instance at {id(obj):#x}",
                key,
                "instance attribute changed after the commit; live value kept",
            )
        )


class _InstanceFieldsEntry(_Entry):
    """What an instance hook whose writes are known (``hook_writes.py``) changed, as three
    columns: references, and the values of ``names`` before and after each hook call, flat
    (row ``i`` holds ``values[i * len(names):(i + 1) * len(names)]``; MISSING: absent).

    Recording allocates nothing per instance, where the general path takes two
    ``__dict__`` copies.
    """

    __slots__ = ("names", "cols", "compacted")

    def __init__(self, names: Tuple[str, ...]) -> None:
        self.names = names
        self.cols: Tuple[List[Callable[[], Any]], List[Any], List[Any]] = ([], [], [])
        self.compacted = False

    def rows(self) -> Iterator[Tuple[Callable[[], Any], List[Any], List[Any]]]:
        """(reference, values before, values after) per recorded instance."""
        refs, befores, afters = self.cols
        n = len(self.names)
        for i, ref in enumerate(refs):
            yield ref, befores[i * n : (i + 1) * n], afters[i * n : (i + 1) * n]

    def compact(self, courtesy: Optional[Callable[[], None]] = None) -> None:
        """Drop the instances the hook left unchanged (off the game thread)."""
        if self.compacted:
            return
        keep: Tuple[List[Callable[[], Any]], List[Any], List[Any]] = ([], [], [])
        for i, (ref, before, after) in enumerate(self.rows()):
            if courtesy is not None and not i & 255:
                courtesy()
            if not all(map(operator.is_, before, after)):
                keep[0].append(ref)
                keep[1].extend(before)
                keep[2].extend(after)
        self.cols = keep
        self.compacted = True

    def undo(self, strict: bool, conflicts: List[Conflict]) -> None:
        names = self.names
        refs, befores, afters = self.cols
        n = len(names)
        per_row = (
            refs,
            [befores[i * n : (i + 1) * n] for i in range(len(refs))],
            [afters[i * n : (i + 1) * n] for i in range(len(refs))],
        )
        for obj, current_dict, before, after in _live_rows(per_row):
            for name, old, new in zip(names, before, after):
                if old is not new:
                    _restore_attr(obj, current_dict, name, old, new, strict, conflicts)


class _CallbackEntry(_Entry):
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn

    def undo(self, strict: bool, conflicts: List[Conflict]) -> None:
        self.fn()


def _contents(container: Any) -> Any:
    if isinstance(container, dict):
        return dict(container)
    if isinstance(container, list):
        return list(container)
    if isinstance(container, set):
        return set(container)
    raise TypeError(f"unsupported container {type(container).__name__}")


def _fill(container: Any, contents: Any) -> None:
    if isinstance(container, dict):
        container.clear()
        container.update(contents)
    elif isinstance(container, list):
        container[:] = contents
    elif isinstance(container, set):
        container.clear()
        container.update(contents)
    else:
        raise TypeError(f"unsupported container {type(container).__name__}")


class Journal:
    """Ordered list of reversible changes made by one commit."""

    def __init__(self) -> None:
        self._entries: List[_Entry] = []

    def __len__(self) -> int:
        return len(self._entries)

    # -- recording -------------------------------------------------------

    def set_function(self, fn: types.FunctionType, state: FunctionState) -> None:
        """Replace ``fn``'s state, remembering the old one."""
        old = FunctionState.of(fn)
        state.apply(fn)
        self._entries.append(_FunctionEntry(fn, old, state.code))

    def set_code(self, fn: types.FunctionType, code: types.CodeType) -> None:
        """Replace only ``fn.__code__`` (closures and relocations)."""
        old = FunctionState.of(fn)
        fn.__code__ = code
        self._entries.append(_FunctionEntry(fn, old, code))

    def relocate(
        self, fns: List[types.FunctionType], olds: List[types.CodeType], news: List[types.CodeType]
    ) -> int:
        """Give each ``fns[i]`` still running ``olds[i]`` the code ``news[i]`` (computed in
        prepare); return how many changed.

        The commit-time half of a relocation: one identity check and one assignment per
        function, recorded as one entry (no per-function snapshot).
        """
        entry = _CodeBatchEntry()
        self._entries.append(entry)
        done = entry.fns
        done_old = entry.olds
        # Recorded as it goes: if an assignment raised, undo still covers the ones done.
        for fn, old, new in zip(fns, olds, news):
            if fn.__code__ is old:
                fn.__code__ = new
                done.append(fn)
                done_old.append(old)
        return len(done)

    def swap_functions(
        self, fns: List[types.FunctionType], code: types.CodeType, doc: Optional[str], qualname: str
    ) -> None:
        """Give every function of ``fns`` ``code``, ``doc`` and ``qualname`` (defaults,
        keyword defaults and annotations untouched), recording what each had."""
        entry = _SwapBatchEntry()
        self._entries.append(entry)
        rows = entry.rows
        for fn in fns:
            rows.append((fn, fn.__code__, fn.__doc__, fn.__qualname__))
            fn.__code__ = code
            fn.__doc__ = doc
            fn.__qualname__ = qualname

    def set_item(self, where: str, mapping: MutableMapping[str, Any], key: str, value: Any) -> None:
        """``mapping[key] = value`` (MISSING deletes), remembering the old value."""
        old = mapping.get(key, MISSING)
        _dict_put(mapping, key, value)
        self.record_item(where, mapping, key, old, value)

    def record_item(self, where: str, mapping: MutableMapping[str, Any], key: str, old: Any, new: Any) -> None:
        """Remember that ``mapping[key]`` went from ``old`` to ``new`` (already done)."""
        self._entries.append(
            _MappingEntry(where, functools.partial(_dict_get, mapping), functools.partial(_dict_put, mapping), key, old, new)
        )

    def set_class_attr(self, cls: type, key: str, value: Any) -> None:
        """Set (MISSING deletes) a class attribute, remembering the old value."""
        old = class_get(cls, key)
        _class_put(cls, key, value)
        self.record_class_attr(cls, key, old, value)

    def record_class_attr(self, cls: type, key: str, old: Any, new: Any) -> None:
        """Remember a class attribute change already done."""
        self._entries.append(
            _MappingEntry(
                f"{cls.__module__}.{cls.__qualname__}",
                functools.partial(class_get, cls),
                functools.partial(_class_put, cls),
                key,
                old,
                new,
            )
        )

    def set_contents(self, where: str, name: str, container: Any, contents: Any) -> None:
        """Replace a dict/list/set's contents in place (identity kept)."""
        old = _contents(container)
        _fill(container, contents)
        self._entries.append(_ContainerEntry(where, name, container, old, _contents(container)))

    def record_contents(self, where: str, name: str, container: Any, old: Any) -> None:
        """Remember a container's contents change already done."""
        self._entries.append(_ContainerEntry(where, name, container, old, _contents(container)))

    def record_instance(self, obj: Any, before: InstanceState) -> None:
        """Remember what a hook changed on an instance (``before``: its state before the hook)."""
        after = InstanceState.capture(obj)
        if not before.same_as(after):
            self._entries.append(_InstanceEntry(obj, before, after))

    def record_instance_states(self, obj: Any, before: InstanceState, after: InstanceState) -> None:
        """Remember an instance's state before and after a hook (already known to differ)."""
        self._entries.append(_InstanceEntry(obj, before, after))

    def instance_fields(self, names: Tuple[str, ...]) -> _InstanceFieldsEntry:
        """A new entry collecting the ``names`` attributes of hooked instances (fast path)."""
        entry = _InstanceFieldsEntry(names)
        self._entries.append(entry)
        return entry

    def instance_batch(self) -> _InstanceBatchEntry:
        """A new entry collecting what instance hooks change (fast path, see the class)."""
        entry = _InstanceBatchEntry()
        self._entries.append(entry)
        return entry

    def compact(self, courtesy: Optional[Callable[[], None]] = None) -> None:
        """Shrink recorded instance snapshots to what changed (safe from any thread)."""
        for entry in list(self._entries):
            if isinstance(entry, (_InstanceBatchEntry, _InstanceFieldsEntry)):
                entry.compact(courtesy)

    def on_undo(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` when this point of the journal is undone."""
        self._entries.append(_CallbackEntry(fn))

    # -- undo ------------------------------------------------------------

    def undo(self, strict: bool) -> Tuple[List[Conflict], List[str]]:
        """Undo every entry, newest first.  Returns (conflicts, errors)."""
        conflicts: List[Conflict] = []
        errors: List[str] = []
        for entry in reversed(self._entries):
            try:
                entry.undo(strict, conflicts)
            except Exception as exc:  # keep going: undo as much as possible
                errors.append(f"{type(entry).__name__}: {type(exc).__name__}: {exc}")
        self._entries.clear()
        return conflicts, errors


def _dict_get(mapping: Mapping[str, Any], key: str) -> Any:
    return mapping.get(key, MISSING)


def _dict_put(mapping: MutableMapping[str, Any], key: str, value: Any) -> None:
    if value is MISSING:
        mapping.pop(key, None)
    else:
        mapping[key] = value


def _class_put(cls: type, key: str, value: Any) -> None:
    class_put(cls, key, value)


def mapping_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(key, old, new) for every key whose value identity differs."""
    out: List[Tuple[str, Any, Any]] = []
    for key, new in list(after.items()):
        old = before.get(key, MISSING)
        if old is not new:
            out.append((key, old, new))
    for key, old in before.items():
        if key not in after:
            out.append((key, old, MISSING))
    return out
