"""The bench's MCP servers section (issue 16): its figures, ratios, table, config and floor client. No engine:
the floor client runs against a fake ``docker`` that speaks MCP over stdio itself."""

from __future__ import annotations

import math
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from toolcell import benchmcp
from toolcell.benchmcp import (
    POOL_SIZE,
    STOCK,
    StockServer,
    build_hint,
    check_floor_response,
    check_result,
    config_doc,
    failures,
    floor_call,
    floor_requests,
    ratio,
    render_mcp,
    response_to,
    server_ratios,
    stats,
    stock_commands,
    warm_share,
)
from toolcell.model import Result, Status, Usage
from toolcell.settings import parse_config

REPO = Path(__file__).resolve().parents[2]
TIME, FETCH, EVERYTHING = STOCK
NAN = math.nan


@pytest.mark.parametrize(("samples_ms", "p50", "p90"), [
    ([10.0], 10.0, 10.0),
    ([30.0, 10.0, 20.0], 20.0, 30.0),
    ([float(i) for i in range(1, 11)], 5.0, 9.0),  # nearest rank
    ([float(i) for i in range(1, 16)], 8.0, 14.0),
])
def test_stats_are_nearest_rank_medians_and_p90_in_ms(samples_ms: list[float], p50: float, p90: float) -> None:
    s = stats([x / 1000 for x in samples_ms])
    assert (s["n"], s["p50_ms"], s["p90_ms"]) == (len(samples_ms), pytest.approx(p50), pytest.approx(p90))


def test_stats_of_nothing_are_nan() -> None:
    s = stats([])
    assert s["n"] == 0 and math.isnan(s["p50_ms"]) and math.isnan(s["p90_ms"])


@pytest.mark.parametrize(("a", "b", "expected"), [
    (800.0, 1000.0, 0.8),
    (1500.0, 1000.0, 1.5),
    (NAN, 1000.0, NAN),
    (800.0, NAN, NAN),
    (800.0, 0.0, NAN),
    (800.0, -1.0, NAN),
])
def test_ratio(a: float, b: float, expected: float) -> None:
    got = ratio(a, b)
    assert math.isnan(got) if math.isnan(expected) else got == pytest.approx(expected)


@pytest.mark.parametrize(("hits", "misses", "expected"), [(3, 0, 1.0), (2, 1, 2 / 3), (0, 3, 0.0), (0, 0, NAN)])
def test_warm_share(hits: int, misses: int, expected: float) -> None:
    got = warm_share(hits, misses)
    assert math.isnan(got) if math.isnan(expected) else got == pytest.approx(expected)


SERVERS_LIST = (REPO / "images" / "mcp-servers.txt").read_text()


@pytest.mark.parametrize(("server", "engine", "list_text", "hint"), [
    (TIME, "docker", SERVERS_LIST, "toolcell images mcp --pypi mcp-server-time==2026.10.19 --name time"),
    (EVERYTHING, "docker", SERVERS_LIST,
     "toolcell images mcp --npm @modelcontextprotocol/server-everything@2026.8.31 --name everything"),
    (TIME, "docker", None, "toolcell images mcp --from images/mcp-servers.txt"),
    (TIME, "docker", "not a servers list\n", "toolcell images mcp --from images/mcp-servers.txt"),
    (FETCH, "oci", SERVERS_LIST, "toolcell images unpack toolcell/mcp-fetch:latest"),
])
def test_build_hint_names_the_command_that_makes_the_image(server: StockServer, engine: str, list_text: str | None,
                                                           hint: str) -> None:
    assert build_hint(server, engine, list_text) == hint


def test_the_stock_commands_are_the_servers_lists() -> None:
    listed = stock_commands(SERVERS_LIST)
    assert {s.name: s.command[0] for s in STOCK} == {name: listed[name] for name in ("time", "fetch", "everything")}
    assert {s.name: s.image for s in STOCK} == {n: f"toolcell/mcp-{n}:latest" for n in ("time", "fetch", "everything")}


def test_the_cold_config_pools_nothing_and_the_warm_one_pools_only_the_measured_tool() -> None:
    catalogs = {"time": ["get_current_time", "convert_time"], "everything": ["echo", "get-sum", "get-env"]}
    cold = parse_config(config_doc("/nonexistent/c.sock", "bench-x-mcp", [TIME, EVERYTHING], engine=None),
                        environ={}, base_dir=REPO)
    assert sorted(cold.sources) == ["everything", "time"] and not cold.source_pools
    assert cold.sources["time"].command == TIME.command and cold.sources["time"].profile == "default"
    warm = parse_config(config_doc("/nonexistent/w.sock", "bench-x-mcp", [TIME, EVERYTHING],
                                   engine={"kind": "oci", "oci": {"state_dir": "/nonexistent/state"}},
                                   catalogs=catalogs), environ={}, base_dir=REPO)
    assert warm.engine.kind == "oci"
    assert {n: p.size for n, p in warm.source_pools.items()} == {"time": POOL_SIZE, "everything": POOL_SIZE}
    hidden = {n: sorted(t for t, o in s.overrides.items() if o.hidden) for n, s in warm.sources.items()}
    assert hidden == {"time": ["convert_time"], "everything": ["get-env", "get-sum"]}


