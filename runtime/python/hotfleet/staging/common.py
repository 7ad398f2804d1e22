"""What the staging modules share: hook names, AST and literal helpers.

Kept apart so the actions and the stager can both use them without importing each other.
"""

from __future__ import annotations

import ast
import copy
import traceback
import types
from typing import Any, Dict, Optional

from .. import diff as D
from ..errors import StagingRefusal


HOOK_MODULE = "__reload_module__"
HOOK_CLASS = "__reload_class__"

# Members a dataclass decorator generates; regenerated when fields change.
DC_GENERATED = (
    "__init__",
    "__repr__",
    "__eq__",
    "__hash__",
    "__lt__",
    "__le__",
    "__gt__",
    "__ge__",
    "__setattr__",
    "__delattr__",
    "__dataclass_fields__",
    "__dataclass_params__",
    "__match_args__",
    "__getstate__",
    "__setstate__",
)

# Module attributes the import system sets; never removed by a patch.
MODULE_SYSTEM_NAMES = frozenset(
    {"__name__", "__file__", "__spec__", "__loader__", "__package__", "__path__", "__builtins__", "__cached__", "__doc__", "__annotations__"}
)


class Pending:
    """Placeholder in a staging namespace for a name that only exists after commit."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return f"<pending {self.what}>"


NOT_LITERAL = object()


def literal(node: Optional[ast.expr]) -> Any:
    if node is None:
        return NOT_LITERAL
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return NOT_LITERAL


def literal_bindings(node: ast.stmt) -> Optional[Dict[str, Any]]:
    """name -> value for an assignment of literal value(s) to plain name(s), else None."""
    if isinstance(node, ast.AnnAssign):
        if not isinstance(node.target, ast.Name) or node.value is None:
            return None
        value = literal(node.value)
        return None if value is NOT_LITERAL else {node.target.id: value}
    if not isinstance(node, ast.Assign):
        return None
    value = literal(node.value)
    if value is NOT_LITERAL:
        return None
    out: Dict[str, Any] = {}
    for target in node.targets:
        if isinstance(target, ast.Name):
            out[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (tuple, list)):
            if len(target.elts) != len(value) or not all(isinstance(e, ast.Name) for e in target.elts):
                return None
            for elt, item in zip(target.elts, value):
                out[elt.id] = item  # type: ignore[attr-defined]
        else:
            return None
    return out


def strip_decorators(node: ast.stmt) -> ast.stmt:
    """Copy of a def without decorators, still starting at its first decorator's line.

    Keeping the first line keeps ``co_firstlineno`` what the decorated
    definition compiles to, which is how live functions are matched later.
    """
    stripped = copy.copy(node)
    stripped.decorator_list = []  # type: ignore[attr-defined]
    stripped.lineno = D.first_line(node)
    return stripped


def annotation_only(node: ast.AnnAssign) -> ast.AnnAssign:
    out = copy.copy(node)
    out.value = None
    return out


def error_line(exc: BaseException, filename: str) -> Optional[int]:
    """Innermost traceback line that belongs to ``filename``."""
    if isinstance(exc, SyntaxError):
        return exc.lineno
    line: Optional[int] = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == filename:
            line = frame.lineno
    return line


def safe_repr(value: Any, limit: int = 80) -> str:
    """repr() for reports: bounded, and never raising (game objects may have odd reprs)."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def exec_in_class(code: Any, globals_: Dict[str, Any], ns: Dict[str, Any], cls: Optional[type]) -> None:
    """Run a class-body snippet of ``cls`` in ``ns``.

    The body of a PEP 695 generic class (``class Box[T]``) reads its type parameters from
    closure cells; they are given the LIVE class's parameters, so annotations and closures
    of what the snippet defines refer to the very ``T`` the class has.
    """
    if not code.co_freevars:
        exec(code, globals_, ns)
        return
    params = {p.__name__: p for p in getattr(cls, "__type_params__", ())}
    cells = []
    for name in code.co_freevars:
        if name == ".type_params":
            cells.append(types.CellType(getattr(cls, "__type_params__", ())))
        elif name in params:
            cells.append(types.CellType(params[name]))
        else:
            raise StagingRefusal(f"class body needs free variable {name!r}; unsupported", None, "restart to change this class")
    exec(code, globals_, ns, closure=tuple(cells))  # type: ignore[call-arg]  # 3.11+, as PEP 695
