"""The supervisor end to end: a real grpc.aio server on a temp socket, a real Docker engine.

Each test starts its own supervisor with a unique owner label and checks on the way out that no
labelled container remains; the engine is required (these tests fail, never skip, without one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support import LABEL_OWNER, engine, leftovers, running_supervisor
from toolcell.client import ClientError
from toolcell.model import OutputChunk, Result, Started, Status

pytestmark = pytest.mark.docker


@pytest.fixture(autouse=True)
def _engine_present() -> None:
    engine()


def code(src: str) -> str:
    return json.dumps({"code": src})


async def test_output_streams_back_as_it_happens(tmp_path: Path) -> None:
    src = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.3)\n"
    async with running_supervisor(tmp_path) as (_, client):
        arrivals: list[tuple[float, object]] = []
        async for event in client.execute("python.run", code(src)):
            arrivals.append((time.monotonic(), event))
    started = [e for _, e in arrivals if isinstance(e, Started)]
    chunks = [(t, e) for t, e in arrivals if isinstance(e, OutputChunk) and e.stream == "stdout"]
    result = arrivals[-1][1]
    assert isinstance(result, Result) and result.status is Status.OK and result.exit_code == 0
    assert result.output == "line 0\nline 1\nline 2\n"
    assert len(started) == 1 and started[0].sandbox_id == result.sandbox_id and started[0].profile == "default"
    # Streamed, not buffered: the first line arrived well before the last.
    assert len(chunks) >= 2 and chunks[-1][0] - chunks[0][0] > 0.4
    assert result.duration_ms > 0 and len(result.trace_id) == 32


async def test_wordcount_tool_runs_in_a_container(tmp_path: Path) -> None:
    async with running_supervisor(tmp_path) as (_, client):
        result = await client.call("text.wordcount", json.dumps({"text": "one two three\nfour"}))
    assert result.status is Status.OK
    assert json.loads(result.output) == {"lines": 2, "words": 4, "chars": 18}
    assert result.usage.peak_memory_bytes > 0


async def test_bad_argument_rejected_before_any_container_exists(tmp_path: Path) -> None:
    docker_client = engine()
    async with running_supervisor(tmp_path) as (app, client):
        owner = app.supervisor.config.server.instance
        since = int(time.time()) - 1
        with pytest.raises(ClientError) as info:
            await client.call("text.wordcount", json.dumps({"text": 5}))
        assert info.value.code == "INVALID_ARGUMENT" and info.value.details.startswith("text:")
        with pytest.raises(ClientError) as info:
            await client.call("text.wordcount", '{"text": "a", "text": "b"}')
        assert info.value.code == "INVALID_ARGUMENT" and "duplicate key" in info.value.details
        until = int(time.time()) + 1
        created = list(docker_client.events(since=since, until=until, decode=True,
                                            filters={"type": "container", "event": "create",
                                                     "label": f"{LABEL_OWNER}={owner}"}))
        assert created == []


async def test_unknown_tool_and_missing_image(tmp_path: Path) -> None:
    async with running_supervisor(tmp_path) as (_, client):
        with pytest.raises(ClientError) as info:
            await client.call("no.such.tool", "{}")
        assert (info.value.code, info.value.details) == ("NOT_FOUND", "unknown tool 'no.such.tool'")
        with pytest.raises(ClientError) as info:
            await client.call("ghost", "{}")
        assert info.value.code == "FAILED_PRECONDITION" and "toolcell-test/missing:never" in info.value.details
        assert "toolcell images build" in info.value.details


@pytest.mark.parametrize(
    "src",
    [
        "import time\nprint('before', flush=True)\ntime.sleep(60)\n",
        # Ignores SIGTERM: must still die at the kill grace.
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('before', flush=True)\n"
        "while True: pass\n",
    ],
    ids=["sleeper", "spinner-ignoring-sigterm"],
)
async def test_timeout_kills_and_reports_timeout(tmp_path: Path, src: str) -> None:
    async with running_supervisor(tmp_path) as (_, client):
        t0 = time.monotonic()
        result = await client.call("python.tight", code(src))
        elapsed = time.monotonic() - t0
    assert result.status is Status.TIMEOUT and result.output == "before\n"
    assert 3.0 <= elapsed < 3.0 + 0.5 + 3.0  # timeout + kill grace + engine slack


async def test_memory_hog_reports_oom(tmp_path: Path) -> None:
    src = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 * 1024))\n"
    async with running_supervisor(tmp_path) as (_, client):
        result = await client.call("python.tight", code(src))
    assert result.status is Status.OOM and result.exit_code == 137


PROBE_WRITE = """
import errno, os
for path in ("/tmp/probe", "/probe", "/opt/toolcell/tools/probe"):
    try:
        with open(path, "w") as fh:
            fh.write("x")
        print(path, "ok")
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
"""


async def test_root_filesystem_is_read_only_but_tmp_is_writable(tmp_path: Path) -> None:
    async with running_supervisor(tmp_path) as (_, client):
        result = await client.call("python.run", code(PROBE_WRITE))
    assert result.status is Status.OK
    assert result.output.splitlines() == ["/tmp/probe ok", "/probe EROFS", "/opt/toolcell/tools/probe EROFS"]


PROBE_NET = """
import errno, os, socket, sys
targets = [tuple(t) for t in __import__("json").loads(sys.argv[1] if len(sys.argv) > 1 else "[]")]
print("ifaces", sorted(os.listdir("/sys/class/net")))
for host, port in TARGETS:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, port))
        print(host, "connected")
    except OSError as exc:
        print(host, errno.errorcode.get(exc.errno, str(exc)))
