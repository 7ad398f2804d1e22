"""Commit-time actions on live classes: class-body snippets, docstrings, annotations and
regenerated dataclass members, all set on the LIVE class (never a new class object).
"""

from __future__ import annotations

import abc
import dataclasses
import types

from typing import Any, Dict, Optional, Sequence, Tuple

from ..snapshot import MISSING, class_get, same_value
from .actions import Action, CommitContext, class_namespace, set_class_member, set_name
from .common import DC_GENERATED, exec_in_class


class ClassExecAction(Action):
    """Run a class-body snippet and set the names it binds on the live class."""

    def __init__(
        self, module: str, obj: str, lineno: int, cls: type, code: types.CodeType, globals_: Dict[str, Any], names: Sequence[str], kind: str
    ) -> None:
        self.module = module
        self.obj = obj
        self.lineno = lineno
        self.cls = cls
        self.code = code
        self.globals = globals_
        self.names = tuple(names)
        self.kind = kind

    def apply(self, ctx: CommitContext) -> None:
        """Run the snippet, point its ``__class__`` cell at the live class, set the bound names."""
        ns = class_namespace(self.cls)
        exec_in_class(self.code, self.globals, ns, self.cls)
        cell = ns.get("__classcell__")
        if cell is not None:
            # zero-argument super() in these methods must see the LIVE class
            cell.cell_contents = self.cls
        for name in self.names:
            value = ns.get(name, MISSING)
            if value is MISSING:
                continue
            existed = class_get(self.cls, name)
            if existed is value:
                continue
            set_class_member(ctx, self.cls, name, value)
            if existed is MISSING or existed is not value:
                set_name(value, self.cls, name)
            ctx.count("class_attrs_set")


class DocAction(Action):
    """Set a module's or class's docstring."""

    def __init__(self, module: str, target: Any, doc: Optional[str]) -> None:
        self.module = module
        self.obj = "__doc__"
        self.target = target
        self.doc = doc

    def apply(self, ctx: CommitContext) -> None:
        """Set the docstring."""
        if isinstance(self.target, type):
            if self.target.__dict__.get("__doc__") is not self.doc:
                ctx.journal.set_class_attr(self.target, "__doc__", self.doc)
        elif self.target.get("__doc__") is not self.doc:
            ctx.journal.set_item(self.module, self.target, "__doc__", self.doc)


class AnnotationsAction(Action):
    """Replace a class's ``__annotations__`` contents (in place)."""

    def __init__(self, module: str, cls: type, code: types.CodeType, globals_: Dict[str, Any]) -> None:
        self.module = module
        self.obj = f"{cls.__qualname__}.__annotations__"
        self.cls = cls
        self.code = code
        self.globals = globals_

    def apply(self, ctx: CommitContext) -> None:
        """Evaluate the new annotations and put them into the live dict in place."""
        ns: Dict[str, Any] = {}
        exec_in_class(self.code, self.globals, ns, self.cls)
        new = ns.get("__annotations__", {})
        live = self.cls.__dict__.get("__annotations__")
        if isinstance(live, dict):
            if not same_value(live, new):
                ctx.journal.set_contents(f"{self.cls.__module__}.{self.cls.__qualname__}", "__annotations__", live, new)
        else:
            ctx.journal.set_class_attr(self.cls, "__annotations__", dict(new))


