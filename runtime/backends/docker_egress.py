"""The Docker backend's egress: one granted sandbox's internal network and filtering proxy, before and after it.

    open   ensure the upstream network -> create the internal network (a free random /29)
           -> create the proxy sidecar (internal .2 + upstream) -> start it with the proxy program on stdin
           -> wait for its "listening" line -> hand back where the sandbox joins (internal .3) and the
              environment that points it at the proxy (HTTP(S)_PROXY, ``policy.network.proxy_env``)
    close  (after the sandbox is removed) SIGTERM the proxy -> read its accounting summary
           -> remove the proxy -> remove the network; never raises (the owner sweep is the backstop)

``close`` is safe after a partial or cancelled ``open``: it waits for creations still in flight and
removes what exists. Every object carries the owner's labels, so the start-up/shutdown sweep finds it.
Orchestration only: the engine calls are the backend's (``EgressEngine``), so this module imports no SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, Protocol

from toolcell.backends.base import Sandbox
from toolcell.errors import BackendError
from toolcell.model import EgressDestination
from toolcell.policy.network import (
    EgressGrant,
    EgressLayout,
    EgressSettings,
    candidate_subnets,
    proxy_env,
    proxy_policy_json,
)
from toolcell.policy.spec import ROLE_PROXY, Identity, SandboxSpec, Scratch

__all__ = [
    "LABEL_INVOCATION",
    "LABEL_LEASE",
    "LABEL_MANAGED",
    "LABEL_OWNER",
    "LABEL_PROFILE",
    "LABEL_ROLE",
    "LABEL_TOOL",
    "PROGRAM",
    "EgressEngine",
    "EgressSession",
    "NetworkAttachment",
    "NetworkSpec",
    "identity_labels",
    "lease_until",
    "proxy_spec",
]

# The Docker objects' labels: whose an object is (the owner sweep) and what it serves (audits, Removed).
LABEL_MANAGED: Final = "io.toolcell.managed"
LABEL_OWNER: Final = "io.toolcell.owner"
LABEL_INVOCATION: Final = "io.toolcell.invocation"
LABEL_TOOL: Final = "io.toolcell.tool"
LABEL_PROFILE: Final = "io.toolcell.profile"
LABEL_ROLE: Final = "io.toolcell.role"
# Identity.lease_until, whole Unix seconds: past it any supervisor on the engine may remove the object.
LABEL_LEASE: Final = "io.toolcell.lease-until"
ROLE_NETWORK: Final = "egress-network"
ROLE_UPSTREAM: Final = "egress-upstream"
# The proxy program, package data beside the launcher; it arrives on the sidecar's stdin.
PROGRAM: Final = resources.files("toolcell.data").joinpath("egress_proxy.py").read_bytes()
PROXY_USER: Final = "10001:10001"
# Bounds on what the proxy's output can make the supervisor hold.
_MAX_LINE_BYTES: Final = 1024 * 1024
_MAX_STDERR_BYTES: Final = 4096
_STOP_GRACE_S: Final = 3.0

log = logging.getLogger("toolcell.egress")


def identity_labels(identity: Identity) -> dict[str, str]:
    """A container's labels from its identity (the label names predate the neutral spec: kept)."""
    labels = {LABEL_MANAGED: "true", LABEL_OWNER: identity.owner, LABEL_INVOCATION: identity.invocation_id,
              LABEL_TOOL: identity.tool}
    if identity.profile:
        labels[LABEL_PROFILE] = identity.profile
    if identity.role:
        labels[LABEL_ROLE] = identity.role
    if identity.lease_until:
        labels[LABEL_LEASE] = str(int(identity.lease_until) + 1)
    return labels


def lease_until(labels: Mapping[str, Any]) -> float:
    """An object's lease from its labels; 0 when it has none (or an unreadable one: left to its owner)."""
    try:
        return float(int(str(labels.get(LABEL_LEASE, "0"))[:16]))
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class NetworkSpec:
    """An engine network to create. ``subnets`` are tried in order (another may already use one)."""

    name: str
    labels: Mapping[str, str]
    internal: bool = True
    subnets: tuple[str, ...] = ()
    # No address on the host side of the bridge: the host is not reachable from the network.
    host_isolated: bool = True


