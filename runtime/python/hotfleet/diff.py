"""Statement-level diff of two versions of a module, with ``ast``.

Top-level statements (and, recursively, class-body statements) are matched
by their kind and the name(s) they bind, plus an occurrence index so that a
property getter and its setter, or two assignments to one name, pair up in
order.  A matched statement is *unchanged* when its AST (without line
numbers) is equal; it is *moved* when, in addition, only its position in the
file changed, which the runtime turns into a cheap line-number update of the
live code objects.  Unchanged statements are never re-run.

Comparison is cheap on purpose (prepare runs beside the game thread): statements whose
source lines are identical are equal without looking at their trees; only statements
whose text differs have their AST dumped and compared.
"""

from __future__ import annotations

import __future__
import ast
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

__all__ = [
    "Stmt",
    "Pair",
    "BodyDiff",
    "parse",
    "statements",
    "diff_bodies",
    "future_flags",
    "bound_names",
    "first_line",
    "classify",
]

DEF = "def"
CLASS = "class"
IMPORT = "import"
ASSIGN = "assign"
DOC = "doc"
FUTURE = "future"
OTHER = "stmt"

UNCHANGED = "unchanged"
MOVED = "moved"
CHANGED = "changed"
ADDED = "added"
REMOVED = "removed"

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def parse(text: str, filename: str) -> ast.Module:
    """Parse ``text``; raises SyntaxError with the line at fault."""
    return ast.parse(text, filename=filename, mode="exec", type_comments=False)


def first_line(node: ast.stmt) -> int:
    """First line of a statement, decorators included (what ``co_firstlineno`` reports)."""
    lines = [node.lineno]
    for dec in getattr(node, "decorator_list", ()) or ():
        lines.append(dec.lineno)
    return min(lines)


def _target_names(target: ast.expr) -> Optional[List[str]]:
    """Names bound by an assignment target, or None if it is not made of plain names."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        out: List[str] = []
        for elt in target.elts:
            sub = _target_names(elt.value if isinstance(elt, ast.Starred) else elt)
            if sub is None:
                return None
            out.extend(sub)
        return out
    return None


def _import_names(node: ast.stmt) -> Optional[List[str]]:
    names: List[str] = []
    for alias in node.names:  # type: ignore[attr-defined]
        if alias.name == "*":
            return None
        if alias.asname:
            names.append(alias.asname)
        elif isinstance(node, ast.Import):
            names.append(alias.name.split(".")[0])
        else:
            names.append(alias.name)
    return names


def bound_names(node: ast.stmt) -> FrozenSet[str]:
    """Every name a statement binds in the namespace it runs in (nested scopes excluded)."""
    out: Set[str] = set()

    def visit(n: ast.AST, top: bool) -> None:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
            if not top:
                return
            # decorators/defaults are evaluated in the enclosing scope but bind nothing
            return
        if isinstance(n, ast.Lambda):
            return
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            names = _import_names(n)
            out.update(names or [])
            return
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            out.add(n.id)
        if isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return
        for child in ast.iter_child_nodes(n):
            visit(child, False)

    visit(node, True)
    return frozenset(out)


@dataclass
class Group:
    """Top-level statements sharing source lines (usually one statement): the unit a
    statement's tree is re-parsed from when it was not kept. It holds no statements (no
    reference cycle: outlines are freed without the collector)."""

    first: int
    last: int
    text: str
    size: int = 1

    def load(self, index: int) -> ast.stmt:
        """Parse this group's text at its own lines; the ``index``-th statement's tree."""
        tree = parse("\n" * (self.first - 1) + self.text, "<hotfleet group>")
        if len(tree.body) != self.size:  # pragma: no cover - the text parsed before
            raise SyntaxError("statement group does not re-parse to its statements")
        return tree.body[index]


@dataclass
class Stmt:
    """One statement of a module or class body, keyed for matching.

    Its tree (``node``) may be dropped to keep outlines small; it is re-parsed from the
    statement's group of lines on first use.
    """

    _node: Optional[ast.stmt]
    kind: str
    names: Tuple[str, ...]
    key: Tuple[object, ...]
    first: int
    last: int
    text: str
    bound: FrozenSet[str]
    _dump: Optional[str] = None
    group: Optional[Group] = None
    gindex: int = 0  # position in its group

    @property
    def node(self) -> ast.stmt:
        """The statement's tree (re-parsed from its group when it was dropped)."""
        if self._node is None:
            assert self.group is not None, "a statement without tree needs its group"
            self._node = self.group.load(self.gindex)
        return self._node

    @property
    def dump(self) -> str:
        """The statement's AST without positions (computed on first use: it is costly)."""
        if self._dump is None:
            self._dump = ast.dump(self.node)
        return self._dump

    @property
    def name(self) -> str:
        """The (first) bound name, or a short description for anonymous statements."""
        if self.names:
            return self.names[0]
        return f"<{type(self.node).__name__.lower()} at line {self.first}>"

    def summary(self) -> str:
        """First line of the statement's text, trimmed (for plans and reports)."""
        line = self.text.strip().splitlines()[0] if self.text.strip() else ""
        return line[:120]


