"""Who may call what, over a real grpc.aio server: peer credentials (a second uid), JWTs against a
JWKS on loopback, TLS/mTLS with certificates made here, the permission matrix, bursts against rate
limits and concurrency caps (exact counts), admission under simulated pressure, the audit trail.

Sandboxes come from the in-process fake backend: what is under test is the gate in front of them
(tests/integration/test_supervisor.py and test_access_engine.py cover the real engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.security_support import AUDIENCE, ISSUER, Idp, Pki, serve_jwks
from toolcell.api.v1 import supervisor_pb2 as pb
from toolcell.api.v1 import supervisor_pb2_grpc as pb_grpc
from toolcell.audit import verify
from toolcell.backends.fake import FakeBackend, FakeProcess
from toolcell.client import Client, ClientError, ClientTls
from toolcell.errors import ConfigError
from toolcell.model import Result, Started, Status
from toolcell.policy.limits import HostSample
from toolcell.server.app import App
from toolcell.settings import parse_config
from toolcell.supervisor import Supervisor

REPO = Path(__file__).resolve().parents[2]
OTHER_UID = 1234
ARGS = '{"text": "secret payload 42"}'


async def _echo(proc: FakeProcess) -> int:
    await proc.stdout(proc.stdin)
    return 0


async def _hold(proc: FakeProcess) -> int:
    await asyncio.sleep(30)
    return 0


def _doc(listen: str, **sections: Any) -> dict[str, Any]:
    server = {"listen": listen, "instance": f"test-{uuid.uuid4().hex[:8]}", "shutdown_grace": "1s",
              "socket_mode": "0666", **sections.pop("server", {})}
    return {
        "version": 1,
        "server": server,
        "profiles": {"default": {"timeout": "20s", "kill_grace": "200ms"}},
        "tools": [
            {"name": "text.echo", "description": "echo", "image": "fake/echo", "command": ["echo"]},
            {"name": "text.upper", "description": "echo too", "image": "fake/echo", "command": ["echo"]},
            {"name": "python.hold", "description": "runs until cancelled", "image": "fake/hold", "command": ["x"]},
        ],
        **sections,
    }


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A socket directory another uid can traverse (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tc-auth-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def serving(doc: dict[str, Any], *, sampler: Any = None, base_dir: Path | None = None
                  ) -> AsyncIterator[App]:
    config = parse_config(doc, environ={}, base_dir=base_dir)
    backend = FakeBackend({"fake/echo": _echo, "fake/hold": _hold})
    app = App(Supervisor(config, backend), sampler=sampler)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace_s=0.5)
        assert backend.live == []


async def _outcome(client: Client, tool: str = "text.echo", args: str = ARGS) -> str:
    try:
        result = await client.call(tool, args, timeout=20)
    except ClientError as exc:
        return exc.code
    return result.status.value


def _audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


CLIENT_SCRIPT = """
import asyncio, json, sys
from toolcell.client import Client, ClientError
async def main():
    out = {}
    async with Client(sys.argv[1]) as c:
        try:
            out["list"] = [t.name for t in await c.list_tools()]
        except ClientError as e:
            out["list"] = e.code
        for tool in sys.argv[2:]:
            try:
                out[tool] = (await c.call(tool, '{"text": "hi"}', timeout=20)).status.value
            except ClientError as e:
                out[tool] = e.code
    print(json.dumps(out))
