"""Warm pools: single-use sandboxes created and started ahead of their invocation.

For every tool with a ``pool`` in the config, ``PoolManager`` keeps ``size`` sandboxes created with
the full hardening of the tool's profile and started (``Backend.create_warm``): the tool's process is
up and waiting for its input. ``claim(spec)`` hands one to an invocation (never twice); the pipeline
runs it exactly as a cold sandbox, and it is destroyed afterwards. A pooled sandbox holds no
arguments and no secrets until claimed: a tool granted secrets is spawned by the launcher only at the
claim, which carries them (variables; files, written into the sandbox's empty tmpfs at their directory).

Everything else happens off the request's critical path, in one task per pool:
refill (at most the backend's ``refill_concurrency`` creations at once across all pools, so refilling never
starves live calls), removal of used, dead and expired sandboxes (bounded the same way), TTL recycling,
and rebuilding after the engine restarts (creation failures back off and retry). An empty pool is not
an error: ``claim`` returns None and the invocation takes the cold path.

A pooled sandbox matches an invocation only if the invocation's spec is the one it was created from
(the invocation id and the timeout aside: ``policy.spec.fingerprint``): a config reload that changes a
tool's image, command or profile drains its pool; a size change resizes it. Pooled sandboxes carry
their owner, so the start-up and shutdown sweeps remove them like any other. Removal is the reaper's
(``reaper.py``), as for every sandbox.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from toolcell.backends.base import Backend, HostedSandbox, Sandbox, WarmSandbox
from toolcell.policy.spec import POOL_PREFIX, SandboxSpec, fingerprint, pooled
from toolcell.reaper import Reaper
from toolcell.sessions.config import hosted, hosted_spec
from toolcell.settings import Config, PoolSpec

log = logging.getLogger("toolcell.pool")

REFILL_CONCURRENCY = 2
# A claim's refill starts when its invocation ends, or after this long, whichever is first: the
# engine's CPU-heavy sandbox start then does not compete with a short warm invocation.
REFILL_DELAY_S = 0.1
# After a claimed sandbox's invocation ends: its removal and refill start this much later.
AFTER_CALL_S = 0.05
# How long an invocation that found its pool empty waits for a creation already in flight (``claim_soon``).
CLAIM_WAIT_S = 1.0
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.2, 5.0
_CAP_POLL_S = 0.25


@dataclass
class PoolStats:
    size: int = 0
    ready: int = 0
    creating: int = 0
    hits: int = 0  # invocations served warm
    misses: int = 0  # invocations of a pooled tool that found the pool empty (went cold)
    created: int = 0
    failed: int = 0  # creations that failed (engine down, image missing ...)
    recycled: int = 0  # removed unused: TTL, death, drain, shrink


@dataclass
class _Entry:
    sandbox: WarmSandbox
    created_at: float


@dataclass
class _Pool:
    tool: str
    spec: PoolSpec
    sandbox_spec: SandboxSpec
    key: int
    ready: collections.deque[_Entry] = field(default_factory=collections.deque)
    creating: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    stats: PoolStats = field(default_factory=PoolStats)
    closed: bool = False
    failing: bool = False  # the last creation failed: back off before the next
    # Invocations that found the pool empty while creations were in flight, waiting for one (oldest first).
    # None: the pool stopped.
    waiters: collections.deque[asyncio.Future[WarmSandbox | None]] = field(default_factory=collections.deque)


class PoolManager:
    def __init__(self, backend: Backend, *, headroom: Callable[[], int] = lambda: 1 << 30,
                 refill_concurrency: int = REFILL_CONCURRENCY, reaper: Reaper | None = None) -> None:
        """``headroom()``: how many more sandboxes may exist now (the concurrency cap less live and pooled)."""
        self.backend = backend
        self._headroom = headroom
        self._pools: dict[str, _Pool] = {}
        self._refill_limit = refill_concurrency
        self._refill = asyncio.Semaphore(refill_concurrency)
        self._reaper = reaper if reaper is not None else Reaper()
        self._owned: set[str] = set()  # ids of sandboxes that came from a pool (claimed or not)
        self._claimed_from: dict[str, _Pool] = {}
        self._hosted: dict[str, HostedSandbox] = {}  # pooled session hosts, by id, until claimed or retired
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- configuration -----------------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Start, resize, drain or stop pools to match ``config`` (at start-up and on reload)."""
        if self._closed:
            return
        wanted: dict[str, tuple[PoolSpec, SandboxSpec, int]] = {}
        for name, spec in config.pools.items():
            resolved = config.resolve(name)
            sandbox_spec = config.compile(resolved, POOL_PREFIX)
            if hosted(resolved.tool):  # a session host: serves a one-shot call, or a session's first call on
                session = resolved.tool.session
                sandbox_spec = hosted_spec(resolved.tool, sandbox_spec,
                                           session.max_lifetime_s if session is not None else 0.0)
            sandbox_spec = pooled(sandbox_spec)
            # Waits up to its TTL for a claim, then serves one call (or a session): its lease covers both.
            sandbox_spec = dataclasses.replace(sandbox_spec, lease_s=sandbox_spec.lease_s + spec.ttl_s)
            wanted[name] = (spec, sandbox_spec, fingerprint(sandbox_spec))
        for name, pool in list(self._pools.items()):
            if name not in wanted or wanted[name][2] != pool.key:
                log.info("draining the pool of %s (%s)", name, "removed" if name not in wanted else "changed")
                self._stop(pool)
                del self._pools[name]
        for name, (spec, sandbox_spec, key) in wanted.items():
            existing = self._pools.get(name)
            if existing is None:
                pool = self._pools[name] = _Pool(tool=name, spec=spec, sandbox_spec=sandbox_spec, key=key)
                pool.task = self._spawn(self._maintain(pool))
            else:
                existing.spec = spec
                existing.wake.set()

    # -- the critical path: no await, no engine call --------------------------------------------------

    def claim(self, spec: SandboxSpec) -> WarmSandbox | None:
        """A started sandbox made from ``spec``, for this one invocation; None when the pool is empty.

        A deferred spec (granted secrets): the invocation's start delivers them with the claim.
        """
        pool = self._pool_for(spec)
        return None if pool is None else self._take(pool)

    async def claim_hosted(self, spec: SandboxSpec) -> HostedSandbox | None:
        """A pooled session host made from ``spec`` (a hosted tool's: ``sessions.config.hosted_spec``)."""
        if spec.host is None:
            return None
        sandbox = await self.claim_soon(spec)
        return None if sandbox is None else self._hosted.pop(sandbox.id, None)

    def _pool_for(self, spec: SandboxSpec) -> _Pool | None:
        """The open pool whose sandboxes are made from ``spec`` (one fingerprint per call), if any."""
        pool = self._pools.get(spec.identity.tool)
        if pool is None or pool.closed or fingerprint(spec) != pool.key:
            return None  # no pool, or e.g. an invocation still running under the previous config
        return pool

    def _take(self, pool: _Pool) -> WarmSandbox | None:
        """A live ready sandbox of ``pool`` (dead ones are retired on the way); None counts a miss."""
        while pool.ready:
            entry = pool.ready.popleft()
            if entry.sandbox.alive:
                pool.stats.hits += 1
                self._claimed_from[entry.sandbox.id] = pool
                asyncio.get_running_loop().call_later(REFILL_DELAY_S, pool.wake.set)
                return entry.sandbox
            self.retire(entry.sandbox)
        pool.stats.misses += 1
        pool.wake.set()
        return None

    async def claim_soon(self, spec: SandboxSpec, wait_s: float = CLAIM_WAIT_S) -> WarmSandbox | None:
        """Like ``claim``; when the pool is empty but creates sandboxes that nobody waits for yet, wait up to
        ``wait_s`` for one of them instead of creating yet another cold.

        Under load a cold fallback only adds a creation to those already competing for the CPU (or the
        engine); the one in flight started earlier and costs nothing more, so waiting for it is no slower and
        keeps the warm share up. A creation that fails or is late sends the call cold after ``wait_s``.
        """
        pool = self._pool_for(spec)
        if pool is None:
            return None
        sandbox = self._take(pool)
        if sandbox is not None:
            return sandbox
        if pool.creating <= len(pool.waiters):
            return None  # every creation in flight is promised to an earlier caller
        waiter: asyncio.Future[WarmSandbox | None] = asyncio.get_running_loop().create_future()
        pool.waiters.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), timeout=wait_s)
        except BaseException:  # the call was cancelled while waiting: a sandbox handed over goes back
            self._drop_waiter(pool, waiter, keep=False)
            raise
        sandbox = self._drop_waiter(pool, waiter, keep=True)
        if sandbox is not None:
            pool.stats.misses -= 1  # counted by _take() above: it was served warm after all
            pool.stats.hits += 1
        return sandbox

    def _drop_waiter(self, pool: _Pool, waiter: asyncio.Future[WarmSandbox | None], *, keep: bool
                     ) -> WarmSandbox | None:
        """Stop waiting; the sandbox handed over meanwhile, if any (retired unless ``keep``)."""
        if waiter in pool.waiters:
            pool.waiters.remove(waiter)
        if not waiter.done():
            waiter.cancel()
            return None
        sandbox = None if waiter.cancelled() else waiter.result()
        if sandbox is not None and not keep:
            self.retire(sandbox)
            return None
        return sandbox

    def shed(self) -> None:
        """Live calls need the room: every pool re-checks the cap now."""
        for pool in self._pools.values():
            pool.wake.set()

    def owns(self, sandbox: Sandbox) -> bool:
        return sandbox.id in self._owned

    def retire(self, sandbox: Sandbox) -> asyncio.Task[None]:
        """Hand a pooled sandbox to the reaper (background, bounded); returns the removal task.

        A claimed sandbox is retired as its invocation ends, before the result is sent: its removal and
        the refill wait ``AFTER_CALL_S`` so the engine's work does not compete with sending the result.
        (Its tool has exited; what could linger is capped and has no network, and goes with it.)
        """
        pool = self._claimed_from.pop(sandbox.id, None)
        self._hosted.pop(sandbox.id, None)
        delay = 0.0 if pool is None or self._closed else AFTER_CALL_S
        if pool is not None:
            asyncio.get_running_loop().call_later(AFTER_CALL_S, pool.wake.set)
        task = self._reaper.remove(sandbox, delay_s=delay, done=lambda: self._owned.discard(sandbox.id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- introspection -------------------------------------------------------------------------------

    def stats(self) -> dict[str, PoolStats]:
        out = {}
        for name, pool in self._pools.items():
            out[name] = dataclasses.replace(pool.stats, size=pool.spec.size, ready=len(pool.ready),
                                            creating=pool.creating)
        return out

    def ready(self, tool: str) -> int:
        pool = self._pools.get(tool)
        return 0 if pool is None else sum(1 for e in pool.ready if e.sandbox.alive)

    def settled(self, tool: str) -> bool:
        """The tool's pool is full and no creation or removal is in flight (for the bench and tests)."""
        pool = self._pools.get(tool)
        if pool is None:
            return True
        maintainers = {p.task for p in self._pools.values()}
        return self.ready(tool) >= pool.spec.size and pool.creating == 0 and not self._tasks - maintainers

    @property
    def pooled(self) -> int:
        """Sandboxes held in pools (ready or being created): they count against capacity."""
        return sum(len(p.ready) + p.creating for p in self._pools.values())

    # -- shutdown ------------------------------------------------------------------------------------

    async def close(self, timeout_s: float = 15.0) -> None:
        """Stop every pool, wait for creations in flight, remove every pooled sandbox.

        Bounded: with the engine away, what is not removed by then is left to the sweep by owner.
        """
        self._closed = True
        for pool in self._pools.values():
            self._stop(pool)
        self._pools.clear()
        deadline = time.monotonic() + timeout_s
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(list(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
        for task in list(self._tasks):
            task.cancel()

    # -- background work -----------------------------------------------------------------------------

    def _spawn(self, coro: collections.abc.Coroutine[None, None, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _stop(self, pool: _Pool) -> None:
        pool.closed = True
        if pool.task is not None:
            pool.task.cancel()
        while pool.ready:
            pool.stats.recycled += 1
            self.retire(pool.ready.popleft().sandbox)
        while pool.waiters:  # they go cold
            waiter = pool.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def _maintain(self, pool: _Pool) -> None:
        """Keep ``size`` live sandboxes: recycle dead and expired ones, refill with back-off."""
        backoff = _BACKOFF_MIN_S
        while not pool.closed:
            pool.wake.clear()
            now = time.monotonic()
            for entry in list(pool.ready):
                if not entry.sandbox.alive or now - entry.created_at >= pool.spec.ttl_s:
                    pool.ready.remove(entry)
                    pool.stats.recycled += 1
                    self.retire(entry.sandbox)
            # Over the concurrency cap (live calls grew): give idle sandboxes back, newest first.
            excess = max(len(pool.ready) + pool.creating - pool.spec.size, -self._headroom())
            while excess > 0 and pool.ready:
                pool.stats.recycled += 1
                self.retire(pool.ready.pop().sandbox)
                excess -= 1
            if pool.failing:  # e.g. the engine is restarting: retry, less and less often
                pool.failing = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            if pool.ready:
                backoff = _BACKOFF_MIN_S
            # Creations run in parallel up to the shared bound, which is what limits the engine load;
            # pooled sandboxes count against the concurrency cap, so live calls keep their share.
            while (len(pool.ready) + pool.creating < pool.spec.size and pool.creating < self._refill_limit
                   and self._headroom() > 0):
                pool.creating += 1
                self._spawn(self._create(pool))
            oldest = min((e.created_at for e in pool.ready), default=now)
            timeout = max(0.05, oldest + pool.spec.ttl_s - now)
            if len(pool.ready) + pool.creating < pool.spec.size:
                timeout = min(timeout, _CAP_POLL_S)  # held back by the cap: look again soon
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pool.wake.wait(), timeout=timeout)

    async def _create(self, pool: _Pool) -> None:
        sandbox: WarmSandbox | None = None
        try:
            async with self._refill:
                if pool.closed:
                    return
                identity = dataclasses.replace(pool.sandbox_spec.identity,
                                               invocation_id=POOL_PREFIX + secrets.token_hex(8))
                spec = dataclasses.replace(pool.sandbox_spec, identity=identity)
                if spec.host is not None:  # a session host: its output ending is what ``alive`` reads
                    host = await self.backend.create_session(spec)
                    self._hosted[host.id] = host
                    sandbox = host
                else:
                    sandbox = await self.backend.create_warm(spec, on_exit=pool.wake.set)
            self._owned.add(sandbox.id)
            if pool.closed:
                await self.retire(sandbox)
                return
            pool.stats.created += 1
            while pool.waiters:  # an invocation waits for this one: straight to it
                waiter = pool.waiters.popleft()
                if not waiter.done() and sandbox.alive:
                    self._claimed_from[sandbox.id] = pool
                    waiter.set_result(sandbox)
                    return
            pool.ready.append(_Entry(sandbox=sandbox, created_at=time.monotonic()))
        except Exception as exc:
            pool.stats.failed += 1
            pool.failing = True
            log.warning("pool %s: could not start a sandbox: %s", pool.tool, exc)
        finally:
            pool.creating -= 1
            pool.wake.set()
