"""One compile per module for a patch's changed definitions (the parsing half of a cheap
prepare is ``outline.py``).

Prepare runs beside the game thread, holding the GIL for every C call it makes; a compile
per changed function (and an AST dump per statement) made it cost hundreds of milliseconds
of CPU. Here every changed ``def`` whose decorators, defaults and annotations stay is
compiled in one synthetic module (methods inside stand-ins of their class chain, so their
qualified names, name mangling and ``__class__`` cell are those of the real class body),
and each one's code object is looked up by name and first line. The code objects are the
ones a per-statement compile gives; anything else (new, re-decorated, changed defaults)
still takes the per-statement path.
"""

from __future__ import annotations

import ast
import sys
import types
from typing import Dict, List, Optional, Tuple

from .. import diff as D
from ..swap import find_code
from .common import strip_decorators

__all__ = ["compile_defs", "def_doc"]


def _wrap(node: ast.stmt, chain: List[ast.ClassDef]) -> ast.stmt:
    """``node`` inside stand-ins of its class chain (no bases, decorators or keywords)."""
    inner: ast.stmt = node
    for cnode in reversed(chain):
        synthetic = ast.ClassDef(name=cnode.name, bases=[], keywords=[], body=[inner], decorator_list=[])
        if sys.version_info >= (3, 12):
            # kept: the methods of a generic class close over its type parameters
            synthetic.type_params = list(getattr(cnode, "type_params", []))  # type: ignore[attr-defined]
        ast.copy_location(synthetic, cnode)
        synthetic.end_lineno = getattr(cnode, "end_lineno", cnode.lineno)
        inner = synthetic
    return inner


def compile_defs(
    items: List[Tuple[List[ast.ClassDef], ast.stmt]], filename: str, flags: int
) -> Dict[int, types.CodeType]:
    """Compile every ``(class chain, def node)`` at once; ``id(node)`` -> its function's code.

    Empty when there is nothing to compile or the batch does not compile (the per-statement
    path then reports the error where it is).
    """
    if not items:
        return {}
    body = [_wrap(strip_decorators(node), chain) for chain, node in items]
    module = ast.Module(body=body, type_ignores=[])
    try:
        code = compile(module, filename, "exec", flags=flags, dont_inherit=True)
    except (SyntaxError, ValueError, TypeError):
        return {}
    out: Dict[int, types.CodeType] = {}
    for _chain, node in items:
        found = find_code(code, node.name, D.first_line(node))  # type: ignore[attr-defined]
        if found is not None:
            out[id(node)] = found
    return out


def def_doc(code: types.CodeType, globals_: Dict[str, object]) -> Optional[str]:
    """The ``__doc__`` a function made from ``code`` gets (as its ``def`` would set it)."""
    cells = tuple(types.CellType() for _ in code.co_freevars)
    fn = types.FunctionType(code, globals_, code.co_name, None, cells)
    doc: Optional[str] = fn.__doc__
    return doc
