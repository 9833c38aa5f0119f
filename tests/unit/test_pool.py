"""Warm pools over the fake backend: single use, refill, fallback, TTL, death, back-off, reload, config.

The orchestration only; the same behaviours run against the real engine in
tests/integration/test_pool.py.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from toolcell.backends.fake import FakeBackend, FakeProcess
from toolcell.errors import ConfigError, EngineUnavailable
from toolcell.model import Event, InvocationRequest, Result, Started, Status
from toolcell.pipeline import compile_step, resolve
from toolcell.policy.spec import Scratch, fingerprint
from toolcell.settings import PoolSpec, parse_config
from toolcell.supervisor import Supervisor


async def echo(proc: FakeProcess) -> int:
    await proc.stdout(json.loads(proc.stdin)["text"].encode())
    return 0


async def sleeper(proc: FakeProcess) -> int:
    await asyncio.sleep(3600)
    return 0


def doc(size: int = 2, ttl: str = "5m", **tool_extra: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "server": {"instance": "unit-pool"},
        "profiles": {"default": {"timeout": "2s", "kill_grace": "100ms"}},
        "tools": [
            {"name": "echo", "description": "echo", "image": "echo", "command": ["run"],
             "pool": {"size": size, "ttl": ttl}, **tool_extra},
            {"name": "sleeper", "description": "sleeps", "image": "sleeper", "command": ["run"],
             "pool": {"size": 1}},
            {"name": "cold", "description": "no pool", "image": "echo", "command": ["run"]},
        ],
    }


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def started(backend: FakeBackend | None = None, **kw: Any) -> tuple[Supervisor, FakeBackend]:
    backend = backend or FakeBackend({"echo": echo, "sleeper": sleeper})
    sup = Supervisor(parse_config(doc(**kw)), backend)
    await sup.start()
    await eventually(lambda: sup.pools.ready("echo") == sup.config.pools["echo"].size)
    return sup, backend


async def call(sup: Supervisor, tool: str = "echo", text: str = "hi") -> tuple[Result, str]:
    events: list[Event] = []

    async def emit(e: Event) -> None:
        events.append(e)

    result = await sup.execute(InvocationRequest(tool=tool, arguments_json=json.dumps({"text": text})), emit)
    return result, next(e.sandbox_id for e in events if isinstance(e, Started))


async def test_a_pooled_sandbox_serves_exactly_one_invocation_then_goes() -> None:
    sup, backend = await started()
    ready = {e.sandbox.id for e in sup.pools._pools["echo"].ready}
    first, id1 = await call(sup)
    second, id2 = await call(sup)
    assert first.status is Status.OK and first.output == "hi" and second.output == "hi"
    assert {id1, id2} <= ready and id1 != id2, "each call gets its own pre-started sandbox"
    await eventually(lambda: id1 in backend.removed and id2 in backend.removed)
    assert sup.pools.stats()["echo"].hits == 2
    await sup.shutdown()
    assert backend.live == []


async def test_the_pool_refills_after_claims() -> None:
    sup, backend = await started()
    await call(sup)
    await call(sup)
    await eventually(lambda: sup.pools.ready("echo") == 2)
    assert len(backend.warm_created) >= 5  # 2 echo + 1 sleeper at start, 2 refills
    await sup.shutdown()
    assert backend.live == []


async def test_an_empty_pool_falls_back_to_the_cold_path() -> None:
    sup, backend = await started(size=1)
    results = await asyncio.gather(*(call(sup, text=f"t{i}") for i in range(4)))
    assert [r.output for r, _ in results] == ["t0", "t1", "t2", "t3"]
    assert all(r.status is Status.OK for r, _ in results)
    stats = sup.pools.stats()["echo"]
    assert stats.hits == 1 and stats.misses == 3
    cold = [sid for _, sid in results if sid not in backend.warm_created]
    assert len(cold) == 3
    await sup.shutdown()
    assert backend.live == []


async def test_a_tool_without_a_pool_is_always_cold() -> None:
    sup, backend = await started()
    _, sid = await call(sup, tool="cold")
    assert sid not in backend.warm_created
    await sup.shutdown()


async def test_ttl_recycles_unused_sandboxes() -> None:
    sup, backend = await started(ttl="200ms")
    first = {e.sandbox.id for e in sup.pools._pools["echo"].ready}
    await eventually(lambda: first <= set(backend.removed), timeout=5)
    await eventually(lambda: sup.pools.ready("echo") == 2)
    assert not first & {e.sandbox.id for e in sup.pools._pools["echo"].ready}
    assert sup.pools.stats()["echo"].recycled >= 2
    await sup.shutdown()
    assert backend.live == []


async def test_a_sandbox_that_dies_before_its_claim_is_replaced_and_never_handed_out() -> None:
    sup, backend = await started()
    victims = [e.sandbox.id for e in sup.pools._pools["echo"].ready]
    for sid in victims:
        backend.sandbox(sid).died()
    result, sid = await call(sup)
    assert result.status is Status.OK and sid not in victims
    await eventually(lambda: sup.pools.ready("echo") == 2 and set(victims) <= set(backend.removed))
    await sup.shutdown()
    assert backend.live == []


async def test_creation_failures_back_off_and_recover_when_the_engine_returns() -> None:
    sup, backend = await started()
    for entry in list(sup.pools._pools["echo"].ready):
        entry.sandbox.died()
    backend.available = False  # the engine restarts ...
    await eventually(lambda: sup.pools.stats()["echo"].failed >= 1)
    with pytest.raises(EngineUnavailable):  # meanwhile a call takes the cold path, which fails clearly
        await call(sup)
    backend.available = True  # ... and comes back: the pool is rebuilt
    await eventually(lambda: sup.pools.ready("echo") == 2, timeout=10)
    result, sid = await call(sup)
    assert result.status is Status.OK and sid in backend.warm_created
    await sup.shutdown()
    assert backend.live == []


async def test_reload_resizes_and_a_changed_tool_drains_its_pool() -> None:
    sup, backend = await started()
    old = {e.sandbox.id for e in sup.pools._pools["echo"].ready}
    await sup.reload(parse_config(doc(size=3)))
    await eventually(lambda: sup.pools.ready("echo") == 3)
    assert old <= {e.sandbox.id for e in sup.pools._pools["echo"].ready}, "a resize keeps what is there"
    await sup.reload(parse_config(doc(size=1)))
    await eventually(lambda: sup.pools.ready("echo") == 1)
    changed = doc(size=2)
    changed["tools"][0]["command"] = ["run", "--changed"]
    kept = {e.sandbox.id for e in sup.pools._pools["echo"].ready}
    await sup.reload(parse_config(changed))
    await eventually(lambda: sup.pools.ready("echo") == 2 and kept <= set(backend.removed))
    assert all(backend.specs[e.sandbox.id].command == ("run", "--changed") for e in sup.pools._pools["echo"].ready)
    await sup.shutdown()
    assert backend.live == []


async def test_timeout_on_the_warm_path_is_enforced_as_on_the_cold_path() -> None:
    sup, backend = await started()
    await eventually(lambda: sup.pools.ready("sleeper") == 1)
    events: list[Event] = []

    async def emit(e: Event) -> None:
        events.append(e)

    result = await sup.execute(InvocationRequest(tool="sleeper", arguments_json="{}"), emit)
    sid = next(e.sandbox_id for e in events if isinstance(e, Started))
    assert sid in backend.warm_created
    assert result.status is Status.TIMEOUT and result.exit_code == 128 + signal.SIGTERM
    await sup.shutdown()
    assert backend.live == []


async def test_shutdown_removes_every_pooled_sandbox_even_while_creating() -> None:
    gate = asyncio.Event()
    backend = FakeBackend({"echo": echo, "sleeper": sleeper})
    original = backend.create_warm

    async def slow(plan: Any, on_exit: Callable[[], None], **kw: Any) -> Any:
        await gate.wait()
        return await original(plan, on_exit, **kw)

    backend.create_warm = slow  # type: ignore[method-assign]
    sup = Supervisor(parse_config(doc()), backend)
    await sup.start()
    await asyncio.sleep(0.05)
    closing = asyncio.ensure_future(sup.shutdown())
    await asyncio.sleep(0.05)
    gate.set()
    await closing
    assert backend.live == []


def test_pool_config_tool_overrides_profile_and_secrets_come_with_the_claim() -> None:
    d = doc()
    d["profiles"]["default"]["pool"] = {"size": 4, "ttl": "30s"}
    d["secrets"] = {"store": "/nonexistent/store.json"}
    d["tools"].append({"name": "secretive", "description": "s", "image": "echo", "command": ["run"],
                       "secrets": [{"name": "k", "env": "K"}]})
    d["tools"].append({"name": "filed", "description": "s", "image": "echo", "command": ["run"],
                       "secrets": [{"name": "k", "env": "K"}, {"name": "k", "file": "/run/secrets/k"}]})
    config = parse_config(d)
    assert config.pools["echo"] == PoolSpec(size=2, ttl_s=300.0)
    assert config.pools["cold"] == PoolSpec(size=4, ttl_s=30.0), "the profile's pool applies"
    assert config.pools["secretive"] == PoolSpec(size=4, ttl_s=30.0), "env secrets come with the claim"
    assert config.pools["filed"] == PoolSpec(size=4, ttl_s=30.0), "files too, into the sandbox's own tmpfs"


def test_a_secret_file_in_a_system_directory_is_a_config_error() -> None:
    """Secret files arrive in an empty tmpfs at their directory: over /etc it would hide the image's files."""
    d = doc()
    d["secrets"] = {"store": "/nonexistent/store.json"}
    d["tools"].append({"name": "etc", "description": "s", "image": "echo", "command": ["run"],
                       "secrets": [{"name": "k", "file": "/etc/k"}]})
    with pytest.raises(ConfigError, match=r"must be its own .* not /etc") as err:
        parse_config(d)
    assert err.value.key == "tools[3].secrets"