asyncio.run(main())
"""


async def _as_other_uid(address: str, *tools: str) -> dict[str, Any]:
    """Run a client as uid 1234 (setpriv): the kernel, not the client, says who it is."""
    proc = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
        sys.executable, "-c", CLIENT_SCRIPT, address, *tools,
        cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


# --- peer credentials over the Unix socket ---------------------------------------------------------

async def test_peer_credentials_identify_the_caller_over_the_socket() -> None:
    with shared_dir() as d:
        audit = d / "audit.jsonl"
        doc = _doc(f"unix://{d}/tc.sock", auth={"require": ["peer"], "rules": [
            {"match": {"uid": os.geteuid()}, "tools": ["*"]},
            {"match": {"uid": OTHER_UID}, "tools": ["text.echo"]},
        ]}, audit={"file": str(audit)})
        async with serving(doc) as app:
            other = await _as_other_uid(app.address, "text.echo", "text.upper")
            assert other == {"list": ["text.echo"], "text.echo": "ok", "text.upper": "PERMISSION_DENIED"}
            async with Client(app.address) as me:
                assert [t.name for t in await me.list_tools()] == ["python.hold", "text.echo", "text.upper"]
                assert await _outcome(me, "text.upper") == "ok"
        records = _audit(audit)
        denied = [r for r in records if r.get("decision") == "deny"]
        assert len(denied) == 1 and denied[0]["tool"] == "text.upper"
        assert denied[0]["principal"]["uid"] == OTHER_UID and denied[0]["principal"]["pid"] > 1
        assert denied[0]["principal"]["id"] == f"uid:{OTHER_UID}"
        assert verify([audit]).ok


async def test_default_without_auth_section_is_the_socket_owner_only() -> None:
    """Backwards compatible: the supervisor's own uid may do everything; another uid nothing."""
    with shared_dir() as d:
        async with serving(_doc(f"unix://{d}/tc.sock")) as app:
            assert await _as_other_uid(app.address, "text.echo") == {"list": [], "text.echo": "PERMISSION_DENIED"}
            async with Client(app.address) as me:
                assert len(await me.list_tools()) == 3
                assert await _outcome(me) == "ok"


# --- JWT --------------------------------------------------------------------------------------------

@pytest.fixture
def idp() -> Idp:
    return Idp()


def _jwt_doc(listen: str, jwks: str, **auth: Any) -> dict[str, Any]:
    return _doc(listen, auth={
        "require": ["token"],
        "jwt": {"jwks": jwks, "issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["RS256", "ES256"],
                "leeway": "5s", "min_refetch": "0.2s"},
        "rules": [
            {"match": {"scope": "tools:text"}, "tools": ["text.*"]},
            {"match": {"subject": "carol"}, "tools": ["*"]},
        ], **auth})


async def test_valid_tokens_rs256_and_es256(tmp_path: Path, idp: Idp) -> None:
    with serve_jwks(idp) as (url, fetches):
        async with serving(_jwt_doc(f"unix://{tmp_path}/tc.sock", url)) as app:
            for token in (idp.token("alice", scope="tools:text"),
                          idp.token("alice", kid="ec-1", alg="ES256", scope="tools:text other")):
                async with Client(app.address, token=token) as c:
                    assert [t.name for t in await c.list_tools()] == ["text.echo", "text.upper"]
                    assert await _outcome(c) == "ok"
                    assert await _outcome(c, "python.hold") == "PERMISSION_DENIED"
            assert len(fetches) == 1  # cached


@pytest.mark.parametrize(("case", "reason"), [
    ("missing", "this listener requires a bearer token"),
    ("malformed", "not a well-formed JWT"),
    ("expired", "token has expired"),
    ("not_yet", "token is not valid yet"),
    ("audience", "not meant for this service (audience)"),
    ("issuer", "token issuer is not trusted"),
    ("alg_none", "token algorithm 'none' is not accepted"),
    ("hs_confusion", "token algorithm 'HS256' is not accepted"),
    ("alg_key_mismatch", "does not match its signing key"),
    ("unknown_kid", "signed with an unknown key (kid)"),
    ("bad_signature", "token signature is invalid"),
    ("no_sub", "lacks the required 'sub' claim"),
    ("not_bearer", "must be 'Bearer <JWT>'"),
])
async def test_bad_tokens_are_unauthenticated_with_a_useful_reason(tmp_path: Path, idp: Idp, case: str,
                                                                   reason: str) -> None:
    other = Idp()
    now = int(time.time())
    tokens: dict[str, str | None] = {
        "missing": None,
        "malformed": "not-a-jwt",
        "expired": idp.token(exp=now - 60, iat=now - 600, nbf=now - 600),
        "not_yet": idp.token(nbf=now + 600),
        "audience": idp.token(aud="someone-else"),
        "issuer": idp.token(iss="https://evil.example"),
        "alg_none": idp.unsigned_token(),
        "hs_confusion": idp.hs256_with_public_key(),
        "alg_key_mismatch": idp.token(kid="rsa-1", alg="ES256"),
        "unknown_kid": other.token(kid="rsa-9"),
        "bad_signature": other.token(kid="rsa-1"),  # a known kid, signed by another key
        "no_sub": jwt_without_sub(idp),
        "not_bearer": "x",
    }
    with serve_jwks(idp) as (url, _fetches):
        audit = tmp_path / "audit.jsonl"
        doc = _jwt_doc(f"unix://{tmp_path}/tc.sock", url)
        doc["audit"] = {"file": str(audit)}
        async with serving(doc) as app:
            if case == "not_bearer":  # a raw channel: the client library only ever sends Bearer
                async with grpc.aio.insecure_channel(app.address) as channel:
                    stub = pb_grpc.SupervisorStub(channel)
                    with pytest.raises(grpc.aio.AioRpcError) as raw:
                        await stub.ListTools(pb.ListToolsRequest(),
                                             metadata=(("authorization", "Basic dXNlcjpwYXNz"),))
                    assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert reason in (raw.value.details() or "")
            else:
                async with Client(app.address, token=tokens[case]) as client:
                    with pytest.raises(ClientError) as err:
                        await client.call("text.echo", ARGS)
                    assert err.value.code == "UNAUTHENTICATED"
                    assert reason in err.value.details
                    with pytest.raises(ClientError) as err:
                        await client.list_tools()
                    assert err.value.code == "UNAUTHENTICATED"
    record = _audit(audit)[0]
    assert record["status"] == "UNAUTHENTICATED" and reason in record["reason"]
    if tokens[case] and len(tokens[case] or "") > 20:
        assert tokens[case] not in audit.read_text()  # credentials never reach the audit trail


