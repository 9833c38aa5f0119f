"""A small HTTP listener for probes and scrapes: ``GET /metrics``, ``/healthz``, ``/livez``; nothing else.

Used for the supervisor's ``telemetry.prometheus_listen`` and the MCP bridge's ``--metrics-listen``, so
a Kubernetes probe or a Prometheus scrape starts no interpreter and needs no gRPC client.

- ``/metrics``: the prometheus_client registry, in the format the ``Accept`` header picks (text or
  OpenMetrics), as prometheus_client's own ``start_http_server`` serves it.
- ``/healthz``: ``health()`` -> 200 ``ok``, or 503 ``not serving: <reason>``. ``health`` must be cheap:
  it reads state the asyncio side keeps, it never asks the engine or the supervisor itself.
- ``/livez``: 200 ``ok`` while the process answers HTTP.
- Anything else: 404 (another method: 405). A query string is ignored.

Bounded and quiet: the stdlib server's caps on the request line (64 KiB) and headers (100) hold; no
body is read; a socket timeout frees the thread of a client that stalls; at most ``MAX_IN_FLIGHT``
requests are handled at once (more connections are closed unanswered); nothing of a request (path,
headers) is logged or echoed; a reason is capped and made printable ASCII.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

MAX_IN_FLIGHT = 16
REQUEST_TIMEOUT_S = 5.0
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class Health:
    """What ``/healthz`` reports: serving, or why not."""

    serving: bool
    reason: str = ""


STARTING = Health(False, "starting")


def plain(reason: str, limit: int = MAX_REASON_CHARS) -> str:
    """``reason`` as one line of printable ASCII, at most ``limit`` characters (plus a marker when cut)."""
    cut = reason[:limit]
    text = "".join(c if " " <= c <= "~" else "?" for c in cut)
    return text + ("..." if len(reason) > limit else "")


class _Handler(BaseHTTPRequestHandler):
    server: ProbeServer
    timeout = REQUEST_TIMEOUT_S  # applied to the connection's socket in ``setup``
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Nothing of a request is logged: its path and headers are the caller's."""

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if not head:
            self.wfile.write(body)

    def _route(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/livez":
            self._send(200, b"ok\n", head=head)
        elif path == "/healthz":
            health = self.server.health()
            if health.serving:
                self._send(200, b"ok\n", head=head)
            else:
                self._send(503, f"not serving: {plain(health.reason)}\n".encode(), head=head)
        elif path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", "")[:1024])
            self._send(200, encoder(self.server.registry), content_type, head=head)
        else:
            self._send(404, b"not found\n", head=head)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _refuse(self) -> None:
        self._send(405, b"method not allowed\n")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse


class ProbeServer(ThreadingHTTPServer):
    """The listener; ``start()`` serves it on a daemon thread, ``close()`` stops it."""

    daemon_threads = True

    def __init__(self, host: str, port: int, *, registry: CollectorRegistry = REGISTRY,
                 health: Callable[[], Health] = lambda: STARTING) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.registry = registry
        self.health = health
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host!s}]" if self.address_family == socket.AF_INET6 else f"{host!s}"
        return f"{shown}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: closed unanswered
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def start(self) -> ProbeServer:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.1,), name="toolcell-probes", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
        self.server_close()


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (loopback) -> (host, port); ``ValueError`` otherwise."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {listen[:80]!r}")
    return host, int(port)
