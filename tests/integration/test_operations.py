"""`toolcell serve` in production: SIGTERM drain/cancel, SIGHUP reload, health, metrics, JSON logs.

Each test runs the real CLI as a subprocess against the real engine, with its own owner label, and checks
that no sandbox is left. The health test never touches the shared engine: the supervisor talks to it
through a Unix-socket proxy this test owns, and the test stops and restarts the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

from tests.support import REPO, config_doc, engine, leftovers
from toolcell.client import Client, ClientError, UnavailableError
from toolcell.control import check_health, read_state
from toolcell.model import Status

pytestmark = pytest.mark.docker
TOOLCELL = [sys.executable, "-m", "toolcell"]
DOCKER_SOCK = "/var/run/docker.sock"


class Serve:
    """One `toolcell serve` subprocess; stderr goes to a file (never a pipe that could fill up)."""

    def __init__(self, tmp_path: Path, doc: dict[str, Any]) -> None:
        self.owner = doc["server"]["instance"]
        self.sock = Path(doc["server"]["listen"].removeprefix("unix://"))
        self.cfg = tmp_path / "toolcell.yaml"
        self.log = tmp_path / "serve.log"
        self.write(doc)
        self.proc = subprocess.Popen([*TOOLCELL, "serve", "--config", str(self.cfg)], cwd=REPO,
                                     stderr=self.log.open("w"), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not Path(f"{self.sock}.state").exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "supervisor did not start"
            time.sleep(0.05)
        self.target = f"unix://{self.sock}"

    def write(self, doc: dict[str, Any]) -> None:
        self.cfg.write_text(yaml.safe_dump(doc))

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*TOOLCELL, *args], cwd=REPO, capture_output=True, text=True, timeout=60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        left = leftovers(engine(), self.owner)
        assert left == [], f"sandboxes left behind: {left}"


@pytest.fixture
def make_serve(tmp_path: Path) -> Iterator[Any]:
    engine()
    started: list[Serve] = []

    def make(doc: dict[str, Any]) -> Serve:
        serve = Serve(tmp_path, doc)
        started.append(serve)
        return serve

    yield make
    for serve in started:
        serve.close()


def base_doc(tmp_path: Path, **server: Any) -> dict[str, Any]:
    owner = f"test-{uuid.uuid4().hex[:10]}"
    doc = config_doc(owner, str(tmp_path / "s.sock"))
    doc["tools"] = [t for t in doc["tools"] if t["name"] != "ghost"]
    doc["server"].update(server)
    doc["telemetry"] = {"log_format": "json"}
    return doc


def sleeper(seconds: float) -> str:
    return json.dumps({"code": f"import time\nprint('start', flush=True)\ntime.sleep({seconds})\nprint('end')\n"})


async def started_call(client: Client, tool: str, args: str) -> tuple[asyncio.Task[Any], str]:
    """Start a call and wait for its sandbox to exist; returns the task collecting the Result."""
    stream = client.execute(tool, args)
    first = await stream.__anext__()

    async def rest() -> Any:
        last = first
        async for event in stream:
            last = event
        return last

    return asyncio.ensure_future(rest()), first.sandbox_id


# -- SIGTERM -------------------------------------------------------------------------------------------------

async def test_sigterm_drains_a_call_that_fits_in_the_grace(tmp_path: Path, make_serve: Any) -> None:
    serve = make_serve(base_doc(tmp_path, shutdown_grace="15s"))
    async with Client(serve.target) as client:
        task, _ = await started_call(client, "python.run", sleeper(2))
        t0 = time.monotonic()
        serve.signal(signal.SIGTERM)
        result = await task
    assert result.status is Status.OK and result.output == "start\nend\n"
    assert serve.wait() == 0
    assert time.monotonic() - t0 < 15  # it did not wait for the whole grace
    assert leftovers(engine(), serve.owner) == []
    messages = [line["message"] for line in serve.lines()]
    assert "stopped" in messages and not any("cancelling" in m for m in messages)


async def test_sigterm_cancels_what_outlives_the_grace(tmp_path: Path, make_serve: Any) -> None:
    serve = make_serve(base_doc(tmp_path, shutdown_grace="1s"))
    async with Client(serve.target) as client:
        task, sandbox_id = await started_call(client, "python.run", sleeper(60))
        t0 = time.monotonic()
        serve.signal(signal.SIGTERM)
        # While draining: health says NOT_SERVING and new calls are refused.
        await asyncio.sleep(0.3)
        with pytest.raises(ClientError) as info:
            await client.call("text.wordcount", json.dumps({"text": "late"}))
        assert info.value.code == "UNAVAILABLE"
        try:
            result = await task
        except UnavailableError as exc:
            # Known race (about 1 run in 8 on a loaded 2-core machine): the connection closes at the end of
            # the shutdown before the call's last message reaches the caller. The call itself ended killed,
            # on record; the supervisor's log line says so (checked below).
            assert "Server shutdown" in str(exc)
            result = None
    elapsed = time.monotonic() - t0
    assert result is None or (result.status is Status.KILLED and result.output == "start\n")
    assert serve.wait() == 0
    ended = [m for m in serve.lines() if m["message"] == "invocation finished" and m.get("tool") == "python.run"]
    assert [(m["ending"], m["status"]) for m in ended] == [("result", "killed")]
    assert 1.0 <= elapsed < 1.0 + 1.0 + 8.0  # grace + kill grace + engine slack
    assert leftovers(engine(), serve.owner) == []
    with pytest.raises(Exception, match="No such container"):
        engine().containers.get(sandbox_id)
    assert any("cancelling 1 running call" in line["message"] for line in serve.lines())


# -- SIGHUP / toolcell reload ---------------------------------------------------------------------------------

async def test_sighup_reload_valid_then_invalid(tmp_path: Path, make_serve: Any) -> None:
    doc = base_doc(tmp_path)
    doc["profiles"]["default"]["timeout"] = "30s"
    serve = make_serve(doc)
    async with Client(serve.target) as client:
        # In flight across the reload: it must finish under the profile it started with (30s timeout).
        task, _ = await started_call(client, "python.run", sleeper(3))
        new = json.loads(json.dumps(doc))
        new["profiles"]["default"]["timeout"] = "1s"
        new["tools"].append({"name": "text.wordcount2", "description": "again", "image": doc["tools"][0]["image"],
                             "command": doc["tools"][0]["command"]})
        serve.write(new)
        serve.signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while read_state(f"{serve.sock}.state").reloads < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert read_state(f"{serve.sock}.state").last_reload_ok
        assert "text.wordcount2" in {t.name for t in await client.list_tools()}
        result = await task
        assert result.status is Status.OK and result.output == "start\nend\n"
        # A call that starts now gets the new 1s timeout.
        late = await client.call("python.run", sleeper(5))
        assert late.status is Status.TIMEOUT

        # Invalid: refused, logged, the running config stays; `toolcell reload` says so (exit 3).
        bad = json.loads(json.dumps(new))
        bad["profiles"]["default"]["memory"] = "lots"
        serve.write(bad)
        out = serve.cli("reload", "--target", serve.target)
        assert out.returncode == 3, out
        assert "reload refused" in out.stderr and "profiles.default.memory" in out.stderr
        assert "text.wordcount2" in {t.name for t in await client.list_tools()}
        ok = await client.call("text.wordcount2", json.dumps({"text": "still here"}))
        assert ok.status is Status.OK
        # And a good file again, through the CLI.
        serve.write(doc)
        out = serve.cli("reload", "--target", serve.target)
        assert out.returncode == 0 and "reload #3" in out.stdout, out
        assert "text.wordcount2" not in {t.name for t in await client.list_tools()}
    errors = [line for line in serve.lines() if line["level"] == "ERROR"]
    assert len(errors) == 1 and "keeping the running config" in errors[0]["message"]


# -- health ---------------------------------------------------------------------------------------------------

class EngineProxy:
    """A Unix socket forwarding to the real engine; stop() cuts every connection, start() brings it back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(DOCKER_SOCK)
                with proxy._lock:
                    proxy._conns.update({self.request, upstream})
                try:
                    pair = {self.request: upstream, upstream: self.request}
                    while True:
                        ready, _, _ = select.select(list(pair), [], [], 1.0)
                        for s in ready:
                            data = s.recv(65536)
                            if not data:
                                return
                            pair[s].sendall(data)
                except OSError:
                    return
                finally:
                    upstream.close()
                    with proxy._lock:
                        proxy._conns.difference_update({self.request, upstream})

        self.path.unlink(missing_ok=True)
        self._server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:
            for s in list(self._conns):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        self.path.unlink(missing_ok=True)


