"""One invocation, as a short sequence of steps that fail closed.

    resolve -> validate -> compile -> create -> start(stdin) -> supervise -> collect -> remove

Every step before ``create`` is pure and rejects the call with no sandbox in existence. From
``create`` on, the sandbox is removed in a ``finally`` that is shielded from cancellation, so it goes
on success, error, timeout, cancel, client disconnect and supervisor shutdown alike. Status is
decided from what the engine reports (exit code, OOM flag) and what the supervisor did (timeout,
cancel), never from what the tool printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from runtime.backends.base import Backend, ExitInfo, Sandbox
from runtime.errors import ToolNotFound
from runtime.model import Event, InvocationRequest, OutputChunk, ResolvedTool, Result, Started, Status, Usage
from runtime.output import StreamBuffer
from runtime.policy.arguments import validate_arguments
from runtime.policy.plan import ContainerPlan, compile_plan
from runtime.settings import Config

tracer = trace.get_tracer("toolcell.pipeline")

Emit = Callable[[Event], Awaitable[None]]

# Time reserved before a caller's deadline to kill the sandbox and still deliver the result.
DEADLINE_MARGIN_S = 0.25
# After the main process exits, how long output may take to drain before we stop waiting.
DRAIN_TIMEOUT_S = 5.0


@dataclass
class Outcome:
    exit: ExitInfo
    reason: str  # "" | "timeout" | "killed"
    stdout: StreamBuffer
    stderr: StreamBuffer


def resolve(config: Config, name: str) -> ResolvedTool:
    """Look the tool up by name; the caller can choose nothing else."""
    tool = config.tools.get(name)
    if tool is None:
        raise ToolNotFound(name)
    return ResolvedTool(tool=tool, profile=config.profiles[tool.profile])


def validate(config: Config, resolved: ResolvedTool, arguments_json: str) -> dict[str, Any]:
    return validate_arguments(config.validators[resolved.tool.name], arguments_json, config.limits)


def effective_timeout(resolved: ResolvedTool, deadline_s: float | None, now: float) -> float | None:
    """A caller deadline shorter than the tool's timeout wins, with room left to report."""
    if deadline_s is None:
        return None
    return max(0.05, deadline_s - now - resolved.profile.kill_grace_s - DEADLINE_MARGIN_S)


def compile_step(config: Config, resolved: ResolvedTool, invocation_id: str, timeout_s: float | None) -> ContainerPlan:
    return compile_plan(
        resolved.tool,
        resolved.profile,
        invocation_id=invocation_id,
        owner=config.server.instance,
        seccomp_json=config.seccomp[resolved.profile.name].json_text,
        environ=config.environ,
        timeout_s=timeout_s,
    )


async def create(backend: Backend, plan: ContainerPlan, on_orphan: Callable[[Sandbox], None]) -> Sandbox:
    """Create the sandbox; if we are cancelled mid-create, hand the late sandbox to ``on_orphan``."""
    task = asyncio.ensure_future(backend.create(plan))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: on_orphan(t.result()) if not t.cancelled() and not t.exception() else None)
        raise


async def terminate(sandbox: Sandbox, waiter: asyncio.Future[ExitInfo], grace_s: float) -> None:
    """SIGTERM, wait ``grace_s``, then SIGKILL (trio's deliver_cancel, applied to a container)."""
    await sandbox.signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(waiter), timeout=grace_s)
    except TimeoutError:
        await sandbox.signal(signal.SIGKILL)


async def pump(sandbox: Sandbox, out: StreamBuffer, err: StreamBuffer, emit: Emit) -> None:
    """Forward output as it happens, keeping at most each stream's cap."""
    async for stream, data in sandbox.output():
        buf = out if stream == "stdout" else err
        text = buf.feed(data)
        if text:
            await emit(OutputChunk(stream=stream, text=text))
    for stream, buf in (("stdout", out), ("stderr", err)):
        tail = buf.finish()
        if tail:
            await emit(OutputChunk(stream=stream, text=tail))


async def supervise(sandbox: Sandbox, plan: ContainerPlan, emit: Emit, cancelled: asyncio.Event) -> Outcome:
    """Stream output while enforcing the timeout and honouring cancellation."""
    out, err = StreamBuffer(plan.stdout_max_bytes), StreamBuffer(plan.stderr_max_bytes)
    pumping = asyncio.ensure_future(pump(sandbox, out, err, emit))
    waiter = asyncio.ensure_future(sandbox.wait())
    cancel_wait = asyncio.ensure_future(cancelled.wait())
    reason = ""
    try:
        done, _ = await asyncio.wait({waiter, cancel_wait}, timeout=plan.timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            reason = "killed" if cancel_wait in done else "timeout"
            await terminate(sandbox, waiter, plan.kill_grace_s)
        exit_info = await waiter
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pumping), timeout=DRAIN_TIMEOUT_S)
        return Outcome(exit=exit_info, reason=reason, stdout=out, stderr=err)
    finally:
        for task in (pumping, waiter, cancel_wait):
            task.cancel()


