"""Sessions and workspaces on the real engines (docker and oci), through the gRPC API.

A session is one sandbox kept for one principal's calls: state survives between its calls (a Python
REPL's variables, files in the scratch space), another principal cannot see or use it (NOT_FOUND, the
same answer as no session), its bounds (max calls, idle TTL, lifetime, a stopped call) end it with its
sandbox removed and the end on the audit trail, and a killed supervisor's session sandbox is gone after
the next start. Workspace files go in and come out (text scrubbed, binary intact) and the collector holds
against a hostile tool: a 1 TiB sparse file, 5,000 files, symlinks out of the sandbox, a FIFO, names
with newlines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.security_support import AUDIENCE, ISSUER, Idp, serve_jwks
from tests.support import REPO, RUNNER_IMAGE, config_doc, left_behind, serving
from toolcell.backends.factory import open_backend
from toolcell.client import Client, ClientError
from toolcell.model import Status
from toolcell.server.app import App
from toolcell.settings import parse_config
from toolcell.supervisor import Supervisor

BACKENDS = ["docker", "oci"]
REPL = ["python3", "-I", "-u", "/opt/toolcell/tools/pyrepl.py"]
# A tool that counts its calls in a file of its workspace and leaves two files in its output directory.
COUNTER = r'''
import json, os, sys
json.loads(sys.stdin.read())
path = "count"
n = int(open(path).read()) + 1 if os.path.exists(path) else 1
open(path, "w").write(str(n))
os.makedirs("out", exist_ok=True)
open("out/n.txt", "w").write(f"call {n}\n")
print(json.dumps({"n": n, "files": sorted(os.listdir("."))}))
'''
# Whatever the caller's code writes into out/ comes back.
WRITER = r'''
import json, os, sys
exec(json.loads(sys.stdin.read())["code"])
'''


def _doc(tmp_path: Path, kind: str, **session: Any) -> dict[str, Any]:
    doc = config_doc(f"ses-{uuid.uuid4().hex[:10]}", str(tmp_path / "toolcell.sock"))
    doc["engine"] = {"kind": kind}
    doc["audit"] = {"file": str(tmp_path / "audit.jsonl")}
    doc["profiles"]["default"]["timeout"] = "5s"
    bounds = {"idle_ttl": "30s", "max_calls": 20, **session}
    doc["tools"] = [
        {"name": "python.run", "description": "python", "image": RUNNER_IMAGE,
         "command": ["python3", "-I", "-u", "/opt/toolcell/tools/pyrun.py"],
         "input_schema": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
         "session": {**bounds, "command": REPL}},
        {"name": "files.count", "description": "count calls in the workspace", "image": RUNNER_IMAGE,
         "command": ["python3", "-I", "-c", COUNTER], "session": bounds,
         "workspace": {"dir": "/tmp/work", "outputs": "/tmp/work/out"}},
        {"name": "files.write", "description": "write output files", "image": RUNNER_IMAGE,
         "command": ["python3", "-I", "-c", WRITER], "profile": "files",
         "workspace": {"dir": "/tmp/work", "outputs": "/tmp/work/out", "max_output_files": 16,
                       "max_output_bytes": "256Ki", "max_file_bytes": "64Ki"}},
        {"name": "text.wordcount", "description": "count", "image": RUNNER_IMAGE,
         "command": ["python3", "-I", "/opt/toolcell/tools/wordcount.py"]},
    ]
    doc["profiles"]["files"] = {"memory": "128Mi", "timeout": "20s", "kill_grace": "500ms", "pids": 64,
                                "tmpfs_size": "64Mi"}
    return doc


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def supervisor(tmp_path: Path, doc: dict[str, Any]) -> AsyncIterator[tuple[App, Client]]:
    config = parse_config(doc, environ={}, base_dir=tmp_path)
    async with serving(config) as running:
        yield running


def audit(tmp_path: Path, event: str) -> list[dict[str, Any]]:
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == event]


async def sandboxes(app: App) -> list[str]:
    return await app.supervisor.backend.list_sandboxes(app.supervisor.config.server.instance)


async def test_python_keeps_its_variables_across_the_calls_of_one_session(tmp_path: Path, kind: str) -> None:
    async with supervisor(tmp_path, _doc(tmp_path, kind)) as (app, client):
        session = await client.open_session("python.run")
        first = await client.call("python.run", {"code": "import math\nx = 41\ndef f(): return x + 1"},
                                  session=session.session_id)
        assert first.status is Status.OK, first
        second = await client.call("python.run", {"code": "print(f(), math.pi > 3)"}, session=session.session_id)
        assert (second.status, second.output, second.session_id) == (Status.OK, "42 True\n", session.session_id)
        assert second.sandbox_id == first.sandbox_id == session.sandbox_id
        # An error in one call loses nothing: the next still has x.
        failed = await client.call("python.run", {"code": "1/0"}, session=session.session_id)
        assert failed.status is Status.ERROR and "ZeroDivisionError" in failed.stderr
        assert (await client.call("python.run", {"code": "print(x)"}, session=session.session_id)).output == "41\n"
        # A one-shot call is a fresh sandbox: no x there.
        fresh = await client.call("python.run", {"code": "print(x)"})
        assert fresh.status is Status.ERROR and "NameError" in fresh.stderr and fresh.sandbox_id != first.sandbox_id
        assert await client.close_session(session.session_id) == 4
        assert await sandboxes(app) == []
        with pytest.raises(ClientError) as ended:
            await client.call("python.run", {"code": "print(x)"}, session=session.session_id)
        assert ended.value.code == "NOT_FOUND" and "ended (closed)" in ended.value.details
    opened, ends = audit(tmp_path, "session_open"), audit(tmp_path, "session_end")
    assert [r["session_id"] for r in opened] == [session.session_id]
    assert [(r["session_id"], r["reason"], r["calls"]) for r in ends] == [(session.session_id, "closed", 4)]
    calls = [r for r in audit(tmp_path, "invocation_end") if r.get("session_id") == session.session_id]
    assert len(calls) == 4


async def test_a_session_is_invisible_and_unusable_to_another_principal(tmp_path: Path) -> None:
    idp = Idp()
    doc = _doc(tmp_path, "docker")
    with serve_jwks(idp) as (url, _):
        doc["auth"] = {"require": ["token"], "rules": [{"match": {"subject": who}, "tools": ["*"]}
                                                       for who in ("alice", "bob")],
                       "jwt": {"jwks": url, "issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["RS256"]}}
        async with supervisor(tmp_path, doc) as (_app, client):
            alice, bob = client.with_token(idp.token("alice")), client.with_token(idp.token("bob"))
            session = await alice.open_session("python.run")
            assert (await alice.call("python.run", {"code": "secret = 7"}, session=session.session_id)).status \
                is Status.OK
            # The same probe, allowed for its owner and refused for anyone else: as if there were no session.
            for caller, allowed in ((bob, False), (alice, True)):
                try:
                    result = await caller.call("python.run", {"code": "print(secret)"}, session=session.session_id)
                except ClientError as exc:
                    assert not allowed and exc.code == "NOT_FOUND"
                    assert exc.details == "no open session with this id"
                else:
                    assert allowed and result.output == "7\n"
            with pytest.raises(ClientError) as closing:
                await bob.close_session(session.session_id)
            assert closing.value.code == "NOT_FOUND"
            assert (await alice.call("python.run", {"code": "print(secret)"}, session=session.session_id)).output \
                == "7\n"
    denied = [r for r in audit(tmp_path, "decision") if r.get("session_id") == session.session_id]
    assert [(r["decision"], r["status"]) for r in denied] == [("deny", "NOT_FOUND")]
    assert "bob" in json.dumps(denied[0]["principal"])


@pytest.mark.parametrize(("bounds", "calls", "wait_s", "reason"), [
    ({"max_calls": 2}, 2, 0.0, "max_calls"),
    ({"idle_ttl": "1s"}, 1, 3.0, "idle"),
    ({"idle_ttl": "1s", "max_lifetime": "2s"}, 1, 4.0, "lifetime"),
])
async def test_bounds_end_the_session_and_remove_its_sandbox(tmp_path: Path, kind: str, bounds: dict[str, Any],
                                                             calls: int, wait_s: float, reason: str) -> None:
    async with supervisor(tmp_path, _doc(tmp_path, kind, **bounds)) as (app, client):
        session = await client.open_session("files.count")
        for n in range(1, calls + 1):
            result = await client.call("files.count", {}, session=session.session_id)
            assert json.loads(result.output)["n"] == n  # the workspace file survives between calls
        await asyncio.sleep(wait_s)
        if reason != "max_calls":
            await app.supervisor.sessions.expire()
        with pytest.raises(ClientError) as ended:
            await client.call("files.count", {}, session=session.session_id)
        assert ended.value.code == "NOT_FOUND" and f"ended ({reason})" in ended.value.details
        assert await sandboxes(app) == []
    assert [r["reason"] for r in audit(tmp_path, "session_end")] == [reason]


async def test_a_timed_out_call_ends_its_session(tmp_path: Path, kind: str) -> None:
    async with supervisor(tmp_path, _doc(tmp_path, kind)) as (app, client):
        session = await client.open_session("python.run")
        result = await client.call("python.run", {"code": "import time; time.sleep(60)"}, session=session.session_id)
        assert result.status is Status.TIMEOUT
        with pytest.raises(ClientError) as ended:
            await client.call("python.run", {"code": "print(1)"}, session=session.session_id)
        assert "ended (call_stopped)" in ended.value.details
        assert await sandboxes(app) == []


async def test_sessions_hold_a_concurrency_slot_and_refuse_tools_without_sessions(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "docker")
    doc["rate_limits"] = {"concurrency": {"per_principal": 1}}
    async with supervisor(tmp_path, doc) as (_app, client):
        with pytest.raises(ClientError) as refused:
            await client.open_session("text.wordcount")
        assert (refused.value.code, refused.value.details) == ("FAILED_PRECONDITION",
                                                               "tool 'text.wordcount' does not allow sessions")
        session = await client.open_session("python.run")
        with pytest.raises(ClientError) as busy:  # the session's sandbox is this caller's one slot
            await client.call("text.wordcount", {"text": "a"})
        assert busy.value.code == "RESOURCE_EXHAUSTED"
        assert (await client.call("python.run", {"code": "print(2)"}, session=session.session_id)).output == "2\n"
        await client.close_session(session.session_id)
        assert (await client.call("text.wordcount", {"text": "a"})).status is Status.OK
    refusals = [r for r in audit(tmp_path, "decision") if r.get("action") == "session"]
    assert [(r["tool"], r["decision"], r["status"]) for r in refusals] == [
        ("text.wordcount", "refuse", "FAILED_PRECONDITION")]


async def test_a_killed_supervisors_session_sandbox_is_gone_after_the_next_start(tmp_path: Path, kind: str) -> None:
    doc = _doc(tmp_path, kind)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen([sys.executable, "-m", "toolcell", "serve", "--config", str(tmp_path / "config.yaml")],
                            cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    config = parse_config(doc, environ={}, base_dir=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "toolcell.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            await asyncio.sleep(0.2)
        async with Client(f"unix://{tmp_path}/toolcell.sock") as client:
            session = await client.open_session("python.run")
            assert (await client.call("python.run", {"code": "x = 1"}, session=session.session_id)).status \
                is Status.OK
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(await left_behind(config)) == 1  # nobody removed it
    app = App(Supervisor(config, open_backend(config)))
    await app.start()
    try:
        assert await left_behind(config) == []
    finally:
        await app.stop(grace_s=1.0)
    ends = audit(tmp_path, "session_end")
    assert [(r["session_id"], r["reason"]) for r in ends] == [(session.session_id, "swept")]


async def test_files_round_trip_text_and_binary(tmp_path: Path, kind: str) -> None:
    binary = bytes(range(256)) * 4
    code = ("import shutil, os\nos.makedirs('out/sub', exist_ok=True)\n"
            "shutil.copy('in/data.bin', 'out/sub/copy.bin')\n"
            "open('out/note.txt', 'w').write(open('in/note.txt').read().upper() + 'token ghp_' + 'a' * 36)\n")
    async with supervisor(tmp_path, _doc(tmp_path, kind)) as (_app, client):
        result = await client.call("files.write", {"code": code},
                                   files={"in/data.bin": binary, "in/note.txt": "héllo\n"})
        assert result.status is Status.OK, result
        files = {f.path: f for f in result.files}
        assert sorted(files) == ["note.txt", "sub/copy.bin"]
        assert files["sub/copy.bin"].data == binary and files["sub/copy.bin"].text is None
        text = files["note.txt"].text or ""
        assert text.startswith("HÉLLO\n") and "ghp_" + "a" * 36 not in text  # scrubbed like stdout
        # A session keeps its workspace: the input file of call 1 is there in call 2.
        session = await client.open_session("files.count")
        first = await client.call("files.count", {}, session=session.session_id, files={"in.txt": "x"})
        second = await client.call("files.count", {}, session=session.session_id)
        assert json.loads(first.output)["files"] == json.loads(second.output)["files"] == ["count", "in.txt", "out"]
        assert [(f.path, f.text) for f in second.files] == [("n.txt", "call 2\n")]
    # The audit trail has the input files' hashes and sizes, never their names or contents.
    ends = [r for r in audit(tmp_path, "invocation_end") if r.get("input_files")]
    assert sorted(f["bytes"] for f in ends[0]["input_files"]) == [len("héllo\n".encode()), len(binary)]
    trail = (tmp_path / "audit.jsonl").read_text()
    assert all(set(f) == {"path_sha256", "bytes", "sha256"} for f in ends[0]["input_files"])
    assert "data.bin" not in trail and "note.txt" not in trail


@pytest.mark.parametrize(("files", "code", "needle"), [
    ({"../escape": "x"}, "INVALID_ARGUMENT", "files[0].path"),
    ({"/etc/passwd": "x"}, "INVALID_ARGUMENT", "files[0].path"),
    ({"a\nb": "x"}, "INVALID_ARGUMENT", "files[0].path"),
])
async def test_bad_input_files_are_refused_before_any_sandbox(tmp_path: Path, files: dict[str, str], code: str,
                                                              needle: str) -> None:
    async with supervisor(tmp_path, _doc(tmp_path, "docker")) as (app, client):
        with pytest.raises(ClientError) as refused:
            await client.call("files.write", {"code": "pass"}, files=files)
        assert refused.value.code == code and needle in refused.value.details
        with pytest.raises(ClientError) as no_workspace:
            await client.call("text.wordcount", {"text": "a"}, files={"a.txt": "x"})
        assert no_workspace.value.code == "FAILED_PRECONDITION"
        assert await sandboxes(app) == []


HOSTILE = r'''
import os
os.makedirs("out/many", exist_ok=True)
with open("out/big.bin", "wb") as f:
    f.truncate(1 << 40)
for i in range(5000):
    open(f"out/many/{i:05d}", "w").write("x")
os.symlink("/etc/passwd", "out/passwd")
os.symlink("/etc", "out/etc")
os.mkfifo("out/fifo")
open("out/new\nline", "w").write("x")
open("out/a..b", "w").write("dots are fine")
'''


async def test_the_collector_holds_against_a_hostile_tool(tmp_path: Path, kind: str) -> None:
    async with supervisor(tmp_path, _doc(tmp_path, kind)) as (_app, client):
        started = time.monotonic()
        result = await client.call("files.write", {"code": HOSTILE})
        elapsed = time.monotonic() - started
        assert result.status is Status.OK, result
        assert elapsed < 15
        paths = [f.path for f in result.files]
        assert len(paths) <= 16 and all("\n" not in p for p in paths)
        assert not any(p.startswith(("passwd", "etc")) or p == "fifo" for p in paths)
        assert "a..b" in paths
        sparse = next(f for f in result.files if f.path == "big.bin")
        assert sparse.size == 1 << 40 and sparse.truncated and len(sparse.data) <= 64 * 1024
        assert sum(len(f.data) + len((f.text or "").encode()) for f in result.files) <= 256 * 1024
        assert (await client.call("text.wordcount", {"text": "still serving"})).status is Status.OK


SERVERS = REPO / "tests" / "data" / "mcp_servers"


async def test_a_stock_servers_session_keeps_one_server_process_and_its_pool_serves_the_first_call(
        tmp_path: Path, kind: str) -> None:
    """A stock MCP server's tool in a session: one server process across the calls (its in-memory count goes
    on), the session's first call from the warm pool; a one-shot call still meets a fresh server."""
    doc = _doc(tmp_path, kind)
    doc["profiles"]["mcp"] = {"memory": "128Mi", "timeout": "10s", "kill_grace": "500ms",
                              "mounts": [{"source": str(SERVERS), "target": "/opt/mcp-test"}]}
    doc["servers"] = [{"name": "ok", "image": RUNNER_IMAGE, "profile": "mcp", "discovery_timeout": "10s",
                       "command": ["python3", "-I", "/opt/mcp-test/hostile.py", "ok"],
                       "session": {"idle_ttl": "30s"}, "pool": {"size": 1, "ttl": "5m"}}]
    async with supervisor(tmp_path, doc) as (app, client):
        pools = app.supervisor.pools

        async def pool_ready() -> None:
            for _ in range(400):
                if pools.ready("ok.counter") == 1:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"the pool did not fill: {pools.stats()}")

        await pool_ready()
        session = await client.open_session("ok.counter")
        assert pools.stats()["ok.counter"].hits == 1  # the session's sandbox came warm from the pool
        assert "ok.counter" in session.tools and "ok.echo" in session.tools  # the server's tools share it
        seen = [(await client.call("ok.counter", {}, session=session.session_id)).output for _ in range(2)]
        # Another tool of the same server, in the same session: the same server process serves it.
        echo = await client.call("ok.echo", {"text": "hi"}, session=session.session_id)
        assert echo.status is Status.OK and echo.sandbox_id == session.sandbox_id
        seen.append((await client.call("ok.counter", {}, session=session.session_id)).output)
        assert seen == ["memory 1 disk 1", "memory 2 disk 2", "memory 3 disk 3"]
        with pytest.raises(ClientError) as other:  # a tool of another scope cannot use it
            await client.call("text.wordcount", {"text": "a"}, session=session.session_id)
        assert other.value.code == "FAILED_PRECONDITION" and "server's tools" in other.value.details
        await pool_ready()
        one_shot = await client.call("ok.counter", {})
        assert (one_shot.status, one_shot.output) == (Status.OK, "memory 1 disk 1")
        assert pools.stats()["ok.counter"].hits == 2
        await client.close_session(session.session_id)


async def test_a_call_over_the_memory_limit_is_oom_and_the_session_ends_with_its_repl(tmp_path: Path,
                                                                                     kind: str) -> None:
    doc = _doc(tmp_path, kind)
    doc["profiles"]["default"]["memory"] = "96Mi"
    async with supervisor(tmp_path, doc) as (app, client):
        session = await client.open_session("python.run")
        assert (await client.call("python.run", {"code": "x = 1"}, session=session.session_id)).status is Status.OK
        hog = await client.call("python.run", {"code": "b = bytearray(512 << 20)"}, session=session.session_id)
        assert hog.status is Status.OOM, hog
        with pytest.raises(ClientError) as ended:  # the REPL was the session's state: it went with it
            await client.call("python.run", {"code": "print(x)"}, session=session.session_id)
        assert "ended (sandbox_ended)" in ended.value.details
        assert await sandboxes(app) == []
