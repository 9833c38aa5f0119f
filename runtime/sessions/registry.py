"""Open sessions: one sandbox leased to one principal across its calls, until one of its bounds ends it.

    open (tool allows it; the principal's cap) -> call, call, ... (one at a time, in order)
        -> end: closed | idle | lifetime | max_calls | call_stopped | sandbox_ended | shutdown

A session's id is 128 random bits, and sessions are keyed by (owner, id): another principal's id answers
exactly like no session (``SessionNotFound``), as with Cancel. Every end goes through ``end`` (once,
shielded from cancellation): the sandbox is removed, the concurrency slot released, and ``on_end`` records
it (audit, metrics). A call that did not finish cleanly (timeout, cancel, the tool's death) ends the
session: its sandbox is in a state no later call should inherit. Nothing is ever reused by another
session or principal: a session's sandbox is made for it and removed with it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from toolcell.backends.base import Backend, HostedSandbox
from toolcell.errors import SessionNotFound
from toolcell.model import SessionPolicy, WorkspacePolicy
from toolcell.policy.spec import SandboxSpec
from toolcell.sessions.call import SessionCall, SessionOutput

log = logging.getLogger("toolcell.sessions")

SESSION_PREFIX = "ses_"
# Ended sessions remembered (per owner and id) to say why a later call finds none; bounded.
_TOMBSTONES = 1024
_EXPIRE_POLL_S = 1.0


def new_session_id() -> str:
    """128 random bits: unguessable, so one caller cannot address another's session."""
    return SESSION_PREFIX + secrets.token_hex(16)


@dataclass
class Session:
    id: str
    owner: str
    tool: str  # the tool it was opened for
    profile: str
    policy: SessionPolicy
    workspace: WorkspacePolicy | None
    sandbox: HostedSandbox
    opened_at: float  # monotonic
    release: Callable[[], None] = lambda: None  # the concurrency slot it holds
    last_used: float = 0.0
    calls: int = 0
    ended: str = ""
    ephemeral: bool = False  # a one-shot call with files: one call, then gone, never listed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    raw: SessionOutput | None = None
    # Which tools it serves (``sessions.config.session_scope``): the tool's name, or a server's tools'.
    scope: str = ""
    principal: object = None  # who opened it, for the audit trail (``policy.access.Principal``)

    def call(self, *, files_cap: int, inputs: list[dict[str, str]], collect: bool) -> SessionCall:
        if self.raw is None:
            self.raw = SessionOutput(self.sandbox)
        return SessionCall(self.sandbox, self.raw, first=self.calls == 0, files_cap=files_cap, inputs=inputs,
                           collect=collect)

    def expiry(self, now: float) -> str:
        """Why the session should end now ("" if it should not)."""
        if now - self.opened_at >= self.policy.max_lifetime_s:
            return "lifetime"
        if now - (self.last_used or self.opened_at) >= self.policy.idle_ttl_s:
            return "idle"
        if not self.sandbox.alive:
            return "sandbox_ended"
        return ""


OnEnd = Callable[[Session, str], Awaitable[None]]


class SessionRegistry:
    def __init__(self, backend: Backend, remove: Callable[[HostedSandbox], Awaitable[None]], on_end: OnEnd,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self._remove = remove
        self._on_end = on_end
        self.clock = clock
        self._open: dict[tuple[str, str], Session] = {}
        self._ended: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self._expiring: asyncio.Task[None] | None = None
        self._ends: set[asyncio.Future[None]] = set()

    def __len__(self) -> int:
        return len(self._open)

    def count(self, owner: str, scope: str) -> int:
        """``owner``'s open sessions of one scope (a tool, or a server's tools under one profile)."""
        return sum(1 for s in self._open.values() if s.owner == owner and (s.scope or s.tool) == scope)

    async def create(self, spec: SandboxSpec) -> HostedSandbox:
        """The session's sandbox; cancelled mid-create, the late sandbox is removed, not leaked."""
        task = asyncio.ensure_future(self.backend.create_session(spec))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            def late(t: asyncio.Future[HostedSandbox]) -> None:
                if not t.cancelled() and t.exception() is None:
                    removal = asyncio.ensure_future(self._remove(t.result()))
                    self._ends.add(removal)
                    removal.add_done_callback(self._ends.discard)
            task.add_done_callback(late)
            raise

    def add(self, session: Session) -> None:
        if not session.ephemeral:
            self._open[(session.owner, session.id)] = session
        if self._expiring is None:
            self._expiring = asyncio.ensure_future(self._expire_periodically())

    def get(self, owner: str, session_id: str) -> Session:
        session = self._open.get((owner, session_id))
        if session is None:
            why = self._ended.get((owner, session_id))
            raise SessionNotFound(f"the session has ended ({why})" if why else "no open session with this id")
        return session

    def sessions(self) -> list[Session]:
        return list(self._open.values())

    async def after_call(self, session: Session, call: SessionCall | None) -> None:
        """Account one call; end the session when the call did not finish cleanly or used the last call."""
        session.last_used = self.clock()
        if session.ephemeral:
            await self.end(session, "closed")
            return
        if call is None or not call.started:  # refused before its claim (bad arguments): not a call
            return
        session.calls += 1
        if not call.clean:  # stopped half-way (timeout, cancel, the caller gone), or the tool took the sandbox down
            gone = call.sandbox_gone and not call.killed
            await self.end(session, "sandbox_ended" if gone else "call_stopped")
        elif session.calls >= session.policy.max_calls:
            await self.end(session, "max_calls")

    async def end(self, session: Session, reason: str) -> None:
        """End ``session`` once (whatever asks first wins); shielded: a cancelled caller still ends it."""
        if session.ended:
            return
        session.ended = reason
        key = (session.owner, session.id)
        if self._open.get(key) is session:
            del self._open[key]
            self._ended[key] = reason
            while len(self._ended) > _TOMBSTONES:
                self._ended.popitem(last=False)
        done = asyncio.ensure_future(self._finish(session, reason))
        self._ends.add(done)
        done.add_done_callback(self._ends.discard)
        await asyncio.shield(done)

    async def _finish(self, session: Session, reason: str) -> None:
        try:
            await self._remove(session.sandbox)
        finally:
            session.release()
            try:
                await self._on_end(session, reason)
            except Exception:
                log.exception("recording the end of session %s failed", session.id)

    async def _expire_periodically(self) -> None:
        while True:
            await asyncio.sleep(_EXPIRE_POLL_S)
            await self.expire()

    async def expire(self) -> int:
        """End sessions past their idle TTL or lifetime, or whose sandbox is gone; not while a call runs."""
        now = self.clock()
        ended = 0
        for session in list(self._open.values()):
            if session.lock.locked():
                continue
            reason = session.expiry(now)
            if reason:
                ended += 1
                try:
                    await self.end(session, reason)
                except Exception:  # its removal failed (the engine away: the reaper retries); the others still end
                    log.exception("ending session %s (%s) failed", session.id, reason)
        return ended

    async def close(self, reason: str = "shutdown") -> None:
        """End every session (shutdown)."""
        if self._expiring is not None:
            self._expiring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiring
            self._expiring = None
        await asyncio.gather(*(self.end(s, reason) for s in list(self._open.values())), return_exceptions=True)
        if self._ends:
            await asyncio.wait(list(self._ends))
