"""The local protocol's frame codec: what goes over the runtime <-> agent Unix socket.

Defined in ``proto/hotfleet/v1/runtime.proto``: each frame is a 4-byte big-endian length
followed by that many bytes of UTF-8 JSON holding one ``RuntimeFrame`` in the proto3 JSON
mapping (lowerCamelCase names, the oneof body as a field, 64-bit integers as numbers or
strings). This module owns the framing, the limits and the field helpers; it knows nothing
about sockets or threads, so it is tested byte for byte on its own.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Mapping, Tuple

from .errors import FrameError, FramingError

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_FRAME",
    "MAX_DETAIL",
    "BODY_NAMES",
    "FrameError",
    "FramingError",
    "FrameReader",
    "encode_frame",
    "decode_frame",
    "decode_frame_traced",
    "parse_uint",
    "get_field",
]

#: RUNTIME_PROTOCOL_VERSION in runtime.proto. 2: module sources travel in ``sourcePart``
#: pieces (:mod:`hotfleet.parts`); a v1 runtime would refuse them, so the agent refuses it.
PROTOCOL_VERSION = 2
#: Frames larger than this (the encoded, JSON-escaped bytes) are a protocol error and close
#: the connection (runtime.proto).
MAX_FRAME = 16 * 1024 * 1024

#: Largest ``detailJson`` the link sends; a bigger plan is replaced by a summary so a
#: reply can never exceed the frame limit and cost the connection.
MAX_DETAIL = 1024 * 1024

_UINT64_MAX = 2**64 - 1
_LEN = 4

#: The oneof ``body`` of RuntimeFrame, in JSON (lowerCamelCase) spelling.
BODY_NAMES = frozenset({
    "hello", "welcome", "prepare", "prepareResult", "commit", "commitResult", "abort",
    "abortResult", "rollback", "rollbackResult", "healthQuery", "health", "statusQuery",
    "status", "stackQuery", "stackReply", "sourcePart", "error",
})


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def get_field(msg: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """Field ``name`` (lowerCamelCase) of a decoded message; proto3 JSON parsers must also
    accept the original snake_case name, so this does too."""
    if name in msg:
        return msg[name]
    return msg.get(_snake(name), default)


def parse_uint(value: Any, what: str, frame_id: int = 0) -> int:
    """A proto3 JSON unsigned integer: a number or a decimal string (64-bit ints often are)."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise FrameError("malformed", f"{what} must be an unsigned integer, not a boolean", frame_id)
    if isinstance(value, int):
        result = value
    elif isinstance(value, float) and value.is_integer():
        result = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        result = int(value.strip())
    else:
        raise FrameError("malformed", f"{what} must be an unsigned integer, got {value!r}", frame_id)
    if not 0 <= result <= _UINT64_MAX:
        raise FrameError("malformed", f"{what} out of range: {value!r}", frame_id)
    return result


def encode_frame(frame: Mapping[str, Any]) -> bytes:
    """One frame on the wire: 4-byte big-endian length, then compact UTF-8 JSON."""
    payload = json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME}-byte limit")
    return len(payload).to_bytes(_LEN, "big") + payload


# A W3C traceparent is 55 characters; anything much longer is not one.
_MAX_TRACEPARENT = 128


def decode_frame(payload: bytes) -> Tuple[int, int, str, Dict[str, Any]]:
    """Decode one frame's JSON into ``(id, reply_to, body_name, body)``
    (see :func:`decode_frame_traced`, which also returns its trace context)."""
    frame_id, reply_to, name, body, _ = decode_frame_traced(payload)
    return frame_id, reply_to, name, body