def _result(status: Status, *, is_error: bool = False, text: str = "x", message: str = "") -> Result:
    return Result(status=status, exit_code=0, output=text, stderr="", truncated=False, duration_ms=1, usage=Usage(),
                  trace_id="", invocation_id="", message=message, is_error=is_error,
                  content=({"type": "text", "text": text},) if text else ())


@pytest.mark.parametrize(("server", "result", "wrong"), [
    (TIME, _result(Status.OK), ""),
    (TIME, _result(Status.OK, text=""), "no content"),
    (TIME, _result(Status.ERROR, is_error=True), "error (isError)"),
    (TIME, _result(Status.TIMEOUT, text="", message="timed out"), "timeout: timed out"),
    (FETCH, _result(Status.ERROR, is_error=True), ""),
    (FETCH, _result(Status.ERROR, text="", message="the MCP server failed"), ""),  # a JSON-RPC error
    (FETCH, _result(Status.OK), "expected an error result, got ok"),
])
def test_check_result(server: StockServer, result: Result, wrong: str) -> None:
    assert check_result(server, result).startswith(wrong) and bool(check_result(server, result)) == bool(wrong)


@pytest.mark.parametrize(("line", "request_id", "found"), [
    (b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}', 1, True),
    (b'{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"no"}}', 1, True),
    (b'{"jsonrpc":"2.0","id":0,"result":{}}', 1, False),
    (b'{"jsonrpc":"2.0","method":"notifications/message","params":{}}', 1, False),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping"}', 1, False),  # a request from the server, not our answer
    (b"[1, 2]", 1, False),
    (b"not json\xff", 1, False),
])
def test_response_to(line: bytes, request_id: int, found: bool) -> None:
    assert (response_to(line, request_id) is not None) is found


@pytest.mark.parametrize(("server", "response", "wrong"), [
    (TIME, {"result": {"content": [{"type": "text", "text": "now"}]}}, ""),
    (TIME, {"result": {"content": []}}, "no content"),
    (TIME, {"result": {"content": [{"type": "text", "text": "no"}], "isError": True}}, "the call failed"),
    (TIME, {"error": {"code": -32603, "message": "no"}}, "the call failed"),
    (FETCH, {"result": {"content": [{"type": "text", "text": "refused"}], "isError": True}}, ""),
    (FETCH, {"error": {"code": -32603, "message": "refused"}}, ""),
    (FETCH, {"result": {"content": [{"type": "text", "text": "a page"}]}}, "expected an error"),
])
def test_check_floor_response(server: StockServer, response: dict[str, Any], wrong: str) -> None:
    assert check_floor_response(server, response) == wrong


def test_floor_requests_are_initialize_initialized_and_the_call() -> None:
    import json

    init, initialized, call = (json.loads(line) for line in floor_requests(EVERYTHING))
    assert init["id"] == 0 and init["method"] == "initialize" and init["params"]["capabilities"] == {}
    assert "id" not in initialized and initialized["method"] == "notifications/initialized"
    assert call == {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"message": "one small call"}}}


# A fake ``docker``: ``rm`` succeeds; ``run`` speaks MCP over stdio as the MODE in its environment says.
FAKE_DOCKER = """\
import json, os, sys
if sys.argv[1] == "rm":
    sys.exit(0)
mode = os.environ["FAKE_MCP_MODE"]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("method") == "initialize":
        out = {"jsonrpc": "2.0", "id": m["id"], "result": {"protocolVersion": "2025-06-18", "capabilities": {}}}
    elif m.get("method") == "tools/call":
        if mode == "exit":
            sys.exit(0)
        if mode == "huge":
            sys.stdout.write("x" * (2 << 20) + "\\n")
        sys.stdout.write('{"jsonrpc":"2.0","method":"notifications/message","params":{}}\\n')
        sys.stdout.write("not json at all\\n")
        out = {"jsonrpc": "2.0", "id": m["id"], "result": {"content": [{"type": "text", "text": "Echo"}]}}
    else:
        continue
    sys.stdout.write(json.dumps(out) + "\\n")
    sys.stdout.flush()
"""


