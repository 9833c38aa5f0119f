"""The long-lived supervisor: in-flight invocations, cancellation, start-up and shutdown sweeps.

It owns the live config (swappable on reload; each invocation keeps the config it started with)
and the backend, and runs each invocation through ``pipeline.run_invocation``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
from dataclasses import dataclass, field

from runtime.backends.base import Backend, Sandbox
from runtime.errors import InvocationConflict, InvocationNotFound, ShuttingDown
from runtime.model import InvocationRequest, Result, Tool
from runtime.pipeline import Emit, Services, run_invocation
from runtime.policy.annotations import tool_annotations
from runtime.policy.scrub import Redactor
from runtime.secretdelivery import SecretDelivery
from runtime.secretstore import SecretStore
from runtime.settings import Config

log = logging.getLogger("toolcell.supervisor")

_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{8,128}$")


def new_invocation_id() -> str:
    """128 random bits: unguessable, so one caller cannot address another's run."""
    return "inv_" + secrets.token_hex(16)


@dataclass
class Running:
    invocation_id: str
    tool: str
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    sandbox: Sandbox | None = None


class Supervisor:
    def __init__(self, config: Config, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self.secrets: SecretStore | None = None
        self.delivery: SecretDelivery | None = None
        # Knows every secret value granted to any tool: used on error messages, spans and logs.
        self.redactor = Redactor()
        self._running: dict[str, Running] = {}
        self._cleanups: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> int:
        """Check the engine and remove sandboxes a previous run of this instance left behind."""
        self._open_secrets(self.config)
        await self.backend.ping()
        removed = await self.backend.remove_orphans(self.config.server.instance)
        if removed:
            log.warning("removed %d sandbox(es) left behind by a previous run", removed)
        return removed

    def _open_secrets(self, config: Config) -> None:
        """Open the store and check every granted secret opens now, not at the first call."""
        granted = sorted({g.name for t in config.tools.values() for g in t.secrets})
        if config.secrets is None:
            self.secrets, self.redactor = None, Redactor()
            return
        self.secrets = SecretStore.open(config.secrets.store, config.environ)
        values = self.secrets.get_many(granted)
        self.redactor = Redactor(values)
        if any(g.file for t in config.tools.values() for g in t.secrets):
            if self.delivery is None or str(self.delivery.files_dir) != config.secrets.files_dir:
                self.delivery = SecretDelivery(config.secrets.files_dir)
            self.delivery.ensure_tmpfs()
        elif self.delivery is None:
            self.delivery = SecretDelivery(config.secrets.files_dir)

    def reload(self, config: Config) -> None:
        """Swap the config; in-flight invocations finish under the config they started with."""
        self._open_secrets(config)
        self.config = config

    def list_tools(self) -> list[Tool]:
        """Tools with MCP annotations derived from their profile, the admin's overrides on top."""
        return [dataclasses.replace(t, annotations=tool_annotations(t.annotations, self.config.profiles[t.profile]))
                for t in sorted(self.config.tools.values(), key=lambda t: t.name)]

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def execute(self, request: InvocationRequest, emit: Emit) -> Result:
        if self._closing:
            raise ShuttingDown()
        invocation_id = request.invocation_id or new_invocation_id()
        if not _ID_PATTERN.match(invocation_id):
            from runtime.errors import InvalidArguments

            raise InvalidArguments("must be 8-128 characters of [A-Za-z0-9_.:-]", path="invocation_id")
        if invocation_id in self._running:
            raise InvocationConflict(f"invocation {invocation_id!r} is already running")
        running = Running(invocation_id=invocation_id, tool=request.tool)
        self._running[invocation_id] = running

        def on_sandbox(sandbox: Sandbox) -> None:
            if invocation_id in self._running:
                running.sandbox = sandbox
            else:  # created after the call was abandoned
                self._track(sandbox)

        services = Services(config=self.config, backend=self.backend, secrets=self.secrets, delivery=self.delivery,
                            on_sandbox=on_sandbox, remove=self._remove, redactor=self.redactor)
        try:
            return await run_invocation(services, request, invocation_id, emit, running.cancelled)
        finally:
            self._running.pop(invocation_id, None)

    async def cancel(self, invocation_id: str) -> None:
        running = self._running.get(invocation_id)
        if running is None:
            raise InvocationNotFound(f"no running invocation {invocation_id!r}")
        running.cancelled.set()

    def _track(self, sandbox: Sandbox) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._remove_quietly(sandbox))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def _remove_quietly(self, sandbox: Sandbox) -> None:
        try:
            await sandbox.remove()
        except Exception:  # the shutdown/start-up sweep by label is the backstop
            log.exception("failed to remove sandbox %s", sandbox.id)

    async def _remove(self, sandbox: Sandbox) -> None:
        await self._track(sandbox)

    async def shutdown(self) -> None:
        """Cancel what is still running, wait for removals, then sweep by label."""
        self._closing = True
        for running in list(self._running.values()):
            running.cancelled.set()
        if self._cleanups:
            await asyncio.gather(*list(self._cleanups), return_exceptions=True)
        try:
            await self.backend.remove_orphans(self.config.server.instance)
        except Exception:
            log.exception("final sandbox sweep failed")
        if self.delivery is not None:
            self.delivery.close()
