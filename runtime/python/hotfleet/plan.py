"""The plan of a prepared transaction: what commit will do, in words and JSON.

``txn.plan`` is what an operator reads before a rollout goes further:
functions replaced (and how many live objects each), classes updated,
names added and removed, statements re-run, data taken or kept (three-way),
hooks that will run with instance counts, and notes.  ``to_dict()`` is
JSON-able; ``str(plan)`` is the human form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["Item", "Refusal", "ModulePlan", "Plan", "CATEGORIES"]

# category -> heading used by str(plan) and the key used by to_dict()
CATEGORIES: Dict[str, str] = {
    "function": "functions_replaced",
    "closure": "closures_updated",
    "class": "classes_updated",
    "added": "added",
    "removed": "removed",
    "rerun": "statements_rerun",
    "data": "data_updated",
    "conflict": "data_kept",
    "hook": "hooks",
    "note": "notes",
}


@dataclass
class Item:
    """One line of a plan."""

    category: str
    obj: str
    lineno: Optional[int] = None
    detail: str = ""
    count: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form."""
        out: Dict[str, Any] = {"obj": self.obj, "lineno": self.lineno}
        if self.detail:
            out["detail"] = self.detail
        if self.count is not None:
            out["count"] = self.count
        return out

    def __str__(self) -> str:
        """One human-readable line."""
        line = f"line {self.lineno}: " if self.lineno else ""
        count = f" (x{self.count})" if self.count is not None else ""
        detail = f" - {self.detail}" if self.detail else ""
        return f"{line}{self.obj}{count}{detail}"


@dataclass
class Refusal:
    """A change the runtime will not apply, with where and what to do."""

    module: str
    obj: Optional[str]
    lineno: Optional[int]
    message: str
    hint: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form (same keys as ``HotfleetError.to_dict`` details)."""
        return {"module": self.module, "obj": self.obj, "lineno": self.lineno, "message": self.message, "hint": self.hint}


@dataclass
class ModulePlan:
    """What commit will do to one module."""

    module: str
    new_module: bool = False
    base_digest: Optional[str] = None
    new_digest: str = ""
    items: List[Item] = field(default_factory=list)
    relocated: int = 0
    refusals: List[Refusal] = field(default_factory=list)

    @property
    def unchanged(self) -> bool:
        """True when the new source is the live source."""
        return self.base_digest == self.new_digest

    def add(self, category: str, obj: str, lineno: Optional[int] = None, detail: str = "", count: Optional[int] = None) -> Item:
        """Append an item and return it."""
        item = Item(category, obj, lineno, detail, count)
        self.items.append(item)
        return item

    def refuse(self, obj: Optional[str], lineno: Optional[int], message: str, hint: str = "") -> None:
        """Record a refusal (prepare will fail)."""
        self.refusals.append(Refusal(self.module, obj, lineno, message, hint))

    def of(self, category: str) -> List[Item]:
        """Items of one category."""
        return [i for i in self.items if i.category == category]

    def counts(self) -> Dict[str, int]:
        """Number of items per category (plus relocations)."""
        out = {key: len(self.of(cat)) for cat, key in CATEGORIES.items()}
        out["relocated"] = self.relocated
        return out

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form."""
        out: Dict[str, Any] = {
            "module": self.module,
            "new_module": self.new_module,
            "base_digest": self.base_digest,
            "new_digest": self.new_digest,
            "unchanged": self.unchanged,
            "relocated": self.relocated,
        }
        for cat, key in CATEGORIES.items():
            out[key] = [i.to_dict() for i in self.of(cat)]
        out["refusals"] = [r.to_dict() for r in self.refusals]
        return out

    def __str__(self) -> str:
        """Human-readable plan of the module."""
        head = f"module {self.module}"
        if self.new_module:
            head += " (new module)"
        elif self.unchanged:
            head += " (unchanged)"
        lines = [head]
        for cat, key in CATEGORIES.items():
            items = self.of(cat)
            if items:
                lines.append(f"  {key.replace('_', ' ')}:")
                lines.extend(f"    {i}" for i in items)
        if self.relocated:
            lines.append(f"  relocated (line numbers only): {self.relocated} function(s)")
        if self.refusals:
            lines.append("  REFUSED:")
            for r in self.refusals:
                where = f"line {r.lineno}: " if r.lineno else ""
                lines.append(f"    {where}{r.obj or '-'}: {r.message}" + (f" ({r.hint})" if r.hint else ""))
        return "\n".join(lines)


@dataclass
class Plan:
    """The whole transaction's plan, one :class:`ModulePlan` per module."""

    txn_id: str
    modules: List[ModulePlan] = field(default_factory=list)
    #: What the whole transaction means beyond its modules (a revert says what it restores)
    notes: List[str] = field(default_factory=list)

    @property
    def refusals(self) -> List[Refusal]:
        """Every refusal of every module."""
        return [r for m in self.modules for r in m.refusals]

    def module(self, name: str) -> Optional[ModulePlan]:
        """The plan of one module, if present."""
        for m in self.modules:
            if m.module == name:
                return m
        return None

    def counts(self) -> Dict[str, int]:
        """Totals across modules."""
        total: Dict[str, int] = {}
        for m in self.modules:
            for key, value in m.counts().items():
                total[key] = total.get(key, 0) + value
        total["modules"] = len(self.modules)
        total["modules_added"] = sum(1 for m in self.modules if m.new_module)
        return total

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form."""
        out = {
            "txn_id": self.txn_id,
            "counts": self.counts(),
            "modules": [m.to_dict() for m in self.modules],
            "refusals": [r.to_dict() for r in self.refusals],
        }
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def __str__(self) -> str:
        """Human-readable plan (what ``print(txn.plan)`` shows)."""
        lines = [f"hotfleet plan {self.txn_id[:16]}"]
        lines.extend(str(m) for m in self.modules)
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)
