"""Module sources that arrive one piece per ``sourcePart`` frame (local protocol v2).

No frame may exceed the frame limit (16 MiB of JSON), and a patch stack or a bundle can be
bigger than that once escaped. So the agent sends every module's source in pieces, each a
``sourcePart`` frame, ahead of the message they belong to: a ``prepare`` (the pieces carry
its ``id``) or a ``stackReply`` (they carry its ``replyTo``). That message is the end
marker: it counts the pieces, and only then are the sources joined and handed on. This
module owns that bookkeeping; it knows nothing about sockets, so it is tested on its own.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

from .errors import FrameError
from .frames import get_field, parse_uint

__all__ = ["SourceParts", "MAX_PENDING"]

#: Most source text held for unfinished messages at once; beyond it the agent is broken (the
#: coordinator caps a build's stack at 64 MiB of bundles).
MAX_PENDING = 256 * 1024 * 1024

#: Which message pieces belong to: ("request", its id) or ("reply", the request it answers).
Key = Tuple[str, int]


class _Pending:
    def __init__(self) -> None:
        self.count = 0
        # patch id -> module -> pieces, in arrival order
        self.pieces: Dict[str, Dict[str, List[str]]] = {}


class SourceParts:
    """Pieces received for messages whose end marker has not arrived yet."""

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self._open: Dict[Key, _Pending] = {}
        self._bytes = 0
        self._max = max_pending

    @staticmethod
    def key(frame_id: int, reply_to: int) -> Key:
        """The message a frame with this header belongs to."""
        return ("reply", reply_to) if reply_to else ("request", frame_id)

    def add(self, key: Key, body: Mapping[str, Any], frame_id: int = 0) -> None:
        """Keep one ``sourcePart`` body. Raises FrameError (malformed) on a bad piece."""
        patch_id, module, text = (get_field(body, name) for name in ("patchId", "module", "text"))
        if not isinstance(patch_id, str) or not patch_id or not isinstance(module, str) or not module:
            raise FrameError("malformed", "sourcePart needs a patchId and a module", frame_id)
        if text is None:  # proto3 JSON omits an empty string
            text = ""
        if not isinstance(text, str):
            raise FrameError("malformed", f"sourcePart text of {module!r} must be a string", frame_id)
        if self._bytes + len(text) > self._max:
            self.clear()
            raise FrameError("malformed", f"more than {self._max} bytes of source pieces without their "
                             "prepare or stackReply; dropped them all", frame_id)
        pending = self._open.setdefault(key, _Pending())
        pending.count += 1
        pending.pieces.setdefault(patch_id, {}).setdefault(module, []).append(text)
        self._bytes += len(text)

    def take(self, key: Key, end: Mapping[str, Any], frame_id: int = 0) -> Dict[str, Dict[str, str]]:
        """The joined sources (patch id -> module -> source) of the message ``end`` closes.

        Raises FrameError if ``end`` counts a different number of pieces than arrived.
        """
        pending = self._open.pop(key, None) or _Pending()
        self._bytes -= sum(len(t) for modules in pending.pieces.values() for ts in modules.values() for t in ts)
        expected = parse_uint(get_field(end, "parts"), "parts", frame_id)
        if expected != pending.count:
            raise FrameError("malformed", f"expected {expected} source pieces ahead of this message, "
                             f"received {pending.count}", frame_id)
        return {patch_id: {module: "".join(texts) for module, texts in modules.items()}
                for patch_id, modules in pending.pieces.items()}

    def clear(self) -> None:
        """Forget every unfinished message (the connection ended)."""
        self._open.clear()
        self._bytes = 0


def with_sources(patch: Mapping[str, Any], sources: Dict[str, Dict[str, str]]) -> Dict[str, Any]:
    """``patch`` (a prepare or a stack patch) with its pieces' sources in ``modules``; sources
    sent inline (as a v1 agent did) stay. Takes the patch's entry out of ``sources``."""
    patch_id = get_field(patch, "patchId")
    filled = dict(patch)
    inline = get_field(patch, "modules") or {}
    modules = dict(inline) if isinstance(inline, dict) else inline
    if isinstance(modules, dict) and isinstance(patch_id, str):
        modules.update(sources.pop(patch_id, {}))
    filled["modules"] = modules
    return filled


def fill_prepare(body: Mapping[str, Any], sources: Dict[str, Dict[str, str]], frame_id: int) -> Dict[str, Any]:
    """A ``prepare`` body with the sources its pieces carried."""
    filled = with_sources(body, sources)
    if sources:
        raise FrameError("malformed", f"source pieces of other patches ({', '.join(sorted(sources))}) "
                         f"ahead of the prepare of {get_field(body, 'patchId')!r}", frame_id)
    return filled


def fill_stack_reply(body: Mapping[str, Any], sources: Dict[str, Dict[str, str]]) -> Dict[str, Any]:
    """A ``stackReply`` body whose patches have the sources their pieces carried."""
    patches = get_field(body, "patches") or []
    if not isinstance(patches, list):
        return dict(body)  # the stack sync reports the malformed list
    filled = dict(body)
    filled["patches"] = [with_sources(p, sources) if isinstance(p, dict) else p for p in patches]
    if sources:
        raise FrameError("malformed", f"source pieces of patches the stackReply does not list: "
                         f"{', '.join(sorted(sources))}")
    return filled
