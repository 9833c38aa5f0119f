"""Docker engine backend: the only module in toolcell that imports ``docker``.

One ``SandboxSpec`` becomes one container, translated here into the engine's terms (``_create_container``);
nothing is added that weakens the spec, and the hardening every sandbox gets (read-only root, no
capabilities, no-new-privileges, init, own IPC and cgroup namespaces, no log driver, core dumps off) is
fixed here, not read from the spec. The docker SDK is synchronous, so every engine call runs in this
backend's own small thread pool, never on the event loop; one low-level ``APIClient`` (pinned API
version, so constructing it does no I/O) serves every call. Engine exceptions are translated here, at
the seam, into ``toolcell.errors``.

One sandbox's life, and the engine round trips it costs::

    create      POST /containers/create                      (image/runtime errors surface here)
    start       POST /containers/{id}/attach (hijacked socket, before start: no output is lost)
                POST /containers/{id}/start
                then stdin is written and half-closed (SHUT_WR) so the tool sees EOF
    output      the attach stream is read on the event loop (``attach.py``): demultiplexed into
                (stream, bytes) chunks; bounded, so a slow consumer blocks the socket, not memory
    wait        POST /containers/{id}/wait, then one GET /containers/{id}/json for OOMKilled
    remove      DELETE /containers/{id}?force=1&v=1

Usage (peak memory, CPU time) is sampled from the host's cgroup files while the container runs
(``cgroup.py``); the cgroup disappears when the container exits, so the last sample is the best-known value.
A pooled sandbox (``create_warm``) runs the launcher (``launcher.py``) and is claimed by ``start``; so
does a cold sandbox whose spec has ``defer`` (granted secrets): the secrets travel in the launcher's
claim envelope on stdin and are written inside the sandbox, never as host files.
A spec without ``egress`` gets ``NetworkDisabled``: a private network namespace holding only loopback,
without the engine's network allocation. With ``egress`` the sandbox joins its own internal network
next to its own proxy (``docker_egress.py``), both gone with its ``remove``.
Under runsc every sandbox runs the tool behind the launcher's relay: gVisor's donated host stdio answers
a large write(2) with a short count (65,536 of 200,000 bytes) that tools take as complete, so the tool
writes into pipes inside gVisor that the launcher copies out whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.types import IPAMConfig, IPAMPool, LogConfig, Ulimit
from docker.types import Mount as DockerMount
from opentelemetry import trace

from toolcell.backends.attach import RECV_BYTES, AttachStream, SandboxStream
from toolcell.backends.base import ExitInfo, Removed, StreamName
from toolcell.backends.cgroup import CgroupLayout, CgroupProbe, StatsProbe, UsageProbe, UsageSampler
from toolcell.backends.channel import CHANNEL_DIR, ChannelListener, ChannelStream
from toolcell.backends.docker_egress import (
    LABEL_INVOCATION,
    LABEL_LEASE,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_PROFILE,
    LABEL_ROLE,
    LABEL_TOOL,
    EgressSession,
    NetworkAttachment,
    NetworkSpec,
    identity_labels,
    lease_until,
)
from toolcell.backends.launcher import envelope, launch_command, new_nonce, relay_command
from toolcell.errors import BackendError, ConfigError, EngineUnavailable, ImageMissing, RuntimeMissing
from toolcell.model import EgressDestination, Usage
from toolcell.policy.network import EgressSettings
from toolcell.policy.profile import Mount
from toolcell.policy.spec import NO_SECRETS, POOL_PREFIX, SandboxSpec, Secrets, sandbox_pids, stamped
from toolcell.sessions.host import host_command

__all__ = [
    "DEFAULT_BASE_URL", "LABEL_INVOCATION", "LABEL_MANAGED", "LABEL_OWNER", "LABEL_PROFILE", "LABEL_ROLE",
    "LABEL_TOOL", "DockerBackend", "DockerSandbox",
]

DEFAULT_BASE_URL: Final = "unix:///var/run/docker.sock"
# API 1.41 (engine 20.10) is the first with a private cgroup namespace; newer engines accept it too.
DEFAULT_API_VERSION: Final = "1.41"

_T = TypeVar("_T")
log = logging.getLogger("toolcell.docker")

# Second looks at the OOM flag of a SIGKILL exit (see _wait_blocking).
_OOM_LOOKS: Final = 50
_OOM_LOOK_S: Final = 0.1
# How long a pooled sandbox's tool may take to say it is ready (the launcher waits 120 s, then goes on).
_TOOL_READY_TIMEOUT_S = 130.0
# A claimed pooled sandbox joins the periodic usage sampler this long after its claim.
_WARM_SAMPLE_DELAY_S: Final = 0.02
_ATTACH_PARAMS: Final = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
# OCI runtimes whose container stdio (gVisor: host pipes donated to the Sentry) answers one large write(2)
# with a short count, which many tools take as complete: their tools write into pipes inside the sandbox
# that the launcher copies out whole (``runtime/data/launcher.py`` --relay).
_SHORT_WRITE_RUNTIMES: Final = frozenset({"runsc"})
# Scratch directories: noexec (a dropped binary can't run), nosuid/nodev (no privilege via files), size-capped
# (the tool can't fill host memory through tmpfs); mode and owner from the spec.
_SCRATCH_OPTIONS: Final = "rw,noexec,nosuid,nodev,size={size},mode={mode:o}"
# The engine always mounts a writable mqueue filesystem at /dev/mqueue (under runc, even with IPC "none"):
# an empty read-only tmpfs hides it, so no path but the spec's scratch can be written.
_MQUEUE_DIR: Final = "/dev/mqueue"
_MQUEUE_OPTIONS: Final = "ro,noexec,nosuid,nodev,size=4k,mode=0555"
# Messages of 5xx answers that mean "the engine went away under us", not "the request was wrong".
_ENGINE_GONE_HINTS: Final = ("connection reset", "broken pipe", "transport is closing", "unexpected eof")
# No socket, connection refused or reset, engine restarted mid-call, read timeout.
_UNREACHABLE: Final = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    ConnectionError,
    FileNotFoundError,
)


class _ChannelDown(BackendError):
    """The private channel cannot work with this engine (it cannot mount our directory, or nobody came)."""


def _removed(summary: Mapping[str, Any]) -> Removed:
    """What a swept container served, from its labels (a proxy or pooled sandbox served no invocation)."""
    labels = summary.get("Labels") or {}
    invocation = str(labels.get(LABEL_INVOCATION, ""))
    serving = LABEL_ROLE not in labels and not invocation.startswith(POOL_PREFIX)  # a pooled one's claim is unknown
    return Removed(sandbox_id=str(summary["Id"]), invocation_id=invocation if serving else "",
                   tool=str(labels.get(LABEL_TOOL, "")) if serving else "", owner=str(labels.get(LABEL_OWNER, "")))


class DockerBackend:
    """Runs sandboxes on a Docker engine (``base_url`` e.g. ``unix:///var/run/docker.sock``).

    ``max_workers`` bounds concurrent engine calls; a blocked ``wait()`` holds one worker for the
    lifetime of its container, so size it above the supervisor's concurrency cap. ``egress``: the
    supervisor's egress settings, without which a spec granting egress is refused (``check``);
    ``proxy_seccomp_json``: the egress proxy's seccomp profile (the default profile's).
    """

    name = "docker"
    # One engine serializes container creation: live calls wait behind refills beyond a couple.
    refill_concurrency = 2

    def __init__(
        self,
        base_url: str | None = None,
        *,
        channel_dir: str | None = None,
        egress: EgressSettings | None = None,
        proxy_seccomp_json: str = "",
        api_version: str = DEFAULT_API_VERSION,
        timeout_s: float = 60.0,
        max_workers: int = 64,
        sample_interval_s: float = 0.05,
        cgroup_root: str = "",
    ) -> None:
        self._address = base_url or DEFAULT_BASE_URL
        # Pooled sandboxes talk over a private channel under this directory (``channel.py``) when the
        # engine can mount it; None: always through the engine's attach relay.
        self._channel_dir = Path(channel_dir) if channel_dir else None
        self._channel_works: bool | None = None  # unknown until the first pooled sandbox
        self._egress = egress
        self._proxy_seccomp_json = proxy_seccomp_json
        try:
            self._api = docker.APIClient(
                base_url=self._address, version=api_version, timeout=timeout_s, max_pool_size=max_workers
            )
        except docker.errors.DockerException as exc:
            raise BackendError(f"invalid Docker engine address {self._address!r}: {exc}") from exc
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="toolcell-docker")
        self._sampler = UsageSampler(sample_interval_s)
        # None: the engine's container cgroups are not visible here (a containerised supervisor without the
        # host's cgroup filesystem): usage comes from the engine's stats instead.
        self._cgroups = CgroupLayout.find(cgroup_root)
        self._closed = False
        self._network_lock = asyncio.Lock()

    @property
    def address(self) -> str:
        return self._address

    @property
    def pool_transport(self) -> str:
        """How pooled sandboxes talk to us: "channel", "attach", or "channel?" before the first one."""
        if self._channel_dir is None or self._channel_works is False:
            return "attach"
        return "channel" if self._channel_works else "channel?"

    def check(self, spec: SandboxSpec) -> None:
        """Egress needs the supervisor's egress settings (the proxy's image, the subnet pool)."""
        if spec.egress and self._egress is None:
            raise ConfigError(f"tool {spec.identity.tool!r} is granted egress, but the Docker backend was "
                              "given no egress settings", key=f"tools.{spec.identity.tool}")
        if spec.egress and not self._proxy_seccomp_json.strip():
            raise ConfigError(f"tool {spec.identity.tool!r} is granted egress, but the Docker backend has no "
                              "seccomp profile for its egress proxy", key=f"tools.{spec.identity.tool}")

    async def create(self, spec: SandboxSpec) -> DockerSandbox:
        self.check(spec)
        spec = stamped(spec, time.time())
        relay = spec.isolation in _SHORT_WRITE_RUNTIMES
        if spec.defer:  # the launcher spawns the tool at start, with the secrets start brings (attach transport)
            run = dataclasses.replace(spec, command=launch_command(spec.command, defer=True, relay=relay))
        elif relay:  # the launcher takes the tool's output whole (launcher.py)
            run = dataclasses.replace(spec, command=relay_command(spec.command))
        else:
            run = spec
        if not spec.egress:
            sandbox = await self._create(run)
            sandbox._launcher = spec.defer
            return sandbox
        return await self._create_with_egress(run, spec)

    async def create_session(self, spec: SandboxSpec) -> DockerSandbox:
        """A session's sandbox, started: the session host in front of the tool, waiting for its first claim.
        Its claims and output go over the engine's attach connection (the channel serves one claim)."""
        host = spec.host
        if host is None:
            raise BackendError("a session's sandbox needs a host spec")
        self.check(spec)
        spec = stamped(spec, time.time())
        relay = spec.isolation in _SHORT_WRITE_RUNTIMES
        run = dataclasses.replace(spec, command=host_command(spec.command, host, relay=relay), defer=False)
        sandbox = await self._create(run) if not spec.egress else await self._create_with_egress(run, spec)
        sandbox._launcher = False
        sandbox._hosted = True
        try:
            await sandbox._launch()
        except BaseException:
            await asyncio.shield(asyncio.ensure_future(sandbox.remove()))
            raise
        return sandbox

    async def _create_with_egress(self, run: SandboxSpec, spec: SandboxSpec) -> DockerSandbox:
        """The sandbox's own network and proxy first, then the sandbox on that network, pointed at the proxy."""
        assert self._egress is not None  # check() refused otherwise  # nosec B101
        session = EgressSession(self, self._egress, spec.egress, spec.identity, seccomp_json=self._proxy_seccomp_json)
        span = trace.get_current_span()
        t0 = time.perf_counter()
        try:
            attachment, proxy_env = await session.open()
            span.add_event("toolcell.egress.ready", {"toolcell.egress.setup_ms": (time.perf_counter() - t0) * 1000})
            run = dataclasses.replace(run, env={**run.env, **proxy_env})
            sandbox = await self._create(run, attachment)
        except BaseException:
            await asyncio.shield(asyncio.ensure_future(session.close()))
            raise
        span.set_attribute("toolcell.egress.setup_ms", round((time.perf_counter() - t0) * 1000, 1))
        sandbox._launcher, sandbox._session = spec.defer, session
        return sandbox

    async def create_attached(self, spec: SandboxSpec, attachment: NetworkAttachment) -> DockerSandbox:
        """A container on a given network at a given address (the egress proxy; ``docker_egress.EgressEngine``)."""
        return await self._create(spec, attachment)

    async def _create(self, spec: SandboxSpec, attachment: NetworkAttachment | None = None) -> DockerSandbox:
        if not spec.seccomp_json.strip():
            # An empty SecurityOpt would fall back to the engine's default profile: refuse instead.
            raise BackendError("the spec carries no seccomp profile; refusing to create the sandbox")
        container_id = await self._call(
            functools.partial(self._create_container, spec, attachment=attachment),
            image=spec.image, runtime=spec.isolation)
        return DockerSandbox(self, container_id, defer=spec.defer)

    async def create_warm(self, spec: SandboxSpec, on_exit: Callable[[], None]) -> DockerSandbox:
        """Create and start a pooled sandbox: the launcher in front of the tool, both waiting for a claim.

        ``on_exit`` is called (on the event loop) if the sandbox's output ends before it is claimed.
        Over the private channel where it works (runc, an engine that sees our filesystem), else attach.
        With ``spec.defer`` the tool is spawned at the claim, with the claim's secrets.
        """
        if spec.egress:  # its network and proxy are made per invocation: never pooled (settings refuse it)
            raise ConfigError(f"tool {spec.identity.tool!r} is granted egress: it cannot be pooled",
                              key=f"tools.{spec.identity.tool}")
        spec = stamped(spec, time.time())
        if self._channel_dir is not None and spec.isolation == "runc" and self._channel_works is not False:
            if self._channel_works is None:  # first use: clear what a killed supervisor may have left
                ChannelListener.sweep(self._channel_dir)
            try:
                sandbox = await self._create_warm_channel(spec, self._channel_dir, on_exit)
            except _ChannelDown as exc:
                if self._channel_works:
                    raise BackendError(str(exc)) from exc
                self._channel_works = False
                log.warning("pooled sandboxes use the engine's attach relay: %s", exc)
            else:
                self._channel_works = True
                return sandbox
        relay = spec.isolation in _SHORT_WRITE_RUNTIMES
        warm = dataclasses.replace(spec, command=launch_command(spec.command, defer=spec.defer, relay=relay))
        sandbox = await self._create(warm)
        sandbox._warm = sandbox._launcher = True
        sandbox._on_exit = on_exit
        try:
            await sandbox._launch()
        except BaseException:
            await asyncio.shield(asyncio.ensure_future(sandbox.remove()))
            raise
        return sandbox

    async def _create_warm_channel(self, spec: SandboxSpec, base: Path, on_exit: Callable[[], None]) -> DockerSandbox:
        listener = ChannelListener(base)
        warm = dataclasses.replace(
            spec, command=launch_command(spec.command, channel=f"{CHANNEL_DIR}/c.sock", defer=spec.defer,
                                         tool_ready=spec.ready_signal),
            mounts=(*spec.mounts, Mount(source=str(listener.directory), target=CHANNEL_DIR)))
        try:
            container_id = await self._call(functools.partial(self._create_container, warm, attach=False),
                                            image=spec.image, runtime=spec.isolation)
        except BackendError as exc:
            listener.close()
            if "bind source path does not exist" in str(exc) or "invalid mount config" in str(exc):
                raise _ChannelDown(f"the engine cannot mount {base}: {exc}") from exc
            raise
        sandbox = DockerSandbox(self, container_id, defer=spec.defer)
        sandbox._warm = sandbox._launcher = sandbox._started = True
        sandbox._on_exit = on_exit
        try:
            await self._call(functools.partial(self._api.start, container_id))
            try:
                conns = await listener.accept()
            except BackendError as exc:
                if self._channel_works is None:  # never came up on this engine: not a passing hiccup
                    raise _ChannelDown(str(exc)) from exc
                raise
        except BaseException:
            listener.close()
            await asyncio.shield(asyncio.ensure_future(sandbox.remove()))
            raise
        if spec.ready_signal and not spec.defer:  # the tool (an MCP server) says when it is initialized
            try:
                await self._tool_ready(conns["control"])
            except BaseException:
                for conn in conns.values():
                    conn.close()
                await asyncio.shield(asyncio.ensure_future(sandbox.remove()))
                raise
        sandbox._stream = ChannelStream(conns, on_end=sandbox._stream_ended)
        return sandbox

    @staticmethod
    async def _tool_ready(control: socket.socket) -> None:
        """The launcher's "r" once its tool said it is ready (or ended: the stream's end tells the pool)."""
        try:
            async with asyncio.timeout(_TOOL_READY_TIMEOUT_S):
                got = await asyncio.get_running_loop().sock_recv(control, 1)
        except TimeoutError as exc:
            raise BackendError(f"the pooled sandbox's tool was not ready within {_TOOL_READY_TIMEOUT_S:g}s") from exc
        if got != b"r":
            raise BackendError("the pooled sandbox's launcher ended before its tool was ready")

    async def list_sandboxes(self, owner: str) -> list[str]:
        """The owner's tool sandboxes (an egress proxy is part of its sandbox, not one of its own)."""
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_OWNER}={owner}"]}
        found = await self._call(functools.partial(self._api.containers, all=True, filters=filters))
        return [str(c["Id"]) for c in found if LABEL_ROLE not in (c.get("Labels") or {})]

    async def remove_orphans(self, owner: str) -> list[Removed]:
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_OWNER}={owner}"]}
        found = await self._call(functools.partial(self._api.containers, all=True, filters=filters))
        removed = await asyncio.gather(*(self._remove(str(c["Id"])) for c in found))
        networks = await self._call(functools.partial(self._api.networks, filters=filters))
        await asyncio.gather(*(self.remove_network(str(n["Id"])) for n in networks))
        return [_removed(c) for c, gone in zip(found, removed, strict=True)
                if gone and LABEL_ROLE not in (c.get("Labels") or {})]

    async def remove_expired(self, now: float) -> list[Removed]:
        """Every toolcell container and network of any owner whose lease ended before ``now``."""
        filters = {"label": [f"{LABEL_MANAGED}=true", LABEL_LEASE]}
        found = [c for c in await self._call(functools.partial(self._api.containers, all=True, filters=filters))
                 if 0 < lease_until(c.get("Labels") or {}) < now]
        removed = await asyncio.gather(*(self._remove(str(c["Id"])) for c in found))
        networks = [n for n in await self._call(functools.partial(self._api.networks, filters=filters))
                    if 0 < lease_until(n.get("Labels") or {}) < now]
        await asyncio.gather(*(self.remove_network(str(n["Id"])) for n in networks))
        return [_removed(c) for c, gone in zip(found, removed, strict=True)
                if gone and LABEL_ROLE not in (c.get("Labels") or {})]

    # -- egress networks (``docker_egress.EgressEngine``; not part of ``Backend``) ---------------------

    async def create_network(self, spec: NetworkSpec) -> str:
        """Create ``spec`` with the first of its subnets that is free; returns that subnet."""
        return await self._call(functools.partial(self._create_network_blocking, spec))

    async def ensure_network(self, name: str, labels: Mapping[str, str]) -> None:
        """Make sure the routable bridge network ``name`` exists (created with ``labels`` if missing)."""
        async with self._network_lock:  # the engine does not stop two concurrent creates of one name
            await self._call(functools.partial(self._ensure_network_blocking, name, dict(labels)))

    async def remove_network(self, name: str) -> None:
        """Remove a network; no error if it is already gone."""
        await self._call(functools.partial(self._remove_network_blocking, name))

    async def ping(self) -> None:
        await self._call(self._api.ping)

    async def has_image(self, image: str) -> bool:
        try:
            await self._call(functools.partial(self._api.inspect_image, image), image=image)
        except ImageMissing:
            return False
        return True

    async def inspect(self, sandbox_id: str) -> dict[str, Any]:
        """The engine's raw view of one sandbox (for diagnostics and tests; not part of ``Backend``)."""
        result: dict[str, Any] = await self._call(functools.partial(self._api.inspect_container, sandbox_id))
        return result

    async def info(self) -> dict[str, Any]:
        """The engine's ``docker info`` (for ``toolcell doctor``; not part of ``Backend``)."""
        result: dict[str, Any] = await self._call(self._api.info)
        return result

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sampler.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._api.close()

    def baseline_cycle(self, spec: SandboxSpec, stdin: bytes, *, network_disabled: bool = True) -> tuple[int, int]:
        """Blocking, for ``toolcell bench``: the raw docker-py cycle with the spec's exact hardening.

        create, attach, start, write stdin, read the output to EOF, wait, remove: no pipeline, no
        event loop, no threads of ours. Returns (exit code, output bytes incl. frame headers).
        ``network_disabled=False``: the older ``network_mode: none`` (the engine's network allocation
        for the "none" network), for comparison.
        """
        container_id = self._create_container(spec, network_disabled=network_disabled)
        try:
            raw = self._api.attach_socket(container_id, params=dict(_ATTACH_PARAMS))
            sock: socket.socket = getattr(raw, "_sock", raw)
            sock.settimeout(None)
            try:
                self._api.start(container_id)
                sock.sendall(stdin)
                sock.shutdown(socket.SHUT_WR)
                received = 0
                while chunk := sock.recv(RECV_BYTES):
                    received += len(chunk)
            finally:
                sock.close()
            status = self._api.wait(container_id, timeout=None)
        finally:
            self._api.remove_container(container_id, force=True, v=True)
        return int(status.get("StatusCode", -1)), received

    # -- blocking helpers, run in the executor --------------------------------------------------

    def _create_network_blocking(self, spec: NetworkSpec) -> str:
        # inhibit_ipv4: the bridge gets no address, so the host is no peer and no route to the subnet is
        # added on the host. internal: no masquerading, no route out.
        options = {"com.docker.network.bridge.inhibit_ipv4": "true"} if spec.host_isolated else {}
        for subnet in spec.subnets:
            try:
                self._api.create_network(
                    spec.name, driver="bridge", internal=spec.internal, labels=dict(spec.labels), options=options,
                    ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=subnet)]), check_duplicate=True,
                )
            except docker.errors.APIError as exc:
                if "overlap" in _explain(exc).lower():
                    continue  # another network holds this range: try the next candidate
                raise
            return subnet
        raise BackendError(f"no free subnet for network {spec.name!r} among {len(spec.subnets)} candidates")

    def _ensure_network_blocking(self, name: str, labels: dict[str, str]) -> None:
        try:
            self._api.inspect_network(name)
            return
        except docker.errors.NotFound:
            pass
        # icc off: proxies of different invocations share this network but never talk to each other.
        self._api.create_network(name, driver="bridge", labels=labels, check_duplicate=True,
                                 options={"com.docker.network.bridge.enable_icc": "false"})

    def _remove_network_blocking(self, name: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self._api.remove_network(name)

    def _create_container(self, spec: SandboxSpec, attach: bool = True, *,
                          attachment: NetworkAttachment | None = None, network_disabled: bool = True) -> str:
        """The spec in the engine's terms. Fixed, whatever the spec: read-only root, every capability
        dropped, no-new-privileges, an init, core dumps off, own IPC namespace without /dev/shm (a
        profile's shm is a scratch tmpfs), a private cgroup namespace, no log driver (output is ours only)."""
        api = self._api
        pids_limit, nproc = sandbox_pids(spec.isolation, spec.pids)
        # No egress: no interface but loopback, so nothing leaves and no host service is a peer. With
        # NetworkDisabled the runtime's default namespaces give the sandbox that private namespace and the
        # engine allocates no network for it at all; the same namespace as network_mode "none", cheaper:
        # a hardened cold cycle here (engine 20.10, 20 interleaved runs, medians, three sessions) took
        # 189/176/294 ms against 337/300/475 ms (``baseline_cycle(..., network_disabled=False)`` compares).
        disabled = attachment is None and network_disabled
        host_config = api.create_host_config(
            network_mode=attachment.network if attachment else (None if disabled else "none"),
            read_only=True,
            tmpfs=_tmpfs(spec),
            mem_limit=spec.memory_bytes,
            memswap_limit=spec.memory_bytes,  # no escape into swap
            nano_cpus=int(spec.cpus * 1e9),
            pids_limit=pids_limit,
            ulimits=[
                Ulimit(name="nofile", soft=spec.nofile, hard=spec.nofile),
                Ulimit(name="core", soft=0, hard=0),  # no core dump carries a tool's memory to the host
                # runsc: the tool's own limit, enforced by gVisor per sandbox; runc: the pids cgroup (nproc
                # would count the uid's processes host-wide).
                *([Ulimit(name="nproc", soft=nproc, hard=nproc)] if nproc else []),
            ],
            cap_drop=["ALL"],
            security_opt=["no-new-privileges", f"seccomp={spec.seccomp_json}"],
            init=True,
            ipc_mode="none",
            cgroupns="private",
            log_config=LogConfig(type="none"),
            runtime=spec.isolation,
            # ``Mounts`` (not ``Binds``): a missing source is an error instead of a new root-owned dir.
            mounts=[DockerMount(m.target, m.source, type="bind", read_only=True) for m in spec.mounts],
            auto_remove=False,
        )
        created = api.create_container(
            image=spec.image,
            command=list(spec.command),
            user=spec.user,
            environment=dict(spec.env),
            labels=identity_labels(spec.identity),
            working_dir=spec.working_dir,
            hostname=spec.hostname,
            stdin_open=attach,  # with detach=False this also sets StdinOnce and the Attach* flags
            tty=False,
            network_disabled=disabled,
            host_config=host_config,
            networking_config=_networking_config(api, attachment),
            # Otherwise docker-py copies proxy settings from ~/.docker/config.json into the tool's env.
            use_config_proxy=False,
        )
        container_id = str(created["Id"])
        try:
            for network in attachment.extra if attachment else ():
                api.connect_container_to_network(container_id, network)
        except BaseException:
            with contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException):
                api.remove_container(container_id, force=True, v=True)
            raise
        return container_id

    async def _remove(self, container_id: str) -> bool:
        """Force-remove; False when it was already gone."""
        return await self._call(functools.partial(self._remove_blocking, container_id))

    def _remove_blocking(self, container_id: str) -> bool:
        try:
            self._api.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as exc:
            if exc.status_code == 409 and "already in progress" in _explain(exc):
                return False
            raise
        return True

    # -- the seam: every engine call goes through here ------------------------------------------

    async def _call(self, fn: Callable[[], _T], *, image: str = "", runtime: str = "") -> _T:
        if self._closed:
            raise BackendError("the Docker backend is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except BackendError:
            raise
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
            raise self._translate(exc, image=image, runtime=runtime) from exc

    def _translate(self, exc: BaseException, *, image: str = "", runtime: str = "") -> BackendError:
        if isinstance(exc, docker.errors.ImageNotFound) and image:
            return ImageMissing(image)
        if isinstance(exc, docker.errors.APIError):
            message = _explain(exc)
            lowered = message.lower()
            # Engine 20.10 answers 400 "Unknown runtime specified <name>" on create.
            if "unknown runtime specified" in lowered and runtime:
                return RuntimeMissing(runtime)
            status = exc.status_code or 0
            if status >= 500 and any(hint in lowered for hint in _ENGINE_GONE_HINTS):
                return self._unavailable(message)
            return BackendError(f"Docker engine at {self._address}: {message}")
        if isinstance(exc, _UNREACHABLE):
            return self._unavailable(str(exc))
        return BackendError(f"Docker engine at {self._address}: {exc}")

    def _unavailable(self, detail: str) -> EngineUnavailable:
        return EngineUnavailable(f"Docker engine at {self._address} is unavailable: {detail}")


class DockerSandbox:
    """One container created by ``DockerBackend``. Single use: start once, then remove."""

    def __init__(self, backend: DockerBackend, container_id: str, *, defer: bool = False) -> None:
        self._backend = backend
        self._api = backend._api
        self._id = container_id
        self._probe: UsageProbe = CgroupProbe(backend._cgroups, container_id) if backend._cgroups is not None \
            else StatsProbe(functools.partial(self._api.stats, container_id, stream=False, one_shot=True))
        self._stream: SandboxStream | None = None
        self._sock: socket.socket | None = None  # set by the starting thread, so remove() can close it
        self._attach: object = None  # keeps the hijacked HTTP response (and its socket) alive
        self._started = False
        self._closing = False  # remove() was called
        self._removed = False
        self._exit: ExitInfo | None = None
        # Pooled sandboxes only: started before the claim; ``on_exit`` if they end unclaimed.
        self._warm = False
        self._on_exit: Callable[[], None] = lambda: None
        # The launcher runs in front of the tool (pooled, or deferred): a claim envelope starts the tool
        # and its trailers end the streams.
        self._launcher = False
        self._claimed = False
        self._defer = defer  # the launcher spawns the tool at the claim, with the claim's secrets
        self._sent_kill = False  # a SIGKILL exit is then ours, not the OOM killer's
        self._session: EgressSession | None = None  # its own network and proxy, closed after it
        self._hosted = False  # a session's sandbox: the session host serves several claims (``send``)
        self._egress: tuple[EgressDestination, ...] = ()

    @property
    def id(self) -> str:
        return self._id

    @property
    def alive(self) -> bool:
        """A pooled sandbox that is running and unclaimed, or a session's that is running (its output has not
        ended)."""
        stream = self._stream
        if stream is None or stream.ended or self._closing:
            return False
        return self._hosted or (self._warm and not self._claimed)

    def oom_kills(self) -> int:
        self._probe.sample()
        return max(self._probe.seen_oom_kills, self._probe.oom_kills())

    async def send(self, data: bytes) -> None:
        """A session's claim, queued on the host's input after the ones before (never an EOF)."""
        stream = self._stream
        if not self._hosted or stream is None or stream.ended:
            raise BackendError(f"sandbox {self._id[:12]} takes no claims now")
        stream.send(data, half_close=False)

    @property
    def egress(self) -> tuple[EgressDestination, ...]:
        return self._egress

    async def start(self, stdin: bytes, secrets: Secrets = NO_SECRETS) -> None:
        if secrets and not self._defer:
            # Its tool may already run (pooled) or would start without them: refuse rather than drop them.
            raise BackendError(f"sandbox {self._id[:12]} was not created to take secrets at its start")
        if self._warm:
            self._claim(stdin, secrets)
            return
        if not self._launcher:
            await self._launch(stdin)
            return
        await self._launch()
        if self._stream is not None:  # else removed while starting: nothing to claim
            self._claim(stdin, secrets)

    def _claim(self, stdin: bytes, secrets: Secrets) -> None:
        """Deliver the claim envelope (nonce + arguments [+ secrets]) to the waiting launcher."""
        if self._claimed:
            raise BackendError(f"sandbox {self._id[:12]} was already claimed")
        self._claimed = True
        stream = self._stream
        if stream is None or stream.ended:
            raise BackendError(f"pooled sandbox {self._id[:12]} ended before it was claimed")
        nonce = new_nonce()
        stream.expect_trailer(nonce, self._judge_trailer)
        if self._warm:
            # Periodic sampling from a little later: waking the sampler thread now would compete with a short
            # run (whose end is sampled anyway, when its trailer arrives).
            asyncio.get_running_loop().call_later(_WARM_SAMPLE_DELAY_S, self._sample_from_now_on)
        stream.send(envelope(nonce, stdin, secrets.env, secrets.files), half_close=False)

    def _judge_trailer(self, status: int) -> int | None:
        """The launcher's status is final only for a clean run with no OOM kill in the sandbox's cgroup."""
        self._probe.sample()  # the tool has exited; its cgroup is still there for a moment
        return None if status == 0 and self._probe.oom_kills() else status

    def _sample_from_now_on(self) -> None:
        if not self._closing and self._stream is not None and not self._stream.ended:
            self._backend._sampler.add(self._probe)

    async def _launch(self, stdin: bytes | None = None) -> None:
        if self._started:
            raise BackendError(f"sandbox {self._id[:12]} was already started")
        self._started = True
        sock = await self._backend._call(self._attach_and_start)
        if self._closing:  # removed while starting: no stream for a dead sandbox
            sock.close()
            return
        if not self._warm:  # a pooled sandbox is sampled from its claim on: idle, it costs nothing
            self._backend._sampler.add(self._probe)
        self._stream = AttachStream(sock, on_end=self._stream_ended)
        if stdin is not None:
            self._stream.send(stdin)

    def _stream_ended(self) -> None:
        if self._warm and not self._claimed:
            self._on_exit()

    async def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        if not self._started:
            raise BackendError("output() called before start()")
        if self._stream is None:  # the start failed or the sandbox was removed: there is no output
            return
        try:
            async for item in self._stream.chunks():
                yield item
        except OSError as exc:
            raise self._backend._translate(exc) from exc

    async def wait(self) -> ExitInfo:
        if self._exit is None and self._launcher and self._stream is not None:
            # The launcher's trailer ends a claimed run without waiting for the engine to process the
            # exit. Only a clean run is decided from it; anything else asks the engine (OOM flag, signal).
            status = await asyncio.shield(self._stream.trailer)
            if status == 0:
                self._exit = ExitInfo(exit_code=0, oom_killed=False)
        if self._exit is None:
            self._exit = await self._backend._call(self._wait_blocking)
        return self._exit

    async def signal(self, signum: int) -> None:
        self._sent_kill = self._sent_kill or signum == signal.SIGKILL
        await self._backend._call(functools.partial(self._signal_blocking, signum))

    async def usage(self) -> Usage:
        return self._probe.usage()

    async def remove(self) -> None:
        self._closing = True
        self._stop_streams()
        self._backend._sampler.discard(self._probe)
        self._probe.close_oom()
        try:
            if not self._removed:
                await self._backend._remove(self._id)
                self._removed = True
        finally:
            session, self._session = self._session, None
            if session is not None:  # after the sandbox: the proxy's accounting is complete now (never raises)
                self._egress = await session.close()

    def _stop_streams(self) -> None:
        if self._stream is not None:
            self._stream.close()
        elif self._sock is not None:  # still starting on a thread: end the attach there
            _shutdown(self._sock)

    # -- blocking parts ------------------------------------------------------------------------

    def _attach_and_start(self) -> socket.socket:
        # Attach before start, so not a byte of output is missed however fast the tool is.
        raw = self._api.attach_socket(self._id, params=dict(_ATTACH_PARAMS))
        self._attach = raw
        sock: socket.socket = getattr(raw, "_sock", raw)
        sock.settimeout(None)  # the HTTP client's read timeout must not end a quiet tool's stream
        self._sock = sock
        try:
            self._api.start(self._id)
        except BaseException:
            self._sock = None
            _shutdown(sock)
            sock.close()
            raise
        self._probe.watch_oom()  # its cgroup exists now: an OOM is seen when it happens
        self._probe.sample()  # first reading; a very short tool may never see the sampler
        return sock

    def _wait_blocking(self) -> ExitInfo:
        status = self._api.wait(self._id, timeout=None)
        self._backend._sampler.discard(self._probe)
        self._probe.sample()  # usually too late (the cgroup goes with the process), but free
        exit_code = int(status.get("StatusCode", -1))
        # The kernel's own count, as the sampler saw it while the container ran, or the engine's flag.
        oom = self._probe.seen_oom_kills > 0 or \
            bool(self._api.inspect_container(self._id).get("State", {}).get("OOMKilled"))
        # The engine records the kernel's OOM event separately from the exit; with many containers dying at
        # once it can land well after the exit. A SIGKILL death we did not cause, not (yet) flagged, gets
        # second looks for up to ~5 s (measured: 200 ms, then 1 s, were not always enough with 64 calls
        # at once on 2 cores); it stops at the first look that finds the flag.
        looks = _OOM_LOOKS if exit_code == 128 + 9 and not oom and not self._sent_kill else 0
        for _ in range(looks):
            time.sleep(_OOM_LOOK_S)
            oom = bool(self._api.inspect_container(self._id).get("State", {}).get("OOMKilled"))
            if oom:
                break
        return ExitInfo(exit_code=exit_code, oom_killed=oom)

    def _signal_blocking(self, signum: int) -> None:
        try:
            self._api.kill(self._id, signal=signum)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # "Container ... is not running"
                return
            raise


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _tmpfs(spec: SandboxSpec) -> dict[str, str]:
    """The spec's scratch as the engine's tmpfs options, and /dev/mqueue covered read-only."""
    tmpfs = {_MQUEUE_DIR: _MQUEUE_OPTIONS}
    for scratch in spec.scratch:
        options = _SCRATCH_OPTIONS.format(size=scratch.size_bytes, mode=scratch.mode)
        if scratch.uid is not None:
            options += f",uid={scratch.uid},gid={scratch.uid if scratch.gid is None else scratch.gid}"
        tmpfs[scratch.path] = options
    return tmpfs


def _networking_config(api: docker.APIClient, attachment: NetworkAttachment | None) -> dict[str, Any] | None:
    """A fixed address on the attachment's network (egress: the proxy's and the sandbox's)."""
    if attachment is None or not attachment.ip:
        return None
    config: dict[str, Any] = api.create_networking_config(
        {attachment.network: api.create_endpoint_config(ipv4_address=attachment.ip)})
    return config


def _explain(exc: docker.errors.APIError) -> str:
    explanation = exc.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode("utf-8", "replace")
    return str(explanation or exc)
