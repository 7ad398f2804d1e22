"""Queue of commits and rollbacks waiting for the game's next safe point.

``request_commit`` / ``request_rollback`` may be called from any thread
(the agent's); they queue the work and return a
:class:`concurrent.futures.Future`.  The game thread runs the queue in
``safe_point()`` between ticks.  *Wakers* let loop helpers schedule a safe
point as soon as something is queued instead of waiting for the next tick.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from typing import Any, Callable, Deque, List, Optional

log = logging.getLogger("hotfleet")

__all__ = ["Request", "RequestQueue"]


class Request:
    """One queued operation."""

    __slots__ = ("kind", "target", "future")

    def __init__(self, kind: str, target: Any, future: "concurrent.futures.Future[Any]") -> None:
        self.kind = kind  # "commit" or "rollback"
        self.target = target  # Transaction, or the expected stack id (or None)
        self.future = future


class RequestQueue:
    """Thread-safe FIFO of requests plus wake-up callbacks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: Deque[Request] = collections.deque()
        self._wakers: List[Callable[[], None]] = []

    def put(self, request: Request) -> None:
        """Queue ``request`` and wake the loop helpers (outside the lock)."""
        with self._lock:
            self._items.append(request)
            wakers = list(self._wakers)
        for wake in wakers:
            try:
                wake()
            except Exception:
                log.exception("safe point waker failed")

    def find(self, kind: str, target: Any) -> Optional[Request]:
        """A queued request of ``kind`` for ``target`` (identity), if any."""
        with self._lock:
            for item in self._items:
                if item.kind == kind and item.target is target:
                    return item
        return None

    def remove(self, request: Request) -> bool:
        """Take ``request`` out of the queue; False when already taken."""
        with self._lock:
            try:
                self._items.remove(request)
                return True
            except ValueError:
                return False

    def drain(self) -> List[Request]:
        """Take every queued request (oldest first)."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def add_waker(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` (from the requesting thread) whenever work is queued."""
        with self._lock:
            self._wakers.append(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        """Stop calling ``wake``."""
        with self._lock:
            try:
                self._wakers.remove(wake)
            except ValueError:
                pass
