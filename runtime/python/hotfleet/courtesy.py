"""Letting the game thread run while prepare works beside it.

Prepare runs on the agent's thread and is pure Python plus small C calls; CPython hands the
GIL to a waiting thread only every ``sys.getswitchinterval()`` (5 ms), so a game thread that
wakes for its tick could wait that long, every tick, while a prepare runs. Prepare calls a
:class:`Courtesy` between its steps: at most every ``every`` seconds of work it sleeps
briefly, which releases the GIL to whoever waits for it (``time.sleep(0)`` would not: the
releasing thread usually takes the GIL straight back).
"""

from __future__ import annotations

import threading
import time
from typing import Optional

__all__ = ["Courtesy", "for_thread"]


class Courtesy:
    """Call between steps of background work; a no-op when ``enabled`` is false."""

    __slots__ = ("enabled", "every", "pause", "_last", "yields")

    def __init__(self, enabled: bool, every: float = 0.0005, pause: float = 0.0001) -> None:
        self.enabled = enabled
        self.every = every
        self.pause = pause
        self._last = time.perf_counter()
        self.yields = 0

    def __call__(self) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last >= self.every:
            time.sleep(self.pause)
            self.yields += 1
            self._last = time.perf_counter()


def for_thread(game_thread: Optional[int]) -> Courtesy:
    """A courtesy that yields unless this is the game thread (``game_thread``: its ident,
    None while no safe point ran yet: then the main thread is taken for the game's)."""
    me = threading.get_ident()
    if game_thread is None:
        on_game = threading.current_thread() is threading.main_thread()
    else:
        on_game = me == game_thread
    return Courtesy(enabled=not on_game)
