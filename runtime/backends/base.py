"""The narrow backend Protocol every sandbox engine implements.

A backend turns a ``ContainerPlan`` into a running sandbox and reports on it. It owns no policy:
timeouts, caps and status decisions live in ``pipeline``. Backend methods raise only
``runtime.errors.BackendError`` subclasses; engine exceptions are translated inside the backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from runtime.model import Usage
from runtime.policy.network import NetworkSpec
from runtime.policy.plan import ContainerPlan

StreamName = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class Removed:
    """A sandbox a sweep removed: which invocation it served (empty for pooled or helper sandboxes)."""

    sandbox_id: str
    invocation_id: str = ""
    tool: str = ""


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int
    oom_killed: bool


class Sandbox(Protocol):
    """One created container. Single use: start once, then remove."""

    @property
    def id(self) -> str: ...

    async def start(self, stdin: bytes) -> None:
        """Start the sandbox, write ``stdin`` and close it (EOF)."""

    def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        """Raw output chunks as they arrive, until both streams close. Call once, after start."""

    async def wait(self) -> ExitInfo:
        """Block until the main process exits."""

    async def signal(self, signum: int) -> None:
        """Deliver a signal to the sandbox's init; no error if it already exited."""

    async def usage(self) -> Usage:
        """Best-known resource usage (peak memory, CPU time); zeros when the engine can't tell."""

    async def remove(self) -> None:
        """Force-remove the sandbox. Idempotent; must succeed even if it never started."""


class WarmSandbox(Sandbox, Protocol):
    """A pooled sandbox: created and started ahead of time, waiting for its one invocation.

    ``start(stdin)`` claims it: the arguments are delivered on its input; nothing was in it before.
    """

    @property
    def alive(self) -> bool:
        """Started, unclaimed, and its process has not ended."""

    async def claim(self, stdin: bytes, env: Mapping[str, str], files: Mapping[str, str]) -> None:
        """Like ``start``, and the tool is spawned now with its granted secrets: ``env`` added to its
        environment, ``files`` (path -> content) written first. Only for a sandbox created with ``defer=True``."""


class Backend(Protocol):
    name: str

    async def create(self, plan: ContainerPlan) -> Sandbox:
        """Create (not start) a sandbox for ``plan``. Raises ImageMissing/RuntimeMissing/EngineUnavailable."""

    async def create_warm(self, plan: ContainerPlan, on_exit: Callable[[], None], *,
                          defer: bool = False) -> WarmSandbox:
        """Create and start a pooled sandbox for ``plan`` that waits for its claim (see ``WarmSandbox``).

        ``defer``: its tool is spawned at the claim (``claim(stdin, env)``), for tools granted secrets.

        ``on_exit`` is called on the event loop if it ends before being claimed. A clean run's end may
        be reported in-band (before the engine processes the exit); other outcomes come from the engine.
        """

    async def remove_orphans(self, owner: str) -> list[Removed]:
        """Remove every sandbox, then every network, labelled as ``owner``'s; returns the sandboxes removed."""

    async def create_network(self, spec: NetworkSpec) -> str:
        """Create ``spec`` with the first of its subnets that is free; returns that subnet."""

    async def ensure_network(self, name: str, labels: Mapping[str, str]) -> None:
        """Make sure the routable bridge network ``name`` exists (created with ``labels`` if missing)."""

    async def remove_network(self, name: str) -> None:
        """Remove a network; no error if it is already gone."""

    async def list_sandboxes(self, owner: str) -> list[str]:
        """Ids of live sandboxes labelled as ``owner``'s."""

    async def ping(self) -> None:
        """Raise EngineUnavailable when the engine cannot be reached."""

    async def has_image(self, image: str) -> bool:
        """Whether ``image`` is present on the engine (never pulled). Raises EngineUnavailable."""

    async def close(self) -> None: ...
