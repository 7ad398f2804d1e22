"""Every error class of the hotfleet runtime, in one place.

The public ones (``HotfleetError`` and its subclasses) are what a game or the agent sees;
then the local protocol's errors, then the signals the runtime raises and catches itself.

Every error names *where* the problem is (module, qualified object name, line)
when that is known, and says what the operator or patch author can do about it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = [
    "HotfleetError",
    "PrepareError",
    "CommitError",
    "RollbackError",
    "FrameError",
    "FramingError",
    "HandshakeRefused",
    "StagingRefusal",
    "HookFailure",
    "InstanceHookError",
]


class HotfleetError(Exception):
    """Base class of every error the runtime raises on purpose.

    Attributes:
        message: what went wrong, in one sentence.
        module: dotted name of the module at fault, if known.
        obj: qualified name of the object at fault (``Cls.method``), if known.
        lineno: line in the module's (new) source, if known.
        hint: what to do about it.
        details: further problems found in the same operation (each a dict with
            the same keys), so one prepare reports every refusal at once.
    """

    def __init__(
        self,
        message: str,
        *,
        module: Optional[str] = None,
        obj: Optional[str] = None,
        lineno: Optional[int] = None,
        hint: Optional[str] = None,
        details: Optional[List[Dict[str, Any]]] = None,
    ) -> None:
        self.message = message
        self.module = module
        self.obj = obj
        self.lineno = lineno
        self.hint = hint
        self.details: List[Dict[str, Any]] = list(details or [])
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.module:
            where.append(f"module {self.module}")
        if self.obj:
            where.append(f"object {self.obj}")
        if self.lineno:
            where.append(f"line {self.lineno}")
        text = self.message
        if where:
            text += " [" + ", ".join(where) + "]"
        if self.hint:
            text += ": " + self.hint
        extra = [d for d in self.details if d.get("message") != self.message or d.get("obj") != self.obj]
        if extra:
            text += f" (+{len(extra)} more: " + "; ".join(
                f"{d.get('module')}:{d.get('obj') or '-'}:{d.get('lineno') or '-'} {d.get('message')}" for d in extra[:5]
            ) + ")"
        return text

    def to_dict(self) -> Dict[str, Any]:
        """Return a JSON-able description (what the agent sends upstream)."""
        return {
            "error": type(self).__name__,
            "message": self.message,
            "module": self.module,
            "obj": self.obj,
            "lineno": self.lineno,
            "hint": self.hint,
            "details": list(self.details),
        }


class PrepareError(HotfleetError):
    """A patch cannot be prepared; nothing live was touched."""


class CommitError(HotfleetError):
    """A commit failed or was refused; the process is exactly as before the commit."""


class RollbackError(HotfleetError):
    """A rollback was refused (nothing to roll back, wrong expected id) or partly failed."""


# -- the local protocol (frames.py, agent_link.py) -------------------------------------


class FrameError(Exception):
    """A frame whose framing was fine but whose content is not a valid request.

    The connection survives: the link answers with a ``ProtocolError`` carrying ``code``
    and, when the frame's id could be read, ``reply_to`` set to it.
    """

    def __init__(self, code: str, message: str, frame_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.frame_id = frame_id


class FramingError(Exception):
    """The byte stream itself is broken (oversized length): the connection must close."""


class HandshakeRefused(Exception):
    """The agent refused this runtime's ``hello``; ``permanent`` when retrying cannot help
    (a protocol version mismatch)."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


# -- internal signals: raised and caught inside the runtime, never seen by a game -------


class StagingRefusal(Exception):
    """Internal: a statement cannot be staged (the stager turns it into a plan refusal)."""

    def __init__(self, message: str, lineno: Optional[int] = None, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.lineno = lineno
        self.hint = hint


class HookFailure(Exception):
    """Internal: a hook raised; carries where."""

    def __init__(self, module: str, obj: str, lineno: Optional[int]) -> None:
        super().__init__(obj)
        self.module = module
        self.obj = obj
        self.lineno = lineno


class InstanceHookError(Exception):
    """Internal: an instance hook raised (``__cause__``) on ``obj``."""

    def __init__(self, obj: Any) -> None:
        super().__init__()
        self.obj = obj
