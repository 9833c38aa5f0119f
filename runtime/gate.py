"""The gate every call passes before and after the supervisor: authorise, limit, admit, audit.

    authorise (deny by default) -> rate limit -> concurrency cap -> host admission -> run -> audit end

Each step decides at once and records its decision in the audit trail; only the admission queue
waits, and only as long as the config allows. No grpc here: the server maps the errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from runtime.access_settings import SecuritySettings
from runtime.audit import AuditLog, sha256_text
from runtime.errors import HostOverloaded, PermissionDenied, RateLimited
from runtime.model import Result
from runtime.policy.access import Action, Principal
from runtime.policy.limits import (
    AdmissionSpec,
    Clock,
    ConcurrencyLimiter,
    HostSample,
    RateLimiter,
    admission_check,
)

Sampler = Callable[[], HostSample]


class Gate:
    def __init__(self, security: SecuritySettings, *, audit: AuditLog | None = None,
                 sampler: Sampler | None = None, clock: Clock = time.monotonic) -> None:
        self.security = security
        self.policy = security.policy
        self.audit = audit
        self.rates = RateLimiter(security.per_principal, security.per_tool, dict(security.tool_buckets), clock=clock)
        self.concurrency = ConcurrencyLimiter(security.concurrency)
        self.admission: AdmissionSpec = security.admission
        self.sampler = sampler
        self.waiting = 0

    async def record(self, principal: Principal | None, event: str, **fields: Any) -> None:
        if self.audit is not None:
            who = principal.describe() if principal is not None else {"id": "unknown"}
            await self.audit.append({"event": event, "principal": who, **fields})

    async def authorize(self, principal: Principal, action: Action, tool: str, trace_id: str = "") -> None:
        if not self.policy.allows(principal, action, tool):
            await self.record(principal, "decision", action=action, tool=tool, decision="deny",
                              status="PERMISSION_DENIED", trace_id=trace_id)
            raise PermissionDenied(f"not permitted to {action} tool {tool!r}")

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

    @contextlib.asynccontextmanager
    async def admit(self, principal: Principal, tool: str, trace_id: str = "") -> AsyncIterator[None]:
        """Rate limit, concurrency cap, host admission; the slot is held for the block's duration."""
        key = principal.id

        async def refuse(reason: str, retry_ms: int, overloaded: bool = False) -> None:
            await self.record(principal, "decision", action="call", tool=tool, decision="refuse",
                              status="RESOURCE_EXHAUSTED", reason=reason, retry_after_ms=retry_ms, trace_id=trace_id)
            cls = HostOverloaded if overloaded else RateLimited
            raise cls(reason, retry_ms)

        refusal = self.rates.try_acquire(key, tool) or self.concurrency.try_acquire(key, tool)
        if refusal is not None:
            await refuse(refusal.reason, refusal.retry_after_ms)
        try:
            reason = await self._host_ready()
            if reason:
                await refuse(reason, max(1000, int(self.admission.max_wait_s * 1000)), overloaded=True)
            await self.record(principal, "decision", action="call", tool=tool, decision="allow", trace_id=trace_id)
            yield
        finally:
            self.concurrency.release(key, tool)

    async def invocation_end(self, principal: Principal, tool: str, arguments_json: str, *,
                             result: Result | None = None, status: str = "", profile: str = "",
                             duration_ms: int = 0, trace_id: str = "") -> None:
        """One record per invocation end: sizes and SHA-256 of arguments and output, never payloads."""
        fields: dict[str, Any] = {
            "tool": tool, "arguments_bytes": len(arguments_json.encode()),
            "arguments_sha256": sha256_text(arguments_json),
        }
        if result is not None:
            fields.update(_result_fields(result))
            fields["profile"] = profile
        else:
            fields.update(status=status, duration_ms=duration_ms, trace_id=trace_id)
        await self.record(principal, "invocation_end", **fields)

    async def cancel_decision(self, principal: Principal, invocation_id: str, allowed: bool) -> None:
        await self.record(principal, "decision", action="cancel", invocation_id=invocation_id,
                          decision="allow" if allowed else "deny", status="OK" if allowed else "NOT_FOUND")


def _result_fields(r: Result) -> Mapping[str, Any]:
    egress = {"egress": [dataclasses.asdict(d) for d in r.egress]} if r.egress else {}
    return {**egress,
        "invocation_id": r.invocation_id, "status": r.status.value, "exit_code": r.exit_code,
        "duration_ms": r.duration_ms, "peak_memory_bytes": r.usage.peak_memory_bytes,
        "cpu_time_ns": r.usage.cpu_time_ns, "stdout_bytes": r.stdout_bytes, "stderr_bytes": r.stderr_bytes,
        "output_sha256": sha256_text(r.output), "stderr_sha256": sha256_text(r.stderr),
        "truncated": r.truncated, "trace_id": r.trace_id, "sandbox_id": r.sandbox_id,
        "redactions": dict(r.redactions),
    }
