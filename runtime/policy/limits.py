"""Rate limits, concurrency caps and admission thresholds as plain data and logic. Pure.

Every decision is immediate: a caller over a limit is told so (with a retry hint) and never waits,
except in the admission queue, whose length and wait time are bounded by the config.
The clock is injectable so tests can drive time exactly.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]
# "Is this name a tool of the live config?" (the supervisor answers; it follows reloads).
KnownTool = Callable[[str], bool]

# How many distinct principals/tools keep a bucket; the least recently used are forgotten first
# (a forgotten bucket restarts full, which only ever errs towards the configured burst).
MAX_BUCKETS = 10_000
# Without a catalogue (``known_tool`` None) every name may get a tool bucket: far fewer of them.
MAX_TOOL_BUCKETS = 1024
# Peers whose refusals are counted; the least recently refused are forgotten first.
MAX_PEERS = 4096
# Keys longer than this are stored as a short prefix plus their SHA-256: a key costs at most ~130 bytes.
MAX_KEY_CHARS = 64
# Every name the caller sent that is not a tool of the config shares this key (no bucket of its own).
UNKNOWN_TOOL = "<unknown tool>"


def bounded_key(key: str) -> str:
    """``key`` itself when short, else its first characters plus its SHA-256 (distinct keys stay distinct)."""
    if len(key) <= MAX_KEY_CHARS:
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{key[:32]}#sha256:{digest}"
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


class _Lru:
    """Buckets by key, the least recently used forgotten first beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def get(self, key: str, spec: BucketSpec, now: float) -> TokenBucket:
        bucket = self.buckets.get(key)
        if bucket is None or bucket.spec != spec:
            bucket = TokenBucket(spec, float(spec.burst), now)
            self.buckets[key] = bucket
            while len(self.buckets) > self.limit:
                self.buckets.popitem(last=False)
        self.buckets.move_to_end(key)
        return bucket

    def __len__(self) -> int:
        return len(self.buckets)


class RateLimiter:
    """Token buckets per principal and per tool; a call takes one token from each, or none.

    The caller's own bucket is checked first: a caller over its limit creates no other state. Tool
    buckets exist only for tools of the config (``known_tool``) and the names in ``tool_overrides``;
    any other name (the call fails NOT_FOUND later) gets none. Without ``known_tool`` any name may get
    one, in a separate LRU of ``MAX_TOOL_BUCKETS``. Keys are bounded (``bounded_key``).
    """

    def __init__(self, per_principal: BucketSpec | None, per_tool: BucketSpec | None,
                 tool_overrides: dict[str, BucketSpec] | None = None, clock: Clock = time.monotonic,
                 known_tool: KnownTool | None = None) -> None:
        self.per_principal = per_principal
        self.per_tool = per_tool
        self.tool_overrides = dict(tool_overrides or {})
        self.clock = clock
        self.known_tool = known_tool
        self.principals = _Lru(MAX_BUCKETS)
        self.tools = _Lru(MAX_BUCKETS if known_tool is not None else MAX_TOOL_BUCKETS)

    def _tool_key(self, tool: str) -> str | None:
        """The tool's bucket key, or None when this name gets no tool bucket."""
        if tool in self.tool_overrides:
            return tool
        if self.per_tool is None:
            return None
        if self.known_tool is not None:
            return tool if self.known_tool(tool) else None
        return bounded_key(tool)

    def try_acquire(self, principal: str, tool: str) -> Refusal | None:
        now = self.clock()
        caller = None
        if self.per_principal is not None:
            caller = self.principals.get(bounded_key(principal), self.per_principal, now)
            wait = caller.wait_for_one(now)
            if wait > 0:
                return Refusal("rate limit of the caller exceeded", wait)
        key = self._tool_key(tool)
        spec = self.tool_overrides.get(tool, self.per_tool)
        if key is not None and spec is not None:
            bucket = self.tools.get(key, spec, now)
            wait = bucket.wait_for_one(now)
            if wait > 0:
                return Refusal(f"rate limit of the tool {key!r} exceeded", wait)
            bucket.take()
        if caller is not None:
            caller.take()
        return None

    def __len__(self) -> int:
        """Buckets held (principals + tools): bounded whatever callers send."""
        return len(self.principals) + len(self.tools)


