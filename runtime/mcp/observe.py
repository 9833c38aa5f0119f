"""The MCP HTTP bridge's own health and metrics.

- ``SupervisorProbe``: is the supervisor reachable and SERVING? One gRPC health check at a time, its
  answer kept ``TTL_S`` seconds, so a flood of ``/healthz`` requests makes at most one supervisor call
  every few seconds.
- ``HealthRoute`` (ASGI): ``GET``/``HEAD /healthz`` on the MCP port -> 200 ``ok`` or 503 ``not serving:
  <reason>``. It sits inside ``HostOriginGuard`` (the Host must be the listen address or a loopback
  name with the port, as for ``/mcp``) and outside ``BearerGuard`` (a kubelet has no token; the answer
  holds no caller data).
- ``BridgeMetrics``: prometheus_client instruments in a registry of the bridge's own, served by
  ``probehttp`` on ``--metrics-listen`` (not on the MCP port: see ``bridge.serve_http``):

    toolcell_mcp_http_requests_total      counter  status     every HTTP request, refusals included
    toolcell_mcp_tool_calls_total         counter  outcome    ok | tool_error | rejected | cancelled | failed
    toolcell_mcp_sessions_active          gauge    -          MCP sessions the transport holds
    toolcell_mcp_supervisor_serving       gauge    -          1 when the last supervisor check was SERVING
    toolcell_mcp_supervisor_checks_total  counter  -          health checks sent to the supervisor

Labels are bounded sets: an HTTP status code (100-599, else ``other``) and the outcomes above.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mcp.shared.exceptions import MCPError
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from toolcell.probehttp import Health, plain

TTL_S = 3.0
CHECK_TIMEOUT_S = 2.0
SERVICE = "toolcell.v1.Supervisor"
OUTCOMES = ("ok", "tool_error", "rejected", "cancelled", "failed")


class SupervisorProbe:
    """The supervisor's gRPC health, asked on ``channel`` at most once per ``ttl_s`` (single flight)."""

    def __init__(self, channel: grpc.aio.Channel, *, ttl_s: float = TTL_S, timeout_s: float = CHECK_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stub = health_pb2_grpc.HealthStub(channel)
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._last: tuple[float, Health] | None = None
        self.checks = 0  # supervisor calls made (for tests and the curious)

    def health_from(self, loop: asyncio.AbstractEventLoop) -> Health:
        """``health()`` asked from another thread (the metrics listener's) of the bridge's event ``loop``."""
        future = asyncio.run_coroutine_threadsafe(self.health(), loop)
        try:
            return future.result(self.timeout_s + 1.0)
        except Exception:  # the loop is stuck or closing: no answer is an answer
            future.cancel()
            return Health(False, "the bridge did not answer in time")

    def last(self) -> Health | None:
        """The last answer however old, None before the first."""
        last = self._last
        return last[1] if last is not None else None

    def cached(self) -> Health | None:
        """The last answer while it is fresh, else None."""
        last = self._last
        return last[1] if last is not None and self._clock() - last[0] < self.ttl_s else None

    async def health(self) -> Health:
        if (fresh := self.cached()) is not None:
            return fresh
        async with self._lock:  # callers that waited here take the answer the first one got
            if (fresh := self.cached()) is not None:
                return fresh
            health = await self._check()
            self._last = (self._clock(), health)
            return health

    async def _check(self) -> Health:
        self.checks += 1
        try:
            resp = await self._stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:  # the code's name only: details are the peer's words
            return Health(False, f"supervisor unreachable: {exc.code().name}")
        if resp.status == health_pb2.HealthCheckResponse.SERVING:
            return Health(True)
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return Health(False, f"supervisor {plain(name, 40)}")


class BridgeMetrics:
    """The bridge's instruments, in ``registry`` (a fresh one by default: one bridge, one registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("toolcell_mcp_http_requests", "HTTP requests answered, by status code",
                                ["status"], registry=self.registry)
        self.tool_calls = Counter("toolcell_mcp_tool_calls", "MCP tools/call requests, by outcome",
                                  ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.tool_calls.labels(outcome)
        self.sessions = Gauge("toolcell_mcp_sessions_active", "MCP sessions held by the Streamable HTTP transport",
                              registry=self.registry)

    def count_sessions(self, manager: Any) -> None:
        """Report the SDK session manager's live sessions (read when scraped)."""
        # The SDK exposes no count; its session table is read as is, and an SDK without one reports 0.
        self.sessions.set_function(lambda: float(len(getattr(manager, "_server_instances", ()))))

    def watch(self, probe: SupervisorProbe) -> None:
        """Report ``probe``'s last answer and how many checks it sent."""
        self.registry.register(_ProbeCollector(probe))

    def call(self, handler: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
        """``handler`` (a tools/call handler) counted by outcome."""
        async def counted(ctx: Any, params: Any) -> Any:
            outcome = "failed"
            try:
                result = await handler(ctx, params)
                outcome = "tool_error" if getattr(result, "is_error", False) else "ok"
                return result
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            except Exception as exc:
                outcome = "rejected" if isinstance(exc, MCPError) else "failed"
                raise
            finally:
                self.tool_calls.labels(outcome).inc()
        return counted


class _ProbeCollector:
    def __init__(self, probe: SupervisorProbe) -> None:
        self.probe = probe

    def collect(self) -> Iterator[Metric]:
        last = self.probe.last()
        yield GaugeMetricFamily("toolcell_mcp_supervisor_serving", "1 when the last supervisor check was SERVING",
                                value=1.0 if last is not None and last.serving else 0.0)
        yield CounterMetricFamily("toolcell_mcp_supervisor_checks", "Health checks sent to the supervisor",
                                  value=self.probe.checks)


class StatusCounter:
    """Count every HTTP response by its status code (outermost: refusals are counted too)."""

    def __init__(self, app: ASGIApp, metrics: BridgeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message.get("status")
                label = str(status) if isinstance(status, int) and 100 <= status <= 599 else "other"
                self.metrics.requests.labels(label).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class HealthRoute:
    """``GET``/``HEAD /healthz`` answered from ``probe``; every other request goes on to ``app``."""

    def __init__(self, app: ASGIApp, probe: SupervisorProbe) -> None:
        self.app = app
        self.probe = probe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/healthz":
            await self.app(scope, receive, send)
            return
        method = scope.get("method")
        if method not in ("GET", "HEAD"):
            status, body = 405, b"method not allowed\n"
        else:
            health = await self.probe.health()
            status, body = (200, b"ok\n") if health.serving else (503, f"not serving: {health.reason}\n".encode())
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
