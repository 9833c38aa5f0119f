"""Wire the gRPC server: Supervisor service, health, reflection, the listening socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime.api.v1 import supervisor_pb2 as pb
from runtime.api.v1 import supervisor_pb2_grpc as pb_grpc
from runtime.errors import ConfigError
from runtime.server.healthcheck import HealthMonitor
from runtime.server.service import SupervisorService
from runtime.supervisor import Supervisor

log = logging.getLogger("toolcell.server")

# After the grace period, cancelled calls get this long (plus their kill grace) to report "killed".
CANCEL_ALLOWANCE_S = 3.0

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Supervisor"].full_name


def unix_path(address: str) -> Path | None:
    if address.startswith("unix://"):
        return Path(address[len("unix://"):])
    if address.startswith("unix:"):
        return Path(address[len("unix:"):])
    return None


def _prepare_socket_path(path: Path) -> None:
    """Create the parent dir (0700 if new) and clear a stale socket; refuse to steal a live one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ConfigError(f"{path} exists and is not a socket", key="server.listen")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # stale: nobody listens
        return
    finally:
        probe.close()
    raise ConfigError(f"another process is already listening on {path}", key="server.listen")


class App:
    """One supervisor behind one gRPC server."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        cfg = supervisor.config.server
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
        self.health = health.aio.HealthServicer()
        pb_grpc.add_SupervisorServicer_to_server(  # type: ignore[no-untyped-call]
            SupervisorService(supervisor), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.monitor = HealthMonitor(supervisor, self._set_health)
        self.address = ""

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> str:
        """Sweep leftovers, bind, start serving; returns the bound address."""
        await self.supervisor.start()
        cfg = self.supervisor.config.server
        listen = cfg.listen
        path = unix_path(listen)
        if path is not None:
            _prepare_socket_path(path)
            old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
            try:
                self.server.add_insecure_port(f"unix://{path}")
            finally:
                os.umask(old)
            os.chmod(path, cfg.socket_mode)
            self.address = f"unix://{path}"
        else:
            log.warning("listening on plain TCP %s: no transport security; prefer a Unix socket", listen)
            try:
                port = self.server.add_insecure_port(listen)
            except RuntimeError as exc:
                raise ConfigError(f"cannot listen on {listen}: {exc}", key="server.listen") from exc
            host = listen.rsplit(":", 1)[0]
            self.address = f"{host}:{port}"
        await self._set_health(False)
        await self.server.start()
        await self.monitor.check_now()
        self.monitor.start()
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
        path = unix_path(self.address)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def wait(self) -> None:
        await self.server.wait_for_termination()
