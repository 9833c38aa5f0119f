"""One invocation, as a short sequence of steps that fail closed.

    resolve -> validate -> compile (policy: the neutral SandboxSpec) -> gather secrets
            -> contain: create (or claim warm) -> start(stdin, secrets) -> supervise -> collect -> remove
            -> finalize (scrub verdict, structured content)

Every step before ``create`` rejects the call with no sandbox in existence. From ``create`` on, the
sandbox is removed in a ``finally`` shielded from cancellation, so it goes on success, error,
timeout, cancel, client disconnect and supervisor shutdown alike; with it goes whatever the backend
made for it (egress network and proxy, delivered secret files: they live inside the sandbox only).
Status is decided from what the engine reports (exit code, OOM flag) and what the supervisor did
(timeout, cancel, blocked output), never from what the tool printed. Output is scrubbed before it
leaves (``output.py``): nothing the tool printed reaches the caller, a span or a log unscrubbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from opentelemetry import trace

from toolcell.backends.base import Backend, ExitInfo, Sandbox, WarmSandbox
from toolcell.errors import InvalidArguments, SecretError, ToolcellError
from toolcell.model import (
    EgressDestination,
    Event,
    InvocationRequest,
    OutputChunk,
    Result,
    Started,
    Status,
    Usage,
)
from toolcell.output import Collected, inspect_output
from toolcell.policy.arguments import ArgumentLimits, parse_arguments, validate_arguments
from toolcell.policy.network import EgressGrant
from toolcell.policy.resolve import ResolvedTool
from toolcell.policy.scrub import Redactor, detect_injection, scrub, wrap_untrusted
from toolcell.policy.spec import NO_SECRETS, SandboxSpec, Secrets
from toolcell.sessions.call import SessionCall
from toolcell.sessions.host import FilesBlock
from toolcell.settings import Config
from toolcell.sources.frames import FrameReader
from toolcell.sources.verdict import call_request, mcp_verdict
from toolcell.workspace import CollectedFiles, parse_collected

tracer = trace.get_tracer("toolcell.pipeline")

Emit = Callable[[Event], Awaitable[None]]
T = TypeVar("T")

# Time kept back before a caller's deadline to kill the sandbox (SIGKILL), remove it and deliver the result.
# The kill grace is not kept back: when it does not fit before the deadline, the kill is SIGKILL at once.
DEADLINE_MARGIN_S = 0.5
# After the main process exits, how long output may take to drain before we stop waiting.
DRAIN_TIMEOUT_S = 5.0


async def _no_pool() -> WarmSandbox | None:
    return None


class SecretSource(Protocol):
    def get_many(self, names: list[str]) -> dict[str, str]: ...


@dataclass
class Services:
    """What one invocation needs from the long-lived supervisor."""

    config: Config
    backend: Backend
    secrets: SecretSource | None = None
    # Called with the sandbox once created (and with late sandboxes created after abandonment).
    on_sandbox: Callable[[Sandbox], None] = lambda s: None
    remove: Callable[[Sandbox], Awaitable[None]] = lambda s: s.remove()
    # A started sandbox made from this spec, from a warm pool (deferred: the claim brings the secrets);
    # None: create one (the cold path).
    claim: Callable[[SandboxSpec], Awaitable[WarmSandbox | None]] = lambda spec: _no_pool()
    # Redacts everything the supervisor knows as secret (for error messages and span status).
    redactor: Redactor = dataclasses.field(default_factory=Redactor)


@dataclass
class Outcome:
    exit: ExitInfo
    reason: str  # "" | "timeout" | "killed"
    collected: Collected


@contextlib.contextmanager
def step(name: str, redactor: Redactor, **attributes: Any) -> Iterator[trace.Span]:
    """A child span per step; a failure's message is redacted before it is recorded."""
    with tracer.start_as_current_span(name, attributes=attributes, record_exception=False,
                                      set_status_on_exception=False) as span:
        try:
            yield span
        except ToolcellError as exc:
            span.set_status(trace.Status(trace.StatusCode.ERROR, describe(exc, redactor)))
            span.set_attribute("toolcell.error", type(exc).__name__)
            raise
        except asyncio.CancelledError:  # the caller went away, a deadline passed or the supervisor stopped
            span.set_status(trace.Status(trace.StatusCode.ERROR, "cancelled"))
            raise
        except Exception as exc:  # a bug: the type only (its message may quote payload)
            span.set_status(trace.Status(trace.StatusCode.ERROR, "internal error"))
            span.set_attribute("toolcell.error", type(exc).__name__)
            raise


