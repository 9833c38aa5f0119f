"""Health: SERVING only while the engine answers and every configured tool's (and MCP server's) image is present.

A periodic task asks the backend (``ping`` then ``has_image`` per distinct image) and sets the gRPC
health status of ``""`` and ``toolcell.v1.Supervisor``; each change is logged with its reason. A check
that does not answer within the interval counts as unreachable. ``check_now`` runs one check at once
(start-up, after a reload). ``health`` is the last check's outcome for HTTP ``/healthz`` (``probehttp``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from toolcell import metrics
from toolcell.errors import BackendError
from toolcell.probehttp import Health
from toolcell.supervisor import Supervisor

log = logging.getLogger("toolcell.health")

CHECK_TIMEOUT_S = 5.0


async def probe(supervisor: Supervisor, timeout_s: float = CHECK_TIMEOUT_S) -> str:
    """One check: '' when healthy, else why not (engine unreachable, images missing)."""
    backend = supervisor.backend
    # The tool sources' (MCP servers') images too: one that is missing serves no tools at all.
    images = sorted({t.image for t in supervisor.config.tools.values()} |
                    {src.image for src in supervisor.config.sources.values()})

    async def check() -> str:
        await backend.ping()
        if supervisor.awaiting_engine:
            return "the engine answers; the start-up sweep has not run yet"
        missing = [image for image in images if not await backend.has_image(image)]
        return f"images missing on the engine: {', '.join(missing)}" if missing else ""

    try:
        return await asyncio.wait_for(check(), timeout=timeout_s)
    except TimeoutError:
        return f"engine did not answer within {timeout_s:g}s"
    except BackendError as exc:
        return f"engine unreachable: {exc}"


class HealthMonitor:
    def __init__(self, supervisor: Supervisor, publish: Callable[[bool], Awaitable[None]]) -> None:
        self.supervisor = supervisor
        self._publish = publish
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.serving: bool | None = None
        self.reason = ""

    async def check_now(self) -> bool:
        async with self._lock:
            interval = self.supervisor.config.server.health_interval_s
            reason = await probe(self.supervisor, min(CHECK_TIMEOUT_S, interval) if interval else CHECK_TIMEOUT_S)
            serving = not reason
            if serving != self.serving:
                if serving:
                    log.info("health: SERVING")
                else:
                    log.warning("health: NOT_SERVING: %s", reason)
                if serving:
                    metrics.serving.add(1)
                elif self.serving:
                    metrics.serving.add(-1)
                await self._publish(serving)
            self.serving, self.reason = serving, reason
            return serving

    def health(self) -> Health:
        """The status last published (SERVING or not) and why not; cheap, so any thread may call it."""
        serving, reason = self.serving, self.reason
        if serving:
            return Health(True)
        return Health(False, reason or ("starting" if serving is None else "shutting down"))

    def start(self) -> None:
        if self.supervisor.config.server.health_interval_s > 0 and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.supervisor.config.server.health_interval_s)
            try:
                await self.check_now()
            except Exception:  # never let the monitor die: it is what reports trouble
                log.exception("health check failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.serving:
            metrics.serving.add(-1)
        self.serving, self.reason = False, "shutting down"