def classify(node: ast.stmt, index: int) -> Tuple[str, Tuple[str, ...]]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return DEF, (node.name,)
    if isinstance(node, ast.ClassDef):
        return CLASS, (node.name,)
    if isinstance(node, ast.ImportFrom) and node.module == "__future__":
        return FUTURE, ()
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        imported = _import_names(node)
        if imported is not None:
            return IMPORT, tuple(imported)
        return OTHER, ()
    if isinstance(node, ast.Assign):
        bound: List[str] = []
        for target in node.targets:
            sub = _target_names(target)
            if sub is None:
                return OTHER, ()
            bound.extend(sub)
        return ASSIGN, tuple(bound)
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return ASSIGN, (node.target.id,)
    if (
        index == 0
        and isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ):
        return DOC, ()
    return OTHER, ()


def statements(body: Sequence[ast.stmt], lines: Sequence[str], start: int = 0) -> List[Stmt]:
    """Key every statement of ``body`` (``lines``: the source split into lines; ``start``:
    the index of ``body[0]`` in the whole body, when ``body`` is a part of it)."""
    out: List[Stmt] = []
    seen: Dict[Tuple[object, ...], int] = {}
    for index, node in enumerate(body, start):
        kind, names = classify(node, index)
        # anonymous statements are keyed by their content; the rest by kind and names
        dump = ast.dump(node) if kind == OTHER else None
        base: Tuple[object, ...] = (kind, names) if kind != OTHER else (kind, dump)
        occ = seen.get(base, 0)
        seen[base] = occ + 1
        first = first_line(node)
        last = getattr(node, "end_lineno", None) or node.lineno
        text = "".join(lines[first - 1 : last])
        out.append(Stmt(node, kind, names, base + (occ,), first, last, text, bound_names(node), dump))
    return out


@dataclass
class Pair:
    """A new statement and the old statement it replaces (either may be None)."""

    old: Optional[Stmt]
    new: Optional[Stmt]
    status: str

    @property
    def delta(self) -> int:
        """Line shift from old to new position."""
        if self.old is None or self.new is None:
            return 0
        return self.new.first - self.old.first


@dataclass
class BodyDiff:
    """Result of matching two bodies: pairs in new order, then removed statements."""

    pairs: List[Pair] = field(default_factory=list)
    removed: List[Stmt] = field(default_factory=list)

    def changed(self) -> bool:
        """True when anything besides pure moves differs."""
        return bool(self.removed) or any(p.status not in (UNCHANGED, MOVED) for p in self.pairs)

    def new_bound(self) -> FrozenSet[str]:
        """Every name the new body binds."""
        out: Set[str] = set()
        for p in self.pairs:
            if p.new is not None:
                out |= p.new.bound
        return frozenset(out)


def _status(old: Stmt, new: Stmt) -> str:
    if old.text == new.text:
        # identical lines parse to identical trees: no need to compare them
        return MOVED if old.first != new.first else UNCHANGED
    if old.kind in (DEF, CLASS):
        # Any other text: even with the same AST (comments, blank lines inside) the line
        # tables of the code objects differ, so it is a change. Definitions are never
        # re-run, so this costs a code swap only.
        return CHANGED
    if old.dump != new.dump:
        return CHANGED
    if old.first != new.first:
        return MOVED
    return UNCHANGED


def diff_bodies(old: Iterable[Stmt], new: Iterable[Stmt]) -> BodyDiff:
    """Match ``old`` and ``new`` statements by key and classify each pair."""
    old_by_key: Dict[Tuple[object, ...], Stmt] = {s.key: s for s in old}
    result = BodyDiff()
    used: Set[Tuple[object, ...]] = set()
    for stmt in new:
        prev = old_by_key.get(stmt.key)
        if prev is None:
            result.pairs.append(Pair(None, stmt, ADDED))
        else:
            used.add(stmt.key)
            result.pairs.append(Pair(prev, stmt, _status(prev, stmt)))
    for key, stmt in old_by_key.items():
        if key not in used:
            result.removed.append(stmt)
    return result


