"""``toolcell mcp``: a ready MCP server backed by the supervisor, over stdio or Streamable HTTP."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys

from mcp.server.stdio import stdio_server

from runtime.mcp.adapter import SandboxedTools, server

log = logging.getLogger("toolcell.mcp")


async def serve_stdio(tools: SandboxedTools) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin."""
    srv = server(tools)
    async with stdio_server() as (read, write):
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
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_http(tools: SandboxedTools, listen: str, path: str = "/mcp") -> None:
    """Serve MCP over Streamable HTTP on ``listen`` until SIGINT/SIGTERM. Prints the URL once listening."""
    import uvicorn

    host, port = parse_listen(listen)
    if not is_loopback(host):
        log.warning("MCP endpoint on non-loopback address %s: it has no authentication and no TLS; anyone who can "
                    "reach it can run the sandboxed tools. Put it behind an authenticating TLS proxy.", host)
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
    app = server(tools).streamable_http_app(streamable_http_path=path, host=host)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
    print(f"toolcell: MCP (Streamable HTTP) on http://{shown}:{bound_port}{path}", file=sys.stderr, flush=True)
    try:
        await uvicorn.Server(config).serve(sockets=[sock])
    finally:
        sock.close()
