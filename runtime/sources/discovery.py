"""Discovery: a tool source's ``tools/list``, run in a sandbox like any call, at start-up and on reload.

The server runs under its own profile (limits, seccomp, no network unless granted, its secrets) with
``discovery_timeout`` as its time limit, through the same ``contain`` sequence as a call, so the sandbox
is removed whatever happens. A server that fails is an error naming it; the others are unaffected.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time

from opentelemetry import trace

from toolcell.errors import SourceUnavailable, ToolcellError
from toolcell.model import Event, McpBinding, Status, Tool, ToolSource
from toolcell.pipeline import Services, contain, decide, gather_secrets, step
from toolcell.policy.resolve import ResolvedTool
from toolcell.sources.catalog import Catalog, read_catalog
from toolcell.sources.driver import driver_command
from toolcell.sources.frames import FrameReader
from toolcell.sources.result import Scrubbed, error_message
from toolcell.sources.verdict import list_request

STDERR_TAIL_CHARS = 300
# A tool list is bigger than most results (a hundred tools with schemas: a few hundred KiB), and only the
# supervisor reads it: at least this much, whatever the profile's stdout cap.
LIST_MIN_BYTES = 4 * 1024 * 1024


def source_tool(source: ToolSource) -> Tool:
    """The server itself as a tool (its name, no arguments): what discovery runs."""
    return Tool(name=source.name, description="", image=source.image, command=driver_command(source.command),
                profile=source.profile, secrets=source.secrets, env=source.env,
                source=McpBinding(server=source.name, name="", roots=source.roots))


async def _ignore(event: Event) -> None:
    return None


async def _no_pool(spec: object) -> None:
    return None


async def discover(services: Services, source: ToolSource) -> Catalog:
    """The server's tools, or ``SourceUnavailable`` saying why (its stderr's scrubbed tail included)."""
    config = services.config
    resolved = ResolvedTool(tool=source_tool(source), profile=config.profiles[source.profile])
    invocation_id = "dsc_" + secrets.token_hex(16)
    cap = max(resolved.profile.output.stdout_max_bytes, LIST_MIN_BYTES)
    with step("toolcell.discover", services.redactor, **{"toolcell.server": source.name,
                                                           "toolcell.invocation_id": invocation_id}) as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        spec = config.compile(resolved, invocation_id)
        spec = dataclasses.replace(spec, timeout_s=source.discovery_timeout_s,
                                   lease_s=spec.lease_s - spec.timeout_s + source.discovery_timeout_s)
        grants, redactor = gather_secrets(services, resolved)
        frames = FrameReader.for_cap(cap, time.monotonic)
        done = await contain(dataclasses.replace(services, claim=_no_pool), resolved, spec, list_request(cap),
                             grants, _ignore, asyncio.Event(), redactor, invocation_id=invocation_id,
                             trace_id=trace_id, frames=frames)
        status, message = decide(done.outcome)
        final = frames.final
        reason = ""
        if status is Status.TIMEOUT:
            reason = f"did not list its tools within {source.discovery_timeout_s:g}s"
        elif frames.invalid:
            reason = f"invalid output: {frames.invalid}"
        elif final is not None and "error" in final:
            reason = f"the MCP server failed: {error_message(final['error'], Scrubbed(redactor))}"
        elif final is None or "tools" not in final:
            reason = "the result exceeds the output cap" if frames.truncated else (message or "no tool list")
        if reason:
            tail = " ".join(done.outcome.collected.stderr.text[-STDERR_TAIL_CHARS:].split())
            span.set_status(trace.Status(trace.StatusCode.ERROR, reason))
            raise SourceUnavailable(f"server {source.name!r}: {reason}" + (f" (stderr: ...{tail})" if tail else ""))
        assert final is not None  # nosec B101 - narrowed above
        # Up to 4 MiB of the server's strings to scrub and check: off the event loop.
        catalog = await asyncio.to_thread(read_catalog, source.name, final["tools"], final.get("server"), redactor)
        span.set_attributes({"toolcell.tools": len(catalog.tools), "toolcell.skipped": len(catalog.skipped)})
        return catalog


async def discover_or_error(services: Services, source: ToolSource) -> Catalog | str:
    """``discover``, with any toolcell error (engine, image, secrets) as its message."""
    try:
        return await discover(services, source)
    except SourceUnavailable as exc:
        return str(exc)
    except ToolcellError as exc:
        return f"server {source.name!r}: {exc}"
