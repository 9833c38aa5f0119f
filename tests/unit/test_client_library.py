"""The client library against a real gRPC server whose behaviour the test scripts (no engine needed).

The scripted servicer fails with chosen status codes, counts attempts and records the metadata it
received, so retries, deadlines, the status -> exception table and trace propagation are observed on
the wire rather than assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from toolcell.api.v1 import supervisor_pb2 as pb
from toolcell.api.v1 import supervisor_pb2_grpc as pb_grpc
from toolcell.client import (
    STATUS_ERRORS,
    Client,
    ClientError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    SyncClient,
    UnavailableError,
)
from toolcell.model import Result, Started, Status
from toolcell.policy.annotations import derived_annotations, safe_to_retry, tool_annotations
from toolcell.policy.profile import IsolationProfile

FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


class Scripted(pb_grpc.SupervisorServicer):
    """Fails the first ``fail_first`` calls of each method with ``code``; then answers."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.UNAVAILABLE
        self.fail_first = 0
        self.attempts: dict[str, int] = {"Execute": 0, "Call": 0, "ListTools": 0, "Cancel": 0}
        self.legacy = False  # an older supervisor, without the unary Call
        self.metadata: list[dict[str, str]] = []
        self.fail_after_started = False
        self.delay_s = 0.0

    async def _maybe_fail(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.attempts[method] += 1
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.attempts[method] <= self.fail_first:
            await context.abort(self.code, f"scripted {self.code.name}")

    async def Execute(self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._maybe_fail("Execute", context)
        await context.write(pb.ExecuteEvent(started=pb.Started(invocation_id="inv_scripted", tool=request.tool)))
        if self.fail_after_started:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "went away mid-stream")
        await context.write(pb.ExecuteEvent(stdout=pb.OutputChunk(text=request.arguments_json)))
        await context.write(pb.ExecuteEvent(result=pb.Result(status=pb.STATUS_OK, output=request.arguments_json)))

    async def Call(self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext) -> Any:
        if self.legacy:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        await self._maybe_fail("Call", context)
        return pb.Result(status=pb.STATUS_OK, output=request.arguments_json, invocation_id="inv_called")

    async def ListTools(self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._maybe_fail("ListTools", context)
        return pb.ListToolsResponse(tools=[
            pb.Tool(name="pure", description="d", input_schema_json="{}",
                    annotations=pb.ToolAnnotations(read_only_hint=True, idempotent_hint=True)),
            pb.Tool(name="effects", description="d", input_schema_json="{}",
                    annotations=pb.ToolAnnotations(read_only_hint=False, idempotent_hint=False)),
            pb.Tool(name="unknown", description="d", input_schema_json="{}"),
        ])

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._maybe_fail("Cancel", context)
        return pb.CancelResponse(cancelled=True)


@contextlib.asynccontextmanager
async def scripted_server(tmp_path: Path) -> AsyncIterator[tuple[Scripted, str]]:
    servicer = Scripted()
    server = grpc.aio.server()
    pb_grpc.add_SupervisorServicer_to_server(servicer, server)
    target = f"unix://{tmp_path}/s.sock"
    server.add_insecure_port(target)
    await server.start()
    try:
        yield servicer, target
    finally:
        await server.stop(None)


async def test_status_table_maps_every_code_to_one_exception(tmp_path: Path) -> None:
    cases = {
        grpc.StatusCode.NOT_FOUND: NotFoundError,
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
        grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
        grpc.StatusCode.INTERNAL: InternalError,
        grpc.StatusCode.UNIMPLEMENTED: ClientError,
    }
    async with scripted_server(tmp_path) as (servicer, target), Client(target, retry=FAST) as client:
        servicer.fail_first = 10**6
        for code, cls in cases.items():
            servicer.code = code
            with pytest.raises(ClientError) as info:
                await client.list_tools()
            assert type(info.value) is cls and STATUS_ERRORS.get(code, ClientError) is cls
            assert info.value.code == code.name and info.value.details == f"scripted {code.name}"


async def test_list_tools_and_cancel_are_retried_on_unavailable(tmp_path: Path) -> None:
    async with scripted_server(tmp_path) as (servicer, target), Client(target, retry=FAST) as client:
        servicer.fail_first = 2
        assert [t.name for t in await client.list_tools()] == ["pure", "effects", "unknown"]
        assert await client.cancel("inv_x1234567")
    assert servicer.attempts["ListTools"] == 3 and servicer.attempts["Cancel"] == 3


async def test_other_codes_are_never_retried(tmp_path: Path) -> None:
    async with scripted_server(tmp_path) as (servicer, target), Client(target, retry=FAST) as client:
        servicer.fail_first, servicer.code = 1, grpc.StatusCode.INTERNAL
        with pytest.raises(InternalError):
            await client.list_tools()
    assert servicer.attempts["ListTools"] == 1


@pytest.mark.parametrize("method", ["Call", "Execute"])
async def test_calls_retried_only_for_tools_safe_to_rerun(tmp_path: Path, method: str) -> None:
    async with scripted_server(tmp_path) as (servicer, target), Client(target, retry=FAST) as client:
        async def run(tool: str, arguments: dict[str, Any], **kw: Any) -> Result:
            if method == "Call":
                return await client.call(tool, arguments, **kw)
            events = [e async for e in client.execute(tool, arguments, **kw)]
            assert isinstance(events[-1], Result)
            return events[-1]

        servicer.fail_first = 1
        result = await run("pure", {"a": 1})  # read-only + idempotent: re-run after UNAVAILABLE
        assert result.status is Status.OK and result.output == '{"a":1}'
        assert servicer.attempts[method] == 2

        for tool in ("effects", "unknown"):  # explicitly not idempotent / no hint: never re-run silently
            servicer.attempts[method] = 0
            with pytest.raises(UnavailableError):
                await run(tool, {})
            assert servicer.attempts[method] == 1, tool

        servicer.attempts[method] = 0
        assert (await run("effects", {}, idempotent=True)).status is Status.OK  # the caller vouches
        assert servicer.attempts[method] == 2


async def test_call_is_one_unary_rpc_and_falls_back_to_execute_on_an_older_supervisor(tmp_path: Path) -> None:
    async with scripted_server(tmp_path) as (servicer, target), Client(target, retry=FAST) as client:
        result = await client.call("pure", {"a": 1})
        assert (result.output, result.invocation_id) == ('{"a":1}', "inv_called")
        assert (servicer.attempts["Call"], servicer.attempts["Execute"]) == (1, 0)
        servicer.legacy = True
        result = await client.call("pure", {"a": 2})
        assert result.output == '{"a":2}' and servicer.attempts["Execute"] == 1


async def test_execute_never_retried_once_the_invocation_started(tmp_path: Path) -> None:
    async with scripted_server(tmp_path) as (servicer, target), Client(target, retry=FAST) as client:
        servicer.fail_after_started = True
        seen = []
        with pytest.raises(UnavailableError):
            async for event in client.execute("pure", {}, idempotent=True):
                seen.append(event)
    assert [type(e) for e in seen] == [Started] and servicer.attempts["Execute"] == 1


async def test_deadline_bounds_the_call_including_retries(tmp_path: Path) -> None:
    slow = RetryPolicy(max_attempts=50, initial_backoff_s=0.2, max_backoff_s=0.2, multiplier=1.0)
    async with scripted_server(tmp_path) as (servicer, target), Client(target, retry=slow) as client:
        servicer.fail_first = 10**6
        t0 = time.monotonic()
        # The deadline ends the retries: the last error seen, or the deadline itself when it fell inside the
        # last attempt (a loaded machine); either way within the budget.
        with pytest.raises((UnavailableError, DeadlineExceededError)):
            await client.list_tools(timeout=1.0)
        assert time.monotonic() - t0 < 1.5 and 1 < servicer.attempts["ListTools"] < 50
        servicer.fail_first, servicer.delay_s = 0, 5.0
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await client.call("pure", {}, timeout=0.5)
        assert time.monotonic() - t0 < 2.0


async def test_no_server_gives_unavailable_quickly(tmp_path: Path) -> None:
    async with Client(f"unix://{tmp_path}/nobody.sock", retry=FAST) as client:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError):
            await client.call("anything", {})
        assert time.monotonic() - t0 < 5.0


async def test_callers_trace_context_is_propagated(tmp_path: Path) -> None:
    caller = TracerProvider().get_tracer("mcp-server")
    async with scripted_server(tmp_path) as (servicer, target), Client(target) as client:
        with caller.start_as_current_span("tools/call") as span:
            trace_id = format(span.get_span_context().trace_id, "032x")
            await client.call("pure", {})
            await client.list_tools()
    assert len(servicer.metadata) == 2
    for md in servicer.metadata:
        assert md["traceparent"].split("-")[1] == trace_id


def test_sync_client_same_semantics(tmp_path: Path) -> None:
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        async def main() -> None:
            async with scripted_server(tmp_path) as (servicer, target):
                holder.update(servicer=servicer, target=target, loop=asyncio.get_running_loop())
                holder["stop"] = asyncio.Event()
                ready.set()
                await holder["stop"].wait()
        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    servicer: Scripted = holder["servicer"]
    try:
        with SyncClient(holder["target"], retry=FAST) as client:
            servicer.fail_first = 1
            events = list(client.execute("pure", {"b": 2}))
            assert isinstance(events[0], Started) and isinstance(events[-1], Result)
            assert events[-1].output == '{"b":2}' and servicer.attempts["Execute"] == 2
            with pytest.raises(UnavailableError):
                client.call("effects", {})
            assert servicer.attempts["Call"] == 1
            servicer.fail_first, servicer.legacy = 0, True
            assert client.call("pure", {"c": 3}).output == '{"c":3}' and servicer.attempts["Execute"] == 3
            servicer.legacy = False
            servicer.fail_first, servicer.code = 10**6, grpc.StatusCode.NOT_FOUND
            with pytest.raises(NotFoundError):
                client.cancel("inv_gone_1234")
            servicer.fail_first = 0
            assert [t.name for t in client.list_tools()] == ["pure", "effects", "unknown"]
    finally:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(10)


def test_annotations_derived_from_profile_admin_overrides() -> None:
    no_net = IsolationProfile()
    assert derived_annotations(no_net) == {"openWorldHint": False, "readOnlyHint": True,
                                           "destructiveHint": False, "idempotentHint": True}
    merged = tool_annotations({"readOnlyHint": False, "title": "Run"}, no_net)
    assert merged == {"openWorldHint": False, "readOnlyHint": False, "destructiveHint": False,
                      "idempotentHint": True, "title": "Run"}
    assert safe_to_retry(merged) and safe_to_retry({"readOnlyHint": True})
    assert not safe_to_retry({}) and not safe_to_retry({"readOnlyHint": True, "idempotentHint": False})
    assert not safe_to_retry({"readOnlyHint": False, "destructiveHint": True})