def describe(exc: ToolcellError, redactor: Redactor) -> str:
    """A payload-free description for spans and logs: schema messages quote the offending value."""
    if isinstance(exc, InvalidArguments):
        return f"invalid arguments at {exc.path or '$'}"
    return redactor.redact(str(exc))[0]


def resolve(config: Config, name: str) -> ResolvedTool:
    """Look the tool up by name; the caller can choose nothing else."""
    return config.resolve(name)


def validate(config: Config, resolved: ResolvedTool, arguments_json: str) -> dict[str, Any]:
    return validate_arguments(config.validators[resolved.tool.name], arguments_json, config.limits)


def effective_timeout(resolved: ResolvedTool, deadline_s: float | None, now: float) -> float | None:
    """A caller deadline shorter than the tool's timeout wins, with room left to kill and report."""
    if deadline_s is None:
        return None
    return max(0.05, deadline_s - now - DEADLINE_MARGIN_S)


def kill_grace(spec: SandboxSpec, deadline_s: float | None, now: float) -> float:
    """The SIGTERM grace that still fits before the caller's deadline (0: SIGKILL at once)."""
    if deadline_s is None:
        return spec.kill_grace_s
    return max(0.0, min(spec.kill_grace_s, deadline_s - now - DEADLINE_MARGIN_S))


def compile_step(config: Config, resolved: ResolvedTool, invocation_id: str, timeout_s: float | None) -> SandboxSpec:
    """Policy compiles the tool and its profile into the neutral spec; nothing of the caller's is in it."""
    return config.compile(resolved, invocation_id, timeout_s)


def gather_secrets(services: Services, resolved: ResolvedTool) -> tuple[Secrets, Redactor]:
    """The tool's granted secrets, for its sandbox's start; the redactor learns every value."""
    grants = resolved.tool.secrets
    if not grants:
        return NO_SECRETS, services.redactor
    if services.secrets is None:
        raise SecretError("tool is granted secrets but the supervisor has no secret store")
    values = services.secrets.get_many(sorted({g.name for g in grants}))
    secrets = Secrets(env={g.env: values[g.name] for g in grants if g.env},
                      files={str(g.file): values[g.name] for g in grants if g.file})
    return secrets, Redactor({**services.redactor.secrets, **values})


async def create(backend: Backend, spec: SandboxSpec, on_orphan: Callable[[Sandbox], None]) -> Sandbox:
    """Create the sandbox; if we are cancelled mid-create, hand the late sandbox to ``on_orphan``."""
    task = asyncio.ensure_future(backend.create(spec))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: on_orphan(t.result()) if not t.cancelled() and not t.exception() else None)
        raise


async def terminate(sandbox: Sandbox, waiter: asyncio.Future[ExitInfo], grace_s: float) -> None:
    """SIGTERM, wait ``grace_s``, then SIGKILL (trio's deliver_cancel, applied to a sandbox); no grace: SIGKILL."""
    if grace_s <= 0:
        await sandbox.signal(signal.SIGKILL)
        return
    await sandbox.signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(waiter), timeout=grace_s)
    except TimeoutError:
        await sandbox.signal(signal.SIGKILL)


# Output up to this size is scrubbed on the event loop: every pattern is linear-time, so that is well under
# a millisecond, cheaper than a hop to a worker thread (a warm call's few small chunks). Larger pieces go
# to a worker thread, so a flood never holds the loop.
INLINE_SCRUB_CHARS = 8 * 1024


async def _off_loop_if_large(size: int, work: Callable[[], T]) -> T:
    return work() if size <= INLINE_SCRUB_CHARS else await asyncio.to_thread(work)