def wait_health(target: str, want: str, timeout: float = 20) -> float:
    t0 = time.monotonic()
    status = ""
    while time.monotonic() - t0 < timeout:
        status = check_health(target)
        if status == want:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"health stayed {status}, wanted {want}")


async def test_health_follows_the_engine_and_the_images(tmp_path: Path, make_serve: Any) -> None:
    proxy = EngineProxy(tmp_path / "engine.sock")
    proxy.start()
    try:
        doc = base_doc(tmp_path, health_interval="500ms")
        doc["engine"] = {"docker_host": f"unix://{proxy.path}"}
        serve = make_serve(doc)
        assert check_health(serve.target) == "SERVING"
        out = serve.cli("health", "--target", serve.target)
        assert (out.returncode, out.stdout.strip()) == (0, "SERVING")

        proxy.stop()  # the engine "goes away" for this supervisor only
        flip = await asyncio.to_thread(wait_health, serve.target, "NOT_SERVING")
        out = serve.cli("health", "--target", serve.target)
        assert (out.returncode, out.stdout.strip()) == (1, "NOT_SERVING")
        assert serve.cli("health", "--live", "--target", serve.target).returncode == 0
        async with Client(serve.target) as client:
            with pytest.raises(ClientError) as info:
                await client.call("text.wordcount", json.dumps({"text": "x"}))
            assert info.value.code == "UNAVAILABLE"

        proxy.start()
        back = await asyncio.to_thread(wait_health, serve.target, "SERVING")
        async with Client(serve.target) as client:
            result = await client.call("text.wordcount", json.dumps({"text": "back again"}))
        assert result.status is Status.OK
        assert flip < 5 and back < 5

        # A tool whose image is missing: NOT_SERVING after the reload that adds it, SERVING once it's gone.
        ghost = json.loads(json.dumps(doc))
        ghost["tools"].append({"name": "ghost", "description": "missing image", "image": "toolcell-test/missing:never",
                               "command": ["true"]})
        serve.write(ghost)
        assert serve.cli("reload", "--target", serve.target).returncode == 0
        await asyncio.to_thread(wait_health, serve.target, "NOT_SERVING")
        serve.write(doc)
        assert serve.cli("reload", "--target", serve.target).returncode == 0
        await asyncio.to_thread(wait_health, serve.target, "SERVING")
        reasons = [line["message"] for line in serve.lines() if line["logger"] == "toolcell.health"]
        assert any("engine unreachable" in r for r in reasons)
        assert any("images missing on the engine: toolcell-test/missing:never" in r for r in reasons)
        serve.close()
    finally:
        proxy.stop()


