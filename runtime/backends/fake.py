"""An in-process backend for tests: sandboxes whose "process" is a Python coroutine.

A behaviour is keyed by the spec's image and plays the tool::

    async def echo(proc: FakeProcess) -> int:
        await proc.stdout(proc.stdin)
        return 0

    backend = FakeBackend(behaviours={"img": echo})

It models the engine's semantics that the pipeline relies on: ``create`` with an unknown image raises
``ImageMissing`` (unknown runtime: ``RuntimeMissing``; ``available=False``: ``EngineUnavailable``);
output is bounded (a writer blocks while the consumer is behind, like a pipe); a signal ends a running
behaviour with exit code 128+signum unless the behaviour ignores it (SIGKILL can't be ignored);
``proc.oom()`` ends it as the kernel's OOM killer would (137, ``oom_killed``); ``remove`` is idempotent
and kills what still runs. Everything is recorded (``created``, ``removed``, ``signals``) so tests can
assert cleanup. Egress is modelled as a capability: a behaviour of a spec with grants records what it
reached (``proc.reach``), which the sandbox reports as ``egress``; ``egress=False`` refuses such specs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import signal as signals
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from toolcell.backends.base import ExitInfo, Removed, StreamName
from toolcell.errors import BackendError, ConfigError, EngineUnavailable, ImageMissing, RuntimeMissing
from toolcell.model import EgressDestination, Usage
from toolcell.policy.spec import NO_SECRETS, SandboxSpec, Secrets, stamped

__all__ = ["Behaviour", "FakeBackend", "FakeProcess", "FakeSandbox"]

# Chunks a behaviour may have written ahead of the consumer before ``stdout()``/``stderr()`` block.
_QUEUE_CHUNKS: Final = 16
_OOM_EXIT: Final = 128 + signals.SIGKILL


class _Eof:
    pass


_EOF: Final = _Eof()


class _Killed(BaseException):
    """Raised inside a behaviour's task to end it like a fatal signal (BaseException: not swallowed)."""

    def __init__(self, exit_code: int, oom: bool = False) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code
        self.oom = oom


@dataclass
class FakeProcess:
    """What a behaviour sees: its stdin, its spec, and ways to write, ignore signals or get OOM-killed."""

    stdin: bytes
    spec: SandboxSpec
    _write: Callable[[StreamName, bytes], Awaitable[None]] = field(repr=False)
    ignored_signals: set[int] = field(default_factory=set)
    usage: Usage = field(default_factory=Usage)
    # Secret files the start delivered (path -> content), and the destinations reached through egress.
    files: Mapping[str, str] = field(default_factory=dict)
    reached: list[EgressDestination] = field(default_factory=list)

    async def stdout(self, data: bytes) -> None:
        """Write to stdout; blocks while the consumer is behind (like a full pipe)."""
        await self._write("stdout", data)

    async def stderr(self, data: bytes) -> None:
        await self._write("stderr", data)

    def ignore(self, *signums: int) -> None:
        """Ignore these signals from now on (SIGKILL can't be ignored, as with a real process)."""
        self.ignored_signals.update(s for s in signums if s != signals.SIGKILL)

    def set_usage(self, peak_memory_bytes: int = 0, cpu_time_ns: int = 0) -> None:
        self.usage = Usage(peak_memory_bytes=peak_memory_bytes, cpu_time_ns=cpu_time_ns)

    def reach(self, host: str, port: int = 443, *, allowed: bool = True, reason: str = "") -> None:
        """Record a destination asked for through the sandbox's egress proxy (granted specs only)."""
        if not self.spec.egress:
            raise OSError(101, "Network is unreachable")
        self.reached.append(EgressDestination(host=host, port=port, allowed=allowed, reason=reason))

    def oom(self) -> None:
        """End the process as the OOM killer would: exit 137 with ``oom_killed``."""
        raise _Killed(_OOM_EXIT, oom=True)


Behaviour = Callable[[FakeProcess], Awaitable[int]]


