"""The gate's refusal accounting and invocation-end records, on a real audit file and a fake clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from toolcell.access_settings import SecuritySettings, parse_security
from toolcell.audit import MAX_RECORD_BYTES, AuditLog, verify
from toolcell.endings import ENDINGS
from toolcell.errors import (
    ConfigError,
    InvalidArguments,
    InvocationNotFound,
    PermissionDenied,
    RateLimited,
    ToolNotFound,
    Unauthenticated,
)
from toolcell.gate import SUPPRESS_WINDOW_S, Gate
from toolcell.model import Result, Status, Usage
from toolcell.policy.access import AccessPolicy, PeerCred, Principal, parse_rules
from toolcell.policy.limits import BucketSpec


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    clock = FakeClock()
    audit = AuditLog(tmp_path / "audit.jsonl")
    security = SecuritySettings(refusals_per_peer=BucketSpec(rate=1.0, burst=5),
                                policy=AccessPolicy(rules=parse_rules([{"match": {"uid": 1000}, "tools": ["text.*"]}])))
    gate = Gate(security, audit=audit, clock=clock, known_tool={"text.echo"}.__contains__)
    yield gate, clock, tmp_path / "audit.jsonl"
    audit.close()


ME = Principal(peer=PeerCred(uid=1000, gid=1000, pid=42))


@pytest.mark.parametrize(("exc", "charged"), [
    (None, True),
    (Unauthenticated("no token"), True),
    (PermissionDenied("no"), True),
    (InvalidArguments("bad"), True),
    (ToolNotFound("x"), True),
    (InvocationNotFound("x"), True),
    (RateLimited("slow down", 1000), False),  # the limiter's own answer is not a refusal of the caller's doing
    (RuntimeError("bug"), False),
])
async def test_which_refusals_spend_the_budget(setup: Any, exc: BaseException | None, charged: bool) -> None:
    gate, _clock, _path = setup
    for _ in range(5):
        gate.refused("uid:1000", exc)
    if charged:
        with pytest.raises(RateLimited) as err:
            await gate.check_peer("uid:1000")
        assert err.value.retry_after_ms == 1000
    else:
        await gate.check_peer("uid:1000")


async def test_a_flood_writes_one_summary_per_peer_per_window(setup: Any) -> None:
    gate, clock, path = setup
    for _ in range(5):
        await gate.check_peer("uid:65534")
        gate.refused("uid:65534")
    refused = 0
    for _ in range(1000):
        try:
            await gate.check_peer("uid:65534")
        except RateLimited:
            refused += 1
    assert refused == 1000
    await gate.check_peer("uid:1000")  # another peer is not affected
    summaries = [r for r in _records(path) if r["event"] == "refusals_suppressed"]
    assert [(s["peer"], s["count"]) for s in summaries] == [("uid:65534", 1)]  # the first, at once
    clock.now += SUPPRESS_WINDOW_S  # the bucket refilled: five more refusals get through and spend it
    for _ in range(5):
        gate.refused("uid:65534")
    with pytest.raises(RateLimited):
        await gate.check_peer("uid:65534")  # a new window: the count so far is written at once
    summaries = [r for r in _records(path) if r["event"] == "refusals_suppressed"]
    assert [s["count"] for s in summaries] == [1, 1000]
    with pytest.raises(RateLimited):
        await gate.check_peer("uid:65534")  # counted, not written
    assert len([r for r in _records(path) if r["event"] == "refusals_suppressed"]) == 2
    await gate.flush_refusals()  # at shutdown: the pending count
    await gate.flush_refusals()  # nothing pending: nothing written
    summaries = [r for r in _records(path) if r["event"] == "refusals_suppressed"]
    assert [s["count"] for s in summaries] == [1, 1000, 1]
    assert gate.state_sizes()["refusal_peers"] == 1 and gate.state_sizes()["suppressed_peers"] == 1
    assert verify([path]).ok


async def test_authorize_quotes_a_huge_tool_name_briefly(setup: Any) -> None:
    gate, _clock, path = setup
    name = "a." * 2**19
    with pytest.raises(PermissionDenied) as err:
        await gate.authorize(ME, "call", name)
    assert len(str(err.value)) < 300 and "...(1048576 chars)" in str(err.value)
    assert len(path.read_bytes()) <= MAX_RECORD_BYTES


def _result(**kw: Any) -> Result:
    base: dict[str, Any] = {"status": Status.OK, "exit_code": 0, "output": "hi", "stderr": "", "truncated": False,
                            "duration_ms": 5, "usage": Usage(peak_memory_bytes=1, cpu_time_ns=2),
                            "trace_id": "t" * 32, "invocation_id": "inv-1"}
    return Result(**{**base, **kw})


@pytest.mark.parametrize(("result", "action", "verdict"), [
    (_result(), "", {"markers": {}, "action": "none"}),
    (_result(injection_markers={"ignore_previous": 1}), "flag", {"markers": {"ignore_previous": 1}, "action": "flag"}),
    (_result(injection_markers={"role_tag": 2}), "", {"markers": {"role_tag": 2}, "action": "flag"}),
    (_result(injection_markers={"role_tag": 1}, output="<untrusted-tool-output id=\"x\" ...>"), "",
     {"markers": {"role_tag": 1}, "action": "wrap"}),
    (_result(status=Status.DENIED, injection_markers={"role_tag": 1}, output="",
             message="output withheld: prompt-injection markers found (role_tag)"), "",
     {"markers": {"role_tag": 1}, "action": "block"}),
])
async def test_invocation_end_carries_the_injection_verdict(setup: Any, result: Result, action: str,
                                                            verdict: dict[str, Any]) -> None:
    gate, _clock, path = setup
    await gate.invocation_end(ME, "text.echo", "{}", result=result, profile="default", ending="result",
                              injection_action=action)
    record = _records(path)[-1]
    assert record["injection"] == verdict
    assert record["ending"] == "result" and record["invocation_id"] == "inv-1"
    assert record["status"] == result.status.value


@pytest.mark.parametrize("ending", [e for e in ENDINGS if e not in ("result", "swept")])
async def test_every_ending_without_a_result_has_one_record(setup: Any, ending: str) -> None:
    gate, _clock, path = setup
    await gate.invocation_end(ME, "text.echo", '{"a": 1}', status=ending if ending != "error" else "NOT_FOUND",
                              duration_ms=7, trace_id="t" * 32, invocation_id="inv-2", ending=ending,
                              profile="default")
    [record] = _records(path)
    assert (record["event"], record["ending"], record["invocation_id"]) == ("invocation_end", ending, "inv-2")
    assert record["arguments_bytes"] == 8 and record["principal"]["id"] == "uid:1000"


async def test_legacy_call_shape_still_works(setup: Any) -> None:
    """service.py's call before the switch: no ending, no invocation id."""
    gate, _clock, path = setup
    await gate.invocation_end(ME, "text.echo", "{}", status="NOT_FOUND", duration_ms=1, trace_id="t")
    await gate.invocation_end(ME, "text.echo", "{}", result=_result(), profile="default")
    endings = [r["ending"] for r in _records(path)]
    assert endings == ["error", "result"]


