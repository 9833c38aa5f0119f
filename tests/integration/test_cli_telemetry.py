"""`toolcell serve` as a real process: CLI exit codes, and spans at a real OTLP/gRPC receiver.

The receiver is an OTLP TraceService on loopback inside the test; the caller starts its own span
and the supervisor's spans must carry the caller's trace id (W3C traceparent over gRPC metadata).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from tests.support import REPO, config_doc, engine, leftovers
from toolcell.client import Client
from toolcell.model import Status

pytestmark = pytest.mark.docker
TOOLCELL = [sys.executable, "-m", "toolcell"]
PAYLOAD_MARKER = "payload-marker-7f3a"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list = []

    async def Export(self, request, context):
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path, str]]:
    engine()
    owner = f"test-{uuid.uuid4().hex[:10]}"
    sock = tmp_path / "s.sock"
    doc = config_doc(owner, str(sock))
    doc["telemetry"] = {"otlp_endpoint": "OTLP", "span_file": str(tmp_path / "spans.jsonl")}
    cfg = tmp_path / "toolcell.yaml"
    yield doc, cfg, owner, sock  # type: ignore[misc]


def start(doc: dict, cfg: Path, sock: Path) -> subprocess.Popen[str]:
    cfg.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "TOOLCELL_CANARY": "canary-must-not-leak"}
    proc = subprocess.Popen([*TOOLCELL, "serve", "--config", str(cfg)], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "supervisor did not start"
        time.sleep(0.05)
    return proc


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TOOLCELL, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


async def test_spans_reach_otlp_receiver_with_callers_trace_id(serve_process) -> None:  # type: ignore[no-untyped-def]
    doc, cfg, owner, sock = serve_process
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    doc["telemetry"]["otlp_endpoint"] = f"http://127.0.0.1:{port}"
    proc = await asyncio.to_thread(start, doc, cfg, sock)
    try:
        caller = TracerProvider().get_tracer("mcp-server")
        with caller.start_as_current_span("mcp.tools/call") as parent:
            caller_trace_id = format(parent.get_span_context().trace_id, "032x")
            async with Client(f"unix://{sock}") as client:
                result = await client.call("text.wordcount", json.dumps({"text": PAYLOAD_MARKER}))
        assert result.status is Status.OK and result.trace_id == caller_trace_id
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 30)
    assert rc == 0
    deadline = time.monotonic() + 10
    while not any(s.name == "toolcell.invocation" for s in receiver.spans) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await server.stop(None)
    ours = [s for s in receiver.spans if s.trace_id.hex() == caller_trace_id]
    names = {s.name for s in ours}
    assert {"toolcell.v1.Supervisor/Call", "toolcell.invocation", "toolcell.validate", "toolcell.create",
            "toolcell.start", "toolcell.run", "toolcell.remove"} <= names
    invocation = next(s for s in ours if s.name == "toolcell.invocation")
    attrs = {a.key: a.value for a in invocation.attributes}
    assert attrs["toolcell.tool"].string_value == "text.wordcount"
    assert attrs["toolcell.status"].string_value == "ok"
    assert attrs["toolcell.exit_code"].int_value == 0
    # Sizes, never payloads.
    dump = b"".join(s.SerializeToString() for s in receiver.spans)
    assert PAYLOAD_MARKER.encode() not in dump
    assert leftovers(engine(), owner) == []
    # The span file got the same spans as JSON lines.
    assert "toolcell.invocation" in Path(doc["telemetry"]["span_file"]).read_text()


def test_cli_call_exit_codes_and_json(serve_process) -> None:  # type: ignore[no-untyped-def]
    doc, cfg, owner, sock = serve_process
    doc["telemetry"] = {}
    proc = start(doc, cfg, sock)
    target = f"unix://{sock}"
    try:
        ok = cli("call", "text.wordcount", "--args", '{"text": "a b"}', "--target", target, "--json")
        assert ok.returncode == 0, ok.stderr
        result = json.loads(ok.stdout)
        assert result["status"] == "ok" and json.loads(result["output"])["words"] == 2
        assert {"exit_code", "truncated", "duration_ms", "usage", "trace_id", "invocation_id", "stderr"} <= set(result)

        streamed = cli("call", "python.run", "--args", json.dumps({"code": "print('hi')\nraise SystemExit(4)"}),
                       "--target", target)
        assert streamed.returncode == 1 and streamed.stdout == "hi\n"
        assert "status=error exit_code=4" in streamed.stderr

        invalid = cli("call", "text.wordcount", "--args", '{"txt": 1}', "--target", target)
        assert invalid.returncode == 3 and "INVALID_ARGUMENT" in invalid.stderr
        assert "'txt' was unexpected" in invalid.stderr

        unknown = cli("call", "nope", "--target", target)
        assert unknown.returncode == 3 and "NOT_FOUND: unknown tool 'nope'" in unknown.stderr

        bad_json = cli("call", "text.wordcount", "--args", "{", "--target", target)
        assert bad_json.returncode == 2 and "--args is not valid JSON" in bad_json.stderr

        env_probe = cli("call", "python.run", "--args",
                        json.dumps({"code": "import os\nprint(sorted(os.environ))"}), "--target", target, "--json")
        assert "TOOLCELL_CANARY" not in env_probe.stdout and "canary-must-not-leak" not in env_probe.stdout

        tools = cli("tools", "--target", target, "--json")
        assert tools.returncode == 0 and "text.wordcount" in {t["name"] for t in json.loads(tools.stdout)}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not sock.exists()
    down = cli("call", "text.wordcount", "--args", '{"text": "x"}', "--target", target, "--timeout", "3")
    assert down.returncode == 4 and "UNAVAILABLE" in down.stderr
    assert leftovers(engine(), owner) == []


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("version: 1\nprofiles:\n  default:\n    memory: lots\n", "profiles.default.memory"),
        ("version: 1\ntools:\n  - name: x\n    description: d\n    image: i\n    command: [a]\n    profile: p\n",
         "tools[0].profile: unknown profile 'p'"),
        ("version: [\n", "not valid YAML"),
    ],
)
def test_profiles_check_and_serve_refuse_bad_config(tmp_path: Path, content: str, fragment: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    for args in (("profiles", "check", str(cfg)), ("serve", "--config", str(cfg), "--listen",
                                                     f"unix://{tmp_path}/x.sock")):
        proc = cli(*args)
        assert proc.returncode == 3 and fragment in proc.stderr, proc.stderr
    good = cli("profiles", "check", str(REPO / "runtime" / "data" / "default-config.yaml"))
    assert good.returncode == 0 and "ok" in good.stdout
