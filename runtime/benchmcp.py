"""``toolcell bench``'s MCP servers section (issue 16): stock MCP servers through a real supervisor, beside
the same image run with no supervisor.

For each stock server image that is present (``STOCK``; a missing one is reported as skipped with the
command that builds it), on the docker engine, and on oci when the image is in the oci rootfs store:

- **discovery**: ``initialize`` + ``tools/list`` in a sandbox (``sources.discovery.discover``, what the
  supervisor's start-up runs for each server), one server at a time; beside it the supervisor's whole
  start-up, which discovers every server at once;
- **cold**: one cheap tool call per server, a fresh sandbox per call (no pool);
- **warm**: the same call with a pool of ``POOL_SIZE`` for that server (the server already started and
  initialized in the pooled sandbox, waiting for its ``tools/call``), each call after the pool refilled
  and its newest sandbox has been ready for the server's discovery time (a pooled sandbox counts as ready
  when its driver runs, before the server's initialize), so no refill's server start competes with the
  call; with the share of calls that were served warm (pool hits / calls);
- **floor** (measured on docker, one floor call then one cold call per round): the same image and command
  as ``docker run -i --rm --network none``, ``initialize`` + ``notifications/initialized`` + ``tools/call``
  over stdio by ``floor_call`` (no supervisor, no driver, no hardening beyond no network), timed until the
  container is gone; and inside it the server's own ``tools/call`` (request to response). oci's cold/floor
  ratio is against that same docker floor (not interleaved with it).

Warm calls begin once every server's pool is full and the servers have had their discovery times together
(the pooled sandboxes of all servers start at once and share the CPUs). A warm call's result arrives when
its sandbox has ended (the driver closes the server's stdin and waits for its exit): the server's exit is
in the figure, its start is not.

Figures are milliseconds, p50 (median) and p90 by nearest rank. The supervisors run on the bench's own
server threads (``make_server``: a real gRPC server on a Unix socket, grpc.aio), with owners of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from toolcell.backends.docker import DockerBackend
from toolcell.backends.factory import open_backend
from toolcell.backends.oci.cgroups import CgroupTree
from toolcell.backends.oci.rootfs import RootfsStore
from toolcell.benchoci import oci_available
from toolcell.benchstats import percentile
from toolcell.client import Client, ClientError
from toolcell.errors import ToolcellError
from toolcell.mcpimages.spec import parse_server_list
from toolcell.model import Result, Status
from toolcell.pipeline import Services
from toolcell.settings import Config, parse_config
from toolcell.sources.catalog import Catalog
from toolcell.sources.discovery import discover
from toolcell.supervisor import Supervisor

POOL_SIZE: Final = 2
SERVERS_LIST: Final = "images/mcp-servers.txt"
CALL_TIMEOUT_S: Final = 60.0
POOL_WAIT_S: Final = 120.0
# The floor's client reads the server's stdout: one message at most this big, at most this many messages
# while it waits for one response (a stock server sends a few notifications at most).
FLOOR_LINE_MAX: Final = 1024 * 1024
FLOOR_MESSAGES_MAX: Final = 1000
PROTOCOL_VERSION: Final = "2025-06-18"


@dataclass(frozen=True)
class StockServer:
    """A stock server image and the one cheap call measured on it."""

    name: str
    image: str
    command: tuple[str, ...]
    tool: str  # the server's own tool name
    arguments: Mapping[str, Any]
    # The call fails fast by design (fetch of a refused loopback port): an error result is its success.
    fails: bool = False

    @property
    def toolcell_name(self) -> str:
        return f"{self.name}.{self.tool}"


# Commands as images/mcp-servers.txt names them (``stock_commands`` reads them; a unit test compares).
STOCK: Final = (
    StockServer("time", "toolcell/mcp-time:latest", ("/opt/mcp/bin/mcp-server-time", "--local-timezone=UTC"),
                "get_current_time", {"timezone": "UTC"}),
    # No network in the sandbox: the fetch (of robots.txt first) is refused at once; isError comes back.
    StockServer("fetch", "toolcell/mcp-fetch:latest", ("/opt/mcp/bin/mcp-server-fetch",),
                "fetch", {"url": "http://127.0.0.1:9/"}, fails=True),
    StockServer("everything", "toolcell/mcp-everything:latest", ("/opt/mcp/bin/mcp-server-everything",),
                "echo", {"message": "one small call"}),
)


@dataclass(frozen=True)
class McpPlan:
    """How much to measure: calls per kind and server, discoveries per server."""

    n: int = 15
    discovery_reps: int = 3
    engines: tuple[str, ...] = ("docker", "oci")
    servers: tuple[StockServer, ...] = STOCK

    def ticks(self) -> int:
        """Progress ticks: per server, each discovery, cold and warm call, and docker's floor calls."""
        return sum(len(self.servers) * (self.discovery_reps + (3 if e == "docker" else 2) * self.n)
                   for e in self.engines)


