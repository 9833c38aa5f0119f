"""The long-lived supervisor: in-flight invocations, cancellation, start-up and shutdown sweeps.

It owns the live config (swappable on reload; each invocation keeps the config it started with),
the backend and the reaper (every sandbox's removal), and runs each invocation through
``pipeline.run_invocation``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from toolcell import instance, metrics
from toolcell.backends.base import Backend, Removed, Sandbox
from toolcell.errors import (
    ConfigError,
    EngineUnavailable,
    InvocationConflict,
    InvocationNotFound,
    RateLimited,
    SessionNotFound,
    SessionRefused,
    ShuttingDown,
    SourceUnavailable,
)
from toolcell.model import InvocationRequest, Result, SessionPolicy, Tool, ToolSource
from toolcell.pipeline import Emit, Services, run_invocation
from toolcell.policy.annotations import tool_annotations
from toolcell.policy.requests import check_invocation_id
from toolcell.policy.resolve import ResolvedTool
from toolcell.policy.scrub import Redactor
from toolcell.policy.spec import SandboxSpec
from toolcell.pool import PoolManager
from toolcell.quoting import quote
from toolcell.reaper import Reaper
from toolcell.secretstore import SecretStore
from toolcell.sessions.call import SessionCall
from toolcell.sessions.config import hosted, hosted_spec, session_scope
from toolcell.sessions.registry import Session, SessionRegistry, new_session_id
from toolcell.settings import Config
from toolcell.sources.catalog import Catalog, source_tools
from toolcell.sources.discovery import discover_or_error
from toolcell.sources.driver import driver_command
from toolcell.workspace import check_inputs, encode_inputs, payload_cap

log = logging.getLogger("toolcell.supervisor")
# engine.wait_at_start: how often an absent engine is asked again (doubling up to the max).
_ENGINE_POLL_MIN_S = 0.5
_ENGINE_POLL_MAX_S = 5.0



# The bounds of a one-shot call's session (a call with workspace files): one call, then gone.
_ONE_CALL = SessionPolicy(max_calls=1, per_principal=1 << 30)


def new_invocation_id() -> str:
    """128 random bits: unguessable, so one caller cannot address another's run."""
    return "inv_" + secrets.token_hex(16)


@dataclass
class Running:
    invocation_id: str
    tool: str
    owner: str = ""  # the principal that started it: only it may cancel or look it up
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    sandbox: Sandbox | None = None