def decode_frame_traced(payload: bytes) -> Tuple[int, int, str, Dict[str, Any], str]:
    """Decode one frame's JSON into ``(id, reply_to, body_name, body, traceparent)``.

    ``traceparent`` is the W3C trace context the agent sent with a request (empty
    when it traces nothing, or when malformed): the runtime only hands it back
    with its reply, so its timings join the agent's trace.

    Raises FrameError with code ``malformed`` (not UTF-8 JSON, not an object, bad ids,
    no body or two bodies) or ``unknown`` (a body this protocol version does not define).
    Unknown fields next to a known body are ignored, as proto3 JSON allows, so a newer
    agent may add fields without breaking this runtime.
    """
    try:
        frame = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FrameError("malformed", f"frame is not UTF-8: {exc}") from None
    except ValueError as exc:
        raise FrameError("malformed", f"frame is not JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise FrameError("malformed", f"frame must be a JSON object, got {type(frame).__name__}")
    frame_id = 0
    try:
        frame_id = parse_uint(get_field(frame, "id"), "id")
    except FrameError as exc:
        raise FrameError(exc.code, str(exc)) from None
    reply_to = parse_uint(get_field(frame, "replyTo"), "replyTo", frame_id)
    bodies: List[str] = []
    unknown: List[str] = []
    for key in frame:
        if key in ("id", "replyTo", "reply_to", "traceparent"):
            continue
        name = _camel(key)
        (bodies if name in BODY_NAMES else unknown).append(name)
    if not bodies:
        if unknown:
            raise FrameError("unknown", f"unknown message type {', '.join(sorted(unknown))}", frame_id)
        raise FrameError("malformed", "frame has no message body", frame_id)
    if len(bodies) > 1:
        raise FrameError("malformed", f"frame has {len(bodies)} bodies ({', '.join(sorted(bodies))}); "
                         "a RuntimeFrame carries exactly one", frame_id)
    name = bodies[0]
    body = frame.get(name, frame.get(_snake(name)))
    if body is None:  # proto3 JSON: null is the default (empty) message
        body = {}
    if not isinstance(body, dict):
        raise FrameError("malformed", f"{name} must be a JSON object", frame_id)
    traceparent = frame.get("traceparent")
    if not isinstance(traceparent, str) or len(traceparent) > _MAX_TRACEPARENT:
        traceparent = ""
    return frame_id, reply_to, name, body, traceparent


class FrameReader:
    """Reassembles frames from a byte stream."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> List[bytes]:
        """Add received bytes; returns every complete frame payload, in order.

        Raises FramingError on a length prefix above the limit: after that the stream
        cannot be trusted, so the caller closes the connection.
        """
        self._buf += data
        frames: List[bytes] = []
        while len(self._buf) >= _LEN:
            size = int.from_bytes(self._buf[:_LEN], "big")
            if size > self._max:
                raise FramingError(f"frame length {size} exceeds the {self._max}-byte limit")
            if len(self._buf) < _LEN + size:
                break
            frames.append(bytes(self._buf[_LEN:_LEN + size]))
            del self._buf[:_LEN + size]
        return frames

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)


def finite(value: Any) -> float:
    """A float JSON can carry (proto3 JSON allows NaN only as a string; avoid it)."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        return 0.0
    return result if math.isfinite(result) else 0.0


def uint(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def detail_json(obj: Any) -> str:
    """JSON text of a plan or report for ``detailJson``, bounded in size."""
    try:
        text = json.dumps(obj, default=str, allow_nan=False)
    except (TypeError, ValueError) as exc:
        text = json.dumps({"unserializable": repr(exc)})
    if len(text) > MAX_DETAIL:
        text = json.dumps({"truncated": True, "bytes": len(text)})
    return text


def error_detail_json(exc: BaseException) -> str:
    """``detailJson`` of a failure: the error's structured form (module, object, line, hint)."""
    to_dict = getattr(exc, "to_dict", None)
    if callable(to_dict):
        try:
            return detail_json(to_dict())
        except Exception:  # a broken to_dict must not cost the reply
            pass
    return detail_json({"error": type(exc).__name__, "message": str(exc)})


def require_str(body: Mapping[str, Any], name: str, frame_id: int = 0) -> str:
    value = get_field(body, name)
    if not isinstance(value, str) or not value:
        raise FrameError("malformed", f"{name} must be a non-empty string", frame_id)
    return value


def require_modules(body: Mapping[str, Any], frame_id: int = 0) -> Dict[str, str]:
    modules = get_field(body, "modules")
    if not isinstance(modules, dict) or not modules:
        raise FrameError("malformed", "modules must be a non-empty map of module name to source", frame_id)
    for name, source in modules.items():
        if not isinstance(source, str):
            raise FrameError("malformed", f"modules[{name!r}] must be a string (the module's source)", frame_id)
    return dict(modules)
