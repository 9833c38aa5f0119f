"""``toolcell mcp``: a ready MCP server backed by the supervisor, over stdio or Streamable HTTP.

Over HTTP, who may call is decided before the SDK sees a request (``httpguard``):

- Host and Origin are always checked against an allow-list: the listen address and the localhost
  names with the bound port, plus ``HttpAccess.allowed_hosts``/``allowed_origins``. The same lists
  also go to the SDK's own ``TransportSecuritySettings`` (a second, identical check inside the
  transport), never left to the SDK's default, which protects only 127.0.0.1/localhost/::1 listeners.
- Callers authenticate with a bearer JWT when ``HttpAccess.jwt`` is set (the config's ``auth.jwt``,
  verified as the supervisor does); their token is forwarded, so the supervisor's rules decide.
- Off loopback, the bridge refuses to start without ``jwt`` unless ``insecure_open`` says so explicitly.

Health and metrics (``observe``): ``GET /healthz`` on the MCP port (inside the Host/Origin guard, before
bearer authentication), and ``--metrics-listen`` for ``/metrics``, ``/healthz``, ``/livez`` on a
listener of their own (``probehttp``, as the supervisor's ``prometheus_listen``).

Sessions (``adapter``): over stdio the client is one MCP session; over HTTP each ``Mcp-Session-Id`` is
one, and its toolcell sessions are closed when it ends (DELETE, the SDK's idle timeout, shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mcp import types
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp

from toolcell.access_settings import JwtSettings
from toolcell.mcp.adapter import SandboxedTools, server
from toolcell.mcp.httpguard import (
    BearerGuard,
    HostOriginGuard,
    default_allowed_hosts,
    default_allowed_origins,
)
from toolcell.mcp.observe import BridgeMetrics, HealthRoute, StatusCounter, SupervisorProbe
from toolcell.probehttp import ProbeServer
from toolcell.probehttp import parse_listen as parse_metrics_listen
from toolcell.server.tokens import JwtVerifier

log = logging.getLogger("toolcell.mcp")


async def serve_stdio(tools: SandboxedTools) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin.

    The one client is one MCP session (whichever protocol era it speaks): a tool that allows sessions
    keeps one toolcell session for all its calls, closed when the client goes.
    """
    srv = server(tools)
    async with tools.one_client(), stdio_server() as (read, write):
        await srv.run(read, write, srv.create_initialization_options())


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (loopback) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", listen
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {listen!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """A loopback address or ``localhost``. Wildcards (0.0.0.0, ::) are not: they listen everywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HttpAccess:
    """Who may use the HTTP endpoint. ``insecure_open``: UNSAFE, anyone who reaches a non-loopback
    listener may run the tools with the bridge's own credentials."""

    allowed_hosts: tuple[str, ...] = ()  # Host values allowed besides the defaults (``name:*``: any port)
    allowed_origins: tuple[str, ...] = ()  # Origin values allowed besides the defaults
    jwt: JwtSettings | None = None  # callers must present a bearer JWT valid for these settings
    insecure_open: bool = False


def _entry_problem(kind: str, value: str) -> str | None:
    if not value or len(value) > 300 or any(c.isspace() or not c.isprintable() for c in value):
        return f"--allowed-{kind} {value[:40]!r}: empty, too long or not printable"
    if kind == "host" and ("/" in value or "@" in value):
        return f"--allowed-host {value[:40]!r}: a Host value is NAME or NAME:PORT, no scheme or path"
    if kind == "origin" and (not value.startswith(("http://", "https://")) or "/" in value.split("://", 1)[1]):
        return f"--allowed-origin {value[:40]!r}: an Origin is http(s)://NAME[:PORT], no path"
    return None


def access_problem(host: str, access: HttpAccess, *, loopback: Callable[[str], bool] = is_loopback) -> str | None:
    """Why the bridge must not serve on ``host`` with ``access`` (a usage error), or None."""
    for kind, values in (("host", access.allowed_hosts), ("origin", access.allowed_origins)):
        for value in values:
            if problem := _entry_problem(kind, value):
                return problem
    if access.jwt is not None and access.insecure_open:
        return "--insecure-open contradicts the bearer authentication configured (auth.jwt): choose one"
    if not loopback(host) and access.jwt is None and not access.insecure_open:
        return (f"{host} is not a loopback address, so MCP callers must authenticate: give --config FILE with an "
                "auth.jwt section (bearer JWTs, verified as the supervisor verifies them), or --insecure-open to "
                f"let anyone who can reach {host} run the tools")
    return None


def http_app(tools: SandboxedTools, host: str, port: int, path: str = "/mcp",
             access: HttpAccess = HttpAccess(), *, probe: SupervisorProbe | None = None,
             metrics: BridgeMetrics | None = None) -> tuple[ASGIApp, tuple[str, ...], tuple[str, ...]]:
    """The guarded ASGI app for a listener on ``host:port``; also the allowed Host and Origin values.

    With ``probe``, ``GET /healthz`` answers from it (after the Host/Origin check, before bearer
    authentication); with ``metrics``, requests and tool calls are counted there.
    """
    if access.jwt is not None and tools.caller_token is None:
        raise ValueError("bearer authentication needs SandboxedTools(caller_token=...): callers' tokens must be "
                         "forwarded, not replaced by the bridge's own credentials")
    defaults = default_allowed_hosts(host, port)
    hosts = tuple(dict.fromkeys((*defaults, *access.allowed_hosts)))
    origins = tuple(dict.fromkeys((*default_allowed_origins(defaults), *access.allowed_origins)))
    security = TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=list(hosts),
                                         allowed_origins=list(origins))
    srv = server(tools)
    if metrics is not None:
        srv.add_request_handler("tools/call", types.CallToolRequestParams, metrics.call(tools.call_tool))
    app: ASGIApp = srv.streamable_http_app(streamable_http_path=path, host=host, transport_security=security)
    if metrics is not None:
        metrics.count_sessions(srv.session_manager)
    if access.jwt is not None:
        app = BearerGuard(app, JwtVerifier(access.jwt))
    if probe is not None:
        app = HealthRoute(app, probe)
    app = HostOriginGuard(app, hosts, origins)
    return (StatusCounter(app, metrics) if metrics is not None else app), hosts, origins


