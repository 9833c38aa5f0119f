"""SessionRegistry and SessionCall (sessions.registry, sessions.call) over a fake session sandbox and a fake
clock: who may address a session, what ends it (and that each end happens once), and one call's view of the
sandbox's shared output, cut at its trailers."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import pytest

from toolcell.backends.base import Backend, ExitInfo, HostedSandbox, StreamName
from toolcell.errors import EngineUnavailable, SessionNotFound
from toolcell.model import EgressDestination, SessionPolicy, Usage
from toolcell.policy.spec import NO_SECRETS, Secrets
from toolcell.sessions import registry as registry_module
from toolcell.sessions.call import SessionCall, SessionOutput
from toolcell.sessions.host import SESSION_OVER
from toolcell.sessions.registry import Session, SessionRegistry, new_session_id

GENERIC = "no open session with this id"
T0 = 1000.0

Chunk = tuple[StreamName, bytes]


class FakeSandbox:
    """A session sandbox: ``output`` yields what the test pushes (None: the output ends)."""

    def __init__(self, name: str = "sb", exit_code: int = 0) -> None:
        self._id = name
        self.is_alive = True
        self.ooms = 0
        self.exit_code = exit_code
        self.sent: list[bytes] = []
        self.signals: list[int] = []
        self.waits = 0
        self.removed = 0
        self.outputs = 0
        self.queue: asyncio.Queue[Chunk | None] = asyncio.Queue()

    @property
    def id(self) -> str:
        return self._id

    @property
    def alive(self) -> bool:
        return self.is_alive

    def oom_kills(self) -> int:
        return self.ooms

    @property
    def egress(self) -> tuple[EgressDestination, ...]:
        return ()

    async def start(self, stdin: bytes, secrets: Secrets = NO_SECRETS) -> None:
        raise AssertionError("a session sandbox is sent claims, never started")

    async def send(self, data: bytes) -> None:
        self.sent.append(data)

    async def output(self) -> AsyncIterator[Chunk]:
        self.outputs += 1
        while (item := await self.queue.get()) is not None:
            yield item

    async def wait(self) -> ExitInfo:
        self.waits += 1
        return ExitInfo(exit_code=self.exit_code, oom_killed=False)

    async def signal(self, signum: int) -> None:
        self.signals.append(signum)
        self.is_alive = False
        self.queue.put_nowait(None)

    async def usage(self) -> Usage:
        return Usage(peak_memory_bytes=1)

    async def remove(self) -> None:
        self.removed += 1

    def push(self, name: StreamName, data: bytes) -> None:
        self.queue.put_nowait((name, data))

    def nonce(self, index: int = -1) -> str:
        value = json.loads(self.sent[index])["nonce"]
        assert isinstance(value, str)
        return value


def hosted(sandbox: FakeSandbox) -> HostedSandbox:
    return cast(HostedSandbox, sandbox)


def trailer(nonce: str, status: int) -> bytes:
    return f"\x1etoolcell-end:{nonce}:{status:03d}\n".encode()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class World:
    """A registry with a fake clock; records removals, releases and ends."""

    def __init__(self, remove: Callable[[HostedSandbox], Awaitable[None]] | None = None) -> None:
        self.clock = Clock()
        self.removed: list[str] = []
        self.ended: list[tuple[str, str]] = []
        self.released: list[str] = []

        async def default_remove(sandbox: HostedSandbox) -> None:
            self.removed.append(sandbox.id)

        async def on_end(session: Session, reason: str) -> None:
            self.ended.append((session.id, reason))

        self.registry = SessionRegistry(cast(Backend, None), remove or default_remove, on_end, clock=self.clock)

    def open(self, owner: str = "alice", policy: SessionPolicy | None = None, *, ephemeral: bool = False,
             sandbox: FakeSandbox | None = None) -> Session:
        session_id = new_session_id()
        session = Session(id=session_id, owner=owner, tool="python.repl", profile="default",
                          policy=policy or SessionPolicy(), workspace=None,
                          sandbox=hosted(sandbox or FakeSandbox(session_id)), opened_at=self.clock(),
                          release=lambda: self.released.append(session_id), ephemeral=ephemeral)
        self.registry.add(session)
        return session


@pytest.fixture(autouse=True)
def no_background_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_EXPIRE_POLL_S", 3600.0)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    made = World()
    yield made
    await made.registry.close()


def fake(session: Session) -> FakeSandbox:
    return cast(FakeSandbox, session.sandbox)


async def run_call(session: Session, *, status: int | None = 0, kill: bool = False, start: bool = True) -> SessionCall:
    """One call on ``session``: its claim, its output up to its trailers (``status`` None: the output ends
    without them), as the pipeline drives it."""
    call = session.call(files_cap=1024, inputs=[], collect=False)
    if not start:
        return call
    await call.start(b'{"code": "1"}')
    sandbox = fake(session)
    if kill:
        await call.signal(signal.SIGTERM)
    elif status is None:
        sandbox.push("stdout", b"partial")
        sandbox.queue.put_nowait(None)
    else:
        nonce = sandbox.nonce()
        sandbox.push("stdout", b"out" + trailer(nonce, status))
        sandbox.push("stderr", trailer(nonce, status))
    _ = [item async for item in call.output()]
    await call.wait()
    return call


# -- who may address a session ---------------------------------------------------------------------------


async def test_another_owners_id_looks_like_no_session(world: World) -> None:
    session = world.open("alice")
    assert world.registry.get("alice", session.id) is session
    for owner, session_id in (("mallory", session.id), ("alice", new_session_id()), ("alice", ""),
                              ("", session.id), ("alice", session.id.upper())):
        with pytest.raises(SessionNotFound) as caught:
            world.registry.get(owner, session_id)
        assert str(caught.value) == GENERIC


async def test_after_its_end_the_owner_is_told_why_and_no_one_else(world: World) -> None:
    session = world.open("alice")
    await world.registry.end(session, "closed")
    with pytest.raises(SessionNotFound, match=r"^the session has ended \(closed\)$"):
        world.registry.get("alice", session.id)
    with pytest.raises(SessionNotFound) as caught:
        world.registry.get("mallory", session.id)
    assert str(caught.value) == GENERIC
    assert world.registry.sessions() == [] and len(world.registry) == 0


async def test_tombstones_are_bounded_oldest_forgotten(world: World) -> None:
    sessions = [world.open("alice") for _ in range(registry_module._TOMBSTONES + 1)]
    for session in sessions:
        await world.registry.end(session, "idle")
    with pytest.raises(SessionNotFound) as oldest:
        world.registry.get("alice", sessions[0].id)
    assert str(oldest.value) == GENERIC  # forgotten
    for kept in (sessions[1], sessions[-1]):
        with pytest.raises(SessionNotFound, match=r"ended \(idle\)"):
            world.registry.get("alice", kept.id)
    assert len(world.ended) == len(sessions)


async def test_count_is_per_owner_and_tool(world: World) -> None:
    world.open("alice")
    world.open("alice")
    world.open("bob")
    world.open("alice", ephemeral=True)  # never listed, never counted
    assert (world.registry.count("alice", "python.repl"), world.registry.count("bob", "python.repl"),
            world.registry.count("alice", "other")) == (2, 1, 0)
    assert len(world.registry) == 3


# -- expiry ----------------------------------------------------------------------------------------------

POLICY = SessionPolicy(idle_ttl_s=60.0, max_lifetime_s=600.0)


@pytest.mark.parametrize(("opened_ago", "used_ago", "alive", "locked", "reason"), [
    (10, None, True, False, ""),
    (59.9, None, True, False, ""),
    (60, None, True, False, "idle"),  # never used: idle counts from the opening
    (100, 10, True, False, ""),  # used recently
    (100, 60, True, False, "idle"),
    (599, 1, True, False, ""),
    (600, 1, True, False, "lifetime"),  # however busy
    (700, 100, True, False, "lifetime"),  # both: lifetime is named
    (10, None, False, False, "sandbox_ended"),
    (700, 100, False, True, ""),  # a call runs (its lock held): never under it
    (10, None, False, True, ""),
])
async def test_expire(world: World, opened_ago: float, used_ago: float | None, alive: bool, locked: bool,
                      reason: str) -> None:
    session = world.open(policy=POLICY)
    fake(session).is_alive = alive
    world.clock.now = T0 + opened_ago
    if used_ago is not None:
        session.last_used = world.clock.now - used_ago
    if locked:
        await session.lock.acquire()
    assert await world.registry.expire() == (1 if reason else 0)
    assert session.ended == reason
    assert world.ended == ([(session.id, reason)] if reason else [])
    assert world.removed == ([session.id] if reason else [])
    if locked:
        session.lock.release()


async def test_expire_goes_on_when_a_removal_fails() -> None:
    failing: set[str] = set()
    removed: list[str] = []

    async def remove(sandbox: HostedSandbox) -> None:
        if sandbox.id in failing:
            raise EngineUnavailable("engine away")
        removed.append(sandbox.id)

    world = World(remove)
    first, second = world.open(policy=POLICY), world.open(policy=POLICY)
    failing.add(first.id)
    world.clock.now = T0 + 3600
    assert await world.registry.expire() == 2
    assert (first.ended, second.ended) == ("lifetime", "lifetime")
    assert removed == [second.id]
    assert sorted(world.released) == sorted([first.id, second.id])  # the slot is released even so
    assert sorted(world.ended) == sorted([(first.id, "lifetime"), (second.id, "lifetime")])
    await world.registry.close()


async def test_the_periodic_expiry_survives_a_failing_removal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_EXPIRE_POLL_S", 0.01)
    calls = 0

    async def remove(sandbox: HostedSandbox) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise EngineUnavailable("engine away")

    world = World(remove)
    first = world.open(policy=POLICY)
    world.clock.now = T0 + 3600
    for _ in range(200):
        if first.ended:
            break
        await asyncio.sleep(0.01)
    second = world.open(policy=POLICY)  # opened at T0 + 3600: expires an hour later
    world.clock.now = T0 + 7200
    for _ in range(200):
        if second.ended:
            break
        await asyncio.sleep(0.01)
    assert (first.ended, second.ended) == ("lifetime", "lifetime")
    await world.registry.close()


# -- after a call ----------------------------------------------------------------------------------------


async def test_a_call_that_never_started_does_not_count(world: World) -> None:
    session = world.open()
    world.clock.now = T0 + 5
    await world.registry.after_call(session, None)
    await world.registry.after_call(session, await run_call(session, start=False))
    assert session.calls == 0 and not session.ended
    assert session.last_used == T0 + 5


@pytest.mark.parametrize("status", [0, 1, 125, 255])
async def test_a_clean_call_counts_whatever_its_status(world: World, status: int) -> None:
    session = world.open()
    call = await run_call(session, status=status)
    assert call.clean
    await world.registry.after_call(session, call)
    assert session.calls == 1 and not session.ended


async def test_max_calls_ends_the_session(world: World) -> None:
    session = world.open(policy=SessionPolicy(max_calls=3))
    for n in (1, 2, 3):
        await world.registry.after_call(session, await run_call(session))
        assert session.calls == n
    assert session.ended == "max_calls"
    assert world.ended == [(session.id, "max_calls")] and world.removed == [session.id]
    assert fake(session).outputs == 1  # one output iterator for the whole session


async def test_a_killed_call_ends_the_session_call_stopped(world: World) -> None:
    session = world.open()
    call = await run_call(session, kill=True)
    assert call.killed and not call.clean
    assert fake(session).signals == [signal.SIGKILL]  # whatever the pipeline asked: the sandbox is killed
    await world.registry.after_call(session, call)
    assert session.ended == "call_stopped"
    with pytest.raises(SessionNotFound, match=r"ended \(call_stopped\)"):
        world.registry.get("alice", session.id)


async def test_a_call_whose_output_ended_ends_the_session_sandbox_ended(world: World) -> None:
    session = world.open()
    call = await run_call(session, status=None)
    assert not call.clean and not call.killed
    await world.registry.after_call(session, call)
    assert session.ended == "sandbox_ended"


async def test_an_ephemeral_session_ends_after_its_call_unlisted(world: World) -> None:
    session = world.open(ephemeral=True)
    await world.registry.after_call(session, await run_call(session))
    assert session.ended == "closed"
    assert world.removed == [session.id] and world.released == [session.id]
    with pytest.raises(SessionNotFound) as caught:
        world.registry.get("alice", session.id)
    assert str(caught.value) == GENERIC


# -- ending ----------------------------------------------------------------------------------------------


async def test_end_is_idempotent(world: World) -> None:
    session = world.open()
    await asyncio.gather(world.registry.end(session, "closed"), world.registry.end(session, "idle"))
    await world.registry.end(session, "shutdown")
    assert session.ended == "closed"  # the first wins
    assert world.removed == [session.id] and world.released == [session.id]
    assert world.ended == [(session.id, "closed")]


async def test_a_cancelled_caller_still_ends_the_session() -> None:
    gate = asyncio.Event()
    removed: list[str] = []

    async def slow_remove(sandbox: HostedSandbox) -> None:
        await gate.wait()
        removed.append(sandbox.id)

    world = World(slow_remove)
    session = world.open()
    ending = asyncio.ensure_future(world.registry.end(session, "closed"))
    await asyncio.sleep(0)
    ending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ending
    assert world.ended == []
    gate.set()
    for _ in range(100):
        if world.ended:
            break
        await asyncio.sleep(0)
    assert removed == [session.id] and world.released == [session.id] and world.ended == [(session.id, "closed")]
    await world.registry.close()


async def test_release_and_on_end_happen_when_the_removal_fails() -> None:
    async def remove(sandbox: HostedSandbox) -> None:
        raise EngineUnavailable("engine away")

    world = World(remove)
    session = world.open()
    with pytest.raises(EngineUnavailable):
        await world.registry.end(session, "closed")
    assert world.released == [session.id] and world.ended == [(session.id, "closed")]
    await world.registry.end(session, "closed")  # ended already: nothing again, nothing raised
    assert world.released == [session.id]
    await world.registry.close()


async def test_close_ends_every_session_shutdown(world: World) -> None:
    sessions = [world.open(owner) for owner in ("alice", "alice", "bob")]
    await world.registry.end(sessions[0], "closed")
    await world.registry.close()
    assert [s.ended for s in sessions] == ["closed", "shutdown", "shutdown"]
    assert sorted(world.ended) == sorted([(sessions[0].id, "closed"), (sessions[1].id, "shutdown"),
                                          (sessions[2].id, "shutdown")])
    assert sorted(world.released) == sorted(s.id for s in sessions)
    assert len(world.registry) == 0


# -- SessionCall over the shared output ------------------------------------------------------------------


@pytest.fixture
def sandbox() -> FakeSandbox:
    return FakeSandbox()


async def collect(call: SessionCall) -> list[tuple[str, bytes]]:
    return [item async for item in call.output()]


def joined(items: list[tuple[str, bytes]], name: str) -> bytes:
    return b"".join(data for stream, data in items if stream == name)


async def test_output_stops_at_the_trailers_and_the_next_call_reads_on(sandbox: FakeSandbox) -> None:
    raw = SessionOutput(hosted(sandbox))
    first = SessionCall(hosted(sandbox), raw, first=True, files_cap=1024, collect=True)
    await first.start(b"args-1", Secrets(env={"K": "v"}, files={"/tmp/k": "f"}))
    nonce = sandbox.nonce()
    block = b"\x1etoolcell-files:" + nonce.encode() + b":0000000002\n{}"
    end = trailer(nonce, 4)
    sandbox.push("stdout", b"one " + block[:20])
    sandbox.push("stderr", b"warn " + end[:10])
    sandbox.push("stdout", block[20:] + b"two" + end[:7])
    sandbox.push("stdout", end[7:])
    sandbox.push("stderr", end[10:])
    got = await collect(first)
    assert (joined(got, "stdout"), joined(got, "stderr")) == (b"one two", b"warn ")
    assert first.files.payload == b"{}"
    assert await first.wait() == ExitInfo(exit_code=4, oom_killed=False)
    assert sandbox.waits == 0  # the trailer said it: the sandbox was not asked
    assert first.clean
    claim = json.loads(sandbox.sent[0])
    assert (claim["arguments"], claim["env"], claim["files"], claim["collect"]) == \
        ("args-1", {"K": "v"}, {"/tmp/k": "f"}, True)

    second = SessionCall(hosted(sandbox), raw, first=False, files_cap=1024)
    await second.start(b"args-2", Secrets(env={"K": "v"}))
    claim = json.loads(sandbox.sent[1])
    assert "env" not in claim and "files" not in claim and "collect" not in claim  # secrets: first claim only
    assert claim["nonce"] != nonce
    sandbox.push("stdout", trailer(nonce, 0) + b"three")  # the first call's trailer again: output now
    sandbox.push("stdout", trailer(sandbox.nonce(), 0))
    sandbox.push("stderr", trailer(sandbox.nonce(), 0))
    got = await collect(second)
    assert joined(got, "stdout") == trailer(nonce, 0) + b"three"
    assert (await second.wait()).exit_code == 0 and second.files.payload is None
    assert sandbox.outputs == 1


async def test_output_that_ends_early_flushes_and_wait_asks_the_sandbox(sandbox: FakeSandbox) -> None:
    sandbox.exit_code = 137
    call = SessionCall(hosted(sandbox), SessionOutput(hosted(sandbox)), first=True, files_cap=1024)
    await call.start(b"")
    nonce = sandbox.nonce()
    sandbox.push("stdout", b"partial \x1etoolcell-")
    sandbox.push("stderr", trailer(nonce, 0))  # stderr ended, stdout did not
    sandbox.is_alive = False
    sandbox.queue.put_nowait(None)
    got = await collect(call)
    assert joined(got, "stdout") == b"partial \x1etoolcell-"  # what was held back is output after all
    assert joined(got, "stderr") == b""
    assert await call.wait() == ExitInfo(exit_code=137, oom_killed=False)
    assert sandbox.waits == 1 and not call.clean


async def test_a_dead_sandbox_after_the_trailer_is_asked(sandbox: FakeSandbox) -> None:
    sandbox.exit_code = 9
    call = SessionCall(hosted(sandbox), SessionOutput(hosted(sandbox)), first=True, files_cap=1024)
    await call.start(b"")
    nonce = sandbox.nonce()
    sandbox.push("stdout", trailer(nonce, 9))
    sandbox.push("stderr", trailer(nonce, 9))
    await collect(call)
    sandbox.is_alive = False  # the resident tool exited: the host with it
    assert (await call.wait()).exit_code == 9 and sandbox.waits == 1
    assert not call.clean


async def test_after_the_output_ended_every_later_call_sees_no_output(sandbox: FakeSandbox) -> None:
    raw = SessionOutput(hosted(sandbox))
    sandbox.queue.put_nowait(None)
    first = SessionCall(hosted(sandbox), raw, first=True, files_cap=0)
    await first.start(b"")
    assert await collect(first) == []
    second = SessionCall(hosted(sandbox), raw, first=False, files_cap=0)
    await second.start(b"")
    assert await asyncio.wait_for(collect(second), 1.0) == []  # not waiting on a finished iterator
    assert raw.ended and not second.clean


async def test_signal_kills_the_sandbox_and_marks_the_call(sandbox: FakeSandbox) -> None:
    call = SessionCall(hosted(sandbox), SessionOutput(hosted(sandbox)), first=True, files_cap=0)
    await call.start(b"")
    await call.signal(signal.SIGTERM)
    assert call.killed and sandbox.signals == [signal.SIGKILL]
    await collect(call)
    assert (await call.wait()).exit_code == 0 and sandbox.waits == 1 and not call.clean
    await call.remove()
    assert sandbox.removed == 0  # the session's to do, not the call's
    assert (await call.usage()).peak_memory_bytes == 1


async def test_a_call_its_caller_left_half_way_ends_the_session_call_stopped(world: World) -> None:
    """The caller went away mid-call (its output no longer read): the sandbox lives, the call did not finish."""
    session = world.open()
    call = session.call(files_cap=1024, inputs=[], collect=False)
    await call.start(b'{"code": "1"}')
    fake(session).push("stdout", b"partial")
    chunks = call.output()
    assert await chunks.__anext__() == ("stdout", b"partial")
    await chunks.aclose()  # the pump was cancelled
    assert not call.finished and not call.killed and not call.sandbox_gone
    await world.registry.after_call(session, call)
    assert session.ended == "call_stopped"


async def test_a_call_during_which_the_sandbox_saw_an_oom_kill_is_oom(world: World) -> None:
    """The memory limit is the session's: a process of the call killed by it makes the call's status OOM."""
    session = world.open()
    call = session.call(files_cap=1024, inputs=[], collect=False)
    await call.start(b'{"code": "1"}')
    sandbox = fake(session)
    sandbox.ooms = 1  # the kernel killed something of this call's
    nonce = sandbox.nonce()
    sandbox.push("stdout", trailer(nonce, 137))
    sandbox.push("stderr", trailer(nonce, 137))
    _ = [item async for item in call.output()]
    assert await call.wait() == ExitInfo(exit_code=137, oom_killed=True)
    clean = await run_call(session, status=0)  # no new kill: the next call is not
    assert await clean.wait() == ExitInfo(exit_code=0, oom_killed=False)


async def test_a_call_the_host_ends_the_session_with_ends_it_sandbox_ended(world: World) -> None:
    """The resident tool died in the call: the trailer's status is SESSION_OVER + its status."""
    session = world.open()
    call = await run_call(session, status=SESSION_OVER + 9)
    assert await call.wait() == ExitInfo(exit_code=9, oom_killed=False)
    assert call.over and call.finished and not call.clean
    await world.registry.after_call(session, call)
    assert session.ended == "sandbox_ended"
