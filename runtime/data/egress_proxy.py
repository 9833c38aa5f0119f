"""toolcell's egress proxy: one per granted invocation, the only peer a granted sandbox can reach.

This file is a self-contained program (Python standard library only), package data beside the launcher.
The Docker backend (``runtime/backends/docker_egress.py``) sends it as the
stdin of ``python3 -I -u -`` in a hardened sidecar container that sits on two networks: the invocation's
``internal`` network (no route out; the proxy listens on its address there) and the upstream network
(where it resolves names and connects). It is also importable, so its rules are unit-tested in process.

What it enforces, per connection from the sandbox:

- ``CONNECT host:port`` (TLS and anything else tunnelled): the requested host and port must match a grant.
- Plain HTTP (``GET http://host[:port]/...`` or origin-form with ``Host:``): host and port from the
  request, which must agree with the ``Host`` header; the request is forwarded in origin-form with
  ``Connection: close``, so one connection carries requests to that one destination only.
- Names only: an IP literal is refused (the grant names hosts, and an IP would bypass it). The proxy
  resolves the name itself (the sandbox has no resolver it could use as a channel), then refuses
  loopback, link-local (cloud metadata), multicast, unspecified and reserved addresses always, and other
  non-global (private) addresses unless the grant says ``allow_private``; it connects to the address it
  checked, so a second lookup can't rebind the name.
- Bounded: header size, header read time, concurrent connections, distinct destinations accounted.

Accounting: per (host, port, verdict, reason) the number of connections and bytes each way
(``up`` = sandbox -> upstream). On SIGTERM the proxy closes every connection and prints one JSON line
``{"event": "summary", "destinations": [...]}``; at start it prints ``{"event": "listening", ...}``.
Configuration comes as JSON in ``TOOLCELL_EGRESS_POLICY``: ``{"listen": ip, "port": n, "grants":
[{"host": "api.example.com" | "*.example.com", "ports": [443], "allow_private": false}]}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 32 * 1024
HEAD_TIMEOUT_S = 10.0
RESOLVE_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
MAX_DESTINATIONS = 256
CHUNK = 64 * 1024
INVALID_HOST = "<invalid>"
OTHER_HOST = "<other>"

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOST_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
# Hop-by-hop and proxy-only headers, never forwarded upstream.
_DROP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization",
                           "proxy-authenticate", "te", "trailer", "upgrade"})


@dataclass(frozen=True)
class Grant:
    host: str  # "api.example.com" or "*.example.com" (subdomains only, at any depth)
    ports: tuple[int, ...] = (443,)
    allow_private: bool = False


def normalize_host(host: str) -> str | None:
    """Lower-cased DNS name without a trailing dot, or None when it is not one (IP literals included)."""
    host = host.strip().lower()
    if host.endswith("."):
        host = host[:-1]
    if not HOST_RE.match(host) or is_ip_literal(host):
        return None
    return host


def is_ip_literal(host: str) -> bool:
    text = host.strip().strip("[]")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return True
    # Forms inet_aton accepts and some clients resolve as addresses: "127.1", "0x7f000001", "2130706433".
    if re.fullmatch(r"[0-9a-fA-FxX.]+", text):
        with contextlib.suppress(OSError):
            socket.inet_aton(text)
            return True
    return False


def host_matches(pattern: str, host: str) -> bool:
    """``*.example.com`` matches ``a.example.com`` and ``a.b.example.com``, never ``example.com`` or
    ``evilexample.com``; any other pattern matches exactly that host."""
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def grant_for(grants: Iterable[Grant], host: str, port: int) -> Grant | None:
    for grant in grants:
        if port in grant.ports and host_matches(grant.host, host):
            return grant
    return None


def address_verdict(address: str, allow_private: bool) -> str:
    """"" when the proxy may connect to ``address``, else the reason it may not."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return "loopback-address"
    if ip.is_link_local:
        return "link-local-address"
    if ip.is_multicast or ip.is_reserved:
        return "reserved-address"
    if not ip.is_global and not allow_private:
        return "private-address"
    return ""