async def pump(sandbox: Sandbox, collected: Collected, emit: Emit, stream_live: bool,
               frames: FrameReader | None = None, redactor: Redactor | None = None) -> None:
    """Forward scrubbed output as it happens, keeping at most each stream's cap.

    Scrubbing is CPU work on hostile bytes: anything larger than a few KiB runs in a worker thread, one
    chunk (bounded by the backend's read size) at a time, so the event loop keeps serving other calls,
    health and cancels. A tool from an MCP server (``frames``): its stdout is the driver's frames, parsed
    within the same cap; progress is forwarded, its message scrubbed.
    """
    async for name, data in sandbox.output():
        if frames is not None and name == "stdout":
            for progress in await _off_loop_if_large(len(data), functools.partial(frames.feed, data)):
                message = scrub(progress.message, redactor or Redactor())[0] if progress.message else ""
                await emit(dataclasses.replace(progress, message=message))
            continue
        stream = collected.stream(name)
        text = await _off_loop_if_large(len(data), functools.partial(stream.feed, data))
        if text and stream_live:
            await emit(OutputChunk(stream=name, text=text))
    if frames is not None:
        frames.finish()
    for name in ("stdout", "stderr"):
        stream = collected.stream(name)
        tail = await _off_loop_if_large(stream.scrubber.held_chars, stream.finish)
        if tail and stream_live:
            await emit(OutputChunk(stream=name, text=tail))


async def supervise(sandbox: Sandbox, spec: SandboxSpec, collected: Collected, emit: Emit,
                    cancelled: asyncio.Event, stream_live: bool, frames: FrameReader | None = None,
                    redactor: Redactor | None = None, deadline_s: float | None = None) -> Outcome:
    """Stream output while enforcing the timeout and honouring cancellation, within the caller's deadline."""
    pumping = asyncio.ensure_future(pump(sandbox, collected, emit, stream_live, frames, redactor))
    waiter = asyncio.ensure_future(sandbox.wait())
    cancel_wait = asyncio.ensure_future(cancelled.wait())
    reason = ""
    try:
        done, _ = await asyncio.wait({waiter, cancel_wait}, timeout=spec.timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            reason = "killed" if cancel_wait in done else "timeout"
            await terminate(sandbox, waiter, kill_grace(spec, deadline_s, time.monotonic()))
        exit_info = await waiter
        drain = DRAIN_TIMEOUT_S if deadline_s is None else \
            min(DRAIN_TIMEOUT_S, max(0.05, deadline_s - time.monotonic() - DEADLINE_MARGIN_S / 2))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pumping), timeout=drain)
        return Outcome(exit=exit_info, reason=reason, collected=collected)
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


def structured(config: Config, resolved: ResolvedTool, stdout: str) -> tuple[Mapping[str, Any] | None, str]:
    """The tool's (scrubbed) stdout as structured content, when it is a JSON object that validates."""
    policy = resolved.profile.output
    text = stdout.strip()
    if not text.startswith("{") or len(text.encode()) > policy.structured_max_bytes:
        return None, "none"
    limits = ArgumentLimits(max_argument_bytes=policy.structured_max_bytes, max_depth=policy.structured_max_depth,
                            max_string_length=policy.structured_max_bytes, max_array_length=100_000)
    try:
        value = parse_arguments(text, limits)
    except InvalidArguments:
        return None, "unparsable"
    validator = config.output_validators.get(resolved.tool.name)
    if validator is not None and next(validator.iter_errors(value), None) is not None:
        return None, "invalid"
    return value, "valid"


