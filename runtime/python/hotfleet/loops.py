"""Safe-point helpers for event loops.

A game whose loop is an explicit ``while`` calls ``rt.safe_point()`` (or uses
``with rt.tick():``) once per tick and needs nothing here.  These helpers are
for games driven by a framework:

* :func:`asyncio_safe_point` for an asyncio loop: every queued commit or
  rollback schedules ``rt.safe_point()`` on the loop with
  ``loop.call_soon_threadsafe``, so it runs between two callbacks (never in
  the middle of a coroutine step) on the loop's own thread, with no polling.
* :func:`threadsafe_scheduler` for frameworks that run callbacks on their own
  thread through a thread-safe "call this soon" function (Twisted's
  ``reactor.callFromThread``, Qt's queued invocations, a game engine's main
  thread dispatcher): every queued request hands ``rt.safe_point`` to it.

Ticks: a framework-driven game has no tick of its own that the runtime could
time, yet the agent's health gate needs ticks (a process without any in a
health window fails it with "no health data"). So with ``interval`` each
helper also runs a periodic safe point on the game's thread and counts it as
a tick whose duration is how late it ran: the loop's lag, which grows exactly
when the game's callbacks hog its thread.  The asyncio helper does this by
default (every second); pass ``interval=None`` to turn it off and count ticks
yourself with ``rt.record_tick(seconds)``.

Both return a handle whose ``close()`` detaches the helper.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import Runtime

log = logging.getLogger("hotfleet")

__all__ = ["asyncio_safe_point", "threadsafe_scheduler", "SafePointHandle"]


class SafePointHandle:
    """Attachment of a loop helper to a runtime; ``close()`` detaches it."""

    def __init__(self, runtime: "Runtime", waker: Callable[[], None], on_close: Optional[Callable[[], None]] = None) -> None:
        self._runtime = runtime
        self._waker = waker
        self._on_close = on_close
        self.closed = False

    def close(self) -> None:
        """Stop scheduling safe points.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._runtime._queue.remove_waker(self._waker)
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> "SafePointHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _run_safe_point(runtime: "Runtime") -> None:
    try:
        runtime.safe_point()
    except Exception:  # safe_point reports through futures; never kill the loop
        log.exception("safe point failed")


def _periodic_tick(runtime: "Runtime", lag: float) -> None:
    """A periodic safe point, counted as a tick lasting the loop's ``lag``."""
    runtime.record_tick(lag)
    _run_safe_point(runtime)


def _check_interval(interval: Optional[float]) -> None:
    if interval is not None and not interval > 0:
        raise ValueError("interval must be positive (or None for no periodic safe point)")


def _attach(runtime: "Runtime", wake: Callable[[], None], on_close: Optional[Callable[[], None]] = None) -> SafePointHandle:
    runtime._queue.add_waker(wake)
    if len(runtime._queue):
        wake()
    return SafePointHandle(runtime, wake, on_close)


def asyncio_safe_point(
    runtime: "Runtime", loop: asyncio.AbstractEventLoop, interval: Optional[float] = 1.0
) -> SafePointHandle:
    """Run ``runtime``'s safe point on ``loop`` whenever work is queued, and every
    ``interval`` seconds as a tick (see the module docstring; None: no periodic tick).

    Call it from any thread once the loop exists.  Commits then run on the
    loop's thread between callbacks.
    """
    _check_interval(interval)
    state: Dict[str, Any] = {"timer": None, "closed": False}

    def wake() -> None:
        if not state["closed"] and not loop.is_closed():
            loop.call_soon_threadsafe(_run_safe_point, runtime)

    def periodic(due: float) -> None:
        if state["closed"]:
            return
        _periodic_tick(runtime, loop.time() - due)
        next_due = loop.time() + interval  # type: ignore[operator]
        state["timer"] = loop.call_at(next_due, periodic, next_due)

    def on_close() -> None:
        state["closed"] = True
        timer = state["timer"]
        if timer is not None and not loop.is_closed():
            loop.call_soon_threadsafe(timer.cancel)

    if interval is not None:
        # the first one is due now: it runs as soon as the loop gets to it
        loop.call_soon_threadsafe(lambda: periodic(loop.time()))
    return _attach(runtime, wake, on_close)


def threadsafe_scheduler(
    runtime: "Runtime", call_from_thread: Callable[[Callable[[], None]], Any], interval: Optional[float] = None
) -> SafePointHandle:
    """Hand ``runtime.safe_point`` to ``call_from_thread`` whenever work is queued, and
    with ``interval`` every ``interval`` seconds as a tick (see the module docstring).

    ``call_from_thread(fn)`` must be safe to call from any thread and run
    ``fn()`` soon on the game's thread (e.g. ``reactor.callFromThread``).  The
    periodic hand-off comes from a small daemon thread; it hands over no new one
    while the previous one has not run yet.
    """
    _check_interval(interval)

    def wake() -> None:
        call_from_thread(lambda: _run_safe_point(runtime))

    if interval is None:
        return _attach(runtime, wake)
    stop = threading.Event()
    waiting = threading.Event()  # a periodic tick was handed over and has not run yet

    def tick(handed: float) -> None:
        waiting.clear()
        if not stop.is_set():
            _periodic_tick(runtime, time.perf_counter() - handed)

    def ticker() -> None:
        while not stop.wait(interval):
            if waiting.is_set():
                continue
            waiting.set()
            handed = time.perf_counter()
            try:
                call_from_thread(lambda: tick(handed))
            except Exception:  # e.g. the framework shut down; keep the game's thread out of it
                waiting.clear()
                log.exception("handing a periodic safe point to the framework failed")

    threading.Thread(target=ticker, name="hotfleet-ticker", daemon=True).start()
    return _attach(runtime, wake, stop.set)
