"""The MCP HTTP bridge's front door, end to end: a real supervisor, `toolcell mcp --transport http` as a
process, the official SDK client over Streamable HTTP, real containers.

- Host and Origin are checked on every listen address (127.0.0.2 and 0.0.0.0, where the SDK's own
  default protected nothing): the same request passes with the bridge's own Host and is refused with
  `rebind.attacker.example`, before any session or sandbox exists.
- Off loopback (0.0.0.0; every request here goes to 127.0.0.1) callers present a bearer JWT; the bridge
  forwards it and the supervisor's rules decide, even when the bridge holds a stronger token itself.
- The bridge refuses to start off loopback with neither authentication nor --insecure-open.
Traffic goes to 127.0.0.0/8 only.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.integration.test_mcp import TOOLCELL, http_bridge
from tests.security_support import AUDIENCE, ISSUER, Idp
from tests.support import REPO, config_doc, engine, leftovers, running_supervisor

pytestmark = pytest.mark.docker
REBIND = "rebind.attacker.example"
MARK = "ran-in-a-sandbox"
PROBE = {"code": f"print('{MARK}')"}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "probe", "version": "0"}}}
MCP_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


@pytest.fixture(autouse=True)
def _engine_present() -> None:
    engine()


@pytest.fixture
def idp() -> Idp:
    return Idp()


def supervisor_doc(tmp_path: Path, idp: Idp | None) -> tuple[dict[str, Any], Path]:
    """A supervisor config (also written to a file for the bridge's --config): with ``idp``, bearer tokens are
    required and the rules grant carol every tool, alice only text.*."""
    owner = f"test-{uuid.uuid4().hex[:10]}"
    doc = config_doc(owner, str(tmp_path / "toolcell.sock"))
    if idp is not None:
        (tmp_path / "jwks.json").write_bytes(idp.jwks())
        doc["auth"] = {
            "require": ["token"],
            "jwt": {"jwks": "jwks.json", "issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["RS256", "ES256"]},
            "rules": [{"match": {"subject": "carol"}, "tools": ["*"]},
                      {"match": {"subject": "alice"}, "tools": ["text.*"]},
                      {"match": {"subject": "bob"}, "tools": ["text.*"]}]}
    path = tmp_path / "toolcell.yaml"
    path.write_text(yaml.safe_dump(doc))
    return doc, path


@contextlib.asynccontextmanager
async def bridge(tmp_path: Path, target: str, listen: str, *extra: str,
                 env: dict[str, str] | None = None) -> AsyncIterator[tuple[str, int]]:
    """A running bridge; yields (URL through 127.0.0.1 or the listen address when loopback, port)."""
    args = [*TOOLCELL, "mcp", "--transport", "http", "--listen", f"{listen}:0", "--target", target, *extra]
    environ = {k: v for k, v in os.environ.items() if k != "TOOLCELL_TOKEN"} | (env or {})
    log = tmp_path / f"bridge-{uuid.uuid4().hex[:6]}.log"
    async with http_bridge(args, log, env=environ) as url:
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        yield url.replace("//0.0.0.0:", "//127.0.0.1:"), port


async def initialize_status(url: str, headers: dict[str, str]) -> int:
    """HTTP status of an MCP initialize POST with these extra headers (Host/Origin/Authorization)."""
    async with httpx2.AsyncClient(timeout=30) as http, \
            http.stream("POST", url, json=INIT, headers=MCP_HEADERS | headers) as resp:
        return resp.status_code


@contextlib.asynccontextmanager
async def session(url: str, headers: dict[str, str]) -> AsyncIterator[ClientSession]:
    """An initialized SDK session whose every HTTP request carries ``headers``."""
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60)) as http, \
            streamable_http_client(url, http_client=http) as (read, write), ClientSession(read, write) as s:
        with anyio.fail_after(30):
            await s.initialize()
        yield s


def leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    return [x for e in group.exceptions for x in (leaves(e) if isinstance(e, BaseExceptionGroup) else [e])]


async def probe_runs(url: str, headers: dict[str, str]) -> str:
    """'ran' when python.run printed the marker through a session with ``headers``; 'refused' when the
    server answered the SDK with an HTTP error; any other failure (a hang included) fails the test."""
    refused = False
    try:
        async with session(url, headers) as s:
            with anyio.fail_after(60):
                result = await s.call_tool("python.run", PROBE)
    except* MCPError as group:
        refused = all("error response" in str(e) for e in leaves(group))
    if refused:
        return "refused"
    text = "".join(getattr(c, "text", "") for c in result.content)
    return "ran" if MARK in text and not result.is_error else f"tool error: {text[:120]}"


def host_cases(listen: str, port: int) -> list[tuple[str, dict[str, str], int]]:
    """(case, extra headers, expected status) pairs: each refused probe beside the same probe allowed."""
    own = f"{listen if listen != '0.0.0.0' else '127.0.0.1'}:{port}"
    return [
        ("own host", {"host": own}, 200),
        ("rebinding host", {"host": f"{REBIND}:{port}"}, 421),
        ("localhost, localhost origin", {"host": f"localhost:{port}", "origin": f"http://localhost:{port}"}, 200),
        ("rebinding host and origin", {"host": f"{REBIND}:{port}", "origin": f"http://{REBIND}:{port}"}, 421),
        ("own host, own origin", {"host": own, "origin": f"http://{own}"}, 200),
        ("own host, rebinding origin", {"host": own, "origin": f"http://{REBIND}:{port}"}, 403),
        ("own host, opaque origin", {"host": own, "origin": "null"}, 403),
        ("localhost on another port", {"host": f"localhost:{port + 1 if port < 65535 else 1}"}, 421),
        ("host at 8 KiB of ':'", {"host": ":" * 8192}, 421),
        ("origin at 8 KiB of 'a.'", {"host": own, "origin": "http://" + "a." * 4096}, 403),
    ]


def rebind_probe_pair(port: int, listen: str) -> tuple[dict[str, str], dict[str, str]]:
    own = f"{listen if listen != '0.0.0.0' else '127.0.0.1'}:{port}"
    return ({"host": own, "origin": f"http://{own}"},
            {"host": f"{REBIND}:{port}", "origin": f"http://{REBIND}:{port}"})


@pytest.mark.parametrize("listen", ["127.0.0.2", "0.0.0.0"])
async def test_host_and_origin_are_checked_on_every_listen_address(tmp_path: Path, idp: Idp, listen: str) -> None:
    """The issue's attack: on 127.0.0.2 (open: loopback) and 0.0.0.0 (with a token), Host and Origin
    `rebind.attacker.example` ran python.run. Now: refused before a session exists; the same probe with the
    bridge's own Host runs."""
    off_loopback = listen == "0.0.0.0"
    doc, cfg = supervisor_doc(tmp_path, idp if off_loopback else None)
    auth = {"authorization": f"Bearer {idp.token('carol')}"} if off_loopback else {}
    extra = ("--config", str(cfg)) if off_loopback else ()
    async with running_supervisor(tmp_path, doc) as (app, _), bridge(tmp_path, app.address, listen, *extra) as (
            url, port):
        statuses = {case: await initialize_status(url, headers | auth)
                    for case, headers, _ in host_cases(listen, port)}
        good, rebinding = rebind_probe_pair(port, listen)
        outcomes = (await probe_runs(url, good | auth), await probe_runs(url, rebinding | auth))
    assert statuses == {case: want for case, _, want in host_cases(listen, port)}
    assert outcomes == ("ran", "refused")
    assert leftovers(engine(), doc["server"]["instance"]) == []


async def test_a_session_is_refused_a_rebinding_host_mid_way(tmp_path: Path) -> None:
    """A session opened with a good Host; the very same tools/call POST (session id and all) passes with
    the good Host and is refused with the rebinding one: the check is on every request, not at initialize."""
    doc, _ = supervisor_doc(tmp_path, None)
    async with running_supervisor(tmp_path, doc) as (app, _), bridge(tmp_path, app.address, "127.0.0.2") as (
            url, port), httpx2.AsyncClient(timeout=60) as http:
        good, rebinding = rebind_probe_pair(port, "127.0.0.2")
        resp = await http.post(url, json=INIT, headers=MCP_HEADERS | good)
        sid = resp.headers["mcp-session-id"]
        ids = {"mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}
        await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                        headers=MCP_HEADERS | good | ids)
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "python.run", "arguments": PROBE}}
        refused = await http.post(url, json=call, headers=MCP_HEADERS | rebinding | ids)
        allowed = await http.post(url, json=call, headers=MCP_HEADERS | good | ids)
    assert (refused.status_code, MARK in refused.text) == (421, False)
    assert (allowed.status_code, MARK in allowed.text) == (200, True)


