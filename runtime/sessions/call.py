"""One call in a session's sandbox, seen by the pipeline as a sandbox of its own.

``SessionCall`` gives ``pipeline.contain`` what a warm sandbox gives it: ``start`` delivers the claim,
``output`` streams this call's output and ends at its trailers, ``wait`` is this call's status. What it
does not do is remove the sandbox: the session (``sessions.registry``) decides that after the call.
``signal`` (a timeout, a cancel) ends the session: a call stopped half-way leaves the tool in a state no
later call should inherit, so the sandbox is killed, never reused.
"""

from __future__ import annotations

import asyncio
import signal as signals
from collections.abc import AsyncIterator, Mapping, Sequence

from toolcell.backends.base import ExitInfo, HostedSandbox, StreamName
from toolcell.backends.launcher import TrailerScanner, new_nonce
from toolcell.model import EgressDestination, Usage
from toolcell.policy.spec import NO_SECRETS, Secrets
from toolcell.sessions.host import SESSION_OVER, CallScanner, FilesBlock, claim


class SessionOutput:
    """A session sandbox's raw output, read by one call at a time (its iterator lives across calls)."""

    def __init__(self, sandbox: HostedSandbox) -> None:
        self._chunks = sandbox.output().__aiter__()
        self.ended = False  # nothing more will be read (the output ended, or a read was interrupted)
        self.exhausted = False  # the sandbox's output ended: it is gone

    async def next(self) -> tuple[StreamName, bytes] | None:
        if self.ended:
            return None
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            self.ended = self.exhausted = True
            return None
        except BaseException:  # cancelled or failed mid-read: the iterator is finished for every later call
            self.ended = True
            raise


class SessionCall:
    """One claim's view of the session sandbox (``pipeline`` sees a ``WarmSandbox``)."""

    def __init__(self, sandbox: HostedSandbox, raw: SessionOutput, *, first: bool, files_cap: int,
                 inputs: Sequence[Mapping[str, str]] = (), collect: bool = False) -> None:
        self._sandbox = sandbox
        self._raw = raw
        self._first = first
        self._inputs = inputs
        self._collect = collect
        nonce = new_nonce()
        self._nonce = nonce
        self._stdout = CallScanner(nonce, files_cap)
        self._stderr = TrailerScanner(nonce)
        self._done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.killed = False  # a signal of ours: the session must end
        self.started = False  # the claim went out: the call counts, and its end decides the session's
        self._ooms = 0  # the sandbox's OOM kills before this call
        self.over = False  # the host said the session ends with this call (its resident tool is gone)

    @property
    def id(self) -> str:
        return self._sandbox.id

    @property
    def alive(self) -> bool:
        return self._sandbox.alive

    @property
    def egress(self) -> tuple[EgressDestination, ...]:
        return self._sandbox.egress

    @property
    def files(self) -> FilesBlock:
        return self._stdout.files

    @property
    def finished(self) -> bool:
        """The call reached its trailers (the host said it is over)."""
        return self._done.done() and self._done.result() is not None

    @property
    def sandbox_gone(self) -> bool:
        """The sandbox's output ended or it is no longer alive (not: this call was interrupted)."""
        return self.over or self._raw.exhausted or not self._sandbox.alive

    @property
    def clean(self) -> bool:
        """The call reached its trailers and nothing of ours interrupted it: the session may go on."""
        return self.finished and not self.killed and not self.over and self._sandbox.alive

    async def start(self, stdin: bytes, secrets: Secrets = NO_SECRETS) -> None:
        # Secrets travel with the first claim only (the host spawns nothing before it); later claims need none.
        granted = secrets if self._first else NO_SECRETS
        self.started = True
        self._ooms = self._sandbox.oom_kills()
        await self._sandbox.send(claim(self._nonce, stdin, env=granted.env, files=granted.files,
                                       inputs=self._inputs, collect=self._collect))

    async def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        try:
            while not (self._stdout.done and self._stderr.done):
                item = await self._raw.next()
                if item is None:  # the sandbox ended: what was held back is output after all
                    for name, held in (("stdout", self._stdout.flush()), ("stderr", self._stderr.flush())):
                        if held:
                            yield name, held  # type: ignore[misc]
                    break
                name, data = item
                passed = self._stdout.feed(data) if name == "stdout" else self._stderr.feed(data)
                if passed:
                    yield name, passed
        finally:
            if not self._done.done():
                status = self._stdout.status if self._stdout.done and self._stderr.done else None
                if status is not None and status >= SESSION_OVER:  # the host ends the session with this call
                    self.over, status = True, status - SESSION_OVER
                self._done.set_result(status)

    async def wait(self) -> ExitInfo:
        status = await asyncio.shield(self._done)
        if status is not None and (self._sandbox.alive or self.over):
            # The memory limit is the session's: a process of this call's killed by it makes this call's status.
            return ExitInfo(exit_code=status, oom_killed=self._sandbox.oom_kills() > self._ooms)
        # The host is gone (the tool exited and took the session with it, or the sandbox was killed): the
        # engine's facts decide (exit status, OOM flag).
        return await self._sandbox.wait()

    async def signal(self, signum: int) -> None:
        self.killed = True
        await self._sandbox.signal(signals.SIGKILL)

    async def usage(self) -> Usage:
        return await self._sandbox.usage()

    async def remove(self) -> None:
        """Not this call's to do: the session removes its sandbox when it ends."""