class Supervisor:
    def __init__(self, config: Config, backend: Backend) -> None:
        config = instance.resolved(config)  # unique by default: several supervisors may share the engine
        self.config = config
        self.backend = backend
        self.secrets: SecretStore | None = None
        # Knows every secret value granted to any tool: used on error messages, spans and logs.
        self.redactor = Redactor()
        # Keyed by (owner, invocation id): a caller-chosen id is scoped to its caller, so another
        # principal's id neither conflicts nor answers (ids do not leak across principals).
        self._running: dict[tuple[str, str], Running] = {}
        self.reaper = Reaper()
        self._closing = False
        self.pools = PoolManager(backend, headroom=self._headroom, reaper=self.reaper,
                                 refill_concurrency=backend.refill_concurrency)
        metrics.watch_pools(self.pools)
        self._idle = asyncio.Event()
        self._idle.set()
        # True while ``engine.wait_at_start`` waits for an absent engine: calls are refused UNAVAILABLE and
        # health says NOT_SERVING until it answered and leftovers were swept. ``on_ready`` runs then.
        self.awaiting_engine = False
        self._absent = ""  # what the engine said when it was found missing at start-up
        self.on_ready: Callable[[], Awaitable[object]] | None = None
        # Called with the invocations whose sandboxes the start-up sweep removed (a previous run crashed).
        self.on_swept: Callable[[list[Removed]], Awaitable[object]] | None = None
        self._waiting: asyncio.Task[None] | None = None
        # Tool sources: the last good discovery of each (kept when a rediscovery of the same definition
        # fails), and why a source serves no tools now.
        self._catalogs: dict[str, tuple[ToolSource, Catalog]] = {}
        self.source_errors: dict[str, str] = {}
        self._sweeping: asyncio.Task[None] | None = None
        self.clock: Callable[[], float] = time.time  # the wall clock leases are compared with
        # Open sessions (issue 18); ``on_session_end`` records each end (the server: audit).
        self.sessions = SessionRegistry(backend, remove=self._remove, on_end=self._session_ended)
        self.on_session_end: Callable[[Session, str], Awaitable[object]] | None = None

    async def start(self) -> int:
        """Check the engine and remove sandboxes a previous run of this instance left behind.

        An unreachable engine is an error (``EngineUnavailable``), unless ``engine.wait_at_start``: then
        the supervisor serves, refusing calls, and keeps asking until the engine answers.
        """
        self._open_secrets(self.config)
        self._check_backend(self.config)
        try:
            await self.backend.ping()
        except EngineUnavailable as exc:
            if not self.config.engine.wait_at_start:
                raise
            log.warning("%s; refusing calls (health NOT_SERVING) until it answers", exc)
            self.awaiting_engine, self._absent = True, str(exc)
            self._waiting = asyncio.ensure_future(self._await_engine())
            return 0
        return await self._engine_up()

    async def _engine_up(self) -> int:
        removed = await self.backend.remove_orphans(self.config.server.instance)
        if removed:
            log.warning("removed %d sandbox(es) left behind by a previous run", len(removed))
        ended = [r for r in removed if r.invocation_id]
        if ended and self.on_swept is not None:  # a crashed run's calls: their end goes on record now
            await self.on_swept(ended)
        await self.sweep_expired()
        if self._sweeping is None:
            self._sweeping = asyncio.ensure_future(self._sweep_periodically())
        self.config = await self.discover_sources(self.config)
        self.pools.configure(self.config)
        self.awaiting_engine = False
        return len(removed)

    async def sweep_expired(self) -> list[Removed]:
        """Remove sandboxes of any supervisor on this engine whose lease ended (``Identity.lease_until``):
        their owner is gone or leaked them. A live peer's sandboxes are within their lease: never touched."""
        removed = await self.backend.remove_expired(self.clock())
        if removed:
            owners = sorted({r.owner for r in removed})
            log.warning("removed %d sandbox(es) whose lease ended (owners: %s)", len(removed), ", ".join(owners[:8]))
        ended = [r for r in removed if r.invocation_id]
        if ended and self.on_swept is not None:
            await self.on_swept(ended)
        return removed

    async def _sweep_periodically(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.config.server.sweep_interval_s)
            try:
                await self.sweep_expired()
            except EngineUnavailable:
                continue
            except Exception:  # the next round tries again
                log.exception("the lease sweep failed")

    async def _await_engine(self) -> None:
        delay = _ENGINE_POLL_MIN_S
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self.backend.ping()
                await self._engine_up()
            except EngineUnavailable:
                delay = min(delay * 2, _ENGINE_POLL_MAX_S)
                continue
            except Exception:  # e.g. the sweep failed: try again, the engine is the backstop's owner
                log.exception("engine answered but the start-up sweep failed; retrying")
                delay = min(delay * 2, _ENGINE_POLL_MAX_S)
                continue
            log.info("the engine answers: serving")
            if self.on_ready is not None:
                await self.on_ready()
            return

    def _open_secrets(self, config: Config) -> None:
        """Open the store and check every granted secret opens now, not at the first call.

        All or nothing: on any error the current store and redactor stay as they were.
        """
        granted = sorted({g.name for t in config.tools.values() for g in t.secrets} |
                         {g.name for src in config.sources.values() for g in src.secrets})
        if config.secrets is None:
            self.secrets, self.redactor = None, Redactor()
            return
        store = SecretStore.open(config.secrets.store, config.environ)
        redactor = Redactor(store.get_many(granted))
        self.secrets, self.redactor = store, redactor

    def _check_backend(self, config: Config) -> None:
        """Every tool's sandbox must be one this backend can make as written (e.g. network grants): a
        ``ConfigError`` naming the tool at start-up or reload, never a weaker sandbox at call time."""
        for name in sorted(config.tools):
            try:
                self.backend.check(config.compile(config.resolve(name), "check"))
            except ConfigError as exc:
                raise ConfigError(f"{exc} (engine.kind {config.engine.kind})", key=exc.key or f"tools.{name}") from exc

    async def discover_sources(self, config: Config) -> Config:
        """``config`` with the tools of every tool source (MCP server), each discovered in a sandbox.

        All sources at once. A source that fails serves no tools (its error, naming it, is logged and kept in
        ``source_errors``), unless its definition is unchanged since a good discovery: then those tools stay.
        A tool this backend cannot run, or that the catalog refused, is left out with its reason logged.
        """
        if not config.sources:
            self.source_errors = {}
            return config
        services = Services(config=config, backend=self.backend, secrets=self.secrets, remove=self._remove,
                            redactor=self.redactor,
                            on_sandbox=lambda sandbox: metrics.active_sandboxes.add(1))
        names = sorted(config.sources)
        found = await asyncio.gather(*(discover_or_error(services, config.sources[n]) for n in names))
        errors: dict[str, str] = {}
        for name, catalog in zip(names, found, strict=True):
            source = config.sources[name]
            if isinstance(catalog, str):
                previous = self._catalogs.get(name)
                if previous is not None and previous[0] == source:
                    log.error("%s; keeping the tools of its last good discovery", catalog)
                    catalog = previous[1]
                else:
                    log.error("%s; its tools are not served", catalog)
                    errors[name] = catalog
                    continue
            self._warn_changed(name, catalog)
            self._catalogs[name] = (source, catalog)
            # Compiling up to 512 of the server's schemas is CPU work: off the event loop.
            made = await asyncio.to_thread(source_tools, source, catalog, config.profiles, driver_command)
            tools = dict(made.tools)
            for tool_name in sorted(tools):
                try:
                    self.backend.check(config.compile(config.resolve_tool(tools[tool_name]), "check"))
                except ConfigError as exc:
                    log.error("tool %s of server %r is not served: %s", tool_name, name, exc)
                    del tools[tool_name]
            for reason in made.skipped:
                log.warning("server %r: a tool is not served: %s", name, reason)
            config = config.with_tools(tools, {n: v for n, v in made.validators.items() if n in tools},
                                       {n: v for n, v in made.output_validators.items() if n in tools})
            log.info("server %r (%s): %d tools", name, catalog.server_info or "?", len(tools))
        self.source_errors = errors
        return config

    def _warn_changed(self, name: str, catalog: Catalog) -> None:
        """A server whose tools changed since its last discovery (a "rug pull": a description rewritten to
        steer the model after it was reviewed) is logged, tool by tool, for the admin to look at."""
        previous = self._catalogs.get(name)
        if previous is None:
            return
        before = {t.name: t for t in previous[1].tools}
        for tool in catalog.tools:
            old = before.get(tool.name)
            if old is not None and old != tool:
                log.warning("server %r: tool %s changed its description or schemas since the last discovery",
                            name, tool.name)
        added = sorted({t.name for t in catalog.tools} - set(before))
        if added:
            log.warning("server %r: new tools since the last discovery: %s", name, ", ".join(added[:20]))

    async def reload(self, config: Config) -> None:
        """Swap the config; in-flight invocations finish under the config they started with.

        ``config`` is already validated (``load_config``); secrets are opened and tool sources discovered
        before the swap, so a failure leaves the running config in place.
        """
        self._open_secrets(config)
        self._check_backend(config)
        if not self.awaiting_engine:  # else discovery runs when the engine answers
            config = await self.discover_sources(config)
        self.config = config
        if not self.awaiting_engine:  # else the pools start when the engine answers
            self.pools.configure(config)

    def session_tools(self, session: Session) -> list[str]:
        """The tools a session serves (the config's now)."""
        return sorted(name for name, t in self.config.tools.items()
                      if t.session is not None and session_scope(t) == session.scope)

    def list_tools(self) -> list[Tool]:
        """Tools with MCP annotations derived from their profile, the admin's overrides on top."""
        return [dataclasses.replace(t, annotations=tool_annotations(t.annotations, self.config.profiles[t.profile]))
                for t in sorted(self.config.tools.values(), key=lambda t: t.name)]

    def _headroom(self) -> int:
        """Sandboxes that may still be started: the global concurrency cap counts live and pooled ones."""
        cap = self.config.security.concurrency.global_max
        idle_sessions = sum(1 for s in self.sessions.sessions() if not s.lock.locked())
        return 1 << 30 if cap is None else cap - self.in_flight - self.pools.pooled - idle_sessions

    @property
    def closing(self) -> bool:
        return self._closing

    def known_tool(self, name: str) -> bool:
        return name in self.config.tools

    def check_source(self, name: str) -> None:
        """``SourceUnavailable`` (naming the server and why) for a tool of a source that failed discovery."""
        error = self.source_errors.get(name.split(".", 1)[0]) if name not in self.config.tools else None
        if error:
            raise SourceUnavailable(f"tool {name.split('.', 1)[0]}.* is unavailable: {error}"[:600])

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def execute(self, request: InvocationRequest, emit: Emit, owner: str = "") -> Result:
        """Run one invocation; the caller (``server/service.py``) accounts for its end, whatever it is."""
        if self._closing:
            raise ShuttingDown()
        if self.awaiting_engine:
            raise EngineUnavailable(f"waiting for the engine (engine.wait_at_start): {self._absent}")
        self.check_source(request.tool)
        invocation_id = request.invocation_id or new_invocation_id()
        check_invocation_id(invocation_id, required=True)  # the edge's own check (callers other than gRPC too)
        key = (owner, invocation_id)
        if key in self._running:
            raise InvocationConflict("this invocation id is already running")
        session = self._session_for(request, owner)
        running = Running(invocation_id=invocation_id, tool=request.tool, owner=owner)
        self._running[key] = running
        if self._headroom() < 0:
            self.pools.shed()
        self._idle.clear()

        def on_sandbox(sandbox: Sandbox) -> None:
            metrics.active_sandboxes.add(1)
            if self._running.get(key) is running:
                running.sandbox = sandbox
            else:  # created after the call was abandoned
                self._track(sandbox)

        services = Services(config=self.config, backend=self.backend, secrets=self.secrets,
                            on_sandbox=on_sandbox, remove=self._remove, redactor=self.redactor,
                            claim=self.pools.claim_soon)
        tool = self.config.tools.get(request.tool)
        is_hosted = session is not None or (tool is not None and hosted(tool))
        calls: list[SessionCall] = []
        if is_hosted:
            def on_call(sandbox: Sandbox) -> None:  # counted as the session's sandbox, not per call
                if self._running.get(key) is running:
                    running.sandbox = sandbox

            async def claim(spec: SandboxSpec) -> SessionCall:
                nonlocal session
                if session is None:  # a one-shot call of a hosted tool: a session of one call
                    session = await self._open(self.config.resolve(request.tool), spec, owner,
                                               invocation_id, ephemeral=True)
                calls.append(self._call(session, request))
                return calls[-1]

            services = dataclasses.replace(services, on_sandbox=on_call, claim=claim, remove=self._remove_call)
        locked = False
        try:
            if session is not None:
                await session.lock.acquire()
                locked = True
                if session.ended:
                    raise SessionNotFound(f"the session has ended ({session.ended})")
            return await run_invocation(services, request, invocation_id, emit, running.cancelled)
        finally:
            if session is not None:
                await self.sessions.after_call(session, calls[0] if calls else None)
            if locked and session is not None:
                session.lock.release()
            if self._running.get(key) is running:
                del self._running[key]
            if not self._running:
                self._idle.set()

    # --- sessions (issue 18) ---------------------------------------------------------------------------

    def _session_for(self, request: InvocationRequest, owner: str) -> Session | None:
        """The caller's session the request names (checked), and its input files against the tool's workspace."""
        session = self.sessions.get(owner, request.session_id) if request.session_id else None
        if session is not None:
            tool = self.config.tools.get(request.tool)
            if tool is None or session_scope(tool) != session.scope:
                raise SessionRefused(f"the session is for tool {quote(session.tool)}"
                                     + (" and its server's tools under its profile" if session.scope != session.tool
                                        else "") + f", not {quote(request.tool)}")
        if request.files:
            tool = self.config.tools.get(request.tool)
            if tool is None or tool.workspace is None:
                raise SessionRefused(f"tool {quote(request.tool)} takes no files (it has no workspace)")
            check_inputs(request.files, tool.workspace)
        return session

    def _call(self, session: Session, request: InvocationRequest) -> SessionCall:
        workspace = session.workspace
        return session.call(files_cap=payload_cap(workspace) if workspace is not None else 0,
                            inputs=encode_inputs(request.files) if request.files else [],
                            collect=bool(workspace is not None and workspace.outputs))

    async def _open(self, resolved: ResolvedTool, spec: SandboxSpec, owner: str, session_id: str, *,
                    ephemeral: bool = False, release: Callable[[], None] = lambda: None,
                    principal: object = None) -> Session:
        policy = resolved.tool.session
        lifetime = policy.max_lifetime_s if policy is not None and not ephemeral else 0.0
        run = hosted_spec(resolved.tool, spec, lifetime)
        # Warm when the tool's pool has one (made for the longest session it may serve); else made now.
        sandbox = await self.pools.claim_hosted(run) or await self.sessions.create(run)
        metrics.active_sandboxes.add(1)
        session = Session(id=session_id, owner=owner, tool=resolved.tool.name, profile=resolved.profile.name,
                          policy=policy if policy is not None else _ONE_CALL, workspace=resolved.tool.workspace,
                          sandbox=sandbox, opened_at=self.sessions.clock(), release=release, ephemeral=ephemeral,
                          principal=principal, scope=session_scope(resolved.tool))
        self.sessions.add(session)
        return session

    async def open_session(self, tool: str, owner: str, *, release: Callable[[], None] = lambda: None,
                           principal: object = None) -> Session:
        """Open a session of ``tool`` for ``owner``: its sandbox is created and started now."""
        if self._closing:
            raise ShuttingDown()
        if self.awaiting_engine:
            raise EngineUnavailable(f"waiting for the engine (engine.wait_at_start): {self._absent}")
        self.check_source(tool)
        resolved = self.config.resolve(tool)
        policy = resolved.tool.session
        if policy is None:
            raise SessionRefused(f"tool {quote(tool)} does not allow sessions")
        if self.sessions.count(owner, session_scope(resolved.tool)) >= policy.per_principal:
            raise RateLimited(f"at most {policy.per_principal} open sessions of tool {quote(tool)} per caller",
                              retry_after_ms=int(min(policy.idle_ttl_s, 60.0) * 1000))
        session_id = new_session_id()
        spec = self.config.compile(resolved, session_id)
        return await self._open(resolved, spec, owner, session_id, release=release, principal=principal)

    async def close_session(self, session_id: str, owner: str) -> Session:
        """Close one of ``owner``'s sessions (after the call it is running, if any): its sandbox is removed."""
        session = self.sessions.get(owner, session_id)
        async with session.lock:
            await self.sessions.end(session, "closed")
        return session

    async def _remove_call(self, sandbox: Sandbox) -> None:
        """A session call's end: its sandbox is the session's (``after_call`` decides)."""
        if not isinstance(sandbox, SessionCall):
            await self._remove(sandbox)

    async def _session_ended(self, session: Session, reason: str) -> None:
        if self.on_session_end is not None and not session.ephemeral:
            await self.on_session_end(session, reason)

    async def cancel(self, invocation_id: str, owner: str | None = None) -> None:
        """Cancel a run; with ``owner``, only the owner's (another's run looks exactly like no run)."""
        if owner is not None:
            running = self._running.get((owner, invocation_id))
        else:  # the operator (no owner): any principal's run with this id
            running = next((r for (_, rid), r in self._running.items() if rid == invocation_id), None)
        if running is None:
            raise InvocationNotFound("no running invocation with this id")
        running.cancelled.set()

    def _track(self, sandbox: Sandbox) -> None:
        """A sandbox created after its call was abandoned: the reaper's at once."""
        self.reaper.remove(sandbox, done=lambda: metrics.active_sandboxes.add(-1))

    async def _remove(self, sandbox: Sandbox) -> None:
        """A call's (or a session's) sandbox at its end: pooled ones are retired off the critical path; others
        are removed now (the first try; while the engine is away the reaper retries and the call ends UNAVAILABLE)."""
        if self.pools.owns(sandbox):
            metrics.active_sandboxes.add(-1)
            self.pools.retire(sandbox)
            return
        await self.reaper.remove_now(sandbox, done=lambda: metrics.active_sandboxes.add(-1))

    async def drain(self, grace_s: float) -> bool:
        """Refuse new invocations; wait up to ``grace_s`` for the running ones. True when none is left."""
        self._closing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        return not self._running

    def cancel_all(self) -> int:
        """Cancel every running invocation (each ends with status ``killed``); returns how many."""
        self._closing = True
        for running in list(self._running.values()):
            running.cancelled.set()
        return len(self._running)

    async def shutdown(self) -> None:
        """Cancel what is still running, end every session, wait for removals, then sweep by owner."""
        self.cancel_all()
        await self.sessions.close("shutdown")
        if self._sweeping is not None:
            self._sweeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeping
        if self._waiting is not None:
            self._waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._waiting
        # Bounded: an unreachable engine must not hold shutdown for minutes.
        await self.reaper.drain(self.config.server.shutdown_grace_s + 5.0)
        await self.pools.close()
        self.reaper.abandon()
        try:
            await self.backend.remove_orphans(self.config.server.instance)
        except Exception:
            log.exception("final sandbox sweep failed")
