"""Transactions: a prepared patch, its commit and the reports.

``Runtime.prepare`` returns a :class:`Transaction` holding the staged
actions and the plan.  :meth:`Transaction.commit` applies them on the game
thread: it re-validates that the live sources are still those the plan was
made against, applies the actions in source order, records the new sources,
makes sure instances of classes with ``__reload_instance__`` are tracked,
and runs the hooks.  Every change goes through a :class:`~hotfleet.snapshot.Journal`;
any exception restores the journal strictly and raises :class:`CommitError`.

A transaction belongs to a :class:`TransactionOwner` (the ``Runtime``), which keeps the
state of every transaction; a commit changes only what its :class:`CommitTarget` names
(the source records, the instance tracker, the import hook). So this module needs nothing
of the runtime's insides, and ``runtime.py`` imports this module, never the reverse.
"""

from __future__ import annotations

import functools
import gc
import importlib
import logging
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Set, Tuple

from .errors import CommitError, HookFailure, InstanceHookError
from .instances import HOOK_INSTANCE, InstanceTracker, hook_classes
from .plan import Plan
from .hook_writes import attrs_for_type, snapshotter
from .snapshot import MISSING, InstanceState, Journal, class_snapshot, mapping_changes, plain_dict_type
from .sources import RecordingFinder, SourceRegistry
from .staging import HOOK_CLASS, HOOK_MODULE, Action, CommitContext, ModuleStage

log = logging.getLogger("hotfleet")

__all__ = [
    "Transaction",
    "TransactionOwner",
    "CommitTarget",
    "CommitReport",
    "apply_transaction",
    "PREPARED",
    "COMMITTED",
    "ABORTED",
    "FAILED",
    "ROLLED_BACK",
]

PREPARED = "prepared"
COMMITTED = "committed"
ABORTED = "aborted"
FAILED = "failed"
ROLLED_BACK = "rolled_back"


@dataclass
class CommitReport:
    """What a commit did and how long the game thread was paused."""

    txn_id: str
    pause_ms: float
    hooks_ms: float
    counts: Dict[str, int]
    conflicts: List[Dict[str, Any]] = field(default_factory=list)
    instance_scans: List[str] = field(default_factory=list)
    modules: List[str] = field(default_factory=list)
    committed_at: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form."""
        return {
            "txn_id": self.txn_id,
            "pause_ms": round(self.pause_ms, 4),
            "hooks_ms": round(self.hooks_ms, 4),
            "counts": dict(sorted(self.counts.items())),
            "conflicts": list(self.conflicts),
            "instance_scans": list(self.instance_scans),
            "modules": list(self.modules),
            "committed_at": self.committed_at,
        }


class TransactionOwner(Protocol):
    """Who keeps a transaction's state and runs its commit (the ``Runtime``)."""

    def commit_transaction(self, txn: "Transaction") -> "CommitReport":
        """Commit ``txn`` (on the game thread); see :meth:`Transaction.commit`."""
        ...

    def abort_transaction(self, txn: "Transaction") -> None:
        """Abort ``txn``; see :meth:`Transaction.abort`."""
        ...


@dataclass(frozen=True)
class CommitTarget:
    """What a commit changes besides the live modules: the explicit commit context.

    ``registry`` records the source each module runs, ``tracker`` the instances hooks run
    on, ``finder`` serves added modules while the commit imports them.
    """

    registry: SourceRegistry
    tracker: InstanceTracker
    finder: RecordingFinder