async def serve_http(tools: SandboxedTools, listen: str, path: str = "/mcp", access: HttpAccess = HttpAccess(),
                     *, loopback: Callable[[str], bool] = is_loopback, metrics_listen: str | None = None) -> None:
    """Serve MCP over Streamable HTTP on ``listen`` until SIGINT/SIGTERM. Prints the URL once listening.

    ``GET /healthz`` is served on the MCP port. ``metrics_listen`` (``HOST:PORT``) adds a listener for
    ``/metrics``, ``/healthz`` and ``/livez``. Metrics have a port of their own, not the MCP port's:
    the MCP port may be published beyond the pod (with bearer authentication, behind an ingress)
    while a scrape carries no token and its Host is the pod's address, which the Host guard refuses;
    a separate port lets a NetworkPolicy open it to the monitoring namespace only, as the supervisor's
    ``prometheus_listen`` does.

    Raises ``ValueError`` (before listening) when ``access_problem`` finds one.
    """
    import uvicorn

    host, port = parse_listen(listen)
    problem = access_problem(host, access, loopback=loopback)
    if problem:
        raise ValueError(problem)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    # The supervisor's health on the client's own channel (TLS and all): health needs no caller identity.
    probe = SupervisorProbe(tools.client._channel)
    metrics = BridgeMetrics()
    metrics.watch(probe)
    probes: ProbeServer | None = None
    try:
        app, hosts, origins = http_app(tools, host, bound_port, path, access, probe=probe, metrics=metrics)
        if metrics_listen:
            mhost, mport = parse_metrics_listen(metrics_listen)
            loop = asyncio.get_running_loop()
            probes = ProbeServer(mhost, mport, registry=metrics.registry,
                                 health=lambda: probe.health_from(loop)).start()
    except BaseException:
        sock.close()
        raise
    log.info("MCP HTTP: allowed Host %s; allowed Origin %s", ", ".join(hosts), ", ".join(origins))
    if access.jwt is not None:
        log.info("MCP HTTP: callers must present a bearer JWT (issuer %s, audience %s); it is forwarded to the "
                 "supervisor, whose rules decide", access.jwt.issuer, access.jwt.audience)
    elif access.insecure_open and not loopback(host):
        log.warning("INSECURE: --insecure-open: the MCP endpoint on %s has no authentication and no TLS; anyone who "
                    "can reach it runs the sandboxed tools with this bridge's own credentials", host)
    # h11 with its 16 KiB cap on a request's head: header values reaching the guards are bounded.
    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False, http="h11",
                            h11_max_incomplete_event_size=16 * 1024)
    print(f"toolcell: MCP (Streamable HTTP) on http://{shown}:{bound_port}{path}", file=sys.stderr, flush=True)
    if probes is not None:
        print(f"toolcell: MCP bridge metrics on http://{probes.address}/metrics (health: /healthz, /livez)",
              file=sys.stderr, flush=True)
    try:
        await graceful_server(config).serve(sockets=[sock])
    finally:
        sock.close()
        # Each MCP session closed its toolcell sessions as it ended; any left (a session still ending) go now.
        await tools.close_sessions()
        if probes is not None:
            await asyncio.to_thread(probes.close)


def graceful_server(config: Any) -> Any:
    """A uvicorn server after whose clean shutdown on SIGTERM/SIGINT the bridge exits 0, like ``toolcell
    serve``: uvicorn itself re-raises the signal once shut down (exit 143, which init systems read as a
    crash). uvicorn is imported lazily, like in ``serve_http``."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                try:
                    yield
                finally:
                    captured = getattr(self, "_captured_signals", None)
                    if isinstance(captured, list):
                        captured.clear()

    return Server(config)


ENV_ALLOWED_HOSTS = "TOOLCELL_MCP_ALLOWED_HOSTS"
ENV_ALLOWED_ORIGINS = "TOOLCELL_MCP_ALLOWED_ORIGINS"


def http_access(allowed_hosts: list[str] | None, allowed_origins: list[str] | None, config: str | None,
                insecure_open: bool, environ: Mapping[str, str]) -> HttpAccess:
    """``HttpAccess`` from the CLI's flags, the environment (comma-separated lists, added to the flags) and
    the ``auth.jwt`` section of the toolcell config file ``config``. ``ValueError``: a usage error."""
    def listed(flags: list[str] | None, env: str) -> tuple[str, ...]:
        values = [*(flags or ()), *(v.strip() for v in environ.get(env, "").split(",") if v.strip())]
        return tuple(dict.fromkeys(values))

    jwt = None
    if config is not None:
        from toolcell.settings import load_config

        jwt = load_config(config).security.jwt
        if jwt is None:
            raise ValueError(f"--config {config}: no auth.jwt section, so no bearer token can be verified")
    return HttpAccess(allowed_hosts=listed(allowed_hosts, ENV_ALLOWED_HOSTS),
                      allowed_origins=listed(allowed_origins, ENV_ALLOWED_ORIGINS), jwt=jwt,
                      insecure_open=insecure_open)
