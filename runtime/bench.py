"""``toolcell bench``: toolcell's speed, measured side by side in one run on this machine.

The Docker backend (``engine.kind: docker``):

1. no-op gRPC round trip to the supervisor (health Check): the floor of our own overhead;
2. the raw docker-py baseline: create/attach/start/wait/remove, same image, same hardening, with
   NetworkDisabled (what the backend does) and with the older ``network_mode: none``, interleaved with
3. toolcell cold (no pool), a trivial tool, end to end through gRPC;
4. toolcell warm (pooled), the same tool, at a rate the pool sustains (each call waits for a full pool);
   4b: a Python tool, beside its own run time measured inside the sandbox (``benchoci`` says how);
   4c: the same over the engine's attach relay instead of the private channel (a second supervisor);
5. throughput at concurrency 1, 4 and 16 for 2, 3 and 4, with the pool's refill rate, and this process's
   peak RSS meanwhile;
6. a stdout flood (100 MiB): supervisor RSS growth and bytes the engine wrote to the host's disk;
7. hostile (issue 14): the supervisor's event loop's longest stall and warm calls' p50/p99, quiet and while a
   hostile tool floods adversarial output at the cap and a hostile caller sends oversized and malformed
   requests (``benchhostile``);
8. MCP servers (issue 16): stock server images' discovery, cold and warm calls through supervisors of their
   own on docker and oci, beside the same image run with ``docker run`` and no supervisor (``benchmcp``).

The OCI backend (``engine.kind: oci``, runc with no daemon; issue 15), first, on a supervisor of its own
that stops before the Docker one starts (``benchoci``): its floor (the same sandbox, bundle and cgroups
by the backend's own code, ``runc run`` with no supervisor) interleaved with cold calls through gRPC;
warm calls (a trivial and a Python tool, the latter beside its run time); throughput at concurrency 8
with a fresh sandbox per call, cold and with a pool of 8 (CPU per call), and this process's peak RSS
meanwhile. Skipped, and said so (a missed target), when the OCI backend cannot run here (not importable,
no runc, not root); a failure there is printed after the figures and the run exits 1.

The bench starts its own supervisors (in this process, on their own thread and event loop, behind a real
gRPC server on a temporary Unix socket) with their own owner labels, and removes everything they made.
The bench's client runs in the same process: RSS figures are the supervisor's and the client's together.
Latency figures are p50/p95/p99 in milliseconds (medians of interleaved samples where two are compared);
the targets of issues 8, 14 and 15 are checked at the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from toolcell import benchhostile, benchmcp, benchoci, benchsession
from toolcell.backends.base import Backend
from toolcell.backends.docker import DockerBackend
from toolcell.backends.factory import open_backend
from toolcell.benchhostile import HOSTILE_TOOL, Ladder, StallProbe
from toolcell.benchoci import CpuMeter, OciFloor, RssPeak
from toolcell.benchstats import percentile
from toolcell.client import Client, ClientError
from toolcell.errors import ToolcellError
from toolcell.model import Result, Started, Status
from toolcell.policy.spec import SandboxSpec
from toolcell.server.app import App
from toolcell.settings import Config, parse_config
from toolcell.supervisor import Supervisor

IMAGE = "toolcell/python:bookworm"
# The trivial tool: its result is its arguments (cat). It costs the sandbox nothing, so what is measured
# is toolcell and the engine. The same call to a Python tool (wordcount) is shown beside the warm path:
# a Python process's own exit (interpreter finalization) adds several ms that are the tool's, not ours.
TRIVIAL = ["cat"]
PYTHON_TOOL = ["python3", "-I", "/opt/toolcell/tools/wordcount.py"]
TRIVIAL_ARGS = json.dumps({"text": "one small call"})
PYRUN = ["python3", "-I", "-u", "/opt/toolcell/tools/pyrun.py"]
FLOOD_CODE = ("import sys\nb = b'x' * (1 << 20)\nw = sys.stdout.buffer\n"
              "for _ in range({mib}):\n    w.write(b)\nw.flush()\n")
ENGINE_PROCESSES = ("dockerd", "containerd")
MiB = 1024 * 1024
# 4b': how long after its pool refilled a warm call is made again, to tell a pool whose sandboxes are
# counted ready before their tool waits for input (faster with the grace) from one whose are not.
READY_GRACE_S = 0.3


@dataclass(frozen=True)
class Plan:
    """How much to measure."""

    latency_n: int
    noop_n: int
    levels: tuple[int, ...]
    per_level: Callable[[int], int]
    pool_size: int
    flood_mib: int
    # 7 hostile: quiet warm calls; the attacks' size ladders, the stall one rung may be predicted to cost,
    # the tool attacks run, and a deadline for the attack phase (seconds).
    hostile_n: int = 40
    tool_sizes: tuple[int, ...] = (1024, 4096, 16384, 65536, 262144)  # then the full size: 1 MiB
    caller_sizes: tuple[int, ...] = (1024, 4096, 16384, 65536, 262144)
    hostile_budget_s: float = 5.0
    tool_attacks: tuple[str, ...] = tuple(name for name, _ in benchhostile.TOOL_ATTACKS)
    hostile_deadline_s: float = 300.0
    # The run-time probe's repetitions inside one sandbox (4b).
    probe_reps: int = 15
    # OCI: floor/cold rounds; calls per throughput measurement at ``oci_concurrency``; the pool of 8.
    oci_n: int = 40
    oci_calls: int = 96
    oci_concurrency: int = 8
    oci_pool: int = 8
    # 8 MCP servers: calls of each kind (cold, warm, floor) per server and engine; discoveries per server.
    mcp_n: int = 15
    mcp_discovery_reps: int = 3
    # 9 sessions: rounds of (warm one-shot, session call, session exec call) per engine.
    session_n: int = 40

    @staticmethod
    def full() -> Plan:
        return Plan(latency_n=40, noop_n=500, levels=(1, 4, 16), per_level=lambda c: max(12, 3 * c),
                    pool_size=8, flood_mib=100)

    @staticmethod
    def quick() -> Plan:
        return Plan(latency_n=5, noop_n=50, levels=(1, 4, 16), per_level=lambda c: c, pool_size=4, flood_mib=10,
                    hostile_n=15, tool_sizes=(4096, 16384, 65536, 262144),
                    hostile_budget_s=2.0, tool_attacks=benchhostile.QUICK_TOOL_ATTACKS, hostile_deadline_s=90.0,
                    probe_reps=5, oci_n=8, oci_calls=24, mcp_n=3, mcp_discovery_reps=1, session_n=8)

    def mcp(self) -> benchmcp.McpPlan:
        return benchmcp.McpPlan(n=self.mcp_n, discovery_reps=self.mcp_discovery_reps)


def summary(samples_s: list[float], elapsed_s: float | None = None) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    out = {"n": float(len(ms)), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
           "p99_ms": percentile(ms, 99), "mean_ms": sum(ms) / len(ms) if ms else math.nan}
    total = elapsed_s if elapsed_s is not None else sum(samples_s)
    out["per_s"] = len(ms) / total if total > 0 else math.nan
    return out


@dataclass
class Report:
    figures: dict[str, Any] = field(default_factory=dict)

    def put(self, key: str, value: Any) -> None:
        self.figures[key] = value


class _ServerThread:
    """A supervisor + gRPC server on its own thread and event loop (so client and server don't share one)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.backend: Backend | None = None
        self.app: App | None = None
        self.address = ""
        self._stopped = False
        self._thread = threading.Thread(target=self.loop.run_forever, name="toolcell-bench-server", daemon=True)

    def run(self, coro: Awaitable[Any], timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(_wrap(coro), self.loop).result(timeout)

    def start(self) -> None:
        self._thread.start()

        async def boot() -> str:
            self.backend = open_backend(self.config)
            self.app = App(Supervisor(self.config, self.backend))
            return await self.app.start()

        self.address = self.run(boot())

    @property
    def supervisor(self) -> Supervisor:
        if self.app is None:
            raise RuntimeError("the bench supervisor is not running")
        return self.app.supervisor

    def stop(self) -> None:
        if self._stopped or not self._thread.is_alive():
            return
        self._stopped = True
        if self.app is not None and self.address:
            self.run(self.app.stop(grace_s=2.0))
        elif self.backend is not None:
            self.run(self.backend.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


async def _wrap(coro: Awaitable[Any]) -> Any:
    return await coro


def bench_config(socket_path: str, owner: str, pool_size: int, flood_mib: int, *,
                 engine: dict[str, Any] | None = None, throughput_pool: int = 0) -> Config:
    """The bench supervisor's config; ``engine``: its ``engine`` section (None: Docker at DOCKER_HOST),
    ``throughput_pool``: a ``bench.tp`` tool (trivial) pooled that large for the OCI throughput."""
    tool = {"image": IMAGE, "command": TRIVIAL,
            "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}}}
    extra: list[dict[str, Any]] = []
    if throughput_pool:
        extra.append({"name": "bench.tp", "description": "trivial tool, pooled for throughput", **tool,
                      "pool": {"size": throughput_pool, "ttl": "10m"}})
    doc: dict[str, Any] = {
        "version": 1,
        "server": {"listen": f"unix://{socket_path}", "instance": owner, "shutdown_grace": "2s"},
        # The built-in default profile's hardening; only the timeout is raised for the flood.
        "profiles": {"default": {"timeout": "60s"}},
        "tools": [
            {"name": "bench.cold", "description": "trivial tool, cold", **tool},
            {"name": "bench.warm", "description": "trivial tool, pooled", **tool,
             "pool": {"size": pool_size, "ttl": "10m"}},
            {"name": "bench.warm.python", "description": "Python tool, pooled", **tool, "command": PYTHON_TOOL,
             "pool": {"size": 2, "ttl": "10m"}},
            {"name": "bench.cold.python", "description": "Python tool, cold", **tool, "command": PYTHON_TOOL},
            {"name": "bench.probe", "description": "Python code: the run-time probe", "image": IMAGE,
             "command": PYRUN, "input_schema": {"type": "object"}},
            *extra,
            {"name": "bench.flood", "description": f"{flood_mib} MiB of stdout", "image": IMAGE, "command": PYRUN,
             "input_schema": {"type": "object"}},
            {"name": HOSTILE_TOOL, "description": "adversarial output at the output cap", "image": IMAGE,
             "command": PYRUN, "input_schema": {"type": "object"}},
        ],
        # The bench's own uid may use the bench's tools and nothing else: the hostile caller's requests for
        # other tool names are refused as from a caller no rule grants them to.
        "auth": {"require": ["peer"], "rules": [{"match": {"uid": os.geteuid()}, "tools": ["bench.*"]}]},
    }
    if engine is not None:
        doc["engine"] = engine
    # Only the engine's address comes from the environment (the socket and all else are the bench's own).
    environ = {"DOCKER_HOST": os.environ["DOCKER_HOST"]} if "DOCKER_HOST" in os.environ else {}
    config = parse_config(doc, environ=environ, base_dir=Path.cwd())
    # No refusal budget: 7's hostile caller shares the bench's uid with its normal calls (a spent budget would
    # refuse those), and what is measured is what each hostile request costs, not how often one gets in.
    return dataclasses.replace(config, security=dataclasses.replace(config.security, refusals_per_peer=None))


def _engine_write_bytes() -> int:
    """Bytes the engine's processes sent to the storage layer so far (/proc/<pid>/io write_bytes)."""
    total = 0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in ENGINE_PROCESSES:
            with contextlib.suppress(psutil.Error):
                total += proc.io_counters().write_bytes
    return total


class Bench:
    def __init__(self, plan: Plan, progress: tqdm[Any]) -> None:
        self.plan = plan
        self.bar = progress
        self.report = Report()
        self.owner = "bench-" + secrets.token_hex(5)
        self._tmp = tempfile.TemporaryDirectory(prefix="toolcell-bench-")
        self.config = bench_config(os.path.join(self._tmp.name, "s.sock"), self.owner, plan.pool_size,
                                   plan.flood_mib)
        self.server = _ServerThread(self.config)
        self.client: Client | None = None

    # -- helpers ------------------------------------------------------------------------------------

    def _step(self, label: str) -> None:
        self.bar.set_description(label)

    def _tick(self, n: int = 1) -> None:
        self.bar.update(n)

    @property
    def _client(self) -> Client:
        if self.client is None:
            raise RuntimeError("the bench client is not connected")
        return self.client

    async def _call(self, tool: str, args: str = TRIVIAL_ARGS, client: Client | None = None) -> tuple[float, Result]:
        t0 = time.perf_counter()
        result = await (client or self._client).call(tool, args)
        elapsed = time.perf_counter() - t0
        if result.status is not Status.OK:
            raise RuntimeError(f"{tool}: {result.status.value} {result.message} {result.stderr[-300:]}")
        return elapsed, result

    async def _query(self, fn: Callable[[], Any], server: _ServerThread | None = None) -> Any:
        """Read the supervisor's state on its own loop (it is not thread-safe)."""
        async def read() -> Any:
            return fn()

        loop = (server or self.server).loop
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(read(), loop))

    async def _stats(self, server: _ServerThread | None = None, tool: str = "bench.warm") -> Any:
        return (await self._query((server or self.server).supervisor.pools.stats, server))[tool]

    async def _pool_full(self, timeout: float = 60, server: _ServerThread | None = None,
                         tools: tuple[str, ...] = ("bench.warm", "bench.warm.python")) -> None:
        """Wait until the pool is full and idle: requests then come at a rate the pool sustains."""
        server = server or self.server
        pools = server.supervisor.pools
        deadline = time.monotonic() + timeout
        while not await self._query(lambda: all(pools.settled(t) for t in tools), server):
            if time.monotonic() > deadline:
                stats = await self._query(pools.stats, server)
                raise RuntimeError(f"the pool did not fill in {timeout:.0f}s: {stats}")
            await asyncio.sleep(0.02)

    # -- the six measurements -------------------------------------------------------------------------

    async def noop(self) -> None:
        self._step("1 no-op gRPC")
        async with grpc.aio.insecure_channel(self.server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            for _ in range(20):
                await stub.Check(request)
            samples = []
            for _ in range(self.plan.noop_n):
                t0 = time.perf_counter()
                await stub.Check(request)
                samples.append(time.perf_counter() - t0)
                self._tick()
        self.report.put("noop_grpc", summary(samples))

    def _raw_spec(self) -> SandboxSpec:
        config = self.config
        return config.compile(config.resolve("bench.cold"), "bench-raw-" + secrets.token_hex(4))

    def raw_once(self, backend: DockerBackend, network_disabled: bool = True) -> float:
        """One raw docker-py cycle; ``network_disabled=False``: with ``network_mode: none`` instead."""
        stdin = TRIVIAL_ARGS.encode() + b"\n"
        t0 = time.perf_counter()
        code, received = backend.baseline_cycle(self._raw_spec(), stdin, network_disabled=network_disabled)
        elapsed = time.perf_counter() - t0
        if code != 0 or received == 0:
            raise RuntimeError(f"raw baseline cycle failed: exit {code}, {received} bytes")
        return elapsed

    async def latency(self, backend: DockerBackend) -> None:
        """2 and 3 interleaved (raw ``network_mode: none``, raw NetworkDisabled, cold), then 4 and 4b."""
        n = self.plan.latency_n
        loop = asyncio.get_running_loop()
        self._step("2-3 raw docker-py, cold")
        await self._pool_full()  # the engine is idle: no refill competes with what is measured
        await loop.run_in_executor(None, self.raw_once, backend, False)  # warm the engine's caches
        await loop.run_in_executor(None, self.raw_once, backend, True)
        await self._call("bench.cold")
        raw_none, raw, cold = [], [], []
        for _ in range(n):
            raw_none.append(await loop.run_in_executor(None, self.raw_once, backend, False))
            raw.append(await loop.run_in_executor(None, self.raw_once, backend, True))
            cold.append((await self._call("bench.cold"))[0])
            self._tick(3)
        self.report.put("raw_docker", summary(raw))
        self.report.put("raw_docker_network_none", summary(raw_none))
        self.report.put("cold", summary(cold))
        warm, warm_py, graced = await self.warm_paths(self.server, self._client)
        self.report.put("warm", warm)
        self.report.put("warm_python_tool", warm_py)
        self.report.put("warm_python_tool_after_grace", graced)
        self.report.put("python_run_time", await self.python_run_time(self._client))

    async def warm_paths(self, server: _ServerThread,
                         client: Client) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """4 and 4b on ``server``: warm ``cat`` and the warm Python tool, each call after the pool refilled;
        then the Python tool again ``READY_GRACE_S`` after the refill (a readiness check: a pool that counts
        a sandbox ready before its tool waits for input is faster with the grace than without)."""
        n = self.plan.latency_n
        self._step(f"4 warm {server.config.engine.kind}")
        hits0 = (await self._stats(server)).hits
        warm = []
        for _ in range(n):
            await self._pool_full(server=server)
            warm.append((await self._call("bench.warm", client=client))[0])
            self._tick()
        hits = (await self._stats(server)).hits - hits0
        self._step(f"4b warm Python {server.config.engine.kind}")
        hits0_py = (await self._stats(server, "bench.warm.python")).hits
        warm_py = []
        for _ in range(n):
            await self._pool_full(server=server)
            warm_py.append((await self._call("bench.warm.python", client=client))[0])
            self._tick()
        hits_py = (await self._stats(server, "bench.warm.python")).hits - hits0_py
        graced = []
        for _ in range(n):
            await self._pool_full(server=server)
            await asyncio.sleep(READY_GRACE_S)
            graced.append((await self._call("bench.warm.python", client=client))[0])
            self._tick()
        return ({**summary(warm), "warm_hits": hits}, {**summary(warm_py), "warm_hits": hits_py},
                {**summary(graced), "grace_s": READY_GRACE_S})

    async def python_run_time(self, client: Client) -> dict[str, Any]:
        """The Python tool's own run time inside the backend's sandbox (``benchoci.RUN_TIME_CODE``)."""
        self._step("4b Python tool's run time")
        args = benchoci.run_time_args(list(PYTHON_TOOL), TRIVIAL_ARGS, self.plan.probe_reps)
        _, result = await self._call("bench.probe", args, client=client)
        self._tick()
        probe = benchoci.parse_run_time(result.output)
        return {"input_to_exit": summary(probe.input_to_exit_s), "spawn_to_exit": summary(probe.spawn_to_exit_s),
                "settled_in_read": probe.settled_in_read, "reps": self.plan.probe_reps}

    async def warm_over_attach(self) -> None:
        """4c: the same warm call with pooled sandboxes on the engine's attach relay, side by side.

        What a supervisor running in a container gets (the engine cannot mount its channel directories).
        """
        if self.config.engine.pool_channel_dir is None:
            return
        self._step("4c warm, attach relay")
        config = bench_config(os.path.join(self._tmp.name, "a.sock"), self.owner + "-a", self.plan.pool_size,
                              self.plan.flood_mib)
        config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, pool_channel_dir=None))
        server = _ServerThread(config)
        samples = []
        try:
            server.start()
            async with Client(server.address) as client:
                for _ in range(self.plan.latency_n):
                    await self._pool_full(server=server, tools=("bench.warm",))
                    t0 = time.perf_counter()
                    result = await client.call("bench.warm", TRIVIAL_ARGS)
                    samples.append(time.perf_counter() - t0)
                    if result.status is not Status.OK:
                        raise RuntimeError(f"bench.warm over attach: {result.status.value} {result.message}")
                    self._tick()
        finally:
            server.stop()
        self.report.put("warm_attach", summary(samples))

    async def throughput(self, backend: DockerBackend) -> None:
        rows: dict[str, dict[str, Any]] = {}
        threads = concurrent.futures.ThreadPoolExecutor(max_workers=max(self.plan.levels))
        with threads, RssPeak(trim=True) as rss:
            loop = asyncio.get_running_loop()
            for c in self.plan.levels:
                total = self.plan.per_level(c)
                self._step(f"5 throughput c={c} raw")
                await self._pool_full()
                rows[f"raw_c{c}"] = await self._closed_loop(
                    c, total, lambda: loop.run_in_executor(threads, self.raw_once, backend))
                self._step(f"5 throughput c={c} cold")
                rows[f"cold_c{c}"] = await self._closed_loop(c, total, lambda: self._timed_call("bench.cold"))
                self._step(f"5 throughput c={c} warm")
                await self._pool_full()
                before = await self._stats()
                t0 = time.perf_counter()
                row = await self._closed_loop(c, total, lambda: self._timed_call("bench.warm"))
                after = await self._stats()
                row["warm_hits"] = after.hits - before.hits
                row["cold_fallbacks"] = after.misses - before.misses
                row["refill_per_s"] = (after.created - before.created) / (time.perf_counter() - t0)
                rows[f"warm_c{c}"] = row
        self.report.put("throughput", rows)
        self.report.put("throughput_rss", rss.figures())

    async def _timed_call(self, tool: str, client: Client | None = None) -> float:
        return (await self._call(tool, client=client))[0]

    async def _closed_loop(self, concurrency: int, total: int, one: Callable[[], Awaitable[float]]) -> dict[str, Any]:
        """``concurrency`` workers issue ``total`` calls back to back; invocations/s over the wall time."""
        remaining = total
        samples: list[float] = []

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                samples.append(await one())
                self._tick()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {**summary(samples, time.perf_counter() - t0), "concurrency": concurrency}

    async def flood(self, backend: DockerBackend) -> None:
        self._step(f"6 {self.plan.flood_mib} MiB flood")
        args = json.dumps({"code": FLOOD_CODE.format(mib=self.plan.flood_mib)})
        # Control: the same measurement around a trivial call (container metadata the engine writes).
        disk0 = _engine_write_bytes()
        await self._call("bench.cold")
        control = _engine_write_bytes() - disk0
        log_paths: list[str] = []
        disk0 = _engine_write_bytes()
        t0 = time.perf_counter()
        with RssPeak() as rss:
            result: Result | None = None
            async for event in self._client.execute("bench.flood", args):
                if isinstance(event, Started):
                    info = await backend.inspect(event.sandbox_id)
                    log_paths.append(str(info.get("LogPath") or ""))
                elif isinstance(event, Result):
                    result = event
        elapsed = time.perf_counter() - t0
        written = _engine_write_bytes() - disk0
        self._tick()
        if result is None or result.status is not Status.OK:
            raise RuntimeError(f"flood failed: {result}")
        log_bytes = sum(Path(p).stat().st_size for p in log_paths if p and Path(p).exists())  # noqa: ASYNC240
        self.report.put("flood", {
            "mib": self.plan.flood_mib, "stdout_bytes_seen": result.stdout_bytes, "kept_bytes": len(result.output),
            "seconds": elapsed, "mib_per_s": result.stdout_bytes / MiB / elapsed,
            "rss_growth_mib": (rss.peak - rss.base) / MiB,
            "engine_disk_write_bytes": written, "engine_disk_write_bytes_trivial_call": control,
            "log_path": ",".join(log_paths) or "(none: log driver 'none')", "log_bytes": log_bytes,
        })

    # -- 7 hostile ----------------------------------------------------------------------------------

    async def _pool_settled(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a full warm pool, then go on (a call then may go cold: it is counted)."""
        pools = self.server.supervisor.pools
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self._query(lambda: pools.settled("bench.warm")):
                return
            await asyncio.sleep(0.02)

    async def _call_status(self, tool: str, args: str, timeout: float) -> str:
        """One call that may fail: its result's status, or the error's code (never retried)."""
        try:
            return (await self._client.call(tool, args, timeout=timeout, idempotent=False)).status.value
        except ClientError as exc:
            return exc.code

    async def _phase(self, probe: StallProbe,
                     attack: Callable[[], Awaitable[Any]] | None) -> tuple[dict[str, Any], Any]:
        """Warm calls back to back (each after the pool refilled) and health checks every 50 ms, until
        ``hostile_n`` calls (quiet) or until ``attack`` ends; the probe's lateness over the whole phase."""
        finished = asyncio.Event()
        warm: list[float] = []
        health: list[float] = []
        failures: dict[str, int] = {}

        async def normal() -> None:
            while not finished.is_set():
                await self._pool_settled(2.0)
                t0 = time.perf_counter()
                outcome = await self._call_status("bench.warm", TRIVIAL_ARGS, 30.0)
                warm.append(time.perf_counter() - t0)
                if outcome != Status.OK.value:
                    failures[outcome] = failures.get(outcome, 0) + 1
                if attack is None:
                    self._tick()
                    if len(warm) >= self.plan.hostile_n:
                        finished.set()

        async def checks() -> None:
            async with grpc.aio.insecure_channel(self.server.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while not finished.is_set():
                    t0 = time.perf_counter()
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
                    health.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.05)

        window = probe.open(keep=True)
        before = await self._stats()
        tasks = [asyncio.ensure_future(normal()), asyncio.ensure_future(checks())]
        t0 = time.perf_counter()
        outcome = None
        try:
            if attack is not None:
                outcome = await attack()
                finished.set()
            await asyncio.gather(*tasks)
        finally:
            finished.set()
            for task in tasks:
                task.cancel()
        elapsed = time.perf_counter() - t0
        await probe.close(window)
        after = await self._stats()
        return {
            "seconds": elapsed, "warm": summary(warm), "health_check": summary(health),
            "stall_max_ms": window.max_s * 1000, "stall_loop_cpu_max_ms": window.max_cpu_s * 1000,
            "stall_p99_ms": benchhostile.lateness_ms(window.samples, 99),
            "stall_p50_ms": benchhostile.lateness_ms(window.samples, 50), "probe_wakeups": window.count,
            "warm_hits": after.hits - before.hits, "cold_fallbacks": after.misses - before.misses,
            "failures": failures,
        }, outcome

    async def hostile(self) -> None:
        """7: quiet, then under attack; the event loop's longest stall and warm calls' latency in each."""
        plan = self.plan
        probe = StallProbe(self.server.loop)
        probe.start()
        try:
            self._step("7 hostile: quiet")
            quiet, _ = await self._phase(probe, None)
            self._step("7 hostile: under attack")
            deadline = time.monotonic() + plan.hostile_deadline_s
            tool_ladder = Ladder(plan.tool_sizes, plan.hostile_budget_s)
            caller_ladder = Ladder(plan.caller_sizes, plan.hostile_budget_s)

            async def attack() -> Any:
                return await benchhostile.run_attacks(
                    self._call_status, self.server.address, probe, tool_ladder, caller_ladder,
                    plan.tool_attacks, deadline, self._tick)

            attacked, records = await self._phase(probe, attack)
        finally:
            probe.stop()
        tools = {k: r.as_dict() for k, r in records["tool"].items()}
        callers = {k: r.as_dict() for k, r in records["caller"].items()}
        every = [*tools.values(), *callers.values()]
        self.report.put("hostile", {
            "quiet": quiet, "attack": attacked, "tool_attacks": tools, "caller_attacks": callers,
            "all_full": all(r["full"] for r in every),
            "longest_stall_ms": max(quiet["stall_max_ms"], attacked["stall_max_ms"]),
            "longest_loop_cpu_ms": max(quiet["stall_loop_cpu_max_ms"], attacked["stall_loop_cpu_max_ms"]),
            "warm_p50_ratio": attacked["warm"]["p50_ms"] / quiet["warm"]["p50_ms"],
            "warm_p99_ratio": attacked["warm"]["p99_ms"] / quiet["warm"]["p99_ms"],
            "ladder_budget_s": plan.hostile_budget_s,
        })

    async def mcp_servers(self) -> None:
        """8: stock MCP servers on supervisors of their own (``benchmcp``); a missing image is skipped."""
        section = benchmcp.McpSection(self.plan.mcp(), self.owner, self._tmp.name, _ServerThread, step=self._step,
                                      tick=self._tick, docker_host=os.environ.get("DOCKER_HOST"))
        self.report.put("mcp", await section.run())

    async def sessions(self) -> None:
        """9: a call in an open session beside a warm one-shot call, on each engine (``benchsession``)."""
        section = benchsession.SessionSection(self.plan.session_n, self.owner, self._tmp.name, _ServerThread,
                                              step=self._step, tick=self._tick,
                                              docker_host=os.environ.get("DOCKER_HOST"))
        self.report.put("sessions", await section.run())

    # -- OCI (issue 15) -------------------------------------------------------------------------------

    def _oci_config(self) -> Config:
        state = os.path.join(self._tmp.name, "oci")
        os.makedirs(state, mode=0o700, exist_ok=True)
        return bench_config(os.path.join(self._tmp.name, "o.sock"), self.owner + "-oci", self.plan.pool_size,
                            self.plan.flood_mib, engine={"kind": "oci", "oci": {"state_dir": state}},
                            throughput_pool=self.plan.oci_pool)

    async def oci(self) -> None:
        """The OCI backend beside its floor, on a supervisor of its own (before the Docker one starts).

        A failure is recorded (``oci.error``) rather than raised: the Docker figures are printed anyway,
        and the run then exits 1.
        """
        config = self._oci_config()
        reason = benchoci.oci_available(config.engine.oci_runtime)
        if reason:
            self.report.put("oci", {"skipped": reason})
            return
        figures: dict[str, Any] = {}
        self.report.put("oci", figures)
        server = _ServerThread(config)
        spec = config.compile(config.resolve("bench.cold.python"), "bench-floor")
        floor: OciFloor | None = None
        try:
            floor = OciFloor(spec, runtime=config.engine.oci_runtime, rootfs_dir=config.engine.oci_rootfs_dir,
                             owner=self.owner + "-floor")
            figures["runtime"] = floor.runtime
            server.start()
            async with Client(server.address) as client:
                await self._oci_floor_and_cold(server, client, floor, figures)
                figures["warm"], figures["warm_python_tool"], figures["warm_python_tool_after_grace"] = \
                    await self.warm_paths(server, client)
                figures["python_run_time"] = await self.python_run_time(client)
                await self._oci_throughput(server, client, floor, figures)
        except (RuntimeError, ToolcellError, ClientError, OSError) as exc:
            figures["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            server.stop()
            if floor is not None:
                floor.close()
            await self._oci_sweep(config)

    @staticmethod
    async def _oci_sweep(config: Config) -> None:
        """Whatever of the OCI supervisor's a failure left (runc state, processes, cgroups) goes before its
        state directory does: the same sweep as the MCP section's (``benchmcp.sweep``)."""
        await benchmcp.sweep(config)

    async def _oci_floor_and_cold(self, server: _ServerThread, client: Client, floor: OciFloor,
                                  figures: dict[str, Any]) -> None:
        """The floor and cold calls through gRPC, one of each per round (after the pools filled)."""
        loop = asyncio.get_running_loop()
        stdin = TRIVIAL_ARGS.encode() + b"\n"
        self._step("oci floor, cold")
        await self._pool_full(server=server, tools=("bench.warm", "bench.warm.python", "bench.tp"))
        await loop.run_in_executor(None, floor.once, stdin)  # page cache, runc's own start-up
        await self._call("bench.cold.python", client=client)
        floor_s, cold_s = [], []
        for _ in range(self.plan.oci_n):
            floor_s.append((await loop.run_in_executor(None, floor.once, stdin))[0])
            cold_s.append((await self._call("bench.cold.python", client=client))[0])
            self._tick(2)
        figures["floor"] = summary(floor_s)
        figures["cold"] = summary(cold_s)

    async def _oci_throughput(self, server: _ServerThread, client: Client, floor: OciFloor,
                              figures: dict[str, Any]) -> None:
        """A fresh sandbox per call at ``oci_concurrency``: the floor (reference), cold, pooled."""
        c, total = self.plan.oci_concurrency, self.plan.oci_calls
        stdin = TRIVIAL_ARGS.encode() + b"\n"
        cat = dataclasses.replace(floor.spec, command=tuple(TRIVIAL))
        rows: dict[str, dict[str, Any]] = {}
        cat_floor = OciFloor(cat, runtime=floor.runtime, rootfs_dir=floor.rootfs_dir, owner=self.owner + "-floor8")
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=c) as threads, RssPeak(trim=True) as rss:
                loop = asyncio.get_running_loop()
                self._step(f"oci throughput c={c} floor")
                with CpuMeter() as cpu:
                    rows[f"floor_c{c}"] = await self._closed_loop(
                        c, total, lambda: self._timed_floor(loop, threads, cat_floor, stdin))
                rows[f"floor_c{c}"]["cpu_ms_per_call"] = cpu.per_call_ms(total)
                self._step(f"oci throughput c={c} cold")
                with CpuMeter() as cpu:
                    rows[f"cold_c{c}"] = await self._closed_loop(
                        c, total, lambda: self._timed_call("bench.cold", client))
                rows[f"cold_c{c}"]["cpu_ms_per_call"] = cpu.per_call_ms(total)
                self._step(f"oci throughput c={c} pool {self.plan.oci_pool}")
                await self._pool_full(server=server, tools=("bench.tp",))
                before = await self._stats(server, "bench.tp")
                t0 = time.perf_counter()
                with CpuMeter() as cpu:
                    row = await self._closed_loop(c, total, lambda: self._timed_call("bench.tp", client))
                row["cpu_ms_per_call"] = cpu.per_call_ms(total)
                after = await self._stats(server, "bench.tp")
                hits, misses = after.hits - before.hits, after.misses - before.misses
                row.update(warm_hits=hits, cold_fallbacks=misses, warm_share=hits / max(1, hits + misses),
                           refill_per_s=(after.created - before.created) / (time.perf_counter() - t0),
                           pool_size=self.plan.oci_pool)
                rows[f"pool_c{c}"] = row
        finally:
            cat_floor.close()
        figures["throughput"] = rows
        figures["throughput_rss"] = rss.figures()

    @staticmethod
    async def _timed_floor(loop: asyncio.AbstractEventLoop, threads: concurrent.futures.Executor, floor: OciFloor,
                           stdin: bytes) -> float:
        return (await loop.run_in_executor(threads, floor.once, stdin))[0]

    async def run(self) -> dict[str, Any]:
        backend = DockerBackend(self.config.engine.docker_host)
        transport = "attach"
        try:
            # OCI first: its RSS figure is then its own, not what the Docker sections' floods left in the heap.
            await self.oci()
            self.server.start()
            self.client = Client(self.server.address)
            await self.noop()
            await self.latency(backend)
            await self.warm_over_attach()
            await self.throughput(backend)
            await self.flood(backend)
            await self.hostile()
            await self.mcp_servers()
            await self.sessions()
            transport = str(getattr(self.server.backend, "pool_transport", transport))
        finally:
            if self.client is not None:
                await self.client.close()
            self.server.stop()
            with contextlib.suppress(ToolcellError):  # e.g. the engine is unreachable: nothing was made
                await backend.remove_orphans(self.owner)
            await backend.close()
            self._tmp.cleanup()
        load = os.getloadavg()
        self.report.put("machine", {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in load],
                                    "pool_size": self.plan.pool_size, "pool_transport": transport,
                                    "client_in_process": True})
        self.report.put("targets", targets(self.report.figures))
        return self.report.figures


def total_ticks(plan: Plan) -> int:
    hostile = plan.hostile_n + len(plan.tool_attacks) + len(benchhostile.CALLER_ATTACKS)
    docker = plan.noop_n + 7 * plan.latency_n + 1 + 3 * sum(plan.per_level(c) for c in plan.levels) + 1 + hostile
    return docker + 2 * plan.oci_n + 3 * plan.latency_n + 1 + 3 * plan.oci_calls + plan.mcp().ticks() + \
        3 * plan.session_n * len(benchsession.ENGINES)


def targets(f: dict[str, Any]) -> dict[str, dict[str, Any]]:
    t = f["throughput"]
    raw_p50, cold_p50 = f["raw_docker"]["p50_ms"], f["cold"]["p50_ms"]
    out: dict[str, dict[str, Any]] = {
        "cold_p50_vs_raw": {"value": cold_p50 / raw_p50, "limit": "<= 1.10", "met": cold_p50 <= 1.10 * raw_p50},
        "warm_p50_ms": {"value": f["warm"]["p50_ms"], "limit": "<= 5", "met": f["warm"]["p50_ms"] <= 5},
        "warm_p99_ms": {"value": f["warm"]["p99_ms"], "limit": "<= 20", "met": f["warm"]["p99_ms"] <= 20},
    }
    for key in sorted(k for k in t if k.startswith("cold_c")):
        c = key.removeprefix("cold_c")
        ratio = t[key]["per_s"] / t[f"raw_c{c}"]["per_s"]
        out[f"throughput_c{c}_cold_vs_raw"] = {"value": ratio, "limit": ">= 0.9", "met": ratio >= 0.9}
        wratio = t[f"warm_c{c}"]["per_s"] / t[f"raw_c{c}"]["per_s"]
        out[f"throughput_c{c}_warm_vs_raw"] = {"value": wratio, "limit": ">= 0.9", "met": wratio >= 0.9}
    fl = f["flood"]
    out["flood_rss_growth_mib"] = {"value": fl["rss_growth_mib"], "limit": "<= 32", "met": fl["rss_growth_mib"] <= 32}
    # The engine writes a few KiB of metadata per container, and other users share it: the flood's output
    # reached the disk only if there is a log file, or the engine wrote a share of the flood's size more
    # than around a trivial call (a logging driver writes at least the whole flood).
    extra = max(0, fl["engine_disk_write_bytes"] - fl["engine_disk_write_bytes_trivial_call"])
    out["flood_output_bytes_on_engine_disk"] = {
        "value": fl["log_bytes"] + extra,
        "limit": "0: no log file; engine writes beyond a trivial call's < 10% of the flood",
        "met": fl["log_bytes"] == 0 and extra < fl["mib"] * MiB // 10}
    if "hostile" in f:  # issue 14: met only when every attack ran at its full size
        h = f["hostile"]
        stall, ratio = h["longest_stall_ms"], h["warm_p99_ratio"]
        out["hostile_longest_event_loop_stall_ms"] = {
            "value": stall, "limit": "<= 50, every attack at full size", "met": stall <= 50 and h["all_full"]}
        # The wall-clock stall also counts the loop's thread waiting for a CPU (a busy machine: the quiet run
        # shows how much) or the GIL; this one only the work done on the loop itself.
        cpu = h["longest_loop_cpu_ms"]
        out["hostile_loop_cpu_in_one_stall_ms"] = {
            "value": cpu, "limit": "<= 50, every attack at full size", "met": cpu <= 50 and h["all_full"]}
        out["hostile_warm_p99_attack_vs_quiet"] = {
            "value": ratio, "limit": "<= 2.0, every attack at full size", "met": ratio <= 2.0 and h["all_full"]}
    out.update(benchoci.targets(f))  # issue 15: both backends
    return out


def render(f: dict[str, Any]) -> str:
    lines = ["Docker backend (engine.kind docker)"]
    head = f"{'measurement':38} {'n':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'inv/s':>8}"
    lines += [head, "-" * len(head)]

    def row(name: str, s: dict[str, Any], extra: str = "") -> None:
        lines.append(f"{name:38} {int(s['n']):>5} {s['p50_ms']:>9.2f} {s['p95_ms']:>9.2f} {s['p99_ms']:>9.2f} "
                     f"{s['per_s']:>8.2f}{extra}")

    row("1 no-op gRPC (health Check)", f["noop_grpc"])
    row("2 raw docker-py cycle (NetworkDisabled)", f["raw_docker"])
    if "raw_docker_network_none" in f:
        row("2b raw docker-py, network_mode none", f["raw_docker_network_none"], "   (the older cycle)")
    row("3 toolcell cold (gRPC, end to end)", f["cold"], "   (interleaved with 2 and 2b)")
    row("4 toolcell warm (gRPC, end to end)", f["warm"], f"   warm hits {f['warm']['warm_hits']}/{int(f['warm']['n'])}")
    row("4b warm, Python tool (wordcount)", f["warm_python_tool"], "   (+ the interpreter's own exit)")
    if "warm_python_tool_after_grace" in f:
        g = f["warm_python_tool_after_grace"]
        row(f"4b' the same, {g['grace_s']:g}s after the refill", g, "   (readiness check)")
    if "python_run_time" in f:
        lines.append(benchoci.run_time_line(f["python_run_time"]))
    if "warm_attach" in f:
        row("4c warm over the engine's attach relay", f["warm_attach"], "   (a supervisor in a container)")
    for key, s in f["throughput"].items():
        kind, c = key.split("_c")
        extra = ""
        if kind == "warm":
            extra = (f"   warm {s['warm_hits']}, cold fallback {s['cold_fallbacks']}, "
                     f"refill {s['refill_per_s']:.1f}/s")
        row(f"5 throughput {kind:4} c={c}", s, extra)
    if "throughput_rss" in f:
        r = f["throughput_rss"]
        lines.append(f"   this process's RSS under 5's load: peak {r['rss_peak_mib']:.1f} MiB (before "
                     f"{r['rss_base_mib']:.1f}); the supervisor, the bench's client and the raw cycles share it")
    fl = f["flood"]
    lines += ["", f"6 flood: {fl['mib']} MiB stdout in {fl['seconds']:.2f}s ({fl['mib_per_s']:.0f} MiB/s), "
                  f"kept {fl['kept_bytes']} bytes; supervisor RSS growth {fl['rss_growth_mib']:.1f} MiB; "
                  f"engine disk writes {fl['engine_disk_write_bytes']} bytes (a trivial call: "
                  f"{fl['engine_disk_write_bytes_trivial_call']}); "
                  f"container log {fl['log_path']}: {fl['log_bytes']} bytes"]
    if "hostile" in f:
        lines += render_hostile(f["hostile"])
    if "oci" in f:
        benchoci.render_oci(f["oci"], row, lines)
    if "mcp" in f:
        lines += benchmcp.render_mcp(f["mcp"])
    if "sessions" in f:
        lines += benchsession.render_sessions(f["sessions"])
    lines += ["", f"ratios: cold/raw p50 {f['cold']['p50_ms'] / f['raw_docker']['p50_ms']:.3f}, "
                  f"warm/no-op p50 {f['warm']['p50_ms'] / f['noop_grpc']['p50_ms']:.1f}, "
                  f"warm/cold p50 {f['warm']['p50_ms'] / f['cold']['p50_ms']:.3f}"
                  + (f", warm channel/attach relay p50 {f['warm']['p50_ms'] / f['warm_attach']['p50_ms']:.3f}"
                     if "warm_attach" in f else "")]
    if "raw_docker_network_none" in f:
        none = f["raw_docker_network_none"]["p50_ms"]
        lines[-1] += f", cold/raw network_mode none p50 {f['cold']['p50_ms'] / none:.3f}"
    m = f["machine"]
    lines += [f"machine: {m['cpus']} cpus, load average {m['loadavg']}, pool size {m['pool_size']}, "
              f"pooled sandboxes over the {m['pool_transport']} transport; the bench's client runs in the "
              "supervisors' process", "", "targets:"]
    for name, t in f["targets"].items():
        value = t["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"  {'MET ' if t['met'] else 'MISS'} {name:50} {shown:>12}  (target {t['limit']})")
    return "\n".join(lines)


def render_hostile(h: dict[str, Any]) -> list[str]:
    q, a = h["quiet"], h["attack"]
    lines = ["", f"7 hostile: quiet {q['seconds']:.1f}s, then under attack {a['seconds']:.1f}s, one hostile request at "
                 "a time (ms)",
             "  loop CPU: the most the loop's own thread ran within one probe sleep (a stall far longer than it "
             "waited for the GIL or a CPU)",
             f"  {'':14} {'warm p50':>9} {'warm p99':>9} {'health p99':>10} {'stall max':>10} {'loop CPU':>9} "
             f"{'late p99':>9}  warm/cold/failed"]
    for name, p in (("quiet", q), ("under attack", a)):
        fails = ",".join(f"{k}:{v}" for k, v in sorted(p["failures"].items())) or "0"
        lines.append(f"  {name:14} {p['warm']['p50_ms']:>9.2f} {p['warm']['p99_ms']:>9.2f} "
                     f"{p['health_check']['p99_ms']:>10.2f} {p['stall_max_ms']:>10.1f} "
                     f"{p['stall_loop_cpu_max_ms']:>9.1f} {p['stall_p99_ms']:>9.2f}  "
                     f"{p['warm_hits']}/{p['cold_fallbacks']}/{fails}")
    lines.append(f"  {'attack/quiet':14} {h['warm_p50_ratio']:>9.2f} {h['warm_p99_ratio']:>9.2f}")
    for title, records in (("hostile tool output", h["tool_attacks"]), ("hostile caller", h["caller_attacks"])):
        lines.append(f"  {title}: bytes reached/full, longest stall (loop CPU), outcome; a ladder stops where "
                     f"the next size predicts a stall over {h['ladder_budget_s']:g}s")
        for name, r in records.items():
            outcome = r["rungs"][-1]["outcome"] if r["rungs"] else "-"
            cpu = max((x["loop_cpu_ms"] for x in r["rungs"]), default=0.0)
            cut = f"  CUT: {r['stopped']}" if r["stopped"] else ""
            lines.append(f"    {name:18} {r['reached_bytes']:>8}/{r['full_bytes']:<8} {r['stall_ms']:>9.1f} ms "
                         f"({cpu:.1f})  {outcome}{cut}")
    return lines


@contextlib.contextmanager
def progress(total: int) -> Iterator[tqdm[Any]]:
    bar = tqdm(total=total, file=sys.stderr, unit="call", dynamic_ncols=True, mininterval=0.25,
               bar_format="{desc:28} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
    try:
        yield bar
    finally:
        bar.close()


def main(quick: bool, json_path: str | None) -> int:
    plan = Plan.quick() if quick else Plan.full()
    try:
        with progress(total_ticks(plan)) as bar:
            figures = asyncio.run(Bench(plan, bar).run())
    except RuntimeError as exc:  # a measured call failed: say which, after the bench cleaned up
        print(f"toolcell: bench failed: {exc}", file=sys.stderr)
        return 1
    print(render(figures))
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {json_path}", file=sys.stderr)
    failed = (figures.get("oci") or {}).get("error")
    if failed:  # the OCI backend is there but a measured call failed: the run fails, after its figures
        print(f"toolcell: bench failed: oci: {failed}", file=sys.stderr)
        return 1
    # A measured MCP or session call failed (a skip is no failure).
    mcp_failed = benchmcp.failures(figures.get("mcp") or {}) + benchsession.failures(figures.get("sessions") or {})
    for failure in mcp_failed:
        print(f"toolcell: bench failed: mcp: {failure}", file=sys.stderr)
    return 1 if mcp_failed else 0
