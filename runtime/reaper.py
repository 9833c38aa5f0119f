"""Sandbox clean-up, in one place: every removal goes through the ``Reaper``, with bounded retries.

Used to have four owners (the supervisor's retries, the pool's, late sandboxes of abandoned calls, egress
close); now the supervisor, the pools and the pipeline hand sandboxes here and nowhere else::

    reaper.remove(sandbox)             background removal (pool retirements, late sandboxes)
    await reaper.remove_now(sandbox)   a call's own sandbox: waits for the first try only; if the engine is
                                       away, the call ends with EngineUnavailable and retries go on here

While the engine is unreachable (e.g. restarting) a removal is retried with back-off, 0.25 s doubling to
5 s, ``tries`` times (about two minutes by default); then it gives up and says so: the start-up and
shutdown sweeps by owner are the backstop. Any other failure is logged once and left to the sweeps.
At most ``concurrency`` removals talk to the engine at once, so a burst of retirements never starves
the creations of live calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

from toolcell.backends.base import Sandbox
from toolcell.errors import EngineUnavailable

log = logging.getLogger("toolcell.reaper")

TRIES: Final = 30
CONCURRENCY: Final = 8
_BACKOFF_MIN_S: Final = 0.25
_BACKOFF_MAX_S: Final = 5.0


class Reaper:
    def __init__(self, *, tries: int = TRIES, concurrency: int = CONCURRENCY) -> None:
        self._tries = tries
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Removals not finished yet (including those waiting to retry)."""
        return len(self._tasks)

    def remove(self, sandbox: Sandbox, *, delay_s: float = 0.0,
               done: Callable[[], None] = lambda: None) -> asyncio.Task[None]:
        """Remove ``sandbox`` in the background (after ``delay_s``); ``done`` runs when it is over."""
        return self._spawn(sandbox, delay_s, done, None)

    async def remove_now(self, sandbox: Sandbox, *, done: Callable[[], None] = lambda: None) -> None:
        """Remove ``sandbox``, waiting for the first try only. Raises ``EngineUnavailable`` when that try met
        an unreachable engine: the removal goes on in the background, the caller need not wait for it."""
        first: asyncio.Future[EngineUnavailable | None] = asyncio.get_running_loop().create_future()
        task: asyncio.Future[Any] = self._spawn(sandbox, 0.0, done, first)
        waiting: list[asyncio.Future[Any]] = [task, first]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        outcome = first.result() if first.done() else None
        if outcome is not None:
            raise EngineUnavailable(f"{outcome}; the sandbox will be removed when the engine is back")

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every removal in flight; True when none is left."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        return not self._tasks

    def abandon(self) -> None:
        """Stop retrying (shutdown, after ``drain``): what is left is the sweep's."""
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, sandbox: Sandbox, delay_s: float, done: Callable[[], None],
               first: asyncio.Future[EngineUnavailable | None] | None) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._reap(sandbox, delay_s, done, first))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _reap(self, sandbox: Sandbox, delay_s: float, done: Callable[[], None],
                    first: asyncio.Future[EngineUnavailable | None] | None) -> None:
        try:
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            await self._with_retries(sandbox, first)
        finally:
            if first is not None and not first.done():
                first.set_result(None)
            done()

    async def _with_retries(self, sandbox: Sandbox, first: asyncio.Future[EngineUnavailable | None] | None) -> None:
        delay = _BACKOFF_MIN_S
        for attempt in range(self._tries):
            outcome: EngineUnavailable | None = None
            try:
                async with self._slots:
                    await sandbox.remove()
                return
            except EngineUnavailable as exc:
                outcome = exc
                log.warning("engine unavailable; retrying removal of sandbox %s in %.1f s", sandbox.id, delay)
            except Exception:  # the sweeps by owner are the backstop
                log.exception("failed to remove sandbox %s", sandbox.id)
                return
            finally:
                if attempt == 0 and first is not None and not first.done():
                    first.set_result(outcome)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)
        log.error("gave up removing sandbox %s; the next sweep removes it", sandbox.id)
