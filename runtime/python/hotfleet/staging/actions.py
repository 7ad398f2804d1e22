"""Commit-time actions, base and function level: what a commit applies, in source order.

``CommitContext`` is what actions share while a commit applies them (journal, tracker,
counters); ``RelocateAction``, ``SwapAction`` and ``ExecAction`` change functions and re-run
statements in the live module. Every change is journaled so a failed commit undoes it.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Dict, List, Optional, Tuple

from ..instances import InstanceTracker
from ..snapshot import FunctionState, Journal, mapping_changes, same_value
from ..swap import clear_caches
from .common import exec_in_class


class CommitContext:
    """What actions share while a commit applies them."""

    def __init__(self, journal: Journal, tracker: InstanceTracker) -> None:
        self.journal = journal
        self.tracker = tracker
        self.counts: Dict[str, int] = {}
        self.conflicts: List[Dict[str, Any]] = []
        self.caches_cleared: List[Any] = []

    def count(self, key: str, n: int = 1) -> None:
        """Add to a report counter."""
        self.counts[key] = self.counts.get(key, 0) + n

    def conflict(self, module: str, obj: str, lineno: Optional[int], detail: str) -> None:
        """Record data kept because the game changed it."""
        self.conflicts.append({"module": module, "obj": obj, "lineno": lineno, "detail": detail})


class Action:
    """One change commit applies, in source order."""

    module: str = ""
    obj: str = ""
    lineno: Optional[int] = None

    def apply(self, ctx: CommitContext) -> None:  # pragma: no cover - interface
        """Apply the change, recording everything replaced in ``ctx.journal``."""
        raise NotImplementedError


def journal_exec(
    ctx: CommitContext, where: str, code: types.CodeType, g: Dict[str, Any], ns: Optional[Dict[str, Any]] = None
) -> None:
    """Execute ``code`` in the live module dict, journaling every binding it changes.

    The diff is taken even when the code raises, so a strict undo also
    removes what a half-executed statement bound.
    """
    before = dict(g)
    ann = g.get("__annotations__")
    ann_before = dict(ann) if isinstance(ann, dict) else None
    try:
        exec(code, g)
    finally:
        for key, old, new in mapping_changes(before, g):
            ctx.journal.record_item(where, g, key, old, new)
        if ann_before is not None and isinstance(ann, dict) and not same_value(ann_before, dict(ann)):
            ctx.journal.record_contents(where, "__annotations__", ann, ann_before)


class RelocateAction(Action):
    """Move line numbers of unchanged functions whose definition moved."""

    def __init__(self, module: str, items: List[Tuple[types.FunctionType, types.CodeType, types.CodeType]]) -> None:
        self.module = module
        self.obj = "(relocations)"
        self.items = items
        # Columns built here, in prepare, so commit only checks and assigns.
        self.fns = [fn for fn, _old, _new in items]
        self.olds = [old for _fn, old, _new in items]
        self.news = [new for _fn, _old, new in items]

    def apply(self, ctx: CommitContext) -> None:
        """Shift line numbers of the live functions (only if still running the prepared code)."""
        moved = ctx.journal.relocate(self.fns, self.olds, self.news)
        if moved:
            ctx.count("relocated", moved)


class SwapAction(Action):
    """Swap new code (and defaults, docs, annotations) into live function objects."""

    def __init__(
        self,
        module: str,
        obj: str,
        lineno: int,
        name: str,
        targets: List[Tuple[types.FunctionType, types.CodeType]],
        new_code: types.CodeType,
        doc: Optional[str],
        qualname: str,
        exec_code: Optional[types.CodeType],
        globals_: Dict[str, Any],
        cls: Optional[type],
        keep_defaults: bool,
        keep_kwdefaults: bool,
        keep_annotations: bool,
        closures: List[Tuple[types.FunctionType, types.CodeType, types.CodeType]],
        caches: List[Any],
    ) -> None:
        self.module = module
        self.obj = obj
        self.lineno = lineno
        self.name = name
        self.targets = targets
        self.new_code = new_code
        self.doc = doc
        self.qualname = qualname
        self.exec_code = exec_code
        self.globals = globals_
        self.cls = cls
        self.keep_defaults = keep_defaults
        self.keep_kwdefaults = keep_kwdefaults
        self.keep_annotations = keep_annotations
        self.closures = closures
        self.caches = caches
        # Nothing but code, doc and qualname changes: commit assigns those three (prepared here).
        self.fns = [fn for fn, _old in targets] if exec_code is None else None

    def _staged(self) -> Optional[types.FunctionType]:
        if self.exec_code is None:
            return None
        if self.cls is None:
            ns: Dict[str, Any] = {}
            exec(self.exec_code, self.globals, ns)
        else:
            ns = class_namespace(self.cls)
            exec_in_class(self.exec_code, self.globals, ns, self.cls)
            cell = ns.get("__classcell__")
            if cell is not None:
                cell.cell_contents = self.cls
        fn = ns.get(self.name)
        return fn if isinstance(fn, types.FunctionType) else None

    def apply(self, ctx: CommitContext) -> None:
        """Swap the staged code (and changed defaults/annotations) into every target; clear caches."""
        # Defaults and annotations are evaluated now, in source order, so they
        # see data this same commit updated earlier in the module.
        if self.fns is not None:
            ctx.journal.swap_functions(self.fns, self.new_code, self.doc, self.qualname)
            ctx.count("functions_swapped", len(self.fns))
            self._finish(ctx)
            return
        staged = self._staged()
        for fn, _old in self.targets:
            state = FunctionState(
                code=self.new_code,
                defaults=fn.__defaults__ if (self.keep_defaults or staged is None) else staged.__defaults__,
                kwdefaults=fn.__kwdefaults__ if (self.keep_kwdefaults or staged is None) else staged.__kwdefaults__,
                doc=self.doc,
                annotations=fn.__annotations__ if (self.keep_annotations or staged is None) else staged.__annotations__,
                qualname=self.qualname,
            )
            ctx.journal.set_function(fn, state)
            ctx.count("functions_swapped")
        self._finish(ctx)

    def _finish(self, ctx: CommitContext) -> None:
        """Closures of the changed function, then its caches."""
        for fn, _old, new in self.closures:
            ctx.journal.set_code(fn, new)
            ctx.count("closures_swapped")
        if self.caches:
            cleared = clear_caches(self.caches)
            ctx.count("caches_cleared", cleared)
            caches = list(self.caches)
            # Results computed by the new code are stale after a rollback too.
            ctx.journal.on_undo(functools.partial(clear_caches, caches))


class ExecAction(Action):
    """Run a statement in the live module (new definitions, imports, re-runs)."""

    def __init__(self, module: str, obj: str, lineno: int, code: types.CodeType, globals_: Dict[str, Any], kind: str) -> None:
        self.module = module
        self.obj = obj
        self.lineno = lineno
        self.code = code
        self.globals = globals_
        self.kind = kind

    def apply(self, ctx: CommitContext) -> None:
        """Run the statement in the live globals; journal every binding it changed."""
        journal_exec(ctx, self.module, self.code, self.globals)
        ctx.count("statements_run")


def class_namespace(cls: type) -> Dict[str, Any]:
    """Copy of a class dict to run a class-body snippet in (annotations copied too)."""
    ns = dict(cls.__dict__)
    ann = ns.get("__annotations__")
    if isinstance(ann, dict):
        ns["__annotations__"] = dict(ann)
    return ns


def set_name(value: Any, cls: type, name: str) -> None:
    hook = getattr(type(value), "__set_name__", None)
    if hook is not None:
        hook(value, cls, name)


def set_class_member(ctx: CommitContext, cls: type, name: str, value: Any) -> None:
    """Set (MISSING: delete) a class attribute through the journal."""
    ctx.journal.set_class_attr(cls, name, value)