def test_a_spec_covers_each_secret_files_directory_with_the_users_own_scratch() -> None:
    d = doc()
    d["secrets"] = {"store": "/nonexistent/store.json"}
    d["tools"].append({"name": "filed", "description": "s", "image": "echo", "command": ["run"],
                       "secrets": [{"name": "a", "file": "/run/secrets/a"}, {"name": "b", "file": "/run/secrets/b"},
                                   {"name": "c", "file": "/var/run/app/c"}, {"name": "d", "env": "D"}]})
    config = parse_config(d)
    spec = compile_step(config, resolve(config, "filed"), "inv_a", None)
    covered = {s.path: s for s in spec.scratch if s.path != "/tmp"}
    assert covered == {d: Scratch(d, 1024 * 1024, 0o700, 10001, 10001) for d in ("/run/secrets", "/var/run/app")}
    assert spec.defer and "D" not in spec.env, "secrets are never in the spec: the start brings them"


def test_fingerprint_ignores_the_invocation_and_timeout_only() -> None:
    config = parse_config(doc())
    resolved = resolve(config, "echo")
    a = compile_step(config, resolved, "inv_a", None)
    b = compile_step(config, resolved, "inv_b", 0.5)
    assert fingerprint(a) == fingerprint(b)
    changed = parse_config({**doc(), "profiles": {"default": {"timeout": "2s", "memory": "64Mi"}}})
    assert fingerprint(compile_step(changed, resolve(changed, "echo"), "inv_a", None)) != fingerprint(a)



