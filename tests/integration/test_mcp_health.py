"""The MCP HTTP bridge's /healthz and metrics, end to end: a real supervisor, `toolcell mcp --transport http
--metrics-listen` as a process, the official SDK client, real containers.

- /healthz on the MCP port follows the supervisor's gRPC health (NOT_SERVING while a tool's image is
  missing, SERVING once it is gone), behind the Host guard and without a bearer token; a flood of
  probes costs the supervisor a check every few seconds, not one per probe.
- The metrics listener serves /metrics (requests by status, tool calls by outcome, active sessions),
  /healthz and /livez.
Traffic goes to 127.0.0.0/8 only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from pathlib import Path

import anyio
import httpx2
import pytest

from tests.integration.test_mcp import TOOLCELL, http_bridge
from tests.integration.test_mcp_http import REBIND, session
from tests.support import config_doc, engine, running_supervisor

pytestmark = pytest.mark.docker
METRICS_LINE = re.compile(r"MCP bridge metrics on http://(\S+)/metrics")


@pytest.fixture(autouse=True)
def _engine_present() -> None:
    engine()


def value(text: str, name: str, labels: str = "") -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def wait_for(http: httpx2.AsyncClient, url: str, status: int, host: str | None = None,
                   timeout: float = 20) -> httpx2.Response:
    with anyio.move_on_after(timeout):
        while True:
            resp = await http.get(url, headers={"host": host} if host else {})
            if resp.status_code == status:
                return resp
            await anyio.sleep(0.25)
    return resp


async def test_bridge_healthz_and_metrics(tmp_path: Path) -> None:
    doc = config_doc(f"test-{uuid.uuid4().hex[:10]}", str(tmp_path / "toolcell.sock"))
    async with running_supervisor(tmp_path, doc) as (app, _):
        args = [*TOOLCELL, "mcp", "--transport", "http", "--listen", "127.0.0.1:0", "--target", app.address,
                "--metrics-listen", "127.0.0.1:0"]
        log = tmp_path / "bridge.log"
        async with http_bridge(args, log) as url, httpx2.AsyncClient(timeout=30) as http:
            base = url.removesuffix("/mcp")
            own_host = base.removeprefix("http://")
            port = own_host.rsplit(":", 1)[1]
            metrics_address = None
            with anyio.fail_after(10):
                while metrics_address is None:
                    metrics_address = next(iter(METRICS_LINE.findall(log.read_text())), None)
                    await anyio.sleep(0.05)
            side = f"http://{metrics_address}"

            # The test config has "ghost", a tool whose image is missing: NOT_SERVING, then SERVING without it.
            states = [("ghost", 503, "not serving: supervisor NOT_SERVING\n"), ("no ghost", 200, "ok\n")]
            for state, status, body in states:
                if state == "no ghost":
                    config = app.supervisor.config
                    await app.supervisor.reload(dataclasses.replace(
                        config, tools={k: v for k, v in config.tools.items() if k != "ghost"}))
                    await app.monitor.check_now()
                for where in (f"{base}/healthz", f"{side}/healthz"):
                    resp = await wait_for(http, where, status)
                    assert (resp.status_code, resp.text) == (status, body), (state, where)
                    assert resp.headers["content-type"].startswith("text/plain")

            # The Host guard still holds for /healthz on the MCP port: the listen address and loopback names pass.
            host_cases = [(own_host, 200), (f"localhost:{port}", 200), (f"{REBIND}:{port}", 421)]
            for host, status in host_cases:
                assert (await http.get(f"{base}/healthz", headers={"host": host})).status_code == status, host
            assert (await http.post(f"{base}/healthz")).status_code == 405
            assert (await http.get(f"{side}/livez")).text == "ok\n"

            # A probe flood: answered from the cached check, not one supervisor call each.
            before = value((await http.get(f"{side}/metrics")).text, "toolcell_mcp_supervisor_checks_total")
            answers = await asyncio.gather(*(http.get(f"{base}/healthz") for _ in range(100)))
            assert {r.status_code for r in answers} == {200}
            after = value((await http.get(f"{side}/metrics")).text, "toolcell_mcp_supervisor_checks_total")
            assert after - before <= 2, (before, after)

            # Tool calls by outcome and active sessions, while a session is open and after.
            async with session(url, {}) as s:
                with anyio.fail_after(60):
                    ok = await s.call_tool("text.wordcount", {"text": "one two three"})
                    bad = await s.call_tool("python.tight", {"code": "raise SystemExit(3)"})
                text = (await http.get(f"{side}/metrics")).text
                assert value(text, "toolcell_mcp_sessions_active") >= 1
            assert not ok.is_error and bad.is_error
            text = (await http.get(f"{side}/metrics")).text
            assert value(text, "toolcell_mcp_tool_calls_total", '{outcome="ok"}') == 1
            assert value(text, "toolcell_mcp_tool_calls_total", '{outcome="tool_error"}') == 1
            assert value(text, "toolcell_mcp_tool_calls_total", '{outcome="failed"}') == 0
            assert value(text, "toolcell_mcp_http_requests_total", '{status="421"}') == 1
            assert value(text, "toolcell_mcp_http_requests_total", '{status="503"}') >= 1
            assert value(text, "toolcell_mcp_http_requests_total", '{status="200"}') >= 100
            assert value(text, "toolcell_mcp_supervisor_serving") == 1
