"""An in-process backend for tests: sandboxes whose "process" is a Python coroutine.

A behaviour is keyed by the plan's image and plays the tool::

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
assert cleanup.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import signal as signals
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from runtime.backends.base import ExitInfo, Removed, StreamName
from runtime.errors import BackendError, EngineUnavailable, ImageMissing, RuntimeMissing
from runtime.model import Usage
from runtime.policy.network import NetworkSpec
from runtime.policy.plan import LABEL_INVOCATION, LABEL_MANAGED, LABEL_OWNER, LABEL_TOOL, ContainerPlan

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
    """What a behaviour sees: its stdin, its plan, and ways to write, ignore signals or get OOM-killed."""

    stdin: bytes
    plan: ContainerPlan
    _write: Callable[[StreamName, bytes], Awaitable[None]] = field(repr=False)
    ignored_signals: set[int] = field(default_factory=set)
    usage: Usage = field(default_factory=Usage)

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

    def oom(self) -> None:
        """End the process as the OOM killer would: exit 137 with ``oom_killed``."""
        raise _Killed(_OOM_EXIT, oom=True)


Behaviour = Callable[[FakeProcess], Awaitable[int]]


class FakeSandbox:
    def __init__(
        self, backend: FakeBackend, sandbox_id: str, plan: ContainerPlan, behaviour: Behaviour
    ) -> None:
        self._backend = backend
        self._id = sandbox_id
        self.plan = plan
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
        self.defer = False  # spawned at the claim, with the claim's env (granted secrets)
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

    async def start(self, stdin: bytes) -> None:
        self._backend._check_available()
        if self.removed:
            raise BackendError(f"no such sandbox {self._id}")
        if self._task is not None:
            raise BackendError(f"sandbox {self._id} was already started")
        if self.warm:
            if self._dead:
                raise BackendError(f"pooled sandbox {self._id} ended before it was claimed")
            self.claimed = True
        self._proc = FakeProcess(stdin=stdin, plan=self.plan, _write=self._write)
        self._task = asyncio.create_task(self._run(self._proc), name=f"fake-sandbox-{self._id}")

    async def claim(self, stdin: bytes, env: Mapping[str, str], files: Mapping[str, str]) -> None:
        """A deferred pooled sandbox's claim: the behaviour sees ``env`` added to its plan's environment
        (and ``claimed_files``)."""
        if not (self.warm and self.defer):
            raise BackendError(f"sandbox {self._id} cannot take secrets at its claim")
        self.plan = dataclasses.replace(self.plan, env={**self.plan.env, **env})
        self.claimed_files = dict(files)
        await self.start(stdin)

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
    """Backend whose sandboxes run ``behaviours[plan.image]`` in-process."""

    name = "fake"

    def __init__(
        self,
        behaviours: Mapping[str, Behaviour] | None = None,
        *,
        runtimes: Iterable[str] = ("runc",),
        available: bool = True,
    ) -> None:
        self.behaviours: dict[str, Behaviour] = dict(behaviours or {})
        self.runtimes = set(runtimes)
        self.available = available
        self.created: list[str] = []
        self.removed: list[str] = []
        self.signals: list[tuple[str, int]] = []
        self.plans: dict[str, ContainerPlan] = {}
        self.warm_created: list[str] = []
        # Networks by name -> labels (what a leak check asserts empty, with ``live``).
        self.networks: dict[str, Mapping[str, str]] = {}
        self._live: dict[str, FakeSandbox] = {}
        self._ids = itertools.count(1)

    @property
    def live(self) -> list[str]:
        """Ids of sandboxes created and not yet removed (what a leak check asserts empty)."""
        return list(self._live)

    def sandbox(self, sandbox_id: str) -> FakeSandbox:
        return self._live[sandbox_id]

    async def create(self, plan: ContainerPlan) -> FakeSandbox:
        self._check_available()
        behaviour = self.behaviours.get(plan.image)
        if behaviour is None:
            raise ImageMissing(plan.image)
        if plan.runtime not in self.runtimes:
            raise RuntimeMissing(plan.runtime)
        for network in (plan.network_mode, *plan.extra_networks):
            if network != "none" and network not in self.networks:
                raise BackendError(f"network {network!r} not found")
        sandbox_id = f"fake-{next(self._ids):06d}"
        sandbox = FakeSandbox(self, sandbox_id, plan, behaviour)
        self._live[sandbox_id] = sandbox
        self.created.append(sandbox_id)
        self.plans[sandbox_id] = plan
        return sandbox

    async def create_warm(self, plan: ContainerPlan, on_exit: Callable[[], None], *,
                          defer: bool = False) -> FakeSandbox:
        sandbox = await self.create(plan)
        sandbox.warm, sandbox.defer = True, defer
        sandbox._on_exit = on_exit
        self.warm_created.append(sandbox.id)
        return sandbox

    async def list_sandboxes(self, owner: str) -> list[str]:
        self._check_available()
        return [sid for sid, sb in self._live.items() if _owned_by(sb.plan, owner)]

    async def remove_orphans(self, owner: str) -> list[Removed]:
        ids = await self.list_sandboxes(owner)
        removed = []
        for sid in ids:
            labels = self._live[sid].plan.labels
            removed.append(Removed(sid, labels.get(LABEL_INVOCATION, ""), labels.get(LABEL_TOOL, "")))
            await self._live[sid].remove()
        for name, labels in list(self.networks.items()):
            if labels.get(LABEL_MANAGED) == "true" and labels.get(LABEL_OWNER) == owner:
                del self.networks[name]
        return removed

    async def create_network(self, spec: NetworkSpec) -> str:
        self._check_available()
        if spec.name in self.networks or not spec.subnets:
            raise BackendError(f"cannot create network {spec.name!r}")
        self.networks[spec.name] = dict(spec.labels)
        return spec.subnets[0]

    async def ensure_network(self, name: str, labels: Mapping[str, str]) -> None:
        self._check_available()
        self.networks.setdefault(name, dict(labels))

    async def remove_network(self, name: str) -> None:
        self._check_available()
        self.networks.pop(name, None)

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


def _owned_by(plan: ContainerPlan, owner: str) -> bool:
    return plan.labels.get(LABEL_MANAGED) == "true" and plan.labels.get(LABEL_OWNER) == owner