@dataclass(frozen=True)
class NetworkAttachment:
    """Where a container joins: ``network`` at ``ip``, then ``extra`` networks before it starts."""

    network: str
    ip: str
    extra: tuple[str, ...] = ()


class EgressEngine(Protocol):
    """The engine calls a session makes (the Docker backend's own, never the ``Backend`` protocol)."""

    async def ensure_network(self, name: str, labels: Mapping[str, str]) -> None: ...

    async def create_network(self, spec: NetworkSpec) -> str: ...

    async def remove_network(self, name: str) -> None: ...

    async def create_attached(self, spec: SandboxSpec, attachment: NetworkAttachment) -> Sandbox: ...


def proxy_spec(settings: EgressSettings, identity: Identity, *, policy_json: str, seccomp_json: str) -> SandboxSpec:
    """The egress proxy's sidecar: contained like a tool (it parses what a hostile tool sends)."""
    return SandboxSpec(
        image=settings.image,
        command=("python3", "-I", "-S", "-u", "-"),  # the program arrives on stdin (PROGRAM)
        user=PROXY_USER,
        env={"LANG": "C.UTF-8", "HOME": "/tmp",  # noqa: S108 # nosec B108 - the sidecar's own tmpfs
             "TOOLCELL_EGRESS_POLICY": policy_json},
        identity=Identity(owner=identity.owner, invocation_id=identity.invocation_id, tool=identity.tool,
                          role=ROLE_PROXY, lease_until=identity.lease_until),
        isolation="runc",
        seccomp_json=seccomp_json,
        memory_bytes=settings.proxy_memory_bytes,
        cpus=0.5,
        pids=16,
        nofile=512,
        scratch=(Scratch("/tmp", 1024 * 1024),),  # noqa: S108 # nosec B108 - inside the sidecar
        mounts=(),
        timeout_s=0.0,  # lives as long as its sandbox; the sandbox's removal stops it
        kill_grace_s=1.0,
        hostname="egress",
    )


