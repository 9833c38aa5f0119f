"""Stock MCP servers nobody here wrote, unmodified, one fresh sandbox per tool call.

The images are the ones ``images/build.sh`` builds offline (``toolcell images mcp``, listed in
images/mcp-servers.txt): the reference ``time`` and ``fetch`` servers (Python, PyPI) and ``everything``
(Node, npm). Each is reached through the gRPC API (toolcell.client.Client) and through ``toolcell mcp``
with the official MCP SDK's ClientSession (stdio and Streamable HTTP). What each test shows:

- time: its tools are listed with the server's own schemas; a call returns the server's JSON for the
  asked timezone; arguments against the server's schema are INVALID_ARGUMENT before any sandbox is
  made; the server's own error is is_error; every call is a new sandbox and none is left.
- fetch (docker: the oci backend refuses network grants): a granted profile fetches from a test
  upstream through the sandbox's egress proxy (the server's ``--allow-private-ips`` only lifts the
  server's own check, the proxy is the control); a name it was not granted and a profile with no grant
  fetch nothing, and the upstream sees only the granted request.
- everything: progress notifications become Progress events / MCP progress; structured content, image
  and embedded-resource blocks arrive intact; its errors are is_error or INVALID_ARGUMENT; the tools
  that need sampling, elicitation or roots are not offered (toolcell declares no client capabilities)
  and one that can only run as a task is not served; a long call cancelled over gRPC or by MCP request
  cancellation ends KILLED with its sandbox gone within seconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.integration.test_mcp import TRANSPORTS, mcp_session
from tests.support import config_doc, engine, leftovers, running_supervisor, upstream_container
from toolcell.client import Client, InvalidArgumentError, NotFoundError
from toolcell.model import Progress, Result, Started, Status
from toolcell.server.app import App

pytestmark = pytest.mark.docker

TIME = {"name": "time", "image": "toolcell/mcp-time:latest",
        "command": ["/opt/mcp/bin/mcp-server-time", "--local-timezone=UTC"]}
FETCH = {"name": "fetch", "image": "toolcell/mcp-fetch:latest",
         "command": ["/opt/mcp/bin/mcp-server-fetch", "--ignore-robots-txt", "--allow-private-ips"]}
# images/mcp-servers.txt: the launcher's default transport (no argument) is stdio; say it anyway.
EVERYTHING = {"name": "everything", "image": "toolcell/mcp-everything:latest",
              "command": ["/opt/mcp/bin/mcp-server-everything", "stdio"]}
IMAGES = [TIME["image"], FETCH["image"], EVERYTHING["image"]]

# Node needs more memory than the default profile's; every call starts the server afresh (~1 s).
PROFILE = {"memory": "512Mi", "timeout": "20s", "kill_grace": "1s", "pids": 128}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _engine_and_images() -> None:
    client = engine()
    missing = [image for image in IMAGES if not client.images.list(name=image)]
    if missing:
        pytest.fail(f"MCP server images missing (build them: images/build.sh): {missing}")


def doc(tmp_path: Path, *servers: dict[str, Any], kind: str = "docker", **profiles: Any) -> dict[str, Any]:
    d = config_doc(f"test-{uuid.uuid4().hex[:10]}", str(tmp_path / "toolcell.sock"), mcp=PROFILE, **profiles)
    d["engine"] = {"kind": kind}
    d["tools"] = [t for t in d["tools"] if t["name"] == "text.wordcount"]
    d["servers"] = [{"profile": "mcp", "discovery_timeout": "30s", **s} for s in servers]
    return d


async def collect(client: Client, tool: str, arguments: dict[str, Any]) -> tuple[Result, Started, list[Any]]:
    events = [e async for e in client.execute(tool, arguments)]
    assert isinstance(events[-1], Result) and isinstance(events[0], Started), events[:1]
    return events[-1], events[0], events


def count_creates(app: App) -> list[int]:
    """How many sandboxes the supervisor asked the engine for, from now on (one list item per create)."""
    backend = app.supervisor.backend
    created: list[int] = []
    create = backend.create

    async def counting(spec: Any) -> Any:
        created.append(1)
        return await create(spec)

    backend.create = counting  # type: ignore[method-assign]
    return created


def texts(result: Result) -> str:
    return "\n".join(str(block.get("text", "")) for block in result.content)


# --- time ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["docker", "oci"])
async def test_time_over_grpc_lists_calls_and_refuses_with_the_servers_schema(tmp_path: Path, kind: str) -> None:
    async with running_supervisor(tmp_path, doc(tmp_path, TIME, kind=kind)) as (app, client):
        tools = {t.name: t for t in await client.list_tools() if t.name.startswith("time.")}
        assert set(tools) == {"time.get_current_time", "time.convert_time"}
        now = tools["time.get_current_time"]
        assert now.input_schema["required"] == ["timezone"]
        assert now.input_schema["properties"]["timezone"]["type"] == "string"
        assert now.output_schema is not None and "timezone" in now.output_schema["properties"]
        assert set(tools["time.convert_time"].input_schema["required"]) == {"source_timezone", "time",
                                                                          "target_timezone"}
        created = count_creates(app)

        paris, paris_started, _ = await collect(client, "time.get_current_time", {"timezone": "Europe/Paris"})
        assert paris.status is Status.OK and not paris.is_error, (paris.message, paris.stderr)
        assert json.loads(texts(paris))["timezone"] == "Europe/Paris"
        assert paris.structured_content is not None and paris.structured_content["timezone"] == "Europe/Paris"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+0[12]:00",
                            str(paris.structured_content["datetime"]))

        tokyo, tokyo_started, _ = await collect(client, "time.convert_time", {
            "source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"})
        assert tokyo.status is Status.OK and tokyo.structured_content is not None
        assert tokyo.structured_content["target"]["datetime"][11:16] == "21:00"

        # The server's own failure: the tool ran and said so.
        bad_zone, bad_started, _ = await collect(client, "time.get_current_time", {"timezone": "Not/AZone"})
        assert bad_zone.status is Status.ERROR and bad_zone.is_error and "Invalid timezone" in texts(bad_zone)

        ids = {paris_started.sandbox_id, tokyo_started.sandbox_id, bad_started.sandbox_id}
        assert len(ids) == 3 and "" not in ids, "each call is a fresh sandbox"
        assert len(created) == 3

        # Arguments against the server's own input schema never reach a sandbox.
        for arguments in ({}, {"timezone": 5}, {"zone": "UTC"}):
            with pytest.raises(InvalidArgumentError, match="timezone"):
                await client.call("time.get_current_time", arguments)
        with pytest.raises(InvalidArgumentError):
            await client.call("time.convert_time", {"source_timezone": "UTC", "target_timezone": "UTC"})
        assert len(created) == 3
        assert app.supervisor.in_flight == 0
        if kind == "docker":
            assert leftovers(engine(), app.supervisor.config.server.instance) == []


@TRANSPORTS
async def test_time_through_the_mcp_bridge(tmp_path: Path, transport: str) -> None:
    d = doc(tmp_path, TIME)
    async with running_supervisor(tmp_path, d) as (app, _), \
            mcp_session(transport, app.address, tmp_path / "bridge.log") as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert {"time.get_current_time", "time.convert_time"} <= set(tools)
        assert tools["time.get_current_time"].input_schema["required"] == ["timezone"]
        paris = await session.call_tool("time.get_current_time", {"timezone": "Europe/Paris"})
        invalid = await session.call_tool("time.get_current_time", {"timezone": 5})
        bad_zone = await session.call_tool("time.get_current_time", {"timezone": "Not/AZone"})
        assert app.supervisor.in_flight == 0
    assert paris.is_error is False and paris.structured_content is not None
    assert paris.structured_content["timezone"] == "Europe/Paris"
    assert json.loads(paris.content[0].text)["timezone"] == "Europe/Paris"  # type: ignore[union-attr]
    assert invalid.is_error is True
    assert invalid.content[0].text.startswith("Invalid arguments for tool time.get_current_time")  # type: ignore[union-attr]
    assert bad_zone.is_error is True and "Invalid timezone" in bad_zone.content[0].text  # type: ignore[union-attr]
    assert leftovers(engine(), d["server"]["instance"]) == []


# --- fetch (docker only: network grants) -------------------------------------------------------------

# The upstream (as in test_egress.py): plain HTTP on port 80 answering "hello <Host> <path>", and
# printing each request it got, so a test can tell that nothing else reached it.
UPSTREAM = r"""
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print("GOT", self.headers.get("Host"), self.path, flush=True)
        body = f"hello {self.headers.get('Host')} {self.path}".encode()
        self.send_response(200); self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", 80), H)