def finalize(config: Config, resolved: ResolvedTool, outcome: Outcome) -> dict[str, Any]:
    """Prompt-injection verdict and structured content, on scrubbed output only."""
    status, message = decide(outcome)
    output, stderr = outcome.collected.stdout.text, outcome.collected.stderr.text
    budget = outcome.collected.budget
    if budget.exceeded:  # what was released is scrubbed; the rest was dropped, never sent unscrubbed
        cut = (f"output cut: scrubbing it took over its budget ({budget.limit_s:g} s CPU); "
               f"{budget.dropped_bytes} bytes withheld")
        message = f"{message}; {cut}" if message else cut
    markers = inspect_output(output, stderr)
    action = resolved.profile.output.injection
    content, _ = structured(config, resolved, output)
    if markers and action == "block":
        kinds = ", ".join(sorted(markers))
        status, message = Status.DENIED, f"output withheld: prompt-injection markers found ({kinds})"
        output, stderr, content = "", "", None
    elif markers and action == "wrap":
        output = wrap_untrusted(output, markers)
        content = None
    return {"status": status, "message": message, "output": output, "stderr": stderr,
            "injection_markers": dict(markers), "structured_content": content}


def files_verdict(files: CollectedFiles, action: str, verdict: dict[str, Any]) -> CollectedFiles:
    """Prompt-injection markers in the output's text files, under the profile's ``output.injection``: counted
    with stdout's; ``wrap`` delivers each marked file wrapped as untrusted data; ``block`` withholds the whole
    result (status denied), as a marked stdout would."""
    found: Counter[str] = Counter()
    kept = []
    for f in files.files:
        markers = detect_injection(f.text) if f.text else Counter()
        found += markers
        if markers and action == "wrap" and f.text is not None:
            f = dataclasses.replace(f, text=wrap_untrusted(f.text, markers))
        kept.append(f)
    if not found:
        return files
    verdict["injection_markers"] = dict(Counter(verdict["injection_markers"]) + found)
    if action == "block" and verdict["status"] is not Status.DENIED:
        kinds = ", ".join(sorted(found))
        verdict.update(status=Status.DENIED, output="", stderr="", structured_content=None,
                       message=f"output withheld: prompt-injection markers found in output files ({kinds})")
        if "content" in verdict:  # a stock MCP server's blocks: withheld with the rest
            verdict["content"] = ()
    return dataclasses.replace(files, files=tuple(kept))


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
        "toolcell.redactions": sum(result.redactions.values()),
        "toolcell.redaction_kinds": sorted(result.redactions),
        "toolcell.sanitized": sum(result.sanitized.values()),
        "toolcell.injection_markers": sorted(result.injection_markers),
        "toolcell.structured_content": result.structured_content is not None,
    })


def _set_scrub_attributes(span: trace.Span, collected: Collected) -> None:
    budget = collected.budget
    span.set_attributes({"toolcell.scrub.cpu_s": round(budget.used_s, 4),
                         "toolcell.scrub.budget_exceeded": budget.exceeded,
                         "toolcell.scrub.withheld_bytes": budget.dropped_bytes})


def egress_attributes(grants: Sequence[EgressGrant], destinations: Sequence[EgressDestination]) -> dict[str, Any]:
    """Span attributes for one invocation's egress: what was granted, reached and refused, bytes each way."""
    allowed = [d for d in destinations if d.allowed]
    denied = [d for d in destinations if not d.allowed]
    return {
        "toolcell.egress.granted": [f"{g.host}:{','.join(map(str, g.ports))}" for g in grants],
        "toolcell.egress.allowed": [f"{d.host}:{d.port}" for d in allowed],
        "toolcell.egress.denied": [f"{d.host}:{d.port} {d.reason}" for d in denied],
        "toolcell.egress.connections": sum(d.connections for d in allowed),
        "toolcell.egress.refused": sum(d.connections for d in denied),
        "toolcell.egress.bytes_up": sum(d.bytes_up for d in destinations),
        "toolcell.egress.bytes_down": sum(d.bytes_down for d in destinations),
    }


@dataclass
class Contained:
    """What one sandbox's lifetime produced."""

    outcome: Outcome
    usage: Usage
    sandbox_id: str
    egress: tuple[EgressDestination, ...]
    # A call in a session's sandbox: what its host said about the output files (None: not a session call).
    files: FilesBlock | None = None


