"""Statement outlines of module sources, found cheaply.

Prepare runs beside the game thread, and parsing a whole module is one C call holding the
GIL for milliseconds (and tens of thousands of AST objects for the collector). So:

* the **outline** of a recorded source (its top-level statements, keyed for the diff, with
  their line groups but without trees) is computed once per source text and kept;
* the new text's statements are found by **anchoring**: every old statement group whose
  exact lines reappear, at a line start and in order, is taken over (shifted) without
  parsing; only the text between anchors is parsed, each gap on its own and at its own
  line numbers.

Anchoring never guesses: a gap that does not parse on its own (an anchor found inside a
string the gap opens, a decorator cut from its ``def``) makes the whole text parse the usual
way. When every gap parses, the lexer is at a statement boundary before and after each
anchor, so the statements are exactly those of a full parse. Trees of old statements are
re-parsed from their group only when the diff needs them (changed statements).
"""

from __future__ import annotations

import ast
import bisect
import itertools
import re
import threading
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

from . import diff as D

__all__ = ["Outline", "outline_of", "new_outline", "OUTLINES"]

# Line breaks str.splitlines honours but the tokenizer does not: line numbers would differ.
_ODD_BREAKS = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]|\r(?!\n)")


class Outline:
    """The top-level statements of one source text (trees dropped) and their groups."""

    def __init__(self, stmts: List[D.Stmt], groups: List[D.Group], flags: int) -> None:
        self.stmts = stmts
        self.groups = groups
        self.flags = flags  # compiler flags of its ``from __future__`` imports


class _Cache:
    """Outlines by (filename, digest), the most recently used few kept."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: "OrderedDict[Tuple[str, str], Outline]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, filename: str, digest: str) -> Optional[Outline]:
        with self._lock:
            found = self._items.get((filename, digest))
            if found is not None:
                self._items.move_to_end((filename, digest))
            return found

    def put(self, filename: str, digest: str, outline: Outline) -> None:
        with self._lock:
            self._items[(filename, digest)] = outline
            self._items.move_to_end((filename, digest))
            while len(self._items) > self.size:
                self._items.popitem(last=False)


OUTLINES = _Cache()


def _groups(stmts: List[D.Stmt], lines: List[str]) -> List[D.Group]:
    """Group statements sharing lines; each statement learns its group."""
    groups: List[D.Group] = []
    for stmt in stmts:
        if groups and stmt.first <= groups[-1].last:
            cur = groups[-1]
            stmt.gindex = cur.size
            cur.size += 1
            cur.last = max(cur.last, stmt.last)
        else:
            cur = D.Group(stmt.first, stmt.last, "")
            stmt.gindex = 0
            groups.append(cur)
        stmt.group = cur
    for group in groups:
        group.text = "".join(lines[group.first - 1 : group.last])
    return groups


def _future_flags(stmts: List[D.Stmt]) -> int:
    """``D.future_flags`` over statements (only the leading ones are looked at)."""
    head: List[ast.stmt] = []
    for stmt in stmts:
        if stmt.kind not in (D.FUTURE, D.DOC):
            break
        head.append(stmt.node)
    return D.future_flags(ast.Module(body=head, type_ignores=[]))


def _finish(stmts: List[D.Stmt], lines: List[str], keep_trees: bool) -> Outline:
    groups = _groups(stmts, lines)
    flags = _future_flags(stmts)
    if not keep_trees:
        for stmt in stmts:
            stmt._node = None
    return Outline(stmts, groups, flags)


def outline_of(text: str, lines: List[str], filename: str, digest: str) -> Outline:
    """The outline of a recorded source (parsed once per text, then cached)."""
    found = OUTLINES.get(filename, digest)
    if found is not None:
        return found
    tree = D.parse(text, filename)
    outline = _finish(D.statements(tree.body, lines), lines, keep_trees=False)
    OUTLINES.put(filename, digest, outline)
    return outline


def _blank(lines: List[str]) -> bool:
    for line in lines:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return False
    return True


def _anchored(
    base: Outline, text: str, lines: List[str], filename: str, courtesy: Callable[[], None]
) -> Optional[List[D.Stmt]]:
    """The new text's statements by anchoring on ``base`` (None: parse it whole instead)."""
    if _ODD_BREAKS.search(text):
        return None
    starts = [0]
    starts.extend(itertools.accumulate(len(line) for line in lines))
    members: dict = {}
    for stmt in base.stmts:
        members.setdefault(id(stmt.group), []).append(stmt)
    spans: List[Tuple[int, int, Optional[D.Group]]] = []  # (first, last, anchor group or None: gap)
    pos = 1  # first new line not yet covered
    for group in base.groups:
        needle = group.text
        if not needle or needle.endswith("\\\n") or needle.endswith("\\\r\n"):
            continue
        idx = text.find(needle, starts[pos - 1])
        while idx > 0 and text[idx - 1] != "\n":
            idx = text.find(needle, idx + 1)
        if idx < 0:
            continue
        line = bisect.bisect_right(starts, idx)
        if line > pos:
            spans.append((pos, line - 1, None))
        count = group.last - group.first + 1
        spans.append((line, line + count - 1, group))
        pos = line + count
    if pos <= len(lines):
        spans.append((pos, len(lines), None))
    out: List[D.Stmt] = []
    for first, last, group in spans:
        if group is None:
            courtesy()
            gap = lines[first - 1 : last]
            if _blank(gap):
                continue
            try:
                tree = D.parse("\n" * (first - 1) + "".join(gap), filename)
            except SyntaxError:
                return None
            out.extend(D.statements(tree.body, lines, len(out)))
            continue
        shift = first - group.first
        for old in members[id(group)]:
            stmt = D.Stmt(None, old.kind, old.names, old.key, old.first + shift, old.last + shift, old.text, old.bound, old._dump)
            if old.kind in (D.DOC, D.OTHER) and (old.kind == D.DOC) != (not out):
                # a string statement is the docstring only at index 0, and this one moved across
                stmt.kind, stmt.names = D.classify(old.node, len(out))
                stmt._dump = old.dump if stmt.kind == D.OTHER else None
                stmt.key = ((stmt.kind, stmt._dump) if stmt.kind == D.OTHER else (stmt.kind, stmt.names)) + (0,)
            out.append(stmt)
    # occurrence indexes count over the whole new body, as a full parse would
    seen: dict = {}
    for stmt in out:
        base_key = stmt.key[:-1]
        occ = seen.get(base_key, 0)
        seen[base_key] = occ + 1
        stmt.key = base_key + (occ,)
    return out


def new_outline(
    base: Optional[Outline],
    text: str,
    lines: List[str],
    filename: str,
    digest: str,
    courtesy: Callable[[], None] = lambda: None,
) -> Outline:
    """The outline of a patch's new text (anchored on ``base`` when given), cached for the
    prepare that will have it as its base. Raises SyntaxError as ``ast.parse`` does."""
    stmts = _anchored(base, text, lines, filename, courtesy) if base is not None else None
    if stmts is None:
        stmts = D.statements(D.parse(text, filename).body, lines)
    outline = _finish(stmts, lines, keep_trees=True)
    OUTLINES.put(filename, digest, outline)
    return outline