def jwt_without_sub(idp: Idp) -> str:
    import jwt as pyjwt

    claims = idp.claims("x")
    del claims["sub"]
    return pyjwt.encode(claims, idp.rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})


async def test_jwks_refetched_for_a_new_kid_and_from_a_file(tmp_path: Path, idp: Idp) -> None:
    with serve_jwks(idp) as (url, fetches):
        async with serving(_jwt_doc(f"unix://{tmp_path}/tc.sock", url)) as app:
            async with Client(app.address, token=idp.token("carol")) as c:
                assert await _outcome(c) == "ok"
            assert len(fetches) == 1
            # The IdP rotates in a new key; the first token signed with it triggers one refetch.
            from cryptography.hazmat.primitives.asymmetric import rsa
            new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            idp.publish("rsa-2", new_key, "RS256")
            await asyncio.sleep(0.25)  # min_refetch
            async with Client(app.address, token=idp.token("carol", kid="rsa-2", key=new_key)) as c:
                assert await _outcome(c) == "ok"
            assert len(fetches) == 2
            # An unknown kid right after a fetch does not hammer the IdP.
            async with Client(app.address, token=idp.token("carol", kid="nope")) as c:
                assert await _outcome(c) == "UNAUTHENTICATED"
            assert len(fetches) == 2
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_bytes(idp.jwks())
    token = idp.token("carol", kid="ec-1", alg="ES256")
    async with serving(_jwt_doc(f"unix://{tmp_path}/tc2.sock", "jwks.json"), base_dir=tmp_path) as app, \
            Client(app.address, token=token) as c:
        assert await _outcome(c) == "ok"


def test_jwks_url_must_be_https_or_loopback() -> None:
    from toolcell.server.tokens import check_jwks_url

    check_jwks_url("https://idp.example/jwks")
    check_jwks_url("http://127.0.0.1:8080/jwks")
    with pytest.raises(ConfigError, match="loopback only"):
        check_jwks_url("http://idp.example/jwks")


# --- TLS / mTLS over TCP ----------------------------------------------------------------------------

@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca, rogue = Pki(), Pki("rogue CA")
    cert, key = ca.issue("toolcell.test", server=True)
    files = {"ca": ca.ca_pem, "cert": cert, "key": key}
    for name, data in files.items():
        (tmp_path / f"{name}.pem").write_bytes(data)
    return {"ca": ca, "rogue": rogue, "dir": tmp_path}


def _tls_doc(pki: dict[str, Any], mtls: bool, **sections: Any) -> dict[str, Any]:
    tls = {"cert": "cert.pem", "key": "key.pem"}
    if mtls:
        tls["client_ca"] = "ca.pem"
    return _doc("127.0.0.1:0", server={"tls": tls}, **sections)


