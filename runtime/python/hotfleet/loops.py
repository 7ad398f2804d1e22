"""Safe-point helpers for event loops.

A game whose loop is an explicit ``while`` calls ``rt.safe_point()`` (or uses
``with rt.tick():``) once per tick and needs nothing here.  These helpers are
for games driven by a framework:

* :func:`asyncio_safe_point` for an asyncio loop: every queued commit or
  rollback schedules ``rt.safe_point()`` on the loop with
  ``loop.call_soon_threadsafe``, so it runs between two callbacks (never in
  the middle of a coroutine step) on the loop's own thread, with no polling.
  With ``interval`` it also calls the safe point every ``interval`` seconds,
  which keeps the liveness heartbeat of ``rt.health()`` meaningful.
* :func:`threadsafe_scheduler` for frameworks that run callbacks on their own
  thread through a thread-safe "call this soon" function (Twisted's
  ``reactor.callFromThread``, Qt's queued invocations, a game engine's main
  thread dispatcher): every queued request hands ``rt.safe_point`` to it.

Both return a handle whose ``close()`` detaches the helper.
"""

from __future__ import annotations

import asyncio
import logging
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


def asyncio_safe_point(runtime: "Runtime", loop: asyncio.AbstractEventLoop, interval: Optional[float] = None) -> SafePointHandle:
    """Run ``runtime``'s safe point on ``loop`` whenever work is queued (and every ``interval`` s).

    Call it from any thread once the loop exists.  Commits then run on the
    loop's thread between callbacks.
    """
    state: Dict[str, Any] = {"timer": None, "closed": False}

    def wake() -> None:
        if not state["closed"] and not loop.is_closed():
            loop.call_soon_threadsafe(_run_safe_point, runtime)

    def periodic() -> None:
        if state["closed"]:
            return
        _run_safe_point(runtime)
        state["timer"] = loop.call_later(interval, periodic)  # type: ignore[arg-type]

    def on_close() -> None:
        state["closed"] = True
        timer = state["timer"]
        if timer is not None and not loop.is_closed():
            loop.call_soon_threadsafe(timer.cancel)

    if interval is not None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        loop.call_soon_threadsafe(periodic)
    runtime._queue.add_waker(wake)
    if len(runtime._queue):
        wake()
    return SafePointHandle(runtime, wake, on_close)


def threadsafe_scheduler(runtime: "Runtime", call_from_thread: Callable[[Callable[[], None]], Any]) -> SafePointHandle:
    """Hand ``runtime.safe_point`` to ``call_from_thread`` whenever work is queued.

    ``call_from_thread(fn)`` must be safe to call from any thread and run
    ``fn()`` soon on the game's thread (e.g. ``reactor.callFromThread``).
    """

    def wake() -> None:
        call_from_thread(lambda: _run_safe_point(runtime))

    runtime._queue.add_waker(wake)
    if len(runtime._queue):
        wake()
    return SafePointHandle(runtime, wake)