try:
    socket.getaddrinfo("example.com", 443)
    print("dns resolved")
except OSError as exc:
    print("dns", type(exc).__name__)
"""


def bridge_gateway() -> str:
    ipam = engine().networks.get("bridge").attrs["IPAM"]["Config"]
    return str(ipam[0].get("Gateway", "172.17.0.1"))


async def test_network_is_absent(tmp_path: Path) -> None:
    # A listener on the host's loopback that the probe must not reach.
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    targets = [("127.0.0.1", port), (bridge_gateway(), port)]
    src = PROBE_NET.replace("TARGETS", repr(targets))
    try:
        async with running_supervisor(tmp_path) as (_, client):
            result = await client.call("python.run", code(src))
    finally:
        server.close()
    lines = result.output.splitlines()
    assert result.status is Status.OK, result.stderr
    assert lines[0] == "ifaces ['lo']"
    assert lines[1] == "127.0.0.1 ECONNREFUSED"  # the sandbox's own loopback, not the host's
    assert lines[2] == f"{targets[1][0]} ENETUNREACH"
    assert lines[3] == "dns gaierror"


async def test_cancel_kills_the_container(tmp_path: Path) -> None:
    docker_client = engine()
    async with running_supervisor(tmp_path) as (app, client):
        owner = app.supervisor.config.server.instance
        events = client.execute("python.run", code("import time\nprint('up', flush=True)\ntime.sleep(60)"),
                                invocation_id="inv_cancel_test_1")
        async for event in events:
            if isinstance(event, OutputChunk):
                assert await client.cancel("inv_cancel_test_1")
                t0 = time.monotonic()
            if isinstance(event, Result):
                break
        assert event.status is Status.KILLED
        while leftovers(docker_client, owner) and time.monotonic() - t0 < 2.0:
            await asyncio.sleep(0.05)
        assert leftovers(docker_client, owner) == []
        with pytest.raises(ClientError) as info:
            await client.cancel("inv_cancel_test_1")
        assert info.value.code == "NOT_FOUND"


async def test_client_disconnect_removes_the_container(tmp_path: Path) -> None:
    docker_client = engine()
    async with running_supervisor(tmp_path) as (app, client):
        owner = app.supervisor.config.server.instance
        events = client.execute("python.run", code("import time\nprint('up', flush=True)\ntime.sleep(60)"))
        async for event in events:
            if isinstance(event, OutputChunk):
                break
        assert len(leftovers(docker_client, owner)) == 1
        await events.aclose()  # cancels the RPC: the client went away
        t0 = time.monotonic()
        while leftovers(docker_client, owner) and time.monotonic() - t0 < 2.0:
            await asyncio.sleep(0.05)
        assert leftovers(docker_client, owner) == []
        # The supervisor keeps serving.
        result = await client.call("text.wordcount", json.dumps({"text": "still here"}))
        assert result.status is Status.OK


async def test_grpc_deadline_shorter_than_timeout_wins(tmp_path: Path) -> None:
    """The kill grace (1 s here) is not held back from the tool: a 4 s deadline runs it well over 2.5 s."""
    ticks = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.25)"
    async with running_supervisor(tmp_path) as (_, client):
        t0 = time.monotonic()
        result = await client.call("python.run", code(ticks), timeout=4.0)
    assert result.status is Status.TIMEOUT and time.monotonic() - t0 < 4.0
    assert result.output.count("tick") >= 11, result.output.count("tick")


async def test_health_reflection_and_socket_mode(tmp_path: Path) -> None:
    async with running_supervisor(tmp_path) as (app, _):
        path = app.address.removeprefix("unix://")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        async with grpc.aio.insecure_channel(app.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            resp = await health.Check(health_pb2.HealthCheckRequest(service="toolcell.v1.Supervisor"))
            # The test config has a tool whose image is missing ("ghost"): NOT_SERVING until it is gone.
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert "toolcell-test/missing:never" in app.monitor.reason
            config = app.supervisor.config
            await app.supervisor.reload(dataclasses.replace(
                config, tools={k: v for k, v in config.tools.items() if k != "ghost"}))
            await app.monitor.check_now()
            resp = await health.Check(health_pb2.HealthCheckRequest(service="toolcell.v1.Supervisor"))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = [s.name async for r in replies for s in r.list_services_response.service]
            assert "toolcell.v1.Supervisor" in names and "grpc.health.v1.Health" in names


async def test_list_tools_maps_onto_mcp(tmp_path: Path) -> None:
    async with running_supervisor(tmp_path) as (_, client):
        tools = {t.name: t for t in await client.list_tools()}
    assert {"text.wordcount", "python.run", "python.tight"} <= set(tools)
    assert tools["text.wordcount"].input_schema["required"] == ["text"]
    assert tools["text.wordcount"].image == "" and tools["text.wordcount"].command == ()  # never exposed


FORK_BOMB = """
import errno, os, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError as exc:
    print(errno.errorcode[exc.errno], n < 64)