async def test_mtls_identity_from_the_client_certificate(pki: dict[str, Any]) -> None:
    ca: Pki = pki["ca"]
    doc = _tls_doc(pki, True, auth={"require": ["cert"], "rules": [
        {"match": {"cert": "spiffe://test/alice"}, "tools": ["text.*"]},
        {"match": {"cert": "bob"}, "tools": ["python.*"], "actions": ["list"]},
    ]})
    async with serving(doc, base_dir=pki["dir"]) as app:
        assert app.address.startswith("127.0.0.1:")

        def tls(cn: str, issuer: Pki = ca, sans: tuple[str, ...] = ()) -> ClientTls:
            cert, key = issuer.issue(cn, sans=sans)
            return ClientTls(ca_pem=ca.ca_pem, cert_pem=cert, key_pem=key, server_name="localhost")

        async with Client(app.address, tls=tls("alice", sans=("spiffe://test/alice",))) as alice:
            assert [t.name for t in await alice.list_tools()] == ["text.echo", "text.upper"]
            assert await _outcome(alice) == "ok"
            assert await _outcome(alice, "python.hold") == "PERMISSION_DENIED"
        async with Client(app.address, tls=tls("bob")) as bob:
            assert [t.name for t in await bob.list_tools()] == ["python.hold"]
            assert await _outcome(bob, "python.hold") == "PERMISSION_DENIED"
        # A certificate from another CA, or none at all, fails the handshake: nothing reaches the service.
        for creds in (tls("alice", issuer=pki["rogue"], sans=("spiffe://test/alice",)),
                      ClientTls(ca_pem=ca.ca_pem, server_name="localhost")):
            async with Client(app.address, tls=creds) as c:
                assert await _outcome(c) == "UNAVAILABLE"
        # Plaintext to a TLS port fails too.
        async with Client(app.address) as c:
            assert await _outcome(c) == "UNAVAILABLE"


async def test_tls_without_client_certs_uses_tokens(pki: dict[str, Any], idp: Idp) -> None:
    ca: Pki = pki["ca"]
    with serve_jwks(idp) as (url, _):
        doc = _tls_doc(pki, False)
        doc["auth"] = _jwt_doc("x", url)["auth"]
        async with serving(doc, base_dir=pki["dir"]) as app:
            server_only = ClientTls(ca_pem=ca.ca_pem, server_name="localhost")
            async with Client(app.address, tls=server_only, token=idp.token("carol")) as c:
                assert await _outcome(c) == "ok"
            async with Client(app.address, tls=server_only) as c:
                assert await _outcome(c) == "UNAUTHENTICATED"
            # A client that does not trust the server's CA refuses to talk.
            async with Client(app.address, tls=ClientTls(ca_pem=pki["rogue"].ca_pem, server_name="localhost"),
                              token=idp.token("carol")) as c:
                assert await _outcome(c) == "UNAVAILABLE"


def test_plain_tcp_needs_explicit_insecure(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"plain TCP: configure server\.tls"):
        parse_config(_doc("127.0.0.1:0"), environ={})
    with pytest.raises(ConfigError, match="peer credentials exist only on a Unix socket"):
        parse_config(_doc("127.0.0.1:0", server={"insecure": True}, auth={"require": ["peer"]}), environ={})
    with pytest.raises(ConfigError, match=r"only be required with auth\.jwt"):
        parse_config(_doc(f"unix://{tmp_path}/s.sock", auth={"require": ["token"]}), environ={})
    with pytest.raises(ConfigError, match=r"server\.tls\.client_ca"):
        parse_config(_doc("127.0.0.1:0", server={"insecure": True}, auth={"require": ["cert"]}), environ={})


async def test_insecure_tcp_warns_and_allows_only_what_rules_grant(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "toolcell.server")
    async with serving(_doc("127.0.0.1:0", server={"insecure": True})) as app:
        assert any("plain TCP" in r.message and "insecure" in r.message for r in caplog.records)
        async with Client(app.address) as c:
            assert await c.list_tools() == []  # anonymous: no rule can match
            assert await _outcome(c) == "PERMISSION_DENIED"


# --- permission matrix: list / call / cancel --------------------------------------------------------

