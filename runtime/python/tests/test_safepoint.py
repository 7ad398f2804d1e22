"""Safe points, requests from other threads, loop helpers and health figures."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest

import hotfleet


def test_request_commit_from_foreign_thread_lands_at_safe_point(pkg):
    rt, m = pkg.load("loop", "def f():\n    return 1\n")
    results: dict = {}

    def agent() -> None:
        txn = rt.prepare({m.__name__: "def f():\n    return 2\n"}, txn_id="t1")
        fut = rt.request_commit(txn)
        results["same"] = rt.request_commit(txn) is fut
        results["report"] = fut.result(timeout=10)
        results["thread"] = threading.get_ident()

    worker = threading.Thread(target=agent)
    rt.safe_point()  # this thread is the game thread
    worker.start()
    seen_mid_tick = []
    deadline = time.monotonic() + 10
    while worker.is_alive() and time.monotonic() < deadline:
        with rt.tick():
            seen_mid_tick.append(m.f())  # a tick never sees a half-applied patch
            time.sleep(0.001)
    worker.join()
    assert results["same"] and results["report"].txn_id == "t1"
    assert m.f() == 2 and set(seen_mid_tick) <= {1, 2}
    assert rt.patch_stack[-1].id == "t1"


def test_commit_from_non_game_thread_is_refused(pkg):
    rt, m = pkg.load("thr", "def f():\n    return 1\n")
    rt.safe_point()
    txn = rt.prepare({m.__name__: "def f():\n    return 2\n"})
    errors = []

    def other() -> None:
        try:
            txn.commit()
        except hotfleet.CommitError as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors and "game thread" in str(errors[0])
    assert m.f() == 1 and txn.state == "prepared"
    txn.commit()
    assert m.f() == 2


def test_request_rollback_checks_expected_id(pkg):
    rt, m = pkg.load("rb", "def f():\n    return 1\n")
    rt.prepare({m.__name__: "def f():\n    return 2\n"}, txn_id="p1").commit()
    wrong = rt.request_rollback(expected_id="nope")
    right = rt.request_rollback(expected_id="p1")
    empty = rt.request_rollback()
    assert rt.safe_point() == 3
    with pytest.raises(hotfleet.RollbackError, match="not nope"):
        wrong.result(0)
    assert right.result(0).txn_id == "p1" and m.f() == 1
    with pytest.raises(hotfleet.RollbackError, match="empty"):
        empty.result(0)


def test_abort_fails_a_queued_commit(pkg):
    rt, m = pkg.load("ab", "def f():\n    return 1\n")
    txn = rt.prepare({m.__name__: "def f():\n    return 2\n"})
    fut = rt.request_commit(txn)
    txn.abort()
    with pytest.raises(hotfleet.CommitError, match="aborted"):
        fut.result(0)
    assert rt.safe_point() == 0 and m.f() == 1


def test_failed_commit_reaches_the_future(pkg):
    rt, m = pkg.load("bad", "X = 1\n")
    txn = rt.prepare({m.__name__: "X = 1\nY = 1 / 0\n"})
    fut = rt.request_commit(txn)
    rt.safe_point()
    with pytest.raises(hotfleet.CommitError, match="ZeroDivisionError"):
        fut.result(0)
    assert not hasattr(m, "Y")


def test_asyncio_helper_commits_on_the_loop_thread(pkg):
    rt, m = pkg.load("aio", "def f():\n    return 1\n")

    async def main() -> tuple:
        loop = asyncio.get_running_loop()
        handle = hotfleet.asyncio_safe_point(rt, loop, interval=0.01)
        loop_thread = threading.get_ident()
        committed_on: list = []

        def agent() -> object:
            txn = rt.prepare({m.__name__: "import threading\nWHERE = []\ndef f():\n    return 2\ndef __reload_module__(old):\n    WHERE.append(threading.get_ident())\n"})
            return rt.request_commit(txn).result(timeout=10)

        report = await loop.run_in_executor(None, agent)
        committed_on.extend(m.WHERE)
        await asyncio.sleep(0.03)  # periodic safe points keep the heartbeat
        beats = rt.health()["safe_points"]
        handle.close()
        return report, loop_thread, committed_on, beats

    report, loop_thread, committed_on, beats = asyncio.run(main())
    assert report.counts["functions_swapped"] == 1 and m.f() == 2
    assert committed_on == [loop_thread] and beats >= 2
    assert rt.health()["alive"]


def test_threadsafe_scheduler_hands_safe_point_to_the_framework(pkg):
    rt, m = pkg.load("twisted", "def f():\n    return 1\n")
    calls: "queue.Queue" = queue.Queue()
    handle = hotfleet.threadsafe_scheduler(rt, calls.put)  # like reactor.callFromThread
    result: dict = {}

    def agent() -> None:
        txn = rt.prepare({m.__name__: "def f():\n    return 2\n"})
        result["report"] = rt.request_commit(txn).result(timeout=10)

    t = threading.Thread(target=agent)
    t.start()
    calls.get(timeout=10)()  # the "reactor" thread runs what it was handed
    t.join()
    assert result["report"].counts["functions_swapped"] == 1 and m.f() == 2
    handle.close()
    rt.request_rollback()
    assert calls.empty()  # detached: nothing handed over any more
    rt.safe_point()


def test_health_figures_marks_and_game_callback(pkg):
    state = {"ok": True}
    rt, m = pkg.load("hp", "X = 1\n", health=lambda: (state["ok"], "zone fine" if state["ok"] else "queue stuck"))
    h0 = rt.health()
    assert h0["ticks"] == 0 and h0["tick_p50_ms"] is None and h0["game_ok"] is True and h0["game_detail"] == "zone fine"
    for _ in range(20):
        with rt.tick():
            time.sleep(0.001)
    mark = rt.mark()
    with pytest.raises(KeyError):
        with rt.tick():
            raise KeyError("boom")
    rt.record_exception(ValueError("caught by the game"))
    for _ in range(3):
        with rt.tick():
            pass
    state["ok"] = False
    h = rt.health(since=mark)
    assert h["ticks"] == 24 and h["exceptions_since"] == 2 and h["exceptions_total"] == 2
    assert h["ticks_since"] == 4 and h["mark"] > mark and h["alive"] is True
    assert h["tick_p50_ms"] >= 0.5 and h["tick_p99_ms"] >= h["tick_p50_ms"]
    assert h["game_ok"] is False and h["game_detail"] == "queue stuck"
    assert h["last_exception"]["type"] == "ValueError"
    assert rt.health(since=rt.mark())["exceptions_since"] == 0


def test_health_callback_variants_and_staleness(pkg):
    rt, m = pkg.load("hp2", "X = 1\n", health=lambda: {"ok": False, "players": 3}, stale_after=0.05)
    h = rt.health()
    assert h["game_ok"] is False and h["game_detail"]["players"] == 3
    rt.safe_point()
    assert rt.health()["alive"] is True
    time.sleep(0.1)
    assert rt.health()["alive"] is False  # the loop stopped beating

    def broken() -> bool:
        raise RuntimeError("nope")

    rt2 = hotfleet.Runtime(packages=[pkg.name + "_other"], health=broken)
    rt3 = hotfleet.Runtime(packages=[pkg.name + "_third"])
    try:
        assert rt2.health()["game_ok"] is False and "RuntimeError" in rt2.health()["game_detail"]
        assert rt3.health()["game_ok"] is True  # no callback: nothing says the game is unwell
    finally:
        rt2.close()
        rt3.close()