async def test_allow_list_is_configurable_by_flag_and_environment(tmp_path: Path) -> None:
    doc, _ = supervisor_doc(tmp_path, None)
    proxy_host, app_origin = "mcp.proxy.example", "https://app.example"
    headers = {"host": f"{proxy_host}:443", "origin": app_origin}
    async with running_supervisor(tmp_path, doc) as (app, _):
        async with bridge(tmp_path, app.address, "127.0.0.2") as (url, _port):
            before = await initialize_status(url, headers)
        async with bridge(tmp_path, app.address, "127.0.0.2", "--allowed-host", f"{proxy_host}:*",
                          env={"TOOLCELL_MCP_ALLOWED_ORIGINS": f"https://other.example, {app_origin}"}) as (url, _):
            after = await initialize_status(url, headers)
            still = await initialize_status(url, {"host": f"{REBIND}:443", "origin": app_origin})
    assert (before, after, still) == (421, 200, 421)


def tool_names(listed: Any) -> list[str]:
    return sorted(t.name for t in listed.tools)


async def test_off_loopback_callers_need_a_bearer_token_and_the_supervisors_rules_decide(
        tmp_path: Path, idp: Idp) -> None:
    """Listening on 0.0.0.0 with --config: no/bad token -> 401 before MCP; each caller's token is forwarded.
    The bridge itself holds carol's token (all tools): alice still gets only text.*, and an anonymous
    caller nothing: the bridge never lends its own credentials."""
    doc, cfg = supervisor_doc(tmp_path, idp)
    expired = idp.token("alice", exp=int(time.time()) - 3600, iat=int(time.time()) - 7200,
                        nbf=int(time.time()) - 7200)
    bearer_cases = [
        ("no token", {}, 401),
        ("basic scheme", {"authorization": "Basic YWxpY2U6eA=="}, 401),
        ("not a JWT", {"authorization": "Bearer not-a-jwt"}, 401),
        ("expired", {"authorization": f"Bearer {expired}"}, 401),
        ("wrong audience", {"authorization": f"Bearer {idp.token('alice', aud='someone-else')}"}, 401),
        ("unsigned (alg none)", {"authorization": f"Bearer {idp.unsigned_token('alice')}"}, 401),
        ("8 KiB of '.'", {"authorization": "Bearer " + "." * 8192}, 401),
        ("valid alice", {"authorization": f"Bearer {idp.token('alice')}"}, 200),
    ]
    alice = {"authorization": f"Bearer {idp.token('alice')}"}
    carol = {"authorization": f"Bearer {idp.token('carol')}"}
    async with running_supervisor(tmp_path, doc) as (app, _), bridge(
            tmp_path, app.address, "0.0.0.0", "--config", str(cfg),
            env={"TOOLCELL_TOKEN": idp.token("carol")}) as (url, _port):
        statuses = {case: await initialize_status(url, h) for case, h, _ in bearer_cases}
        async with httpx2.AsyncClient(timeout=30) as http:
            refused = await http.post(url, json=INIT, headers=MCP_HEADERS)
        async with session(url, alice) as s:
            alice_tools = tool_names(await s.list_tools())
            alice_count = await s.call_tool("text.wordcount", {"text": "one two three"})
            alice_run = await s.call_tool("python.run", PROBE)
        async with session(url, carol) as s:
            carol_tools = tool_names(await s.list_tools())
        carol_run = await probe_runs(url, carol)
        hijack = await hijack_status(url, alice, {"authorization": f"Bearer {idp.token('bob')}"})
    assert statuses == {case: want for case, _, want in bearer_cases}
    assert refused.headers["www-authenticate"].startswith("Bearer ")
    assert "bearer token" in refused.json()["error_description"]
    assert alice_tools == ["text.wordcount"]
    assert not alice_count.is_error and "3" in "".join(getattr(c, "text", "") for c in alice_count.content)
    alice_text = "".join(getattr(c, "text", "") for c in alice_run.content)
    assert alice_run.is_error and "PERMISSION_DENIED" in alice_text and MARK not in alice_text
    assert carol_tools == ["ghost", "python.run", "python.tight", "text.wordcount"]
    assert carol_run == "ran"
    assert hijack == (200, 404)