class EgressSession:
    """One granted sandbox's network and proxy. ``open`` before the sandbox, ``close`` after it."""

    def __init__(self, engine: EgressEngine, settings: EgressSettings, grants: Sequence[EgressGrant],
                 identity: Identity, *, seccomp_json: str) -> None:
        self._engine = engine
        self._settings = settings
        self._grants = tuple(grants)
        self._identity = identity
        self._seccomp_json = seccomp_json
        self._network_name = f"toolcell-egress-{secrets.token_hex(8)}"
        self._network_task: asyncio.Future[str] | None = None
        self._proxy_task: asyncio.Future[Sandbox] | None = None
        self._reader: asyncio.Future[None] | None = None
        self._ready = asyncio.Event()
        self._summarized = asyncio.Event()
        self._summary: list[dict[str, Any]] | None = None
        self._stderr = bytearray()
        self._closed: tuple[EgressDestination, ...] | None = None
        self.layout: EgressLayout | None = None

    async def open(self) -> tuple[NetworkAttachment, dict[str, str]]:
        """Create network and proxy; return where the sandbox joins and the environment it gets."""
        owner = self._identity.owner
        upstream = self._settings.upstream_network(owner)
        labels = {LABEL_MANAGED: "true", LABEL_ROLE: ROLE_UPSTREAM}
        if not self._settings.network:  # ours: swept with the owner's other objects
            labels[LABEL_OWNER] = owner
        await self._engine.ensure_network(upstream, labels)
        spec = NetworkSpec(
            name=self._network_name,
            labels={**identity_labels(self._identity), LABEL_ROLE: ROLE_NETWORK},
            internal=True,
            subnets=candidate_subnets(self._settings.subnet_pool),
        )
        self._network_task = asyncio.ensure_future(self._engine.create_network(spec))
        subnet = await asyncio.shield(self._network_task)
        layout = EgressLayout.for_subnet(self._network_name, subnet)
        self.layout = layout
        sidecar = proxy_spec(self._settings, self._identity, policy_json=proxy_policy_json(self._grants, layout),
                             seccomp_json=self._seccomp_json)
        self._proxy_task = asyncio.ensure_future(self._engine.create_attached(
            sidecar, NetworkAttachment(layout.network, layout.proxy_ip, (upstream,))))
        proxy = await asyncio.shield(self._proxy_task)
        await proxy.start(PROGRAM)
        self._reader = asyncio.ensure_future(self._read(proxy))
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({ready, self._reader}, timeout=self._settings.ready_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._ready.is_set():
            # The proxy is our program and has seen nothing of the tool yet: its last line is ours to show.
            detail = self._stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise BackendError(f"egress proxy did not start: {detail[0][:300]}")
        return NetworkAttachment(layout.network, layout.sandbox_ip), proxy_env(layout)

    async def close(self) -> tuple[EgressDestination, ...]:
        """Stop the proxy, collect its accounting, remove proxy and network. Never raises; idempotent."""
        if self._closed is not None:
            return self._closed
        self._closed = ()
        if self._proxy_task is not None:
            proxy = await _settled(self._proxy_task)
            if proxy is not None:
                try:
                    await self._stop(proxy)
                except BackendError as exc:
                    log.warning("stopping egress proxy %s: %s", proxy.id[:12], exc)
                finally:
                    try:
                        await proxy.remove()
                    except BackendError as exc:  # the owner sweep removes it later
                        log.warning("removing egress proxy %s: %s", proxy.id[:12], exc)
        if self._network_task is not None and await _settled(self._network_task) is not None:
            try:
                await self._engine.remove_network(self._network_name)
            except BackendError as exc:  # the owner sweep removes it later
                log.warning("removing egress network %s: %s", self._network_name, exc)
        self._closed = self.destinations()
        return self._closed

    def destinations(self) -> tuple[EgressDestination, ...]:
        """What the proxy accounted, bounded: host names as the tool wrote them (redacted above the seam)."""
        found = []
        for d in self._summary or []:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                found.append(EgressDestination(
                    host=str(d["host"])[:255], port=int(d["port"]), allowed=bool(d["allowed"]),
                    reason=str(d["reason"])[:64], connections=int(d["connections"]),
                    bytes_up=int(d["bytes_up"]), bytes_down=int(d["bytes_down"])))
        return tuple(found)

    async def _stop(self, proxy: Sandbox) -> None:
        """SIGTERM, then wait for the summary line (not for the exit: removal kills what is left)."""
        if self._reader is None:
            return
        summarized: asyncio.Future[Any] = asyncio.ensure_future(self._summarized.wait())
        reader: asyncio.Future[Any] = self._reader
        try:
            await proxy.signal(signal.SIGTERM)
            await asyncio.wait({summarized, reader}, timeout=_STOP_GRACE_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            summarized.cancel()
            self._reader.cancel()

    async def _read(self, proxy: Sandbox) -> None:
        line = bytearray()
        async for stream, data in proxy.output():
            if stream == "stderr":
                self._stderr = (self._stderr + data)[-_MAX_STDERR_BYTES:]
                continue
            line += data
            while (end := line.find(b"\n")) >= 0:
                self._record(bytes(line[:end]))
                del line[: end + 1]
            if len(line) > _MAX_LINE_BYTES:
                line.clear()

    def _record(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if message.get("event") == "listening":
            self._ready.set()
        elif message.get("event") == "summary" and isinstance(message.get("destinations"), list):
            self._summary = message["destinations"]
            self._summarized.set()


async def _settled(task: asyncio.Future[Any]) -> Any:
    """The task's result once it is done (waiting if needed), or None if it failed or was cancelled."""
    with contextlib.suppress(BaseException):
        return await asyncio.shield(task)
    return None
