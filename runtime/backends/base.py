"""The narrow backend Protocol every sandbox engine implements.

A backend turns a ``SandboxSpec`` (``runtime/policy/spec.py``) into a running sandbox and reports on it,
in no engine's terms: no labels, networks, bundles or container ids leak above this seam. It owns no
policy: timeouts, caps and status decisions live in ``pipeline``. Backend methods raise only
``toolcell.errors.BackendError`` subclasses; engine exceptions are translated inside the backend.

Capabilities a backend provides behind the same calls:

- ``spec.egress``: the sandbox's own network with a filtering proxy (``Sandbox.egress`` reports what it
  asked for, once removed); a backend that cannot grant network raises ``ConfigError`` naming the tool
  from ``check``, at configuration time, never more network than granted.
- ``spec.defer`` with ``start(stdin, secrets)``: granted secrets reach the sandbox with its start (or its
  claim, pooled), never through host files the pipeline prepares.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from toolcell.model import EgressDestination, Usage
from toolcell.policy.spec import NO_SECRETS, SandboxSpec, Secrets

StreamName = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class Removed:
    """A sandbox a sweep removed: which invocation it served (empty for pooled or helper sandboxes)."""

    sandbox_id: str
    invocation_id: str = ""
    tool: str = ""
    owner: str = ""  # the supervisor instance it was made by


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int
    oom_killed: bool


class Sandbox(Protocol):
    """One sandbox. Single use: start once, then remove."""

    @property
    def id(self) -> str: ...

    async def start(self, stdin: bytes, secrets: Secrets = NO_SECRETS) -> None:
        """Start the sandbox (claim it, pooled), write ``stdin`` and close it (EOF).

        ``secrets`` only for a sandbox whose spec has ``defer``: its tool is spawned now, with them.
        """

    def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        """Raw output chunks as they arrive, until both streams close. Call once, after start."""

    async def wait(self) -> ExitInfo:
        """Block until the main process exits."""

    async def signal(self, signum: int) -> None:
        """Deliver a signal to the sandbox's init; no error if it already exited."""

    async def usage(self) -> Usage:
        """Best-known resource usage (peak memory, CPU time); zeros when the engine can't tell."""

    async def remove(self) -> None:
        """Force-remove the sandbox and everything it had (network, proxy). Idempotent; must succeed even
        if it never started."""

    @property
    def egress(self) -> tuple[EgressDestination, ...]:
        """What the sandbox asked its egress proxy for, as the proxy accounted it (after ``remove``)."""


class WarmSandbox(Sandbox, Protocol):
    """A pooled sandbox: created and started ahead of time, waiting for its one invocation.

    ``start(stdin, secrets)`` claims it: the arguments (and, deferred, the secrets) are delivered on its
    input; nothing was in it before.
    """

    @property
    def alive(self) -> bool:
        """Started, unclaimed, and its process has not ended."""


class HostedSandbox(WarmSandbox, Protocol):
    """A session's sandbox (``spec.host``): its main process is the session host, serving several calls.

    ``Backend.create_session`` returns it started. ``send`` writes to the host's input (one claim per call;
    never closing it: EOF ends the session); ``output`` is its whole life's raw output, every call's
    trailers included (``sessions.host.CallScanner`` splits it); ``wait`` is the sandbox's end.
    """

    async def send(self, data: bytes) -> None:
        """Queue ``data`` on the host's input, after whatever was sent before. (``start`` is not used: each
        call's claim is sent; ``alive``: started, not being removed, its output not ended.)"""

    def oom_kills(self) -> int:
        """OOM kills in the sandbox so far, as the kernel counts them (a cheap read; 0 when unknown): a call
        whose count went up was cut short by the memory limit."""


class Backend(Protocol):
    name: str
    # Pooled sandboxes this backend may create at once off the critical path without starving live calls'
    # creations (a daemon serializes them: few; a daemonless runtime is bounded by CPUs only: more).
    refill_concurrency: int

    def check(self, spec: SandboxSpec) -> None:
        """Raise ``ConfigError`` (naming the tool) when this backend cannot run ``spec`` as written."""

    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Create (not start) a sandbox for ``spec``. Raises ImageMissing/RuntimeMissing/EngineUnavailable."""

    async def create_warm(self, spec: SandboxSpec, on_exit: Callable[[], None]) -> WarmSandbox:
        """Create and start a pooled sandbox for ``spec`` that waits for its claim (see ``WarmSandbox``).

        With ``spec.defer`` its tool is spawned at the claim, with the claim's secrets.
        ``on_exit`` is called on the event loop if it ends before being claimed.
        """

    async def create_session(self, spec: SandboxSpec) -> HostedSandbox:
        """Create and start a session's sandbox (``spec.host`` set): its host waits for its first claim."""

    async def remove_orphans(self, owner: str) -> list[Removed]:
        """Remove every sandbox (and whatever it had) recorded as ``owner``'s; returns the sandboxes removed."""

    async def remove_expired(self, now: float) -> list[Removed]:
        """Remove every sandbox (and whatever it had), of any owner, whose ``Identity.lease_until`` is before
        ``now`` (Unix seconds): its owner can no longer need it. Sandboxes without a lease are left alone."""

    async def list_sandboxes(self, owner: str) -> list[str]:
        """Ids of live sandboxes recorded as ``owner``'s."""

    async def ping(self) -> None:
        """Raise EngineUnavailable when the engine cannot be reached."""

    async def has_image(self, image: str) -> bool:
        """Whether ``image`` is present (never pulled). Raises EngineUnavailable."""

    async def close(self) -> None: ...
