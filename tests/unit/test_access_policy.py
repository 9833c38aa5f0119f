"""Pure access policy: rules deny by default; buckets, caps and admission decide exactly."""

from __future__ import annotations

import pytest

from toolcell.policy.access import AccessPolicy, Match, PeerCred, Principal, Rule, parse_rules
from toolcell.policy.limits import (
    AdmissionSpec,
    BucketSpec,
    ConcurrencyLimiter,
    ConcurrencySpec,
    HostSample,
    RateLimiter,
    admission_check,
)

ALICE = Principal(subject="alice", issuer="https://idp", scopes=frozenset({"tools:text"}), groups=frozenset({"dev"}))
BOB = Principal(subject="bob", issuer="https://idp")
UID_1000 = Principal(peer=PeerCred(uid=1000, gid=1000, pid=42))
CERT_SVC = Principal(cert_names=("svc-a", "spiffe://example.org/svc-a"))
ANON = Principal()

POLICY = AccessPolicy(rules=parse_rules([
    {"match": {"scope": "tools:text"}, "tools": ["text.*"]},
    {"match": [{"uid": 1000}, {"cert": "spiffe://example.org/svc-a"}], "tools": ["*"], "actions": ["call"]},
    {"match": {"group": "dev"}, "tools": ["python.run"], "actions": ["list"]},
]))


@pytest.mark.parametrize(("principal", "action", "tool", "allowed"), [
    (ALICE, "call", "text.wordcount", True),
    (ALICE, "list", "text.wordcount", True),
    (ALICE, "call", "python.run", False),     # only listed for group dev
    (ALICE, "list", "python.run", True),
    (BOB, "call", "text.wordcount", False),   # authenticated, but no rule: deny by default
    (BOB, "list", "text.wordcount", False),
    (UID_1000, "call", "python.run", True),
    (UID_1000, "list", "python.run", False),  # call-only rule
    (CERT_SVC, "call", "text.wordcount", True),
    (ANON, "call", "text.wordcount", False),
])
def test_rule_matrix(principal: Principal, action: str, tool: str, allowed: bool) -> None:
    """Each row is a decision of the policy; nothing not granted is allowed."""
    assert POLICY.allows(principal, action, tool) is allowed  # type: ignore[arg-type]


def test_empty_match_is_any_authenticated_caller_but_never_anonymous() -> None:
    policy = AccessPolicy(rules=(Rule(match=(Match(),)),))
    assert policy.allows(BOB, "call", "x")
    assert not policy.allows(ANON, "call", "x")


def test_empty_policy_denies_everything() -> None:
    assert not AccessPolicy().allows(ALICE, "call", "text.wordcount")
    assert AccessPolicy().visible(ALICE, ["a", "b"]) == []


def test_owner_only_default() -> None:
    policy = AccessPolicy.owner_only(1000)
    assert policy.allows(UID_1000, "call", "anything")
    assert not policy.allows(Principal(peer=PeerCred(1001, 1000, 1)), "call", "anything")
    assert policy.missing(ALICE) == ["peer"]
    assert policy.missing(UID_1000) == []


def test_principal_id_is_stable_across_processes_of_one_caller() -> None:
    a = Principal(peer=PeerCred(1000, 1000, 1))
    b = Principal(peer=PeerCred(1000, 1000, 2))
    assert a.id == b.id == "uid:1000"
    assert ALICE.id == "sub:https://idp#alice"
    assert ANON.id == "anonymous"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_burst_then_refill_exactly() -> None:
    clock = FakeClock()
    limiter = RateLimiter(BucketSpec(rate=2.0, burst=5), None, clock=clock)
    results = [limiter.try_acquire("alice", "t") for _ in range(8)]
    assert sum(r is None for r in results) == 5
    refused = [r for r in results if r is not None]
    assert len(refused) == 3
    assert refused[0].retry_after_ms == 500  # one token at 2/s
    clock.now += 1.0  # two tokens back
    assert [limiter.try_acquire("alice", "t") is None for _ in range(3)] == [True, True, False]
    assert limiter.try_acquire("bob", "t") is None  # a separate bucket per principal


def test_tool_bucket_shared_across_principals_and_override() -> None:
    clock = FakeClock()
    limiter = RateLimiter(None, BucketSpec(rate=1.0, burst=2), {"slow": BucketSpec(rate=0.5, burst=1)}, clock=clock)
    assert [limiter.try_acquire(p, "t") is None for p in ("a", "b", "c")] == [True, True, False]
    assert limiter.try_acquire("a", "slow") is None
    refusal = limiter.try_acquire("b", "slow")
    assert refusal is not None and refusal.retry_after_ms == 2000 and "'slow'" in refusal.reason


def test_refused_call_takes_no_token_from_the_other_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(BucketSpec(rate=1.0, burst=10), BucketSpec(rate=1.0, burst=1),
                          {"u": BucketSpec(rate=1.0, burst=100)}, clock=clock)
    assert limiter.try_acquire("a", "t") is None
    assert limiter.try_acquire("a", "t") is not None  # tool 't' empty
    # 'a' still has 9 tokens: the refused call took none.
    assert [limiter.try_acquire("a", "u") is None for _ in range(10)] == [True] * 9 + [False]


def test_concurrency_caps_global_principal_tool() -> None:
    caps = ConcurrencyLimiter(ConcurrencySpec(global_max=3, per_principal=2, per_tool=2))
    assert caps.try_acquire("a", "x") is None
    assert caps.try_acquire("a", "y") is None
    assert "this caller" in caps.try_acquire("a", "z").reason  # type: ignore[union-attr]
    assert caps.try_acquire("b", "x") is None
    assert "too many invocations in flight (limit 3)" in caps.try_acquire("c", "z").reason  # type: ignore[union-attr]
    caps.release("a", "y")
    assert "'x'" in caps.try_acquire("c", "x").reason  # type: ignore[union-attr]
    assert caps.try_acquire("c", "z") is None
    for p, t in (("a", "x"), ("b", "x"), ("c", "z")):
        caps.release(p, t)
    assert caps.total == 0 and caps.by_principal == {} and caps.by_tool == {}


def test_admission_thresholds() -> None:
    spec = AdmissionSpec(min_available_memory_bytes=512 * 2**20, max_cpu_percent=90)
    assert admission_check(HostSample(2**30, 50.0), spec) == ""
    assert "short of memory (100 MiB available, 512 MiB required)" in admission_check(HostSample(100 * 2**20, 5), spec)
    assert "CPU is busy (97% > 90%)" in admission_check(HostSample(2**30, 97.0), spec)
    assert not AdmissionSpec().enabled
