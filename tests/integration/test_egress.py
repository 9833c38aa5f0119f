"""Network grants against the real engine: only granted names and ports get through the proxy.

Every address in these tests is one the test creates: an upstream network with one server container
answering to several names (network aliases ``allowed.test``, ``denied.test``, ``a.wild.test`` ...), a
listener on the host's loopback and one on the upstream network's gateway (the host). No name is looked
up outside this machine: the proxy resolves the ``.test`` names through the engine's DNS for the test
network, and the sandbox has no resolver at all. The server answers every name, so what decides is the
allowlist, never reachability.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import RUNNER_IMAGE, config_doc, engine, running_supervisor, upstream_container
from toolcell.backends.docker import LABEL_OWNER
from toolcell.model import EgressDestination, Result, Status

pytestmark = pytest.mark.docker

ALIASES = ["allowed.test", "denied.test", "a.wild.test", "deep.a.wild.test", "wild.test", "evilwild.test"]

# One upstream server: plain HTTP on 80 (echoes Host and path), a line echo on 443 and on 8443.
SERVER = r"""
import http.server, socketserver, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello {self.headers.get('Host')} {self.path}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"echo:" + line)
class T(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
for port, handler in ((80, H), (443, Echo), (8443, Echo)):
    threading.Thread(target=T(("0.0.0.0", port), handler).serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# Runs in the sandbox. Speaks to the proxy by hand (CONNECT) and through urllib (plain HTTP via the
# environment's HTTP_PROXY); prints one line per probe.
PROBE = r"""
import errno, json, os, socket, sys, urllib.request
os.environ["RES_OPTIONS"] = "timeout:1 attempts:1"  # a failing lookup fails fast (read at first use)
args = json.load(sys.stdin)
proxy = os.environ.get("HTTPS_PROXY", "")
phost, _, pport = proxy.removeprefix("http://").partition(":")
def connect(target):
    s = socket.create_connection((phost, int(pport)), timeout=5)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            break
        head += chunk
    status = head.split(b" ")[1].decode() if head else "closed"
    if status != "200":
        return status
    s.sendall(b"ping\n")
    reply = s.recv(100).decode().strip()
    s.close()
    return f"200 {reply}"
def direct(host, port):
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect((host, port))
        return "connected"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, type(exc).__name__)
for target in args["connect"]:
    print("connect", target, connect(target), flush=True)
for url in args.get("http", []):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            print("http", url, r.status, r.read().decode(), flush=True)
    except urllib.error.HTTPError as exc:
        print("http", url, exc.code, exc.headers.get("X-Toolcell-Egress"), flush=True)
for host, port in args.get("direct", []):
    print("direct", f"{host}:{port}", direct(host, port), flush=True)
for name in args.get("dns", []):
    try:
        socket.getaddrinfo(name, 443)
        print("dns", name, "resolved")
    except OSError as exc:
        print("dns", name, type(exc).__name__)
print("ifaces", sorted(os.listdir("/sys/class/net")))
"""

# What a direct connect from a granted sandbox may end with: no route, or no answer (the default route
# points at an address no one holds).
UNREACHABLE = ("EHOSTUNREACH", "ENETUNREACH", "TimeoutError")

GRANTS = [
    {"host": "allowed.test", "ports": [443, 80], "allow_private": True},
    {"host": "*.wild.test", "ports": [443], "allow_private": True},
]


@pytest.fixture(autouse=True)
def _engine_present() -> None:
    engine()


class Upstream:
    def __init__(self, network: str, server_ip: str, gateway: str) -> None:
        self.network = network
        self.server_ip = server_ip
        self.gateway = gateway


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """A test network with one server answering to every name in ALIASES; removed afterwards."""
    with upstream_container(SERVER, ALIASES, "test-egress") as (network_name, container):
        container.reload()
        ip = container.attrs["NetworkSettings"]["Networks"][network_name]["IPAddress"]
        network = engine().networks.get(network_name)
        gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]
        yield Upstream(network_name, ip, gateway)


def egress_doc(tmp_path: Path, upstream: Upstream, grants: list[Any] | None = None) -> dict[str, Any]:
    owner = f"test-{uuid.uuid4().hex[:10]}"
    doc = config_doc(owner, str(tmp_path / "toolcell.sock"),
                     granted={"extends": "default", "timeout": "30s", "network": GRANTS if grants is None else grants},
                     wild={"extends": "default", "network": [GRANTS[1]]})
    doc["egress"] = {"network": upstream.network}
    probe = {"description": "network probe", "image": RUNNER_IMAGE, "command": ["python3", "-I", "-u", "-c", PROBE],
             "input_schema": {"type": "object"}}
    doc["tools"] += [{**probe, "name": "net.granted", "profile": "granted"},
                     {**probe, "name": "net.wild", "profile": "wild"},
                     {**probe, "name": "net.none"}]
    return doc


def lines(result: Result) -> dict[str, str]:
    """``{"connect allowed.test:443": "200 echo:ping", ...}`` from the probe's output."""
    assert result.status is Status.OK, (result.message, result.stderr, result.output, result.duration_ms)
    out = {}
    for line in result.output.splitlines():
        kind, target, rest = [*line.split(" ", 2), "", ""][:3]
        out[f"{kind} {target}"] = rest
    return out


def by_target(result: Result) -> dict[str, EgressDestination]:
    return {f"{d.host}:{d.port}": d for d in result.egress}


@pytest.fixture
async def host_listeners(upstream: Upstream) -> AsyncIterator[tuple[list[tuple[str, int]], list[str]]]:
    """Listeners on the host's loopback and on the upstream network's gateway; records who connected."""
    seen: list[str] = []

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(str(writer.get_extra_info("peername")))
        writer.close()

    servers = [await asyncio.start_server(accept, host, 0) for host in ("127.0.0.1", upstream.gateway)]
    try:
        yield [s.sockets[0].getsockname()[:2] for s in servers], seen
    finally:
        for s in servers:
            s.close()


async def test_granted_tool_reaches_only_granted_names_and_ports(
        tmp_path: Path, upstream: Upstream, host_listeners: tuple[list[tuple[str, int]], list[str]]) -> None:
    (loopback, gateway), seen = host_listeners
    args = {
        "connect": ["allowed.test:443", "denied.test:443", "allowed.test:8443", f"{upstream.server_ip}:443",
                    "a.wild.test:443", "deep.a.wild.test:443", "evilwild.test:443", "wild.test:443",
                    f"127.0.0.1:{loopback[1]}", "localhost:443", "169.254.169.254:80"],
        "http": ["http://allowed.test/granted?q=1", "http://denied.test/refused", "http://allowed.test:8443/"],
        # The metadata address can't be reached and nothing leaves: the network is internal, its bridge
        # has no address, and the sandbox's default route points at an address no one holds.
        "direct": [(upstream.server_ip, 443), (upstream.server_ip, 80), list(loopback), list(gateway),
                   ("169.254.169.254", 80)],
        "dns": ["allowed.test", "denied.test"],
    }
    async with running_supervisor(tmp_path, egress_doc(tmp_path, upstream)) as (_, client):
        result = await client.call("net.granted", json.dumps(args))
    out = lines(result)
    # Granted: CONNECT to allowed.test:443 tunnels to the server; plain HTTP by Host on port 80.
    assert out["connect allowed.test:443"] == "200 echo:ping"
    assert out["http http://allowed.test/granted?q=1"] == "200 hello allowed.test /granted?q=1"
    # Refused by name, by port, by IP literal, and the wildcard's look-alikes.
    assert out["connect denied.test:443"] == "403"
    assert out["connect allowed.test:8443"] == "403"
    assert out[f"connect {upstream.server_ip}:443"] == "403"
    assert out["connect a.wild.test:443"] == "200 echo:ping"
    assert out["connect deep.a.wild.test:443"] == "200 echo:ping"
    assert out["connect evilwild.test:443"] == "403"
    assert out["connect wild.test:443"] == "403"
    assert out[f"connect 127.0.0.1:{loopback[1]}"] == "403"
    assert out["connect localhost:443"] == "403"
    assert out["http http://denied.test/refused"] == "403 denied; reason=not-granted"
    assert out["http http://allowed.test:8443/"] == "403 denied; reason=not-granted"
    assert out["connect 169.254.169.254:80"] == "403"
    assert out["direct 169.254.169.254:80"] in UNREACHABLE
    # No direct route anywhere: not to the server by IP, not to the host (loopback is the sandbox's own).
    assert out[f"direct {upstream.server_ip}:443"] in UNREACHABLE
    assert out[f"direct {upstream.server_ip}:80"] in UNREACHABLE
    assert out[f"direct 127.0.0.1:{loopback[1]}"] == "ECONNREFUSED"
    assert out[f"direct {gateway[0]}:{gateway[1]}"] in UNREACHABLE
    assert seen == []
    # The sandbox has no resolver it can use: names resolve only on the proxy's side.
    assert out["dns allowed.test"] == "gaierror" and out["dns denied.test"] == "gaierror"
    assert out["ifaces ['eth0',"] == "'lo']"
    # Accounting: every destination asked for, allowed or refused with the reason, bytes each way.
    egress = by_target(result)
    assert egress["allowed.test:443"].allowed and egress["allowed.test:443"].connections == 1
    assert egress["allowed.test:443"].bytes_up == len(b"ping\n")
    assert egress["allowed.test:443"].bytes_down == len(b"echo:ping\n")
    assert egress["allowed.test:80"].allowed and egress["allowed.test:80"].bytes_down > len("hello allowed.test")
    assert egress["allowed.test:80"].bytes_up > 0
    assert (egress["denied.test:443"].allowed, egress["denied.test:443"].reason) == (False, "not-granted")
    assert egress["allowed.test:8443"].reason == "not-granted"
    assert egress[f"{upstream.server_ip}:443"].reason == "ip-literal"
    assert egress["169.254.169.254:80"].reason == "ip-literal"
    assert egress["evilwild.test:443"].reason == "not-granted" and egress["wild.test:443"].reason == "not-granted"
    assert egress["denied.test:80"].reason == "not-granted"
    assert egress["a.wild.test:443"].allowed and egress["deep.a.wild.test:443"].allowed


async def test_a_grant_does_not_open_private_addresses_by_default(tmp_path: Path, upstream: Upstream) -> None:
    """Without ``allow_private`` a granted name that resolves to a private address is still refused."""
    doc = egress_doc(tmp_path, upstream, grants=[{"host": "allowed.test", "ports": [443]}])
    async with running_supervisor(tmp_path, doc) as (_, client):
        result = await client.call("net.granted", json.dumps({"connect": ["allowed.test:443"]}))
    assert lines(result)["connect allowed.test:443"] == "403"
    assert by_target(result)["allowed.test:443"].reason == "private-address"


async def test_concurrent_calls_of_different_tools_never_share_an_allowlist(tmp_path: Path,
                                                                            upstream: Upstream) -> None:
    args = {"connect": ["allowed.test:443", "a.wild.test:443"]}
    async with running_supervisor(tmp_path, egress_doc(tmp_path, upstream)) as (_, client):
        granted, wild, none = await asyncio.gather(
            client.call("net.granted", json.dumps(args)), client.call("net.wild", json.dumps(args)),
            client.call("net.none", json.dumps({"connect": [], "dns": ["allowed.test"]})))
    assert lines(granted)["connect allowed.test:443"] == "200 echo:ping"
    assert lines(wild)["connect allowed.test:443"] == "403"
    assert lines(wild)["connect a.wild.test:443"] == "200 echo:ping"
    assert lines(none)["ifaces ['lo']"] == "" and lines(none)["dns allowed.test"] == "gaierror"
    assert none.egress == ()


async def test_egress_objects_are_removed_and_spans_carry_the_accounting(tmp_path: Path, upstream: Upstream) -> None:
    from tests.conftest import SPANS

    client_engine = engine()
    async with running_supervisor(tmp_path, egress_doc(tmp_path, upstream)) as (app, client):
        owner = app.supervisor.config.server.instance
        result = await client.call("net.granted", json.dumps({"connect": ["allowed.test:443", "denied.test:443"]}))
        networks = client_engine.networks.list(filters={"label": f"{LABEL_OWNER}={owner}"})
        containers = client_engine.containers.list(all=True, filters={"label": f"{LABEL_OWNER}={owner}"})
        assert (networks, containers) == ([], [])
    span = next(s for s in SPANS.get_finished_spans() if s.name == "toolcell.invocation"
                and s.attributes is not None and s.attributes.get("toolcell.invocation_id") == result.invocation_id)
    attrs = dict(span.attributes or {})
    assert attrs["toolcell.egress.allowed"] == ("allowed.test:443",)
    assert attrs["toolcell.egress.denied"] == ("denied.test:443 not-granted",)
    assert attrs["toolcell.egress.bytes_up"] == 5 and attrs["toolcell.egress.bytes_down"] == 10
    assert attrs["toolcell.egress.connections"] == 1 and attrs["toolcell.egress.refused"] == 1
