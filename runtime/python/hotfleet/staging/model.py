"""What staging produces and carries while it works: the per-module result
(``ModuleStage``), the scope a staged statement runs in, the per-module context and the
stand-in modules staging namespaces import.
"""

from __future__ import annotations

import ast
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

from .. import diff as D
from ..plan import ModulePlan
from ..sources import SourceRecord, TextLoader
from ..swap import FunctionIndex, shift_code
from .actions import Action


@dataclass
class ModuleStage:
    """Everything prepare learned about one module."""

    name: str
    plan: ModulePlan
    record: SourceRecord
    base: Optional[SourceRecord]
    module: Optional[types.ModuleType]
    actions: List[Action] = field(default_factory=list)
    relocations: List[Tuple[types.FunctionType, types.CodeType, types.CodeType]] = field(default_factory=list)
    updated_classes: List[type] = field(default_factory=list)
    new_module: bool = False
    is_package: bool = False
    module_code: Optional[types.CodeType] = None
    loader: Optional[TextLoader] = None
    # False when the module neither has nor gains __reload_module__: commit then takes no
    # copy of the module globals for the hook's ``old`` view
    module_hook: bool = True

    @property
    def changed(self) -> bool:
        """False when the new text is the live text."""
        return self.base is None or self.base.digest != self.record.digest


class StagedModule(types.ModuleType):
    """Stand-in, during staging only, for a module the same patch adds."""

    def __init__(self, name: str, namespace: Dict[str, Any]) -> None:
        super().__init__(name)
        object.__setattr__(self, "_hotfleet_ns", namespace)

    def __getattr__(self, attr: str) -> Any:
        ns = object.__getattribute__(self, "_hotfleet_ns")
        try:
            return ns[attr]
        except KeyError:
            raise AttributeError(attr) from None


class OverlayModule(types.ModuleType):
    """Stand-in for a live package whose new submodules exist only in staging."""

    def __init__(self, real: types.ModuleType, overlay: Dict[str, Any]) -> None:
        super().__init__(real.__name__)
        object.__setattr__(self, "_hotfleet_real", real)
        object.__setattr__(self, "_hotfleet_overlay", overlay)

    def __getattr__(self, attr: str) -> Any:
        overlay = object.__getattribute__(self, "_hotfleet_overlay")
        if attr in overlay:
            return overlay[attr]
        return getattr(object.__getattribute__(self, "_hotfleet_real"), attr)


@dataclass
class Scope:
    """Where staged statements run: module level or inside a (chain of) class(es)."""

    globals: Dict[str, Any]
    chain: List[ast.ClassDef]
    cls: Optional[type] = None
    ns: Optional[Dict[str, Any]] = None  # staging class namespace (class scope)

    @property
    def is_class(self) -> bool:
        return bool(self.chain)

    def qual(self, name: str) -> str:
        if not self.chain:
            return name
        return ".".join(c.name for c in self.chain) + "." + name


class ModuleCtx:
    """Per-module state while staging an existing module."""

    def __init__(
        self,
        stage: ModuleStage,
        live: types.ModuleType,
        filename: str,
        flags: int,
        index: FunctionIndex,
        g: Dict[str, Any],
        old_lines: List[str],
        new_lines: List[str],
    ) -> None:
        self.stage = stage
        self.live = live
        self.filename = filename
        self.flags = flags
        self.index = index
        self.g = g
        self.old_lines = old_lines
        self.new_lines = new_lines
        self.relocations: List[Tuple[types.FunctionType, types.CodeType, types.CodeType]] = []
        self._relocated: Set[int] = set()
        self.class_gains: Dict[type, Set[str]] = {}
        # id(new def node) -> its code, compiled with the module's other changed defs
        self.def_codes: Dict[int, types.CodeType] = {}
        self._class_diffs: Dict[int, Tuple[List[D.Stmt], List[D.Stmt], D.BodyDiff]] = {}

    def class_diff(self, old: D.Stmt, new: D.Stmt) -> Tuple[List[D.Stmt], List[D.Stmt], D.BodyDiff]:
        """(old body, new body, their diff) of a class statement pair, computed once."""
        key = id(new.node)
        found = self._class_diffs.get(key)
        if found is None:
            old_body = D.statements(old.node.body, self.old_lines)  # type: ignore[attr-defined]
            new_body = D.statements(new.node.body, self.new_lines)  # type: ignore[attr-defined]
            found = (old_body, new_body, D.diff_bodies(old_body, new_body))
            self._class_diffs[key] = found
        return found

    def settled(self, pair: D.Pair) -> bool:
        """True when ``pair`` needs no staging: unchanged, or only moved (then its live
        functions' line numbers are planned to follow)."""
        if pair.status == D.UNCHANGED:
            return True
        if pair.status == D.MOVED:
            assert pair.old is not None
            self.relocate(pair.old, pair.delta)
            return True
        return False

    def relocate(self, old: D.Stmt, delta: int) -> None:
        """Plan line-number updates for every live function defined inside ``old``."""
        if delta == 0:
            return
        for fn in self.index.in_range(old.first, old.last):
            if id(fn) in self._relocated:
                continue
            self._relocated.add(id(fn))
            self.relocations.append((fn, fn.__code__, shift_code(fn.__code__, delta)))

    def mark_updated(self, cls: Optional[type]) -> None:
        """Remember that ``cls`` changes (for its hooks)."""
        if cls is not None and cls not in self.stage.updated_classes:
            self.stage.updated_classes.append(cls)
