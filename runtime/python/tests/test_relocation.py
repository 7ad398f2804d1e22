"""Relocation: functions below an edit that moved lines get code objects with the new line
numbers, computed in prepare; commit only assigns them. Rollback is exact, tracebacks and
``linecache`` follow the text that runs."""

from __future__ import annotations

import linecache
import traceback

import pytest

import hotfleet
from hotfleet import swap
from hotfleet.staging import model

OLD = """
def changed(x):
    return x + 1

def below(x):
    raise ValueError(x)

class Unit:
    def hit(self):
        raise KeyError("hit")

def after_class():
    return 7
"""

NEW = OLD.replace("    return x + 1\n", "    y = x + 1\n    return y + 1\n")


def _raising_line(fn, *args):
    with pytest.raises(Exception) as info:
        fn(*args)
    frame = traceback.extract_tb(info.value.__traceback__)[-1]
    return frame.lineno, frame.line, linecache.getline(frame.filename, frame.lineno)


def test_moved_functions_follow_the_new_lines_and_roll_back_exactly(pkg):
    rt, m = pkg.load("shifted", OLD)
    below, hit, after = m.below, m.Unit.hit, m.after_class
    codes = {f: f.__code__ for f in (below, hit, after)}
    assert _raising_line(below, 1)[0] == 5
    txn = rt.prepare({m.__name__: pkg.src(NEW)})
    assert txn.plan.modules[0].relocated == 3
    report = txn.commit()
    assert report.counts["relocated"] == 3
    # the same function objects, new code objects one line further down
    for f, old in codes.items():
        assert f.__code__ is not old and f.__code__.co_code == old.co_code
        assert f.__code__.co_firstlineno == old.co_firstlineno + 1
    lineno, line, cached = _raising_line(below, 1)
    assert lineno == 6 and "raise ValueError" in line and cached.strip() == "raise ValueError(x)"
    lineno, line, cached = _raising_line(m.Unit().hit)
    assert lineno == 10 and cached.strip() == 'raise KeyError("hit")'
    assert after() == 7 and m.changed(1) == 3
    rt.rollback()
    for f, old in codes.items():
        assert f.__code__ is old
    lineno, line, cached = _raising_line(below, 1)
    assert lineno == 5 and cached.strip() == "raise ValueError(x)"
    assert m.changed(1) == 2


def test_commit_computes_no_code_objects(pkg, monkeypatch):
    """Everything a relocation assigns exists after prepare: commit only assigns."""
    rt, m = pkg.load("precomputed", OLD)
    txn = rt.prepare({m.__name__: pkg.src(NEW)})

    def refuse(*_args, **_kwargs):
        raise AssertionError("code object built at commit")

    monkeypatch.setattr(swap, "shift_code", refuse)
    monkeypatch.setattr(model, "shift_code", refuse)
    report = txn.commit()
    assert report.counts["relocated"] == 3
    assert m.below.__code__.co_firstlineno == 5


def test_failed_commit_restores_relocated_code(pkg):
    rt, m = pkg.load("failing", OLD)
    codes = {f: f.__code__ for f in (m.below, m.Unit.hit, m.after_class)}
    failing = NEW + "\ndef __reload_module__(old):\n    raise RuntimeError('hook fails')\n"
    txn = rt.prepare({m.__name__: pkg.src(failing)})
    with pytest.raises(hotfleet.CommitError):
        txn.commit()
    for f, old in codes.items():
        assert f.__code__ is old
    assert _raising_line(m.below, 1)[2].strip() == "raise ValueError(x)"
    assert _raising_line(m.below, 1)[0] == 5


def test_linecache_entry_is_prepared_with_the_record(pkg):
    """The lines linecache gets at commit are split in prepare (not on the game thread)."""
    rt, m = pkg.load("lines", OLD)
    txn = rt.prepare({m.__name__: pkg.src(NEW)})
    record = txn.stages[0].record
    assert "lines" in record.__dict__  # computed by prepare
    txn.commit()
    assert linecache.cache[m.__file__][2] is record.lines
