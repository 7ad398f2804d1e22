"""Prepare off the game thread yields the GIL between its steps; on the game thread it never
sleeps."""

from __future__ import annotations

import threading

from hotfleet import courtesy, runtime


def test_courtesy_sleeps_only_when_enabled_and_due():
    off = courtesy.Courtesy(enabled=False, every=0.0)
    off()
    assert off.yields == 0
    on = courtesy.Courtesy(enabled=True, every=0.0, pause=0.0)
    on()
    on()
    assert on.yields == 2


def test_for_thread_spares_the_game_thread():
    assert not courtesy.for_thread(None).enabled  # the main thread is taken for the game's
    assert not courtesy.for_thread(threading.get_ident()).enabled
    assert courtesy.for_thread(threading.get_ident() + 1).enabled
    seen = []
    worker = threading.Thread(target=lambda: seen.append(courtesy.for_thread(None).enabled))
    worker.start()
    worker.join()
    assert seen == [True]


def test_prepare_on_another_thread_yields_between_steps(pkg, monkeypatch):
    rt, m = pkg.load("yielding", "def f():\n    return 1\n" + "".join(f"def g{i}():\n    return {i}\n" for i in range(20)))
    made = []

    def eager(game_thread):
        c = courtesy.Courtesy(enabled=courtesy.for_thread(game_thread).enabled, every=0.0, pause=0.0)
        made.append(c)
        return c

    monkeypatch.setattr(runtime, "for_thread", eager)
    new = rt.live_source(m.__name__).replace("return 1", "return 2")
    result = []
    worker = threading.Thread(target=lambda: result.append(rt.prepare({m.__name__: new})))
    worker.start()
    worker.join()
    assert result and result[0].plan.refusals == []
    assert made and made[0].enabled and made[0].yields > 5
    result[0].abort()