class ServerHandle(Protocol):
    """The bench's supervisor on its own thread and loop (``bench._ServerThread``)."""

    loop: asyncio.AbstractEventLoop
    address: str

    @property
    def supervisor(self) -> Supervisor: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


# -- pure parts -----------------------------------------------------------------------------------------

def stats(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {"n": float(len(ms)), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90)}


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either is missing or b is not positive."""
    if math.isnan(a) or math.isnan(b) or b <= 0:
        return math.nan
    return a / b


def warm_share(hits: int, misses: int) -> float:
    return hits / (hits + misses) if hits + misses > 0 else math.nan


def build_hint(server: StockServer, engine: str, list_text: str | None) -> str:
    """The command that makes ``server``'s image for ``engine`` (the servers list's line when it names it)."""
    if engine == "oci":
        return f"toolcell images unpack {server.image}"
    source_spec = _list_lines(list_text).get(server.name)
    if source_spec is None:
        return f"toolcell images mcp --from {SERVERS_LIST}"
    source, spec = source_spec
    return f"toolcell images mcp --{source} {spec} --name {server.name}"


def _list_lines(list_text: str | None) -> dict[str, tuple[str, str]]:
    if not list_text:
        return {}
    try:
        requests = parse_server_list(list_text, origin=SERVERS_LIST)
    except ToolcellError:
        return {}
    return {r.name: (r.package.source, r.package.requirement) for r in requests}


def stock_commands(list_text: str) -> dict[str, str]:
    """Each server's command as the list's comment names it (``# /opt/mcp/bin/...``), by name."""
    out: dict[str, str] = {}
    for raw in list_text.splitlines():
        line, _, comment = raw.partition("#")
        fields = line.split()
        if len(fields) >= 3 and comment.strip().startswith("/"):
            out[fields[2]] = comment.split()[0]
    return out


def config_doc(socket_path: str, owner: str, servers: list[StockServer], *, engine: Mapping[str, Any] | None,
               catalogs: Mapping[str, list[str]] | None = None) -> dict[str, Any]:
    """The section's supervisor: ``servers`` with no pool (``catalogs`` None), or each with a pool of
    ``POOL_SIZE`` and every tool but the measured one hidden (``catalogs``: the server's tool names)."""
    entries: list[dict[str, Any]] = []
    for s in servers:
        entry: dict[str, Any] = {"name": s.name, "image": s.image, "command": list(s.command),
                                 "discovery_timeout": "60s"}
        if catalogs is not None:
            entry["pool"] = {"size": POOL_SIZE, "ttl": "10m"}
            hidden = sorted(t for t in catalogs.get(s.name, []) if t != s.tool)
            if hidden:
                entry["tools"] = {t: {"hidden": True} for t in hidden}
        entries.append(entry)
    doc: dict[str, Any] = {
        "version": 1,
        "server": {"listen": f"unix://{socket_path}", "instance": owner, "shutdown_grace": "2s"},
        "profiles": {"default": {"timeout": "60s"}},
        "tools": [],
        "servers": entries,
    }
    if engine is not None:
        doc["engine"] = dict(engine)
    return doc


def check_result(server: StockServer, result: Result) -> str:
    """"" when the supervisor's result is the call's expected one, else what is wrong (short)."""
    if server.fails:
        if result.status is Status.ERROR and (result.is_error or result.message):
            return ""
        return f"expected an error result, got {result.status.value}"
    if result.status is not Status.OK or result.is_error:
        return f"{result.status.value}{' (isError)' if result.is_error else ''}: {result.message[:200]}"
    if not result.content:
        return "no content"
    return ""


def floor_requests(server: StockServer) -> tuple[bytes, bytes, bytes]:
    """The floor client's three lines: initialize (id 0), notifications/initialized, tools/call (id 1)."""
    def line(message: dict[str, Any]) -> bytes:
        return json.dumps({"jsonrpc": "2.0", **message}, separators=(",", ":")).encode() + b"\n"

    return (line({"id": 0, "method": "initialize",
                  "params": {"protocolVersion": PROTOCOL_VERSION, "capabilities": {},
                             "clientInfo": {"name": "toolcell-bench", "version": "0"}}}),
            line({"method": "notifications/initialized"}),
            line({"id": 1, "method": "tools/call",
                  "params": {"name": server.tool, "arguments": dict(server.arguments)}}))


def response_to(line: bytes, request_id: int) -> dict[str, Any] | None:
    """The JSON-RPC response to ``request_id`` in one line of the server's stdout, else None."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if isinstance(message, dict) and message.get("id") == request_id and ("result" in message or "error" in message):
        return message
    return None


def check_floor_response(server: StockServer, response: Mapping[str, Any]) -> str:
    """"" when the floor's tools/call response is the expected one (the same rule as ``check_result``)."""
    result = response.get("result")
    failed = "error" in response or (isinstance(result, dict) and result.get("isError") is True)
    if server.fails:
        return "" if failed else "expected an error"
    if failed or not isinstance(result, dict) or not result.get("content"):
        return "the call failed" if failed else "no content"
    return ""


# -- the floor --------------------------------------------------------------------------------------------

async def _read_response(stdout: asyncio.StreamReader, request_id: int) -> dict[str, Any]:
    for _ in range(FLOOR_MESSAGES_MAX):
        line = await stdout.readline()  # bounded by the reader's limit (FLOOR_LINE_MAX)
        if not line:
            raise RuntimeError(f"floor: the server exited before answering request {request_id}")
        response = response_to(line, request_id)
        if response is not None:
            return response
    raise RuntimeError(f"floor: no answer to request {request_id} in {FLOOR_MESSAGES_MAX} messages")


async def floor_call(server: StockServer, docker: str = "docker") -> tuple[float, float]:
    """One ``docker run -i --rm --network none`` of the server: initialize, initialized, the call, stdin
    closed, the container gone. (Seconds end to end, seconds from the call's request to its response: the
    server's own call time); RuntimeError when the call is not the expected one."""
    name = "toolcell-bench-mcp-floor-" + secrets.token_hex(5)
    init, initialized, call = floor_requests(server)
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        docker, "run", "-i", "--rm", "--network", "none", "--name", name, server.image, *server.command,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        limit=FLOOR_LINE_MAX)
    if proc.stdin is None or proc.stdout is None:  # pipes were asked for: never
        raise RuntimeError(f"floor {server.name}: no pipes")
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            proc.stdin.write(init)
            await proc.stdin.drain()
            await _read_response(proc.stdout, 0)
            t_call = time.perf_counter()
            proc.stdin.write(initialized + call)
            await proc.stdin.drain()
            response = await _read_response(proc.stdout, 1)
            call_s = time.perf_counter() - t_call
            proc.stdin.close()
            while await proc.stdout.read(65536):  # whatever else it writes until it exits: dropped
                pass
            code = await proc.wait()
    except (TimeoutError, ValueError, OSError) as exc:  # ValueError: a line over FLOOR_LINE_MAX
        raise RuntimeError(f"floor {server.name}: {type(exc).__name__}") from exc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
            rm = await asyncio.create_subprocess_exec(docker, "rm", "-f", name, stdout=asyncio.subprocess.DEVNULL,
                                                      stderr=asyncio.subprocess.DEVNULL)
            await rm.wait()
    elapsed = time.perf_counter() - t0
    wrong = check_floor_response(server, response)
    if wrong or code != 0:
        raise RuntimeError(f"floor {server.name}: {wrong or f'docker run exited {code}'}")
    return elapsed, call_s


