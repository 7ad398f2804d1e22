"""Finding the live instances of updated classes, without scanning the heap per commit.

Game servers tune the collector: ``gc.freeze()`` hides every frozen object from
``gc.get_objects``/``gc.get_referrers`` and ``gc.disable()`` is common, so the
runtime cannot rely on a heap walk at commit time.  Instead, for managed
classes that define (or inherit) ``__reload_instance__``, it tracks instances
from creation with weak references:

* a small callable is installed as the class's ``__new__`` (wrapping the
  class's own ``__new__`` when it has one); it records every new instance of
  the class and of its subclasses in :class:`InstanceRegistry`, keyed by
  ``id`` with a weak reference, so tracking never keeps an object alive and
  works for unhashable instances (dataclasses with ``eq=True``);
* the tracker is permanent instrumentation: it is invisible to journals and
  plans (which see the class's logical ``__new__``) and is never removed,
  not even by a rollback, because CPython cannot un-override ``tp_new``
  (see :class:`~hotfleet.snapshot.InheritedNew`);
* it is installed when a managed module is imported, when the ``Runtime`` is
  created (for modules already imported) and at commit for classes a patch
  gives the hook; only those classes pay (one dict insert per instance);
* instances that existed before tracking started are found by **one** heap
  scan that also sees frozen objects (the frozen generation is briefly
  unfrozen, with the collector paused, then frozen again).  That scan runs at
  ``Runtime`` creation, at import, and in the one commit that adds the hook
  to a class (the plan says so); from then on every commit uses the registry.

Limits (documented in the README): instances of classes without a
``__weakref__`` slot cannot be tracked and are found by a heap scan at every
commit that needs them; a subclass whose own ``__new__`` calls
``object.__new__`` directly (not ``super().__new__``) bypasses tracking.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from .snapshot import MISSING, InheritedNew, class_set, new_standin, reference

log = logging.getLogger("hotfleet")

__all__ = ["InstanceRegistry", "InstanceTracker", "heap_instances", "HOOK_INSTANCE"]

HOOK_INSTANCE = "__reload_instance__"


class InstanceRegistry:
    """Weak registry of instances, bucketed by exact type."""

    def __init__(self) -> None:
        self._buckets: Dict[type, Dict[int, weakref.KeyedRef[int, Any]]] = {}
        self._callbacks: Dict[type, Callable[[weakref.KeyedRef[int, Any]], None]] = {}
        self.untrackable: Set[type] = set()
        self._lock = threading.Lock()

    def _bucket(self, tp: type) -> Tuple[Dict[int, weakref.KeyedRef[int, Any]], Callable[[weakref.KeyedRef[int, Any]], None]]:
        with self._lock:
            bucket = self._buckets.get(tp)
            if bucket is None:
                bucket = {}

                def _gone(ref: weakref.KeyedRef[int, Any], bucket: Dict[int, weakref.KeyedRef[int, Any]] = bucket) -> None:
                    # The id may already belong to a newer object: only drop our own ref.
                    if bucket.get(ref.key) is ref:
                        del bucket[ref.key]

                self._buckets[tp] = bucket
                self._callbacks[tp] = _gone
            return bucket, self._callbacks[tp]

    def add(self, obj: Any) -> bool:
        """Track ``obj``; False when it cannot be weakly referenced."""
        tp = type(obj)
        bucket = self._buckets.get(tp)
        if bucket is None:
            bucket, callback = self._bucket(tp)
        else:
            callback = self._callbacks[tp]
        key = id(obj)
        if key in bucket and bucket[key]() is obj:
            return True
        try:
            bucket[key] = weakref.KeyedRef(obj, callback, key)
        except TypeError:
            self.untrackable.add(tp)
            return False
        return True

    def instances(self, cls: type) -> List[Any]:
        """Live tracked instances of ``cls`` and its subclasses, in creation order."""
        out: List[Any] = []
        for tp, bucket in list(self._buckets.items()):
            if not issubclass(tp, cls):
                continue
            for ref in list(bucket.values()):
                obj = ref()
                if obj is not None:
                    out.append(obj)
        return out

    def groups(self, cls: type) -> List[Tuple[type, List[Any], List[Any]]]:
        """Live tracked instances of ``cls`` and subclasses, by exact type: (type, objects, their refs)."""
        out: List[Tuple[type, List[Any], List[Any]]] = []
        for tp, bucket in list(self._buckets.items()):
            if not issubclass(tp, cls):
                continue
            refs = list(bucket.values())
            # A comprehension calls the refs faster than map() with a helper
            # (no Python frame per call), on every supported version.
            objs = [ref() for ref in refs]
            # Dead refs are normally dropped by their callback already.  An
            # identity test, not ``None in objs``: that would call each
            # instance's __eq__ (game code, and slow).
            if [obj for obj in objs if obj is None]:  # died since; keep the columns aligned
                pairs = [(o, r) for o, r in zip(objs, refs) if o is not None]
                objs = [o for o, _r in pairs]
                refs = [r for _o, r in pairs]
            if objs:
                out.append((tp, objs, refs))
        return out

    def ref_groups(self, cls: type) -> List[Tuple[type, List[Any]]]:
        """Weak references to the tracked instances of ``cls`` and subclasses, by exact type.

        Not dereferenced here: the commit dereferences each one right before
        its hook, while that instance's memory is being worked on anyway (a
        separate pass costs a cache miss per instance on a large heap).
        """
        out: List[Tuple[type, List[Any]]] = []
        for tp, bucket in list(self._buckets.items()):
            if issubclass(tp, cls) and bucket:
                out.append((tp, list(bucket.values())))
        return out

    def count(self, cls: type) -> int:
        """Number of tracked instances of ``cls`` and subclasses (dead ones may still count)."""
        return sum(len(b) for tp, b in list(self._buckets.items()) if issubclass(tp, cls))

    def has_untrackable(self, cls: type) -> bool:
        """True when some subclass of ``cls`` has instances that cannot be tracked."""
        return any(issubclass(tp, cls) for tp in self.untrackable)


class _TrackingNew(InheritedNew):
    """Installed (inside a staticmethod) as ``__new__`` of a tracked class.

    Creates the instance like the class would (its own ``__new__`` from the
    source, or the inherited one) and records it in the registry.
    """

    __slots__ = ("registry",)
    _hotfleet_tracker = True

    def __init__(self, owner: type, prev_entry: Any, registry: InstanceRegistry) -> None:
        super().__init__(owner, prev_entry)
        self.registry = registry

    def __call__(self, cls: type, *args: Any, **kwargs: Any) -> Any:
        obj = self._create(cls, args, kwargs)
        if isinstance(obj, cls):
            self.registry.add(obj)
        return obj


def _all_subclasses(classes: Iterable[type]) -> Set[type]:
    out: Set[type] = set()
    stack = list(classes)
    while stack:
        cls = stack.pop()
        if cls in out:
            continue
        out.add(cls)
        try:
            stack.extend(type.__subclasses__(cls))
        except TypeError:
            pass
    return out


def heap_instances(classes: Iterable[type]) -> List[Any]:
    """Every live instance of ``classes`` (subclasses included), frozen objects too.

    ``gc.get_objects`` does not report objects in the permanent (frozen)
    generation, so the frozen generation is unfrozen for the scan and frozen
    again afterwards; the collector is paused meanwhile so the unfrozen
    objects are not collected or moved.  Side effect: objects that were young
    at the time are frozen too (harmless: they are live).
    """
    wanted = _all_subclasses(classes)
    if not wanted:
        return []
    was_enabled = gc.isenabled()
    gc.disable()
    frozen = gc.get_freeze_count() if hasattr(gc, "get_freeze_count") else 0
    try:
        if frozen:
            gc.unfreeze()
        objects = gc.get_objects()
    finally:
        if frozen:
            gc.freeze()
        if was_enabled:
            gc.enable()
    try:
        return [o for o in objects if type(o) in wanted]
    finally:
        del objects


def _tracker_in(value: Any) -> Optional[_TrackingNew]:
    """The tracker inside a raw ``__new__`` class-dict entry, or None."""
    standin = new_standin(value)
    return standin if isinstance(standin, _TrackingNew) else None


class InstanceTracker:
    """Installs trackers on classes with ``__reload_instance__`` and answers "which instances?"."""

    def __init__(self) -> None:
        self.registry = InstanceRegistry()
        self._entries: Dict[type, staticmethod[..., Any]] = {}
        self._complete: "weakref.WeakSet[type]" = weakref.WeakSet()
        self.scans = 0

    # -- state -------------------------------------------------------------

    def root(self, cls: type) -> Optional[type]:
        """The class in ``cls``'s MRO whose ``__new__`` is our tracker, if any."""
        for klass in cls.__mro__:
            tracker = _tracker_in(klass.__dict__.get("__new__"))
            if tracker is not None and tracker.owner is klass:
                return klass
        return None

    def is_complete(self, cls: type) -> bool:
        """True when every live instance of ``cls`` is known to the registry."""
        root = self.root(cls)
        return root is not None and root in self._complete and not self.registry.has_untrackable(cls)

    def tracker_of(self, cls: type) -> Optional[_TrackingNew]:
        """The tracker installed directly on ``cls``, if any."""
        tracker = _tracker_in(cls.__dict__.get("__new__"))
        if tracker is not None and tracker.owner is cls:
            return tracker
        return None

    # -- installing ----------------------------------------------------------

    def install(self, cls: type) -> bool:
        """Make sure instances of ``cls`` are tracked from now on.

        The tracker is permanent instrumentation, not part of any patch: it
        keeps the class's logical ``__new__`` (what :func:`class_get` reports)
        unchanged, so journals never install or remove it, and removing it
        would break the class (see :class:`~hotfleet.snapshot.InheritedNew`).
        Returns True when it was installed now, i.e. instances that already
        exist are not known yet and need a one-time scan.
        """
        if self.root(cls) is not None:
            return False
        raw = cls.__dict__.get("__new__", MISSING)
        standin = new_standin(raw)
        prev_entry = standin.prev_entry if standin is not None else raw
        entry = self._entries.get(cls)
        if entry is None:
            entry = staticmethod(_TrackingNew(cls, prev_entry, self.registry))
            self._entries[cls] = entry
        else:
            tracker = _tracker_in(entry)
            assert tracker is not None
            tracker.prev_entry = prev_entry
        self._complete.discard(cls)
        class_set(cls, "__new__", entry)
        return True

    def mark_complete(self, classes: Iterable[type]) -> None:
        """Record that every instance of the tracker roots of ``classes`` is known."""
        for cls in classes:
            root = self.root(cls)
            if root is not None:
                self._complete.add(root)

    def scan(self, classes: Iterable[type]) -> int:
        """One heap scan adding existing instances of ``classes`` to the registry."""
        classes = list(classes)
        if not classes:
            return 0
        self.scans += 1
        found = heap_instances(classes)
        for obj in found:
            self.registry.add(obj)
        self.mark_complete(classes)
        return len(found)

    def instances(self, cls: type) -> List[Any]:
        """Instances of ``cls`` (and subclasses): from the registry, or a scan when untrackable."""
        if self.registry.has_untrackable(cls) or self.root(cls) is None:
            return heap_instances([cls])
        return self.registry.instances(cls)

    def instance_groups(self, cls: type) -> List[Tuple[type, List[Any], List[Any]]]:
        """Like :meth:`instances`, by exact type with a reference per object (what commit iterates)."""
        if self.registry.has_untrackable(cls) or self.root(cls) is None:
            grouped: Dict[type, List[Any]] = {}
            for obj in heap_instances([cls]):
                grouped.setdefault(type(obj), []).append(obj)
            return [(tp, objs, [reference(o) for o in objs]) for tp, objs in grouped.items()]
        return self.registry.groups(cls)

    def instance_refs(self, cls: type) -> List[Tuple[type, List[Any]]]:
        """Like :meth:`instance_groups`, references only (what commit iterates; see ``ref_groups``)."""
        if self.registry.has_untrackable(cls) or self.root(cls) is None:
            return [(tp, refs) for tp, _objs, refs in self.instance_groups(cls)]
        return self.registry.ref_groups(cls)

    def instrument(self, classes: Iterable[type]) -> int:
        """Install trackers on ``classes`` (outside any transaction) and scan once."""
        fresh = [cls for cls in classes if self.install(cls)]
        if fresh:
            return self.scan(fresh)
        return 0


def hook_classes(namespace: Dict[str, Any], modname: str) -> List[type]:
    """Classes defined by ``modname`` (nested ones too) that have ``__reload_instance__``."""
    out: List[type] = []
    seen: Set[int] = set()

    def visit(cls: type) -> None:
        if id(cls) in seen:
            return
        seen.add(id(cls))
        if getattr(cls, HOOK_INSTANCE, None) is not None:
            out.append(cls)
        for value in list(cls.__dict__.values()):
            if isinstance(value, type) and value.__module__ == modname:
                visit(value)

    for value in list(namespace.values()):
        if isinstance(value, type) and value.__module__ == modname and "<locals>" not in value.__qualname__:
            visit(value)
    return out
