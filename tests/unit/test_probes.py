"""HTTP probes as plain parts: ``probehttp.ProbeServer`` on loopback, the bridge's cached ``SupervisorProbe``
against a real gRPC health service on a temporary socket, its ASGI ``HealthRoute``."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from toolcell.mcp.observe import BridgeMetrics, HealthRoute, StatusCounter, SupervisorProbe
from toolcell.probehttp import MAX_REASON_CHARS, Health, ProbeServer, parse_listen, plain

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def request(server: ProbeServer, method: str, path: str) -> tuple[int, str, str]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize(("health", "method", "path", "status", "body"), [
    (Health(True), "GET", "/healthz", 200, "ok\n"),
    (Health(False, "engine unreachable: gone"), "GET", "/healthz", 503, "not serving: engine unreachable: gone\n"),
    (Health(False, "bad\nline\x1b[31m"), "GET", "/healthz", 503, "not serving: bad?line?[31m\n"),
    (Health(False, "x" * 5000), "GET", "/healthz", 503, f"not serving: {'x' * MAX_REASON_CHARS}...\n"),
    (Health(False, "down"), "HEAD", "/healthz", 503, ""),
    (Health(False, "down"), "GET", "/livez", 200, "ok\n"),
    (Health(True), "GET", "/healthz?x=<script>", 200, "ok\n"),
    (Health(True), "GET", "/" + "A" * 4000, 404, "not found\n"),
    (Health(True), "POST", "/healthz", 405, "method not allowed\n"),
    (Health(True), "DELETE", "/metrics", 405, "method not allowed\n"),
])
def test_probe_server_answers(health: Health, method: str, path: str, status: int, body: str) -> None:
    server = ProbeServer("127.0.0.1", 0, registry=CollectorRegistry(), health=lambda: health).start()
    try:
        assert request(server, method, path)[::2] == (status, body)
    finally:
        server.close()


def test_probe_server_metrics_come_from_its_registry() -> None:
    registry = CollectorRegistry()
    Counter("probe_test_things", "things", registry=registry).inc(3)
    server = ProbeServer("127.0.0.1", 0, registry=registry).start()
    try:
        status, kind, text = request(server, "GET", "/metrics")
        assert (status, kind.split(";")[0]) == (200, "text/plain")
        assert "probe_test_things_total 3.0" in text
        assert request(server, "GET", "/healthz")[::2] == (503, "not serving: starting\n")  # until set
    finally:
        server.close()


@pytest.mark.parametrize(("listen", "parsed"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), (":9464", ("127.0.0.1", 9464)), ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("[::1]:9464", ("::1", 9464)), ("9464", None), ("host:99999", None), ("host:x", None),
])
def test_parse_listen(listen: str, parsed: tuple[str, int] | None) -> None:
    if parsed is None:
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(listen)
    else:
        assert parse_listen(listen) == parsed


def test_plain_is_bounded_printable_ascii() -> None:
    assert plain("caf\u00e9 \u202e ok") == "caf? ? ok"
    assert len(plain("y" * 10**6)) == MAX_REASON_CHARS + 3


# -- the bridge's supervisor probe ---------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def health_server(path: Path, status: Any) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    await servicer.set("toolcell.v1.Supervisor", status)
    return server, servicer


@pytest.mark.parametrize(("status", "expected"), [
    (SERVING, Health(True)),
    (NOT_SERVING, Health(False, "supervisor NOT_SERVING")),
    (None, Health(False, "supervisor unreachable: UNAVAILABLE")),  # nothing listens on the socket
])
async def test_supervisor_probe_answers(tmp_path: Path, status: Any, expected: Health) -> None:
    sock = tmp_path / "s.sock"
    server = (await health_server(sock, status))[0] if status is not None else None
    try:
        async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
            assert await SupervisorProbe(channel, timeout_s=2.0).health() == expected
    finally:
        if server is not None:
            await server.stop(0)


async def test_supervisor_probe_caches_and_asks_once_for_a_flood(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    server, servicer = await health_server(sock, SERVING)
    clock = Clock()
    try:
        async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
            probe = SupervisorProbe(channel, ttl_s=3.0, clock=clock)
            answers = await asyncio.gather(*(probe.health() for _ in range(200)))
            assert set(answers) == {Health(True)} and probe.checks == 1
            await servicer.set("toolcell.v1.Supervisor", NOT_SERVING)
            clock.now += 2.9
            assert await probe.health() == Health(True) and probe.checks == 1  # still fresh
            clock.now += 0.2
            assert await probe.health() == Health(False, "supervisor NOT_SERVING") and probe.checks == 2
    finally:
        await server.stop(0)


async def asgi(app: Any, method: str, path: str) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def test_health_route_counts_and_passes_other_paths(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    server, _ = await health_server(sock, SERVING)
    reached: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    metrics = BridgeMetrics()
    try:
        async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
            app = StatusCounter(HealthRoute(inner, SupervisorProbe(channel)), metrics)
            cases = [("GET", "/healthz", 200, b"ok\n"), ("HEAD", "/healthz", 200, b""),
                     ("POST", "/healthz", 405, b"method not allowed\n"), ("GET", "/mcp", 418, b"")]
            for method, path, status, body in cases:
                assert await asgi(app, method, path) == (status, body), (method, path)
    finally:
        await server.stop(0)
    assert reached == ["/mcp"]
    assert {s: metrics.requests.labels(s)._value.get() for s in ("200", "405", "418")} == {
        "200": 2, "405": 1, "418": 1}


class Stuck(SupervisorProbe):
    async def health(self) -> Health:
        await asyncio.sleep(60)
        return Health(True)


def test_health_from_another_thread_when_the_loop_does_not_answer() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        probe = Stuck.__new__(Stuck)  # only its health() runs: no channel needed
        probe.timeout_s = 0.1
        started = time.monotonic()
        assert probe.health_from(loop) == Health(False, "the bridge did not answer in time")
        assert time.monotonic() - started < 5
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
