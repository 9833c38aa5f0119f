"""Wire the gRPC server: Supervisor service, health, reflection, the listening socket."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from toolcell import metrics
from toolcell.api.v1 import supervisor_pb2 as pb
from toolcell.audit import AuditLog
from toolcell.backends.base import Removed
from toolcell.gate import Gate, Sampler
from toolcell.hostload import HostSampler
from toolcell.server import reflection
from toolcell.server.healthcheck import HealthMonitor
from toolcell.server.identity import Authenticator
from toolcell.server.service import SupervisorService, add_to_server
from toolcell.server.tokens import JwtVerifier
from toolcell.server.transport import Transport, server_options
from toolcell.sessions.registry import SESSION_PREFIX
from toolcell.supervisor import Supervisor

log = logging.getLogger("toolcell.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Supervisor"].full_name
# After the grace period, cancelled calls get this long (plus their kill grace) to report "killed".
# Generous on purpose: it only matters when the engine is slow, and then a cut-off call loses its result.
CANCEL_ALLOWANCE_S = 10.0


class App:
    """One supervisor behind one gRPC server."""

    def __init__(self, supervisor: Supervisor, *, sampler: Sampler | None = None) -> None:
        self.supervisor = supervisor
        cfg = supervisor.config.server
        security = supervisor.config.security
        # First: a second supervisor on the same audit file is refused before anything else is built.
        self.audit = AuditLog(security.audit.file, max_bytes=security.audit.max_bytes, keep=security.audit.keep,
                              protect_s=security.audit.protect_s) \
            if security.audit is not None else None
        self.server = grpc.aio.server(options=server_options(security, cfg.max_message_bytes))
        self.health = health.aio.HealthServicer()
        self.transport = Transport(security, cfg.listen, cfg.socket_mode,
                                   max_connections_per_uid=cfg.max_connections_per_uid,
                                   handshake_timeout_s=cfg.handshake_timeout_s)
        self.gate = Gate(security, audit=self.audit, known_tool=supervisor.known_tool,
                         sampler=sampler or (HostSampler() if security.admission.enabled else None))
        verifier = JwtVerifier(security.jwt) if security.jwt is not None else None
        self.authenticator = Authenticator(security.policy, verifier, self.transport.peers)
        self.service = SupervisorService(supervisor, self.gate, self.authenticator)
        add_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), self.server)
        self.monitor = HealthMonitor(supervisor, self._set_health)
        self.address = ""

    async def _record_swept(self, removed: list[Removed]) -> None:
        """A previous run (ours, or a peer's whose lease ended) crashed mid-call: each of its calls ends on record
        now, as ``swept``, under the instance that ran it."""
        instance = self.supervisor.config.server.instance
        for sandbox in removed:
            if sandbox.invocation_id.startswith(SESSION_PREFIX):  # a session's sandbox: the session ends
                metrics.session_ends.add(1, {"reason": "swept"})
                await self.gate.record(None, "session_end", session_id=sandbox.invocation_id, tool=sandbox.tool,
                                       reason="swept", owner_instance=sandbox.owner or instance,
                                       sandbox_id=sandbox.sandbox_id)
                continue
            tool = sandbox.tool if self.supervisor.known_tool(sandbox.tool) else "unknown"
            metrics.record_end(tool, "swept", "swept", 0.0, {})
            await self.gate.sweep_end(sandbox.invocation_id, sandbox.tool, sandbox.owner or instance,
                                      sandbox_id=sandbox.sandbox_id)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> str:
        """Sweep leftovers, bind, start serving; returns the bound address."""
        self.supervisor.on_ready = self.monitor.check_now  # engine.wait_at_start: SERVING at once
        self.supervisor.on_swept = self._record_swept
        self.supervisor.on_session_end = self.service.session_ended
        await self.supervisor.start()
        self.transport.bind(self.server)
        self.authenticator.peers = self.transport.peers
        self.address = self.transport.address
        await self._set_health(False)
        await self.server.start()
        await self.transport.start()
        await self.monitor.check_now()
        self.monitor.start()
        # Everything built so far (config, validators, seccomp, modules) lives as long as the process: out
        # of the collector's sight, a full collection no longer walks it (one took 13 ms mid-call; p99).
        gc.freeze()
        log.info("serving on %s", self.address)
        return self.address

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, stop accepting, let calls finish within grace, cancel the rest, clean every sandbox."""
        await self.monitor.stop()
        await self._set_health(False)
        grace = self.supervisor.config.server.shutdown_grace_s if grace_s is None else grace_s
        kill_grace = max((p.kill_grace_s for p in self.supervisor.config.profiles.values()), default=0.0)
        # New RPCs are refused at once; running handlers get until grace + allowance before gRPC cuts them.
        stopping = asyncio.ensure_future(self.server.stop(grace + kill_grace + CANCEL_ALLOWANCE_S))
        if not await self.supervisor.drain(grace):
            log.warning("shutdown grace (%gs) over: cancelling %d running call(s)", grace,
                        self.supervisor.cancel_all())
        await stopping
        await self.supervisor.shutdown()
        with contextlib.suppress(Exception):
            await self.supervisor.backend.close()
        await self.transport.close()
        await self.service.flush()  # end records of calls cut off by the shutdown
        await self.gate.flush_refusals()
        if self.audit is not None:
            self.audit.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()
