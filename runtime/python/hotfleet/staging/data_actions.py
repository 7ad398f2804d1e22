"""Commit-time actions on data: three-way literal updates and removed names.

Data the game changed since the old statement ran is kept and reported, never overwritten.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Sequence, Tuple

from ..snapshot import MISSING, class_get, same_value
from .actions import Action, CommitContext
from .actions import set_class_member
from .common import safe_repr


class DataAction(Action):
    """Three-way update of literal data (module globals or class attributes)."""

    def __init__(
        self, module: str, obj: str, lineno: int, target: Any, values: Dict[str, Tuple[Any, Any]], added: bool
    ) -> None:
        self.module = module
        self.obj = obj
        self.lineno = lineno
        self.target = target  # a dict (module globals) or a class
        self.values = values  # name -> (old literal, new literal)
        self.added = added

    def _get(self, name: str) -> Any:
        if isinstance(self.target, type):
            return class_get(self.target, name)
        return self.target.get(name, MISSING)

    def apply(self, ctx: CommitContext) -> None:
        """Take the new value where the live one still equals the old source's; else keep it."""
        for name, (old, new) in self.values.items():
            live = self._get(name)
            if not self.added and not same_value(live, old):
                ctx.conflict(self.module, self._qual(name), self.lineno, f"live value {safe_repr(live)} differs from the old source; kept")
                ctx.count("data_conflicts")
                continue
            new_value = copy.deepcopy(new)
            where = self._where()
            if live is not MISSING and type(live) is type(new_value) and isinstance(live, (dict, list, set)):
                # in place: references held elsewhere see the new table
                if not same_value(live, new_value):
                    ctx.journal.set_contents(where, name, live, new_value)
            elif isinstance(self.target, type):
                ctx.journal.set_class_attr(self.target, name, new_value)
            else:
                ctx.journal.set_item(where, self.target, name, new_value)
            ctx.count("data_taken")

    def _where(self) -> str:
        if isinstance(self.target, type):
            return f"{self.target.__module__}.{self.target.__qualname__}"
        return self.module

    def _qual(self, name: str) -> str:
        if isinstance(self.target, type):
            return f"{self.target.__qualname__}.{name}"
        return name


class RemoveAction(Action):
    """Remove names whose defining statements the patch removed."""

    def __init__(self, module: str, target: Any, names: Sequence[str]) -> None:
        self.module = module
        self.obj = ", ".join(names)
        self.target = target
        self.names = tuple(names)

    def apply(self, ctx: CommitContext) -> None:
        """Delete the names that are still present."""
        for name in self.names:
            if isinstance(self.target, type):
                if class_get(self.target, name) is not MISSING:
                    set_class_member(ctx, self.target, name, MISSING)
                    ctx.count("names_removed")
            elif name in self.target:
                ctx.journal.set_item(self.module, self.target, name, MISSING)
                ctx.count("names_removed")
