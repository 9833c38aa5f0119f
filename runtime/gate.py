"""The gate every call passes before and after the supervisor: authorise, limit, admit, audit.

    peer refusal budget -> authenticate -> authorise (deny by default) -> rate limit -> concurrency cap
        -> host admission -> run -> audit end

Each step decides at once and records its decision in the audit trail; only the admission queue
waits, and only as long as the config allows. No grpc here: the server maps the errors.

Refusals cost the attacker, not the supervisor. The server calls, per request, with the peer key its
transport proved (``uid:1000`` on the Unix socket, ``ip:1.2.3.4`` or ``cert:CN`` over TCP):

    await gate.check_peer(peer)     first, before authentication: raises RateLimited when the peer's
                                    refusal budget is spent (no audit record each time: one
                                    ``refusals_suppressed`` record per peer per ``SUPPRESS_WINDOW_S``)
    gate.refused(peer, exc)         on every refusal: charges the budget when ``exc`` is one of
                                    ``REFUSALS`` (unauthenticated, denied, invalid, not found)
    await gate.flush_refusals()     at shutdown, before the audit log closes: the pending counts
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

from toolcell.access_settings import SecuritySettings
from toolcell.audit import AuditLog, sha256_text
from toolcell.errors import (
    HostOverloaded,
    InvalidArguments,
    InvocationConflict,
    InvocationNotFound,
    PermissionDenied,
    RateLimited,
    SessionNotFound,
    ToolNotFound,
    Unauthenticated,
)
from toolcell.model import InputFile, Result, Status
from toolcell.policy.access import Action, Principal
from toolcell.policy.limits import (
    MAX_PEERS,
    AdmissionSpec,
    Clock,
    ConcurrencyLimiter,
    HostSample,
    KnownTool,
    RateLimiter,
    RefusalLimiter,
    admission_check,
    bounded_key,
)

Sampler = Callable[[], HostSample]

# The refusals that spend a peer's budget: the caller's own doing, cheap to send, work for us.
REFUSALS: tuple[type[BaseException], ...] = (Unauthenticated, PermissionDenied, InvalidArguments, ToolNotFound,
                                             InvocationNotFound, InvocationConflict, SessionNotFound)
# At most one ``refusals_suppressed`` record per peer per window.
SUPPRESS_WINDOW_S = 60.0
# Where the counts of peers forgotten by the bounded table go.
OTHER_PEERS = "<other peers>"


@dataclasses.dataclass
class _Suppressed:
    count: int = 0
    since: float = 0.0  # wall time of the first refusal counted
    written: float = float("-inf")  # monotonic time of the last record


class Gate:
    def __init__(self, security: SecuritySettings, *, audit: AuditLog | None = None,
                 sampler: Sampler | None = None, clock: Clock = time.monotonic,
                 known_tool: KnownTool | None = None, wall: Clock = time.time) -> None:
        """``known_tool``: is this name a tool of the live config (``Supervisor.known_tool``)? Only those
        get per-tool buckets and counters; without it any name may, in a smaller bounded table."""
        self.security = security
        self.policy = security.policy
        self.audit = audit
        self.clock = clock
        self.wall = wall
        self.rates = RateLimiter(security.per_principal, security.per_tool, dict(security.tool_buckets), clock=clock,
                                 known_tool=known_tool)
        self.concurrency = ConcurrencyLimiter(security.concurrency, known_tool=known_tool)
        self.refusals = RefusalLimiter(security.refusals_per_peer, clock=clock)
        self.suppressed: OrderedDict[str, _Suppressed] = OrderedDict()
        self.admission: AdmissionSpec = security.admission
        self.sampler = sampler
        self.waiting = 0

    # --- refusals per peer ---------------------------------------------------------------------------

    async def check_peer(self, peer: str) -> None:
        """Raise ``RateLimited`` at once when ``peer`` has spent its refusal budget; call before any work.

        Refusals made here are counted, not recorded one by one: the first of a window writes a
        ``refusals_suppressed`` record with the count since the last one, the rest wait for the next.
        """
        refusal = self.refusals.check(peer)
        if refusal is None:
            return
        key = bounded_key(peer)
        entry = self.suppressed.get(key)
        if entry is None:
            entry = self.suppressed[key] = _Suppressed(since=self.wall())
            while len(self.suppressed) > MAX_PEERS:
                _, gone = self.suppressed.popitem(last=False)
                if gone.count:
                    other = self.suppressed.setdefault(OTHER_PEERS, _Suppressed(since=gone.since))
                    other.count += gone.count
        self.suppressed.move_to_end(key)
        if entry.count == 0:
            entry.since = self.wall()
        entry.count += 1
        now = self.clock()
        if now - entry.written >= SUPPRESS_WINDOW_S:
            await self._write_suppressed(key, entry, now)
        raise RateLimited(refusal.reason, refusal.retry_after_ms)

    def refused(self, peer: str, exc: BaseException | None = None) -> None:
        """Charge ``peer`` one refusal when ``exc`` is None or one of ``REFUSALS`` (others are ignored)."""
        if exc is None or isinstance(exc, REFUSALS):
            self.refusals.charge(peer)

    async def flush_refusals(self) -> None:
        """Write the pending ``refusals_suppressed`` counts (at shutdown, before the audit log closes)."""
        now = self.clock()
        for key, entry in list(self.suppressed.items()):
            if entry.count:
                await self._write_suppressed(key, entry, now)

    async def _write_suppressed(self, key: str, entry: _Suppressed, now: float) -> None:
        count, since = entry.count, entry.since
        entry.count, entry.written = 0, now
        await self.record(None, "refusals_suppressed", peer=key, count=count, since=round(since, 3),
                          window_s=SUPPRESS_WINDOW_S, status="RESOURCE_EXHAUSTED")

    def state_sizes(self) -> dict[str, int]:
        """Entries held by each limiter table: bounded whatever callers send (for tests and figures)."""
        return {"rate_buckets": len(self.rates), "refusal_peers": len(self.refusals),
                "suppressed_peers": len(self.suppressed), "in_flight_principals": len(self.concurrency.by_principal),
                "in_flight_tools": len(self.concurrency.by_tool)}

    # --- decisions -----------------------------------------------------------------------------------

    async def record(self, principal: Principal | None, event: str, **fields: Any) -> None:
        if self.audit is not None:
            who = principal.describe() if principal is not None else {"id": "unknown"}
            await self.audit.append({"event": event, "principal": who, **fields})

    async def authorize(self, principal: Principal, action: Action, tool: str, trace_id: str = "") -> None:
        if not self.policy.allows(principal, action, tool):
            await self.record(principal, "decision", action=action, tool=tool, decision="deny",
                              status="PERMISSION_DENIED", trace_id=trace_id)
            raise PermissionDenied.to(action, tool)

    async def visible(self, principal: Principal, names: Iterable[str]) -> list[str]:
        shown = self.policy.visible(principal, names)
        await self.record(principal, "decision", action="list", decision="allow", tools_visible=len(shown))
        return shown

    async def _host_ready(self) -> str:
        """'' when the host may take a new sandbox, else the reason; waits in the bounded queue."""
        if self.sampler is None or not self.admission.enabled:
            return ""
        reason = admission_check(self.sampler(), self.admission)
        if not reason or self.admission.queue <= self.waiting:
            return reason
        self.waiting += 1
        try:
            deadline = time.monotonic() + self.admission.max_wait_s
            while time.monotonic() < deadline:
                await asyncio.sleep(min(self.admission.poll_s, max(0.0, deadline - time.monotonic())))
                reason = admission_check(self.sampler(), self.admission)
                if not reason:
                    return ""
            return f"{reason}; waited {self.admission.max_wait_s:g}s"
        finally:
            self.waiting -= 1

    async def session_slot(self, principal: Principal, tool: str, trace_id: str = "") -> Callable[[], None]:
        """Opening a session: rate limit, a concurrency slot held for the session's whole life (its sandbox
        exists all along), host admission. Returns the slot's release (idempotent)."""
        key = principal.id
        counted_as = self.concurrency.tool_key(tool)
        refusal = self.rates.try_acquire(key, tool) or self.concurrency.try_acquire(key, tool, counted_as)
        if refusal is not None:
            await self.record(principal, "decision", action="session", tool=tool, decision="refuse",
                              status="RESOURCE_EXHAUSTED", reason=refusal.reason,
                              retry_after_ms=refusal.retry_after_ms, trace_id=trace_id)
            raise RateLimited(refusal.reason, refusal.retry_after_ms)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.concurrency.release(key, tool, counted_as)

        try:
            reason = await self._host_ready()
            if reason:
                await self.record(principal, "decision", action="session", tool=tool, decision="refuse",
                                  status="RESOURCE_EXHAUSTED", reason=reason, trace_id=trace_id)
                raise HostOverloaded(reason, max(1000, int(self.admission.max_wait_s * 1000)))
        except BaseException:
            release()
            raise
        return release

    @contextlib.asynccontextmanager
    async def admit(self, principal: Principal, tool: str, trace_id: str = "", *,
                    in_session: bool = False) -> AsyncIterator[None]:
        """Rate limit, concurrency cap, host admission; the slot is held for the block's duration.

        ``in_session``: a call in the caller's open session, whose slot the session holds for its life (its
        sandbox exists already): rate limited, not counted twice."""
        key = principal.id

        async def refuse(reason: str, retry_ms: int, overloaded: bool = False) -> None:
            await self.record(principal, "decision", action="call", tool=tool, decision="refuse",
                              status="RESOURCE_EXHAUSTED", reason=reason, retry_after_ms=retry_ms, trace_id=trace_id)
            cls = HostOverloaded if overloaded else RateLimited
            raise cls(reason, retry_ms)

        counted_as = self.concurrency.tool_key(tool)  # fixed for the slot's life, whatever a reload changes
        refusal = self.rates.try_acquire(key, tool) or \
            (None if in_session else self.concurrency.try_acquire(key, tool, counted_as))
        if refusal is not None:
            await refuse(refusal.reason, refusal.retry_after_ms)
        try:
            reason = "" if in_session else await self._host_ready()
            if reason:
                await refuse(reason, max(1000, int(self.admission.max_wait_s * 1000)), overloaded=True)
            await self.record(principal, "decision", action="call", tool=tool, decision="allow", trace_id=trace_id)
            yield
        finally:
            if not in_session:
                self.concurrency.release(key, tool, counted_as)

    async def invocation_end(self, principal: Principal | None, tool: str, arguments_json: str, *,
                             result: Result | None = None, status: str = "", profile: str = "",
                             duration_ms: int = 0, trace_id: str = "", invocation_id: str = "",
                             ending: str = "", injection_action: str = "", sandbox_id: str = "",
                             session_id: str = "", input_files: Sequence[InputFile] = ()) -> None:
        """One record per invocation end, whatever ended it: sizes and SHA-256, never payloads.

        ``ending`` is one of ``ENDINGS`` (``toolcell.endings``; default: ``result`` with a result, else ``error``);
        ``status`` is the result's status or the gRPC code name / ending otherwise. With a result, the
        record carries the prompt-injection verdict: markers by kind and the action taken
        (``injection_action``, the profile's ``output.injection``; inferred from the result when empty).
        """
        fields: dict[str, Any] = {
            "tool": tool, "arguments_bytes": len(arguments_json.encode("utf-8", "surrogatepass")),
            "arguments_sha256": sha256_text(arguments_json),
            "ending": ending or ("result" if result is not None else "error"),
        }
        if result is not None:
            fields.update(_result_fields(result))
            fields["profile"] = profile
            fields["injection"] = injection_verdict(result, injection_action)
        else:
            fields.update(status=status, duration_ms=duration_ms, trace_id=trace_id)
            if profile:
                fields["profile"] = profile
            if sandbox_id:
                fields["sandbox_id"] = sandbox_id
        if invocation_id and "invocation_id" not in fields:
            fields["invocation_id"] = invocation_id
        if session_id:
            fields["session_id"] = session_id
        if input_files:  # names and contents are the caller's: their hashes and sizes only (large: off the loop)
            large = sum(len(f.data) for f in input_files) > _INLINE_HASH_BYTES
            fields["input_files"] = await asyncio.to_thread(_digests, input_files) if large else _digests(input_files)
        if result is not None and result.files:
            fields["output_files"] = [{"path_sha256": sha256_text(f.path), "size": f.size, "truncated": f.truncated}
                                      for f in result.files]
        await self.record(principal, "invocation_end", **fields)

    async def sweep_end(self, invocation_id: str, tool: str, owner_instance: str, *, sandbox_id: str = "",
                        profile: str = "") -> None:
        """The end of an invocation whose supervisor died: its sandbox was removed by the start-up sweep."""
        fields: dict[str, Any] = {"tool": tool, "ending": "swept", "status": "swept", "invocation_id": invocation_id,
                                  "owner_instance": owner_instance}
        if sandbox_id:
            fields["sandbox_id"] = sandbox_id
        if profile:
            fields["profile"] = profile
        await self.record(None, "invocation_end", **fields)

    async def cancel_decision(self, principal: Principal, invocation_id: str, allowed: bool) -> None:
        await self.record(principal, "decision", action="cancel", invocation_id=invocation_id,
                          decision="allow" if allowed else "deny", status="OK" if allowed else "NOT_FOUND")