async def test_permission_matrix_list_call_cancel(tmp_path: Path, idp: Idp) -> None:
    audit = tmp_path / "audit.jsonl"
    with serve_jwks(idp) as (url, _):
        doc = _jwt_doc(f"unix://{tmp_path}/tc.sock", url)
        doc["auth"]["rules"] = [
            {"match": {"subject": "alice"}, "tools": ["*"]},
            {"match": {"subject": "bob"}, "tools": ["python.hold"]},
            {"match": {"group": "readers"}, "tools": ["text.*"], "actions": ["list"]},
        ]
        doc["audit"] = {"file": str(audit)}
        async with serving(doc) as app:
            alice = Client(app.address, token=idp.token("alice"))
            bob = Client(app.address, token=idp.token("bob"))
            reader = Client(app.address, token=idp.token("dave", groups=["readers"]))
            nobody = Client(app.address, token=idp.token("eve"))
            matrix: dict[str, dict[str, Any]] = {}
            for name, c in (("alice", alice), ("bob", bob), ("reader", reader), ("nobody", nobody)):
                matrix[name] = {
                    "list": [t.name for t in await c.list_tools()],
                    "call text.echo": await _outcome(c, "text.echo"),
                    # alice and bob may run python.hold (it runs until cancelled: shown below with Cancel)
                    "call python.hold": await _outcome(c, "python.hold", "{}") if name not in ("alice", "bob")
                    else "-",
                }
            assert matrix == {
                "alice": {"list": ["python.hold", "text.echo", "text.upper"], "call text.echo": "ok",
                          "call python.hold": "-"},
                "bob": {"list": ["python.hold"], "call text.echo": "PERMISSION_DENIED", "call python.hold": "-"},
                "reader": {"list": ["text.echo", "text.upper"], "call text.echo": "PERMISSION_DENIED",
                           "call python.hold": "PERMISSION_DENIED"},
                "nobody": {"list": [], "call text.echo": "PERMISSION_DENIED",
                           "call python.hold": "PERMISSION_DENIED"},
            }

            # Cancel: only the principal that started the run. Bob's run, Alice can't touch it.
            events: list[Any] = []
            started = asyncio.Event()

            async def run_as_bob() -> None:
                async for event in bob.execute("python.hold", "{}", invocation_id="inv-bob-000001"):
                    events.append(event)
                    if isinstance(event, Started):
                        started.set()

            task = asyncio.create_task(run_as_bob())
            await asyncio.wait_for(started.wait(), 10)
            for intruder in (alice, reader, nobody):
                with pytest.raises(ClientError) as err:
                    await intruder.cancel("inv-bob-000001")
                assert err.value.code == "NOT_FOUND"  # indistinguishable from an id that does not exist
            assert not task.done()
            assert await bob.cancel("inv-bob-000001") is True
            await asyncio.wait_for(task, 10)
            result = events[-1]
            assert isinstance(result, Result) and result.status is Status.KILLED
            # bob's cancel of a finished/unknown run
            with pytest.raises(ClientError) as err:
                await bob.cancel("inv-bob-000001")
            assert err.value.code == "NOT_FOUND"
            for c in (alice, bob, reader, nobody):
                await c.close()
    records = _audit(audit)
    cancels = [(r["principal"]["sub"], r["decision"]) for r in records if r.get("action") == "cancel"]
    assert cancels == [("alice", "deny"), ("dave", "deny"), ("eve", "deny"), ("bob", "allow"), ("bob", "deny")]
    assert verify([audit]).ok


# --- rate limits and concurrency caps under a burst --------------------------------------------------

BURST_FIGURES: dict[str, tuple[int, int]] = {}


async def test_rate_limit_burst_exact_counts(tmp_path: Path) -> None:
    doc = _doc(f"unix://{tmp_path}/tc.sock", rate_limits={
        "per_principal": {"rate": 0.01, "burst": 5},   # ~no refill during the test
        "per_tool": {"rate": 0.01, "burst": 8},
        "concurrency": {"global": 100}})
    async with serving(doc) as app, Client(app.address) as c:
        async def one(tool: str) -> tuple[str, int | None]:
            try:
                return (await c.call(tool, ARGS, timeout=20)).status.value, None
            except ClientError as exc:
                return exc.code, exc.retry_after_ms

        t0 = time.monotonic()
        results = await asyncio.gather(*(one("text.echo") for _ in range(20)))
        elapsed = time.monotonic() - t0
        ok = [r for r in results if r[0] == "ok"]
        refused = [r for r in results if r[0] == "RESOURCE_EXHAUSTED"]
        assert (len(ok), len(refused)) == (5, 15)
        assert all(hint is not None and 90_000 <= hint <= 100_000 for _, hint in refused)  # 1 token at 0.01/s
        assert elapsed < 10
        BURST_FIGURES["rate limit: per-principal burst 5, 20 calls"] = (len(ok), len(refused))


