"""The egress proxy's rules, run in process on loopback with a resolver the test controls.

Only 127.0.0.1 is ever contacted: names resolve through ``RESOLVE``; the address check is replaced so
that a loopback upstream counts as "allowed" (the real check refuses loopback, tested on its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from toolcell.data.egress_proxy import (
    Grant,
    Proxy,
    address_verdict,
    grant_for,
    host_matches,
    is_ip_literal,
    normalize_host,
    parse_request,
)
from toolcell.policy.network import GrantError, candidate_subnets, parse_grant


@pytest.mark.parametrize(("pattern", "host", "match"), [
    ("allowed.test", "allowed.test", True),
    ("allowed.test", "a.allowed.test", False),
    ("*.allowed.test", "a.allowed.test", True),
    ("*.allowed.test", "deep.a.allowed.test", True),
    ("*.allowed.test", "allowed.test", False),
    ("*.allowed.test", "evilallowed.test", False),
    ("*.allowed.test", "allowed.test.evil", False),
])
def test_host_matching(pattern: str, host: str, match: bool) -> None:
    assert host_matches(pattern, host) is match


def test_grant_needs_host_and_port() -> None:
    grants = [Grant("allowed.test", (443, 80)), Grant("*.wild.test", (8443,))]
    assert grant_for(grants, "allowed.test", 80) is grants[0]
    assert grant_for(grants, "allowed.test", 8443) is None
    assert grant_for(grants, "x.wild.test", 8443) is grants[1]
    assert grant_for(grants, "x.wild.test", 443) is None


@pytest.mark.parametrize("host", ["10.0.0.1", "[::1]", "::1", "127.1", "0x7f000001", "2130706433", "169.254.169.254"])
def test_ip_literals_in_every_spelling(host: str) -> None:
    assert is_ip_literal(host) and normalize_host(host) is None


@pytest.mark.parametrize(("address", "private_ok", "reason"), [
    ("127.0.0.1", True, "loopback-address"),
    ("::ffff:127.0.0.1", True, "loopback-address"),
    ("0.0.0.0", True, "loopback-address"),
    ("169.254.169.254", True, "link-local-address"),
    ("fe80::1", True, "link-local-address"),
    ("224.0.0.1", True, "reserved-address"),
    ("10.1.2.3", False, "private-address"),
    ("100.64.0.1", False, "private-address"),
    ("fd00::1", False, "private-address"),
    ("10.1.2.3", True, ""),
    ("93.184.215.14", False, ""),
])
def test_address_verdicts(address: str, private_ok: bool, reason: str) -> None:
    assert address_verdict(address, private_ok) == reason


@pytest.mark.parametrize(("raw", "message"), [
    ("1.2.3.4", "not IP addresses"),
    ("*.test", "two labels"),
    ("a.*.test", "not a host name"),
    ("bad_name.test", "not a host name"),
    ({"host": "a.test", "ports": []}, "ports"),
])
def test_bad_grants_are_refused(raw: object, message: str) -> None:
    with pytest.raises(GrantError, match=message):
        parse_grant(raw)  # type: ignore[arg-type]


def test_grants_are_normalized() -> None:
    assert parse_grant("API.Example.COM.") == parse_grant({"host": "api.example.com", "ports": [443]})
    assert parse_grant({"host": "*.a.test", "ports": [80, 443, 80]}).ports == (80, 443)


def test_candidate_subnets_are_29s_inside_the_pool() -> None:
    subnets = candidate_subnets("10.213.0.0/16", 8)
    assert subnets and all(s.startswith("10.213.") and s.endswith("/29") for s in subnets)
    assert int(subnets[0].split("/")[0].split(".")[-1]) % 8 == 0


def test_plain_http_is_rewritten_to_origin_form_for_one_destination() -> None:
    head = (b"GET http://Allowed.Test/p?q=1 HTTP/1.1\r\nHost: allowed.test\r\nProxy-Authorization: x\r\n"
            b"Proxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n")
    request = parse_request(head)
    assert (request.host, request.port) == ("allowed.test", 80)
    assert request.head == b"GET /p?q=1 HTTP/1.1\r\nHost: allowed.test\r\nAccept: */*\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(("head", "reason"), [
    (b"GET http://allowed.test/ HTTP/1.1\r\nHost: denied.test\r\n\r\n", "host-mismatch"),
    (b"GET http://allowed.test/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "bad-request"),
    (b"GET https://allowed.test/ HTTP/1.1\r\n\r\n", "use-connect-for-tls"),
    (b"CONNECT allowed.test HTTP/1.1\r\n\r\n", "port-required"),
    (b"CONNECT 10.0.0.1:443 HTTP/1.1\r\n\r\n", "ip-literal"),
    (b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n", "ip-literal"),
    (b"GET http://user:pw@allowed.test/ HTTP/1.1\r\n\r\n", "bad-request"),
    (b"GET / HTTP/2.0\r\nHost: allowed.test\r\n\r\n", "bad-request"),
    (b"GET /\r\n\r\n", "bad-request"),
])
def test_unusable_requests_are_refused(head: bytes, reason: str) -> None:
    from toolcell.data.egress_proxy import Denied

    with pytest.raises(Denied) as info:
        parse_request(head)
    assert info.value.reason == reason


@dataclass
class Harness:
    proxy: Proxy
    port: int
    upstream_port: int


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """An upstream on loopback that echoes lines (and answers HTTP); a proxy in front of it."""

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readline()
        if first.startswith(b"GET "):
            head = first + await reader.readuntil(b"\r\n\r\n")
            body = b"seen " + head.split(b"\r\n")[0]
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        else:
            while first:
                writer.write(b"echo:" + first)
                first = await reader.readline()
        await writer.drain()
        writer.close()

    up = await asyncio.start_server(upstream, "127.0.0.1", 0)
    up_port = up.sockets[0].getsockname()[1]

    async def resolve(host: str, port: int) -> list[str]:
        if host.endswith(".test"):
            return ["127.0.0.1"]
        raise OSError("unknown name")

    proxy = Proxy([Grant("allowed.test", (up_port,)), Grant("*.wild.test", (up_port,))], resolve,
                  verdict=lambda address, private_ok: "")
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0, limit=32 * 1024)
    try:
        yield Harness(proxy, server.sockets[0].getsockname()[1], up_port)
    finally:
        server.close()
        up.close()
        await proxy.close_all()


async def exchange(h: Harness, head: bytes, payload: bytes = b"", eof: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    writer.write(head + payload)
    await writer.drain()
    if payload or eof:
        writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def test_connect_tunnels_and_accounts_bytes(harness: Harness) -> None:
    target = f"allowed.test:{harness.upstream_port}"
    reply = await exchange(harness, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode(), b"ping\n")
    assert reply == b"HTTP/1.1 200 Connection Established\r\n\r\necho:ping\n"
    [entry] = harness.proxy.ledger.summary()
    assert entry == {"host": "allowed.test", "port": harness.upstream_port, "allowed": True, "reason": "",
                     "connections": 1, "bytes_up": 5, "bytes_down": 10}


async def test_refusals_say_why_and_are_accounted(harness: Harness) -> None:
    port = harness.upstream_port
    for target in (f"denied.test:{port}", f"evilwild.test:{port}", "allowed.test:1", f"127.0.0.1:{port}"):
        reply = await exchange(harness, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    reasons = {(e["host"], e["port"]): e["reason"] for e in harness.proxy.ledger.summary()}
    assert reasons == {("denied.test", port): "not-granted", ("evilwild.test", port): "not-granted",
                       ("allowed.test", 1): "not-granted", ("127.0.0.1", port): "ip-literal"}


async def test_plain_http_reaches_the_granted_host_only(harness: Harness) -> None:
    port = harness.upstream_port
    reply = await exchange(harness, f"GET http://a.wild.test:{port}/x HTTP/1.1\r\nHost: a.wild.test:{port}\r\n\r\n"
                           .encode())
    assert reply.startswith(b"HTTP/1.0 200 OK") and reply.endswith(b"seen GET /x HTTP/1.1")
    reply = await exchange(harness, f"GET http://denied.test:{port}/x HTTP/1.1\r\n\r\n".encode())
    assert b"X-Toolcell-Egress: denied; reason=not-granted" in reply


async def test_oversized_or_slow_heads_are_refused(harness: Harness) -> None:
    reply = await exchange(harness, b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431")
    reply = await exchange(harness, b"GET / HTTP/1.1\r\nHost: allowed.test", eof=True)
    assert reply.startswith(b"HTTP/1.1 400") and b"incomplete-request" in reply


async def test_unresolvable_and_forbidden_addresses(harness: Harness) -> None:
    harness.proxy.grants += (Grant("nowhere.example", (443,)),)
    reply = await exchange(harness, b"CONNECT nowhere.example:443 HTTP/1.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 502")
    harness.proxy.verdict = address_verdict  # the real check: loopback is refused even when granted
    reply = await exchange(harness, f"CONNECT allowed.test:{harness.upstream_port} HTTP/1.1\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 403")
    reasons = {e["host"]: e["reason"] for e in harness.proxy.ledger.summary()}
    assert reasons == {"nowhere.example": "dns-failed", "allowed.test": "loopback-address"}
