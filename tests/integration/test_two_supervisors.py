"""Two supervisors on one engine (docker and oci): neither removes the other's live sandboxes, and a crashed
one's leftovers are removed by the survivor once their lease ended.

Before instances were unique and sandboxes leased, every shipped config said ``instance: default``: the
second supervisor's start-up sweep removed the first one's running sandbox (its caller got ``INTERNAL:
... No such container``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from tests.support import config_doc, left_behind, serving
from toolcell.model import Status
from toolcell.settings import parse_config

BACKENDS = ["docker", "oci"]
SLEEP = "import time\nprint('up', flush=True)\ntime.sleep(3)\nprint('done')\n"


def doc(tmp_path: Path, name: str, kind: str) -> dict[str, Any]:
    d = config_doc("unused", str(tmp_path / f"{name}.sock"))
    del d["server"]["instance"]  # unique by default
    d["engine"] = {"kind": kind}
    d["tools"] = [t for t in d["tools"] if t["name"] in ("python.run", "text.wordcount")]
    return d


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_second_supervisor_never_removes_the_firsts_live_sandboxes(tmp_path: Path, kind: str) -> None:
    async with serving(parse_config(doc(tmp_path, "a", kind), environ={})) as (app_a, client_a):
        call = asyncio.ensure_future(client_a.call("python.run", {"code": SLEEP}))
        owner_a = app_a.supervisor.config.server.instance
        backend_a = app_a.supervisor.backend
        for _ in range(200):
            if await backend_a.list_sandboxes(owner_a):
                break
            await asyncio.sleep(0.05)
        running = await backend_a.list_sandboxes(owner_a)
        assert running, "a's call is running"
        async with serving(parse_config(doc(tmp_path, "b", kind), environ={})) as (app_b, client_b):
            owner_b = app_b.supervisor.config.server.instance
            assert owner_b != owner_a and owner_a.rsplit("-", 1)[0] == owner_b.rsplit("-", 1)[0]
            assert await app_b.supervisor.sweep_expired() == []
            assert (await client_b.call("text.wordcount", {"text": "b works"})).status is Status.OK
            assert await backend_a.list_sandboxes(owner_a) == running, "b's start-up and sweeps left a's alone"
            result = await call
        assert result.status is Status.OK and result.output.endswith("done\n"), result.message


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_crashed_supervisors_sandbox_goes_when_its_lease_ends(tmp_path: Path, kind: str) -> None:
    crashed = parse_config({**doc(tmp_path, "crashed", kind), "server": {
        "listen": f"unix://{tmp_path}/crashed.sock", "instance": f"crashed-{tmp_path.name[-12:]}"}}, environ={})
    async with serving(parse_config(doc(tmp_path, "b", kind), environ={})) as (app_b, _):
        backend = app_b.supervisor.backend  # the same engine; the "crashed" owner made this and died
        spec = crashed.compile(crashed.resolve("python.run"), "inv_crashed")
        spec = dataclasses.replace(spec, lease_s=2.0)
        orphan = await backend.create(spec)
        await orphan.start(json.dumps({"code": SLEEP.replace("3", "3600")}).encode() + b"\n")
        owner = crashed.server.instance
        assert await backend.list_sandboxes(owner) == [orphan.id]
        assert await app_b.supervisor.sweep_expired() == [], "within its lease: left alone"
        removed = []
        for _ in range(60):  # the lease (2 s, whole seconds on the engine's label) ends within ~3 s
            await asyncio.sleep(0.25)
            removed = await app_b.supervisor.sweep_expired()
            if removed:
                break
        assert [(r.sandbox_id, r.invocation_id, r.owner) for r in removed] == [(orphan.id, "inv_crashed", owner)]
        assert await backend.list_sandboxes(owner) == []
        assert await left_behind(crashed) == []
