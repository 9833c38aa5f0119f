"""Every invocation that got an id ends with exactly one audit record, a span status and a log line,
whatever ended it (issue 14): result, error, Cancel RPC, client disconnect, deadline, shutdown, an
internal error, and a crashed supervisor's sandbox removed by the next start's sweep.

Real engine, real grpc.aio supervisor, real client; each case also checks the supervisor keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import LOGS, SPANS
from tests.support import config_doc, engine, leftovers
from toolcell import pipeline
from toolcell.audit import verify
from toolcell.backends.factory import open_backend
from toolcell.client import Client, ClientError
from toolcell.model import OutputChunk, Started, Status
from toolcell.pipeline import compile_step, resolve
from toolcell.server.app import App
from toolcell.settings import Config, parse_config
from toolcell.supervisor import Supervisor

SLEEP = json.dumps({"code": "import time\nprint('up', flush=True)\ntime.sleep(60)"})


@pytest.fixture(autouse=True)
def _engine_present() -> None:
    engine()


def _config(tmp_path: Path, owner: str | None = None) -> Config:
    owner = owner or f"test-{uuid.uuid4().hex[:10]}"
    doc = config_doc(owner, str(tmp_path / "toolcell.sock"))
    doc["audit"] = {"file": str(tmp_path / "audit" / "audit.jsonl")}
    return parse_config(doc, environ={}, base_dir=tmp_path)


def _records(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ends(tmp_path: Path, invocation_id: str) -> list[dict[str, Any]]:
    return [r for r in _records(tmp_path) if r["event"] == "invocation_end" and r.get("invocation_id") == invocation_id]


def _span_statuses(invocation_id: str) -> tuple[StatusCode, StatusCode, str]:
    """Status of the server span and of the invocation span, and the server span's ``toolcell.ending``."""
    spans = SPANS.get_finished_spans()
    inv = [s for s in spans if s.name == "toolcell.invocation"
           and (s.attributes or {}).get("toolcell.invocation_id") == invocation_id]
    assert inv, f"no toolcell.invocation span for {invocation_id}"
    trace_id = inv[0].context.trace_id
    server = [s for s in spans if s.context.trace_id == trace_id and s.kind is SpanKind.SERVER
              and s.name.startswith("toolcell.v1.Supervisor/")]
    assert server, "no server span in the invocation's trace"
    return (server[0].status.status_code, inv[0].status.status_code,
            str((server[0].attributes or {}).get("toolcell.ending")))


async def _until_output(events: AsyncIterator[Any]) -> str:
    invocation_id = ""
    async for event in events:
        if isinstance(event, Started):
            invocation_id = event.invocation_id
        if isinstance(event, OutputChunk):
            return invocation_id
    raise AssertionError("the tool printed nothing")


async def _still_serving(client: Client) -> None:
    result = await client.call("text.wordcount", json.dumps({"text": "still here"}), timeout=60)
    assert result.status is Status.OK


# --- one case per ending: run it, return the invocation id and the ending/status expected -------------------

async def _ok(app: App, client: Client) -> tuple[str, str, str]:
    result = await client.call("text.wordcount", json.dumps({"text": "a b"}), invocation_id="inv_end_ok_1")
    assert result.status is Status.OK
    return "inv_end_ok_1", "result", "ok"


async def _invalid(app: App, client: Client) -> tuple[str, str, str]:
    with pytest.raises(ClientError) as info:
        await client.call("text.wordcount", json.dumps({"text": 5}), invocation_id="inv_end_invalid_1")
    assert info.value.code == "INVALID_ARGUMENT"
    return "inv_end_invalid_1", "error", "INVALID_ARGUMENT"


async def _cancel_rpc(app: App, client: Client) -> tuple[str, str, str]:
    events = client.execute("python.run", SLEEP, invocation_id="inv_end_cancel_1")
    await _until_output(events)
    await client.cancel("inv_end_cancel_1")
    results = [e async for e in events]
    assert results[-1].status is Status.KILLED
    return "inv_end_cancel_1", "result", "killed"


async def _disconnect(app: App, client: Client) -> tuple[str, str, str]:
    events = client.execute("python.run", SLEEP, invocation_id="inv_end_gone_1")
    await _until_output(events)
    await events.aclose()  # the caller goes away mid-call (MCP cancellation through the bridge looks the same)
    await _wait_for_end(app, "inv_end_gone_1")
    return "inv_end_gone_1", "disconnected", "disconnected"


async def _deadline(app: App, client: Client) -> tuple[str, str, str]:
    # Shorter than creating a sandbox: gRPC cancels the handler when the deadline passes.
    with pytest.raises(ClientError) as info:
        await client.call("python.run", SLEEP, invocation_id="inv_end_deadline_1", timeout=0.15)
    assert info.value.code == "DEADLINE_EXCEEDED"
    await _wait_for_end(app, "inv_end_deadline_1")
    return "inv_end_deadline_1", "deadline", "deadline"