async def contain(services: Services, resolved: ResolvedTool, spec: SandboxSpec, stdin: bytes, secrets: Secrets,
                  emit: Emit, cancelled: asyncio.Event, redactor: Redactor, *, invocation_id: str, trace_id: str,
                  deadline_s: float | None = None, frames: FrameReader | None = None) -> Contained:
    """create (or claim warm) -> start(stdin, secrets) -> supervise -> collect -> remove, always removed."""
    policy = resolved.profile.output
    with step("toolcell.create", redactor, **{"toolcell.image": spec.image, "toolcell.runtime": spec.isolation,
                                               "toolcell.backend": services.backend.name}) as span:
        # Warm: already started, waiting for its input (and, deferred, its secrets), which start() delivers.
        # The backend makes what the spec asks for beyond the sandbox itself (egress network and proxy).
        pooled = await services.claim(spec)
        span.set_attribute("toolcell.warm", pooled is not None)
        sandbox = pooled if pooled is not None else await create(services.backend, spec,
                                                                 on_orphan=services.on_sandbox)
    services.on_sandbox(sandbox)
    trace.get_current_span().set_attribute("toolcell.sandbox_id", sandbox.id)  # the invocation's span
    try:
        with step("toolcell.start", redactor):
            await sandbox.start(stdin, secrets)
        # After start: telling the caller overlaps with the tool's run (output waits, bounded).
        await emit(Started(invocation_id=invocation_id, sandbox_id=sandbox.id, profile=resolved.profile.name,
                           tool=resolved.tool.name, trace_id=trace_id))
        collected = Collected.create(policy.stdout_max_bytes, policy.stderr_max_bytes, policy.max_total_bytes,
                                     redactor, scrub_budget_s=policy.scrub_budget_s)
        # In block mode nothing streams: the verdict needs the whole output first.
        stream_live = policy.injection != "block"
        # Creating and starting took time out of the caller's deadline (a loaded engine: most of a second).
        remaining = effective_timeout(resolved, deadline_s, time.monotonic())
        if remaining is not None and remaining < spec.timeout_s:
            spec = dataclasses.replace(spec, timeout_s=remaining)
        with step("toolcell.run", redactor, **{"toolcell.timeout_s": spec.timeout_s}):
            outcome = await supervise(sandbox, spec, collected, emit, cancelled, stream_live, frames, redactor,
                                      deadline_s)
        with step("toolcell.collect", redactor):
            usage: Usage = await sandbox.usage()
    finally:
        with step("toolcell.remove", redactor):
            await asyncio.shield(asyncio.ensure_future(services.remove(sandbox)))
    # Host names the tool asked its proxy for are the tool's strings: redacted like its output.
    egress = tuple(dataclasses.replace(d, host=redactor.redact(d.host)[0]) for d in sandbox.egress)
    files = sandbox.files if isinstance(sandbox, SessionCall) else None
    return Contained(outcome=outcome, usage=usage, sandbox_id=sandbox.id, egress=egress, files=files)


async def output_files(resolved: ResolvedTool, block: FilesBlock | None, redactor: Redactor
                       ) -> tuple[CollectedFiles | None, str]:
    """The files the tool left in its workspace's output directory, parsed and scrubbed off the loop when
    large; (None, why) when its host's description was refused (over the cap) or never came."""
    policy = resolved.tool.workspace
    if block is None or policy is None or not policy.outputs:
        return None, ""
    if block.refused:
        return None, f"output files withheld: {block.refused}"
    if block.payload is None:
        return None, "output files were not collected: the call did not finish"
    payload = block.payload
    work = functools.partial(parse_collected, payload, policy, redactor)
    return (work() if len(payload) <= INLINE_SCRUB_CHARS else await asyncio.to_thread(work)), ""


