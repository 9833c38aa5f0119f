"""The supervisor's HTTP probes on the Prometheus listener: /healthz follows gRPC health, /livez, /metrics.

A real `toolcell serve` on the real engine. It starts with a tool whose image is missing ("ghost"), so
gRPC health is NOT_SERVING and /healthz says 503 with the reason; a reload without it makes both SERVING
and 200. The same requests are asked of both states, so neither answer can come from a broken probe.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_operations import Serve, base_doc
from tests.support import engine
from toolcell.control import check_health

pytestmark = pytest.mark.docker

GHOST = {"name": "ghost", "description": "missing image", "image": "toolcell-test/missing:never", "command": ["true"]}


def get(address: str, path: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of one request to the probe listener."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def listener(serve: Serve) -> str:
    line = next(m["message"] for m in serve.lines() if "Prometheus metrics on" in m["message"])
    return re.search(r"http://(\S+)/metrics", line).group(1)  # type: ignore[union-attr]


def wait_healthz(address: str, status: int, timeout: float = 20) -> tuple[int, str, str]:
    deadline = time.monotonic() + timeout
    while True:
        got = get(address, "/healthz")
        if got[0] == status or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


@pytest.fixture
def serve(tmp_path: Path) -> Any:
    engine()
    doc = base_doc(tmp_path)
    doc["telemetry"] = {"prometheus_listen": "127.0.0.1:0", "log_format": "json"}
    doc["tools"].append(GHOST)
    started = Serve(tmp_path, doc)
    yield started, doc
    started.close()


async def test_healthz_follows_grpc_health_livez_and_metrics(serve: Any) -> None:
    running, doc = serve
    address = await asyncio.to_thread(listener, running)
    # state -> (grpc health, /healthz status, what its body holds)
    states = {
        "ghost": ("NOT_SERVING", 503, "not serving: images missing on the engine: toolcell-test/missing:never"),
        "no ghost": ("SERVING", 200, "ok"),
    }
    for state, (grpc_status, status, body) in states.items():
        if state == "no ghost":
            doc["tools"] = [t for t in doc["tools"] if t["name"] != "ghost"]
            running.write(doc)
            assert running.cli("reload", "--target", running.target).returncode == 0
        got = await asyncio.to_thread(wait_healthz, address, status)
        assert (got[0], got[2].strip()) == (status, body), state
        assert got[1].startswith("text/plain")
        assert await asyncio.to_thread(check_health, running.target, "toolcell.v1.Supervisor") == grpc_status
        assert (await asyncio.to_thread(get, address, "/healthz", "HEAD"))[::2] == (status, "")
        assert (await asyncio.to_thread(get, address, "/livez"))[::2] == (200, "ok\n"), state
        code, kind, text = await asyncio.to_thread(get, address, "/metrics")
        assert code == 200 and kind.startswith("text/plain") and "process_open_fds" in text, state
        serving = re.search(r"^toolcell_health_serving\S* (\S+)$", text, re.M)  # not exported before it was 1
        assert (float(serving.group(1)) if serving else 0.0) == (1.0 if status == 200 else 0.0), state

    # What is not a probe: not found or not allowed, and nothing of the request comes back.
    hostile = "/healthz/" + "A" * 2000 + "<script>"
    for method, path, status in (("GET", hostile, 404), ("GET", "/", 404), ("POST", "/healthz", 405),
                                 ("DELETE", "/metrics", 405), ("GET", "/healthz?verbose=1", 200)):
        code, _, text = await asyncio.to_thread(get, address, path, method)
        assert code == status, (method, path[:20])
        assert "AAAA" not in text and "<script>" not in text and len(text) < 100


async def test_stalled_clients_are_cut_off(serve: Any) -> None:
    """Connections that send nothing hold a bounded number of threads, for the request timeout only."""
    running, _ = serve
    address = await asyncio.to_thread(listener, running)
    host, port = address.rsplit(":", 1)
    stalled = [socket.create_connection((host, int(port)), timeout=10) for _ in range(40)]
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15:  # slots free up as stalled connections time out (5 s)
            try:
                got = await asyncio.to_thread(get, address, "/livez")
            except (ConnectionError, http.client.HTTPException):
                await asyncio.sleep(0.2)
                continue
            break
        assert got[0] == 200
        assert time.monotonic() - t0 < 12
    finally:
        for s in stalled:
            s.close()
