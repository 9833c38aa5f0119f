"""Talking to a running supervisor from outside: its state file, ``toolcell reload``, ``toolcell health``.

The supervisor writes a small JSON state file (``server.state_file``, by default next to its socket,
mode 0600): its pid, the config it serves, how many reloads it has attempted and the outcome of the last.
``toolcell reload`` reads it, sends SIGHUP, and waits for the reload counter to move, so it can report
whether the new config was taken or refused (and why) instead of firing a signal blind.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from toolcell.errors import ToolcellError
from toolcell.safepath import private_dir


class ControlError(ToolcellError):
    """The running supervisor can't be found or didn't answer."""


@dataclass(frozen=True)
class State:
    pid: int
    config: str
    reloads: int = 0
    last_reload_ok: bool = True
    last_reload_error: str = ""
    last_reload_at: float = 0.0


def write_state(path: str, state: State) -> None:
    """Atomically replace the state file (0600)."""
    target = Path(path)
    private_dir(target.parent, key="server.state_file")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(state), fh)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(path: str) -> State:
    try:
        # The file names the pid that ``toolcell reload`` signals: never through a symlink, only ours or root's.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            owner = os.fstat(fh.fileno()).st_uid
            if owner not in (os.geteuid(), 0):
                raise ControlError(f"supervisor state {path} is owned by uid {owner}, not by us or root: refusing it")
            raw: dict[str, Any] = json.loads(fh.read(1 << 16))
        return State(**raw)
    except FileNotFoundError as exc:
        raise ControlError(f"no supervisor state at {path}: is `toolcell serve` running with this socket?") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise ControlError(f"unreadable supervisor state {path}: {exc}") from exc


def _is_toolcell(pid: int) -> bool:
    """Guard against a recycled pid: the process must be a toolcell serve."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serve" in cmdline and any(b"toolcell" in part or part == b"runtime" for part in cmdline)


def request_reload(state_file: str, timeout_s: float = 15.0) -> State:
    """SIGHUP the supervisor and wait for it to record the outcome; returns the new state."""
    before = read_state(state_file)
    if not _is_toolcell(before.pid):
        raise ControlError(f"pid {before.pid} from {state_file} is not a running toolcell supervisor")
    try:
        os.kill(before.pid, signal.SIGHUP)
    except OSError as exc:
        raise ControlError(f"cannot signal supervisor pid {before.pid}: {exc.strerror}") from exc
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
        with_new = read_state(state_file)
        if with_new.reloads > before.reloads:
            return with_new
    raise ControlError(f"supervisor pid {before.pid} did not report a reload within {timeout_s:g}s")


def check_health(target: str, service: str = "", timeout_s: float = 5.0) -> str:
    """The gRPC health status name (SERVING, NOT_SERVING, ...); ControlError when unreachable."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise ControlError(f"{exc.code().name}: {exc.details()}") from exc
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return name
