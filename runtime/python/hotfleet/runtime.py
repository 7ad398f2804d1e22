"""The ``Runtime``: the in-process half of hotfleet a game server creates once.

>>> rt = hotfleet.Runtime(packages=["zone"])
>>> rt.connect()                      # local agent (agent_link)
>>> while running:
...     with rt.tick():               # or game.tick(); rt.safe_point()
...         game.tick()
"""

from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import json
import logging
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .courtesy import for_thread
from .errors import CommitError, HotfleetError, PrepareError, RollbackError
from .health import GameHealth, HealthMonitor
from .instances import InstanceTracker, hook_classes
from .plan import Plan
from .revert import RevertRecord, revert_id, revert_sources
from .safepoint import Request, RequestQueue
from .snapshot import Journal
from .sources import RecordingFinder, SourceRegistry, iter_managed_modules, read_live_source, verify_record
from .staging import Stager
from .transaction import (
    ABORTED,
    COMMITTED,
    FAILED,
    PREPARED,
    ROLLED_BACK,
    CommitReport,
    CommitTarget,
    Transaction,
    apply_transaction,
)

log = logging.getLogger("hotfleet")

__all__ = ["Runtime", "StackEntry", "RollbackReport", "canonical_id"]


def canonical_id(sources: Mapping[str, str]) -> str:
    """Default transaction id: sha256 of the sources in a canonical JSON form."""
    blob = json.dumps(sorted(sources.items()), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class StackEntry:
    """One committed transaction on the patch stack."""

    id: str
    digests: Dict[str, str]
    base_digests: Dict[str, Optional[str]]
    committed_at: float
    report: CommitReport
    txn: Transaction = field(repr=False)
    journal: Journal = field(repr=False)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form."""
        return {
            "id": self.id,
            "digests": dict(self.digests),
            "base_digests": dict(self.base_digests),
            "committed_at": self.committed_at,
            "modules": sorted(self.digests),
            "pause_ms": round(self.report.pause_ms, 4),
        }


@dataclass
class RollbackReport:
    """What a rollback restored, and the data it left alone."""

    txn_id: str
    pause_ms: float
    restored_digests: Dict[str, Optional[str]]
    conflicts: List[Dict[str, str]] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form."""
        return {
            "txn_id": self.txn_id,
            "pause_ms": round(self.pause_ms, 4),
            "restored_digests": dict(self.restored_digests),
            "conflicts": list(self.conflicts),
            "errors": list(self.errors),
        }


def _undo(journal: Journal) -> Tuple[List[Any], List[str], float]:
    """Undo ``journal`` non-strictly: (conflicts, errors, pause in ms). The collector is off
    meanwhile, as in commit, so the pause does not grow with the heap."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    t0 = time.perf_counter()
    try:
        conflicts, errors = journal.undo(strict=False)
    finally:
        pause = (time.perf_counter() - t0) * 1000.0
        if gc_was_enabled:
            gc.enable()
    return conflicts, errors, pause


class _Tick:
    """Context manager returned by ``Runtime.tick()``."""

    __slots__ = ("_rt", "_t0")

    def __init__(self, rt: "Runtime") -> None:
        self._rt = rt
        self._t0 = 0.0

    def __enter__(self) -> "_Tick":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        rt = self._rt
        if exc is not None and isinstance(exc, Exception):
            rt._health.exception(exc)
        rt._health.tick_done(time.perf_counter() - self._t0)
        rt.safe_point()
        # returning None re-raises the tick's exception


_OPEN: "weakref.WeakSet[Runtime]" = weakref.WeakSet()


class Runtime:
    """Transactional in-place hot reload for the modules of ``packages``.

    Args:
        packages: top-level packages (or modules) whose modules may be patched.
        health: optional game callback ``() -> bool | (bool, str) | dict`` for ``health()``.
        tick_window: how many recent tick durations the percentiles cover.
        stale_after: seconds without a tick or safe point after which ``health()["alive"]`` is False.
    """

    _registry: SourceRegistry

    def __init__(
        self,
        packages: Union[str, Sequence[str]],
        health: Optional[GameHealth] = None,
        *,
        tick_window: int = 1024,
        stale_after: float = 5.0,
    ) -> None:
        if isinstance(packages, str):
            packages = [packages]
        pkgs = [p for p in packages]
        if not pkgs or not all(isinstance(p, str) and p and not p.startswith(".") for p in pkgs):
            raise HotfleetError("packages must be a non-empty list of dotted names", hint='e.g. Runtime(packages=["zone"])')
        for p in pkgs:
            if p == "hotfleet" or p.startswith("hotfleet."):
                raise HotfleetError("the hotfleet runtime cannot manage itself", obj=p)
        for other in list(_OPEN):
            for p in pkgs:
                for q in other._registry.packages:
                    if p == q or p.startswith(q + ".") or q.startswith(p + "."):
                        raise HotfleetError(
                            f"package {p} is already managed by another open Runtime", obj=p, hint="close() the other runtime first"
                        )
        self._registry = SourceRegistry(pkgs, on_loaded=self._on_loaded)
        self._tracker = InstanceTracker()
        self._health = HealthMonitor(health, window=tick_window, stale_after=stale_after)
        self._queue = RequestQueue()
        self._lock = threading.RLock()
        self._commit_lock = threading.RLock()
        self._pending: Optional[Transaction] = None
        self._preparing: Optional[str] = None
        self._stack: List[StackEntry] = []
        self._txns: Dict[str, Transaction] = {}
        # reverted patch id -> its committed revert, until undone or the patch comes back
        self._reverted: Dict[str, RevertRecord] = {}
        self._game_thread: Optional[int] = None
        self._in_safe_point = False
        self._closed = False
        self._link: Any = None  # the AgentLink of connect(), if any
        self.unpatchable: Dict[str, str] = {}
        for name, module in iter_managed_modules(pkgs):
            record, reason = read_live_source(module)
            if record is not None:
                reason = verify_record(module, record)
            if record is None or reason is not None:
                self.unpatchable[name] = reason or "no source"
                log.warning("%s cannot be patched: %s", name, self.unpatchable[name])
            else:
                self._registry.set(record)
        self._finder = RecordingFinder(self._registry)
        self._finder.install()
        self._commit_target = CommitTarget(self._registry, self._tracker, self._finder)
        _OPEN.add(self)
        classes: List[type] = []
        for name in self._registry.names():
            loaded = sys.modules.get(name)
            if loaded is not None:
                classes.extend(hook_classes(loaded.__dict__, name))
        found = self._tracker.instrument(classes)
        log.info(
            "runtime for %s: %d modules recorded, %d instance-hook classes tracked (%d existing instances)",
            pkgs,
            len(self._registry.names()),
            len(classes),
            found,
        )

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Stop recording imports (the patch stack and live code stay as they are)."""
        if self._closed:
            return
        self._closed = True
        self._finder.uninstall()
        _OPEN.discard(self)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _on_loaded(self, module: Any) -> None:
        classes = hook_classes(module.__dict__, module.__name__)
        if classes:
            self._tracker.instrument(classes)

    # -- introspection -----------------------------------------------------------

    @property
    def packages(self) -> List[str]:
        """The managed packages."""
        return list(self._registry.packages)

    @property
    def patch_stack(self) -> List[StackEntry]:
        """Committed transactions, oldest first."""
        with self._lock:
            return list(self._stack)

    @property
    def pending(self) -> Optional[Transaction]:
        """The prepared transaction waiting for commit or abort, if any."""
        with self._lock:
            return self._pending

    def transaction(self, txn_id: str) -> Optional[Transaction]:
        """A pending or committed (still on the stack) transaction by id."""
        with self._lock:
            return self._txns.get(txn_id)

    def prepared(self, txn_id: str) -> Optional[Transaction]:
        """The transaction ``txn_id`` if it is prepared (waiting for commit or abort), else None.

        The runtime is the one owner of transaction state: the agent link asks here by
        patch id rather than keeping its own map.
        """
        with self._lock:
            txn = self._txns.get(txn_id)
            return txn if txn is not None and txn.state == PREPARED else None

    def live_digests(self) -> Dict[str, str]:
        """Module -> sha256 of the source it runs, as recorded by the runtime."""
        return self._registry.digests()

    def live_source(self, module: str) -> Optional[str]:
        """The recorded source text ``module`` runs (None if unknown)."""
        record = self._registry.get(module)
        return record.text if record is not None else None

    def managed_modules(self) -> List[str]:
        """Names of the managed modules whose source is recorded (patchable)."""
        return self._registry.names()

    # -- prepare / commit / abort / rollback ----------------------------------------

    def prepare(self, sources: Mapping[str, str], txn_id: Optional[str] = None) -> Transaction:
        """Diff, compile and stage ``sources`` (module -> full new text); nothing live is touched.

        Preparing an id that is already prepared (or committed) with the same
        sources returns the same transaction.  One transaction may be pending
        at a time.
        """
        if not isinstance(sources, Mapping) or not sources:
            raise PrepareError("sources must be a non-empty mapping of module name to source text")
        for key in sources:
            if not isinstance(key, str) or not key:
                raise PrepareError(f"bad module name {key!r}")
        sources = dict(sources)
        txn_id = txn_id or canonical_id(sources)
        with self._lock:
            if self._closed:
                raise PrepareError("the runtime is closed")
            existing = self._txns.get(txn_id)
            if existing is not None:
                if existing.sources != sources:
                    raise PrepareError(
                        f"transaction id {txn_id} is already {existing.state} with different sources", hint="use a new id"
                    )
                return existing
            if self._pending is not None:
                raise PrepareError(
                    f"transaction {self._pending.id} is still pending",
                    hint="commit or abort it before preparing another one",
                )
            if self._preparing is not None:
                raise PrepareError(f"transaction {self._preparing} is being prepared", hint="wait for it")
            self._preparing = txn_id
        try:
            t0 = time.perf_counter()
            # Off the game thread: shrink what earlier commits recorded about
            # instance hooks to the attributes that actually changed.
            courtesy = for_thread(self._game_thread)
            for entry in self.patch_stack:
                entry.journal.compact(courtesy)
            stages = Stager(self._registry, self._tracker, sources, self.unpatchable, courtesy).run()
            plan = Plan(txn_id, [st.plan for st in stages])
            refusals = plan.refusals
            if refusals:
                first = refusals[0]
                raise PrepareError(
                    first.message,
                    module=first.module,
                    obj=first.obj,
                    lineno=first.lineno,
                    hint=first.hint or None,
                    details=[r.to_dict() for r in refusals],
                )
            txn = Transaction(self, txn_id, sources, stages, plan)
            with self._lock:
                self._pending = txn
                self._txns[txn_id] = txn
            log.info("prepared %s in %.1f ms: %s", txn_id[:16], (time.perf_counter() - t0) * 1000, plan.counts())
            return txn
        except PrepareError as exc:
            log.warning("prepare of %s refused: %s", txn_id[:16], exc)
            raise
        except Exception as exc:  # an internal problem must still leave everything untouched
            log.exception("prepare of %s failed", txn_id[:16])
            raise PrepareError(f"prepare failed: {type(exc).__name__}: {exc}") from exc
        finally:
            with self._lock:
                self._preparing = None

    def prepare_revert(self, patch_id: str) -> Transaction:
        """Stage taking ``patch_id`` off the stack (see :mod:`hotfleet.revert`); nothing live
        is touched. Its commit restores the patch's modules and removes its stack entry."""
        with self._lock:
            stack = list(self._stack)
        sources, added = revert_sources(stack, patch_id)
        txn = self.prepare(sources, txn_id=revert_id(patch_id))
        txn.reverts = patch_id
        txn.plan.notes = [
            f"reverts patch {patch_id}: restores code, not instance data its hooks migrated"
        ] + [f"module {name} was added by the patch and stays loaded, unreferenced" for name in added]
        return txn

    def reverted(self, patch_id: str) -> Optional[RevertRecord]:
        """The committed revert of ``patch_id``, if it is in force."""
        with self._lock:
            return self._reverted.get(patch_id)

    def _check_thread(self, what: str, error: type) -> None:
        game = self._game_thread
        if game is not None and game != threading.get_ident():
            raise error(
                f"{what} must run on the game thread (the thread that calls safe_point)",
                hint=f"use request_{what}() from other threads",
            )

    def commit_transaction(self, txn: Transaction) -> CommitReport:
        """What :meth:`Transaction.commit` runs: apply ``txn`` (game thread only)."""
        self._check_thread("commit", CommitError)
        with self._commit_lock:
            with self._lock:
                if txn.owner is not self:
                    raise CommitError("transaction belongs to another runtime")
                if txn.state != PREPARED:
                    raise CommitError(
                        f"transaction {txn.id} is {txn.state}; only a prepared transaction can be committed",
                        hint="prepare the patch again" if txn.state in (ABORTED, FAILED, ROLLED_BACK) else None,
                    )
            reverts = txn.reverts
            if reverts is not None and not any(e.id == reverts for e in self.patch_stack):
                with self._lock:
                    self._settle(txn, FAILED)
                raise CommitError(f"patch {reverts} left the patch stack since the revert was prepared")
            try:
                report, journal = apply_transaction(self._commit_target, txn)
            except CommitError as exc:
                with self._lock:
                    txn.error = exc
                    self._settle(txn, FAILED)
                log.error("commit of %s failed: %s", txn.id[:16], exc)
                raise
            with self._lock:
                txn.report = report
                self._settle(txn, COMMITTED)
                if reverts is not None:
                    self._take_off(txn, reverts, report, journal)
                else:
                    self._reverted.pop(txn.id, None)
                    self._stack.append(
                        StackEntry(txn.id, txn.digests, txn.base_digests, report.committed_at, report, txn, journal)
                    )
            log.info("committed %s, pause %.3f ms, %s", txn.id[:16], report.pause_ms, report.counts)
            return report

    def _take_off(self, txn: Transaction, patch_id: str, report: CommitReport, journal: Journal) -> None:
        """A revert committed (the caller holds ``_lock``): its patch leaves the stack, and
        what undoes the revert is kept instead of the revert's own stack entry."""
        index = next(i for i, e in enumerate(self._stack) if e.id == patch_id)
        entry = self._stack.pop(index)
        entry.txn.state = ROLLED_BACK
        self._txns.pop(patch_id, None)
        self._txns.pop(txn.id, None)
        self._reverted[patch_id] = RevertRecord(index, entry, txn, journal, report)

    def undo_revert(self, patch_id: str) -> RollbackReport:
        """Undo the committed revert of ``patch_id`` exactly: its code back, its stack entry
        back where it was (game thread only). Data changed since is kept, as a conflict."""
        self._check_thread("rollback", RollbackError)
        with self._commit_lock:
            with self._lock:
                record = self._reverted.get(patch_id)
            if record is None:
                raise RollbackError(f"patch {patch_id} has no revert in force in this process")
            conflicts, errors, pause = _undo(record.journal)
            with self._lock:
                del self._reverted[patch_id]
                record.txn.state = ROLLED_BACK
                record.entry.txn.state = COMMITTED
                self._stack.insert(min(record.index, len(self._stack)), record.entry)
                self._txns[patch_id] = record.entry.txn
            report = RollbackReport(
                record.txn.id, pause, dict(record.txn.base_digests), [c.to_dict() for c in conflicts], errors
            )
            if errors:
                raise RollbackError(
                    f"undoing the revert of {patch_id} could not restore everything: {errors[0]}",
                    details=[{"message": e} for e in errors],
                    hint="the process may be inconsistent; restart it",
                )
            log.info("undid the revert of %s, pause %.3f ms", patch_id[:16], pause)
            return report

    def request_undo_revert(self, patch_id: str) -> "concurrent.futures.Future[RollbackReport]":
        """Queue :meth:`undo_revert` for the next safe point (any thread); returns a future."""
        future: "concurrent.futures.Future[RollbackReport]" = concurrent.futures.Future()
        self._queue.put(Request("unrevert", patch_id, future))
        return future

    def _settle(self, txn: Transaction, state: str) -> None:
        """``txn`` leaves the prepared state (the caller holds ``_lock``); only a committed
        transaction stays findable by id, as long as it is on the stack."""
        txn.state = state
        if self._pending is txn:
            self._pending = None
        if state != COMMITTED:
            self._txns.pop(txn.id, None)

    def abort_transaction(self, txn: Transaction) -> None:
        """What :meth:`Transaction.abort` runs: drop a prepared ``txn`` and fail its queued commit."""
        with self._lock:
            if txn.state in (ABORTED, FAILED):
                return
            if txn.state != PREPARED:
                raise HotfleetError(f"transaction {txn.id} is {txn.state}; it cannot be aborted", hint="use rollback() for committed transactions")
            self._settle(txn, ABORTED)
        queued = self._queue.find("commit", txn)
        if queued is not None and self._queue.remove(queued):
            queued.future.set_exception(CommitError(f"transaction {txn.id} was aborted before its commit ran"))
        log.info("aborted %s", txn.id[:16])

    def rollback(self) -> RollbackReport:
        """Undo the newest committed transaction exactly (code, data hooks changed, added modules).

        Data the game changed after the commit is kept and reported as a conflict.
        """
        self._check_thread("rollback", RollbackError)
        with self._commit_lock:
            with self._lock:
                if not self._stack:
                    raise RollbackError("nothing to roll back: the patch stack is empty")
                entry = self._stack[-1]
            conflicts, errors, pause = _undo(entry.journal)
            with self._lock:
                self._stack.pop()
                entry.txn.state = ROLLED_BACK
                self._txns.pop(entry.id, None)
            report = RollbackReport(
                entry.id, pause, dict(entry.base_digests), [c.to_dict() for c in conflicts], errors
            )
            if errors:
                log.error("rollback of %s had errors: %s", entry.id[:16], errors)
                raise RollbackError(
                    f"rollback of {entry.id} could not restore everything: {errors[0]}",
                    details=[{"message": e} for e in errors],
                    hint="the process may be inconsistent; restart it",
                )
            log.info("rolled back %s, pause %.3f ms, %d conflicts", entry.id[:16], pause, len(conflicts))
            return report

    # -- requests from other threads, safe points ----------------------------------

    def request_commit(self, txn: Transaction) -> "concurrent.futures.Future[CommitReport]":
        """Queue ``txn``'s commit for the next safe point (any thread); returns a future.

        The future resolves with the :class:`CommitReport` or fails with
        :class:`CommitError`.  Requesting the same transaction twice returns
        the same future.
        """
        if not isinstance(txn, Transaction) or txn.owner is not self:
            raise CommitError("not a transaction of this runtime")
        with self._lock:
            if txn.state != PREPARED:
                raise CommitError(f"transaction {txn.id} is {txn.state}; only a prepared transaction can be committed")
        queued = self._queue.find("commit", txn)
        if queued is not None:
            return queued.future
        future: "concurrent.futures.Future[CommitReport]" = concurrent.futures.Future()
        self._queue.put(Request("commit", txn, future))
        return future

    def request_rollback(self, expected_id: Optional[str] = None) -> "concurrent.futures.Future[RollbackReport]":
        """Queue a rollback of the newest transaction for the next safe point (any thread).

        With ``expected_id`` the rollback fails (``RollbackError``) unless
        the newest stack entry has that id, which makes retries safe.
        """
        future: "concurrent.futures.Future[RollbackReport]" = concurrent.futures.Future()
        self._queue.put(Request("rollback", expected_id, future))
        return future

    def safe_point(self) -> int:
        """Run queued commits and rollbacks; call once per tick on the game thread.

        Returns how many requests ran.  Cheap when nothing is queued.
        """
        self._game_thread = threading.get_ident()
        self._health.beat()
        if self._in_safe_point or not len(self._queue):
            return 0
        self._in_safe_point = True
        ran = 0
        try:
            for request in self._queue.drain():
                if not request.future.set_running_or_notify_cancel():
                    continue
                try:
                    if request.kind == "commit":
                        result: Any = self.commit_transaction(request.target)
                    elif request.kind == "unrevert":
                        result = self.undo_revert(request.target)
                    else:
                        expected = request.target
                        with self._lock:
                            newest = self._stack[-1].id if self._stack else None
                        if expected is not None and newest != expected:
                            raise RollbackError(
                                f"newest patch is {newest}, not {expected}",
                                hint="it was probably rolled back already",
                            )
                        result = self.rollback()
                except BaseException as exc:
                    request.future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    request.future.set_result(result)
                ran += 1
        finally:
            self._in_safe_point = False
        return ran

    def tick(self) -> _Tick:
        """``with rt.tick(): game.tick()``: times the tick, records an unhandled
        exception (and re-raises it), then runs the safe point."""
        return _Tick(self)

    # -- health ----------------------------------------------------------------

    def record_tick(self, seconds: float) -> None:
        """Count a completed tick that took ``seconds`` (``with rt.tick():`` and the loop
        helpers do this; a loop that times its own ticks calls it once per tick)."""
        self._health.tick_done(max(0.0, float(seconds)))

    def record_exception(self, exc: BaseException) -> None:
        """Count an exception the game caught itself (it shows in ``health()``)."""
        self._health.exception(exc)

    def mark(self) -> int:
        """Current tick/exception mark, for a later ``health(since=mark)``."""
        return self._health.mark()

    def health(self, since: Optional[int] = None) -> Dict[str, Any]:
        """Health figures (see README): alive, ticks, tick percentiles, exceptions since ``since``, game callback."""
        out = self._health.snapshot(since)
        with self._lock:
            out["patch_stack"] = [e.id for e in self._stack]
            out["pending"] = self._pending.id if self._pending is not None else None
        out["queued"] = len(self._queue)
        return out

    # -- agent ------------------------------------------------------------------

    def connect(self, socket_path: Optional[str] = None) -> Any:
        """Connect to the local hotfleet agent (starts the agent link's thread); returns the link.

        Once connected, the link fetches this build's patch stack from the agent and applies
        what this process lacks: the commits land at the game's next safe points, before
        anything else the agent asks. ``wait_until_current()`` waits for that.
        """
        from .agent_link import AgentLink  # lazy: the link is optional for embedding/tests

        link = AgentLink(self, socket_path, sync_stack=True).start()
        self._link = link
        return link

    def wait_until_current(self, timeout: Optional[float] = None) -> bool:
        """Wait until this process runs its build's whole patch stack; False on timeout.

        For games that must not open their player port before: call it on the game thread
        after ``connect()`` and before the game loop (it runs the safe points the stack's
        commits need meanwhile). From another thread while the game loop runs, it only waits.
        """
        link = self._link
        if link is None:
            raise HotfleetError("not connected to a hotfleet agent", hint="call rt.connect() first")
        return bool(link.wait_until_current(timeout))

    def is_game_thread(self) -> bool:
        """True on the thread that runs safe points, and on any thread before the first one."""
        game = self._game_thread
        return game is None or game == threading.get_ident()

    def __repr__(self) -> str:
        return f"<hotfleet.Runtime packages={self.packages} stack={len(self._stack)}>"
