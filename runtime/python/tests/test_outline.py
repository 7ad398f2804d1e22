"""Outlines: the new text's statements found by anchoring on the old outline are exactly
those of a full parse (trees, keys, lines), whatever the edit."""

from __future__ import annotations

import ast
import itertools

import pytest

from hotfleet import diff as D
from hotfleet.outline import new_outline, outline_of

_ids = itertools.count()

OLD = '''"""doc"""
import math

X = 1; Y = 2

def f(a):
    return a + 1

@staticmethod
def g():
    return 2

class C:
    def m(self):
        return 3

x = 1
print("side effect")
'''

CASES = {
    "a function gains a line": OLD.replace("    return a + 1\n", "    b = a\n    return b + 1\n"),
    "unchanged statement text inside a string a gap opens": OLD.replace(
        "X = 1; Y = 2\n", 'S = """\nx = 1\n"""\nX = 1; Y = 2\n'
    ),
    "decorator added above an unchanged def": OLD.replace("def f(a):", "@staticmethod\ndef f(a):"),
    "statements reordered": OLD.replace("x = 1\nprint(\"side effect\")\n", "print(\"side effect\")\nx = 1\n"),
    "shared line changed": OLD.replace("X = 1; Y = 2", "X = 1; Y = 3"),
    "comment and blank lines only": OLD.replace("import math\n", "import math\n# note\n\n\n"),
    "class body grows": OLD.replace("        return 3\n", "        return 3\n\n    def n(self):\n        return 4\n"),
    "text appended and prepended": "# header\n" + OLD + "\ndef late():\n    return 5\n",
    "statement inserted above the docstring": "import os\n" + OLD,
    "docstring removed": OLD.replace('"""doc"""\n', "", 1),
}


def _view(stmts):
    return [(s.kind, s.names, s.key, s.first, s.last, s.text, ast.dump(s.node, include_attributes=True)) for s in stmts]


@pytest.mark.parametrize("case", sorted(CASES))
def test_anchored_statements_equal_a_full_parse(case):
    new = CASES[case]
    n = next(_ids)
    old_lines, new_lines = OLD.splitlines(True), new.splitlines(True)
    base = outline_of(OLD, old_lines, f"<outline-test-{n}>", f"old{n}")
    got = new_outline(base, new, new_lines, f"<outline-test-{n}>", f"new{n}")
    want = D.statements(D.parse(new, "x").body, new_lines)
    assert _view(got.stmts) == _view(want)


def test_a_syntax_error_in_the_new_text_is_reported_with_its_line():
    n = next(_ids)
    base = outline_of(OLD, OLD.splitlines(True), f"<outline-test-{n}>", f"old{n}")
    bad = OLD.replace("def f(a):", "def f(a)")
    with pytest.raises(SyntaxError) as info:
        new_outline(base, bad, bad.splitlines(True), f"<outline-test-{n}>", f"bad{n}")
    assert info.value.lineno == 6
