"""One granted invocation's egress: its internal network and its proxy, from before the sandbox to after.

    open   ensure the upstream network -> create the internal network (a free random /29)
           -> create the proxy sidecar (internal .2 + upstream) -> start it with proxy.py on stdin
           -> wait for its "listening" line -> hand back the sandbox's plan (internal .3, HTTP(S)_PROXY)
    close  (after the sandbox is removed) SIGTERM the proxy -> read its accounting summary
           -> remove the proxy -> remove the network

``close`` is safe after a partial or cancelled ``open``: it waits for creations still in flight and
removes what exists. Everything carries the owner's labels, so the start-up/shutdown sweep is the backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import signal
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, Final

from runtime.backends.base import Backend, Sandbox
from runtime.errors import BackendError
from runtime.model import EgressDestination
from runtime.policy.network import (
    LABEL_ROLE,
    ROLE_NETWORK,
    ROLE_UPSTREAM,
    EgressGrant,
    EgressLayout,
    EgressSettings,
    NetworkSpec,
    candidate_subnets,
    proxy_env,
    proxy_policy_json,
)
from runtime.policy.plan import LABEL_INVOCATION, LABEL_MANAGED, LABEL_OWNER, ContainerPlan, compile_proxy_plan

PROGRAM: Final = resources.files("runtime.egress").joinpath("proxy.py").read_bytes()
# Bounds on what the proxy's output can make the supervisor hold.
_MAX_LINE_BYTES: Final = 1024 * 1024
_MAX_STDERR_BYTES: Final = 4096
_STOP_GRACE_S: Final = 3.0


class EgressSession:
    def __init__(self, backend: Backend, settings: EgressSettings, grants: Sequence[EgressGrant], *,
                 invocation_id: str, tool: str, owner: str, seccomp_json: str,
                 redact: Callable[[str], str] = lambda s: s) -> None:
        self._backend = backend
        self._settings = settings
        self._grants = tuple(grants)
        self._invocation_id = invocation_id
        self._tool = tool
        self._owner = owner
        self._seccomp_json = seccomp_json
        self._redact = redact
        self._network_name = f"toolcell-egress-{secrets.token_hex(8)}"
        self._network_task: asyncio.Future[str] | None = None
        self._proxy_task: asyncio.Future[Sandbox] | None = None
        self._reader: asyncio.Future[None] | None = None
        self._ready = asyncio.Event()
        self._summarized = asyncio.Event()
        self._summary: list[dict[str, Any]] | None = None
        self._stderr = bytearray()
        self.layout: EgressLayout | None = None

    async def open(self, plan: ContainerPlan) -> ContainerPlan:
        """Create network and proxy; return ``plan`` joined to the network with the proxy settings."""
        upstream = self._settings.upstream_network(self._owner)
        labels = {LABEL_MANAGED: "true", LABEL_ROLE: ROLE_UPSTREAM}
        if not self._settings.network:  # ours: swept with the owner's other objects
            labels[LABEL_OWNER] = self._owner
        await self._backend.ensure_network(upstream, labels)
        spec = NetworkSpec(
            name=self._network_name,
            labels={LABEL_MANAGED: "true", LABEL_OWNER: self._owner, LABEL_INVOCATION: self._invocation_id,
                    LABEL_ROLE: ROLE_NETWORK},
            internal=True,
            subnets=candidate_subnets(self._settings.subnet_pool),
        )
        self._network_task = asyncio.ensure_future(self._backend.create_network(spec))
        subnet = await asyncio.shield(self._network_task)
        layout = EgressLayout.for_subnet(self._network_name, subnet)
        self.layout = layout
        proxy_plan = compile_proxy_plan(
            self._settings, layout, policy_json=proxy_policy_json(self._grants, layout), upstream_network=upstream,
            invocation_id=self._invocation_id, tool=self._tool, owner=self._owner, seccomp_json=self._seccomp_json,
        )
        self._proxy_task = asyncio.ensure_future(self._backend.create(proxy_plan))
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
            detail = self._stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise BackendError(f"egress proxy did not start: {self._redact(detail[0])[:300]}")
        return dataclasses.replace(plan, network_mode=layout.network, network_ip=layout.sandbox_ip,
                                   env={**plan.env, **proxy_env(layout)})

    async def close(self) -> tuple[EgressDestination, ...]:
        """Stop the proxy, collect its accounting, remove proxy and network. Never raises for cleanup."""
        errors: list[BaseException] = []
        if self._proxy_task is not None:
            proxy = await _settled(self._proxy_task)
            if proxy is not None:
                try:
                    await self._stop(proxy)
                finally:
                    try:
                        await proxy.remove()
                    except BackendError as exc:
                        errors.append(exc)
        if self._network_task is not None and await _settled(self._network_task) is not None:
            try:
                await self._backend.remove_network(self._network_name)
            except BackendError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return self.destinations()

    def destinations(self) -> tuple[EgressDestination, ...]:
        found = []
        for d in self._summary or []:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                found.append(EgressDestination(
                    host=self._redact(str(d["host"]))[:255], port=int(d["port"]), allowed=bool(d["allowed"]),
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
            await asyncio.wait({summarized, reader}, timeout=_STOP_GRACE_S,
                               return_when=asyncio.FIRST_COMPLETED)
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
