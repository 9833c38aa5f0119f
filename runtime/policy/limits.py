"""Rate limits, concurrency caps and admission thresholds as plain data and logic. Pure.

Every decision is immediate: a caller over a limit is told so (with a retry hint) and never waits,
except in the admission queue, whose length and wait time are bounded by the config.
The clock is injectable so tests can drive time exactly.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]

# How many distinct principals/tools keep a bucket; the least recently used are forgotten first
# (a forgotten bucket restarts full, which only ever errs towards the configured burst).
MAX_BUCKETS = 10_000
# Retry hint for a concurrency cap: nothing tells us when a running invocation will end.
CONCURRENCY_RETRY_S = 1.0


@dataclass(frozen=True)
class BucketSpec:
    rate: float  # tokens per second
    burst: int  # bucket size

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")


@dataclass
class TokenBucket:
    spec: BucketSpec
    tokens: float
    stamp: float

    def _refill(self, now: float) -> None:
        self.tokens = min(float(self.spec.burst), self.tokens + max(0.0, now - self.stamp) * self.spec.rate)
        self.stamp = now

    def wait_for_one(self, now: float) -> float:
        """Seconds until one token is available (0 when one is available now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.spec.rate

    def take(self) -> None:
        self.tokens -= 1.0


@dataclass(frozen=True)
class Refusal:
    """Why a call was refused, and when a retry may succeed."""

    reason: str
    retry_after_s: float

    @property
    def retry_after_ms(self) -> int:
        return max(1, math.ceil(self.retry_after_s * 1000))


class RateLimiter:
    """Token buckets per principal and per tool; a call takes one token from each, or none."""

    def __init__(self, per_principal: BucketSpec | None, per_tool: BucketSpec | None,
                 tool_overrides: dict[str, BucketSpec] | None = None, clock: Clock = time.monotonic) -> None:
        self.per_principal = per_principal
        self.per_tool = per_tool
        self.tool_overrides = dict(tool_overrides or {})
        self.clock = clock
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()

    def _bucket(self, kind: str, key: str, spec: BucketSpec, now: float) -> TokenBucket:
        bucket = self._buckets.get((kind, key))
        if bucket is None or bucket.spec != spec:
            bucket = TokenBucket(spec, float(spec.burst), now)
            self._buckets[(kind, key)] = bucket
            while len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end((kind, key))
        return bucket

    def try_acquire(self, principal: str, tool: str) -> Refusal | None:
        now = self.clock()
        checks: list[tuple[str, TokenBucket]] = []
        if self.per_principal is not None:
            checks.append(("caller", self._bucket("principal", principal, self.per_principal, now)))
        tool_spec = self.tool_overrides.get(tool, self.per_tool)
        if tool_spec is not None:
            checks.append((f"tool {tool!r}", self._bucket("tool", tool, tool_spec, now)))
        waits = [(what, b.wait_for_one(now)) for what, b in checks]
        blocked = [(what, w) for what, w in waits if w > 0]
        if blocked:
            what, wait = max(blocked, key=lambda x: x[1])
            return Refusal(f"rate limit of the {what} exceeded", wait)
        for _, b in checks:
            b.take()
        return None


@dataclass(frozen=True)
class ConcurrencySpec:
    global_max: int | None = None
    per_principal: int | None = None
    per_tool: int | None = None


class ConcurrencyLimiter:
    """Counts invocations in flight: globally, per principal, per tool. acquire/release in pairs."""

    def __init__(self, spec: ConcurrencySpec) -> None:
        self.spec = spec
        self.total = 0
        self.by_principal: dict[str, int] = {}
        self.by_tool: dict[str, int] = {}

    def try_acquire(self, principal: str, tool: str) -> Refusal | None:
        s = self.spec
        if s.global_max is not None and self.total >= s.global_max:
            return Refusal(f"too many invocations in flight (limit {s.global_max})", CONCURRENCY_RETRY_S)
        if s.per_principal is not None and self.by_principal.get(principal, 0) >= s.per_principal:
            return Refusal(f"too many invocations in flight for this caller (limit {s.per_principal})",
                           CONCURRENCY_RETRY_S)
        if s.per_tool is not None and self.by_tool.get(tool, 0) >= s.per_tool:
            return Refusal(f"too many invocations of {tool!r} in flight (limit {s.per_tool})", CONCURRENCY_RETRY_S)
        self.total += 1
        self.by_principal[principal] = self.by_principal.get(principal, 0) + 1
        self.by_tool[tool] = self.by_tool.get(tool, 0) + 1
        return None

    def release(self, principal: str, tool: str) -> None:
        self.total -= 1
        for counts, key in ((self.by_principal, principal), (self.by_tool, tool)):
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]


@dataclass(frozen=True)
class HostSample:
    available_memory_bytes: int
    cpu_percent: float


@dataclass(frozen=True)
class AdmissionSpec:
    """Host thresholds below which no new sandbox starts; ``queue`` callers may wait up to ``max_wait_s``."""

    min_available_memory_bytes: int = 0
    max_cpu_percent: float | None = None
    queue: int = 0
    max_wait_s: float = 0.0
    poll_s: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.min_available_memory_bytes > 0 or self.max_cpu_percent is not None


def admission_check(sample: HostSample, spec: AdmissionSpec) -> str:
    """'' when the host can take a new sandbox, else the reason it can't (numbers, no secrets)."""
    if sample.available_memory_bytes < spec.min_available_memory_bytes:
        return (f"host is short of memory ({sample.available_memory_bytes // 2**20} MiB available, "
                f"{spec.min_available_memory_bytes // 2**20} MiB required)")
    if spec.max_cpu_percent is not None and sample.cpu_percent > spec.max_cpu_percent:
        return f"host CPU is busy ({sample.cpu_percent:.0f}% > {spec.max_cpu_percent:.0f}%)"
    return ""