class FakeSandbox:
    def __init__(
        self, backend: FakeBackend, sandbox_id: str, spec: SandboxSpec, behaviour: Behaviour
    ) -> None:
        self._backend = backend
        self._id = sandbox_id
        self.spec = spec
        self._behaviour = behaviour
        self._queue: asyncio.Queue[tuple[StreamName, bytes] | _Eof] = asyncio.Queue()
        self._credits = asyncio.Semaphore(_QUEUE_CHUNKS)
        self._proc: FakeProcess | None = None
        self._task: asyncio.Task[int] | None = None
        self._exit: ExitInfo | None = None
        self._done = asyncio.Event()
        self.removed = False
        # Pooled: "started" at creation, waiting for its claim; ``died()`` ends it before the claim.
        self.warm = False
        self.claimed_files: dict[str, str] = {}
        self.claimed = False
        self._on_exit: Callable[[], None] = lambda: None
        self._dead = False

    @property
    def id(self) -> str:
        return self._id

    @property
    def alive(self) -> bool:
        return self.warm and not self.claimed and not self._dead and not self.removed

    def died(self) -> None:
        """Simulate a pooled sandbox's process ending (or the engine restarting) before its claim."""
        if self.alive:
            self._dead = True
            asyncio.get_running_loop().call_soon(self._on_exit)

    @property
    def running(self) -> bool:
        return self._task is not None and self._exit is None

    async def start(self, stdin: bytes, secrets: Secrets = NO_SECRETS) -> None:
        """Start (claim, pooled); with ``secrets`` (a deferred spec only) the behaviour sees their ``env``
        added to its spec's environment and their ``files`` as ``proc.files``."""
        self._backend._check_available()
        if self.removed:
            raise BackendError(f"no such sandbox {self._id}")
        if self._task is not None:
            raise BackendError(f"sandbox {self._id} was already started")
        if secrets and not self.spec.defer:
            raise BackendError(f"sandbox {self._id} cannot take secrets at its start: its tool is running")
        if self.warm:
            if self._dead:
                raise BackendError(f"pooled sandbox {self._id} ended before it was claimed")
            self.claimed = True
        if secrets:
            self.spec = dataclasses.replace(self.spec, env={**self.spec.env, **secrets.env})
            self.claimed_files = dict(secrets.files)
        self._proc = FakeProcess(stdin=stdin, spec=self.spec, _write=self._write, files=dict(secrets.files))
        self._task = asyncio.create_task(self._run(self._proc), name=f"fake-sandbox-{self._id}")

    @property
    def egress(self) -> tuple[EgressDestination, ...]:
        return tuple(self._proc.reached) if self._proc is not None and self.removed else ()

    async def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        if self._task is None:
            raise BackendError("output() called before start()")
        while True:
            item = await self._queue.get()
            if isinstance(item, _Eof):
                return
            self._credits.release()
            yield item

    async def wait(self) -> ExitInfo:
        self._backend._check_available()
        if self._task is None:
            raise BackendError(f"sandbox {self._id} was never started")
        await self._done.wait()
        if self._exit is None:  # pragma: no cover - _done is only set together with _exit
            raise BackendError(f"sandbox {self._id} ended without an exit status")
        return self._exit

    async def signal(self, signum: int) -> None:
        self._backend._check_available()
        self._backend.signals.append((self._id, signum))
        if not self.running or self._proc is None or self._task is None:
            return  # "not running" is not an error
        if signum in self._proc.ignored_signals:
            return
        self._finish(ExitInfo(exit_code=128 + signum, oom_killed=False))
        self._task.cancel()

    async def usage(self) -> Usage:
        return self._proc.usage if self._proc is not None else Usage()

    async def remove(self) -> None:
        self._backend._check_available()
        if self.removed:
            return
        self.removed = True
        if self.running and self._task is not None:
            self._finish(ExitInfo(exit_code=128 + signals.SIGKILL, oom_killed=False))
            self._task.cancel()
        self._backend._forget(self)

    async def _run(self, proc: FakeProcess) -> int:
        try:
            code = await self._behaviour(proc)
        except _Killed as killed:
            self._finish(ExitInfo(exit_code=killed.exit_code, oom_killed=killed.oom))
        except asyncio.CancelledError:
            self._finish(ExitInfo(exit_code=128 + signals.SIGKILL, oom_killed=False))
        except Exception:  # an uncaught exception in the tool: the interpreter would exit 1
            self._finish(ExitInfo(exit_code=1, oom_killed=False))
        else:
            self._finish(ExitInfo(exit_code=int(code), oom_killed=False))
        return self._exit.exit_code if self._exit else 0

    async def _write(self, stream: StreamName, data: bytes) -> None:
        if not data or self._exit is not None:
            return
        await self._credits.acquire()
        self._queue.put_nowait((stream, bytes(data)))

    def _finish(self, info: ExitInfo) -> None:
        """Record the exit (first one wins) and close the output streams after what was written."""
        if self._exit is not None:
            return
        self._exit = info
        self._done.set()
        self._queue.put_nowait(_EOF)