# -- metrics and logs ----------------------------------------------------------------------------------------

class MetricsReceiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.points: dict[str, list[Any]] = {}

    async def Export(self, request: Any, context: Any) -> Any:
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    self.points.setdefault(metric.name, []).append(metric)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def prom_value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def prometheus_address(serve: Any) -> str:
    line = next(m["message"] for m in serve.lines() if "Prometheus metrics on" in m["message"])
    return re.search(r"http://(\S+)/metrics", line).group(1)  # type: ignore[union-attr]


async def test_metrics_on_prometheus_and_at_an_otlp_receiver(tmp_path: Path, make_serve: Any) -> None:
    receiver = MetricsReceiver()
    server = grpc.aio.server()
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        doc = base_doc(tmp_path)
        doc["telemetry"] = {"otlp_endpoint": f"http://127.0.0.1:{port}", "metrics_interval": "500ms",
                            "prometheus_listen": "127.0.0.1:0", "log_format": "json"}
        doc["tools"].append({"name": "leaky", "description": "prints a token", "image": doc["tools"][0]["image"],
                             "command": ["python3", "-c", "print('ghp_' + 'x' * 36)"]})
        doc["tools"].append({"name": "warm.cat", "description": "pooled", "image": doc["tools"][0]["image"],
                             "command": ["cat"], "pool": {"size": 1}})
        serve = make_serve(doc)
        async with Client(serve.target) as client:
            ok = await client.call("text.wordcount", json.dumps({"text": "one two"}))
            leaked = await client.call("leaky", "{}")
            for _ in range(100):  # wait for the pool to fill, then take its sandbox
                text = await asyncio.to_thread(lambda: urllib.request.urlopen(
                    f"http://{prometheus_address(serve)}/metrics", timeout=10).read().decode())
                if prom_value(text, "toolcell_pool_sandboxes", tool="warm.cat", state="ready") == 1:
                    break
                await asyncio.sleep(0.2)
            warm = await client.call("warm.cat", json.dumps({"x": 1}))
            with pytest.raises(ClientError):
                await client.call("no.such.tool", "{}")
            with pytest.raises(ClientError):
                await client.call("text.wordcount", json.dumps({"text": 5}))
        assert ok.status is Status.OK and "ghp_" not in leaked.output and warm.status is Status.OK
        address = prometheus_address(serve)
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://{address}/metrics", timeout=10)
                                       .read().decode())
        assert prom_value(text, "toolcell_pool_claims_total", tool="warm.cat", outcome="hit") == 1
        assert prom_value(text, "toolcell_pool_sandboxes", tool="warm.cat", state="target") == 1
        assert prom_value(text, "toolcell_invocations_total", tool="text.wordcount", status="ok") == 1
        assert prom_value(text, "toolcell_invocation_duration_seconds_count", tool="text.wordcount") == 1
        assert prom_value(text, "toolcell_rejections_total", reason="tool_not_found") == 1
        assert prom_value(text, "toolcell_rejections_total", reason="invalid_arguments") == 1
        # Every invocation with an id counted by how it ended; an unknown tool's name is never a label.
        assert prom_value(text, "toolcell_invocation_endings_total", tool="text.wordcount", ending="result") == 1
        assert prom_value(text, "toolcell_invocation_endings_total", tool="text.wordcount", ending="error") == 1
        assert prom_value(text, "toolcell_invocation_endings_total", tool="unknown", ending="error") == 1
        assert (prom_value(text, "toolcell_redactions_total", tool="leaky") or 0) >= 1
        assert prom_value(text, "toolcell_sandboxes_active") == 0
        assert prom_value(text, "toolcell_health_serving") == 1

        deadline = time.monotonic() + 15
        want = {"toolcell.invocations", "toolcell.invocation.duration", "toolcell.rejections",
                "toolcell.sandboxes.active", "toolcell.redactions"}
        while not want <= set(receiver.points) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert want <= set(receiver.points), sorted(receiver.points)
        last = receiver.points["toolcell.invocations"][-1]
        tools = {kv.value.string_value for p in last.sum.data_points for kv in p.attributes if kv.key == "tool"}
        assert tools == {"text.wordcount", "leaky", "warm.cat"}

        # Logs: JSON lines, trace ids on the invocation lines, no argument or output text anywhere.
        serve.close()
        log = serve.log.read_text()
        # Every invocation with an id ends with one line: the unknown tool and the invalid arguments too.
        ended = [m for m in serve.lines() if m["message"] == "invocation finished"]
        assert sorted(m["ending"] for m in ended) == ["error", "error", "result", "result", "result"]
        assert {m["status"] for m in ended if m["ending"] == "error"} == {"NOT_FOUND", "INVALID_ARGUMENT"}
        finished = [m for m in ended if m["ending"] == "result"]
        assert all(len(m["trace_id"]) == 32 for m in ended)
        assert {m["trace_id"] for m in finished} == {ok.trace_id, leaked.trace_id, warm.trace_id}
        assert "one two" not in log and "ghp_" not in log and "is not of type" not in log
    finally:
        await server.stop(None)


def test_version_and_config_show(tmp_path: Path) -> None:
    out = subprocess.run([*TOOLCELL, "version", "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    info = json.loads(out.stdout)
    assert info["toolcell"] and info["grpcio"] and info["python"]
    doc = base_doc(tmp_path)
    doc["profiles"]["default"]["env"] = {"GITHUB_TOKEN": "must-not-print"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    out = subprocess.run([*TOOLCELL, "config", "show", "--config", str(cfg), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env={**os.environ})
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    assert view["profiles"]["default"]["env"]["GITHUB_TOKEN"] == "***" and "must-not-print" not in out.stdout
    assert view["server"]["shutdown_grace"] == "2s"  # the config's own key and unit