# Input files up to this many bytes in all are hashed on the event loop (well under a millisecond).
_INLINE_HASH_BYTES = 256 * 1024


def _digests(files: Sequence[InputFile]) -> list[dict[str, Any]]:
    return [{"path_sha256": sha256_text(f.path), "bytes": len(f.data), "sha256": hashlib.sha256(f.data).hexdigest()}
            for f in files]


def injection_verdict(r: Result, action: str = "") -> dict[str, Any]:
    """Markers found by kind and what was done: none, flag, wrap or block."""
    markers = dict(r.injection_markers)
    if not markers:
        return {"markers": {}, "action": "none"}
    if not action:
        if r.status is Status.DENIED and r.message.startswith("output withheld"):
            action = "block"
        elif r.output.startswith("<untrusted-tool-output "):
            action = "wrap"
        else:
            action = "flag"
    return {"markers": markers, "action": action}


def _result_fields(r: Result) -> Mapping[str, Any]:
    egress = {"egress": [dataclasses.asdict(d) for d in r.egress]} if r.egress else {}
    return {**egress,
        "invocation_id": r.invocation_id, "status": r.status.value, "exit_code": r.exit_code,
        "duration_ms": r.duration_ms, "peak_memory_bytes": r.usage.peak_memory_bytes,
        "cpu_time_ns": r.usage.cpu_time_ns, "stdout_bytes": r.stdout_bytes, "stderr_bytes": r.stderr_bytes,
        "output_sha256": sha256_text(r.output), "stderr_sha256": sha256_text(r.stderr),
        "truncated": r.truncated, "trace_id": r.trace_id, "sandbox_id": r.sandbox_id,
        "redactions": dict(r.redactions), "sanitized": dict(r.sanitized),
    }
