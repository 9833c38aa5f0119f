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
    output      a reader thread demultiplexes the attach stream (8-byte frame headers) into
                (stream, bytes) chunks; bounded, so a slow consumer blocks the socket, not memory
    wait        POST /containers/{id}/wait, then one GET /containers/{id}/json for OOMKilled
    remove      DELETE /containers/{id}?force=1&v=1

Usage (peak memory, CPU time) is sampled from the host's cgroup files while the container runs;
the cgroup disappears when the container exits, so the last sample is the best-known value.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import socket
import threading
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

from runtime.backends.base import ExitInfo, StreamName
from runtime.backends.launcher import TrailerScanner, envelope, launch_command, new_nonce
from runtime.errors import BackendError, EngineUnavailable, ImageMissing, RuntimeMissing
from runtime.model import Usage
from runtime.policy.network import NetworkSpec
from runtime.policy.plan import LABEL_MANAGED, LABEL_OWNER, ContainerPlan

__all__ = ["DEFAULT_BASE_URL", "DockerBackend", "DockerSandbox"]

DEFAULT_BASE_URL: Final = "unix:///var/run/docker.sock"
# API 1.41 (engine 20.10) is the first with a private cgroup namespace; newer engines accept it too.
DEFAULT_API_VERSION: Final = "1.41"

_T = TypeVar("_T")

_RECV_BYTES: Final = 64 * 1024
# At most this many chunks (each <= _RECV_BYTES) wait for the consumer; then the reader blocks and
# the engine, in turn, blocks the tool's writes. Bounds what one sandbox can make us hold (~1 MiB).
_QUEUE_CHUNKS: Final = 16
_FRAME_HEADER: Final = 8
# A claimed pooled sandbox joins the periodic usage sampler this long after its claim.
_WARM_SAMPLE_DELAY_S: Final = 0.02
_STREAM_IDS: Final[dict[int, StreamName]] = {1: "stdout", 2: "stderr"}
_ATTACH_PARAMS: Final = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
# Messages of 5xx answers that mean "the engine went away under us", not "the request was wrong".
_ENGINE_GONE_HINTS: Final = ("connection reset", "broken pipe", "transport is closing", "unexpected eof")
# No socket, connection refused or reset, engine restarted mid-call, read timeout.
_UNREACHABLE: Final = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    ConnectionError,
    FileNotFoundError,
)


class _Eof:
    """End of the output stream (queued by the reader thread)."""


