"""The MCP HTTP bridge's front door: Host/Origin allow-lists and bearer-JWT authentication (ASGI).

Two middlewares wrap the SDK's Streamable HTTP app, outermost first, and refuse before any MCP
work (body parsing, sessions, supervisor calls):

- ``HostOriginGuard``: the ``Host`` header must be in the allow-list (else 421) and an ``Origin``
  header, when present, must be too (else 403). Always on, whatever the listen address: a page
  served from ``rebind.attacker.example`` whose name resolves to the bridge sends that name as Host
  and Origin, and is refused. Matching is exact (``name:*`` allows any port of ``name``).
- ``BearerGuard``: ``Authorization: Bearer <JWT>`` verified by the supervisor's own
  ``JwtVerifier`` (the config's ``auth.jwt``), else 401 with the verifier's reason. The verified
  token rides in the ASGI scope as the SDK's ``AuthenticatedUser`` (so the SDK binds each MCP
  session to the principal that opened it) and ``caller_token`` hands it to the adapter, which
  forwards it to the supervisor: the supervisor's rules decide, never the bridge's own credentials.

Header values are attacker-controlled: they are length-capped before use, compared exactly, and
quoted in logs and responses only as a short escaped prefix; refusals are logged at most once a
second (with a count of those not logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.authentication import AuthCredentials
from starlette.types import ASGIApp, Receive, Scope, Send

from toolcell.errors import Unauthenticated
from toolcell.quoting import quote as quote_string
from toolcell.server.tokens import JwtVerifier

log = logging.getLogger("toolcell.mcp")

LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")
MAX_HOST_BYTES = 300  # a DNS name (253) plus a port, with room for brackets
MAX_ORIGIN_BYTES = 320
MAX_AUTHORIZATION_BYTES = 8192  # a JWT with generous claims; the HTTP server caps all headers at 16 KiB
QUOTE_CHARS = 40
MAX_MESSAGE_CHARS = 200
# A refused request's body is read up to this much, for this long, before the answer (see ``_drain``).
DRAIN_BYTES = 64 * 1024
DRAIN_TIMEOUT_S = 1.0


def quote(value: bytes | str, limit: int = QUOTE_CHARS) -> str:
    """A header value as ``toolcell.quoting.quote`` shows a caller string: a short escaped prefix."""
    return quote_string(value.decode("latin-1") if isinstance(value, bytes) else value, limit)


def brief(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` whole when short, else its head and tail (a reason may quote a caller's field)."""
    if len(message) <= limit:
        return message
    tail = limit // 2
    return f"{message[: limit - tail - 5]} ... {message[-tail:]}"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def default_allowed_hosts(listen_host: str, port: int) -> tuple[str, ...]:
    """The listen address and the localhost names, with the port (and bare, when the port is 80)."""
    hosts: list[str] = []
    for name in (*LOCAL_NAMES, listen_host):
        bare = f"[{name}]" if ":" in name and not name.startswith("[") else name
        for value in (_hostport(name, port), *((bare,) if port == 80 else ())):
            if value not in hosts:
                hosts.append(value)
    return tuple(hosts)


def default_allowed_origins(hosts: Iterable[str]) -> tuple[str, ...]:
    """``http://`` + each default host: a page served by the bridge's own address, nothing else."""
    return tuple(f"http://{h}" for h in hosts)


def _allowed(value: str, allowed: Sequence[str]) -> bool:
    """Exact match, or ``name:*`` for ``name:<digits>``."""
    if value in allowed:
        return True
    base, sep, port = value.rpartition(":")
    return bool(sep) and port.isdigit() and f"{base}:*" in allowed


