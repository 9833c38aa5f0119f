"""Limiter state stays bounded whatever callers send; refusals are counted per peer (pure, fake clock)."""

from __future__ import annotations

import tracemalloc

import pytest

from toolcell.policy.limits import (
    MAX_KEY_CHARS,
    MAX_TOOL_BUCKETS,
    UNKNOWN_TOOL,
    BucketSpec,
    ConcurrencyLimiter,
    ConcurrencySpec,
    RateLimiter,
    RefusalLimiter,
    bounded_key,
)

MB_NAME = "a." * (2**19)  # 1 MiB, the shape that once backtracked in the redactor


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


CATALOGUE = {"text.echo", "python.run"}


@pytest.mark.parametrize(("key", "kept_whole"), [
    ("uid:1000", True),
    ("x" * MAX_KEY_CHARS, True),
    ("x" * (MAX_KEY_CHARS + 1), False),
    (MB_NAME, False),
    ("\ud800" * 1000, False),  # a lone surrogate hashes (surrogatepass), never raises
])
def test_bounded_key(key: str, kept_whole: bool) -> None:
    bounded = bounded_key(key)
    assert (bounded == key) is kept_whole
    assert len(bounded) <= 32 + len("#sha256:") + 64
    assert bounded_key(key + "y") != bounded  # distinct keys stay distinct


def test_caller_over_its_limit_creates_no_tool_bucket() -> None:
    """The issue's attack: 60 requests with 1 MB names, the caller's bucket is checked first."""
    limiter = RateLimiter(BucketSpec(rate=0.01, burst=2), BucketSpec(rate=1.0, burst=5), clock=FakeClock())
    outcomes = [limiter.try_acquire("uid:1000", f"{n}{MB_NAME}") is None for n in range(60)]
    assert outcomes == [True, True] + [False] * 58
    # One caller bucket plus the two tool buckets of the two calls that passed, keyed by a bounded key.
    assert len(limiter) == 3
    assert all(len(key) <= 104 for key in limiter.tools.buckets)


@pytest.mark.parametrize(("tool", "gets_bucket"), [
    ("text.echo", True),       # a tool of the config
    ("slow", True),            # a name with its own configured bucket
    ("no.such.tool", False),   # the same probe, not configured: no bucket, the call is not limited by one
    (MB_NAME, False),
])
def test_only_configured_tools_get_buckets(tool: str, gets_bucket: bool) -> None:
    limiter = RateLimiter(None, BucketSpec(rate=0.01, burst=1), {"slow": BucketSpec(rate=0.01, burst=1)},
                          clock=FakeClock(), known_tool=CATALOGUE.__contains__)
    first, second = limiter.try_acquire("a", tool), limiter.try_acquire("b", tool)
    assert first is None
    assert (second is not None) is gets_bucket  # with a bucket of 1, the second call is refused
    assert len(limiter.tools) == int(gets_bucket)


def test_without_a_catalogue_tool_buckets_are_capped() -> None:
    limiter = RateLimiter(None, BucketSpec(rate=1.0, burst=1), clock=FakeClock())
    for n in range(MAX_TOOL_BUCKETS * 3):
        limiter.try_acquire("a", f"tool-{n}-" + "z" * 200)
    assert len(limiter.tools) == MAX_TOOL_BUCKETS


def test_limiter_memory_after_the_attack_is_small() -> None:
    """Before: 60 x 1 MB names left ~123 MiB of keys. After: a few hundred bytes per request at most."""
    limiter = RateLimiter(BucketSpec(rate=1.0, burst=100), BucketSpec(rate=1.0, burst=100), clock=FakeClock())
    names = [f"{n}{MB_NAME}" for n in range(60)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for name in names:
        limiter.try_acquire("uid:1000", name)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(limiter) == 61
    assert grown < 200 * 1024, grown


@pytest.mark.parametrize(("tool", "key"), [
    ("text.echo", "text.echo"),
    ("no.such.tool", UNKNOWN_TOOL),
    (MB_NAME, UNKNOWN_TOOL),
])
def test_concurrency_counts_unknown_names_under_one_key(tool: str, key: str) -> None:
    caps = ConcurrencyLimiter(ConcurrencySpec(per_tool=1), known_tool=CATALOGUE.__contains__)
    assert caps.try_acquire("p" * 10_000, tool) is None
    assert list(caps.by_tool) == [key]
    assert all(len(k) <= 104 for k in caps.by_principal)
    refusal = caps.try_acquire("other", tool)
    assert refusal is not None and len(refusal.reason) < 120
    caps.release("p" * 10_000, tool)
    assert caps.total == 0 and caps.by_principal == {} and caps.by_tool == {}


def test_refusal_budget_per_peer_burst_then_refill() -> None:
    clock = FakeClock()
    limiter = RefusalLimiter(BucketSpec(rate=2.0, burst=3), clock=clock)
    assert limiter.check("uid:1000") is None  # never refused: no state at all
    assert len(limiter) == 0
    for _ in range(3):
        assert limiter.check("uid:1000") is None
        limiter.charge("uid:1000")
    refusal = limiter.check("uid:1000")
    assert refusal is not None and refusal.retry_after_ms == 500
    assert limiter.check("uid:1001") is None  # the same probe from another peer: allowed
    clock.now += 0.5
    assert limiter.check("uid:1000") is None  # one refusal's worth refilled
    limiter.charge("uid:1000")
    assert limiter.check("uid:1000") is not None


@pytest.mark.parametrize(("spec", "charges", "refused"), [
    (BucketSpec(rate=5.0, burst=20), 19, False),
    (BucketSpec(rate=5.0, burst=20), 20, True),
    (BucketSpec(rate=5.0, burst=20), 10_000, True),  # charges beyond empty cost nothing more to hold
    (None, 10_000, False),  # refusals_per_peer: off
])
def test_refusal_budget_table(spec: BucketSpec | None, charges: int, refused: bool) -> None:
    limiter = RefusalLimiter(spec, clock=FakeClock())
    for _ in range(charges):
        limiter.charge("ip:192.0.2.7")
    assert (limiter.check("ip:192.0.2.7") is not None) is refused
    assert len(limiter) == (0 if spec is None else 1)


def test_refusal_table_is_lru_bounded_and_keys_bounded() -> None:
    limiter = RefusalLimiter(BucketSpec(rate=1.0, burst=1), clock=FakeClock(), max_peers=4)
    for n in range(10):
        limiter.charge(f"cert:{n}" + "c" * 100_000)
    assert len(limiter) == 4
    assert all(len(k) <= 104 for k in limiter.peers.buckets)
    assert limiter.check("cert:9" + "c" * 100_000) is not None  # the most recent are kept
    assert limiter.check("cert:0" + "c" * 100_000) is None  # forgotten: starts with a full burst


def test_a_reload_between_acquire_and_release_keeps_the_counts_right() -> None:
    catalogue = {"text.echo"}
    caps = ConcurrencyLimiter(ConcurrencySpec(per_tool=1), known_tool=catalogue.__contains__)
    key = caps.tool_key("text.echo")
    assert caps.try_acquire("a", "text.echo", key) is None
    catalogue.clear()  # reload: the tool is gone while its call runs
    assert caps.try_acquire("b", "text.echo", caps.tool_key("text.echo")) is None  # now counted as unknown
    caps.release("a", "text.echo", key)
    assert caps.by_tool == {UNKNOWN_TOOL: 1}
    caps.release("b", "text.echo", UNKNOWN_TOOL)
    assert caps.total == 0 and caps.by_tool == {} and caps.by_principal == {}
