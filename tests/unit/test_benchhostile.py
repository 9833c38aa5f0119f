"""The bench's hostile section (issue 14): its payloads, its size ladders and its event-loop stall probe."""

from __future__ import annotations

import asyncio
import json
import subprocess  # nosec B404 - runs this interpreter on the bench's own payload code
import sys
import time
from collections.abc import Awaitable, Callable

import pytest

from toolcell.api.v1 import supervisor_pb2 as pb
from toolcell.benchhostile import (
    CALL,
    CALLER_ATTACKS,
    STDERR_CAP,
    TOOL_ATTACKS,
    AttackRecord,
    Ladder,
    MiB,
    Request,
    StallProbe,
    climb,
    hostile_args,
)


@pytest.mark.parametrize(("name", "unit"), TOOL_ATTACKS)
@pytest.mark.parametrize("size", [70_000, 300_000])
def test_hostile_tool_prints_its_unit_to_the_size_and_stderr_to_its_cap(name: str, unit: str, size: int) -> None:
    code = json.loads(hostile_args(unit, size))["code"]
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, timeout=60, check=True)
    expected = (unit.encode() * (size // len(unit.encode()) + 1))[:size]
    assert done.stdout == expected
    assert done.stderr == expected[:STDERR_CAP]


@pytest.mark.parametrize(("name", "full", "build"), CALLER_ATTACKS)
def test_hostile_requests_are_full_size_and_under_the_servers_message_limit(
        name: str, full: int, build: Callable[[int], Request]) -> None:
    request = build(full)
    assert full <= len(request.body) <= 4 * MiB - 1024
    if request.method == CALL and name.startswith("tool_name"):
        assert len(pb.ExecuteRequest.FromString(request.body).tool) == full


@pytest.mark.parametrize(("sizes", "full", "rungs"), [
    ((1024, 8192, 65536), MiB, (1024, 8192, 65536, MiB)),
    ((1024, 8192, 65536, 262144), 120 * 1024, (1024, 8192, 65536, 120 * 1024)),
    ((4096,), 1024, (1024,)),
])
def test_ladder_rungs_end_at_the_full_size(sizes: tuple[int, ...], full: int, rungs: tuple[int, ...]) -> None:
    assert Ladder(sizes, budget_s=1.0).rungs(full) == rungs


@pytest.mark.parametrize(("stall_s", "next_size", "climbs"), [
    (0.06, 4096, True),  # x4 in size: 16 x 60 ms = 0.96 s, within 1 s
    (0.07, 4096, False),  # 1.12 s: over
    (0.2, 2048, True),  # x2: 4 x 200 ms
    (0.3, 2048, False),
])
def test_ladder_climbs_while_the_predicted_quadratic_stall_fits_the_budget(stall_s: float, next_size: int,
                                                                          climbs: bool) -> None:
    assert Ladder((1024,), budget_s=1.0).climb(1024, next_size, stall_s) is climbs


def _blocking(stall_at: dict[int, float]) -> Callable[[int], Awaitable[str]]:
    async def one(size: int) -> str:
        time.sleep(stall_at.get(size, 0.0))  # holds the loop, as a backtracking regex on it would
        return "ok"
    return one


@pytest.mark.parametrize(("stall_at", "budget_s", "reached", "cut"), [
    ({}, 1000.0, 4096, False),  # nothing holds the loop: the ladder reaches the full size
    ({2048: 0.2}, 0.5, 2048, True),  # 0.2 s at 2 KiB predicts 0.8 s at 4 KiB: over 0.5 s, cut there
])
def test_climb_measures_each_rungs_stall_on_the_loop_and_stops_over_budget(
        stall_at: dict[int, float], budget_s: float, reached: int, cut: bool) -> None:
    async def run() -> AttackRecord:
        probe = StallProbe(asyncio.get_running_loop())
        await probe._spawn()
        try:
            return await climb(4096, Ladder((1024, 2048), budget_s), probe, time.monotonic() + 60,
                               _blocking(stall_at))
        finally:
            probe.stop()

    record = asyncio.run(run())
    assert record.reached_bytes == reached
    assert record.full is not cut
    assert bool(record.stopped) is cut
    for rung in record.rungs:
        # The probe saw the block whole (less the part of its 5 ms sleep that had passed when it began).
        assert rung["stall_ms"] >= (stall_at.get(rung["bytes"], 0.0) - 0.005) * 1000


@pytest.mark.parametrize(("hold_s", "minimum_ms"), [(0.0, 0.0), (0.5, 495.0)])
def test_a_stall_that_outlasts_its_request_is_that_requests(hold_s: float, minimum_ms: float) -> None:
    """The bench gave up on a request (deadline) while the loop still holds: the rung waits for the loop."""
    async def run() -> AttackRecord:
        loop = asyncio.get_running_loop()
        probe = StallProbe(loop)
        await probe._spawn()

        async def one(size: int) -> str:
            if hold_s:
                loop.call_later(0.01, time.sleep, hold_s)  # begins after the request returned
            return "DEADLINE_EXCEEDED"

        try:
            return await climb(1024, Ladder((), 1000.0), probe, time.monotonic() + 60, one)
        finally:
            probe.stop()

    record = asyncio.run(run())
    assert record.rungs[0]["stall_ms"] >= minimum_ms
    if not hold_s:  # the same probe with nothing holding the loop: no such stall (a busy machine's are shorter)
        assert record.rungs[0]["stall_ms"] < 495.0