@dataclass(frozen=True)
class ConcurrencySpec:
    global_max: int | None = None
    per_principal: int | None = None
    per_tool: int | None = None


class ConcurrencyLimiter:
    """Counts invocations in flight: globally, per principal, per tool. acquire/release in pairs.

    Entries exist only while something is in flight; keys are bounded (``bounded_key``) and every
    name that is not a tool of the config (``known_tool``) shares one key, ``UNKNOWN_TOOL``.
    """

    def __init__(self, spec: ConcurrencySpec, known_tool: KnownTool | None = None) -> None:
        self.spec = spec
        self.known_tool = known_tool
        self.total = 0
        self.by_principal: dict[str, int] = {}
        self.by_tool: dict[str, int] = {}

    def tool_key(self, tool: str) -> str:
        """The key ``tool`` is counted under now; pass it to ``try_acquire`` and ``release`` so that a
        reload between the two (a tool added or removed) cannot make them disagree."""
        if self.known_tool is not None and not self.known_tool(tool):
            return UNKNOWN_TOOL
        return bounded_key(tool)

    def try_acquire(self, principal: str, tool: str, tool_key: str | None = None) -> Refusal | None:
        s = self.spec
        who, what = bounded_key(principal), tool_key if tool_key is not None else self.tool_key(tool)
        if s.global_max is not None and self.total >= s.global_max:
            return Refusal(f"too many invocations in flight (limit {s.global_max})", CONCURRENCY_RETRY_S)
        if s.per_principal is not None and self.by_principal.get(who, 0) >= s.per_principal:
            return Refusal(f"too many invocations in flight for this caller (limit {s.per_principal})",
                           CONCURRENCY_RETRY_S)
        if s.per_tool is not None and self.by_tool.get(what, 0) >= s.per_tool:
            return Refusal(f"too many invocations of {what!r} in flight (limit {s.per_tool})", CONCURRENCY_RETRY_S)
        self.total += 1
        self.by_principal[who] = self.by_principal.get(who, 0) + 1
        self.by_tool[what] = self.by_tool.get(what, 0) + 1
        return None

    def release(self, principal: str, tool: str, tool_key: str | None = None) -> None:
        """Undo one ``try_acquire`` that succeeded with the same arguments."""
        self.total -= 1
        what = tool_key if tool_key is not None else self.tool_key(tool)
        for counts, key in ((self.by_principal, bounded_key(principal)), (self.by_tool, what)):
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]


class RefusalLimiter:
    """Refused requests (unauthenticated, unauthorised, invalid, not found) cost the peer a token.

    ``check`` takes nothing and answers at once: a peer whose bucket is empty is refused before any
    expensive work (authentication, validation); ``charge`` takes one token per refusal. The peer
    key is computed by the transport (``uid:1000``, ``ip:1.2.3.4``, ``cert:CN``). State is bounded:
    at most ``max_peers`` buckets (LRU; a forgotten peer starts again with a full burst).
    """

    def __init__(self, spec: BucketSpec | None, clock: Clock = time.monotonic, max_peers: int = MAX_PEERS) -> None:
        self.spec = spec
        self.clock = clock
        self.peers = _Lru(max_peers)

    def check(self, peer: str) -> Refusal | None:
        if self.spec is None:
            return None
        bucket = self.peers.buckets.get(bounded_key(peer))
        if bucket is None:
            return None
        wait = bucket.wait_for_one(self.clock())
        return Refusal("too many refused requests from this peer", wait) if wait > 0 else None

    def charge(self, peer: str) -> None:
        if self.spec is None:
            return
        now = self.clock()
        bucket = self.peers.get(bounded_key(peer), self.spec, now)
        if bucket.wait_for_one(now) == 0.0:
            bucket.take()

    def __len__(self) -> int:
        return len(self.peers)


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
