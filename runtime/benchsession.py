"""Bench section 9: a call in an open session beside a warm one-shot call, on each engine (issue 18).

One supervisor per engine, three tools on the same image and profile:

- ``bench.oneshot``: Python code (pyrun), pooled (2): each call claims a started sandbox whose
  interpreter is up, and the sandbox is removed after it: the fastest fresh-sandbox call toolcell has;
- ``bench.session``: the same code in an open session, run by the resident REPL (pyrepl): no sandbox is
  created or removed per call, the interpreter (and the caller's variables) stay;
- ``bench.session.exec``: a Python tool (wordcount) in an open session, spawned fresh for each call
  in the session's sandbox (state in files only).

Calls alternate one of each per round, the warm call once its pool refilled, so all three see the same
machine. What is printed: medians and p90 of each, the session call's per-call overhead as a ratio of the
warm one-shot's, the time to open a session (its sandbox created and started) and its first call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from toolcell.benchmcp import ServerHandle, sweep
from toolcell.benchoci import oci_available
from toolcell.benchstats import percentile
from toolcell.client import Client, ClientError
from toolcell.errors import ToolcellError
from toolcell.model import Status
from toolcell.settings import Config, parse_config

IMAGE = "toolcell/python:bookworm"
PYRUN = ["python3", "-I", "-u", "/opt/toolcell/tools/pyrun.py"]
PYREPL = ["python3", "-I", "-u", "/opt/toolcell/tools/pyrepl.py"]
WORDCOUNT = ["python3", "-I", "/opt/toolcell/tools/wordcount.py"]
CODE = {"code": "x = sum(range(100))"}
TEXT = {"text": "one small call"}
ENGINES = ("docker", "oci")
POOL = 2


def config_doc(socket_path: str, owner: str, engine: Mapping[str, Any] | None) -> dict[str, Any]:
    session = {"idle_ttl": "10m", "max_calls": 100000}
    doc: dict[str, Any] = {
        "version": 1,
        "server": {"listen": f"unix://{socket_path}", "instance": owner, "shutdown_grace": "2s"},
        "profiles": {"default": {"timeout": "60s"}},
        "tools": [
            {"name": "bench.oneshot", "description": "Python code, pooled", "image": IMAGE, "command": PYRUN,
             "pool": {"size": POOL, "ttl": "10m"}},
            {"name": "bench.session", "description": "Python code in a session (REPL)", "image": IMAGE,
             "command": PYRUN, "session": {**session, "command": PYREPL}},
            {"name": "bench.session.exec", "description": "a Python tool in a session, a process per call",
             "image": IMAGE, "command": WORDCOUNT, "session": session},
        ],
    }
    if engine is not None:
        doc["engine"] = dict(engine)
    return doc


def _summary(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {"n": float(len(ms)), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90)}


class SessionSection:
    """``run()`` returns the figures (``render_sessions`` prints them); ``make_server`` starts a supervisor
    on its own thread (``bench._ServerThread``)."""

    def __init__(self, n: int, owner: str, tmp: str, make_server: Callable[[Config], ServerHandle], *,
                 step: Callable[[str], None] = lambda label: None, tick: Callable[[int], None] = lambda n: None,
                 docker_host: str | None = None) -> None:
        self.n = n
        self.owner = owner
        self.tmp = tmp
        self.make_server = make_server
        self.step = step
        self.tick = tick
        self.docker_host = docker_host

    def _config(self, engine: str) -> Config:
        engine_doc: dict[str, Any] | None = None
        if engine == "oci":
            state = os.path.join(self.tmp, "sessions-oci")
            os.makedirs(state, mode=0o700, exist_ok=True)
            engine_doc = {"kind": "oci", "oci": {"state_dir": state}}
        doc = config_doc(os.path.join(self.tmp, f"s{engine[0]}.sock"), f"{self.owner}-ses-{engine}", engine_doc)
        environ = {"DOCKER_HOST": self.docker_host} if self.docker_host else {}
        return parse_config(doc, environ=environ, base_dir=Path.cwd())

    async def run(self) -> dict[str, Any]:
        engines: dict[str, Any] = {}
        for engine in ENGINES:
            config = self._config(engine)
            if engine == "oci":
                reason = oci_available(config.engine.oci_runtime)
                if reason:
                    engines[engine] = {"skipped": reason}
                    continue
            server = self.make_server(config)
            try:
                server.start()
                async with Client(server.address) as client:
                    engines[engine] = await self._engine(engine, server, client)
            except (RuntimeError, ToolcellError, ClientError, OSError) as exc:
                engines[engine] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                server.stop()
                if engine == "oci":
                    await sweep(config)
        return {"n": self.n, "pool_size": POOL, "engines": engines}

    async def _settled(self, server: ServerHandle, timeout_s: float = 60.0) -> None:
        pools = server.supervisor.pools
        deadline = time.monotonic() + timeout_s
        while True:
            settled = asyncio.run_coroutine_threadsafe(_ask(lambda: pools.settled("bench.oneshot")), server.loop)
            if await asyncio.wrap_future(settled):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the pool of bench.oneshot did not fill in {timeout_s:.0f}s")
            await asyncio.sleep(0.02)

    async def _engine(self, engine: str, server: ServerHandle, client: Client) -> dict[str, Any]:
        self.step(f"9 sessions ({engine})")
        opened: list[float] = []
        first: list[float] = []
        sessions: dict[str, str] = {}
        for tool, arguments in (("bench.session", CODE), ("bench.session.exec", TEXT)):
            t0 = time.perf_counter()
            info = await client.open_session(tool)
            t1 = time.perf_counter()
            await _checked(client.call(tool, arguments, session=info.session_id))
            opened.append(t1 - t0)
            first.append(time.perf_counter() - t1)
            sessions[tool] = info.session_id
        await self._settled(server)
        await _checked(client.call("bench.oneshot", CODE))  # the page cache, the pool's first claim
        samples: dict[str, list[float]] = {"oneshot": [], "session": [], "session_exec": []}
        try:
            for _ in range(self.n):
                await self._settled(server)
                samples["oneshot"].append(await _timed(client.call("bench.oneshot", CODE)))
                samples["session"].append(
                    await _timed(client.call("bench.session", CODE, session=sessions["bench.session"])))
                samples["session_exec"].append(
                    await _timed(client.call("bench.session.exec", TEXT, session=sessions["bench.session.exec"])))
                self.tick(3)
        finally:
            for session_id in sessions.values():
                with contextlib.suppress(ClientError):
                    await client.close_session(session_id)
        rows = {name: _summary(s) for name, s in samples.items()}
        warm = rows["oneshot"]["p50_ms"]
        return {**rows, "open_p50_ms": percentile([s * 1000 for s in opened], 50),
                "first_call_p50_ms": percentile([s * 1000 for s in first], 50),
                "session_vs_oneshot": rows["session"]["p50_ms"] / warm if warm else float("nan"),
                "session_exec_vs_oneshot": rows["session_exec"]["p50_ms"] / warm if warm else float("nan")}


async def _ask(fn: Callable[[], bool]) -> bool:
    return fn()


async def _checked(call: Any) -> float:
    result = await call
    if result.status is not Status.OK:
        raise RuntimeError(f"a measured call failed: {result.status.value} {result.message} {result.stderr[:200]}")
    return 0.0


async def _timed(call: Any) -> float:
    t0 = time.perf_counter()
    await _checked(call)
    return time.perf_counter() - t0


def render_sessions(s: Mapping[str, Any]) -> list[str]:
    lines = ["", f"Sessions: a call in an open session beside a warm one-shot call ({s['n']} rounds, ms)",
             f"  one-shot: a fresh sandbox per call from a pool of {s['pool_size']} (the interpreter started), "
             "removed after it",
             "  session: the same Python code in an open session, the resident REPL (no sandbox per call)",
             "  session exec: a Python tool spawned fresh per call in the session's sandbox",
             f"  {'engine':6} {'one-shot p50':>12} {'session p50':>11} {'session/one-shot':>16} "
             f"{'exec p50':>8} {'exec/one-shot':>13} {'open':>6} {'1st call':>8}"]
    for engine, e in s["engines"].items():
        if "skipped" in e or "error" in e:
            lines.append(f"  {engine:6} not measured: {e.get('skipped') or e.get('error')}")
            continue
        lines.append(f"  {engine:6} {e['oneshot']['p50_ms']:12.1f} {e['session']['p50_ms']:11.1f} "
                     f"{e['session_vs_oneshot']:15.2f}x {e['session_exec']['p50_ms']:8.1f} "
                     f"{e['session_exec_vs_oneshot']:12.2f}x {e['open_p50_ms']:6.0f} {e['first_call_p50_ms']:8.1f}")
    return lines


def failures(s: Mapping[str, Any]) -> list[str]:
    return [f"sessions {engine}: {e['error']}" for engine, e in s.get("engines", {}).items() if "error" in e]