class Denied(Exception):
    def __init__(self, status: int, reason: str, host: str = "", port: int = 0) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        # What to account the refusal under, when it was refused before a host name was parsed.
        self.host = host
        self.port = port


@dataclass
class Tally:
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class Ledger:
    """Per-destination accounting, bounded to ``MAX_DESTINATIONS`` keys (the rest go to ``<other>``)."""

    entries: dict[tuple[str, int, bool, str], Tally] = field(default_factory=dict)

    def open(self, host: str, port: int, allowed: bool, reason: str) -> Tally:
        key = (host, port, allowed, reason)
        if key not in self.entries and len(self.entries) >= MAX_DESTINATIONS:
            key = (OTHER_HOST, 0, allowed, "overflow")
        tally = self.entries.setdefault(key, Tally())
        tally.connections += 1
        return tally

    def summary(self) -> list[dict[str, Any]]:
        return [{"host": h, "port": p, "allowed": a, "reason": r, "connections": t.connections,
                 "bytes_up": t.bytes_up, "bytes_down": t.bytes_down}
                for (h, p, a, r), t in sorted(self.entries.items(), key=lambda kv: (kv[0][0], kv[0][1]))]


@dataclass(frozen=True)
class Request:
    method: str
    host: str  # normalized, or INVALID_HOST
    port: int
    head: bytes  # what to send upstream (empty for CONNECT)


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    authority = authority.strip()
    if authority.startswith("["):  # [v6]:port
        host, _, rest = authority[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            host, port_text = authority, ""
    if not port_text:
        if default_port is None:
            raise Denied(400, "port-required")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise Denied(400, "bad-port")
    return host, int(port_text)


def _checked_host(raw: str, port: int) -> str:
    if is_ip_literal(raw):
        try:
            literal = str(ipaddress.ip_address(raw.strip().strip("[]")))
        except ValueError:
            literal = INVALID_HOST  # an inet_aton spelling ("127.1"): not worth echoing
        raise Denied(403, "ip-literal", literal, port)
    host = normalize_host(raw)
    if host is None:
        raise Denied(400, "invalid-host")
    return host


def parse_request(head: bytes) -> Request:
    """Parse the request head (up to and including the blank line); raise ``Denied`` when unusable."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError as exc:
        raise Denied(400, "bad-request") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1") or not parts[0].isalpha():
        raise Denied(400, "bad-request")
    method, target, version = parts
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            raise Denied(400, "bad-request")
        headers.append((name, value.strip()))
    host_headers = [v for n, v in headers if n.lower() == "host"]
    if len(host_headers) > 1:
        raise Denied(400, "bad-request")
    if method == "CONNECT":
        raw_host, port = _split_authority(target, None)
        return Request(method, _checked_host(raw_host, port), port, b"")
    if target.lower().startswith("http://"):
        url = urlsplit(target)
        if url.username is not None or url.password is not None or not url.netloc:
            raise Denied(400, "bad-request")
        raw_host, port = _split_authority(url.netloc, 80)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        if host_headers:
            header_host, header_port = _split_authority(host_headers[0], 80)
            if (header_host.lower().rstrip("."), header_port) != (raw_host.lower().rstrip("."), port):
                raise Denied(400, "host-mismatch")
    elif target.startswith("/") and host_headers:
        raw_host, port = _split_authority(host_headers[0], 80)
        path = target
    elif "://" in target:
        raise Denied(400, "use-connect-for-tls")
    else:
        raise Denied(400, "bad-request")
    host = _checked_host(raw_host, port)
    kept = [(n, v) for n, v in headers if n.lower() not in _DROP_HEADERS and n.lower() != "host"]
    authority = host if port == 80 else f"{host}:{port}"
    out = [f"{method} {path} {version}", f"Host: {authority}", *(f"{n}: {v}" for n, v in kept),
           "Connection: close", "", ""]
    return Request(method, host, port, "\r\n".join(out).encode("ascii"))


Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class Proxy:
    def __init__(self, grants: Sequence[Grant], resolver: Resolver = system_resolver,
                 verdict: Callable[[str, bool], str] = address_verdict) -> None:
        self.grants = tuple(grants)
        self.resolver = resolver
        self.verdict = verdict
        self.ledger = Ledger()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._slots.locked():
                self.ledger.open(OTHER_HOST, 0, False, "too-many-connections")
                await _refuse(writer, 503, "too-many-connections")
                return
            async with self._slots:
                await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = INVALID_HOST, 0
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            except (asyncio.LimitOverrunError, ValueError) as exc:
                raise Denied(431, "head-too-large") from exc
            except (TimeoutError, asyncio.IncompleteReadError) as exc:
                raise Denied(400, "incomplete-request") from exc
            request = parse_request(head)
            host, port = request.host, request.port
            grant = grant_for(self.grants, host, port)
            if grant is None:
                raise Denied(403, "not-granted")
            upstream_reader, upstream_writer = await self._connect(host, port, grant)
        except Denied as denied:
            if denied.host:
                host, port = denied.host, denied.port
            self.ledger.open(host, port, False, denied.reason)
            await _refuse(writer, denied.status, denied.reason)
            return
        tally = self.ledger.open(host, port, True, "")
        try:
            if request.method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                await writer.drain()
            else:
                upstream_writer.write(request.head)
                tally.bytes_up += len(request.head)
                await upstream_writer.drain()
            await asyncio.gather(_pipe(reader, upstream_writer, tally, "bytes_up"),
                                 _pipe(upstream_reader, writer, tally, "bytes_down"))
        finally:
            upstream_writer.close()

    async def _connect(self, host: str, port: int,
                       grant: Grant) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            addresses = await asyncio.wait_for(self.resolver(host, port), RESOLVE_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise Denied(502, "dns-failed") from exc
        verdicts = [(a, self.verdict(a, grant.allow_private)) for a in addresses]
        usable = [a for a, why in verdicts if not why]
        if not usable:
            raise Denied(403, verdicts[0][1] if verdicts else "dns-failed")
        try:  # connect to the address that was checked: no second lookup that could rebind the name
            return await asyncio.wait_for(asyncio.open_connection(usable[0], port, limit=CHUNK), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise Denied(502, "connect-failed") from exc

    async def close_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, tally: Tally, attr: str) -> None:
    try:
        while data := await src.read(CHUNK):
            setattr(tally, attr, getattr(tally, attr) + len(data))
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except OSError:
        dst.close()


async def _refuse(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    phrase = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large",
              502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "Error")
    body = f"toolcell egress: {reason}\n".encode()
    with contextlib.suppress(OSError):
        writer.write(f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                     f"X-Toolcell-Egress: denied; reason={reason}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()


def grants_from(raw: Iterable[Mapping[str, Any]]) -> list[Grant]:
    return [Grant(host=str(g["host"]), ports=tuple(int(p) for p in g.get("ports", (443,))),
                  allow_private=bool(g.get("allow_private", False))) for g in raw]


def _emit(record: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def main() -> None:
    policy = json.loads(os.environ["TOOLCELL_EGRESS_POLICY"])
    proxy = Proxy(grants_from(policy["grants"]))
    server = await asyncio.start_server(proxy.handle, policy["listen"], int(policy["port"]), limit=MAX_HEAD_BYTES)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    _emit({"event": "listening", "address": policy["listen"], "port": int(policy["port"])})
    await stop.wait()
    server.close()
    await proxy.close_all()
    _emit({"event": "summary", "destinations": proxy.ledger.summary()})


if __name__ in ("__main__", "<stdin>"):
    asyncio.run(main())