"""


async def test_supervisor_survives_hostile_calls_and_concurrency(tmp_path: Path) -> None:
    hostile = [
        ("python.tight", code("while True: pass")),
        ("python.tight", code("x = bytearray(1 << 30)")),
        ("python.run", code(FORK_BOMB)),
        ("python.run", code("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe' * 1000)\nsys.exit(3)")),
    ]
    async with running_supervisor(tmp_path) as (_, client):
        results = await asyncio.gather(*(client.call(tool, args) for tool, args in hostile))
        statuses = [r.status for r in results]
        assert statuses[0] is Status.TIMEOUT and statuses[1] is Status.OOM
        assert statuses[2] is Status.OK and results[2].output == "EAGAIN True\n"  # held by the pids limit
        assert statuses[3] is Status.ERROR and results[3].exit_code == 3 and "\ufffd" in results[3].output
        after = await client.call("text.wordcount", json.dumps({"text": "alive"}))
        assert after.status is Status.OK


async def test_generic_grpc_clients_may_send_arguments_as_a_struct(tmp_path: Path) -> None:
    """grpcurl -d '{"tool": "text.wordcount", "arguments": {"text": "..."}}' works; giving both fields, or a
    number JSON cannot hold, is INVALID_ARGUMENT before any sandbox."""
    from google.protobuf import struct_pb2

    from toolcell.api.v1 import supervisor_pb2 as pb
    from toolcell.api.v1 import supervisor_pb2_grpc as pb_grpc

    def request(arguments: dict[str, object], arguments_json: str = "") -> pb.ExecuteRequest:
        struct = struct_pb2.Struct()
        struct.update(arguments)
        return pb.ExecuteRequest(tool="text.wordcount", arguments=struct, arguments_json=arguments_json)

    async with running_supervisor(tmp_path) as (app, _), grpc.aio.insecure_channel(app.address) as channel:
        stub = pb_grpc.SupervisorStub(channel)
        result = await stub.Call(request({"text": "one two three"}))
        assert result.status == pb.STATUS_OK and json.loads(result.output)["words"] == 3
        for bad, words in ((request({"text": "x"}, '{"text": "x"}'), "not both"),
                           (request({"text": float("nan")}), "NaN or infinite"),
                           (request({"text": 5}), "text")):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Call(bad)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in str(info.value.details())
