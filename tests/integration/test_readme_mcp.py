"""The README's MCP sections, run as written against a real supervisor and real containers.

The code blocks are read from README.md, so the documentation cannot drift from what works. The only
substitutions are the ones a reader makes: the supervisor's address (this test's own socket) and, for
the HTTP example, port 0 instead of 8765 (the machine is shared).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from tests.integration.test_mcp import http_bridge
from tests.support import REPO, engine, running_supervisor

pytestmark = pytest.mark.docker
README = (REPO / "README.md").read_text()
BIN = str(Path(sys.executable).parent)


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.DOTALL)


@pytest.fixture(autouse=True)
def _engine_present() -> None:
    engine()


async def check_session(session: ClientSession, expected_tools: set[str] | None = None) -> None:
    await session.initialize()
    names = {t.name for t in (await session.list_tools()).tools}
    assert names == expected_tools if expected_tools is not None else "text.wordcount" in names
    result = await session.call_tool("text.wordcount", {"text": "from the readme"})
    assert result.is_error is False
    assert json.loads(result.content[0].text)["words"] == 3  # type: ignore[union-attr]


async def test_use_from_an_mcp_server_example_runs_as_written(tmp_path: Path) -> None:
    example = blocks(section("Use from an MCP server"), "python")[0]
    assert len(example.strip().splitlines()) < 20
    script = tmp_path / "my_server.py"
    script.write_text(example)
    async with running_supervisor(tmp_path) as (app, _):
        params = StdioServerParameters(command=sys.executable, args=[str(script)], cwd=str(tmp_path),
                                       env={"TOOLCELL_LISTEN": app.address})
        with (tmp_path / "server.log").open("w") as err:
            async with stdio_client(params, errlog=err) as (read, write), ClientSession(read, write) as session:
                await check_session(session, {"text.wordcount"})


async def test_library_example_runs_as_written(tmp_path: Path) -> None:
    example = blocks(section("Use from an MCP server"), "python")[1]
    script = tmp_path / "lib_example.py"
    script.write_text(example)
    async with running_supervisor(tmp_path) as (app, _):
        # In a thread: the supervisor serves from this test's event loop.
        proc = await asyncio.to_thread(subprocess.run, [sys.executable, str(script)], cwd=tmp_path,
                                       capture_output=True, text=True, timeout=60,
                                       env={**os.environ, "TOOLCELL_LISTEN": app.address})
    assert proc.returncode == 0, proc.stderr
    status, rest = proc.stdout.split(" ", 1)
    assert status == "ok" and '"words": 2' in rest and re.search(r" [0-9a-f]{32}\n$", rest)


async def test_mcp_client_configuration_stdio(tmp_path: Path) -> None:
    config = json.loads(blocks(section("Add `toolcell mcp` to an MCP client"), "json")[0])
    server = config["mcpServers"]["toolcell"]
    args = list(server["args"])
    i = args.index("--target")
    assert args[i + 1] == "unix:///run/toolcell/toolcell.sock"  # the documented default for root
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    command = shutil.which(server["command"], path=path)
    assert command is not None, f"{server['command']} not on PATH"
    async with running_supervisor(tmp_path) as (app, _):
        args[i + 1] = app.address
        params = StdioServerParameters(command=command, args=args, env={"PATH": path})
        with (tmp_path / "bridge.log").open("w") as err:
            async with stdio_client(params, errlog=err) as (read, write), ClientSession(read, write) as session:
                await check_session(session)


async def test_mcp_client_configuration_streamable_http(tmp_path: Path) -> None:
    text = section("Add `toolcell mcp` to an MCP client")
    command = shlex.split(blocks(text, "sh")[0].strip())
    config = json.loads(blocks(text, "json")[1])["mcpServers"]["toolcell"]
    listen = command[command.index("--listen") + 1]
    assert config["type"] == "http" and config["url"] == f"http://{listen}/mcp"  # the two blocks agree
    assert command[0] == "toolcell"
    command[0] = str(Path(BIN) / "toolcell")
    command[command.index("--listen") + 1] = listen.rsplit(":", 1)[0] + ":0"
    async with running_supervisor(tmp_path) as (app, _), \
            http_bridge([*command, "--target", app.address], tmp_path / "bridge.log") as url:
        assert url.endswith("/mcp") and url.startswith("http://127.0.0.1:")
        async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
            await check_session(session)