@pytest.fixture
def fake_docker(tmp_path: Path) -> str:
    path = tmp_path / "docker"
    path.write_text(f"#!{sys.executable}\n{FAKE_DOCKER}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.parametrize(("mode", "error"), [
    ("ok", ""),
    ("exit", "exited before answering request 1"),
    ("huge", "ValueError"),  # a line over FLOOR_LINE_MAX: refused, not read whole
])
async def test_floor_call_speaks_mcp_over_stdio_with_bounded_reads(fake_docker: str, mode: str, error: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MCP_MODE", mode)
    if not error:
        whole, call = await floor_call(EVERYTHING, docker=fake_docker)
        assert 0 < call < whole < benchmcp.CALL_TIMEOUT_S
        return
    with pytest.raises(RuntimeError, match=error):
        await floor_call(EVERYTHING, docker=fake_docker)


def test_floor_call_expects_the_fetch_call_to_fail(fake_docker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    monkeypatch.setenv("FAKE_MCP_MODE", "ok")
    with pytest.raises(RuntimeError, match="floor fetch: expected an error"):
        asyncio.run(floor_call(FETCH, docker=fake_docker))
    assert os.path.exists(fake_docker)


def _s(p50: float, p90: float | None = None, **extra: Any) -> dict[str, Any]:
    return {"n": 3.0, "p50_ms": p50, "p90_ms": p50 if p90 is None else p90, **extra}


def _figures() -> dict[str, Any]:
    docker_time = {"tool": "time.get_current_time", "discovery": _s(830.0), "tools_listed": 2, "cold": _s(800.0, 900.0),
                   "floor": _s(1000.0), "server_call": _s(7.0),
                   "warm": _s(200.0, 400.0, warm_hits=3, cold_fallbacks=0, warm_share=1.0, grace_ms=830.0)}
    oci_time = {**docker_time, "cold": _s(1100.0)}
    del oci_time["floor"]
    oci_time["floor_from_docker"] = _s(1000.0)
    return {"n": 3, "pool_size": 2, "discovery_reps": 1, "engines": {
        "docker": {"skipped": {"fetch": "toolcell/mcp-fetch:latest is missing; build it: toolcell images mcp "
                                        "--pypi mcp-server-fetch==2026.10.24 --name fetch"},
                   "servers": {"time": docker_time,
                               "everything": {"tool": "everything.echo", "error": "server 'everything': boom"}},
                   "startup_ms": 1700.0},
        "oci": {"skipped": {}, "servers": {"time": oci_time}, "startup_ms": 2400.0},
    }}


def test_render_prints_a_row_per_measured_server_with_its_ratios_and_says_what_was_skipped_or_failed() -> None:
    text = "\n".join(render_mcp(_figures()))
    assert "MCP servers" in text
    rows = [line for line in text.splitlines() if line.startswith(("  docker ", "  oci "))]
    docker_row = next(r for r in rows if r.startswith("  docker time"))
    assert docker_row.split()[-2:] == ["0.80", "0.25"]  # cold/floor, warm/cold
    assert "100%" in docker_row and "830.0" in docker_row
    oci_row = next(r for r in rows if r.startswith("  oci    time"))
    assert oci_row.split()[-2:] == ["1.10", "0.18"] and "1000.0*" in oci_row
    assert "*: docker's floor and call" in text
    assert "docker fetch: skipped: toolcell/mcp-fetch:latest is missing; build it: toolcell images mcp --pypi" in text
    assert "docker everything: FAILED: server 'everything': boom" in text
    assert "docker: the supervisor's start-up, every server discovered at once: 1700 ms" in text
    assert text.splitlines()[-1].endswith("docker time 0.80 / 0.25; oci time 1.10 / 0.18")


def test_render_says_an_engine_that_was_not_measured() -> None:
    text = "\n".join(render_mcp({"n": 3, "pool_size": 2, "discovery_reps": 1,
                                 "engines": {"oci": {"skipped_engine": "the OCI runtime 'runc' is not installed"}}}))
    assert "oci: not measured: the OCI runtime 'runc' is not installed" in text
    assert "p50 cold/floor" not in text


def test_server_ratios_with_missing_figures_are_nan() -> None:
    r = server_ratios({"tool": "time.get_current_time", "cold": _s(800.0)})
    assert math.isnan(r["cold_vs_floor"]) and math.isnan(r["warm_vs_cold"])


def test_failures_are_errors_only_never_skips() -> None:
    f = _figures()
    assert failures(f) == ["docker everything: server 'everything': boom"]
    f["engines"]["oci"]["error"] = "RuntimeError: the pool of time.get_current_time did not fill in 120s"
    assert failures(f)[-1].startswith("oci: RuntimeError")
    assert failures({"engines": {"docker": {"skipped": {"time": "missing"}, "servers": {}},
                                 "oci": {"skipped_engine": "not root"}}}) == []


@pytest.mark.parametrize(("engines", "ticks"), [
    (("docker", "oci"), 3 * (1 + 3 * 3) + 3 * (1 + 2 * 3)),  # docker: floor, cold, warm; oci: cold, warm
    (("oci",), 3 * (1 + 2 * 3)),
])
def test_progress_ticks_count_each_discovery_and_call(engines: tuple[str, ...], ticks: int) -> None:
    assert benchmcp.McpPlan(n=3, discovery_reps=1, engines=engines).ticks() == ticks