def dataclass_regenerate(
    cls: type, body_code: types.CodeType, globals_: Dict[str, Any], kwargs: Dict[str, Any]
) -> Tuple[type, Dict[str, Any]]:
    """Run the new class body and the dataclass decorator on a detached class.

    The detached class gets a synthetic base carrying the inherited dataclass
    fields instead of the live bases, so no live ``__init_subclass__`` or
    registry sees it.
    """
    ns: Dict[str, Any] = {}
    exec(body_code, globals_, ns)
    ns.pop("__classcell__", None)
    body = dict(ns)
    base_fields: Dict[str, Any] = {}
    params = None
    extra: Dict[str, Any] = {}
    for base in cls.__mro__[-1:0:-1]:
        fields_ = base.__dict__.get("__dataclass_fields__")
        if fields_ is not None:
            base_fields.update(fields_)
            params = base.__dict__.get("__dataclass_params__", params)
    if "__post_init__" not in ns and hasattr(cls, "__post_init__"):
        extra["__post_init__"] = lambda self, *a: None
    bases: Tuple[type, ...] = ()
    if base_fields or extra:
        synthetic_ns: Dict[str, Any] = dict(extra)
        if base_fields:
            synthetic_ns["__dataclass_fields__"] = base_fields
            synthetic_ns["__dataclass_params__"] = params
        bases = (type("_HotfleetDataclassBase", (), synthetic_ns),)
    tmp = type(cls.__name__, bases, ns)
    result: type = dataclasses.dataclass(tmp, **kwargs)
    return result, body


class DataclassRegenAction(Action):
    """Regenerate a dataclass's generated methods after its fields changed."""

    def __init__(
        self,
        module: str,
        cls: type,
        body_code: types.CodeType,
        globals_: Dict[str, Any],
        kwargs: Dict[str, Any],
        sync_fields: Sequence[str],
        take_doc: bool,
    ) -> None:
        self.module = module
        self.obj = f"{cls.__qualname__} (dataclass)"
        self.cls = cls
        self.body_code = body_code
        self.globals = globals_
        self.kwargs = kwargs
        self.sync_fields = tuple(sync_fields)
        self.take_doc = take_doc

    def apply(self, ctx: CommitContext) -> None:
        """Regenerate on a detached class and copy the generated members onto the live class."""
        result, body = dataclass_regenerate(self.cls, self.body_code, self.globals, self.kwargs)
        rdict = result.__dict__
        for name in DC_GENERATED:
            value = rdict.get(name, MISSING)
            if value is MISSING or value is body.get(name, MISSING):
                continue  # not generated (user-defined or absent)
            if class_get(self.cls, name) is value:
                continue
            if isinstance(value, types.FunctionType):
                value.__qualname__ = f"{self.cls.__qualname__}.{value.__name__}"
            ctx.journal.set_class_attr(self.cls, name, value)
            ctx.count("class_attrs_set")
        for name in self.sync_fields:
            desired = rdict.get(name, MISSING)
            if class_get(self.cls, name) is not desired:
                ctx.journal.set_class_attr(self.cls, name, desired)
        if self.take_doc and rdict.get("__doc__") is not None:
            ctx.journal.set_class_attr(self.cls, "__doc__", rdict["__doc__"])


def abstract_names(cls: type) -> frozenset:
    """The abstract methods of ``cls`` as ``ABCMeta`` computes them at class creation."""
    names = {name for name, value in cls.__dict__.items() if getattr(value, "__isabstractmethod__", False)}
    for base in cls.__bases__:
        for name in getattr(base, "__abstractmethods__", ()):
            if getattr(getattr(cls, name, None), "__isabstractmethod__", False):
                names.add(name)
    return frozenset(names)


class AbstractsAction(Action):
    """Recompute ``__abstractmethods__`` of a changed ABC and of its subclasses, parents
    first, so instantiation behaves as after a fresh import (``abc.update_abstractmethods``,
    which 3.9 lacks, for the whole subtree)."""

    def __init__(self, module: str, cls: type) -> None:
        self.module = module
        self.obj = f"{cls.__qualname__}.__abstractmethods__"
        self.cls = cls

    def apply(self, ctx: CommitContext) -> None:
        """Set the recomputed sets that differ (journaled)."""
        seen = {self.cls}
        todo = [self.cls]
        for klass in todo:
            for sub in type.__subclasses__(klass):
                if sub not in seen:
                    seen.add(sub)
                    todo.append(sub)
        for klass in sorted(todo, key=lambda k: len(k.__mro__)):
            if not isinstance(klass, abc.ABCMeta):
                continue
            names = abstract_names(klass)
            if class_get(klass, "__abstractmethods__") != names:
                ctx.journal.set_class_attr(klass, "__abstractmethods__", names)
                ctx.count("abstract_sets_updated")