# -- the section ------------------------------------------------------------------------------------------

class McpSection:
    """The section's run: ``run()`` returns its figures (``render_mcp`` prints them). ``owner`` prefixes
    its supervisors' owners, ``tmp`` holds their sockets and oci state; ``step``/``tick``: progress."""

    def __init__(self, plan: McpPlan, owner: str, tmp: str, make_server: Callable[[Config], ServerHandle], *,
                 step: Callable[[str], None] = lambda label: None, tick: Callable[[int], None] = lambda n: None,
                 docker_host: str | None = None, list_text: str | None = None) -> None:
        self.plan = plan
        self.owner = owner
        self.tmp = tmp
        self.make_server = make_server
        self.step = step
        self.tick = tick
        self.docker_host = docker_host
        self.list_text = list_text
        # docker's floor and server call time by server, for the oci rows' ratio
        self._floors: dict[str, tuple[dict[str, float], dict[str, float]]] = {}

    async def run(self) -> dict[str, Any]:
        if self.list_text is None:
            with contextlib.suppress(OSError):
                self.list_text = Path(SERVERS_LIST).read_text(encoding="utf-8")[:1 << 20]  # noqa: ASYNC240
        engines: dict[str, Any] = {}
        for engine in self.plan.engines:
            engines[engine] = await self._engine(engine)
        return {"n": self.plan.n, "pool_size": POOL_SIZE, "discovery_reps": self.plan.discovery_reps,
                "engines": engines}

    def _config(self, engine: str, servers: list[StockServer], label: str,
                catalogs: Mapping[str, list[str]] | None = None) -> Config:
        engine_doc: dict[str, Any] | None = None
        if engine == "oci":
            state = os.path.join(self.tmp, f"mcp-oci-{label}")
            os.makedirs(state, mode=0o700, exist_ok=True)
            engine_doc = {"kind": "oci", "oci": {"state_dir": state}}
        doc = config_doc(os.path.join(self.tmp, f"m{engine[0]}{label}.sock"), f"{self.owner}-mcp-{engine}-{label}",
                         servers, engine=engine_doc, catalogs=catalogs)
        environ = {"DOCKER_HOST": self.docker_host} if self.docker_host else {}
        return parse_config(doc, environ=environ, base_dir=Path.cwd())

    async def _present(self, engine: str) -> tuple[list[StockServer], dict[str, str], str]:
        """The servers whose image is there, the others' skip notes, and why the engine is skipped ("")."""
        present: list[StockServer] = []
        skipped: dict[str, str] = {}
        if engine == "oci":
            reason = oci_available(self._config("oci", [], "probe").engine.oci_runtime)
            if reason:
                return [], {}, reason
            store = RootfsStore(self._config("oci", [], "probe").engine.oci_rootfs_dir)
            for s in self.plan.servers:
                if store.has_image(s.image):
                    present.append(s)
                else:
                    hint = build_hint(s, "oci", self.list_text)
                    skipped[s.name] = f"{s.image} is not in the oci rootfs store; {hint}"
            return present, skipped, ""
        backend = DockerBackend(self.docker_host)
        try:
            for s in self.plan.servers:
                if await backend.has_image(s.image):
                    present.append(s)
                else:
                    skipped[s.name] = f"{s.image} is missing; build it: {build_hint(s, 'docker', self.list_text)}"
        finally:
            await backend.close()
        return present, skipped, ""

    async def _engine(self, engine: str) -> dict[str, Any]:
        """One engine's figures; a failure is recorded (``error``), not raised."""
        try:
            present, skipped, reason = await self._present(engine)
        except (ToolcellError, OSError) as exc:
            return {"skipped_engine": f"{type(exc).__name__}: {exc}"}
        out: dict[str, Any] = {"skipped": skipped, "servers": {}}
        if reason:
            return {"skipped_engine": reason}
        if not present:
            return out
        try:
            catalogs = await self._cold(engine, present, out)
            live = [s for s in present if s.name in catalogs]
            if live:
                await self._warm(engine, live, catalogs, out)
        except (RuntimeError, ToolcellError, ClientError, OSError) as exc:
            out["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        return out

    async def _on(self, server: ServerHandle, coro: Awaitable[Any]) -> Any:
        """Run ``coro`` on the supervisor's own loop (it is not thread-safe)."""
        async def wrap() -> Any:
            return await coro

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(wrap(), server.loop))

    async def _call(self, client: Client, s: StockServer) -> float:
        t0 = time.perf_counter()
        result = await client.call(s.toolcell_name, dict(s.arguments), timeout=CALL_TIMEOUT_S)
        elapsed = time.perf_counter() - t0
        wrong = check_result(s, result)
        if wrong:
            raise RuntimeError(f"{s.toolcell_name}: {wrong}")
        return elapsed

    async def _cold(self, engine: str, present: list[StockServer], out: dict[str, Any]) -> dict[str, list[str]]:
        """Start-up, discovery one server at a time, then cold calls (on docker, each after a floor call)."""
        self.step(f"mcp {engine}: start-up")
        config = self._config(engine, present, "cold")
        server = self.make_server(config)
        catalogs: dict[str, list[str]] = {}
        t0 = time.perf_counter()
        try:
            server.start()
            out["startup_ms"] = (time.perf_counter() - t0) * 1000
            sup = server.supervisor
            errors = dict(await self._on(server, _read(lambda: sup.source_errors)))
            for s in present:
                row: dict[str, Any] = {"tool": s.toolcell_name}
                out["servers"][s.name] = row
                error = errors.get(s.name, "")
                if error:
                    row["error"] = error[:400]
                    continue
                self.step(f"mcp {engine}: discover {s.name}")
                samples: list[float] = []
                catalog: Catalog | None = None
                for _ in range(self.plan.discovery_reps):
                    t1 = time.perf_counter()
                    catalog = await self._on(server, _discover(sup, s.name))
                    samples.append(time.perf_counter() - t1)
                    self.tick(1)
                if catalog is None:
                    raise RuntimeError("discovery_reps must be at least 1")
                names = [t.name for t in catalog.tools]
                if s.tool not in names:
                    row["error"] = f"the server lists no tool {s.tool!r}"
                    continue
                row["discovery"] = stats(samples)
                row["tools_listed"] = len(names)
                catalogs[s.name] = names
            async with Client(server.address) as client:
                for s in present:
                    if s.name in catalogs:
                        await self._cold_calls(engine, client, s, out["servers"][s.name])
        finally:
            server.stop()
            await sweep(config)
        return catalogs

    async def _cold_calls(self, engine: str, client: Client, s: StockServer, row: dict[str, Any]) -> None:
        self.step(f"mcp {engine}: cold {s.name}")
        floor = engine == "docker"
        await self._call(client, s)  # page cache, the engine's first start of this image
        if floor:
            await floor_call(s)
        cold, floors, calls = [], [], []
        for _ in range(self.plan.n):
            if floor:
                whole, call = await floor_call(s)
                floors.append(whole)
                calls.append(call)
            cold.append(await self._call(client, s))
            self.tick(2 if floor else 1)
        row["cold"] = stats(cold)
        if floor:
            row["floor"] = stats(floors)
            row["server_call"] = stats(calls)
            self._floors[s.name] = row["floor"], row["server_call"]
        elif s.name in self._floors:
            row["floor_from_docker"], row["server_call"] = self._floors[s.name]

    async def _warm(self, engine: str, live: list[StockServer], catalogs: Mapping[str, list[str]],
                    out: dict[str, Any]) -> None:
        """A pool of ``POOL_SIZE`` per server; each call after the pool refilled."""
        self.step(f"mcp {engine}: warm start-up")
        config = self._config(engine, live, "warm", catalogs)
        server = self.make_server(config)
        try:
            server.start()
            pools = server.supervisor.pools
            # Every server's pooled sandboxes start at once and share the CPUs: the first calls wait until all
            # pools are full and then for the servers' discovery times together (their starts, one by one).
            for s in live:
                await self._settled(server, s.toolcell_name)
            await asyncio.sleep(sum(out["servers"][s.name]["discovery"]["p50_ms"] for s in live) / 1000)
            async with Client(server.address) as client:
                for s in live:
                    self.step(f"mcp {engine}: warm {s.name}")
                    tool = s.toolcell_name
                    row = out["servers"][s.name]
                    before = (await self._on(server, _read(pools.stats))).get(tool)
                    if before is None:
                        row["error"] = f"{tool} is not pooled"
                        continue
                    # A pooled sandbox counts as ready once its driver runs; the server's start and initialize
                    # follow. Each call waits until the pool is full and its newest sandbox has been ready for
                    # the server's discovery time (start + initialize + tools/list: an upper bound).
                    grace = row["discovery"]["p50_ms"] / 1000
                    samples = []
                    for _ in range(self.plan.n):
                        await self._settled(server, tool)
                        await asyncio.sleep(grace)
                        samples.append(await self._call(client, s))
                        self.tick(1)
                    after = (await self._on(server, _read(pools.stats)))[tool]
                    hits, misses = after.hits - before.hits, after.misses - before.misses
                    row["warm"] = {**stats(samples), "warm_hits": hits, "cold_fallbacks": misses,
                                   "warm_share": warm_share(hits, misses), "grace_ms": grace * 1000}
        finally:
            server.stop()
            await sweep(config)

    async def _settled(self, server: ServerHandle, tool: str) -> None:
        pools = server.supervisor.pools
        deadline = time.monotonic() + POOL_WAIT_S
        while not await self._on(server, _read(lambda: pools.settled(tool))):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the pool of {tool} did not fill in {POOL_WAIT_S:.0f}s")
            await asyncio.sleep(0.02)