async def test_tool_bucket_is_shared_by_principals(tmp_path: Path, idp: Idp) -> None:
    with serve_jwks(idp) as (url, _):
        doc = _jwt_doc(f"unix://{tmp_path}/tc.sock", url)
        doc["rate_limits"] = {"per_principal": {"rate": 0.01, "burst": 3}, "tools": {"text.upper": {"rate": 0.01,
                                                                                                   "burst": 4}}}
        async with serving(doc) as app:
            outcomes: list[str] = []
            for sub in ("carol", "carol", "carol", "carol", "alice", "alice", "frank"):
                token = idp.token(sub, scope="tools:text")
                async with Client(app.address, token=token) as c:
                    outcomes.append(await _outcome(c, "text.upper"))
            # carol: 3 ok then her bucket is empty; alice: 1 ok (the tool's 4th token), then the tool is empty.
            assert outcomes == ["ok", "ok", "ok", "RESOURCE_EXHAUSTED", "ok", "RESOURCE_EXHAUSTED",
                                "RESOURCE_EXHAUSTED"]
            BURST_FIGURES["rate limit: tool bucket 4 shared, 7 calls by 3 callers"] = (
                outcomes.count("ok"), outcomes.count("RESOURCE_EXHAUSTED"))


async def test_concurrency_caps_refuse_at_once_never_hang(tmp_path: Path, idp: Idp) -> None:
    with serve_jwks(idp) as (url, _):
        doc = _jwt_doc(f"unix://{tmp_path}/tc.sock", url)
        doc["rate_limits"] = {"concurrency": {"global": 5, "per_principal": 3, "per_tool": 4}}
        doc["auth"]["rules"].append({"match": {"subject": "dave"}, "tools": ["*"]})
        async with serving(doc) as app:
            carol = Client(app.address, token=idp.token("carol"))
            dave = Client(app.address, token=idp.token("dave", scope="tools:text"))
            started: list[str] = []
            refused: list[tuple[float, int | None]] = []

            async def hold(c: Client, n: int) -> None:
                t0 = time.monotonic()
                try:
                    async for ev in c.execute("python.hold", "{}", invocation_id=f"inv-hold-{n:06d}"):
                        if isinstance(ev, Started):
                            started.append(ev.invocation_id)
                except ClientError as exc:
                    assert exc.code == "RESOURCE_EXHAUSTED", exc
                    if exc.code == "RESOURCE_EXHAUSTED":
                        refused.append((time.monotonic() - t0, exc.retry_after_ms))

            tasks = [asyncio.create_task(hold(carol, n)) for n in range(10)]
            for _ in range(100):
                if len(started) + len(refused) == 10:
                    break
                await asyncio.sleep(0.05)
            assert (len(started), len(refused)) == (3, 7)  # per-principal cap 3
            assert all(t < 2.0 and hint == 1000 for t, hint in refused)
            BURST_FIGURES["concurrency: per-principal cap 3, 10 concurrent"] = (len(started), len(refused))
            more = [asyncio.create_task(hold(dave, 100 + n)) for n in range(4)]
            for _ in range(100):
                if len(started) + len(refused) == 14:
                    break
                await asyncio.sleep(0.05)
            # per-tool cap 4 lets only 1 more python.hold start (3 + 1); dave's other 3 are refused.
            assert (len(started), len(refused)) == (4, 10)
            assert await _outcome(dave) == "ok"  # 5th slot
            BURST_FIGURES["concurrency: per-tool cap 4, 4 more concurrent"] = (1, 3)
            for inv in list(started):
                owner = carol if int(inv.rsplit("-", 1)[1]) < 100 else dave
                await owner.cancel(inv)
            await asyncio.wait_for(asyncio.gather(*tasks, *more), 10)
            # Slots are released: a new run starts.
            assert await _outcome(carol, "text.echo") == "ok"
            await carol.close()
            await dave.close()