async def test_pooled_sandboxes_count_against_the_concurrency_cap() -> None:
    """Live calls keep their share: with the cap reached, idle pooled sandboxes are given back."""
    d = doc(size=2)
    d["tools"][1].pop("pool")  # sleeper: cold
    d["rate_limits"] = {"concurrency": {"global": 3}}
    backend = FakeBackend({"echo": echo, "sleeper": sleeper})
    sup = Supervisor(parse_config(d), backend)
    await sup.start()
    await eventually(lambda: sup.pools.ready("echo") == 2)

    async def emit(e: Event) -> None:
        pass

    sleepers = [asyncio.ensure_future(sup.execute(InvocationRequest(tool="sleeper", arguments_json="{}"), emit))
                for _ in range(2)]
    await eventually(lambda: sup.in_flight == 2)
    await eventually(lambda: len(backend.live) <= 3 and sup.pools.ready("echo") == 1)
    await asyncio.sleep(0.6)  # the pool does not grow back while the cap is reached
    assert len(backend.live) <= 3 and sup.pools.ready("echo") == 1
    for task in sleepers:  # the sleepers time out (2s); then the pool refills
        await task
    await eventually(lambda: sup.pools.ready("echo") == 2)
    await sup.shutdown()
    assert backend.live == []


def test_pools_larger_than_the_concurrency_cap_are_refused() -> None:
    d = doc(size=3)
    d["rate_limits"] = {"concurrency": {"global": 3}}
    with pytest.raises(ConfigError, match="count against it"):
        parse_config(d)


@pytest.mark.parametrize("wait", [False, True])
async def test_an_absent_engine_at_start_is_an_error_or_waited_for(wait: bool) -> None:
    backend = FakeBackend({"echo": echo, "sleeper": sleeper}, available=False)
    sup = Supervisor(parse_config({**doc(), "engine": {"wait_at_start": wait}}), backend)
    if not wait:
        with pytest.raises(EngineUnavailable):
            await sup.start()
        return
    assert await sup.start() == 0 and sup.awaiting_engine
    with pytest.raises(EngineUnavailable, match="waiting for the engine"):
        await call(sup)
    assert backend.created == [], "no sandbox, no pool before the engine answers"
    ready = asyncio.Event()
    sup.on_ready = lambda: asyncio.sleep(0, result=ready.set())
    backend.available = True
    await asyncio.wait_for(ready.wait(), timeout=5)
    assert not sup.awaiting_engine
    await eventually(lambda: sup.pools.ready("echo") == 2)
    result, _ = await call(sup)
    assert result.status is Status.OK
    await sup.shutdown()
    assert backend.live == []


