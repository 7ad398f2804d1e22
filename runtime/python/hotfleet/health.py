"""Health figures the runtime reports to the agent (which gates rollouts on them).

* ticks completed and tick duration percentiles over a recent window
  (measured by ``with rt.tick():``);
* unhandled exceptions seen by the game loop (``rt.tick()`` records them,
  games that catch their own call ``rt.record_exception``), counted since a
  *mark*: ``rt.mark()`` returns a monotonically increasing counter, and
  ``rt.health(since=mark)`` counts the exceptions recorded after it;
* liveness: the game loop's heartbeat (ticks and safe points); a loop that
  stopped beating for ``stale_after`` seconds is reported not alive;
* an optional game-defined callback ``() -> bool | (bool, str) | dict``.
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
import time
import traceback
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

log = logging.getLogger("hotfleet")

__all__ = ["HealthMonitor", "GameHealth"]

GameHealth = Callable[[], Union[bool, Tuple[bool, str], Dict[str, Any]]]


def _ms(seconds: Optional[float]) -> Optional[float]:
    """Seconds to milliseconds, rounded for reports."""
    return None if seconds is None else round(seconds * 1000.0, 4)


def _percentile(sorted_values: List[float], q: float) -> Optional[float]:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, int(-(-q * len(sorted_values) // 1)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class HealthMonitor:
    """Thread-safe counters; written by the game thread, read by any thread."""

    def __init__(self, game: Optional[GameHealth] = None, window: int = 1024, stale_after: float = 5.0, keep_exceptions: int = 10_000) -> None:
        self.game = game
        self.stale_after = stale_after
        self._lock = threading.Lock()
        self._durations: Deque[float] = collections.deque(maxlen=window)
        self._ticks = 0
        self._safe_points = 0
        self._seq = 0
        self._exc_seqs: Deque[int] = collections.deque(maxlen=keep_exceptions)
        self._exc_total = 0
        self._last_exception: Optional[Dict[str, Any]] = None
        self._last_beat: Optional[float] = None
        self._started = time.monotonic()

    # -- written by the game thread -------------------------------------------

    def beat(self) -> None:
        """The game loop is alive (a safe point ran)."""
        with self._lock:
            self._last_beat = time.monotonic()
            self._safe_points += 1

    def tick_done(self, seconds: float) -> None:
        """A tick completed after ``seconds``."""
        with self._lock:
            self._ticks += 1
            self._seq += 1
            self._durations.append(seconds)
            self._last_beat = time.monotonic()

    def exception(self, exc: BaseException) -> None:
        """An unhandled exception reached the game loop."""
        frames = traceback.extract_tb(exc.__traceback__)
        where = frames[-1] if frames else None
        info = {
            "type": type(exc).__name__,
            "message": str(exc)[:500],
            "file": where.filename if where else None,
            "line": where.lineno if where else None,
            "function": where.name if where else None,
            "at": time.time(),
        }
        with self._lock:
            self._seq += 1
            self._exc_total += 1
            self._exc_seqs.append(self._seq)
            self._last_exception = info

    # -- read by anyone ----------------------------------------------------------

    def mark(self) -> int:
        """Current position in the tick/exception sequence."""
        with self._lock:
            return self._seq

    def snapshot(self, since: Optional[int] = None) -> Dict[str, Any]:
        """The health dictionary (see ``Runtime.health``)."""
        now = time.monotonic()
        with self._lock:
            durations = sorted(self._durations)
            ticks = self._ticks
            seq = self._seq
            total = self._exc_total
            seqs = list(self._exc_seqs)
            last_exc = dict(self._last_exception) if self._last_exception else None
            last_beat = self._last_beat
            safe_points = self._safe_points
        if since is None:
            exc_since = total
            ticks_since = ticks
            truncated = False
        else:
            exc_since = len(seqs) - bisect.bisect_right(seqs, since)
            # Older exceptions than the retained window may be missing.
            truncated = total > len(seqs) and (not seqs or seqs[0] > since)
            if truncated:
                exc_since += total - len(seqs)
            # every step of the sequence is either a tick or an exception
            ticks_since = max(0, (seq - since) - exc_since) if since <= seq else 0
        beat_age = None if last_beat is None else now - last_beat
        alive = beat_age is None or beat_age <= self.stale_after
        game_ok, game_detail = self._game()
        return {
            "alive": alive,
            "ticks": ticks,
            "safe_points": safe_points,
            "tick_window": len(durations),
            "tick_p50_ms": _ms(_percentile(durations, 0.50)),
            "tick_p99_ms": _ms(_percentile(durations, 0.99)),
            "tick_max_ms": _ms(durations[-1] if durations else None),
            "ticks_since": ticks_since,
            "exceptions_total": total,
            "exceptions_since": exc_since,
            "exceptions_since_truncated": truncated,
            "last_exception": last_exc,
            "mark": seq,
            "beat_age_ms": _ms(beat_age),
            "uptime_s": round(now - self._started, 3),
            "game_ok": game_ok,
            "game_detail": game_detail,
        }

    def _game(self) -> Tuple[Optional[bool], Any]:
        if self.game is None:
            return True, ""  # no game-defined check: nothing says otherwise
        try:
            result = self.game()
        except Exception as exc:  # a broken callback is itself a health signal
            return False, f"health callback raised {type(exc).__name__}: {exc}"
        if isinstance(result, dict):
            return bool(result.get("ok", True)), result
        if isinstance(result, tuple) and len(result) == 2:
            return bool(result[0]), str(result[1])
        return bool(result), None
