"""A hostile stock MCP server in real sandboxes (docker and oci), through the gRPC API.

The server (tests/data/mcp_servers/hostile.py, mounted read-only into the runner image) misbehaves at
each step: it crashes or hangs in initialize, never answers a call, floods progress, bytes or stderr,
writes invalid JSON-RPC, returns a result far over the cap, or sends requests to the client. Each case
ends as a clear result or error naming what went wrong, within its limits, with the sandbox removed and
the supervisor still serving other calls at once.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support import CANARY, REPO, RUNNER_IMAGE, config_doc, running_supervisor
from toolcell.client import Client
from toolcell.model import Progress, Result, Started, Status
from toolcell.secretstore import SecretStore, generate_key

BACKENDS = ["docker", "oci"]
SERVERS = REPO / "tests" / "data" / "mcp_servers"


def doc(tmp_path: Path, kind: str, *modes: str, **server: Any) -> dict[str, Any]:
    d = config_doc(f"mcp-{uuid.uuid4().hex[:10]}", str(tmp_path / "toolcell.sock"))
    d["engine"] = {"kind": kind}
    d["tools"] = [t for t in d["tools"] if t["name"] == "text.wordcount"]
    d["profiles"]["mcp"] = {"memory": "128Mi", "timeout": "4s", "kill_grace": "500ms",
                            "mounts": [{"source": str(SERVERS), "target": "/opt/mcp-test"}],
                            "output": {"stdout_max_bytes": "256Ki", "stderr_max_bytes": "16Ki"}}
    d["servers"] = [{"name": mode.replace("-", "_"), "image": RUNNER_IMAGE, "profile": "mcp",
                     "command": ["python3", "-I", "/opt/mcp-test/hostile.py", mode],
                     "discovery_timeout": "5s", **server} for mode in modes]
    return d


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def collect(client: Client, tool: str, arguments: dict[str, Any]) -> tuple[Result, list[Any]]:
    events = [e async for e in client.execute(tool, arguments)]
    assert isinstance(events[-1], Result)
    return events[-1], events


async def still_serving(client: Client) -> None:
    started = time.monotonic()
    result = await client.call("text.wordcount", {"text": "a b c"})
    assert result.status is Status.OK and time.monotonic() - started < 5


async def test_a_well_behaved_server_text_image_error_and_progress(tmp_path: Path, kind: str) -> None:
    async with running_supervisor(tmp_path, doc(tmp_path, kind, "ok")) as (_app, client):
        names = sorted(t.name for t in await client.list_tools())
        assert names == ["ok.counter", "ok.echo", "ok.fail", "ok.image", "ok.secret", "ok.slow", "text.wordcount"]
        echo = await client.call("ok.echo", {"text": "hello"})
        assert echo.status is Status.OK and echo.content == ({"type": "text", "text": "hello"},)
        assert echo.structured_content == {"echo": "hello"} and "initialized" in echo.stderr
        image = await client.call("ok.image", {})
        assert image.content[0]["type"] == "image" and image.content[0]["mimeType"] == "image/png"
        failed = await client.call("ok.fail", {})
        assert failed.status is Status.ERROR and failed.is_error and failed.content[0]["text"]
        slow, events = await collect(client, "ok.slow", {"seconds": 1})
        progress = [e for e in events if isinstance(e, Progress)]
        assert slow.status is Status.OK and len(progress) >= 3 and progress[-1].total is not None
        await still_serving(client)


@pytest.mark.parametrize("pooled", [False, True])
async def test_nothing_a_server_keeps_outlives_its_call(tmp_path: Path, kind: str, pooled: bool) -> None:
    """The same server called three times, cold or warm: each call meets a fresh process and a fresh disk."""
    d = doc(tmp_path, kind, "ok", **({"pool": {"size": 1}} if pooled else {}))
    async with running_supervisor(tmp_path, d) as (app, client):
        seen = []
        for _ in range(3):
            if pooled:
                for _ in range(300):
                    if app.supervisor.pools.ready("ok.counter") == 1:
                        break
                    await asyncio.sleep(0.05)
            result = await client.call("ok.counter", {})
            assert result.status is Status.OK, result.message
            seen.append(result.output)
    assert seen == ["memory 1 disk 1"] * 3


async def test_a_pooled_sandbox_counts_as_ready_only_once_its_server_is_initialized(tmp_path: Path,
                                                                                   kind: str) -> None:
    """A server that takes 2 s to initialize: once the pool says ready, a call pays none of it (cold: all)."""
    d = doc(tmp_path, kind, "slow-init", pool={"size": 1})
    d["servers"].append({**d["servers"][0], "name": "cold", "pool": {"size": 0}})
    async with running_supervisor(tmp_path, d) as (app, client):
        for _ in range(400):
            if app.supervisor.pools.ready("slow_init.echo") == 1:
                break
            await asyncio.sleep(0.05)
        warm = await client.call("slow_init.echo", {"text": "warm"})
        cold = await client.call("cold.echo", {"text": "cold"})
        assert app.supervisor.pools.stats()["slow_init.echo"].hits == 1
    assert warm.status is Status.OK and cold.status is Status.OK
    assert warm.duration_ms < 1500 <= 2000 <= cold.duration_ms, (warm.duration_ms, cold.duration_ms)


async def test_cancel_tells_the_server_then_kills_the_sandbox(tmp_path: Path, kind: str) -> None:
    async with running_supervisor(tmp_path, doc(tmp_path, kind, "ok")) as (_app, client):
        events: list[Any] = []
        async for event in client.execute("ok.slow", {"seconds": 30}):
            events.append(event)
            if isinstance(event, Progress):
                started = next(e for e in events if isinstance(e, Started))
                assert await client.cancel(started.invocation_id)
        result = events[-1]
        assert isinstance(result, Result) and result.status is Status.KILLED
        assert "cancelled" in result.stderr, "the server got notifications/cancelled before the kill"


@pytest.mark.parametrize(("mode", "words"), [
    ("crash-init", "exited during initialize (status 3)"),
    ("hang", "did not list its tools within 5s"),
    ("bad-version", "protocol version"),
])
async def test_a_server_that_fails_discovery_is_named_and_the_rest_serves(tmp_path: Path, kind: str, mode: str,
                                                                         words: str) -> None:
    async with running_supervisor(tmp_path, doc(tmp_path, kind, mode, "ok")) as (app, client):
        name = mode.replace("-", "_")
        assert words in app.supervisor.source_errors[name] and f"'{name}'" in app.supervisor.source_errors[name]
        with pytest.raises(Exception, match="UNAVAILABLE") as info:
            await client.call(f"{name}.anything", {})
        assert words in str(info.value)
        assert (await client.call("ok.echo", {"text": "x"})).status is Status.OK
        await still_serving(client)


@pytest.mark.parametrize(("mode", "status", "words"), [
    ("hang-call", Status.TIMEOUT, "timed out"),
    ("exit-call", Status.ERROR, "exited before answering"),
    ("invalid-json", Status.ERROR, "invalid JSON-RPC"),
    ("non-object", Status.ERROR, "invalid JSON-RPC"),
    ("batch", Status.ERROR, "invalid JSON-RPC"),
    ("huge", Status.ERROR, "over 262144 bytes"),
    ("flood-bytes", Status.ERROR, "over 262144 bytes"),
    ("flood", Status.TIMEOUT, "timed out"),
    ("flood-stderr", Status.TIMEOUT, "timed out"),
    ("request-flood", Status.ERROR, "requests"),
])
async def test_a_hostile_call_ends_clearly_within_its_limits(tmp_path: Path, kind: str, mode: str, status: Status,
                                                              words: str) -> None:
    async with running_supervisor(tmp_path, doc(tmp_path, kind, mode)) as (_app, client):
        name = mode.replace("-", "_")
        started = time.monotonic()
        result, events = await collect(client, f"{name}.echo", {"text": "x"})
        assert result.status is status and words in result.message, (result.status, result.message)
        assert time.monotonic() - started < 4 + 0.5 + 3, "the profile's timeout and grace bound every case"
        assert len(result.stderr.encode()) <= 16 * 1024 and len(result.message) < 700
        assert sum(isinstance(e, Progress) for e in events) <= 20 * 5 + 1, "progress is throttled"
        await still_serving(client)


async def test_requests_to_the_client_are_refused_and_roots_answered_only_when_configured(tmp_path: Path,
                                                                                       kind: str) -> None:
    roots = [{"uri": "file:///data", "name": "data"}]
    async with running_supervisor(tmp_path, doc(tmp_path, kind, "requests")) as (_app, client):
        refused = await client.call("requests.echo", {"text": "x"})
        assert refused.status is Status.OK
        text = refused.output
        for method in ("sampling/createMessage", "elicitation/create", "roots/list"):
            assert f"{method}: error" in text, text[:500]
    async with running_supervisor(tmp_path, doc(tmp_path, kind, "requests", roots=roots)) as (_app, client):
        answered = await client.call("requests.echo", {"text": "x"})
        assert "roots/list: result" in answered.output and "file:///data" in answered.output
        assert "sampling/createMessage: error" in answered.output


async def test_hostile_tool_lists_are_filtered_and_pages_followed(tmp_path: Path, kind: str) -> None:
    async with running_supervisor(tmp_path, doc(tmp_path, kind, "bad-tools", "paged")) as (_app, client):
        names = {t.name for t in await client.list_tools()}
        bad = {n for n in names if n.startswith("bad_tools.")}
        assert 0 < len(bad) <= 512 and all(" " not in n and "\n" not in n for n in bad)
        for tool in await client.list_tools():
            assert "\x1b" not in tool.description and "ignore previous instructions" not in tool.description.lower()
        assert {n for n in names if n.startswith("paged.")} >= {"paged.echo"}


async def test_a_warm_pooled_server_serves_one_call_with_its_server_already_initialized(tmp_path: Path,
                                                                                       kind: str) -> None:
    d = doc(tmp_path, kind, "ok", pool={"size": 1})
    async with running_supervisor(tmp_path, d) as (app, client):
        pools = app.supervisor.pools
        for _ in range(300):
            if pools.ready("ok.echo") == 1:
                break
            await asyncio.sleep(0.05)
        result = await client.call("ok.echo", {"text": "warm"})
        assert result.status is Status.OK and result.content[0]["text"] == "warm"
        assert pools.stats()["ok.echo"].hits == 1
        assert "initialized" in result.stderr


@pytest.mark.parametrize("pooled", [False, True])
async def test_a_granted_secret_reaches_only_its_servers_sandbox_and_never_leaves(tmp_path: Path, kind: str,
                                                                                 pooled: bool) -> None:
    key = generate_key()
    store = tmp_path / "secrets.json"
    SecretStore(store, base64.b64decode(key)).set("canary", CANARY)
    pool = {"pool": {"size": 1}} if pooled else {}
    d = doc(tmp_path, kind, "ok", **pool)
    d["secrets"] = {"store": str(store)}
    d["servers"][0]["secrets"] = [{"name": "canary", "env": "API_KEY"}]
    d["servers"].append({**d["servers"][0], "name": "ungranted", "secrets": []})
    async with running_supervisor(tmp_path, d, environ={"TOOLCELL_SECRETS_KEY": key}) as (app, client):
        if pooled:
            for _ in range(300):
                if app.supervisor.pools.ready("ok.secret") == 1:
                    break
                await asyncio.sleep(0.05)
        granted = await client.call("ok.secret", {})
        ungranted = await client.call("ungranted.secret", {})
    assert granted.status is Status.OK and CANARY not in repr(granted)
    assert granted.output.startswith("[REDACTED:") and granted.redactions, "it had the value; it was redacted"
    assert ungranted.status is Status.OK and ungranted.output in ("", "None") and not ungranted.redactions