class Transaction:
    """A prepared patch: ``commit()`` it on the game thread or ``abort()`` it.

    Attributes:
        id: the transaction id (the agent passes the patch id).
        plan: the :class:`~hotfleet.plan.Plan` of what commit will do.
        state: ``prepared``, ``committed``, ``aborted``, ``failed`` or ``rolled_back``.
        report: the :class:`CommitReport` once committed.
        error: the :class:`CommitError` when the commit failed.
    """

    def __init__(
        self, owner: TransactionOwner, txn_id: str, sources: Dict[str, str], stages: List[ModuleStage], plan: Plan
    ) -> None:
        self._owner = owner
        self.id = txn_id
        self.sources = dict(sources)
        self.stages = stages
        self.plan = plan
        self.state = PREPARED
        self.prepared_at = time.time()
        self.report: Optional[CommitReport] = None
        self.error: Optional[CommitError] = None
        #: The patch id this transaction takes off the stack (a revert), else None.
        self.reverts: Optional[str] = None

    @property
    def owner(self) -> TransactionOwner:
        """The runtime this transaction belongs to."""
        return self._owner

    @property
    def digests(self) -> Dict[str, str]:
        """Module -> sha256 of the source this transaction installs."""
        return {st.name: st.record.digest for st in self.stages}

    @property
    def base_digests(self) -> Dict[str, Optional[str]]:
        """Module -> sha256 of the live source the plan was made against (None: new module)."""
        return {st.name: (st.base.digest if st.base is not None else None) for st in self.stages}

    def commit(self) -> CommitReport:
        """Apply the patch in place.  Must run on the game thread, between ticks."""
        return self._owner.commit_transaction(self)

    def abort(self) -> None:
        """Drop the transaction; nothing live was touched.  Idempotent."""
        self._owner.abort_transaction(self)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able summary (state, digests, plan)."""
        return {
            "id": self.id,
            "state": self.state,
            "prepared_at": self.prepared_at,
            "digests": self.digests,
            "base_digests": self.base_digests,
            "plan": self.plan.to_dict(),
            "report": self.report.to_dict() if self.report is not None else None,
            "error": self.error.to_dict() if self.error is not None else None,
        }

    def __repr__(self) -> str:
        return f"<hotfleet.Transaction {self.id[:16]} {self.state} modules={list(self.sources)}>"


def _locate(exc: BaseException, filenames: Dict[str, str]) -> Tuple[Optional[str], Optional[str], Optional[int]]:
    """(module, function, line) of the innermost traceback frame inside a managed module."""
    found: Tuple[Optional[str], Optional[str], Optional[int]] = (None, None, None)
    for frame in traceback.extract_tb(exc.__traceback__):
        module = filenames.get(frame.filename)
        if module is not None:
            found = (module, frame.name, frame.lineno)
    return found


def apply_transaction(target: CommitTarget, txn: Transaction) -> Tuple[CommitReport, Journal]:
    """Apply ``txn`` to ``target`` (the caller holds the owner's commit lock, on the game thread)."""
    registry = target.registry
    tracker = target.tracker
    stages = txn.stages
    for st in stages:
        if st.new_module:
            if sys.modules.get(st.name) is not None or registry.get(st.name) is not None:
                raise CommitError(
                    f"module {st.name} appeared after prepare", module=st.name, hint="abort and prepare the patch again"
                )
            continue
        rec = registry.get(st.name)
        assert st.base is not None
        if rec is None or rec.digest != st.base.digest or sys.modules.get(st.name) is not st.module:
            raise CommitError(
                f"live source of {st.name} changed since prepare (live {rec.digest[:12] if rec else None}, prepared against {st.base.digest[:12]})",
                module=st.name,
                hint="another commit or rollback happened in between; abort and prepare the patch again",
            )
    filenames = {rec.filename: name for name in registry.names() for rec in [registry.get(name)] if rec is not None}
    for st in stages:
        filenames[st.record.filename] = st.name
    journal = Journal()
    ctx = CommitContext(journal, tracker)
    scans: List[str] = []
    current: Any = None
    phase = "applying the code"
    new_stages = [st for st in stages if st.new_module]
    journaled: Set[str] = set()
    finder = target.finder
    # Added modules are importable for the whole commit, so a patched module
    # whose changed import statement names one can import it.
    for st in new_stages:
        assert st.loader is not None
        finder.overrides[st.name] = st.loader
    # The collector is paused during the commit: a full collection triggered by
    # the commit's own allocations would make the pause grow with the heap.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    t0 = time.perf_counter()
    t_hooks = t0
    try:
        old_views: Dict[str, types.MappingProxyType[str, Any]] = {}
        for st in stages:
            if st.new_module or not st.changed:
                continue
            assert st.module is not None
            if st.module_hook:
                old_views[st.name] = types.MappingProxyType(dict(st.module.__dict__))
            for action in st.actions:
                current = action
                action.apply(ctx)
            current = None
            previous = registry.set(st.record)
            journal.on_undo(functools.partial(registry.restore, st.name, previous))
        if new_stages:
            _add_modules(registry, new_stages, journal, ctx, journaled)
        # instance tracking for classes that now have __reload_instance__
        updated: List[type] = []
        for st in stages:
            for cls in st.updated_classes:
                if cls not in updated:
                    updated.append(cls)
        for cls in updated:
            if getattr(cls, HOOK_INSTANCE, None) is None:
                continue
            fresh = tracker.install(cls)
            if fresh or not tracker.is_complete(cls):
                found = tracker.scan([cls])
                scans.append(f"{cls.__module__}.{cls.__qualname__} ({found} instances)")
                ctx.count("instance_scans")
        for st in new_stages:
            mod = sys.modules.get(st.name)
            if mod is None:
                continue
            for cls in hook_classes(mod.__dict__, st.name):
                tracker.install(cls)
                # an added module's instances can only have been made by its own top level
                for value in list(mod.__dict__.values()):
                    if isinstance(value, cls):
                        tracker.registry.add(value)
                tracker.mark_complete([cls])
        phase = "running hooks"
        t_hooks = time.perf_counter()
        _run_hooks(stages, updated, old_views, ctx, tracker)
    except BaseException as exc:
        _journal_added(new_stages, journal, journaled)
        conflicts, errors = journal.undo(strict=True)
        if errors:
            log.error("restoring after a failed commit had errors: %s", errors)
        if not isinstance(exc, Exception):
            raise
        if isinstance(exc, CommitError) and exc.module:
            raise
        module, func, lineno = _locate(exc, filenames)
        obj = func
        if isinstance(current, Action):
            module = module or current.module
            obj = current.obj if func in (None, "<module>") else f"{current.obj} ({func})"
            lineno = lineno or current.lineno
        if isinstance(exc, HookFailure):
            module, obj, lineno = exc.module or module, exc.obj, exc.lineno or lineno
            exc = exc.__cause__ or exc
        raise CommitError(
            f"commit failed while {phase}: {type(exc).__name__}: {exc}; everything was restored",
            module=module,
            obj=obj,
            lineno=lineno,
            hint="fix the patch (or its hook) and prepare it again",
        ) from exc
    finally:
        for st in new_stages:
            finder.overrides.pop(st.name, None)
        if gc_was_enabled:
            gc.enable()
    t1 = time.perf_counter()
    report = CommitReport(
        txn_id=txn.id,
        pause_ms=(t1 - t0) * 1000.0,
        hooks_ms=(t1 - t_hooks) * 1000.0,
        counts=dict(ctx.counts),
        conflicts=ctx.conflicts,
        instance_scans=scans,
        modules=[st.name for st in stages],
        committed_at=time.time(),
    )
    return report, journal


_EMPTY: Dict[str, Any] = {}  # the before/after of an instance that died before its turn (never written)


def _copy_into(d: Dict[str, Any], add: Any, copy: Any = dict.copy) -> None:
    """The general path's snapshot: a shallow copy of the instance dict."""
    add(copy(d))


def _hook_loop(hook: Any, refs: List[Any], cols: Any, snap: Any, dead_row: Any) -> int:
    """Run ``hook`` on each live referent of ``refs``, recording ``snap(obj.__dict__, add)``
    before and after each call into ``cols`` (references, befores, afters; ``snap`` adds
    one value per row or, for known attributes, one per attribute, to a flat column).

    The hot loop of a commit with instance hooks: it runs once per live
    instance.  With instances scattered through a large heap its cost is
    memory latency, so everything about one instance is done while its
    memory is hot (dereference, snapshot, hook, snapshot) and nothing else
    happens per instance: the references go into the journal as one list, no
    differences are computed (undo or the next prepare, off the game thread,
    do that), the snapshots are C-level calls through locals.  ``snap`` is
    ``dict.copy`` (general path) or a getter of the attributes the hook can
    write (``hook_writes.py``).  Returns the number of hooked instances.
    """
    refs_col, befores, afters = cols
    before_add = befores.append
    after_add = afters.append
    dead_extend = befores.extend, afters.extend
    obj: Any = None
    dead = 0
    rows = 0  # rows recorded before: the hooked one's is recorded before its hook runs
    try:
        for ref in refs:
            obj = ref()
            rows += 1
            if obj is None:  # died before its turn: keep the columns aligned
                dead_extend[0](dead_row)
                dead_extend[1](dead_row)
                dead += 1
                continue
            snap(obj.__dict__, before_add)
            hook(obj)
            # read again: the hook may have replaced the instance's __dict__
            snap(obj.__dict__, after_add)
    except BaseException as exc:
        if len(afters) < len(befores):  # what the failing hook changed is undone too
            snap(obj.__dict__, after_add)
        if isinstance(exc, Exception):
            raise InstanceHookError(obj) from exc
        raise
    finally:
        # one C-level extend instead of an append per instance
        refs_col.extend(refs[:rows])
    return len(refs) - dead


def _hook_line(exc: BaseException, fn: Any) -> Optional[int]:
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if code is not None and frame.filename == code.co_filename:
            line = frame.lineno
    return line


def _add_modules(
    registry: SourceRegistry, new_stages: List[ModuleStage], journal: Journal, ctx: CommitContext, journaled: Set[str]
) -> None:
    """Import the modules the patch adds (the finder serves them from the patch text)."""
    for st in new_stages:
        if sys.modules.get(st.name) is None:
            try:
                importlib.import_module(st.name)
            finally:
                _journal_added(new_stages, journal, journaled)
    _journal_added(new_stages, journal, journaled)
    for st in new_stages:
        previous = registry.set(st.record)
        journal.on_undo(functools.partial(registry.restore, st.name, previous))
        ctx.count("modules_added")


def _journal_added(new_stages: List[ModuleStage], journal: Journal, journaled: Set[str]) -> None:
    """Journal removal of the added modules present in sys.modules (once each)."""
    for st in new_stages:
        mod = sys.modules.get(st.name)
        if mod is None or getattr(mod, "__loader__", None) is not st.loader or st.name in journaled:
            continue
        journaled.add(st.name)
        parent_name, _, attr = st.name.rpartition(".")

        def undo(name: str = st.name, module: types.ModuleType = mod, parent_name: str = parent_name, attr: str = attr) -> None:
            if sys.modules.get(name) is module:
                del sys.modules[name]
            parent = sys.modules.get(parent_name) if parent_name else None
            if parent is not None and getattr(parent, attr, None) is module:
                try:
                    delattr(parent, attr)
                except AttributeError:
                    pass

        journal.on_undo(undo)


def _run_hooks(
    stages: List[ModuleStage],
    updated: List[type],
    old_views: Dict[str, types.MappingProxyType[str, Any]],
    ctx: CommitContext,
    tracker: Any,
) -> None:
    """Run module, class and instance hooks, journaling the data they change."""
    journal = ctx.journal
    for st in stages:
        if st.new_module or not st.changed or st.module is None:
            continue
        g = st.module.__dict__
        hook = g.get(HOOK_MODULE)
        if not callable(hook):
            continue
        before = dict(g)
        try:
            # a hook bound in a way prepare could not see: its module had no copy taken
            hook(old_views.get(st.name) or types.MappingProxyType(before))
        except Exception as exc:
            raise HookFailure(st.name, HOOK_MODULE, _hook_line(exc, hook)) from exc
        finally:
            for key, old, new in mapping_changes(before, g):
                journal.record_item(st.name, g, key, old, new)
        ctx.count("module_hooks")
    for cls in updated:
        hook = getattr(cls, HOOK_CLASS, None)
        if hook is None:
            continue
        before = class_snapshot(cls)
        try:
            hook()
        except Exception as exc:
            raise HookFailure(cls.__module__, f"{cls.__qualname__}.{HOOK_CLASS}", _hook_line(exc, hook)) from exc
        finally:
            for key, old, new in mapping_changes(before, class_snapshot(cls)):
                journal.record_class_attr(cls, key, old, new)
        ctx.count("class_hooks")
    done_types: Set[type] = set()
    hooked = 0
    batch = None
    for cls in updated:
        if getattr(cls, HOOK_INSTANCE, None) is None:
            continue
        if batch is None:
            batch = journal.instance_batch()
        for tp, refs in tracker.instance_refs(cls):
            # groups are by exact type: a type seen for an earlier class is done
            if tp in done_types:
                continue
            done_types.add(tp)
            hook = getattr(tp, HOOK_INSTANCE)
            obj: Any = None
            try:
                names = attrs_for_type(hook, tp) if plain_dict_type(tp) else None
                if names is not None:
                    fields = journal.instance_fields(names)
                    hooked += _hook_loop(hook, refs, fields.cols, snapshotter(names, MISSING), (MISSING,) * len(names))
                elif isinstance(hook, types.FunctionType) and plain_dict_type(tp):
                    hooked += _hook_loop(hook, refs, batch.cols, _copy_into, (_EMPTY,))
                else:
                    for ref in refs:
                        obj = ref()
                        if obj is None:
                            continue
                        state = InstanceState.capture(obj)
                        try:
                            getattr(obj, HOOK_INSTANCE)()
                        finally:
                            journal.record_instance(obj, state)
                        hooked += 1
            except InstanceHookError as failed:
                cause = failed.__cause__ or failed
                label = f"{tp.__module__}.{tp.__qualname__} instance at {id(failed.obj):#x}"
                raise HookFailure(cls.__module__, f"{tp.__qualname__}.{HOOK_INSTANCE} (on {label})", _hook_line(cause, hook)) from cause
            except Exception as exc:
                label = f"{tp.__module__}.{tp.__qualname__} instance at {id(obj):#x}"
                raise HookFailure(cls.__module__, f"{tp.__qualname__}.{HOOK_INSTANCE} (on {label})", _hook_line(exc, hook)) from exc
    if hooked:
        ctx.count("instances_hooked", hooked)
