"""Tests of hotfleet.parts: sources joined from ``sourcePart`` pieces, checked by their end marker."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hotfleet.errors import FrameError  # noqa: E402
from hotfleet.parts import SourceParts, fill_prepare, fill_stack_reply  # noqa: E402


def piece(patch: str, module: str, text: str) -> dict:
    return {"patchId": patch, "module": module, "text": text}


def test_pieces_join_in_order_per_message() -> None:
    parts = SourceParts()
    reply, request = SourceParts.key(0, 5), SourceParts.key(5, 0)
    assert reply != request, "the agent's request 5 and the reply to our request 5 are different messages"
    for text in ("a = '", "\\u00e9\"", "'\n"):
        parts.add(reply, piece("p1", "m", text))
    parts.add(reply, {"patchId": "p1", "module": "empty"})  # proto3 JSON omits the empty text
    parts.add(request, piece("p9", "m", "x = 1\n"))
    assert parts.take(reply, {"parts": "4"}) == {"p1": {"m": "a = '\\u00e9\"'\n", "empty": ""}}
    assert parts.take(request, {"parts": 1}) == {"p9": {"m": "x = 1\n"}}


def test_a_count_that_does_not_match_is_malformed() -> None:
    parts = SourceParts()
    key = SourceParts.key(0, 1)
    parts.add(key, piece("p1", "m", "x"))
    with pytest.raises(FrameError, match="expected 2 source pieces ahead of this message, received 1"):
        parts.take(key, {"parts": 2}, 1)
    # Taken even so: a later message starts afresh.
    assert parts.take(key, {}) == {}


@pytest.mark.parametrize("bad", [{"module": "m", "text": "x"}, {"patchId": "p", "text": "x"},
                                 {"patchId": "p", "module": "m", "text": 5}])
def test_bad_pieces_are_malformed(bad: dict) -> None:
    with pytest.raises(FrameError) as info:
        SourceParts().add(SourceParts.key(3, 0), bad, 3)
    assert info.value.code == "malformed" and info.value.frame_id == 3


def test_pieces_beyond_the_cap_are_dropped_with_an_error() -> None:
    parts = SourceParts(max_pending=10)
    key = SourceParts.key(0, 1)
    parts.add(key, piece("p", "m", "x" * 8))
    with pytest.raises(FrameError, match="more than 10 bytes"):
        parts.add(key, piece("p", "m", "x" * 3))
    parts.add(key, piece("p", "m", "y" * 10))  # the cap was freed
    assert parts.take(key, {"parts": 1}) == {"p": {"m": "y" * 10}}


def test_fill_puts_sources_in_their_patches_and_refuses_strays() -> None:
    reply = fill_stack_reply({"patches": [{"patchId": "p1"}, {"patchId": "p2", "modules": {"i": "inline"}}]},
                             {"p1": {"m": "one"}, "p2": {"n": "two"}})
    assert reply["patches"] == [{"patchId": "p1", "modules": {"m": "one"}},
                                {"patchId": "p2", "modules": {"i": "inline", "n": "two"}}]
    with pytest.raises(FrameError, match="does not list: p3"):
        fill_stack_reply({"patches": [{"patchId": "p1"}]}, {"p1": {"m": "x"}, "p3": {"m": "y"}})
    assert fill_prepare({"patchId": "p1", "parts": 1}, {"p1": {"m": "x"}}, 4)["modules"] == {"m": "x"}
    with pytest.raises(FrameError, match="other patches \\(p2\\)"):
        fill_prepare({"patchId": "p1"}, {"p2": {"m": "x"}}, 4)
