"""The MCP HTTP bridge's front door as plain calls: who may start where, which Host/Origin values pass,
bearer checks before any verification work, hostile header values at and beyond the caps.

The guards are called as ASGI apps with a real ``JwtVerifier`` (a JWKS file from a test IdP); the app
behind them records what reached it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.security_support import AUDIENCE, ISSUER, Idp
from toolcell.access_settings import JwtSettings
from toolcell.mcp.bridge import HttpAccess, access_problem, is_loopback
from toolcell.mcp.httpguard import (
    BearerGuard,
    HostOriginGuard,
    caller_token,
    default_allowed_hosts,
    default_allowed_origins,
    quote,
)
from toolcell.server.tokens import JwtVerifier

MIB = 1 << 20
JWT = JwtSettings(jwks="/nonexistent/jwks.json", issuer=ISSUER, audience=AUDIENCE)


def never_loopback(host: str) -> bool:
    return False


@pytest.mark.parametrize(("host", "access", "loopback", "problem"), [
    ("127.0.0.1", HttpAccess(), is_loopback, None),
    ("127.0.0.2", HttpAccess(), is_loopback, None),
    ("localhost", HttpAccess(), is_loopback, None),
    ("::1", HttpAccess(), is_loopback, None),
    # the same loopback listener, judged as if it were not loopback: the decision is the injected one
    ("127.0.0.2", HttpAccess(), never_loopback, "is not a loopback address"),
    ("0.0.0.0", HttpAccess(), is_loopback, "is not a loopback address"),
    ("::", HttpAccess(), is_loopback, "is not a loopback address"),
    ("192.0.2.7", HttpAccess(), is_loopback, "is not a loopback address"),
    ("0.0.0.0", HttpAccess(jwt=JWT), is_loopback, None),
    ("0.0.0.0", HttpAccess(insecure_open=True), is_loopback, None),
    ("127.0.0.1", HttpAccess(jwt=JWT, insecure_open=True), is_loopback, "contradicts"),
    ("127.0.0.1", HttpAccess(allowed_hosts=("mcp.example:443",)), is_loopback, None),
    ("127.0.0.1", HttpAccess(allowed_hosts=("https://mcp.example",)), is_loopback, "--allowed-host"),
    ("127.0.0.1", HttpAccess(allowed_hosts=("a b",)), is_loopback, "--allowed-host"),
    ("127.0.0.1", HttpAccess(allowed_hosts=("x" * 301,)), is_loopback, "--allowed-host"),
    ("127.0.0.1", HttpAccess(allowed_origins=("https://app.example",)), is_loopback, None),
    ("127.0.0.1", HttpAccess(allowed_origins=("app.example",)), is_loopback, "--allowed-origin"),
    ("127.0.0.1", HttpAccess(allowed_origins=("https://app.example/x",)), is_loopback, "--allowed-origin"),
])
def test_who_may_start_where(host: str, access: HttpAccess, loopback: Any, problem: str | None) -> None:
    found = access_problem(host, access, loopback=loopback)
    assert (found is None) if problem is None else (found is not None and problem in found), found


def test_default_allow_lists_are_the_listen_address_and_localhost_names_with_the_port() -> None:
    assert default_allowed_hosts("127.0.0.2", 8765) == ("127.0.0.1:8765", "localhost:8765", "[::1]:8765",
                                                        "127.0.0.2:8765")
    assert default_allowed_hosts("::1", 9) == ("127.0.0.1:9", "localhost:9", "[::1]:9")
    assert default_allowed_hosts("0.0.0.0", 80) == ("127.0.0.1:80", "127.0.0.1", "localhost:80", "localhost",
                                                    "[::1]:80", "[::1]", "0.0.0.0:80", "0.0.0.0")
    assert default_allowed_origins(("localhost:8765",)) == ("http://localhost:8765",)


def scope(**headers: bytes | list[bytes]) -> dict[str, Any]:
    raw = [(k.encode(), v) for k, vs in headers.items() for v in (vs if isinstance(vs, list) else [vs])]
    return {"type": "http", "method": "POST", "path": "/mcp", "headers": raw, "client": ("127.0.0.1", 5)}


GUARD = HostOriginGuard(lambda s, r, w: None, ("localhost:8765", "mcp.example:*"),  # type: ignore[arg-type,return-value]
                        ("http://localhost:8765", "https://app.example"))


@pytest.mark.parametrize(("headers", "want"), [
    ({"host": b"localhost:8765"}, None),
    ({"host": b"rebind.attacker.example:8765"}, 421),
    ({"host": b"localhost:8765", "origin": b"http://localhost:8765"}, None),
    ({"host": b"localhost:8765", "origin": b"http://rebind.attacker.example:8765"}, 403),
    ({"host": b"localhost:8765", "origin": b"https://app.example"}, None),
    ({"host": b"localhost:8765", "origin": b"https://app.example.attacker.example"}, 403),
    ({"host": b"localhost:8765", "origin": b"null"}, 403),
    ({"host": b"mcp.example:443"}, None),
    ({"host": b"mcp.example:443.attacker.example"}, 421),  # name:* is name:<digits>, no prefix match
    ({"host": b"mcp.example:"}, 421),
    ({"host": b"mcp.example.attacker.example:443"}, 421),
    ({"host": b"LOCALHOST:8765"}, 421),  # exact: no case folding
    ({}, 400),
    ({"host": [b"localhost:8765", b"rebind.attacker.example"]}, 400),
    ({"host": b"localhost:8765", "origin": [b"http://localhost:8765", b"http://x"]}, 400),
])
def test_host_and_origin_pairs(headers: dict[str, Any], want: int | None) -> None:
    refused = GUARD.refusal(scope(**headers))
    assert (refused[0] if refused else None) == want


@pytest.mark.parametrize("filler", [b"\n", b"a.", b":", b"@", b"localhost:8765"])
def test_worst_case_header_values_at_1_mib_are_refused_in_linear_time(filler: bytes) -> None:
    value = (filler * (MIB // len(filler) + 1))[:MIB]
    start = time.monotonic()
    results = [GUARD.refusal(scope(host=value)), GUARD.refusal(scope(host=b"localhost:8765", origin=value))]
    assert [r[0] if r else None for r in results] == [421, 403]
    assert time.monotonic() - start < 2.0  # generous: proves no scan that grows faster than the input
    assert len(quote(value)) < 80 and len(quote(value.decode("latin-1"))) < 80


def test_quote_is_short_escaped_and_marks_the_cut() -> None:
    assert quote("localhost:8765") == "'localhost:8765'"
    assert quote("\x1b[31m\n" * 100).startswith("'\\x1b[31m\\n")
    assert quote("a" * 1000).endswith("'...(1000 chars)") and quote(b"\n" * 30).endswith("'...(30 chars)")
    assert quote("it's") == "'it\\'s'"


async def call(app: Any, sc: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    """Run the ASGI ``app`` once; (response status or 0 when it passed the request on, what passed on)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(sc, receive, send)
    return (sent[0]["status"] if sent else 0), (sc if not sent else None)