async def _read(fn: Callable[[], Any]) -> Any:
    return fn()


async def _discover(sup: Supervisor, name: str) -> Catalog:
    """What the supervisor's start-up runs for server ``name`` (on the supervisor's loop)."""
    services = Services(config=sup.config, backend=sup.backend, redactor=sup.redactor)
    return await discover(services, sup.config.sources[name])


async def sweep(config: Config) -> None:
    """Whatever a stopped supervisor of the section left (a failed start, say) goes; on oci also its owner's
    (empty) cgroup directories, which the backend keeps (each of the section's owners is used once)."""
    backend = open_backend(config)
    try:
        with contextlib.suppress(ToolcellError):
            await backend.remove_orphans(config.server.instance)
    finally:
        await backend.close()
    if config.engine.kind == "oci":
        with contextlib.suppress(ToolcellError, OSError):
            for d in CgroupTree().owner_dirs(config.server.instance):
                with contextlib.suppress(OSError):
                    d.rmdir()


# -- the table ----------------------------------------------------------------------------------------------

def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _x(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


_NAN: Final = {"p50_ms": math.nan, "p90_ms": math.nan}


def server_ratios(row: Mapping[str, Any]) -> dict[str, float]:
    """cold/floor and warm/cold p50 (NaN where a figure is missing); the floor is docker's."""
    cold = row.get("cold", _NAN)["p50_ms"]
    floor = (row.get("floor") or row.get("floor_from_docker") or _NAN)["p50_ms"]
    warm = row.get("warm", _NAN)["p50_ms"]
    return {"cold_vs_floor": ratio(cold, floor), "warm_vs_cold": ratio(warm, cold)}


def _row(engine: str, name: str, row: Mapping[str, Any]) -> str:
    w = row.get("warm", _NAN)
    floor = row.get("floor") or row.get("floor_from_docker") or _NAN
    share = w.get("warm_share", math.nan)
    r = server_ratios(row)
    tool = str(row["tool"]).split(".", 1)[-1]
    mark = "*" if "floor_from_docker" in row else " "
    return (f"  {engine:6} {name:10} {tool[:18]:18} {_ms(row.get('discovery', _NAN)['p50_ms']):>8} "
            f"{_ms(row['cold']['p50_ms']):>8} {_ms(row['cold']['p90_ms']):>8} {_ms(w['p50_ms']):>8} "
            f"{_ms(w['p90_ms']):>8} {'-' if math.isnan(share) else f'{share:.0%}':>5} {_ms(floor['p50_ms']):>8}"
            f"{mark}{_ms(row.get('server_call', _NAN)['p50_ms']):>7} {_x(r['cold_vs_floor']):>10} "
            f"{_x(r['warm_vs_cold']):>9}")


def render_mcp(m: Mapping[str, Any]) -> list[str]:
    """The section's table, what was skipped or failed, and the closing note with the p50 ratios."""
    lines = ["", "MCP servers (stock images; tools/call through a supervisor on each engine; ms)",
             f"  discover: initialize + tools/list in a sandbox, one server at a time ({m['discovery_reps']} each); "
             f"{m['n']} calls of each kind",
             "  cold: a fresh sandbox per call, no pool; floor: docker run -i --rm --network none + initialize + "
             "tools/call over stdio, no supervisor, one before each docker cold call",
             f"  warm: a pool of {m['pool_size']}, each call once the pool refilled and its newest sandbox was ready "
             "for the server's discovery time; warm%: calls served warm",
             "  call: the server's own tools/call (request to response) inside the floor"]
    head = (f"  {'engine':6} {'server':10} {'tool':18} {'discover':>8} {'cold p50':>8} {'cold p90':>8} "
            f"{'warm p50':>8} {'warm p90':>8} {'warm%':>5} {'floor':>8} {'call':>7} {'cold/floor':>10} "
            f"{'warm/cold':>9}")
    lines += [head, "  " + "-" * (len(head) - 2)]
    notes: list[str] = []
    closing: list[str] = []
    for engine, e in m["engines"].items():
        if "skipped_engine" in e:
            notes.append(f"  {engine}: not measured: {e['skipped_engine']}")
            continue
        notes += [f"  {engine} {name}: skipped: {why}" for name, why in e.get("skipped", {}).items()]
        for name, row in e.get("servers", {}).items():
            if "cold" in row:
                lines.append(_row(engine, name, row))
                r = server_ratios(row)
                closing.append(f"{engine} {name} {_x(r['cold_vs_floor'])} / {_x(r['warm_vs_cold'])}")
            if "error" in row:
                notes.append(f"  {engine} {name}: FAILED: {row['error']}")
        if "startup_ms" in e:
            notes.append(f"  {engine}: the supervisor's start-up, every server discovered at once: "
                         f"{e['startup_ms']:.0f} ms")
        if "error" in e:
            notes.append(f"  {engine}: FAILED: {e['error']}")
    if any("floor_from_docker" in row for e in m["engines"].values() for row in e.get("servers", {}).values()):
        notes.append("  *: docker's floor and call (measured interleaved with docker's cold calls, not with these)")
    lines += notes
    if closing:
        lines.append("  p50 cold/floor / warm/cold, measured side by side in this run: " + "; ".join(closing))
    return lines


def failures(m: Mapping[str, Any]) -> list[str]:
    """What failed in the section (a skipped image or engine is no failure)."""
    out: list[str] = []
    for engine, e in m.get("engines", {}).items():
        if "error" in e:
            out.append(f"{engine}: {e['error']}")
        out += [f"{engine} {name}: {row['error']}" for name, row in e.get("servers", {}).items() if "error" in row]
    return out