print("ready", flush=True)
server.serve_forever()
"""


class Upstream:
    def __init__(self, network: str, container: Any) -> None:
        self.network = network
        self.container = container

    def requests(self) -> list[str]:
        return [line for line in self.container.logs().decode().splitlines() if line.startswith("GOT ")]


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """A test network with one HTTP server answering to allowed.test and denied.test; removed afterwards."""
    with upstream_container(UPSTREAM, ["allowed.test", "denied.test"], "test-mcp-fetch") as (network, container):
        yield Upstream(network, container)


def fetch_doc(tmp_path: Path, upstream: Upstream) -> dict[str, Any]:
    grant = [{"host": "allowed.test", "ports": [80], "allow_private": True}]
    d = doc(tmp_path, {**FETCH, "profile": "granted"}, {**FETCH, "name": "nogrant"},
            granted={**PROFILE, "network": grant})
    d["egress"] = {"network": upstream.network}
    return d


async def test_fetch_reaches_only_what_its_profile_grants(tmp_path: Path, upstream: Upstream) -> None:
    d = fetch_doc(tmp_path, upstream)
    async with running_supervisor(tmp_path, d) as (app, client):
        assert {"fetch.fetch", "nogrant.fetch"} <= {t.name for t in await client.list_tools()}
        allowed, allowed_started, _ = await collect(client, "fetch.fetch", {"url": "http://allowed.test/x"})
        denied, denied_started, _ = await collect(client, "fetch.fetch", {"url": "http://denied.test/y"})
        ungranted, _, _ = await collect(client, "nogrant.fetch", {"url": "http://allowed.test/z"})
        with pytest.raises(InvalidArgumentError, match="url"):
            await client.call("fetch.fetch", {"url": 5})
        assert app.supervisor.in_flight == 0 and leftovers(engine(), d["server"]["instance"]) == []

    assert allowed.status is Status.OK and not allowed.is_error, (allowed.message, texts(allowed)[:300])
    assert "hello allowed.test /x" in texts(allowed)
    egress = {f"{e.host}:{e.port}": e for e in allowed.egress}
    assert egress["allowed.test:80"].allowed and egress["allowed.test:80"].bytes_down > 0

    assert denied.is_error and denied.status is Status.ERROR and "hello" not in texts(denied)
    assert "403" in texts(denied), texts(denied)[:300]  # the proxy's refusal, as the server reports it
    assert [(e.host, e.port, e.allowed, e.reason) for e in denied.egress] == [("denied.test", 80, False,
                                                                               "not-granted")]
    assert ungranted.is_error and ungranted.status is Status.ERROR and "hello" not in texts(ungranted)
    assert ungranted.egress == ()
    assert allowed_started.sandbox_id != denied_started.sandbox_id
    assert upstream.requests() == ["GOT allowed.test /x"], "only the granted request reached the upstream"


async def test_fetch_through_the_mcp_bridge(tmp_path: Path, upstream: Upstream) -> None:
    d = fetch_doc(tmp_path, upstream)
    async with running_supervisor(tmp_path, d) as (app, _), \
            mcp_session("stdio", app.address, tmp_path / "bridge.log") as session:
        allowed = await session.call_tool("fetch.fetch", {"url": "http://allowed.test/bridged"})
        ungranted = await session.call_tool("nogrant.fetch", {"url": "http://allowed.test/nogrant"})
    assert allowed.is_error is False and "hello allowed.test /bridged" in allowed.content[0].text  # type: ignore[union-attr]
    assert ungranted.is_error is True
    assert upstream.requests() == ["GOT allowed.test /bridged"]
    assert leftovers(engine(), d["server"]["instance"]) == []


# --- everything -------------------------------------------------------------------------------------

# Registered by the server only for a client that declares sampling, elicitation or roots; toolcell's
# in-sandbox client declares none, so they are never offered.
NEEDS_CLIENT = {"everything.trigger-sampling-request", "everything.trigger-elicitation-request",
                "everything.get-roots-list", "everything.trigger-url-elicitation",
                "everything.trigger-sampling-request-async", "everything.trigger-elicitation-request-async"}
LONG = "everything.trigger-long-running-operation"


@pytest.mark.parametrize("kind", ["docker", "oci"])
async def test_everything_over_grpc(tmp_path: Path, kind: str) -> None:
    async with running_supervisor(tmp_path, doc(tmp_path, EVERYTHING, kind=kind)) as (app, client):
        tools = {t.name: t for t in await client.list_tools()}
        assert {LONG, "everything.get-structured-content", "everything.get-tiny-image",
                "everything.get-resource-reference", "everything.echo", "everything.get-sum"} <= set(tools)
        assert not NEEDS_CLIENT & set(tools)
        with pytest.raises(NotFoundError):  # not offered, so not callable either
            await client.call("everything.trigger-sampling-request", {"prompt": "hi"})
        assert tools["everything.get-structured-content"].output_schema is not None

        long, long_started, events = await collect(client, LONG, {"duration": 1.5, "steps": 3})
        progress = [e for e in events if isinstance(e, Progress)]
        assert long.status is Status.OK and "completed" in texts(long)
        assert [(p.progress, p.total) for p in progress] == [(1, 3), (2, 3), (3, 3)]

        weather, weather_started, _ = await collect(client, "everything.get-structured-content",
                                                    {"location": "Chicago"})
        assert weather.status is Status.OK and weather.structured_content is not None
        assert set(weather.structured_content) == {"temperature", "conditions", "humidity"}
        assert json.loads(texts(weather)) == weather.structured_content

        image, image_started, _ = await collect(client, "everything.get-tiny-image", {})
        block = next(b for b in image.content if b["type"] == "image")
        assert block["mimeType"] == "image/png" and base64.b64decode(block["data"], validate=True).startswith(PNG)

        ref, ref_started, _ = await collect(client, "everything.get-resource-reference",
                                            {"resourceId": 2, "resourceType": "Text"})
        resource = next(b for b in ref.content if b["type"] == "resource")["resource"]
        assert resource["uri"] == "demo://resource/dynamic/text/2" and resource["text"].startswith("Resource 2:")

        note, _, _ = await collect(client, "everything.get-annotated-message", {"messageType": "success"})
        assert note.content[0]["annotations"]["priority"] == 0.7

        # Errors: its schema (INVALID_ARGUMENT, no sandbox); its own failure (no network in the sandbox);
        # a tool that needs the client to support tasks.
        created = count_creates(app)
        for arguments in ({"a": 1}, {"a": "one", "b": 2}):
            with pytest.raises(InvalidArgumentError):
                await client.call("everything.get-sum", arguments)
        with pytest.raises(InvalidArgumentError):
            await client.call("everything.get-structured-content", {"location": "Paris"})
        assert created == []
        offline = await client.call("everything.gzip-file-as-resource",
                                    {"data": "http://allowed.test/x", "outputType": "resource"})
        assert offline.status is Status.ERROR and offline.is_error and "fetch failed" in texts(offline)
        with pytest.raises(NotFoundError):  # tasks-only (taskSupport: required): not served, and said why in the log
            await client.call("everything.simulate-research-query", {"topic": "sandboxes"})

        ids = {long_started.sandbox_id, weather_started.sandbox_id, image_started.sandbox_id,
               ref_started.sandbox_id}
        assert len(ids) == 4 and app.supervisor.in_flight == 0


@pytest.mark.parametrize("kind", ["docker", "oci"])
async def test_everything_long_call_cancelled_over_grpc(tmp_path: Path, kind: str) -> None:
    async with running_supervisor(tmp_path, doc(tmp_path, EVERYTHING, kind=kind)) as (app, client):
        events: list[Any] = []
        cancelled_at = 0.0
        async for event in client.execute(LONG, {"duration": 30, "steps": 30}):
            events.append(event)
            if isinstance(event, Progress) and not cancelled_at:
                cancelled_at = time.monotonic()
                assert await client.cancel(events[0].invocation_id)
        result = events[-1]
        assert isinstance(result, Result) and result.status is Status.KILLED
        assert time.monotonic() - cancelled_at < 5
        assert app.supervisor.in_flight == 0
        if kind == "docker":
            assert leftovers(engine(), app.supervisor.config.server.instance) == []


@TRANSPORTS
async def test_everything_through_the_mcp_bridge(tmp_path: Path, transport: str) -> None:
    d = doc(tmp_path, EVERYTHING)
    owner = d["server"]["instance"]
    docker_client = engine()
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    errlog = tmp_path / "bridge.log"
    async with running_supervisor(tmp_path, d) as (app, _), mcp_session(transport, app.address, errlog) as session:
        listed = {t.name: t for t in (await session.list_tools()).tools}
        assert LONG in listed and not NEEDS_CLIENT & set(listed)
        long = await session.call_tool(LONG, {"duration": 1.5, "steps": 3}, progress_callback=on_progress)
        weather = await session.call_tool("everything.get-structured-content", {"location": "New York"})
        image = await session.call_tool("everything.get-tiny-image", {})
        ref = await session.call_tool("everything.get-resource-reference", {"resourceId": 1, "resourceType": "Blob"})
        invalid = await session.call_tool("everything.get-sum", {"a": 1})
        assert "everything.simulate-research-query" not in listed  # tasks-only: not served

        # MCP request cancellation: the SDK sends notifications/cancelled when its task is cancelled.
        running = anyio.Event()

        async def on_long(progress: float, total: float | None, message: str | None) -> None:
            if total is not None:  # the server's own progress: it is running
                running.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: session.call_tool(LONG, {"duration": 30, "steps": 30}, progress_callback=on_long))
            with anyio.fail_after(30):
                await running.wait()
            assert len(leftovers(docker_client, owner)) == 1
            tg.cancel_scope.cancel()
        t0 = time.monotonic()
        while (leftovers(docker_client, owner) or app.supervisor.in_flight) and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.05)
        assert leftovers(docker_client, owner) == [] and app.supervisor.in_flight == 0
        after = await session.call_tool("everything.echo", {"message": "still here"})
    assert after.is_error is False and "still here" in after.content[0].text  # type: ignore[union-attr]
    assert re.search(r"cancelled mcp_[0-9a-f]{32} on MCP request cancellation", errlog.read_text())

    assert long.is_error is False and "completed" in long.content[0].text  # type: ignore[union-attr]
    assert seen[0][0] == 0 and "running in sandbox" in str(seen[0][2])
    assert [(v, t) for v, t, _ in seen[1:]] == [(1, 3), (2, 3), (3, 3)]  # the server's own, in order

    assert weather.is_error is False and weather.structured_content is not None
    assert set(weather.structured_content) == {"temperature", "conditions", "humidity"}

    png = next(c for c in image.content if c.type == "image")
    assert png.mime_type == "image/png" and base64.b64decode(png.data, validate=True).startswith(PNG)

    embedded = next(c for c in ref.content if c.type == "resource")
    assert str(embedded.resource.uri) == "demo://resource/dynamic/blob/1"
    assert base64.b64decode(embedded.resource.blob).startswith(b"Resource 1:")  # type: ignore[union-attr]

    assert invalid.is_error is True and "Invalid arguments" in invalid.content[0].text  # type: ignore[union-attr]
    assert leftovers(docker_client, owner) == []