@pytest.fixture
def bearer(tmp_path: Path) -> tuple[Idp, BearerGuard, list[dict[str, Any]]]:
    idp = Idp()
    (tmp_path / "jwks.json").write_bytes(idp.jwks())
    reached: list[dict[str, Any]] = []

    async def inner(sc: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append(sc)

    verifier = JwtVerifier(JwtSettings(jwks=str(tmp_path / "jwks.json"), issuer=ISSUER, audience=AUDIENCE))
    return idp, BearerGuard(inner, verifier), reached


async def test_bearer_pairs_and_the_forwarded_identity(bearer: tuple[Idp, BearerGuard, list[dict[str, Any]]]
                                                       ) -> None:
    idp, guard, reached = bearer
    good = idp.token("alice", scope="tools:text")
    cases = [
        ({}, 401),
        ({"authorization": b"Bearer " + good.encode()}, 0),
        ({"authorization": b"bearer " + good.encode()}, 0),
        ({"authorization": b"Basic " + good.encode()}, 401),
        ({"authorization": b"Bearer " + good.encode() + b" extra"}, 401),
        ({"authorization": [b"Bearer " + good.encode(), b"Bearer " + good.encode()]}, 401),
        ({"authorization": b"Bearer " + idp.token("alice", aud="other").encode()}, 401),
        ({"authorization": b"Bearer " + idp.unsigned_token("alice").encode()}, 401),
        ({"authorization": b"Bearer " + idp.hs256_with_public_key("alice").encode()}, 401),
        ({"authorization": b"Bearer " + b"a." * (MIB // 2)}, 401),
    ]
    got = [(await call(guard, scope(**headers)))[0] for headers, _ in cases]
    assert got == [want for _, want in cases]
    forwarded = reached[0]
    assert caller_token(type("Req", (), {"scope": forwarded})()) == good
    assert forwarded["user"].access_token.subject == "alice" and forwarded["auth"].scopes == ["tools:text"]
    assert caller_token(type("Req", (), {"scope": scope()})()) is None and caller_token(None) is None


async def test_bearer_refusal_says_why_briefly(bearer: tuple[Idp, BearerGuard, list[dict[str, Any]]]) -> None:
    _, guard, _ = bearer
    import base64
    import json

    header = base64.urlsafe_b64encode(json.dumps({"alg": "x" * 4000, "kid": "rsa-1"}).encode()).rstrip(b"=")
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    await guard(scope(authorization=b"Bearer " + header + b".e30.sig"), receive, send)
    body = json.loads(sent[1]["body"])
    assert sent[0]["status"] == 401 and body["error_description"].startswith("token algorithm 'xxx")
    assert body["error_description"].endswith("is not accepted (accepted: RS256, ES256)")
    assert len(body["error_description"]) <= 200