def decide(outcome: Outcome) -> tuple[Status, str]:
    """Status from the engine's facts and the supervisor's own actions only."""
    code = outcome.exit.exit_code
    if outcome.reason == "timeout":
        return Status.TIMEOUT, "timed out; the sandbox was killed"
    if outcome.reason == "killed":
        return Status.KILLED, "cancelled; the sandbox was killed"
    if outcome.exit.oom_killed:
        return Status.OOM, "out of memory: the sandbox hit its memory limit"
    if code == 0:
        return Status.OK, ""
    if code > 128:
        return Status.ERROR, f"terminated by signal {code - 128}"
    return Status.ERROR, f"exited with status {code}"


def _set_result_attributes(span: trace.Span, result: Result) -> None:
    span.set_attributes({
        "toolcell.status": result.status.value,
        "toolcell.exit_code": result.exit_code,
        "toolcell.duration_ms": result.duration_ms,
        "toolcell.stdout_bytes": result.stdout_bytes,
        "toolcell.stderr_bytes": result.stderr_bytes,
        "toolcell.truncated": result.truncated,
        "toolcell.peak_memory_bytes": result.usage.peak_memory_bytes,
        "toolcell.cpu_time_ns": result.usage.cpu_time_ns,
    })


async def run_invocation(
    config: Config,
    backend: Backend,
    request: InvocationRequest,
    invocation_id: str,
    emit: Emit,
    cancelled: asyncio.Event,
    on_sandbox: Callable[[Sandbox | None], None] = lambda s: None,
    remove: Callable[[Sandbox], Awaitable[None]] | None = None,
) -> Result:
    """Run one invocation end to end. Raises ToolcellError for rejections before any sandbox."""
    started_at = time.monotonic()
    with tracer.start_as_current_span("toolcell.invocation", kind=trace.SpanKind.INTERNAL) as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        span.set_attributes({"toolcell.tool": request.tool, "toolcell.invocation_id": invocation_id,
                             "toolcell.argument_bytes": len(request.arguments_json.encode())})
        with tracer.start_as_current_span("toolcell.resolve"):
            resolved = resolve(config, request.tool)
        span.set_attribute("toolcell.profile", resolved.profile.name)
        with tracer.start_as_current_span("toolcell.validate"):
            arguments = validate(config, resolved, request.arguments_json)
        with tracer.start_as_current_span("toolcell.compile"):
            plan = compile_step(config, resolved, invocation_id,
                                effective_timeout(resolved, request.deadline_s, time.monotonic()))
        stdin = json.dumps(arguments, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        removal = remove or (lambda s: s.remove())
        with tracer.start_as_current_span("toolcell.create", attributes={"toolcell.image": plan.image,
                                                                          "toolcell.runtime": plan.runtime}):
            sandbox = await create(backend, plan, on_orphan=lambda s: on_sandbox(s))
        on_sandbox(sandbox)
        span.set_attribute("toolcell.sandbox_id", sandbox.id)
        try:
            await emit(Started(invocation_id=invocation_id, sandbox_id=sandbox.id, profile=resolved.profile.name,
                               tool=resolved.tool.name, trace_id=trace_id))
            with tracer.start_as_current_span("toolcell.start"):
                await sandbox.start(stdin)
            with tracer.start_as_current_span("toolcell.run", attributes={"toolcell.timeout_s": plan.timeout_s}):
                outcome = await supervise(sandbox, plan, emit, cancelled)
            with tracer.start_as_current_span("toolcell.collect"):
                usage: Usage = await sandbox.usage()
        finally:
            with tracer.start_as_current_span("toolcell.remove"):
                await asyncio.shield(asyncio.ensure_future(removal(sandbox)))
        status, message = decide(outcome)
        result = Result(
            status=status,
            exit_code=outcome.exit.exit_code,
            output=outcome.stdout.text,
            stderr=outcome.stderr.text,
            truncated=outcome.stdout.truncated or outcome.stderr.truncated,
            duration_ms=int((time.monotonic() - started_at) * 1000),
            usage=usage,
            trace_id=trace_id,
            invocation_id=invocation_id,
            message=message,
            stdout_bytes=outcome.stdout.seen,
            stderr_bytes=outcome.stderr.seen,
            sandbox_id=sandbox.id,
        )
        _set_result_attributes(span, result)
        if status is not Status.OK:
            span.set_status(trace.Status(trace.StatusCode.ERROR, message))
        return result
