"""Bringing a process to its build's patch stack: fetch it, prepare what is missing, commit.

A game process that starts (or restarts) while patches are committed fleet-wide would run
the old code. So the agent link, once connected, asks the agent for the build's stack
(``stackQuery``) and applies every patch this process lacks, oldest first, before the
process counts as *current*. Two ways to commit, and why:

* from the link (``rt.connect()``): prepare off the game thread, then ``request_commit``;
  the commit lands at the game's next safe point, on the game's thread, like any other.
  A game that must not serve players before that waits with ``rt.wait_until_current()``,
  which runs the safe points itself when called on the game thread before its loop.
* on the caller's thread (``link.sync_patch_stack()``, for games that sync explicitly):
  ``txn.commit()`` right there, as before.

One round runs at a time (a lock); a caller on the game thread that waits for the lock
keeps running safe points, so a round from the link waiting for its commit is never stuck
behind it. Where the link syncs by itself, an explicit ``sync_patch_stack()`` joins its
rounds (:meth:`StackSync.join`) instead of asking the agent a second time.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

from .errors import HotfleetError

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import Runtime
    from .transaction import Transaction

log = logging.getLogger("hotfleet.agent_link")

__all__ = ["StackSync", "StackPatch"]

#: One patch of a stack: (patch id, module name -> full source).
StackPatch = Tuple[str, Dict[str, str]]
#: Fetches the build's stack, oldest first, within the first seconds given; errors name the
#: second (the caller's whole timeout). Raises HotfleetError.
Fetch = Callable[[float, float], List[StackPatch]]

_PUMP = 0.005  # seconds between safe points while the game thread waits


class StackSync:
    """Applies the build's patch stack to ``runtime``; ``current`` once a round succeeded."""

    def __init__(self, runtime: "Runtime", fetch: Fetch) -> None:
        self._rt = runtime
        self._fetch = fetch
        self._lock = threading.Lock()
        self._current = threading.Event()
        self._ended = threading.Condition()  # notified when a round from the link ends
        self._rounds = 0  # rounds from the link that ended
        self._error: Optional[HotfleetError] = None  # how the last of them failed
        self._applied: List[str] = []  # what the successful one applied
        self._kick = threading.Event()  # retry now: someone is waiting for the outcome

    @property
    def current(self) -> bool:
        """True once this process ran every patch of its build's stack (as of the last round)."""
        return self._current.is_set()

    def wait(self, timeout: Optional[float], stopped: Callable[[], bool]) -> bool:
        """Wait until current; on the game thread (or before the game loop) run safe points
        meanwhile, so the commits queued by a round from the link can land."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._current.is_set():
            if stopped():
                return False
            step = 0.1
            if self._rt.is_game_thread():
                self._rt.safe_point()
                step = _PUMP
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                step = min(step, remaining)
            self._current.wait(step)
        return True

    def join(self, timeout: float, stopped: Callable[[], bool], deadline: Optional[float] = None) -> List[str]:
        """Wait for the rounds from the link: the ids the successful one applied, or the
        error of the next one that fails. Runs safe points meanwhile (on the game thread)."""
        if deadline is None:
            deadline = time.monotonic() + timeout
        with self._ended:
            seen = self._rounds
        self.kick()  # a round waiting to retry runs now
        while not self._current.is_set():
            with self._ended:
                if self._rounds > seen and self._error is not None:
                    raise HotfleetError(str(self._error))
            if stopped():
                raise HotfleetError("patch stack sync: the agent link stopped")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HotfleetError(f"patch stack sync: not in sync within {timeout:g}s "
                                    f"(last attempt: {self._error or 'still waiting for the agent'})")
            if self._rt.is_game_thread():
                self._rt.safe_point()
            with self._ended:
                self._ended.wait(min(_PUMP, remaining))
        return list(self._applied)

    def kick(self) -> None:
        """End the link's pause between rounds (someone waits, or the link stops)."""
        self._kick.set()

    def pause(self, seconds: float) -> None:
        """Between two rounds from the link: wait ``seconds``, or less if someone joins."""
        self._kick.wait(seconds)
        self._kick.clear()

    def run_here(self, timeout: float, deadline: Optional[float] = None) -> List[str]:
        """One round committing on the calling thread (the game's); returns the ids applied.
        ``deadline`` (monotonic) when part of ``timeout`` was spent already."""
        if deadline is None:
            deadline = time.monotonic() + timeout
        while not self._lock.acquire(timeout=_PUMP):
            self._rt.safe_point()  # a round from the link may be waiting for exactly this
            if time.monotonic() >= deadline:
                raise HotfleetError(f"patch stack sync: another sync did not finish within {timeout:g}s")
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HotfleetError(f"patch stack sync: hotfleet-agent did not answer within {timeout:g}s")
            applied = self._round(remaining, timeout, lambda txn: txn.commit())
            self._current.set()
            return applied
        finally:
            self._lock.release()

    def run_queued(self, timeout: float, stopped: Callable[[], bool]) -> List[str]:
        """One round from the link: commits wait for the game's safe points (no time limit
        on those: a game may take long to start its loop); ``timeout`` bounds the fetch."""

        def commit(txn: "Transaction") -> None:
            future = self._rt.request_commit(txn)
            while True:
                try:
                    future.result(0.1)
                    return
                except FutureTimeout:
                    if stopped():  # the queued commit stays queued: it lands if the game ticks
                        raise HotfleetError(f"patch stack sync: stopped before {txn.id} was committed") from None

        error: Optional[HotfleetError] = None
        applied: List[str] = []
        try:
            with self._lock:
                applied = self._round(timeout, timeout, commit)
            return applied
        except BaseException as exc:
            error = exc if isinstance(exc, HotfleetError) else HotfleetError(
                f"patch stack sync failed: {type(exc).__name__}: {exc}")
            raise
        finally:
            with self._ended:
                self._rounds += 1
                self._error = error
                if error is None:
                    self._applied = applied
                    self._current.set()  # after _applied: a joiner returns what this round did
                self._ended.notify_all()

    def _round(self, within: float, timeout: float, commit: Callable[["Transaction"], object]) -> List[str]:
        wanted = self._fetch(within, timeout)
        wanted_ids = [pid for pid, _ in wanted]
        have = self._stack_ids()
        if have != wanted_ids[: len(have)]:
            log.warning("this process runs patches %s, not a prefix of the fleet's stack %s", have, wanted_ids)
        applied: List[str] = []
        for patch_id, modules in wanted:
            if patch_id in self._stack_ids():
                continue
            try:
                txn = self._rt.prepare(modules, txn_id=patch_id)
            except HotfleetError as exc:
                raise HotfleetError(f"patch stack sync: patch {patch_id} failed to prepare: {exc} "
                                    f"(applied before it: {applied or 'none'})") from exc
            try:
                commit(txn)
            except HotfleetError as exc:
                if patch_id not in self._stack_ids():  # else another path committed it: fine
                    raise HotfleetError(f"patch stack sync: patch {patch_id} failed to commit: {exc} "
                                        f"(applied before it: {applied or 'none'})") from exc
            log.info("patch stack sync: applied %s", patch_id)
            applied.append(patch_id)
        return applied

    def _stack_ids(self) -> List[str]:
        return [str(entry.id) for entry in self._rt.patch_stack]