class _RefusalLog:
    """One warning per ``interval_s`` at most; the rest are counted and reported with the next one."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.last = float("-inf")
        self.suppressed = 0

    def warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.suppressed += 1
            return
        more = f" (+{self.suppressed} refusals not logged)" if self.suppressed else ""
        self.last, self.suppressed = now, 0
        log.warning(message + more, *args)


async def _drain(receive: Receive) -> None:
    """Read (and drop) a refused request's body, bounded in size and time, before answering it.

    Closing a connection with unread bytes makes the kernel send a reset, which can reach the client
    before our answer does: it then sees "connection reset" instead of the 4xx and its reason.
    """
    async def read() -> None:
        left = DRAIN_BYTES
        while left > 0:
            message = await receive()
            if message.get("type") != "http.request":
                return
            left -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), DRAIN_TIMEOUT_S)


async def _respond(receive: Receive, send: Send, status: int, body: dict[str, str],
                   headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    await _drain(receive)
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": data})


def _headers(scope: Scope, *names: bytes) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {n: [] for n in names}
    for key, value in scope.get("headers", ()):
        if key in found:
            found[key].append(value)
    return found


class HostOriginGuard:
    """Refuse an HTTP request whose Host (421) or Origin (403) is not allowed; lifespan passes through."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str], allowed_origins: Sequence[str]) -> None:
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)
        self.allowed_origins = tuple(allowed_origins)
        self.refusals = _RefusalLog()

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        """(status, reason) for a request to refuse, or None."""
        h = _headers(scope, b"host", b"origin")
        hosts, origins = h[b"host"], h[b"origin"]
        if len(hosts) != 1 or len(origins) > 1:
            return 400, "exactly one Host header and at most one Origin header"
        host = hosts[0]
        if len(host) > MAX_HOST_BYTES or not _allowed(host.decode("latin-1"), self.allowed_hosts):
            self.refusals.warn("refused an MCP HTTP request: Host %s is not allowed", quote(host))
            return 421, "Host not allowed"
        if origins:
            origin = origins[0]
            if len(origin) > MAX_ORIGIN_BYTES or not _allowed(origin.decode("latin-1"), self.allowed_origins):
                self.refusals.warn("refused an MCP HTTP request: Origin %s is not allowed", quote(origin))
                return 403, "Origin not allowed"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            return  # websocket: not served (returning without accepting closes it)
        refused = self.refusal(scope)
        if refused is not None:
            status, reason = refused
            await _respond(receive, send, status, {"error": "refused", "error_description": reason})
            return
        await self.app(scope, receive, send)


class BearerGuard:
    """Require ``Authorization: Bearer <JWT>`` valid for ``verifier``; put the caller in ``scope['user']``."""

    def __init__(self, app: ASGIApp, verifier: JwtVerifier) -> None:
        self.app = app
        self.verifier = verifier
        self.refusals = _RefusalLog()

    async def authenticate(self, scope: Scope) -> AuthenticatedUser:
        values = _headers(scope, b"authorization")[b"authorization"]
        if not values:
            raise Unauthenticated("this MCP endpoint requires a bearer token (header 'Authorization: Bearer <JWT>')")
        if len(values) > 1:
            raise Unauthenticated("more than one Authorization header")
        raw = values[0]
        if len(raw) > MAX_AUTHORIZATION_BYTES:
            raise Unauthenticated(f"the Authorization header is longer than {MAX_AUTHORIZATION_BYTES} bytes")
        scheme, _, token = raw.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
            raise Unauthenticated("the Authorization header must be 'Bearer <JWT>'")
        ident = await self.verifier.verify(token)
        access = AccessToken(token=token, client_id=ident.subject, scopes=sorted(ident.scopes),
                             subject=ident.subject, claims={"iss": ident.issuer})
        return AuthenticatedUser(access)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            user = await self.authenticate(scope)
        except Unauthenticated as exc:
            reason = brief(str(exc))  # the verifier may quote a token's field (e.g. its alg)
            self.refusals.warn("refused an MCP HTTP request from %s: %s", quote(str(scope.get("client"))),
                               quote(reason, MAX_MESSAGE_CHARS))
            challenge = b'Bearer realm="toolcell", error="invalid_token"'
            await _respond(receive, send, 401, {"error": "invalid_token", "error_description": reason},
                           [(b"www-authenticate", challenge)])
            return
        scope["user"] = user
        scope["auth"] = AuthCredentials(user.scopes)
        await self.app(scope, receive, send)


def caller_token(request: Any) -> str | None:
    """The verified bearer token of the HTTP request behind an MCP message (``ctx.request``), if any."""
    scope = getattr(request, "scope", None)
    user = scope.get("user") if isinstance(scope, dict) else None
    return user.access_token.token if isinstance(user, AuthenticatedUser) else None
