"""Model <-> protobuf for what a tool from a stock MCP server returns: content blocks, isError, progress.

Round trips go through the wire bytes (SerializeToString / FromString), as a client sees them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from toolcell.api.v1 import supervisor_pb2 as pb
from toolcell.model import Event, Progress, Result, Status, Usage
from toolcell.server.convert import (
    CONTENT_JSON_MAX_CHARS,
    content_from_json,
    content_to_json,
    event_from_pb,
    event_to_pb,
    result_from_pb,
    result_to_pb,
)

ANNOTATIONS = {"audience": ["user"], "priority": 0.5, "lastModified": "2026-01-01T00:00:00Z"}
BLOCKS: list[tuple[str, dict[str, Any]]] = [
    ("text", {"type": "text", "text": "héllo ✓ \u2028"}),
    ("text+annotations+meta", {"type": "text", "text": "x", "annotations": ANNOTATIONS, "_meta": {"k": [1, None]}}),
    ("image", {"type": "image", "data": "iVBORw0KGgo=", "mimeType": "image/png"}),
    ("audio", {"type": "audio", "data": "UklGRg==", "mimeType": "audio/wav", "annotations": ANNOTATIONS}),
    ("resource text", {"type": "resource", "resource": {"uri": "file:///a.txt", "mimeType": "text/plain",
                                                         "text": "body"}}),
    ("resource blob", {"type": "resource", "resource": {"uri": "mem://b", "blob": "AAEC"}, "_meta": {"m": 1}}),
    ("resource_link", {"type": "resource_link", "uri": "https://example.com/r", "name": "r", "title": "R",
                       "description": "d", "mimeType": "text/html", "size": 12}),
]


def result(**kw: Any) -> Result:
    base: dict[str, Any] = dict(status=Status.OK, exit_code=0, output="", stderr="", truncated=False,
                                duration_ms=5, usage=Usage(), trace_id="t" * 32, invocation_id="i")
    base.update(kw)
    return Result(**base)


def over_the_wire(event: Event) -> Event:
    return event_from_pb(pb.ExecuteEvent.FromString(event_to_pb(event).SerializeToString()))


@pytest.mark.parametrize(("kind", "block"), BLOCKS, ids=[k for k, _ in BLOCKS])
def test_every_block_type_round_trips_through_execute_and_call(kind: str, block: dict[str, Any]) -> None:
    sent = result(content=(block,), output="texts")
    streamed = over_the_wire(sent)
    unary = result_from_pb(pb.Result.FromString(result_to_pb(sent).SerializeToString()))
    assert streamed == sent and unary == sent
    assert isinstance(streamed, Result) and streamed.content == (block,)


@pytest.mark.parametrize(("content", "is_error", "status"), [
    ((), False, Status.OK),                                   # a plain tool: nothing new on the wire
    (tuple(b for _, b in BLOCKS), False, Status.OK),          # every kind at once, order kept
    (({"type": "text", "text": "no such city"},), True, Status.ERROR),  # the server's isError
])
def test_result_content_and_is_error_round_trip(content: tuple[dict[str, Any], ...], is_error: bool,
                                                 status: Status) -> None:
    sent = result(content=content, is_error=is_error, status=status, structured_content={"a": 1})
    msg = result_to_pb(sent)
    assert msg.is_error is is_error
    assert (msg.content_json == "") is (not content)
    assert over_the_wire(sent) == sent


def test_content_json_is_compact_utf8() -> None:
    text = content_to_json(({"type": "text", "text": "é"},))
    assert text == '[{"type":"text","text":"é"}]'


@pytest.mark.parametrize(("content", "expect"), [
    (({"type": "text", "text": "a\ud800b"},), '[{"type":"text","text":"a?b"}]'),  # lone surrogate
    (({"type": "text", "text": float("nan")},), "could not be encoded"),          # not JSON
    (({"type": "text", "text": object()},), "could not be encoded"),
])
def test_content_that_cannot_travel_is_reported_not_raised(content: tuple[dict[str, Any], ...], expect: str) -> None:
    text = content_to_json(content)
    assert expect in text
    pb.Result(content_json=text).SerializeToString()  # always encodable


@pytest.mark.parametrize(("wire", "notice"), [
    ("x" * (CONTENT_JSON_MAX_CHARS + 1), "over"),
    ("[{", "not JSON"),
    ("[" * 100_000 + "]" * 100_000, "not JSON"),   # nesting past the recursion limit
    ('{"type":"text"}', "not a JSON array"),
    ("[1]", "not an object with a type"),
    ('[{"text":"no type"}]', "not an object with a type"),
    ('[{"type":7}]', "not an object with a type"),
])
def test_client_parses_content_json_with_bounds(wire: str, notice: str) -> None:
    blocks = content_from_json(wire)
    assert len(blocks) == 1 and blocks[0]["type"] == "text" and notice in blocks[0]["text"]


def test_a_bad_block_is_replaced_in_place_others_kept() -> None:
    good = {"type": "image", "data": "AA==", "mimeType": "image/png"}
    blocks = content_from_json(json.dumps([good, "junk", good]))
    assert blocks[0] == good and blocks[2] == good and "not an object" in blocks[1]["text"]


@pytest.mark.parametrize("progress", [
    Progress(progress=0.0),
    Progress(progress=3, total=10, message="step 3"),
    Progress(progress=2.5, total=0.0, message=""),   # a zero total is still a total
    Progress(progress=1e300, total=None, message="ü"),
])
def test_progress_round_trips(progress: Progress) -> None:
    msg = event_to_pb(progress)
    assert msg.WhichOneof("event") == "progress"
    assert msg.progress.HasField("total") is (progress.total is not None)
    assert over_the_wire(progress) == progress
