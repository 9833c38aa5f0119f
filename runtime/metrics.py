"""The supervisor's metrics, through the OpenTelemetry metrics API (the SDK is set up in ``telemetry``).

Attributes are bounded sets only: the tool (a name from the admin's config: unknown names are never
recorded), the status, the rejection reason (an error class), the redaction kind. Nothing from a
payload becomes an attribute.

    toolcell.invocations             counter        tool, status      calls that ran a sandbox
    toolcell.invocation.endings      counter        tool, ending      every invocation with an id, by how it
                                                                       ended (``endings.ENDINGS``)
    toolcell.invocation.duration     histogram (s)  tool, status
    toolcell.sandboxes.active        up-down        -                 sandboxes created and not yet removed
    toolcell.rejections              counter        reason            calls refused or failed before a result
    toolcell.redactions              counter        tool, kind        secrets replaced in output
    toolcell.config.reloads          counter        outcome           ok | error
    toolcell.health.serving          up-down        -                 1 while health is SERVING
    toolcell.pool.sandboxes          gauge          tool, state       warm pools: target | ready | creating
    toolcell.pool.claims             counter        tool, outcome     pooled tools' calls: hit (warm) | miss (cold)
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

_meter = metrics.get_meter("toolcell")

invocations = _meter.create_counter(
    "toolcell.invocations", unit="{invocation}", description="Invocations that ran a sandbox, by tool and status")
duration = _meter.create_histogram(
    "toolcell.invocation.duration", unit="s", description="Wall time of an invocation, from request to result",
    explicit_bucket_boundaries_advisory=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120])
active_sandboxes = _meter.create_up_down_counter(
    "toolcell.sandboxes.active", unit="{sandbox}", description="Sandboxes created and not yet removed")
endings = _meter.create_counter(
    "toolcell.invocation.endings", unit="{invocation}",
    description="Invocations with an id, by how they ended: result, error, disconnected, deadline, shutdown, "
                "internal_error, swept")
rejections = _meter.create_counter(
    "toolcell.rejections", unit="{invocation}", description="Invocations refused or failed without a result")
redactions = _meter.create_counter(
    "toolcell.redactions", unit="{redaction}", description="Secrets replaced in tool output, by kind")
reloads = _meter.create_counter(
    "toolcell.config.reloads", unit="{reload}", description="Configuration reloads by outcome")
sessions_open = _meter.create_up_down_counter(
    "toolcell.sessions.open", unit="{session}", description="Sessions open (each holds one sandbox)")
session_ends = _meter.create_counter(
    "toolcell.session.endings", unit="{session}",
    description="Sessions ended, by reason: closed, idle, lifetime, max_calls, call_stopped, sandbox_ended, "
                "shutdown, swept")
serving = _meter.create_up_down_counter(
    "toolcell.health.serving", unit="1", description="1 while the gRPC health status is SERVING")


# Pool managers being observed (weak: a stopped supervisor's pools drop out by themselves).
_pool_sources: weakref.WeakSet[Any] = weakref.WeakSet()


def _pool_stats() -> Iterable[tuple[str, Any]]:
    for source in list(_pool_sources):
        yield from source.stats().items()


def _observe_pool_sizes(options: CallbackOptions) -> Iterable[Observation]:
    for tool, s in _pool_stats():
        for state, value in (("target", s.size), ("ready", s.ready), ("creating", s.creating)):
            yield Observation(value, {"tool": tool, "state": state})


def _observe_pool_claims(options: CallbackOptions) -> Iterable[Observation]:
    for tool, s in _pool_stats():
        yield Observation(s.hits, {"tool": tool, "outcome": "hit"})
        yield Observation(s.misses, {"tool": tool, "outcome": "miss"})


pool_sandboxes = _meter.create_observable_gauge(
    "toolcell.pool.sandboxes", callbacks=[_observe_pool_sizes], unit="{sandbox}",
    description="Warm pool sandboxes by state: target size, ready, being created")
pool_claims = _meter.create_observable_counter(
    "toolcell.pool.claims", callbacks=[_observe_pool_claims], unit="{invocation}",
    description="Calls of pooled tools served warm (hit) or cold because the pool was empty (miss)")


def watch_pools(manager: Any) -> None:
    """Report ``manager.stats()`` (tool -> PoolStats) through the pool instruments."""
    _pool_sources.add(manager)


def reason_of(exc: BaseException) -> str:
    """``ImageMissing`` -> ``image_missing``: a bounded label from the error class."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def record_result(tool: str, status: str, duration_s: float, redacted: Mapping[str, int],
                  in_session: bool = False) -> None:
    attrs = {"tool": tool, "status": status}
    if in_session:  # a bounded label: the session's id is on its spans and log lines, never a metric label
        attrs["session"] = "true"
    invocations.add(1, attrs)
    duration.record(duration_s, attrs)
    for kind, count in redacted.items():
        redactions.add(count, {"tool": tool, "kind": kind})


def record_end(tool: str, ending: str, status: str, duration_s: float, redacted: Mapping[str, int],
               in_session: bool = False) -> None:
    """Every invocation's end, once; a result is also counted by status (``toolcell.invocations``)."""
    endings.add(1, {"tool": tool, "ending": ending, **({"session": "true"} if in_session else {})})
    if ending == "result":
        record_result(tool, status, duration_s, redacted, in_session)


def record_rejection(exc: BaseException) -> None:
    rejections.add(1, {"reason": reason_of(exc)})
