"""Docker engine backend: the only module in toolcell that imports ``docker``.

One ``ContainerPlan`` becomes one container, translated 1:1 (nothing is added that weakens the plan).
The docker SDK is synchronous, so every engine call runs in this backend's own small thread pool,
never on the event loop; one low-level ``APIClient`` (pinned API version, so constructing it does no
I/O) serves every call. Engine exceptions are translated here, at the seam, into ``runtime.errors``.

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
A pooled sandbox (``create_warm``) runs the launcher (``launcher.py``) and is claimed by ``start``.
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

from runtime.backends.attach import RECV_BYTES, AttachStream, SandboxStream
from runtime.backends.base import ExitInfo, Removed, StreamName
from runtime.backends.cgroup import CgroupLayout, CgroupProbe, UsageSampler
from runtime.backends.channel import CHANNEL_DIR, ChannelListener, ChannelStream
from runtime.backends.launcher import envelope, launch_command, new_nonce, relay_command
from runtime.errors import BackendError, EngineUnavailable, ImageMissing, RuntimeMissing
from runtime.model import Usage
from runtime.policy.network import LABEL_ROLE, NetworkSpec
from runtime.policy.plan import LABEL_INVOCATION, LABEL_MANAGED, LABEL_OWNER, LABEL_TOOL, ContainerPlan
from runtime.policy.profile import Mount

__all__ = ["DEFAULT_BASE_URL", "DockerBackend", "DockerSandbox"]

DEFAULT_BASE_URL: Final = "unix:///var/run/docker.sock"
# API 1.41 (engine 20.10) is the first with a private cgroup namespace; newer engines accept it too.
DEFAULT_API_VERSION: Final = "1.41"

_T = TypeVar("_T")
log = logging.getLogger("toolcell.docker")

# Second looks at the OOM flag of a SIGKILL exit (see _wait_blocking).
_OOM_LOOKS: Final = 50
_OOM_LOOK_S: Final = 0.1
# A claimed pooled sandbox joins the periodic usage sampler this long after its claim.
_WARM_SAMPLE_DELAY_S: Final = 0.02
_ATTACH_PARAMS: Final = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
# OCI runtimes whose container stdio (gVisor: host pipes donated to the Sentry) answers one large write(2)
# with a short count, which many tools take as complete: their tools write into pipes inside the sandbox
# that the launcher copies out whole (``runtime/data/launcher.py`` --relay).
_SHORT_WRITE_RUNTIMES: Final = frozenset({"runsc"})
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
    serving = LABEL_ROLE not in labels and not invocation.startswith("pool-")  # a pooled sandbox's claim is unknown
    return Removed(sandbox_id=str(summary["Id"]), invocation_id=invocation if serving else "",
                   tool=str(labels.get(LABEL_TOOL, "")) if serving else "")


class DockerBackend:
    """Runs sandboxes on a Docker engine (``base_url`` e.g. ``unix:///var/run/docker.sock``).

    ``max_workers`` bounds concurrent engine calls; a blocked ``wait()`` holds one worker for the
    lifetime of its container, so size it above the supervisor's concurrency cap.
    """

    name = "docker"

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_version: str = DEFAULT_API_VERSION,
        timeout_s: float = 60.0,
        max_workers: int = 64,
        sample_interval_s: float = 0.05,
        cgroup_root: str = "/sys/fs/cgroup",
        channel_dir: str | None = None,
    ) -> None:
        self._address = base_url or DEFAULT_BASE_URL
        # Pooled sandboxes talk over a private channel under this directory (``channel.py``) when the
        # engine can mount it; None: always through the engine's attach relay.
        self._channel_dir = Path(channel_dir) if channel_dir else None
        self._channel_works: bool | None = None  # unknown until the first pooled sandbox
        try:
            self._api = docker.APIClient(
                base_url=self._address, version=api_version, timeout=timeout_s, max_pool_size=max_workers
            )
        except docker.errors.DockerException as exc:
            raise BackendError(f"invalid Docker engine address {self._address!r}: {exc}") from exc
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="toolcell-docker")
        self._sampler = UsageSampler(sample_interval_s)
        self._cgroups = CgroupLayout(Path(cgroup_root))
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

    async def create(self, plan: ContainerPlan) -> DockerSandbox:
        if plan.runtime in _SHORT_WRITE_RUNTIMES:  # the launcher takes the tool's output whole (launcher.py)
            plan = dataclasses.replace(plan, command=relay_command(plan.command))
        return await self._create(plan)

    async def _create(self, plan: ContainerPlan) -> DockerSandbox:
        if not plan.seccomp_json.strip():
            # An empty SecurityOpt would fall back to the engine's default profile: refuse instead.
            raise BackendError("the plan carries no seccomp profile; refusing to create the sandbox")
        container_id = await self._call(
            functools.partial(self._create_container, plan), image=plan.image, runtime=plan.runtime
        )
        return DockerSandbox(self, container_id)

    async def create_warm(self, plan: ContainerPlan, on_exit: Callable[[], None], *,
                          defer: bool = False) -> DockerSandbox:
        """Create and start a pooled sandbox: the launcher in front of the tool, both waiting for a claim.

        ``on_exit`` is called (on the event loop) if the sandbox's output ends before it is claimed.
        Over the private channel where it works (runc, an engine that sees our filesystem), else attach.
        """
        if self._channel_dir is not None and plan.runtime == "runc" and self._channel_works is not False:
            if self._channel_works is None:  # first use: clear what a killed supervisor may have left
                ChannelListener.sweep(self._channel_dir)
            try:
                sandbox = await self._create_warm_channel(plan, self._channel_dir, on_exit, defer)
            except _ChannelDown as exc:
                if self._channel_works:
                    raise BackendError(str(exc)) from exc
                self._channel_works = False
                log.warning("pooled sandboxes use the engine's attach relay: %s", exc)
            else:
                self._channel_works = True
                return sandbox
        relay = plan.runtime in _SHORT_WRITE_RUNTIMES
        warm_plan = dataclasses.replace(plan, command=launch_command(plan.command, defer=defer, relay=relay))
        sandbox = await self._create(warm_plan)
        sandbox._warm, sandbox._defer = True, defer
        sandbox._on_exit = on_exit
        try:
            await sandbox._launch()
        except BaseException:
            await asyncio.shield(asyncio.ensure_future(sandbox.remove()))
            raise
        return sandbox

    async def _create_warm_channel(self, plan: ContainerPlan, base: Path, on_exit: Callable[[], None],
                                   defer: bool) -> DockerSandbox:
        listener = ChannelListener(base)
        warm_plan = dataclasses.replace(
            plan, command=launch_command(plan.command, channel=f"{CHANNEL_DIR}/c.sock", defer=defer),
            mounts=(*plan.mounts, Mount(source=str(listener.directory), target=CHANNEL_DIR)))
        try:
            container_id = await self._call(functools.partial(self._create_container, warm_plan, attach=False),
                                            image=plan.image, runtime=plan.runtime)
        except BackendError as exc:
            listener.close()
            if "bind source path does not exist" in str(exc) or "invalid mount config" in str(exc):
                raise _ChannelDown(f"the engine cannot mount {base}: {exc}") from exc
            raise
        sandbox = DockerSandbox(self, container_id)
        sandbox._warm, sandbox._on_exit, sandbox._started, sandbox._defer = True, on_exit, True, defer
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
        sandbox._stream = ChannelStream(conns, on_end=sandbox._stream_ended)
        return sandbox

    async def list_sandboxes(self, owner: str) -> list[str]:
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_OWNER}={owner}"]}
        found = await self._call(functools.partial(self._api.containers, all=True, filters=filters))
        return [str(c["Id"]) for c in found]

    async def remove_orphans(self, owner: str) -> list[Removed]:
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_OWNER}={owner}"]}
        found = await self._call(functools.partial(self._api.containers, all=True, filters=filters))
        removed = await asyncio.gather(*(self._remove(str(c["Id"])) for c in found))
        networks = await self._call(functools.partial(self._api.networks, filters=filters))
        await asyncio.gather(*(self.remove_network(str(n["Id"])) for n in networks))
        return [_removed(c) for c, gone in zip(found, removed, strict=True) if gone]

    async def create_network(self, spec: NetworkSpec) -> str:
        return await self._call(functools.partial(self._create_network_blocking, spec))

    async def ensure_network(self, name: str, labels: Mapping[str, str]) -> None:
        async with self._network_lock:  # the engine does not stop two concurrent creates of one name
            await self._call(functools.partial(self._ensure_network_blocking, name, dict(labels)))

    async def remove_network(self, name: str) -> None:
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

    def baseline_cycle(self, plan: ContainerPlan, stdin: bytes) -> tuple[int, int]:
        """Blocking, for ``toolcell bench``: the raw docker-py cycle with the plan's exact hardening.

        create, attach, start, write stdin, read the output to EOF, wait, remove: no pipeline, no
        event loop, no threads of ours. Returns (exit code, output bytes incl. frame headers).
        """
        container_id = self._create_container(plan)
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

    def _create_container(self, plan: ContainerPlan, attach: bool = True) -> str:
        api = self._api
        security_opt = [f"seccomp={plan.seccomp_json}"]
        if plan.no_new_privileges:
            security_opt.insert(0, "no-new-privileges")
        host_config = api.create_host_config(
            network_mode=plan.network_mode,
            read_only=plan.read_only_rootfs,
            tmpfs=dict(plan.tmpfs),
            mem_limit=plan.memory_bytes,
            memswap_limit=plan.memory_bytes,
            nano_cpus=plan.nano_cpus,
            pids_limit=plan.pids_limit,
            ulimits=[
                Ulimit(name="nofile", soft=plan.nofile, hard=plan.nofile),
                Ulimit(name="core", soft=0, hard=0),
                *([Ulimit(name="nproc", soft=plan.nproc, hard=plan.nproc)] if plan.nproc else []),
            ],
            cap_drop=list(plan.cap_drop),
            security_opt=security_opt,
            init=plan.init,
            ipc_mode=plan.ipc_mode,
            cgroupns=plan.cgroupns_mode,
            log_config=LogConfig(type=plan.log_driver),
            runtime=plan.runtime,
            # ``Mounts`` (not ``Binds``): a missing source is an error instead of a new root-owned dir.
            mounts=[DockerMount(m.target, m.source, type="bind", read_only=True) for m in plan.mounts],
            auto_remove=False,
        )
        created = api.create_container(
            image=plan.image,
            command=list(plan.command),
            user=plan.user,
            environment=dict(plan.env),
            labels=dict(plan.labels),
            working_dir=plan.working_dir,
            hostname=plan.hostname,
            stdin_open=attach,  # with detach=False this also sets StdinOnce and the Attach* flags
            tty=False,
            host_config=host_config,
            networking_config=_networking_config(api, plan),
            # Otherwise docker-py copies proxy settings from ~/.docker/config.json into the tool's env.
            use_config_proxy=False,
        )
        container_id = str(created["Id"])
        try:
            for network in plan.extra_networks:
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

    def __init__(self, backend: DockerBackend, container_id: str) -> None:
        self._backend = backend
        self._api = backend._api
        self._id = container_id
        self._probe = CgroupProbe(backend._cgroups, container_id)
        self._stream: SandboxStream | None = None
        self._sock: socket.socket | None = None  # set by the starting thread, so remove() can close it
        self._attach: object = None  # keeps the hijacked HTTP response (and its socket) alive
        self._started = False
        self._closing = False  # remove() was called
        self._removed = False
        self._exit: ExitInfo | None = None
        # Warm (pooled) sandboxes only: started before the claim; the launcher's trailers end the streams.
        self._warm = False
        self._on_exit: Callable[[], None] = lambda: None
        self._claimed = False
        self._defer = False  # the launcher spawns the tool at the claim, with the claim's environment
        self._sent_kill = False  # a SIGKILL exit is then ours, not the OOM killer's

    @property
    def id(self) -> str:
        return self._id

    @property
    def alive(self) -> bool:
        """A pooled sandbox that is running and unclaimed (its output has not ended)."""
        stream = self._stream
        return self._warm and stream is not None and not stream.ended and not self._claimed and not self._closing

    async def start(self, stdin: bytes) -> None:
        if self._warm:
            self._claim(stdin, {}, {})
            return
        await self._launch(stdin)

    async def claim(self, stdin: bytes, env: Mapping[str, str], files: Mapping[str, str]) -> None:
        if not (self._warm and self._defer):
            raise BackendError(f"sandbox {self._id[:12]} cannot take secrets at its claim")
        self._claim(stdin, env, files)

    def _claim(self, stdin: bytes, env: Mapping[str, str], files: Mapping[str, str]) -> None:
        """Deliver the claim envelope (nonce + arguments [+ env]) to the waiting launcher."""
        if self._claimed:
            raise BackendError(f"sandbox {self._id[:12]} was already claimed")
        self._claimed = True
        stream = self._stream
        if stream is None or stream.ended:
            raise BackendError(f"pooled sandbox {self._id[:12]} ended before it was claimed")
        nonce = new_nonce()
        stream.expect_trailer(nonce, self._judge_trailer)
        # Periodic sampling from a little later: waking the sampler thread now would compete with a short
        # run (whose end is sampled anyway, when its trailer arrives).
        asyncio.get_running_loop().call_later(_WARM_SAMPLE_DELAY_S, self._sample_from_now_on)
        stream.send(envelope(nonce, stdin, env, files), half_close=False)

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
        if self._exit is None and self._warm and self._stream is not None:
            # The launcher's trailer ends a pooled run without waiting for the engine to process the
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
        if self._removed:
            return
        await self._backend._remove(self._id)
        self._removed = True

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
        self._probe.sample()  # first reading; a very short tool may never see the sampler
        return sock

    def _wait_blocking(self) -> ExitInfo:
        status = self._api.wait(self._id, timeout=None)
        self._backend._sampler.discard(self._probe)
        self._probe.sample()  # usually too late (the cgroup goes with the process), but free
        exit_code = int(status.get("StatusCode", -1))
        oom = bool(self._api.inspect_container(self._id).get("State", {}).get("OOMKilled"))
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


def _networking_config(api: docker.APIClient, plan: ContainerPlan) -> dict[str, Any] | None:
    """A fixed address on the plan's network (egress: the proxy's and the sandbox's), else the engine's pick."""
    if not plan.network_ip:
        return None
    config: dict[str, Any] = api.create_networking_config(
        {plan.network_mode: api.create_endpoint_config(ipv4_address=plan.network_ip)})
    return config


def _explain(exc: docker.errors.APIError) -> str:
    explanation = exc.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode("utf-8", "replace")
    return str(explanation or exc)
