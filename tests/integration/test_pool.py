"""Warm pools against the real engine: single use, refill, fallback, TTL, crash and engine-side death,
no secret before the claim, and the pipeline's limits (timeout, caps, OOM, scrubbing) on the warm path.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import CANARY, LABEL_OWNER, RUNNER_IMAGE, config_doc, engine, running_supervisor
from toolcell.backends.docker import DockerBackend
from toolcell.model import Result, Started, Status
from toolcell.secretstore import SecretStore, generate_key
from toolcell.server.app import App
from toolcell.settings import parse_config
from toolcell.supervisor import Supervisor

pytestmark = pytest.mark.docker
PYRUN = ["python3", "-I", "-u", "/opt/toolcell/tools/pyrun.py"]
CODE = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}


# Every test runs over both ways a pooled sandbox talks to the supervisor (``backends/channel.py``).
TRANSPORT = "channel"


@pytest.fixture(params=["channel", "attach"], autouse=True)
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(__import__(__name__, fromlist=["TRANSPORT"]), "TRANSPORT", request.param)
    return str(request.param)


def with_transport(doc: dict[str, Any]) -> dict[str, Any]:
    if TRANSPORT == "attach":
        doc.setdefault("engine", {})["pool_channel"] = None
    return doc


async def eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def leftovers(client: Any, owner: str) -> list[str]:
    """Like tests.support.leftovers, without a per-container inspect that races removals."""
    return [c["Id"] for c in client.api.containers(all=True, filters={"label": f"{LABEL_OWNER}={owner}"})]


def pooled_doc(tmp_path: Path, size: int = 2, ttl: str = "5m", **profiles: dict[str, Any]) -> dict[str, Any]:
    doc = config_doc(f"test-{uuid.uuid4().hex[:10]}", str(tmp_path / "s.sock"), **profiles)
    doc["profiles"]["tight"]["pool"] = {"size": 1}
    doc["tools"][1]["pool"] = {"size": size, "ttl": ttl}  # python.run
    return with_transport(doc)


async def run(client: Any, tool: str, src: str) -> tuple[Result, str]:
    sandbox = ""
    async for event in client.execute(tool, json.dumps({"code": src})):
        if isinstance(event, Started):
            sandbox = event.sandbox_id
        elif isinstance(event, Result):
            return event, sandbox
    raise AssertionError("no result")


def pooled_ids(app: App, tool: str) -> set[str]:
    return {e.sandbox.id for e in app.supervisor.pools._pools[tool].ready}


async def test_pooled_sandboxes_are_single_use_refilled_and_leave_nothing(tmp_path: Path) -> None:
    docker_client = engine()
    async with running_supervisor(tmp_path, pooled_doc(tmp_path)) as (app, client):
        await eventually(lambda: app.supervisor.pools.ready("python.run") == 2)
        ready = pooled_ids(app, "python.run")
        # The first call leaves a file behind in its /tmp; the second must not see it.
        first, id1 = await run(client, "python.run", "import os; open('/tmp/left','w').write('x'); "
                                                     "print(os.getpid(), os.path.exists('/tmp/left'))")
        second, id2 = await run(client, "python.run", "import os; print(os.path.exists('/tmp/left'))")
        assert first.status is Status.OK and first.output.split()[1] == "True"
        assert second.status is Status.OK and second.output.strip() == "False"
        assert {id1, id2} <= ready and id1 != id2
        # Used sandboxes go (off the critical path); the pool is refilled with new ones.
        await eventually(lambda: not {id1, id2} & set(leftovers(docker_client, app.supervisor.config.server.instance)))
        await eventually(lambda: app.supervisor.pools.ready("python.run") == 2)
        assert not pooled_ids(app, "python.run") & {id1, id2}
        stats = app.supervisor.pools.stats()["python.run"]
        assert stats.hits == 2 and stats.created >= 4


async def test_an_empty_pool_falls_back_to_cold_and_every_call_succeeds(tmp_path: Path) -> None:
    async with running_supervisor(tmp_path, pooled_doc(tmp_path, size=1)) as (app, client):
        await eventually(lambda: app.supervisor.pools.ready("python.run") == 1)
        results = await asyncio.gather(*(run(client, "python.run", f"print({i})") for i in range(3)))
        assert [r.output.strip() for r, _ in results] == ["0", "1", "2"]
        assert all(r.status is Status.OK for r, _ in results)
        stats = app.supervisor.pools.stats()["python.run"]
        # One was ready; a call may also wait for the refill already in flight (claim_soon) instead of
        # starting another cold sandbox; the rest went cold. Every call was served either way.
        assert stats.hits >= 1 and stats.hits + stats.misses == 3, stats


async def test_ttl_recycles_pooled_sandboxes(tmp_path: Path) -> None:
    docker_client = engine()
    async with running_supervisor(tmp_path, pooled_doc(tmp_path, size=1, ttl="1s")) as (app, client):
        await eventually(lambda: app.supervisor.pools.ready("python.run") == 1)
        first = pooled_ids(app, "python.run")
        await eventually(lambda: bool(pooled_ids(app, "python.run")) and not pooled_ids(app, "python.run") & first)
        await eventually(lambda: not first & set(leftovers(docker_client, app.supervisor.config.server.instance)))
        result, _ = await run(client, "python.run", "print('fresh')")
        assert result.status is Status.OK and result.output == "fresh\n"


async def test_killed_pool_containers_are_rebuilt_and_never_handed_out(tmp_path: Path) -> None:
    """What an engine restart does to a pool: its containers die. They are replaced, never claimed."""
    docker_client = engine()
    async with running_supervisor(tmp_path, pooled_doc(tmp_path)) as (app, client):
        await eventually(lambda: app.supervisor.pools.ready("python.run") == 2)
        victims = pooled_ids(app, "python.run")
        for sid in victims:
            docker_client.api.kill(sid)
        await eventually(lambda: app.supervisor.pools.ready("python.run") == 2
                         and not pooled_ids(app, "python.run") & victims)
        result, sid = await run(client, "python.run", "print('ok')")
        assert result.status is Status.OK and sid not in victims
        assert app.supervisor.pools.stats()["python.run"].recycled >= 2


async def test_a_crashed_supervisors_pool_is_swept_at_the_next_start(tmp_path: Path) -> None:
    docker_client = engine()
    config = parse_config(pooled_doc(tmp_path), environ={}, base_dir=tmp_path)
    owner = config.server.instance
    crashed_backend = DockerBackend(channel_dir=config.engine.pool_channel_dir)
    crashed = Supervisor(config, crashed_backend)
    await crashed.start()
    await eventually(lambda: crashed.pools.ready("python.run") == 2)
    # "Crash": stop the pool's tasks without removing anything, as a killed process would.
    for pool in crashed.pools._pools.values():
        assert pool.task is not None
        pool.task.cancel()
    await crashed_backend.close()
    assert len(leftovers(docker_client, owner)) >= 2
    backend = DockerBackend(channel_dir=config.engine.pool_channel_dir)
    successor = Supervisor(config, backend)
    try:
        removed = await successor.start()
        assert removed >= 2
    finally:
        await successor.shutdown()
        await backend.close()
    assert leftovers(docker_client, owner) == []


async def test_no_secret_in_a_pooled_container_before_its_claim(tmp_path: Path) -> None:
    docker_client = engine()
    key = generate_key()
    store = tmp_path / "secrets.json"
    SecretStore(store, __import__("base64").b64decode(key)).set("canary", CANARY)
    doc = config_doc(f"test-{uuid.uuid4().hex[:10]}", str(tmp_path / "s.sock"))
    doc["profiles"]["default"]["pool"] = {"size": 1}  # every tool of the profile
    doc["secrets"] = {"store": str(store)}
    with_transport(doc)
    both = [{"name": "canary", "env": "CANARY_TOKEN"}, {"name": "canary", "file": "/run/secrets/canary"}]
    doc["tools"] = [t for t in doc["tools"] if t["name"] == "python.run"] + [
        {"name": "leaky", "description": "granted the canary twice", "image": RUNNER_IMAGE, "command": PYRUN,
         "input_schema": CODE, "secrets": both},
        {"name": "keyed", "description": "granted the canary as an environment variable", "image": RUNNER_IMAGE,
         "command": PYRUN, "input_schema": CODE, "secrets": both[:1]}]
    async with running_supervisor(tmp_path, doc, environ={"TOOLCELL_SECRETS_KEY": key}) as (app, client):
        pools = app.supervisor.pools
        await eventually(lambda: all(pools.ready(t) == 1 for t in ("python.run", "leaky", "keyed")))
        owner = app.supervisor.config.server.instance
        # Every container of this supervisor right now is a pooled one. The secret tools' launchers wait
        # without their tools: the secrets come with the claim.
        live = leftovers(docker_client, owner)
        leaky, keyed = pooled_ids(app, "leaky"), pooled_ids(app, "keyed")
        assert live and set(live) == pooled_ids(app, "python.run") | leaky | keyed
        for sid in live:
            info = docker_client.api.inspect_container(sid)
            assert info["Config"]["Labels"]["io.toolcell.tool"] in {"python.run", "leaky", "keyed"}
            assert not any(CANARY in e for e in info["Config"]["Env"]), "secret in the environment"
            # Nothing is mounted, but (channel transport) the channel's directory: read-only, and already
            # empty on the host (its listener is gone once the launcher connected).
            mounts = info["Mounts"]
            assert [(m["Destination"], m["RW"]) for m in mounts] == (
                [("/run/toolcell-channel", False)] if TRANSPORT == "channel" else [])
            assert all(not Path(m["Source"]).exists() for m in mounts)
            # The secret file's directory is the sandbox's own empty tmpfs until the claim.
            assert ("/run/secrets" in info["HostConfig"]["Tmpfs"]) is (sid in leaky)
            # Inside: every process's environment, and every file it can write or read in its scratch.
            probe = docker_client.api.exec_create(sid, ["sh", "-c",
                                                        "cat /proc/[0-9]*/environ; grep -rs . /tmp /run || true; "
                                                        "echo channel-entries:$(ls -A /run/toolcell-channel | wc -l);"
                                                        "echo secret-entries:$(ls -A /run/secrets | wc -l)"],
                                                  user="10001:10001")
            seen = docker_client.api.exec_start(probe["Id"]).decode(errors="replace")
            assert "LANG=C.UTF-8" in seen, "the probe must actually read the environments"
            assert CANARY not in seen
            assert "channel-entries:0" in seen and "secret-entries:0" in seen  # empty, or not there at all
        # Served warm, the secrets delivered with the claim; printed, they are redacted.
        digest = hashlib.sha256(CANARY.encode()).hexdigest()  # the secret itself never goes in the arguments
        for tool, pooled, src in [
                ("keyed", keyed, "t = os.environ['CANARY_TOKEN']"),
                ("leaky", leaky, "t = os.environ['CANARY_TOKEN']; assert t == open('/run/secrets/canary').read(); "
                                 "assert oct(os.stat('/run/secrets/canary').st_mode & 0o777) == '0o400'")]:
            result, sid = await run(client, tool, f"import hashlib, os; {src}; "
                                    f"print(hashlib.sha256(t.encode()).hexdigest() == {digest!r}, t)")
            assert result.status is Status.OK, (tool, result.stderr)
            assert (sid in pooled) if pooled else (sid not in live), (tool, "warm" if pooled else "cold")
            assert result.output.startswith("True ") and CANARY not in result.output, tool
            assert "[REDACTED" in result.output, tool


async def test_timeout_caps_oom_and_scrubbing_hold_on_the_warm_path(tmp_path: Path) -> None:
    async with running_supervisor(tmp_path, pooled_doc(tmp_path)) as (app, client):
        pools = app.supervisor.pools

        async def warm(src: str) -> Result:
            await eventually(lambda: pools.ready("python.tight") == 1)
            expected = pooled_ids(app, "python.tight")
            result, sid = await run(client, "python.tight", src)
            assert sid in expected, "served by the pool"
            return result

        hits = pools.stats
        timed_out = await warm("import time; print('started', flush=True); time.sleep(60)")
        assert timed_out.status is Status.TIMEOUT and timed_out.output == "started\n"
        assert timed_out.exit_code in (128 + signal.SIGTERM, 128 + signal.SIGKILL)
        capped = await warm("import sys; sys.stdout.write('x' * 200_000); sys.stdout.flush()")
        assert capped.status is Status.OK and capped.truncated and capped.stdout_bytes == 200_000
        assert len(capped.output) == 64 * 1024
        oom = await warm("b = bytearray(200 * 1024 * 1024); print('survived')")
        assert oom.status is Status.OOM
        scrubbed = await warm(r"print('\x1b[31mred\x1b[0m \x1etoolcell-end:' + '0' * 32 + ':000')")
        assert scrubbed.status is Status.OK and "\x1b" not in scrubbed.output and "red" in scrubbed.output
        assert "toolcell-end" in scrubbed.output, "a forged trailer (wrong nonce) is only output"
        # Cancel: the same terminate step as on the cold path.
        await eventually(lambda: pools.ready("python.tight") == 1)
        expected = pooled_ids(app, "python.tight")
        cancelled: Result | None = None
        async for event in client.execute("python.tight", json.dumps({"code": "import time; time.sleep(60)"})):
            if isinstance(event, Started):
                assert event.sandbox_id in expected
                assert await client.cancel(event.invocation_id)
            elif isinstance(event, Result):
                cancelled = event
        assert cancelled is not None and cancelled.status is Status.KILLED
        assert hits()["python.tight"].hits == 5


async def test_the_tool_cannot_reach_the_channel_or_the_launchers_connections(tmp_path: Path) -> None:
    code = ("import os, socket, stat\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect('/run/toolcell-channel/c.sock'); print('connect ok')\n"
            "except OSError as e:\n    print('connect', e.errno)\n"
            "try:\n    print('fds', os.listdir(f'/proc/{os.getppid()}/fd'))\n"
            "except OSError as e:\n    print('fds', e.errno)\n"
            "print('stdout', 'socket' if stat.S_ISSOCK(os.fstat(1).st_mode) else 'pipe')\n")
    async with running_supervisor(tmp_path, pooled_doc(tmp_path)) as (app, client):
        await eventually(lambda: app.supervisor.pools.ready("python.run") == 2)
        expected = pooled_ids(app, "python.run")
        result, sid = await run(client, "python.run", code)
    assert sid in expected and result.status is Status.OK, result
    assert result.output.splitlines() == [
        f"connect {errno.ENOENT}",  # the listener was removed before the tool was started
        f"fds {errno.EACCES}",  # the launcher (its parent, holding the control connection) is not dumpable
        "stdout socket" if TRANSPORT == "channel" else "stdout pipe"]
