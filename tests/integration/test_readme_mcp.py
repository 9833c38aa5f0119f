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
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, get_default_environment, stdio_client
from mcp.client.streamable_http import streamable_http_client

from tests.integration.test_mcp import http_bridge
from tests.support import REPO, config_doc, engine, running_supervisor

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
    documented = '"unix:///run/toolcell/toolcell.sock"'
    assert example.count(documented) == 1 and "target=SUPERVISOR" in example  # the address is explicit
    script = tmp_path / "my_server.py"
    async with running_supervisor(tmp_path) as (app, _):
        script.write_text(example.replace(documented, json.dumps(app.address)))  # the reader's own socket
        # As an MCP client starts it: the client's environment (the SDK's safe default: HOME, PATH, USER ...),
        # no TOOLCELL_LISTEN and no XDG_RUNTIME_DIR from the caller's shell.
        params = StdioServerParameters(command=sys.executable, args=[str(script)], cwd=str(tmp_path))
        assert "TOOLCELL_LISTEN" not in get_default_environment()
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
    assert Path(server["command"]).is_absolute()  # clients do not pass the caller's PATH
    command = str(Path(BIN) / "toolcell")  # the reader's own install path
    async with running_supervisor(tmp_path) as (app, _):
        args[i + 1] = app.address
        params = StdioServerParameters(command=command, args=args, env={"PATH": "/usr/bin:/bin"})
        with (tmp_path / "bridge.log").open("w") as err:
            async with stdio_client(params, errlog=err) as (read, write), ClientSession(read, write) as session:
                await check_session(session)


async def test_mcp_client_configuration_streamable_http(tmp_path: Path) -> None:
    text = section("Add `toolcell mcp` to an MCP client")
    command = shlex.split(next(b for b in blocks(text, "sh") if "--transport http" in b).strip())
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


async def test_client_setup_block_writes_an_entry_that_a_client_can_start(tmp_path: Path) -> None:
    """The section's ``toolcell client setup`` line as written (its --dry-run output), then that entry started as
    a client starts it: a bare environment, no PATH to the venv, no TOOLCELL_LISTEN."""
    text = section("Add `toolcell mcp` to an MCP client")
    line = next(b for b in blocks(text, "sh") if "client setup" in b).splitlines()[0]
    command = shlex.split(line.split("#")[0])
    assert command[:3] == ["toolcell", "client", "setup"] and "--dry-run" in command
    async with running_supervisor(tmp_path) as (app, _):
        command[command.index("--target") + 1] = app.address
        env = {k: v for k, v in os.environ.items() if k != "TOOLCELL_LISTEN"} | {"HOME": str(tmp_path)}
        done = await asyncio.to_thread(subprocess.run, [str(Path(BIN) / "toolcell"), *command[1:]], env=env,
                                       capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        entry = json.loads(done.stdout)["mcpServers"]["toolcell"]
        assert Path(entry["command"]).is_absolute() and entry["args"][-2:] == ["--target", app.address]
        params = StdioServerParameters(command=entry["command"], args=entry["args"], env={"PATH": "/usr/bin:/bin"})
        with (tmp_path / "bridge.log").open("w") as err:
            async with stdio_client(params, errlog=err) as (read, write), ClientSession(read, write) as session:
                await check_session(session)


async def test_sessions_mcp_client_example_runs_as_written(tmp_path: Path) -> None:
    """The README's stateful Python session from an MCP client: the variable of call 1 is there in call 2; a
    second client session (a new stdio connection: a new MCP session) does not see it."""
    example = blocks(section("Sessions and workspaces: state across calls, files in and out"), "python")[0]
    documented = '"unix:///run/toolcell/toolcell.sock"'
    assert example.count(documented) == 1 and 'command="toolcell"' in example
    doc = config_doc(f"readme-{uuid.uuid4().hex[:8]}", str(tmp_path / "toolcell.sock"))
    python = next(t for t in doc["tools"] if t["name"] == "python.run")
    python["session"] = {"command": ["python3", "-I", "-u", "/opt/toolcell/tools/pyrepl.py"]}
    script = tmp_path / "client.py"
    async with running_supervisor(tmp_path, doc) as (app, _):
        script.write_text(example.replace(documented, json.dumps(app.address))
                          .replace('command="toolcell"', f"command={json.dumps(str(Path(BIN) / 'toolcell'))}"))
        proc = await asyncio.to_thread(subprocess.run, [sys.executable, str(script)], cwd=tmp_path,
                                       capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == "6"
        # A second MCP session: its own toolcell session, where `history` was never defined.
        other = tmp_path / "other.py"
        first_call = '        await session.call_tool("python.run", {"code": "history = [1, 2, 3]"})\n'
        assert first_call in script.read_text()
        other.write_text(script.read_text().replace(first_call, ""))
        proc = await asyncio.to_thread(subprocess.run, [sys.executable, str(other)], cwd=tmp_path,
                                       capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "NameError" in proc.stdout and "6" not in proc.stdout.split()