def is_noop(node: ast.stmt) -> bool:
    """True for statements with no effect to undo: ``pass`` and a bare ``...``."""
    if isinstance(node, ast.Pass):
        return True
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node.value.value is Ellipsis


def future_flags(module: ast.Module) -> int:
    """Compiler flags of the ``from __future__`` imports at the top of ``module``."""
    flags = 0
    for node in module.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            for alias in node.names:
                feature = getattr(__future__, alias.name, None)
                if feature is not None:
                    flags |= feature.compiler_flag
        elif isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant):
            continue
        else:
            break
    return flags


def header_dump(node: ast.ClassDef) -> str:
    """AST of a class header (bases, keywords, decorators) without its body."""
    return ast.dump(
        ast.ClassDef(
            name=node.name,
            bases=node.bases,
            keywords=node.keywords,
            body=[],
            decorator_list=node.decorator_list,
        )
    )


def decorators_dump(node: ast.stmt) -> str:
    """AST dump of a definition's decorator list."""
    return "|".join(ast.dump(d) for d in getattr(node, "decorator_list", ()) or ())


def args_dump(node: ast.stmt, which: str) -> str:
    """Dump of a function's positional defaults (``which='defaults'``) or keyword defaults."""
    args = node.args  # type: ignore[attr-defined]
    if which == "defaults":
        return "|".join(ast.dump(d) for d in args.defaults)
    return "|".join(
        a.arg + "=" + ("-" if d is None else ast.dump(d)) for a, d in zip(args.kwonlyargs, args.kw_defaults)
    )


def annotations_dump(node: ast.stmt) -> str:
    """Dump of every annotation of a function signature."""
    args = node.args  # type: ignore[attr-defined]
    parts: List[str] = []
    all_args = list(getattr(args, "posonlyargs", [])) + list(args.args) + list(args.kwonlyargs)
    for extra in (args.vararg, args.kwarg):
        if extra is not None:
            all_args.append(extra)
    for a in all_args:
        parts.append(a.arg + ":" + (ast.dump(a.annotation) if a.annotation is not None else "-"))
    ret = node.returns  # type: ignore[attr-defined]
    parts.append("return:" + (ast.dump(ret) if ret is not None else "-"))
    return "|".join(parts)


def signature_dump(node: ast.AST) -> str:
    """Dump of a function's parameters (names, kinds, default count), for closure checks."""
    args = node.args  # type: ignore[attr-defined]
    parts = [
        "po:" + ",".join(a.arg for a in getattr(args, "posonlyargs", [])),
        "a:" + ",".join(a.arg for a in args.args),
        "va:" + (args.vararg.arg if args.vararg else ""),
        "ko:" + ",".join(a.arg for a in args.kwonlyargs),
        "kw:" + (args.kwarg.arg if args.kwarg else ""),
        "nd:" + str(len(args.defaults)),
        "kd:" + ",".join("1" if d is not None else "0" for d in args.kw_defaults),
    ]
    return "|".join(parts)


def nested_functions(node: ast.AST) -> List[ast.AST]:
    """Function and lambda nodes nested anywhere inside ``node`` (not ``node`` itself)."""
    out: List[ast.AST] = []
    for child in ast.walk(node):
        if child is node:
            continue
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            out.append(child)
    return out


def nested_path(root: ast.AST) -> Dict[int, Tuple[str, ...]]:
    """Map ``id(node)`` of nested functions to a path of (name, occurrence) labels.

    Used to pair a closure's definition in the old source with the same
    definition in the new source when line numbers moved.
    """
    paths: Dict[int, Tuple[str, ...]] = {}

    def label(n: ast.AST) -> str:
        return n.name if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else "<lambda>"

    def walk(n: ast.AST, prefix: Tuple[str, ...]) -> None:
        counts: Dict[str, int] = {}

        def children(x: ast.AST) -> Iterable[ast.AST]:
            for c in ast.iter_child_nodes(x):
                if isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                    yield c
                else:
                    yield from children(c)

        for c in children(n):
            name = label(c)
            occ = counts.get(name, 0)
            counts[name] = occ + 1
            path = prefix + (f"{name}#{occ}",)
            if not isinstance(c, ast.ClassDef):
                paths[id(c)] = path
            walk(c, path)

    walk(root, ())
    return paths


def node_first_line(node: ast.AST) -> int:
    """``co_firstlineno`` a function or lambda node compiles to."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return first_line(node)
    lineno: int = getattr(node, "lineno")
    return lineno


def node_code_name(node: ast.AST) -> str:
    """``co_name`` a function or lambda node compiles to."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.name
    return "<lambda>"
