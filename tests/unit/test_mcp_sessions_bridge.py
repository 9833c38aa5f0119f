"""The MCP bridge's sessions and workspace files: one toolcell session per MCP session and tool, files in
through ``_files`` and out as embedded resources.

The real SDK client talks to the adapter's server in memory (each ``McpClient`` is one MCP session, a
connection of its own), with a recording fake in place of the gRPC client.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

import anyio
import mcp_types as types
import pytest
from mcp.client.client import Client as McpClient
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from toolcell.client import Client, ClientError, NotFoundError, ResourceExhaustedError, SessionInfo
from toolcell.mcp import SandboxedTools, call_result, mcp_tool, server
from toolcell.mcp.adapter import FILES_ARGUMENT, REOPENED_NOTE, file_block, input_files
from toolcell.model import Event, OutputFile, Result, SessionPolicy, Status, Tool, Usage, WorkspacePolicy

SCHEMA: dict[str, Any] = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}
WORKSPACE = WorkspacePolicy(outputs="/tmp/workspace/out", max_input_files=3, max_input_bytes=64)
PYTHON = Tool(name="python.run", description="Python", image="", command=(), input_schema=SCHEMA,
              session=SessionPolicy(), workspace=WORKSPACE)
PLAIN = Tool(name="time.now", description="The time", image="", command=())
FILES_ONLY = Tool(name="files.only", description="Files", image="", command=(), workspace=WORKSPACE)


def result(session: str, files: tuple[OutputFile, ...] = ()) -> Result:
    return Result(status=Status.OK, exit_code=0, output=f"ran in {session or 'no session'}", stderr="",
                  truncated=False, duration_ms=1, usage=Usage(), trace_id="t" * 32, invocation_id="mcp_1",
                  files=files, session_id=session)


class Fake:
    """Stands in for the gRPC client; records sessions opened and closed, and each call."""

    def __init__(self, *tools: Tool) -> None:
        self.listed = list(tools)
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.calls: list[tuple[str, dict[str, Any], str, dict[str, bytes] | None]] = []
        self.ended: set[str] = set()  # sessions the supervisor has ended
        self.open_errors: list[ClientError] = []  # raised by the next open_session calls, in order
        self.close_error: Exception | None = None
        self.files_out: tuple[OutputFile, ...] = ()
        self.tokens: list[str | None] = []

    def with_token(self, token: str | None) -> Fake:
        self.tokens.append(token)
        return self

    async def list_tools(self, **kw: Any) -> list[Tool]:
        return list(self.listed)

    async def open_session(self, tool: str, *, timeout: float | None = None) -> SessionInfo:
        await anyio.sleep(0.01)  # a concurrent first call would open a second one here
        if self.open_errors:
            raise self.open_errors.pop(0)
        if tool not in {t.name for t in self.listed}:
            raise NotFoundError("NOT_FOUND", f"unknown tool {tool}")
        session_id = f"s{len(self.opened) + 1}"
        self.opened.append(session_id)
        return SessionInfo(session_id=session_id, tool=tool, idle_ttl_s=300, max_lifetime_s=3600, max_calls=100,
                           sandbox_id="sb")

    async def close_session(self, session_id: str, *, timeout: float | None = None) -> int:
        self.closed.append(session_id)
        if self.close_error is not None:
            raise self.close_error
        return 1

    async def execute(self, name: str, arguments: Mapping[str, Any], *, session: str = "",
                      files: Mapping[str, bytes] | None = None, **kw: Any) -> AsyncGenerator[Event, None]:
        self.calls.append((name, dict(arguments), session, dict(files) if files is not None else None))
        if session in self.ended:
            raise NotFoundError("NOT_FOUND", "the session has ended (idle)")
        yield result(session, self.files_out)

    async def cancel(self, invocation_id: str, **kw: Any) -> bool:
        return False

    async def close(self) -> None:
        return

    def sessions(self) -> list[str]:
        return [session for _, _, session, _ in self.calls]


def texts(r: types.CallToolResult) -> list[str]:
    return [b.text for b in r.content if isinstance(b, types.TextContent)]


@asynccontextmanager
async def clients(tools: SandboxedTools, n: int, mode: str = "legacy") -> AsyncIterator[list[McpClient]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(McpClient(server(tools), mode=mode)) for _ in range(n)]


async def test_calls_in_one_mcp_session_share_one_toolcell_session_closed_when_it_ends() -> None:
    fake = Fake(PYTHON, PLAIN)
    tools = SandboxedTools(cast(Client, fake))
    async with clients(tools, 1) as (mcp,):
        first = await mcp.call_tool("python.run", {"code": "x = 1"})
        second = await mcp.call_tool("python.run", {"code": "print(x)"})
        plain = await mcp.call_tool("time.now", {})
        assert fake.closed == []
    assert fake.opened == ["s1"] and fake.sessions() == ["s1", "s1", ""]
    assert (texts(first), texts(second), texts(plain)) == (["ran in s1"], ["ran in s1"], ["ran in no session"])
    assert fake.closed == ["s1"]  # the MCP session ended: its toolcell session was closed
    await tools.close()
    assert fake.closed == ["s1"]  # not twice


async def test_two_mcp_sessions_never_share_a_toolcell_session() -> None:
    fake = Fake(PYTHON)
    tools = SandboxedTools(cast(Client, fake))
    async with clients(tools, 2) as (a, b):
        for mcp in (a, b, a, b):
            await mcp.call_tool("python.run", {"code": "1"})
    assert fake.opened == ["s1", "s2"] and fake.sessions() == ["s1", "s2", "s1", "s2"]
    assert sorted(fake.closed) == ["s1", "s2"]


async def test_concurrent_first_calls_open_one_session() -> None:
    fake = Fake(PYTHON)
    tools = SandboxedTools(cast(Client, fake))
    got: list[types.CallToolResult] = []
    async with clients(tools, 1) as (mcp,):
        async def call() -> None:
            got.append(await mcp.call_tool("python.run", {"code": "1"}))

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(call)
    assert fake.opened == ["s1"] and fake.sessions() == ["s1"] * 5 and len(got) == 5


async def test_an_ended_session_is_replaced_and_the_call_says_so_once() -> None:
    fake = Fake(PYTHON)
    tools = SandboxedTools(cast(Client, fake))
    async with clients(tools, 1) as (mcp,):
        await mcp.call_tool("python.run", {"code": "x = 1"})
        fake.ended.add("s1")
        again = await mcp.call_tool("python.run", {"code": "print(x)"})
        after = await mcp.call_tool("python.run", {"code": "print(x)"})
    assert fake.opened == ["s1", "s2"] and fake.sessions() == ["s1", "s1", "s2", "s2"]
    assert again.is_error is False and texts(again) == ["ran in s2", REOPENED_NOTE]
    assert texts(after) == ["ran in s2"]
    assert fake.closed == ["s2"]  # s1 had ended already


async def test_a_session_that_cannot_be_opened_leaves_a_one_shot_call_with_a_note() -> None:
    fake = Fake(PYTHON)
    fake.open_errors = [ResourceExhaustedError("RESOURCE_EXHAUSTED", "4 open sessions")]
    tools = SandboxedTools(cast(Client, fake))
    async with clients(tools, 1) as (mcp,):
        first = await mcp.call_tool("python.run", {"code": "1"})
        second = await mcp.call_tool("python.run", {"code": "1"})  # tries again
    assert fake.sessions() == ["", "s1"]
    assert texts(first)[0] == "ran in no session" and "no session could be opened (RESOURCE_EXHAUSTED)" in texts(
        first)[1]
    assert texts(second) == ["ran in s1"]


async def test_a_replacement_that_ends_at_once_is_an_error_result_not_a_loop() -> None:
    fake = Fake(PYTHON)
    tools = SandboxedTools(cast(Client, fake))
    async with clients(tools, 1) as (mcp,):
        await mcp.call_tool("python.run", {"code": "1"})
        fake.ended.update({"s1", "s2"})
        r = await mcp.call_tool("python.run", {"code": "1"})
    assert fake.sessions() == ["s1", "s1", "s2"]
    assert r.is_error is True and "its session ended: the session has ended (idle)" in texts(r)[0]


async def test_unknown_tool_on_open_is_an_mcp_error() -> None:
    fake = Fake(PYTHON)
    tools = SandboxedTools(cast(Client, fake))
    fake.open_errors = [NotFoundError("NOT_FOUND", "unknown tool python.run")]
    async with clients(tools, 1) as (mcp,):
        with pytest.raises(MCPError, match=r"Unknown tool: python\.run"):
            await mcp.call_tool("python.run", {"code": "1"})
    assert fake.calls == []


async def test_stateless_requests_have_no_mcp_session_unless_one_client_serves_them() -> None:
    fake = Fake(PYTHON)
    tools = SandboxedTools(cast(Client, fake))
    modern = max(MODERN_PROTOCOL_VERSIONS)
    async with clients(tools, 1, mode=modern) as (mcp,):
        await mcp.call_tool("python.run", {"code": "1"})
        await mcp.call_tool("python.run", {"code": "1"})
    assert fake.opened == [] and fake.sessions() == ["", ""]
    async with tools.one_client(), clients(tools, 1, mode=modern) as (mcp,):  # stdio: one client, one session
        await mcp.call_tool("python.run", {"code": "1"})
        await mcp.call_tool("python.run", {"code": "1"})
        assert fake.closed == []
    assert fake.sessions() == ["", "", "s1", "s1"] and fake.closed == ["s1"]


async def test_bridge_shutdown_closes_every_open_session_errors_ignored() -> None:
    fake = Fake(PYTHON)
    fake.close_error = ClientError("UNAVAILABLE", "gone")
    tools = SandboxedTools(cast(Client, fake))
    async with clients(tools, 2) as (a, b):
        await a.call_tool("python.run", {"code": "1"})
        await b.call_tool("python.run", {"code": "1"})
        async with tools:
            pass  # __aexit__: close()
        assert sorted(fake.closed) == ["s1", "s2"]
        after = await a.call_tool("python.run", {"code": "1"})  # a call after shutdown opens nothing
    assert sorted(fake.closed) == ["s1", "s2"] and fake.opened == ["s1", "s2"]
    assert texts(after) == ["ran in no session"]


async def test_callers_token_opens_and_closes_the_session() -> None:
    fake = Fake(PYTHON)
    tools = SandboxedTools(cast(Client, fake), caller_token=lambda request: "caller-token")
    async with clients(tools, 1) as (mcp,):
        await mcp.call_tool("python.run", {"code": "1"})
    assert fake.opened == ["s1"] and fake.closed == ["s1"] and set(fake.tokens) == {"caller-token"}


# ---------------------------------------------------------------------------------------------- files


def test_tools_with_a_workspace_list_files_and_only_they() -> None:
    listed = mcp_tool(PYTHON).input_schema
    files = listed["properties"][FILES_ARGUMENT]
    assert listed["properties"]["code"] == SCHEMA["properties"]["code"] and listed["required"] == ["code"]
    assert files["type"] == "array" and files["maxItems"] == 3
    assert "64 bytes" in files["description"] and "/tmp/workspace/out" in files["description"]
    assert set(files["items"]["properties"]) == {"path", "text", "blob"}
    assert PYTHON.input_schema == SCHEMA  # the tool's own schema untouched
    assert FILES_ARGUMENT not in (mcp_tool(PLAIN).input_schema.get("properties") or {})
    own = Tool(name="t", description="", image="", command=(), workspace=WORKSPACE,
               input_schema={"type": "object", "properties": {FILES_ARGUMENT: {"type": "integer"}}})
    assert mcp_tool(own).input_schema["properties"] == {FILES_ARGUMENT: {"type": "integer"}}


async def test_files_in_and_embedded_resources_out() -> None:
    fake = Fake(PYTHON)
    fake.files_out = (
        OutputFile(path="out/r.txt", size=5, text="hello", media_type="text/plain; charset=utf-8"),
        OutputFile(path="img/a b#?.png", size=3, data=b"\x89P\x00", truncated=True, media_type="image/png"),
    )
    tools = SandboxedTools(cast(Client, fake))
    sent = [{"path": "data/a.txt", "text": "héllo"}, {"path": "b.bin", "blob": base64.b64encode(b"\x00\xff").decode()}]
    async with clients(tools, 1) as (mcp,):
        r = await mcp.call_tool("python.run", {"code": "1", FILES_ARGUMENT: sent})
    assert fake.calls == [("python.run", {"code": "1"}, "s1", {"data/a.txt": "héllo".encode(), "b.bin": b"\x00\xff"})]
    assert r.is_error is False and texts(r) == ["ran in s1"]
    text, blob = r.content[1:]
    assert isinstance(text, types.EmbeddedResource) and isinstance(text.resource, types.TextResourceContents)
    assert (text.resource.uri, text.resource.text, text.resource.mime_type) == (
        "toolcell://files/out/r.txt", "hello", "text/plain; charset=utf-8")
    assert text.resource.meta == {"io.toolcell/size": 5, "io.toolcell/truncated": False}
    assert isinstance(blob, types.EmbeddedResource) and isinstance(blob.resource, types.BlobResourceContents)
    assert (blob.resource.uri, base64.b64decode(blob.resource.blob), blob.resource.mime_type) == (
        "toolcell://files/img/a%20b%23%3F.png", b"\x89P\x00", "image/png")
    assert blob.resource.meta == {"io.toolcell/size": 3, "io.toolcell/truncated": True}


async def test_files_for_a_tool_without_sessions_and_a_tool_without_a_workspace() -> None:
    fake = Fake(FILES_ONLY, PLAIN)
    tools = SandboxedTools(cast(Client, fake))
    async with clients(tools, 1) as (mcp,):
        await mcp.call_tool("files.only", {FILES_ARGUMENT: [{"path": "a", "text": "x"}]})
        await mcp.call_tool("time.now", {FILES_ARGUMENT: [{"path": "a", "text": "x"}]})
    assert fake.calls == [("files.only", {}, "", {"a": b"x"}),  # no session: files still go in
                          ("time.now", {FILES_ARGUMENT: [{"path": "a", "text": "x"}]}, "", None)]  # its argument


def test_notes_come_before_the_files() -> None:
    r = call_result(PYTHON, result("s1", (OutputFile(path="o", size=1, text="x"),)), [REOPENED_NOTE])
    assert [b.type for b in r.content] == ["text", "text", "resource"]
    assert file_block(OutputFile(path="é/ü", size=0, text="")).resource.uri == "toolcell://files/%C3%A9/%C3%BC"


B64 = base64.b64encode


@pytest.mark.parametrize(("files", "says"), [
    ("a.txt", "_files must be an array"),
    ({"path": "a", "text": "x"}, "_files must be an array"),
    ([{"path": str(i), "text": ""} for i in range(4)], "_files: at most 3 files (got 4)"),
    (["a"], "_files[0] must be an object"),
    ([{"path": "a", "text": "x", "mode": 7}], "_files[0] has an unknown property mode"),
    ([{"text": "x"}], "_files[0].path must be a non-empty string"),
    ([{"path": 7, "text": "x"}], "_files[0].path must be a non-empty string"),
    ([{"path": "/etc/passwd", "text": "x"}], "_files[0].path /etc/passwd must be relative"),
    ([{"path": "a/../../b", "text": "x"}], "has an empty, '.' or '..' component"),
    ([{"path": "a\x1b[31m", "text": "x"}], "has a control character"),
    ([{"path": "a" * 5000, "text": "x"}], "is longer than"),
    ([{"path": "a"}], "_files[0] needs exactly one of text and blob"),
    ([{"path": "a", "text": "x", "blob": "eA=="}], "_files[0] needs exactly one of text and blob"),
    ([{"path": "a", "text": 7}], "_files[0].text must be a string"),
    ([{"path": "a", "text": "\ud800"}], "_files[0].text is not valid Unicode"),
    ([{"path": "a", "blob": ["eA=="]}], "_files[0].blob must be a base64 string"),
    ([{"path": "a", "blob": "not base64!"}], "_files[0].blob is not valid base64"),
    ([{"path": "a", "blob": "eA=\n="}], "_files[0].blob is not valid base64"),
    ([{"path": "a", "blob": "é"}], "_files[0].blob is not valid base64"),
    ([{"path": "a", "text": "x"}, {"path": "a", "blob": "eA=="}], "_files[1].path repeats an earlier path"),
    # The caps: 64 bytes in all, counted in bytes (UTF-8, decoded base64), refused before decoding.
    ([{"path": "a", "text": "x" * 65}], "at most 64 bytes in all"),
    ([{"path": "a", "text": "é" * 33}], "at most 64 bytes in all"),
    ([{"path": "a", "text": "x" * 60}, {"path": "b", "blob": B64(b"y" * 5).decode()}], "at most 64 bytes in all"),
    ([{"path": "a", "blob": "A" * 10_000_000}], "at most 64 bytes in all"),
])
def test_bad_files_are_refused(files: object, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        input_files(files, WORKSPACE)
    assert says in str(caught.value) and len(str(caught.value)) < 200 and "\x1b" not in str(caught.value)


@pytest.mark.parametrize("files", [
    [],
    [{"path": "a", "text": "x" * 64}],
    [{"path": "a", "text": "é" * 32}],
    [{"path": "a", "blob": B64(b"\x00" * 64).decode()}],
    [{"path": "a", "text": "x" * 32}, {"path": "b/c", "blob": B64(b"y" * 31).decode()}, {"path": "d", "text": "z"}],
])
def test_files_at_the_caps_are_taken(files: list[dict[str, str]]) -> None:
    taken = input_files(files, WORKSPACE)
    assert list(taken) == [f["path"] for f in files]
    assert sum(map(len, taken.values())) == sum(
        len(f["text"].encode()) if "text" in f else len(base64.b64decode(f["blob"])) for f in files)


def test_default_caps_at_their_worst() -> None:
    policy = WorkspacePolicy()
    full = [{"path": f"f{i}", "blob": B64(b"\xff" * (policy.max_input_bytes // policy.max_input_files)).decode()}
            for i in range(policy.max_input_files)]
    assert sum(map(len, input_files(full, policy).values())) == policy.max_input_bytes
    with pytest.raises(ValueError, match="bytes in all"):
        input_files([*full[:-1], {"path": "last", "text": "x" * (policy.max_input_bytes // 32 + 1)}], policy)


async def test_bad_files_are_an_error_result_and_nothing_runs() -> None:
    fake = Fake(PYTHON)
    tools = SandboxedTools(cast(Client, fake))
    async with clients(tools, 1) as (mcp,):
        r = await mcp.call_tool("python.run", {"code": "1", FILES_ARGUMENT: [{"path": "../x", "text": "x"}]})
    assert r.is_error is True and texts(r) == [
        "Invalid arguments for tool python.run: _files[0].path ../x has an empty, '.' or '..' component"]
    assert fake.calls == [] and fake.opened == []