async def hijack_status(url: str, owner: dict[str, str], other: dict[str, str]) -> tuple[int, int]:
    """(owner's, another valid caller's) status for a tools/list in the owner's session."""
    async with httpx2.AsyncClient(timeout=30) as http:
        resp = await http.post(url, json=INIT, headers=MCP_HEADERS | owner)
        ids = {"mcp-session-id": resp.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
        await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                        headers=MCP_HEADERS | owner | ids)
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        mine = await http.post(url, json=listing, headers=MCP_HEADERS | owner | ids)
        theirs = await http.post(url, json=listing, headers=MCP_HEADERS | other | ids)
    return mine.status_code, theirs.status_code


def run_bridge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TOOLCELL, "mcp", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={k: v for k, v in os.environ.items() if k != "TOOLCELL_TOKEN"})


def test_bridge_refuses_to_start_open_off_loopback(tmp_path: Path, idp: Idp) -> None:
    """Usage errors (exit 2) with the reason, before listening or calling the supervisor."""
    _, with_jwt = supervisor_doc(tmp_path, idp)
    bare = tmp_path / "bare"
    bare.mkdir()
    _, without_jwt = supervisor_doc(bare, None)
    nowhere = f"unix://{tmp_path}/none.sock"
    cases = [
        (["--listen", "0.0.0.0:0"], "is not a loopback address"),
        (["--listen", "[::]:0"], "is not a loopback address"),
        (["--listen", "0.0.0.0:0", "--config", str(with_jwt), "--insecure-open"], "contradicts"),
        (["--listen", "0.0.0.0:0", "--config", str(without_jwt)], "no auth.jwt section"),
        (["--listen", "127.0.0.2:0", "--allowed-origin", "rebind.attacker.example"], "--allowed-origin"),
        (["--listen", "127.0.0.2:0", "--allowed-host", "http://x.example/"], "--allowed-host"),
    ]
    for args, reason in cases:
        done = run_bridge("--transport", "http", "--target", nowhere, *args)
        assert (done.returncode, reason in done.stderr) == (2, True), (args, done.stderr[-400:])
    stdio = run_bridge("--target", nowhere, "--insecure-open")
    assert stdio.returncode == 2 and "apply to --transport http" in stdio.stderr
    # The pairs: the same listeners get past these checks (then stop at the absent supervisor, exit 4).
    for args in (["--listen", "0.0.0.0:0", "--insecure-open"], ["--listen", "0.0.0.0:0", "--config", str(with_jwt)],
                 ["--listen", "127.0.0.2:0"]):
        done = run_bridge("--transport", "http", "--target", nowhere, *args)
        assert done.returncode == 4 and "UNAVAILABLE" in done.stderr, (args, done.stderr[-400:])


async def test_insecure_open_is_loud_and_still_checks_host(tmp_path: Path) -> None:
    doc, _ = supervisor_doc(tmp_path, None)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    async with running_supervisor(tmp_path, doc) as (app, _), bridge(
            log_dir, app.address, "0.0.0.0", "--insecure-open",
            "--tool", "text.wordcount") as (url, port):
        good = await initialize_status(url, {"host": f"127.0.0.1:{port}"})
        bad = await initialize_status(url, {"host": REBIND + "x" * 8000})
        async with session(url, {}) as s:
            counted = await s.call_tool("text.wordcount", {"text": "a b"})
    log = "".join(p.read_text() for p in log_dir.glob("bridge-*.log"))
    assert (good, bad) == (200, 421)
    assert not counted.is_error
    assert "INSECURE: --insecure-open" in log
    assert "refused an MCP HTTP request: Host 'rebind.attacker.example" in log and "...(8023 chars)" in log
    assert "x" * 41 not in log  # a short escaped prefix, never the hostile value