async def _internal(app: App, client: Client) -> tuple[str, str, str]:
    original = pipeline.finalize

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug in finalize")

    pipeline.finalize = broken  # type: ignore[assignment]
    try:
        with pytest.raises(ClientError) as info:
            await client.call("text.wordcount", json.dumps({"text": "x"}), invocation_id="inv_end_bug_1")
    finally:
        pipeline.finalize = original
    assert info.value.code == "INTERNAL" and "internal error" in str(info.value)
    assert "a bug in finalize" not in str(info.value)  # the traceback stays in the supervisor's log
    return "inv_end_bug_1", "internal_error", "INTERNAL"


async def _wait_for_end(app: App, invocation_id: str) -> None:
    """Until the cut-off call's handler has run its ``finally`` (the supervisor forgets it just before)."""
    for _ in range(200):
        if not app.supervisor.in_flight:
            break
        await asyncio.sleep(0.05)
    await asyncio.wait_for(app.service.flush(), 10)


Case = Callable[[App, Client], Awaitable[tuple[str, str, str]]]
CASES: dict[str, Case] = {"ok": _ok, "invalid": _invalid, "cancel_rpc": _cancel_rpc, "disconnect": _disconnect,
                          "deadline": _deadline, "internal": _internal}


@pytest.mark.parametrize("case", list(CASES))
async def test_each_ending_leaves_exactly_one_record_a_span_status_and_a_log_line(tmp_path: Path, case: str) -> None:
    config = _config(tmp_path)
    app = App(Supervisor(config, open_backend(config)))
    client = Client(await app.start())
    finished = sum("invocation finished" in line for line in LOGS.lines)
    try:
        invocation_id, ending, status = await CASES[case](app, client)
        await app.service.flush()
        assert sum("invocation finished" in line for line in LOGS.lines) == finished + 1
        await _still_serving(client)
        await app.service.flush()
        ends = _ends(tmp_path, invocation_id)
        assert len(ends) == 1, ends
        assert ends[0]["ending"] == ending and ends[0]["status"] == status
        server, invocation, span_ending = _span_statuses(invocation_id)
        assert span_ending == ending
        # The invocation span is ERROR unless the tool ran ok; the RPC's span is ERROR unless there is a result.
        assert (invocation is StatusCode.ERROR) == (status != "ok")
        assert (server is StatusCode.ERROR) == (ending != "result")
    finally:
        await client.close()
        await app.stop(grace_s=1.0)
    assert leftovers(engine(), config.server.instance) == []
    assert verify([tmp_path / "audit" / "audit.jsonl"]).ok


async def test_shutdown_mid_call_leaves_one_record(tmp_path: Path) -> None:
    config = _config(tmp_path)
    app = App(Supervisor(config, open_backend(config)))
    client = Client(await app.start())
    events = client.execute("python.run", SLEEP, invocation_id="inv_end_shutdown_1")
    await _until_output(events)
    stopping = asyncio.ensure_future(app.stop(grace_s=0.2))
    with pytest.raises((ClientError, StopAsyncIteration)):
        async for _ in events:
            pass
        raise StopAsyncIteration
    await stopping
    await client.close()
    ends = _ends(tmp_path, "inv_end_shutdown_1")
    assert len(ends) == 1, ends
    # Killed by the shutdown (a result with status killed) or cut off with it: either way, on record once.
    assert (ends[0]["ending"], ends[0]["status"]) in {("result", "killed"), ("shutdown", "shutdown")}
    assert leftovers(engine(), config.server.instance) == []


async def test_a_crashed_runs_sandbox_is_recorded_by_the_next_starts_sweep(tmp_path: Path) -> None:
    owner = f"test-{uuid.uuid4().hex[:10]}"
    config = _config(tmp_path, owner)
    # What a killed supervisor leaves: a labelled sandbox of a running invocation, and nobody to remove it.
    backend = open_backend(config)
    plan = compile_step(config, resolve(config, "python.run"), "inv_end_crashed_1", 30.0)
    sandbox = await backend.create(plan)
    await sandbox.start(SLEEP.encode() + b"\n")
    await backend.close()
    assert len(leftovers(engine(), owner)) == 1
    app = App(Supervisor(config, open_backend(config)))
    client = Client(await app.start())
    try:
        assert leftovers(engine(), owner) == []
        ends = _ends(tmp_path, "inv_end_crashed_1")
        assert len(ends) == 1, ends
        assert ends[0]["ending"] == "swept" and ends[0]["tool"] == "python.run"
        await _still_serving(client)
    finally:
        await client.close()
        await app.stop(grace_s=1.0)
