"""MCP sessions and workspace files end to end: the official SDK client -> `toolcell mcp` -> a real
supervisor -> real containers.

A tool that allows sessions (python.run with its resident REPL) keeps one toolcell session per MCP
session: a variable set in one tools/call is there in the next, never in another MCP session (a second
Streamable HTTP session of the same bridge, a second stdio client), and the toolcell session is closed
when its MCP session ends. Files go in through `_files` and come back as embedded resources.
"""

from __future__ import annotations

import base64
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.client.client import Client as McpClient
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.integration.test_mcp import TOOLCELL, http_bridge, mcp_session
from tests.support import RUNNER_IMAGE, config_doc, engine, running_supervisor
from toolcell.mcp import SandboxedTools, server
from toolcell.server.app import App

pytestmark = pytest.mark.docker
REPL = ["python3", "-I", "-u", "/opt/toolcell/tools/pyrepl.py"]
# Writes what the caller's code writes; the workspace is its working directory.
WRITER = r'''
import json, os, sys
exec(json.loads(sys.stdin.read())["code"])
'''


@pytest.fixture(autouse=True)
def _engine_present() -> None:
    engine()


def doc_for(tmp_path: Path) -> dict[str, Any]:
    doc = config_doc(f"mcps-{uuid.uuid4().hex[:10]}", str(tmp_path / "toolcell.sock"))
    doc["tools"] = [
        {"name": "python.run", "description": "run python; variables persist within a session", "image": RUNNER_IMAGE,
         "command": ["python3", "-I", "-u", "/opt/toolcell/tools/pyrun.py"],
         "input_schema": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
         "session": {"idle_ttl": "60s", "max_calls": 20, "command": REPL}},
        {"name": "files.write", "description": "run python in the workspace", "image": RUNNER_IMAGE,
         "command": ["python3", "-I", "-c", WRITER],
         "input_schema": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
         "workspace": {"dir": "/tmp/work", "outputs": "/tmp/work/out", "max_input_files": 4}},
    ]
    return doc


def text_of(result: types.CallToolResult) -> str:
    return "".join(b.text for b in result.content if isinstance(b, types.TextContent))


async def open_sessions(app: App) -> list[str]:
    return [s.id for s in app.supervisor.sessions.sessions()]


async def settle(app: App, want: int) -> list[str]:
    """The supervisor's open sessions once there are ``want`` of them (a session ends asynchronously)."""
    with anyio.fail_after(30):
        while len(ids := await open_sessions(app)) != want:
            await anyio.sleep(0.1)
    return ids


@contextlib.asynccontextmanager
async def http_session(url: str) -> AsyncIterator[ClientSession]:
    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        with anyio.fail_after(30):
            await session.initialize()
        yield session


async def call(session: ClientSession | McpClient, code: str) -> types.CallToolResult:
    with anyio.fail_after(60):
        return await session.call_tool("python.run", {"code": code})


async def test_http_each_mcp_session_keeps_its_own_python(tmp_path: Path) -> None:
    async with running_supervisor(tmp_path, doc_for(tmp_path)) as (app, _):
        args = [*TOOLCELL, "mcp", "--transport", "http", "--listen", "127.0.0.1:0", "--target", app.address]
        async with http_bridge(args, tmp_path / "bridge.log") as url:
            async with http_session(url) as a:
                assert (await call(a, "x = 41")).is_error is False
                assert text_of(await call(a, "print(x + 1)")).strip() == "42"
                async with http_session(url) as b:
                    other = await call(b, "print(x)")
                    assert other.is_error is True and "NameError" in text_of(other)
                    assert text_of(await call(a, "x += 1; print(x)")).strip() == "42"
                    assert len(await settle(app, 2)) == 2
                assert len(await settle(app, 1)) == 1  # b's MCP session ended (DELETE): its session closed
                assert text_of(await call(a, "print(x)")).strip() == "42"
            await settle(app, 0)


async def test_stdio_client_keeps_its_python_and_another_client_does_not_see_it(tmp_path: Path) -> None:
    async with running_supervisor(tmp_path, doc_for(tmp_path)) as (app, _):
        async with mcp_session("stdio", app.address, tmp_path / "a.log") as a:
            await call(a, "secret = 'kept'")
            assert text_of(await call(a, "print(secret)")).strip() == "kept"
            async with mcp_session("stdio", app.address, tmp_path / "b.log") as b:
                other = await call(b, "print(secret)")
            assert other.is_error is True and "NameError" in text_of(other)
        await settle(app, 0)  # the client went: its session was closed


async def test_files_in_and_out_as_embedded_resources(tmp_path: Path) -> None:
    code = ("os.makedirs('out', exist_ok=True)\n"
            "open('out/upper.txt', 'w').write(open('in/a.txt').read().upper())\n"
            "open('out/bytes.bin', 'wb').write(open('in/b.bin', 'rb').read()[::-1])\n"
            "print('done')")
    blob = bytes(range(256))
    files = [{"path": "in/a.txt", "text": "héllo"}, {"path": "in/b.bin", "blob": base64.b64encode(blob).decode()}]
    async with running_supervisor(tmp_path, doc_for(tmp_path)) as (_, client):
        tools = SandboxedTools(client)
        async with McpClient(server(tools), mode="legacy") as mcp:
            listed = {t.name: t for t in (await mcp.list_tools()).tools}
            with anyio.fail_after(60):
                result = await mcp.call_tool("files.write", {"code": code, "_files": files})
                refused = await mcp.call_tool("files.write", {"code": code, "_files": [{"path": "/etc/x", "text": ""}]})
        await tools.close()
    assert "_files" in listed["files.write"].input_schema["properties"]
    assert "_files" not in listed["python.run"].input_schema["properties"]
    assert result.is_error is False and text_of(result).strip() == "done", text_of(result)
    resources = {b.resource.uri: b.resource for b in result.content if isinstance(b, types.EmbeddedResource)}
    text, binary = resources["toolcell://files/upper.txt"], resources["toolcell://files/bytes.bin"]
    assert isinstance(text, types.TextResourceContents) and text.text == "HÉLLO"
    assert isinstance(binary, types.BlobResourceContents) and base64.b64decode(binary.blob) == blob[::-1]
    assert binary.meta == {"io.toolcell/size": 256, "io.toolcell/truncated": False}
    assert refused.is_error is True and "_files[0].path /etc/x must be relative" in text_of(refused)


async def test_a_session_the_supervisor_ended_is_replaced_and_the_call_says_so(tmp_path: Path) -> None:
    doc = doc_for(tmp_path)
    doc["tools"][0]["session"]["max_calls"] = 2
    async with running_supervisor(tmp_path, doc) as (app, client):
        tools = SandboxedTools(client)
        async with McpClient(server(tools), mode="legacy") as mcp:
            await call(mcp, "x = 1")
            assert text_of(await call(mcp, "print(x)")).strip() == "1"  # its last call: the session ends
            await settle(app, 0)
            again = await call(mcp, "print('x' in dir())")
            assert (again.is_error, text_of(again).split("\n")[0]) == (False, "False")
            assert "a new session was started: earlier state is gone" in text_of(again)
            assert len(await settle(app, 1)) == 1
        await settle(app, 0)
        await tools.close()
