"""A stock MCP server's CallToolResult and progress, carried by `toolcell mcp` to the MCP client.

Mapping tests call the adapter with Result values; the end-to-end rows run the real SDK client against
the adapter's server in memory, with a scripted supervisor client in place of the gRPC one.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Mapping
from typing import Any, cast

import mcp_types as types
import pytest
from mcp.client.client import Client as McpClient

from toolcell.client import Client
from toolcell.mcp import SandboxedTools, call_result, mcp_tool, server
from toolcell.mcp.adapter import ProgressRelay
from toolcell.model import Event, Progress, Result, Started, Status, Tool, Usage
from toolcell.server.convert import tool_from_pb, tool_to_pb

ANNOTATIONS = {"audience": ["user", "assistant"], "priority": 0.5}
BLOCKS: list[tuple[str, dict[str, Any], type[Any]]] = [
    ("text", {"type": "text", "text": "hi", "annotations": ANNOTATIONS, "_meta": {"k": 1}}, types.TextContent),
    ("image", {"type": "image", "data": "iVBORw0KGgo=", "mimeType": "image/png"}, types.ImageContent),
    ("audio", {"type": "audio", "data": "UklGRg==", "mimeType": "audio/wav"}, types.AudioContent),
    ("resource text", {"type": "resource", "resource": {"uri": "file:///a.txt", "mimeType": "text/plain",
                                                         "text": "body"}}, types.EmbeddedResource),
    ("resource blob", {"type": "resource", "resource": {"uri": "mem://b", "blob": "AAEC"}}, types.EmbeddedResource),
    ("resource_link", {"type": "resource_link", "uri": "https://example.com/r", "name": "r", "title": "R",
                       "mimeType": "text/html", "size": 12}, types.ResourceLink),
]
SCHEMA = {"type": "object", "properties": {"t": {"type": "string"}}, "required": ["t"]}


def result(status: Status = Status.OK, **kw: Any) -> Result:
    base: dict[str, Any] = dict(status=status, exit_code=0, output="", stderr="", truncated=False,
                                duration_ms=5, usage=Usage(), trace_id="t" * 32, invocation_id="mcp_1")
    base.update(kw)
    return Result(**base)


def tool(output_schema: Mapping[str, Any] | None = None) -> Tool:
    return Tool(name="time.now", description="The time", image="", command=(), title="Now",
                input_schema={"type": "object"}, output_schema=output_schema,
                annotations={"readOnlyHint": True, "openWorldHint": False, "title": "Current time"})


def wire(block: types.ContentBlock) -> dict[str, Any]:
    return block.model_dump(by_alias=True, exclude_none=True, mode="json")


@pytest.mark.parametrize(("kind", "block", "model"), BLOCKS, ids=[k for k, _, _ in BLOCKS])
def test_each_block_type_becomes_the_sdk_type_unchanged(kind: str, block: dict[str, Any], model: type[Any]) -> None:
    r = call_result(tool(), result(content=(block,), output="texts"))
    assert r.is_error is False and len(r.content) == 1
    assert isinstance(r.content[0], model) and wire(r.content[0]) == block


@pytest.mark.parametrize(("block", "says"), [
    ({"type": "video", "data": "AA=="}, "type MCP does not know: video"),
    ({"text": "no type"}, "type MCP does not know: (none)"),
    ({"type": "image", "data": "AA=="}, "(image) is not valid MCP content: mimeType"),
    ({"type": "resource", "resource": {"text": "no uri"}}, "(resource) is not valid MCP content: resource"),
    ({"type": "resource_link", "uri": "x:y"}, "(resource_link) is not valid MCP content: name"),
    ({"type": "text", "text": 7}, "(text) is not valid MCP content: text"),
    ({"type": "\x1b[31m" + "t" * 500}, "type MCP does not know: \\x1b[31mttt"),
])
def test_a_block_the_sdk_rejects_becomes_a_text_block_in_its_place(block: dict[str, Any], says: str) -> None:
    good = {"type": "text", "text": "kept"}
    r = call_result(tool(), result(content=(good, block, good)))
    assert [wire(b) for b in (r.content[0], r.content[2])] == [good, good]
    notice = r.content[1]
    assert isinstance(notice, types.TextContent) and "content block 1" in notice.text and says in notice.text
    assert len(notice.text) < 300 and "\x1b" not in notice.text


@pytest.mark.parametrize(("res", "is_error", "first"), [
    # The server's own isError: its blocks as they are, so the model can correct itself.
    (result(Status.ERROR, content=({"type": "text", "text": "no such zone"},), is_error=True), True, "no such zone"),
    # The sandbox ended the call: the status first, then whatever blocks there were.
    (result(Status.TIMEOUT, exit_code=143, message="exceeded the 3s timeout", stderr="warn",
            content=({"type": "text", "text": "partial"},)), True,
     "Tool time.now ended with status timeout (exit code 143): exceeded the 3s timeout\nstderr:\nwarn"),
    (result(content=({"type": "text", "text": "fine"},)), False, "fine"),
])
def test_is_error_and_status(res: Result, is_error: bool, first: str) -> None:
    r = call_result(tool(), res)
    assert r.is_error is is_error and wire(r.content[0])["text"] == first
    assert wire(r.content[-1]) == dict(res.content[-1])  # the server's blocks are all there
    assert r.meta is not None and r.meta["io.toolcell/status"] == res.status.value


def test_structured_content_passes_through_and_a_missing_one_is_an_error() -> None:
    block = {"type": "text", "text": '{"t": "12:00"}'}
    ok = call_result(tool(SCHEMA), result(content=(block,), structured_content={"t": "12:00"}))
    assert ok.is_error is False and ok.structured_content == {"t": "12:00"} and wire(ok.content[0]) == block
    missing = call_result(tool(SCHEMA), result(content=(block,)))
    assert missing.is_error is True and "declares an output schema" in wire(missing.content[0])["text"]
    assert wire(missing.content[1]) == block


def test_truncation_is_said_after_the_blocks() -> None:
    r = call_result(tool(), result(content=({"type": "text", "text": "a"},), truncated=True))
    assert [wire(b)["text"] for b in r.content] == ["a", "[output truncated]"]


def test_tools_list_keeps_title_schemas_and_annotations_through_grpc() -> None:
    t = mcp_tool(tool_from_pb(tool_to_pb(tool(SCHEMA))))
    assert (t.name, t.title, t.description, t.input_schema, t.output_schema) == (
        "time.now", "Now", "The time", {"type": "object"}, SCHEMA)
    assert t.annotations is not None
    assert (t.annotations.title, t.annotations.read_only_hint, t.annotations.open_world_hint,
            t.annotations.destructive_hint) == ("Current time", True, False, None)


STARTED = Started(invocation_id="mcp_1", sandbox_id="s", profile="mcp", tool="time.now", trace_id="t")


@pytest.mark.parametrize(("events", "sent"), [
    ([STARTED, Progress(1, 3, "a"), Progress(2, 3, "")],
     [(0, None, "running in sandbox (profile mcp)"), (1, 3, "a"), (2, 3, None)]),
    # MCP: each value greater than the last; not finite -> skipped; a bad total is left out.
    ([STARTED, Progress(0, None, "dup"), Progress(2, 1, "b"), Progress(1, None, "back"),
      Progress(math.nan), Progress(math.inf), Progress(3, math.inf, "c"), Progress(4, -1, "d")],
     [(0, None, "running in sandbox (profile mcp)"), (2, 1, "b"), (3, None, "c"), (4, None, "d")]),
    ([Progress(5, 10, "m" * 5000)], [(5, 10, "m" * 2000)]),
])
async def test_progress_relay(events: list[Event], sent: list[tuple[float, float | None, str | None]]) -> None:
    got: list[tuple[float, float | None, str | None]] = []

    async def report(value: float, total: float | None, message: str | None) -> None:
        got.append((value, total, message))

    relay = ProgressRelay(report)
    for event in events:
        if isinstance(event, Started):
            await relay.started(event)
        elif isinstance(event, Progress):
            await relay.progress(event)
    assert got == sent


class Scripted:
    """Stands in for the gRPC client: lists one tool and streams a fixed list of events for it."""

    def __init__(self, events: list[Event], listed: Tool) -> None:
        self.events = events
        self.listed = listed

    async def list_tools(self) -> list[Tool]:
        return [self.listed]

    async def execute(self, name: str, arguments: Mapping[str, Any], **kw: Any) -> AsyncGenerator[Event, None]:
        for event in self.events:
            yield event

    async def close(self) -> None:
        return


FINAL = result(Status.ERROR, is_error=True, structured_content={"t": "x"},
               content=(*(b for _, b, _ in BLOCKS), {"type": "bogus"}))


@pytest.mark.parametrize("with_token", [True, False], ids=["progressToken", "no progressToken"])
async def test_sdk_client_gets_blocks_and_progress_only_when_asked(with_token: bool) -> None:
    scripted = Scripted([STARTED, Progress(1, 2, "half"), Progress(2, 2, "done"), FINAL], tool(SCHEMA))
    tools = SandboxedTools(cast(Client, scripted))
    received: list[tuple[float, float | None, str | None]] = []
    notifications: list[Any] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        received.append((progress, total, message))

    async def on_message(message: Any) -> None:
        notifications.append(message)

    async with McpClient(server(tools), mode="legacy", message_handler=on_message) as mcp:
        listed = (await mcp.list_tools()).tools
        r = await mcp.call_tool("time.now", {}, progress_callback=on_progress if with_token else None)
    assert [(t.name, t.title, t.output_schema) for t in listed] == [("time.now", "Now", SCHEMA)]
    assert r.is_error is True and r.structured_content == {"t": "x"}
    assert [wire(b) for b in r.content[:-1]] == [b for _, b, _ in BLOCKS]
    assert "type MCP does not know: bogus" in wire(r.content[-1])["text"]
    sent = [(n.params.progress, n.params.total, n.params.message) for n in notifications
            if isinstance(n, types.ProgressNotification)]  # what reached the client on the wire
    expected = [(0, None, "running in sandbox (profile mcp)"), (1, 2, "half"), (2, 2, "done")]
    assert sent == received == (expected if with_token else [])