async def run_invocation(services: Services, request: InvocationRequest, invocation_id: str, emit: Emit,
                         cancelled: asyncio.Event) -> Result:
    """Run one invocation end to end. Raises ToolcellError for rejections before any sandbox."""
    config = services.config
    started_at = time.monotonic()
    with step("toolcell.invocation", services.redactor, **{
            "toolcell.tool": request.tool, "toolcell.invocation_id": invocation_id,
            "toolcell.argument_bytes": len(request.arguments_json.encode()),
            "toolcell.session_id": request.session_id, "toolcell.input_files": len(request.files)}) as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        with step("toolcell.resolve", services.redactor):
            resolved = resolve(config, request.tool)
        span.set_attribute("toolcell.profile", resolved.profile.name)
        with step("toolcell.validate", services.redactor):
            arguments = validate(config, resolved, request.arguments_json)
        with step("toolcell.compile", services.redactor):
            spec = compile_step(config, resolved, invocation_id,
                                effective_timeout(resolved, request.deadline_s, time.monotonic()))
        source = resolved.tool.source
        # A tool from an MCP server: the driver's request line, and its frames on stdout.
        stdin = call_request(source, arguments, resolved.profile.output.stdout_max_bytes) if source else \
            json.dumps(arguments, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        frames = FrameReader.for_cap(resolved.profile.output.stdout_max_bytes, time.monotonic) if source else None
        with step("toolcell.gather_secrets", services.redactor, **{"toolcell.secrets": len(resolved.tool.secrets)}):
            secrets, redactor = gather_secrets(services, resolved)
        done = await contain(services, resolved, spec, stdin, secrets, emit, cancelled, redactor,
                             invocation_id=invocation_id, trace_id=trace_id, deadline_s=request.deadline_s,
                             frames=frames)
        del secrets
        with step("toolcell.finalize", redactor):  # injection markers, JSON: CPU work on output, off the loop
            collected = done.outcome.collected
            kept = collected.stdout.buffer.kept + collected.stderr.buffer.kept + (frames.kept if frames else 0)
            work = functools.partial(finalize, config, resolved, done.outcome) if frames is None else \
                functools.partial(mcp_verdict, *decide(done.outcome), frames, collected, resolved.profile.output,
                                  config.output_validators.get(resolved.tool.name), redactor,
                                  exit_code=done.outcome.exit.exit_code)
            verdict = work() if kept <= INLINE_SCRUB_CHARS else await asyncio.to_thread(work)
        redactions = dict(verdict.pop("redactions", collected.redactions))
        sanitized = dict(verdict.pop("sanitized", collected.sanitized))
        with step("toolcell.collect_files", redactor):
            files, files_note = await output_files(resolved, done.files, redactor)
        if files is not None:
            for kind, count in files.redactions.items():
                redactions[kind] = redactions.get(kind, 0) + count
            for kind, count in files.sanitized.items():
                sanitized[kind] = sanitized.get(kind, 0) + count
        if files_note:
            verdict["message"] = f"{verdict['message']}; {files_note}" if verdict["message"] else files_note
        if files is not None and files.files:  # text files are output too: the same verdict as stdout
            size = sum(len(f.text or "") for f in files.files)
            files = await _off_loop_if_large(size, functools.partial(
                files_verdict, files, resolved.profile.output.injection, verdict))
        result = Result(
            exit_code=done.outcome.exit.exit_code,
            truncated=collected.truncated or bool(frames and frames.truncated),
            duration_ms=int((time.monotonic() - started_at) * 1000),
            usage=done.usage,
            trace_id=trace_id,
            invocation_id=invocation_id,
            stdout_bytes=frames.seen if frames else collected.stdout.buffer.seen,
            stderr_bytes=collected.stderr.buffer.seen,
            sandbox_id=done.sandbox_id,
            redactions=redactions,
            sanitized=sanitized,
            egress=done.egress,
            files=files.files if files is not None and verdict["status"] is not Status.DENIED else (),
            session_id=request.session_id,
            **verdict,
        )
        _set_result_attributes(span, result)
        _set_scrub_attributes(span, collected)
        if frames is not None:
            span.set_attributes({"toolcell.mcp.server": source.server if source else "",
                                 "toolcell.mcp.refused_requests": sum(frames.refused.values()),
                                 "toolcell.mcp.refused_methods": sorted(frames.refused),
                                 "toolcell.mcp.progress_dropped": frames.progress_dropped})
        if resolved.profile.network:
            span.set_attributes(egress_attributes(resolved.profile.network, done.egress))
        if result.status is not Status.OK:
            span.set_status(trace.Status(trace.StatusCode.ERROR, result.message))
        return result
