"""MCP end to end: the official SDK's own ClientSession -> `toolcell mcp` -> a real supervisor -> real containers.

Every test runs over both transports `toolcell mcp` offers: stdio (the bridge is the client's child
process) and Streamable HTTP on loopback. Containers are found by the supervisor's owner label.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from opentelemetry.sdk.trace import TracerProvider

from tests.support import REPO, config_doc, engine, leftovers, running_supervisor

pytestmark = pytest.mark.docker
TOOLCELL = [sys.executable, "-m", "toolcell"]
URL_LINE = re.compile(r"MCP \(Streamable HTTP\) on (http://\S+)")
SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(60)\n"


@pytest.fixture(autouse=True)
def _engine_present() -> None:
    engine()


def doc_for(tmp_path: Path) -> tuple[dict[str, Any], str]:
    owner = f"test-{uuid.uuid4().hex[:10]}"
    doc = config_doc(owner, str(tmp_path / "toolcell.sock"))
    doc["tools"][0]["output_schema"] = {"type": "object", "properties": {"words": {"type": "integer"}}}
    doc["tools"][1]["annotations"] = {"readOnlyHint": False, "title": "Run Python"}  # admin override
    return doc, owner


@contextlib.asynccontextmanager
async def http_bridge(args: list[str], errlog: Path, cwd: Path = REPO,
                      env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """Start a Streamable HTTP bridge; yield its URL (read from its stderr); stop it with SIGTERM."""
    proc = await asyncio.create_subprocess_exec(*args, cwd=cwd, env=env, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    log = errlog.open("wb")

    async def drain() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            log.write(line)
            log.flush()

    url = None
    try:
        with anyio.fail_after(30):
            while url is None:
                line = await proc.stderr.readline()
                assert line, f"bridge exited: {errlog.read_text()}"
                log.write(line)
                if m := URL_LINE.search(line.decode()):
                    url = m.group(1)
        drainer = asyncio.ensure_future(drain())
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                await proc.wait()
        if url is not None:
            await drainer
        log.close()


@contextlib.asynccontextmanager
async def mcp_session(transport: str, target: str, errlog: Path,
                      extra: tuple[str, ...] = ()) -> AsyncIterator[ClientSession]:
    """An initialized SDK ClientSession to `toolcell mcp --target TARGET` over ``transport``."""
    if transport == "stdio":
        params = StdioServerParameters(command=TOOLCELL[0], args=[*TOOLCELL[1:], "mcp", "--target", target, *extra],
                                       cwd=str(REPO))
        with errlog.open("w") as err:
            async with stdio_client(params, errlog=err) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                yield session
    else:
        args = [*TOOLCELL, "mcp", "--transport", "http", "--listen", "127.0.0.1:0", "--target", target]
        async with http_bridge(args, errlog) as url, streamable_http_client(url) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            yield session


TRANSPORTS = pytest.mark.parametrize("transport", ["stdio", "http"])


@TRANSPORTS
async def test_list_tools_with_schemas_and_truthful_annotations(tmp_path: Path, transport: str) -> None:
    doc, _ = doc_for(tmp_path)
    async with running_supervisor(tmp_path, doc) as (app, _), \
            mcp_session(transport, app.address, tmp_path / "bridge.log") as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
    assert set(tools) == {"text.wordcount", "python.run", "python.tight", "ghost"}
    wc = tools["text.wordcount"]
    assert wc.input_schema == doc["tools"][0]["input_schema"] and wc.description == "count"
    assert wc.output_schema == doc["tools"][0]["output_schema"]
    assert wc.annotations is not None
    assert (wc.annotations.read_only_hint, wc.annotations.destructive_hint, wc.annotations.idempotent_hint,
            wc.annotations.open_world_hint) == (True, False, True, False)  # derived: no network, read-only fs
    run = tools["python.run"].annotations
    assert run is not None and run.read_only_hint is False and run.title == "Run Python"  # the admin's
    assert run.open_world_hint is False  # still derived from the profile


@TRANSPORTS
async def test_call_streams_progress_then_result(tmp_path: Path, transport: str) -> None:
    doc, owner = doc_for(tmp_path)
    src = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.4)\n"
    progress: list[tuple[float, float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((time.monotonic(), value, message))

    async with running_supervisor(tmp_path, doc) as (app, _), \
            mcp_session(transport, app.address, tmp_path / "bridge.log") as session:
        result = await session.call_tool("python.run", {"code": src}, progress_callback=on_progress)
        done = time.monotonic()
        wc = await session.call_tool("text.wordcount", {"text": "one two three"})
    assert result.is_error is False
    assert [c.text for c in result.content if c.type == "text"] == ["line 0\nline 1\nline 2\n"]
    meta = result.meta or {}
    assert meta["io.toolcell/status"] == "ok" and len(meta["io.toolcell/trace_id"]) == 32
    assert progress[0][1:] == (0, "running in sandbox (profile default)")
    assert "".join(m or "" for _, _, m in progress[1:]) == "line 0\nline 1\nline 2\n"  # stdout, in order
    values = [v for _, v, _ in progress]
    assert values == sorted(values) and len(set(values)) == len(values)  # strictly increasing
    first_line_at = next(t for t, _, m in progress[1:])
    assert done - first_line_at > 0.6  # streamed while the tool ran, not replayed at the end
    assert wc.is_error is False and wc.structured_content == {"lines": 1, "words": 3, "chars": 13}
    assert leftovers(engine(), owner) == []


@TRANSPORTS
async def test_cancelling_the_mcp_request_kills_the_container(tmp_path: Path, transport: str) -> None:
    doc, owner = doc_for(tmp_path)
    docker_client = engine()
    errlog = tmp_path / "bridge.log"
    async with running_supervisor(tmp_path, doc) as (app, _), mcp_session(transport, app.address, errlog) as session:
        up = anyio.Event()

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            if message and "up" in message:
                up.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: session.call_tool("python.run", {"code": SLEEPER}, progress_callback=on_progress))
            with anyio.fail_after(30):
                await up.wait()
            assert len(leftovers(docker_client, owner)) == 1
            tg.cancel_scope.cancel()  # the SDK sends notifications/cancelled
        t0 = time.monotonic()
        while (leftovers(docker_client, owner) or app.supervisor.in_flight) and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.05)
        assert leftovers(docker_client, owner) == [] and app.supervisor.in_flight == 0
        # The session and the bridge keep serving.
        after = await session.call_tool("text.wordcount", {"text": "still here"})
        assert after.is_error is False
    assert re.search(r"cancelled mcp_[0-9a-f]{32} on MCP request cancellation", errlog.read_text())


@TRANSPORTS
async def test_is_error_for_timeout_invalid_arguments_and_missing_image(tmp_path: Path, transport: str) -> None:
    doc, owner = doc_for(tmp_path)
    async with running_supervisor(tmp_path, doc) as (app, _), \
            mcp_session(transport, app.address, tmp_path / "bridge.log") as session:
        timeout = await session.call_tool("python.tight", {"code": SLEEPER})
        invalid = await session.call_tool("text.wordcount", {"text": 5})
        ghost = await session.call_tool("ghost", {})
        with pytest.raises(MCPError, match=r"Unknown tool: no\.such\.tool"):
            await session.call_tool("no.such.tool", {})
    assert timeout.is_error is True and (timeout.meta or {})["io.toolcell/status"] == "timeout"
    text = timeout.content[0].text  # type: ignore[union-attr]
    assert "ended with status timeout" in text and "stdout:\nup\n" in text
    assert invalid.is_error is True
    assert invalid.content[0].text == (  # type: ignore[union-attr]
        "Invalid arguments for tool text.wordcount: text: 5 is not of type 'string'")
    assert ghost.is_error is True and "FAILED_PRECONDITION" in ghost.content[0].text  # type: ignore[union-attr]
    assert leftovers(engine(), owner) == []


def test_bridge_refuses_unreachable_supervisor_and_unknown_tools(tmp_path: Path) -> None:
    down = subprocess.run([*TOOLCELL, "mcp", "--target", f"unix://{tmp_path}/none.sock"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert down.returncode == 4 and "UNAVAILABLE" in down.stderr
    bad = subprocess.run([*TOOLCELL, "mcp", "--transport", "http", "--listen", "nowhere"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "--listen" in bad.stderr


async def test_unknown_tool_subset_is_refused(tmp_path: Path) -> None:
    doc, _ = doc_for(tmp_path)
    async with running_supervisor(tmp_path, doc) as (app, _):
        proc = await asyncio.create_subprocess_exec(
            *TOOLCELL, "mcp", "--target", app.address, "--tool", "text.wordcount", "--tool", "nope",
            cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
    assert proc.returncode == 3 and "unknown tool(s) nope" in err.decode()


def start_serve(doc: dict[str, Any], tmp_path: Path) -> subprocess.Popen[str]:
    cfg = tmp_path / "toolcell.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    sock = Path(doc["server"]["listen"].removeprefix("unix://"))
    proc = subprocess.Popen([*TOOLCELL, "serve", "--config", str(cfg)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "supervisor did not start"
        time.sleep(0.05)
    return proc


async def test_mcp_callers_trace_id_is_on_the_supervisors_spans(tmp_path: Path) -> None:
    doc, owner = doc_for(tmp_path)
    doc["telemetry"] = {"span_file": str(tmp_path / "spans.jsonl")}
    proc = await asyncio.to_thread(start_serve, doc, tmp_path)
    try:
        # The MCP client's own span: the SDK sends its context as _meta.traceparent.
        caller = TracerProvider().get_tracer("mcp-client")
        bridge_spans = tmp_path / "bridge-spans.jsonl"
        async with mcp_session("stdio", doc["server"]["listen"], tmp_path / "bridge.log",
                               ("--span-file", str(bridge_spans))) as session:
            with caller.start_as_current_span("agent.step") as span:
                trace_id = format(span.get_span_context().trace_id, "032x")
                result = await session.call_tool("text.wordcount", {"text": "traced"})
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    assert result.is_error is False and (result.meta or {})["io.toolcell/trace_id"] == trace_id
    spans = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
    ours = {s["name"] for s in spans if s["context"]["trace_id"].removeprefix("0x") == trace_id}
    assert {"toolcell.v1.Supervisor/Execute", "toolcell.invocation", "toolcell.create", "toolcell.run",
            "toolcell.remove"} <= ours
    # The bridge's own client span sits between the MCP client's span and the supervisor's server span.
    bridge = [json.loads(line) for line in bridge_spans.read_text().splitlines()]
    client_span = next(s for s in bridge if s["name"] == "toolcell.v1.Supervisor/Execute"
                       and s["context"]["trace_id"].removeprefix("0x") == trace_id)
    assert client_span["kind"] == "SpanKind.CLIENT"
    assert client_span["resource"]["attributes"]["service.name"] == "toolcell-mcp"
    # ... and the MCP SDK's server span for the request is its parent, in the caller's trace.
    request_span = next(s for s in bridge if s["name"] == "tools/call text.wordcount")
    assert request_span["context"]["trace_id"].removeprefix("0x") == trace_id
    assert client_span["parent_id"] == request_span["context"]["span_id"]
    server_span = next(s for s in spans if s["name"] == "toolcell.v1.Supervisor/Execute"
                       and s["context"]["trace_id"].removeprefix("0x") == trace_id)
    assert server_span["parent_id"] == client_span["context"]["span_id"]
    assert leftovers(engine(), owner) == []