class FakeBackend:
    """Backend whose sandboxes run ``behaviours[spec.image]`` in-process."""

    name = "fake"
    refill_concurrency = 2

    def __init__(
        self,
        behaviours: Mapping[str, Behaviour] | None = None,
        *,
        runtimes: Iterable[str] = ("runc",),
        available: bool = True,
        egress: bool = True,
    ) -> None:
        self.behaviours: dict[str, Behaviour] = dict(behaviours or {})
        self.runtimes = set(runtimes)
        self.available = available
        self.egress = egress
        # The wall clock leases are stamped with (a test may move it).
        self.clock: Callable[[], float] = time.time
        self.created: list[str] = []
        self.removed: list[str] = []
        self.signals: list[tuple[str, int]] = []
        self.specs: dict[str, SandboxSpec] = {}
        self.warm_created: list[str] = []
        self._live: dict[str, FakeSandbox] = {}
        self._ids = itertools.count(1)

    @property
    def live(self) -> list[str]:
        """Ids of sandboxes created and not yet removed (what a leak check asserts empty)."""
        return list(self._live)

    def sandbox(self, sandbox_id: str) -> FakeSandbox:
        return self._live[sandbox_id]

    def check(self, spec: SandboxSpec) -> None:
        if spec.egress and not self.egress:
            raise ConfigError(f"tool {spec.identity.tool!r}: network grants are not available on this backend",
                              key=f"tools.{spec.identity.tool}")

    async def create(self, spec: SandboxSpec) -> FakeSandbox:
        self._check_available()
        self.check(spec)
        spec = stamped(spec, self.clock())
        behaviour = self.behaviours.get(spec.image)
        if behaviour is None:
            raise ImageMissing(spec.image)
        if spec.isolation not in self.runtimes:
            raise RuntimeMissing(spec.isolation)
        sandbox_id = f"fake-{next(self._ids):06d}"
        sandbox = FakeSandbox(self, sandbox_id, spec, behaviour)
        self._live[sandbox_id] = sandbox
        self.created.append(sandbox_id)
        self.specs[sandbox_id] = spec
        return sandbox

    async def create_warm(self, spec: SandboxSpec, on_exit: Callable[[], None]) -> FakeSandbox:
        sandbox = await self.create(spec)
        sandbox.warm = True
        sandbox._on_exit = on_exit
        self.warm_created.append(sandbox.id)
        return sandbox

    async def list_sandboxes(self, owner: str) -> list[str]:
        self._check_available()
        return [sid for sid, sb in self._live.items() if sb.spec.identity.owner == owner]

    async def remove_orphans(self, owner: str) -> list[Removed]:
        return await self._remove_all(await self.list_sandboxes(owner))

    async def remove_expired(self, now: float) -> list[Removed]:
        self._check_available()
        return await self._remove_all([sid for sid, sb in self._live.items()
                                       if 0 < sb.spec.identity.lease_until < now])

    async def _remove_all(self, ids: list[str]) -> list[Removed]:
        removed = []
        for sid in ids:
            identity = self._live[sid].spec.identity
            serving = identity.serving
            removed.append(Removed(sid, identity.invocation_id if serving else "", identity.tool if serving else "",
                                   identity.owner))
            await self._live[sid].remove()
        return removed

    async def ping(self) -> None:
        self._check_available()

    async def has_image(self, image: str) -> bool:
        self._check_available()
        return image in self.behaviours

    async def close(self) -> None:
        for sandbox in list(self._live.values()):
            if sandbox.running and sandbox._task is not None:
                sandbox._task.cancel()

    def _check_available(self) -> None:
        if not self.available:
            raise EngineUnavailable("fake engine is unavailable")

    def _forget(self, sandbox: FakeSandbox) -> None:
        if self._live.pop(sandbox.id, None) is not None:
            self.removed.append(sandbox.id)

