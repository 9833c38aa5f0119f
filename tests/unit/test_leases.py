"""Several supervisors on one engine: unique instance names and sandbox leases (fake backend, no engine).

The real-engine twin is tests/integration/test_two_supervisors.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from toolcell import instance
from toolcell.backends.fake import FakeBackend, FakeProcess
from toolcell.model import InvocationRequest, Status
from toolcell.policy.spec import LEASE_MARGIN_S, fingerprint
from toolcell.settings import parse_config
from toolcell.supervisor import Supervisor


async def sleeper(proc: FakeProcess) -> int:
    await asyncio.sleep(float(json.loads(proc.stdin).get("s", 3600)))
    return 0


def doc(tmp_path: Path, name: str, **server: Any) -> dict[str, Any]:
    return {"version": 1, "server": {"listen": f"unix://{tmp_path}/{name}.sock", **server},
            "profiles": {"default": {"timeout": "5s", "kill_grace": "1s"}},
            "tools": [{"name": "sleep", "description": "sleeps", "image": "img", "command": ["x"]}]}


@pytest.mark.parametrize(("server", "environ", "expected"), [
    ({"instance": "edge-1"}, {}, "edge-1"),
    ({}, {"TOOLCELL_INSTANCE": "edge 1/\nx"}, "edge-1--x"),
    ({"instance": "edge-1"}, {"TOOLCELL_INSTANCE": "from-env"}, "from-env"),
    ({}, {"TOOLCELL_INSTANCE": "from-env"}, "from-env"),
])
def test_an_explicit_instance_name_wins_and_is_cleaned(tmp_path: Path, server: dict[str, Any],
                                                      environ: dict[str, str], expected: str) -> None:
    config = parse_config(doc(tmp_path, "a", **server), environ=environ)
    assert instance.resolved(config).server.instance == expected


def test_unique_by_default_and_the_same_across_restarts(tmp_path: Path) -> None:
    a = instance.resolved(parse_config(doc(tmp_path, "a"), environ={})).server.instance
    b = instance.resolved(parse_config(doc(tmp_path, "b"), environ={})).server.instance
    again = instance.resolved(parse_config(doc(tmp_path, "a"), environ={})).server.instance
    assert a != b and a == again, "two sockets: two instances; a restart of one: the same instance"
    assert a.rsplit("-", 1)[0] == b.rsplit("-", 1)[0], "both carry this host's name"
    assert (tmp_path / "a.sock.state.instance").stat().st_mode & 0o777 == 0o600


def test_an_unwritable_state_directory_still_gives_a_unique_name(tmp_path: Path) -> None:
    config = parse_config({**doc(tmp_path, "a"), "server": {"listen": f"unix://{tmp_path}/a.sock",
                                                           "state_file": str(tmp_path / "missing" / "s")}},
                          environ={})
    first, second = (instance.resolved(config).server.instance for _ in range(2))
    assert first != second


def test_leases_cover_timeout_grace_and_for_a_pool_its_ttl(tmp_path: Path) -> None:
    config = instance.resolved(parse_config(doc(tmp_path, "a"), environ={}))
    spec = config.compile(config.resolve("sleep"), "inv_x")
    assert spec.lease_s == 5 + 1 + LEASE_MARGIN_S
    shorter = config.compile(config.resolve("sleep"), "inv_y", timeout_s=1.0)
    assert shorter.lease_s == 1 + 1 + LEASE_MARGIN_S
    assert fingerprint(spec) == fingerprint(shorter), "a lease never keeps a call from a warm sandbox"


async def test_a_sweep_removes_only_expired_sandboxes_of_any_owner() -> None:
    backend = FakeBackend({"img": sleeper})
    now = [1000.0]
    backend.clock = lambda: now[0]
    a = Supervisor(parse_config({**doc(Path("/nonexistent"), "a", instance="a")}, environ={}), backend)
    b = Supervisor(parse_config({**doc(Path("/nonexistent"), "b", instance="b")}, environ={}), backend)
    b.clock = backend.clock
    await a.start()
    running = asyncio.ensure_future(a.execute(InvocationRequest(tool="sleep", arguments_json='{"s": 0.5}'),
                                              _ignore))
    while not backend.live:
        await asyncio.sleep(0.01)
    live = backend.live[0]
    lease = backend.specs[live].identity.lease_until
    assert lease == 1000.0 + 5 + 1 + LEASE_MARGIN_S
    await b.start()  # b's start-up sweep: a's sandbox is within its lease
    assert backend.live == [live]
    result = await running
    assert result.status is Status.OK
    # A crashed owner's sandbox (never removed by it) goes once its lease ended, whoever sweeps.
    orphan = await backend.create(a.config.compile(a.config.resolve("sleep"), "inv_orphan"))
    await orphan.start(b'{"s": 3600}\n')
    now[0] = backend.specs[orphan.id].identity.lease_until - 1
    assert await b.sweep_expired() == []
    now[0] += 2
    removed = await b.sweep_expired()
    assert [(r.sandbox_id, r.invocation_id, r.owner) for r in removed] == [(orphan.id, "inv_orphan", "a")]
    await a.shutdown()
    await b.shutdown()
    assert backend.live == []


async def _ignore(event: object) -> None:
    return None