async def test_sweep_end_records_a_crashed_supervisors_invocation(setup: Any) -> None:
    gate, _clock, path = setup
    await gate.sweep_end("inv-9", "text.echo", "old-instance", sandbox_id="abc123")
    [record] = _records(path)
    assert (record["ending"], record["status"], record["owner_instance"], record["sandbox_id"]) == (
        "swept", "swept", "old-instance", "abc123")
    assert record["principal"] == {"id": "unknown"}


@pytest.mark.parametrize(("rate_limits", "expected"), [
    ({}, BucketSpec(rate=5.0, burst=20)),  # the safe default
    ({"refusals_per_peer": {"rate": 1, "burst": 3}}, BucketSpec(rate=1.0, burst=3)),
    ({"refusals_per_peer": {"burst": 50}}, BucketSpec(rate=5.0, burst=50)),
    ({"refusals_per_peer": "off"}, None),
    ({"refusals_per_peer": False}, None),
    ({"refusals_per_peer": "sometimes"}, ConfigError),
    ({"refusals_per_peer": {"rate": 0}}, ConfigError),
])
def test_refusal_budget_setting(tmp_path: Path, rate_limits: dict[str, Any], expected: Any) -> None:
    doc = {"rate_limits": rate_limits, "audit": {"file": "audit.jsonl", "protect": "90m"}}
    if expected is ConfigError:
        with pytest.raises(ConfigError, match=r"rate_limits\.refusals_per_peer"):
            parse_security(doc, listen=f"unix://{tmp_path}/s.sock", base_dir=tmp_path, runtime_dir=str(tmp_path))
        return
    settings = parse_security(doc, listen=f"unix://{tmp_path}/s.sock", base_dir=tmp_path, runtime_dir=str(tmp_path))
    assert settings.refusals_per_peer == expected
    assert settings.audit is not None and settings.audit.protect_s == 5400.0