_EOF: Final = _Eof()
_QueueItem = tuple[StreamName, bytes] | _Eof | BaseException


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
    ) -> None:
        self._address = base_url or DEFAULT_BASE_URL
        try:
            self._api = docker.APIClient(
                base_url=self._address, version=api_version, timeout=timeout_s, max_pool_size=max_workers
            )
        except docker.errors.DockerException as exc:
            raise BackendError(f"invalid Docker engine address {self._address!r}: {exc}") from exc
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="toolcell-docker")
        self._sampler = _UsageSampler(sample_interval_s)
        self._cgroups = _CgroupLayout(Path(cgroup_root))
        self._closed = False
        self._network_lock = asyncio.Lock()

    @property
    def address(self) -> str:
        return self._address

    async def create(self, plan: ContainerPlan) -> DockerSandbox:
        if not plan.seccomp_json.strip():
            # An empty SecurityOpt would fall back to the engine's default profile: refuse instead.
            raise BackendError("the plan carries no seccomp profile; refusing to create the sandbox")
        container_id = await self._call(
            functools.partial(self._create_container, plan), image=plan.image, runtime=plan.runtime
        )
        return DockerSandbox(self, container_id)

    async def create_warm(self, plan: ContainerPlan, on_exit: Callable[[], None]) -> DockerSandbox:
        """Create and start a pooled sandbox: the launcher in front of the tool, both waiting for a claim.

        ``on_exit`` is called (on the event loop) if the sandbox's output ends before it is claimed.
        """
        warm_plan = dataclasses.replace(plan, command=launch_command(plan.command))
        sandbox = await self.create(warm_plan)
        sandbox._warm = True
        sandbox._on_exit = on_exit
        try:
            await sandbox._launch()
        except BaseException:
            await asyncio.shield(asyncio.ensure_future(sandbox.remove()))
            raise
        return sandbox

    async def list_sandboxes(self, owner: str) -> list[str]:
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_OWNER}={owner}"]}
        found = await self._call(functools.partial(self._api.containers, all=True, filters=filters))
        return [str(c["Id"]) for c in found]

    async def remove_orphans(self, owner: str) -> int:
        ids = await self.list_sandboxes(owner)
        removed = await asyncio.gather(*(self._remove(cid) for cid in ids))
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_OWNER}={owner}"]}
        networks = await self._call(functools.partial(self._api.networks, filters=filters))
        await asyncio.gather(*(self.remove_network(str(n["Id"])) for n in networks))
        return sum(removed)

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
                while chunk := sock.recv(_RECV_BYTES):
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

    def _create_container(self, plan: ContainerPlan) -> str:
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
            stdin_open=True,  # with detach=False this also sets StdinOnce and the Attach* flags
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
        self._probe = _CgroupProbe(backend._cgroups, container_id)
        self._queue: asyncio.Queue[_QueueItem] | None = None
        self._credits = threading.Semaphore(_QUEUE_CHUNKS)
        self._closing = threading.Event()
        self._sock: socket.socket | None = None
        self._attach: object = None  # keeps the hijacked HTTP response (and its socket) alive
        self._started = False
        self._reading = False  # the reader thread owns (and closes) the socket once it runs
        self._removed = False
        self._exit: ExitInfo | None = None
        # Warm (pooled) sandboxes only: started before the claim; the launcher's trailers end the streams.
        self._warm = False
        self._on_exit: Callable[[], None] = lambda: None
        self._claimed = False
        self._ended = threading.Event()
        self._scanners: dict[StreamName, TrailerScanner] | None = None
        # The launcher's exit status, or None: the engine decides (no trailer, or an OOM kill was seen).
        self._trailer: concurrent.futures.Future[int | None] = concurrent.futures.Future()
        self._writer: threading.Thread | None = None

    @property
    def id(self) -> str:
        return self._id

    @property
    def alive(self) -> bool:
        """A pooled sandbox that is running and unclaimed (its output has not ended)."""
        return self._warm and self._started and not self._claimed and not self._ended.is_set() and not self._removed

    async def start(self, stdin: bytes) -> None:
        if self._warm:
            await self._claim(stdin)
            return
        await self._launch(stdin)

    async def _claim(self, stdin: bytes) -> None:
        """Deliver the claim envelope (nonce + arguments) to the waiting launcher."""
        if self._claimed:
            raise BackendError(f"sandbox {self._id[:12]} was already claimed")
        self._claimed = True
        if self._sock is None or self._ended.is_set():
            raise BackendError(f"pooled sandbox {self._id[:12]} ended before it was claimed")
        nonce = new_nonce()
        # Installed before the envelope is sent, so the reader thread sees them before any trailer.
        self._scanners = {"stdout": TrailerScanner(nonce), "stderr": TrailerScanner(nonce)}
        # Periodic sampling from a little later: waking the sampler thread now would compete with a short
        # run (whose end is sampled anyway, when its trailer arrives).
        asyncio.get_running_loop().call_later(_WARM_SAMPLE_DELAY_S, self._sample_from_now_on)
        data = envelope(nonce, stdin)
        # The launcher is blocked reading, so a small envelope fits the socket buffer: send it without
        # blocking (MSG_DONTWAIT, the socket stays blocking for the reader); the rest goes on a thread.
        with contextlib.suppress(BlockingIOError, InterruptedError):
            data = data[self._sock.send(data, socket.MSG_DONTWAIT):]
        if not data:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)
            return
        self._writer = threading.Thread(target=_write_stdin, args=(self._sock, data),
                                        name=f"toolcell-in-{self._id[:12]}", daemon=True)
        self._writer.start()

    def _sample_from_now_on(self) -> None:
        if not self._removed and not self._closing.is_set() and not self._ended.is_set():
            self._backend._sampler.add(self._probe)

    async def _launch(self, stdin: bytes | None = None) -> None:
        if self._started:
            raise BackendError(f"sandbox {self._id[:12]} was already started")
        self._started = True
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_QueueItem] = asyncio.Queue()
        self._queue = queue
        try:
            sock = await self._backend._call(self._attach_and_start)
        except BaseException:
            queue.put_nowait(_EOF)  # an output() consumer must not wait for a stream that never opens
            raise
        if not self._warm:  # a pooled sandbox is sampled from its claim on: idle, it costs nothing
            self._backend._sampler.add(self._probe)
        if self._closing.is_set():  # removed while starting: no stream threads for a dead sandbox
            sock.close()
            return
        self._reading = True
        if stdin is not None:
            self._writer = threading.Thread(
                target=_write_stdin, args=(sock, stdin), name=f"toolcell-in-{self._id[:12]}", daemon=True
            )
            self._writer.start()
        threading.Thread(
            target=self._read_loop,
            args=(sock, loop, queue),
            name=f"toolcell-out-{self._id[:12]}",
            daemon=True,
        ).start()

    async def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        queue = self._queue
        if queue is None:
            raise BackendError("output() called before start()")
        while True:
            item = await queue.get()
            if isinstance(item, _Eof):
                return
            if isinstance(item, BaseException):
                raise self._backend._translate(item) from item
            self._credits.release()
            yield item

    async def wait(self) -> ExitInfo:
        if self._exit is None and self._warm:
            # The launcher's trailer ends a pooled run without waiting for the engine to process the
            # exit. Only a clean run is decided from it; anything else asks the engine (OOM flag, signal).
            status = await asyncio.wrap_future(self._trailer)
            if status == 0:
                self._exit = ExitInfo(exit_code=0, oom_killed=False)
        if self._exit is None:
            self._exit = await self._backend._call(self._wait_blocking)
        return self._exit

    async def signal(self, signum: int) -> None:
        await self._backend._call(functools.partial(self._signal_blocking, signum))

    async def usage(self) -> Usage:
        return self._probe.usage()

    async def remove(self) -> None:
        self._stop_streams()
        self._backend._sampler.discard(self._probe)
        if self._removed:
            return
        await self._backend._remove(self._id)
        self._removed = True

    # -- blocking parts ------------------------------------------------------------------------

    def _attach_and_start(self) -> socket.socket:
        # Attach before start, so not a byte of output is missed however fast the tool is.
        raw = self._api.attach_socket(self._id, params=dict(_ATTACH_PARAMS))
        self._attach = raw
        sock: socket.socket = getattr(raw, "_sock", raw)
        sock.settimeout(None)  # the HTTP client's read timeout must not end a quiet tool's stream
        self._sock = sock  # so remove() can close it even if start() is cancelled from here on
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
        # once it can land after the exit. A SIGKILL death not (yet) flagged gets two short second looks.
        for _ in range(2 if exit_code == 128 + 9 and not oom else 0):
            time.sleep(0.1)
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

    def _read_loop(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[_QueueItem],
    ) -> None:
        """Demultiplex the attach stream: [stream, 0, 0, 0, size (4 bytes, big-endian)] + payload."""
        end: _QueueItem = _EOF
        header = bytearray()
        remaining = 0
        stream: StreamName | None = None
        try:
            while True:
                data = sock.recv(_RECV_BYTES)
                if not data:
                    break
                pos, size = 0, len(data)
                batch: list[bytes] = []
                batch_stream: StreamName | None = None
                while pos < size:
                    if remaining == 0:
                        take = min(_FRAME_HEADER - len(header), size - pos)
                        header += data[pos : pos + take]
                        pos += take
                        if len(header) == _FRAME_HEADER:
                            stream = _STREAM_IDS.get(header[0])
                            remaining = int.from_bytes(header[4:8], "big")
                            header.clear()
                        continue
                    take = min(remaining, size - pos)
                    if stream is not None:
                        if batch and stream != batch_stream:
                            if not self._deliver(loop, queue, batch_stream or stream, b"".join(batch)):
                                return
                            batch = []
                        batch_stream = stream
                        batch.append(data[pos : pos + take])
                    pos += take
                    remaining -= take
                if batch and batch_stream is not None and not self._deliver(loop, queue, batch_stream,
                                                                            b"".join(batch)):
                    return
        except OSError as exc:
            if not self._closing.is_set():
                end = exc
        finally:
            self._end_of_output(loop, queue, end)
            if self._writer is not None:
                self._writer.join()
            sock.close()

    def _deliver(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[_QueueItem], stream: StreamName,
                 data: bytes) -> bool:
        """Pass one stream's bytes on (through the trailer scanner of a claimed pooled sandbox).

        False stops the reader: the consumer is gone, or both trailers of a pooled run have arrived.
        """
        scanners = self._scanners
        if scanners is None:
            return self._emit(loop, queue, (stream, data))
        data = scanners[stream].feed(data)
        if data and not self._emit(loop, queue, (stream, data)):
            return False
        if scanners["stdout"].done and scanners["stderr"].done:
            self._probe.sample()  # the tool has exited; its cgroup is still there for a moment
            status = scanners["stdout"].status
            # A clean status is final only if nothing in the sandbox was OOM-killed; else ask the engine.
            self._trailer.set_result(None if status == 0 and self._probe.oom_kills() else status)
            return False
        return True

    def _end_of_output(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[_QueueItem],
                       end: _QueueItem) -> None:
        """Both streams are over (EOF, error or trailers): flush held bytes, close the queue, notify."""
        scanners = self._scanners
        if scanners is not None and not self._trailer.done():
            for name, scanner in scanners.items():
                held = scanner.flush()
                if held and not self._closing.is_set():
                    self._emit(loop, queue, (name, held))
        if not self._trailer.done():
            self._trailer.set_result(None)
        unclaimed = self._warm and not self._claimed
        self._ended.set()
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            loop.call_soon_threadsafe(queue.put_nowait, end)
            if unclaimed:
                loop.call_soon_threadsafe(self._on_exit)

    def _emit(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[_QueueItem], item: _QueueItem) -> bool:
        """Hand one chunk to the loop, blocking while the consumer is ``_QUEUE_CHUNKS`` behind."""
        self._credits.acquire()
        if self._closing.is_set():
            return False
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            return False
        return True

    def _stop_streams(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._credits.release(_QUEUE_CHUNKS + 1)  # unblock a reader waiting for the consumer
        if self._sock is not None:
            _shutdown(self._sock)  # the reader thread sees EOF and closes the socket itself
            if not self._reading:
                self._sock.close()


class _CgroupLayout:
    """Where a container's cgroup files live on this host (cgroup v1 or v2, cgroupfs or systemd)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.v2 = (root / "cgroup.controllers").exists()

    def memory_candidates(self, cid: str) -> list[tuple[Path, bool]]:
        """(file, is_peak): a peak file, or a current-usage file whose maximum we track."""
        if self.v2:
            dirs = self._v2_dirs(cid)
            return [(d / "memory.peak", True) for d in dirs] + [(d / "memory.current", False) for d in dirs]
        return [(d / "memory.max_usage_in_bytes", True) for d in self._v1_dirs("memory", cid)]

    def oom_candidates(self, cid: str) -> list[Path]:
        if self.v2:
            return [d / "memory.events" for d in self._v2_dirs(cid)]
        return [d / "memory.oom_control" for d in self._v1_dirs("memory", cid)]

    def cpu_candidates(self, cid: str) -> list[Path]:
        if self.v2:
            return [d / "cpu.stat" for d in self._v2_dirs(cid)]
        return [d / "cpuacct.usage" for d in self._v1_dirs("cpuacct", cid)]

    def _v2_dirs(self, cid: str) -> list[Path]:
        return [self.root / "system.slice" / f"docker-{cid}.scope", self.root / "docker" / cid]

    def _v1_dirs(self, controller: str, cid: str) -> list[Path]:
        base = self.root / controller
        return [base / "docker" / cid, base / "system.slice" / f"docker-{cid}.scope"]


class _CgroupProbe:
    """Peak memory and CPU time of one container, from the host's cgroup files."""

    def __init__(self, layout: _CgroupLayout, cid: str) -> None:
        self._layout = layout
        self._cid = cid
        self._lock = threading.Lock()
        self._memory: tuple[Path, bool] | None = None
        self._cpu: Path | None = None
        self._peak_memory = 0
        self._cpu_ns = 0

    def sample(self) -> None:
        memory = self._read_memory()
        cpu = self._read_cpu()
        with self._lock:
            self._peak_memory = max(self._peak_memory, memory)
            self._cpu_ns = max(self._cpu_ns, cpu)

    def oom_kills(self) -> int:
        """OOM kills in the sandbox's memory cgroup so far (0 when the cgroup is gone or can't tell)."""
        for path in self._layout.oom_candidates(self._cid):
            value = _read_key(path, "oom_kill")
            if value is not None:
                return value
        return 0

    def usage(self) -> Usage:
        with self._lock:
            return Usage(peak_memory_bytes=self._peak_memory, cpu_time_ns=self._cpu_ns)

    def _read_memory(self) -> int:
        candidates = [self._memory] if self._memory else self._layout.memory_candidates(self._cid)
        for path, is_peak in candidates:
            value = _read_int(path)
            if value is not None:
                self._memory = (path, is_peak)
                return value
        return 0

    def _read_cpu(self) -> int:
        candidates = [self._cpu] if self._cpu else self._layout.cpu_candidates(self._cid)
        for path in candidates:
            if path.name == "cpu.stat":
                value = _read_usage_usec(path)
                value = None if value is None else value * 1000
            else:
                value = _read_int(path)
            if value is not None:
                self._cpu = path
                return value
        return 0


class _UsageSampler:
    """One background thread sampling every live container's cgroup every ``interval_s``."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._probes: set[_CgroupProbe] = set()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def add(self, probe: _CgroupProbe) -> None:
        with self._cond:
            if self._stopped:
                return
            self._probes.add(probe)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="toolcell-usage", daemon=True)
                self._thread.start()
            self._cond.notify()

    def discard(self, probe: _CgroupProbe) -> None:
        with self._cond:
            self._probes.discard(probe)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._probes.clear()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._probes and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                probes = list(self._probes)
            for probe in probes:
                probe.sample()
            with self._cond:
                if self._stopped:
                    return
                self._cond.wait(self._interval_s)


def _write_stdin(sock: socket.socket, data: bytes) -> None:
    """Write the tool's stdin and half-close, so it sees EOF. A tool may exit without reading."""
    with contextlib.suppress(OSError):
        if data:
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_key(path: Path, key: str) -> int | None:
    """``key``'s value in a flat-keyed cgroup file (``name value`` per line)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def _read_usage_usec(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


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