# --- admission control --------------------------------------------------------------------------------

class Pressure:
    """Simulated host: tests set how much memory is available."""

    def __init__(self) -> None:
        self.available = 8 * 2**30
        self.cpu = 10.0
        self.samples = 0

    def __call__(self) -> HostSample:
        self.samples += 1
        return HostSample(available_memory_bytes=self.available, cpu_percent=self.cpu)


async def test_admission_refuses_under_pressure(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    pressure = Pressure()
    doc = _doc(f"unix://{tmp_path}/tc.sock", admission={"min_available_memory": "1Gi", "max_cpu_percent": 90},
               audit={"file": str(audit)})
    async with serving(doc, sampler=pressure) as app, Client(app.address) as c:
        assert await _outcome(c) == "ok"
        pressure.available = 200 * 2**20
        t0 = time.monotonic()
        with pytest.raises(ClientError) as err:
            await c.call("text.echo", ARGS)
        assert time.monotonic() - t0 < 2
        assert err.value.code == "RESOURCE_EXHAUSTED"
        assert "host is short of memory (200 MiB available, 1024 MiB required)" in err.value.details
        assert err.value.retry_after_ms is not None
        pressure.available, pressure.cpu = 8 * 2**30, 99.0
        assert await _outcome(c) == "RESOURCE_EXHAUSTED"
        pressure.cpu = 10.0
        assert await _outcome(c) == "ok"
    refusals = [r for r in _audit(audit) if r.get("decision") == "refuse"]
    assert len(refusals) == 2 and "short of memory" in refusals[0]["reason"]


async def test_admission_queue_is_bounded_and_waits_bounded(tmp_path: Path) -> None:
    pressure = Pressure()
    pressure.available = 100 * 2**20
    doc = _doc(f"unix://{tmp_path}/tc.sock", admission={"min_available_memory": "1Gi", "queue": 1,
                                                         "max_wait": "3s"})
    async with serving(doc, sampler=pressure) as app, Client(app.address) as c:
        waiting = asyncio.create_task(_outcome(c))
        await asyncio.sleep(0.3)
        assert app.gate.waiting == 1
        t0 = time.monotonic()
        assert await _outcome(c) == "RESOURCE_EXHAUSTED"  # queue full: refused at once
        assert time.monotonic() - t0 < 1.0
        pressure.available = 8 * 2**30  # pressure relieved: the queued call goes through
        assert await asyncio.wait_for(waiting, 5) == "ok"
        pressure.available = 100 * 2**20
        t0 = time.monotonic()
        assert await _outcome(c) == "RESOURCE_EXHAUSTED"  # waited max_wait, then refused
        assert 2.5 < time.monotonic() - t0 < 6


# --- the audit trail of a session ---------------------------------------------------------------------

async def test_audit_records_decisions_and_ends_with_hashes_not_payloads(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    doc = _doc(f"unix://{tmp_path}/tc.sock", audit={"file": str(audit), "max_bytes": "2Ki", "keep": 50})
    async with serving(doc) as app, Client(app.address) as c:
        await c.list_tools()
        for _ in range(4):
            result = await c.call("text.echo", ARGS)
        assert await _outcome(c, "no.such.tool") == "NOT_FOUND"
        # The record of this call is on disk before the caller has the result.
        last = json.loads(audit.read_text().splitlines()[-1])
        assert last["event"] == "invocation_end" and last["status"] == "NOT_FOUND"
    files = [*sorted(audit.parent.glob("audit.jsonl.*")), audit]
    assert len(files) > 1  # rotated
    assert verify(files).ok
    text = "".join(f.read_text() for f in files)
    assert "secret payload" not in text
    records = [json.loads(line) for line in text.splitlines()]
    end = [r for r in records if r["event"] == "invocation_end" and r.get("status") == "ok"][-1]
    import hashlib
    assert end["arguments_sha256"] == hashlib.sha256(ARGS.encode()).hexdigest()
    assert end["arguments_bytes"] == len(ARGS)
    assert end["output_sha256"] == hashlib.sha256(result.output.encode()).hexdigest()
    assert end["stdout_bytes"] == result.stdout_bytes
    assert end["trace_id"] == result.trace_id and end["invocation_id"] == result.invocation_id
    assert end["profile"] == "default" and end["principal"]["id"] == f"uid:{os.geteuid()}"
    for key in ("time", "exit_code", "duration_ms", "peak_memory_bytes", "cpu_time_ns", "prev", "hash", "seq"):
        assert key in end


def test_zz_report_burst_figures() -> None:
    """Prints the burst figures (run with -s) for the issue's closing note."""
    for name, (accepted, refused) in BURST_FIGURES.items():
        print(f"BURST {name}: accepted={accepted} refused={refused}")


# --- limiter state and audit records stay bounded whatever callers send (issue 14) --------------------

async def test_megabyte_tool_names_leave_no_limiter_state_and_small_records(tmp_path: Path) -> None:
    """Before: 60 requests with 1 MiB names made 61 buckets keyed by the raw names (~60 MiB retained)."""
    from collections import Counter

    from toolcell.audit import MAX_RECORD_BYTES

    audit = tmp_path / "audit.jsonl"
    doc = _doc(f"unix://{tmp_path}/tc.sock", audit={"file": str(audit)}, rate_limits={
        "per_principal": {"rate": 0.01, "burst": 2}, "per_tool": {"rate": 1, "burst": 5}})
    async with serving(doc) as app:
        codes: Counter[str] = Counter()
        options = [("grpc.max_send_message_length", 8 * 2**20)]
        async with grpc.aio.insecure_channel(app.address, options=options) as channel:
            stub = pb_grpc.SupervisorStub(channel)
            for n in range(60):
                try:
                    await stub.Call(pb.ExecuteRequest(tool=f"{n}" + "a." * 2**19, arguments_json="{}"), timeout=20)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                    assert len(exc.details() or "") < 1000
        sizes = app.gate.state_sizes()
    assert codes["OK"] == 0 and sum(codes.values()) == 60
    # One caller bucket; at most the two names that got past it (none once the catalogue is wired in).
    assert sizes["rate_buckets"] <= 3 and sizes["in_flight_tools"] == 0
    lines = audit.read_bytes().splitlines()
    assert lines and max(map(len, lines)) <= MAX_RECORD_BYTES
    assert verify([audit]).ok


HOLDER_SCRIPT = """
import asyncio, sys
from toolcell.client import Client
from toolcell.model import Result, Started
async def main():
    async with Client(sys.argv[1]) as c:
        events = c.execute("python.hold", "{}", invocation_id=sys.argv[2], timeout=60)
        async for event in events:
            if isinstance(event, Started):
                print("started", flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                await c.cancel(sys.argv[2])
            elif isinstance(event, Result):
                print(event.status.value, flush=True)
asyncio.run(main())
"""


async def test_a_caller_chosen_invocation_id_is_scoped_to_its_caller() -> None:
    """uid 1234 runs 'inv_shared_id_1'; to root that id is neither taken (ALREADY_EXISTS would leak it) nor
    cancellable (NOT_FOUND, as for no run); root's own run with the same id is root's alone."""
    shared = "inv_shared_id_1"
    with shared_dir() as d:
        doc = _doc(f"unix://{d}/tc.sock", auth={"require": ["peer"], "rules": [
            {"match": {"uid": os.geteuid()}, "tools": ["*"]}, {"match": {"uid": OTHER_UID}, "tools": ["*"]}]})
        async with serving(doc) as app:
            other = await asyncio.create_subprocess_exec(
                "setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                sys.executable, "-c", HOLDER_SCRIPT, app.address, shared,
                cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert other.stdin is not None and other.stdout is not None
            assert (await asyncio.wait_for(other.stdout.readline(), 60)).strip() == b"started"
            async with Client(app.address) as me:
                with pytest.raises(ClientError) as info:
                    await me.cancel(shared)
                assert info.value.code == "NOT_FOUND"
                mine = me.execute("python.hold", "{}", invocation_id=shared, timeout=60)
                async for event in mine:
                    if isinstance(event, Started):
                        await me.cancel(shared)  # cancels root's run only
                    elif isinstance(event, Result):
                        assert event.status is Status.KILLED
            assert app.supervisor.in_flight == 1  # the other uid's run is untouched
            other.stdin.write(b"go\n")
            await other.stdin.drain()
            out, err = await asyncio.wait_for(other.communicate(), 60)
            assert other.returncode == 0, err.decode()
            assert out.decode().split() == ["killed"]
