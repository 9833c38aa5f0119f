"""Egress orchestration over the fake backend: order, per-invocation isolation, cleanup on every path.

Enforcement itself is proven against the real engine (tests/integration/test_egress.py); this checks
that the pipeline wires it: network before proxy before sandbox, each invocation its own network and
proxy with its own grants, everything removed afterwards, accounting carried into the Result.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from runtime.backends.fake import FakeBackend, FakeProcess
from runtime.egress.session import PROGRAM
from runtime.errors import BackendError
from runtime.model import Event, InvocationRequest, Result, Status
from runtime.policy.network import LABEL_ROLE, ROLE_PROXY
from runtime.settings import parse_config
from runtime.supervisor import Supervisor

PROXY_IMAGE = "toolcell/python:bookworm"
SUMMARY = [{"host": "allowed.test", "port": 443, "allowed": True, "reason": "", "connections": 2,
            "bytes_up": 10, "bytes_down": 20},
           {"host": "denied.test", "port": 443, "allowed": False, "reason": "not-granted", "connections": 1,
            "bytes_up": 0, "bytes_down": 0}]


async def fake_proxy(proc: FakeProcess) -> int:
    assert proc.stdin == PROGRAM
    await proc.stdout(b'{"event":"listening"}\n')
    await proc.stdout(json.dumps({"event": "summary", "destinations": SUMMARY}).encode() + b"\n")
    await asyncio.sleep(3600)
    return 0


async def broken_proxy(proc: FakeProcess) -> int:
    await proc.stderr(b"Traceback ...\nOSError: cannot assign requested address\n")
    return 1


async def tool(proc: FakeProcess) -> int:
    plan = proc.plan
    await proc.stdout(json.dumps({"network": plan.network_mode, "ip": plan.network_ip,
                                  "proxy": plan.env.get("HTTPS_PROXY", "")}).encode())
    return 0


def config(**egress: Any) -> Any:
    probe = {"description": "d", "image": "tool", "command": ["run"]}
    return parse_config({
        "version": 1,
        "server": {"instance": "unit-egress"},
        "egress": egress,
        "profiles": {"default": {"timeout": "5s", "kill_grace": "100ms"},
                     "a": {"network": ["allowed.test"]},
                     "b": {"network": [{"host": "*.other.test", "ports": [80]}]}},
        "tools": [{**probe, "name": "plain"}, {**probe, "name": "a", "profile": "a"},
                  {**probe, "name": "b", "profile": "b"}],
    })


async def run(sup: Supervisor, name: str) -> Result:
    async def emit(_: Event) -> None:
        return None

    return await sup.execute(InvocationRequest(tool=name, arguments_json="{}"), emit)


def policies(backend: FakeBackend) -> list[dict[str, Any]]:
    return [json.loads(p.env["TOOLCELL_EGRESS_POLICY"]) for p in backend.plans.values()
            if p.labels.get(LABEL_ROLE) == ROLE_PROXY]


async def test_granted_call_gets_its_own_network_and_proxy_then_both_go() -> None:
    backend = FakeBackend({PROXY_IMAGE: fake_proxy, "tool": tool})
    result = await run(Supervisor(config(), backend), "a")
    assert result.status is Status.OK, result.message
    seen = json.loads(result.output)
    [policy] = policies(backend)
    assert seen["network"].startswith("toolcell-egress-") and seen["proxy"] == f"http://{policy['listen']}:3128"
    assert seen["ip"].split(".")[:3] == policy["listen"].split(".")[:3]
    assert policy["grants"] == [{"host": "allowed.test", "ports": [443], "allow_private": False}]
    proxy_plan = next(p for p in backend.plans.values() if p.labels.get(LABEL_ROLE) == ROLE_PROXY)
    assert proxy_plan.extra_networks == ("toolcell-egress-unit-egress",) and proxy_plan.read_only_rootfs
    assert proxy_plan.cap_drop == ("ALL",) and proxy_plan.user == "10001:10001"
    assert [(d.host, d.allowed, d.connections, d.bytes_up, d.bytes_down) for d in result.egress] == [
        ("allowed.test", True, 2, 10, 20), ("denied.test", False, 1, 0, 0)]
    assert backend.live == []
    # The upstream network stays for the next call; the invocation's own network is gone.
    assert list(backend.networks) == ["toolcell-egress-unit-egress"]


async def test_ungranted_call_has_no_network_and_no_proxy() -> None:
    backend = FakeBackend({PROXY_IMAGE: fake_proxy, "tool": tool})
    result = await run(Supervisor(config(), backend), "plain")
    assert json.loads(result.output) == {"network": "none", "ip": "", "proxy": ""}
    assert result.egress == () and policies(backend) == [] and backend.networks == {}


async def test_concurrent_calls_have_separate_networks_and_allowlists() -> None:
    backend = FakeBackend({PROXY_IMAGE: fake_proxy, "tool": tool})
    sup = Supervisor(config(), backend)
    a, b = await asyncio.gather(run(sup, "a"), run(sup, "b"))
    assert json.loads(a.output)["network"] != json.loads(b.output)["network"]
    grants = sorted(json.dumps(p["grants"]) for p in policies(backend))
    assert grants == [json.dumps([{"host": "*.other.test", "ports": [80], "allow_private": False}]),
                      json.dumps([{"host": "allowed.test", "ports": [443], "allow_private": False}])]
    assert backend.live == []


async def test_a_proxy_that_fails_to_start_fails_the_call_and_leaves_nothing() -> None:
    backend = FakeBackend({PROXY_IMAGE: broken_proxy, "tool": tool})
    with pytest.raises(BackendError, match="egress proxy did not start: OSError: cannot assign"):
        await run(Supervisor(config(), backend), "a")
    tools = [p for p in backend.plans.values() if p.image == "tool"]
    assert tools == [] and backend.live == [] and list(backend.networks) == ["toolcell-egress-unit-egress"]


async def test_missing_proxy_image_is_a_precondition_error_and_leaves_nothing() -> None:
    from runtime.errors import ImageMissing

    backend = FakeBackend({"tool": tool})
    with pytest.raises(ImageMissing):
        await run(Supervisor(config(), backend), "a")
    assert backend.live == [] and list(backend.networks) == ["toolcell-egress-unit-egress"]


async def test_shutdown_sweep_removes_the_owners_networks() -> None:
    backend = FakeBackend({PROXY_IMAGE: fake_proxy, "tool": tool})
    sup = Supervisor(config(), backend)
    await run(sup, "a")
    await sup.shutdown()
    assert backend.networks == {}


async def test_an_admin_named_upstream_network_is_not_swept() -> None:
    backend = FakeBackend({PROXY_IMAGE: fake_proxy, "tool": tool})
    sup = Supervisor(config(network="corp-egress"), backend)
    await run(sup, "a")
    await sup.shutdown()
    assert list(backend.networks) == ["corp-egress"]


async def slow_proxy(proc: FakeProcess) -> int:
    await asyncio.sleep(0.6)
    return await fake_proxy(proc)


async def sleeper(proc: FakeProcess) -> int:
    await asyncio.sleep(3600)
    return 0


async def test_network_set_up_time_comes_out_of_the_callers_deadline() -> None:
    import time

    backend = FakeBackend({PROXY_IMAGE: slow_proxy, "tool": sleeper})
    sup = Supervisor(config(), backend)

    async def emit(_: Event) -> None:
        return None

    t0 = time.monotonic()
    result = await sup.execute(InvocationRequest(tool="a", arguments_json="{}", deadline_s=t0 + 1.5), emit)
    assert result.status is Status.TIMEOUT and time.monotonic() - t0 < 1.5
    assert backend.live == []


def test_the_audit_record_carries_the_egress_accounting() -> None:
    from runtime.gate import _result_fields
    from runtime.model import EgressDestination, Usage

    base = Result(status=Status.OK, exit_code=0, output="", stderr="", truncated=False, duration_ms=1,
                  usage=Usage(), trace_id="t", invocation_id="inv_x")
    import dataclasses

    granted = dataclasses.replace(base, egress=(EgressDestination("allowed.test", 443, True, "", 1, 5, 10),))
    assert "egress" not in _result_fields(base)
    assert _result_fields(granted)["egress"] == [{"host": "allowed.test", "port": 443, "allowed": True, "reason": "",
                                                  "connections": 1, "bytes_up": 5, "bytes_down": 10}]