# -- claim_soon: an empty pool with creations in flight is waited for, not doubled with a cold one -----------

def gated(backend: FakeBackend) -> asyncio.Event:
    """Hold every pooled creation until the returned event is set (a loaded host's slow creation)."""
    gate = asyncio.Event()
    original = backend.create_warm

    async def slow(spec: Any, on_exit: Callable[[], None]) -> Any:
        await gate.wait()
        return await original(spec, on_exit)

    backend.create_warm = slow  # type: ignore[method-assign]
    return gate


async def test_an_empty_pool_with_a_creation_in_flight_serves_the_call_from_it() -> None:
    sup, backend = await started(size=1)
    gate = gated(backend)
    await call(sup)  # takes the one ready sandbox; its refill now waits at the gate
    await eventually(lambda: sup.pools._pools["echo"].creating == 1)
    waiting = asyncio.ensure_future(call(sup, text="served warm"))
    await asyncio.sleep(0.05)
    assert not waiting.done() and len(sup.pools._pools["echo"].waiters) == 1
    cold_before = len(backend.created) - len(backend.warm_created)
    gate.set()
    result, sid = await waiting
    assert result.output == "served warm" and sid in backend.warm_created
    assert len(backend.created) - len(backend.warm_created) == cold_before, "no cold sandbox was made"
    stats = sup.pools.stats()["echo"]
    assert (stats.hits, stats.misses) == (2, 0)
    await sup.shutdown()
    assert backend.live == []


async def test_callers_beyond_the_creations_in_flight_go_cold_at_once() -> None:
    sup, backend = await started(size=1)
    gate = gated(backend)
    await call(sup)
    await eventually(lambda: sup.pools._pools["echo"].creating == 1)
    first = asyncio.ensure_future(call(sup, text="waits"))
    await asyncio.sleep(0.02)
    result, sid = await asyncio.wait_for(call(sup, text="cold"), timeout=1.0)  # nothing left to wait for
    assert result.output == "cold" and sid not in backend.warm_created
    gate.set()
    assert (await first)[0].output == "waits"
    await sup.shutdown()
    assert backend.live == []


async def test_a_late_creation_sends_the_waiting_call_cold_and_joins_the_pool() -> None:
    sup, backend = await started(size=1)
    gate = gated(backend)
    await call(sup)
    await eventually(lambda: sup.pools._pools["echo"].creating == 1)
    result = await sup.pools.claim_soon(sup.config.compile(sup.config.resolve("echo"), "inv_x"), wait_s=0.05)
    assert result is None, "not ready within the wait: the call goes cold"
    assert sup.pools._pools["echo"].waiters == collections.deque()
    gate.set()
    await eventually(lambda: sup.pools.ready("echo") == 1)  # the late one is not lost: it is pooled
    await sup.shutdown()
    assert backend.live == []


async def test_a_sandbox_handed_to_a_cancelled_waiter_is_removed_not_leaked() -> None:
    sup, backend = await started(size=1)
    gate = gated(backend)
    await call(sup)
    await eventually(lambda: sup.pools._pools["echo"].creating == 1)
    spec = sup.config.compile(sup.config.resolve("echo"), "inv_y")
    waiting = asyncio.ensure_future(sup.pools.claim_soon(spec, wait_s=5))
    await asyncio.sleep(0.02)
    gate.set()
    await asyncio.sleep(0)  # the creation finishes and hands its sandbox over ...
    waiting.cancel()  # ... to a call that is being cancelled
    try:
        handed = await waiting
    except asyncio.CancelledError:  # cancelled in time: the sandbox went back to the reaper
        handed = None
    else:  # the call had already taken it: it is the call's to use and hand back, as the pipeline does
        assert handed is not None
        sup.pools.retire(handed)
    await eventually(lambda: sup.pools.ready("echo") == 1 and len(backend.live) == 2)  # + the sleeper's
    await sup.shutdown()
    assert backend.live == []


async def test_a_waiter_dropped_after_its_handover_gives_the_sandbox_to_the_reaper() -> None:
    """The cancelled branch of ``claim_soon``, driven directly (the race is one loop iteration wide)."""
    sup, backend = await started(size=1)
    pool = sup.pools._pools["echo"]
    sandbox = pool.ready.popleft().sandbox
    waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    waiter.set_result(sandbox)
    pool.waiters.append(waiter)
    assert sup.pools._drop_waiter(pool, waiter, keep=False) is None
    assert not pool.waiters
    await eventually(lambda: sandbox.id in backend.removed)
    await sup.shutdown()
    assert backend.live == []
