"""Paths the supervisor and its callers trust, and the Unix-socket forwarder's bounds, tried as another local
user would (``setpriv`` to other uids) against the real CLI and a real supervisor on the real engine.

- A victim's ``toolcell call`` without XDG_RUNTIME_DIR looks in /tmp/toolcell-<uid>: planted by another user
  (their dir, a group-writable one, a symlink), it is refused and the planted socket receives nothing; the
  same probe in the victim's own directory reaches the socket (the probe works).
- The supervisor refuses a socket directory it does not own, and serves from one it does.
- Idle connections from one uid: only ``server.max_connections_per_uid`` are kept, and those are closed when
  no HTTP/2 preface arrives in time; a connection that sent its preface is left to gRPC's idle limit; a
  normal caller is served throughout and a long, quiet call is not cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO, RUNNER_IMAGE, config_doc, engine, leftovers, running_supervisor
from toolcell.backends.factory import open_backend
from toolcell.errors import ConfigError
from toolcell.model import Status
from toolcell.safepath import UnsafePath
from toolcell.server.app import App
from toolcell.settings import parse_config
from toolcell.supervisor import Supervisor

VICTIM = 4321
ATTACKER = 65534
OTHER = 65533
TOKEN = "victim-bearer-" + uuid.uuid4().hex  # nosec B105 - a marker, not a credential


def _setpriv(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


# Run as the socket's owner: make the directory as told, listen, record what the first caller sends.
LISTENER = r"""
import json, os, socket, sys
path, dir_mode, link = sys.argv[1], int(sys.argv[2], 8), sys.argv[3]
directory = os.path.dirname(path)
if link:
    os.mkdir(link, 0o755)
    os.symlink(link, directory)
else:
    os.mkdir(directory)
    os.chmod(directory, dir_mode)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(path)
os.chmod(path, 0o666)
sock.listen(4)
sock.settimeout(float(sys.argv[4]))
print("ready", flush=True)
received = b""
try:
    conn, _ = sock.accept()
    conn.settimeout(2)
    try:
        while len(received) < 65536:
            data = conn.recv(65536)
            if not data or (not received and data == b"END"):  # the test's own "the victim is done"
                break
            if not received:  # answer as an HTTP/2 server would (SETTINGS, ACK): the client sends its call
                conn.sendall(bytes.fromhex("000000040000000000" "000000040100000000"))
            received += data
    except OSError:
        pass
except OSError:
    pass
print(json.dumps({"bytes": len(received), "preface": received.startswith(b"PRI * HTTP/2.0"),
                  "token": sys.argv[5].encode() in received}), flush=True)
"""


@contextlib.contextmanager
def _clean(*paths: Path) -> Iterator[None]:
    def remove() -> None:
        for p in paths:
            if p.is_symlink() or p.is_file():
                p.unlink()
            else:
                shutil.rmtree(p, ignore_errors=True)
    remove()
    try:
        yield
    finally:
        remove()


async def _victim_calls(runtime_dir: Path, owner: int, dir_mode: int, symlink: bool) -> tuple[int, str, dict[str, Any]]:
    """The planted (or own) listener runs as ``owner``; the victim runs ``toolcell call`` with defaults."""
    link = Path(f"/tmp/tc-link-{VICTIM}-{uuid.uuid4().hex[:8]}")  # nosec B108 - the attack's own path
    listener = await asyncio.create_subprocess_exec(
        *_setpriv(owner), sys.executable, "-c", LISTENER, str(runtime_dir / "toolcell.sock"), f"{dir_mode:o}",
        str(link) if symlink else "", "8", TOKEN,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert listener.stdout is not None
        line = await asyncio.wait_for(listener.stdout.readline(), timeout=20)
        assert line.strip() == b"ready", (await listener.stderr.read()).decode() if listener.stderr else ""
        env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "TOOLCELL_LISTEN")}
        victim = await asyncio.create_subprocess_exec(
            *_setpriv(VICTIM), sys.executable, "-m", "toolcell", "call", "text.wordcount",
            "--args", '{"text": "private words"}', "--timeout", "4",
            cwd=str(REPO), env={**env, "PYTHONPATH": str(REPO), "TOOLCELL_TOKEN": TOKEN, "HOME": "/"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(victim.communicate(), timeout=60)
        with contextlib.suppress(OSError):  # tell a listener still waiting for its first caller to stop
            _, end = await asyncio.open_unix_connection(str(runtime_dir / "toolcell.sock"))
            end.write(b"END")
            await end.drain()
            end.close()
        out, _ = await asyncio.wait_for(listener.communicate(), timeout=30)
        seen: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        assert victim.returncode is not None
        return victim.returncode, err.decode(), seen
    finally:
        with contextlib.suppress(ProcessLookupError):
            listener.kill()
        with _clean(link):
            pass


# (case, who made the runtime dir and listens in it, its mode, a symlink in its place?, refused, words)
VICTIM_CASES = [
    ("the victim's own 0700 dir", VICTIM, 0o700, False, False, ""),
    ("planted by another uid", ATTACKER, 0o755, False, True, f"owned by uid {ATTACKER}"),
    ("planted by another uid, 0777", ATTACKER, 0o777, False, True, f"owned by uid {ATTACKER}"),
    ("the victim's own but group-writable", VICTIM, 0o770, False, True, "group or others can write"),
    ("a symlink planted by another uid", ATTACKER, 0o755, True, True, "it is a symlink"),
]


@pytest.mark.parametrize(("owner", "mode", "symlink", "refused", "words"), [c[1:] for c in VICTIM_CASES],
                         ids=[c[0] for c in VICTIM_CASES])
async def test_a_victims_call_never_reaches_a_socket_in_a_runtime_dir_it_does_not_control(
        owner: int, mode: int, symlink: bool, refused: bool, words: str) -> None:
    runtime_dir = Path(f"/tmp/toolcell-{VICTIM}")  # nosec B108 - the path under attack
    with _clean(runtime_dir):
        code, err, seen = await _victim_calls(runtime_dir, owner, mode, symlink)
    if refused:
        assert code != 0 and str(runtime_dir) in err and words in err, err
        assert seen == {"bytes": 0, "preface": False, "token": False}  # not one byte, no token
    else:  # the same probe with the victim's own directory: the call reaches the socket, token and all
        assert seen["preface"] and seen["token"], (err, seen)
        assert "refusing" not in err


@contextlib.contextmanager
def _socket_dir(owner: int, mode: int) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tc-paths-"))
    path.chmod(mode)
    os.chown(path, owner, owner)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# (case, socket directory's owner and mode, refused?)
SERVER_CASES = [
    ("ours, 0711", os.geteuid(), 0o711, False),
    ("another uid's", ATTACKER, 0o755, True),
    ("ours but other-writable", os.geteuid(), 0o777, True),
]


@pytest.mark.parametrize(("owner", "mode", "refused"), [c[1:] for c in SERVER_CASES], ids=[c[0] for c in SERVER_CASES])
async def test_the_supervisor_serves_only_from_a_socket_directory_it_controls(
        owner: int, mode: int, refused: bool) -> None:
    with _socket_dir(owner, mode) as d:
        instance = f"test-{uuid.uuid4().hex[:10]}"
        config = parse_config(config_doc(instance, str(d / "tc.sock")), environ={}, base_dir=d)
        app = App(Supervisor(config, open_backend(config)))
        try:
            if refused:
                with pytest.raises(UnsafePath) as caught:
                    await app.start()
                assert isinstance(caught.value, ConfigError) and caught.value.key == "server.listen"
                assert str(d) in str(caught.value) and not (d / "tc.sock").exists()
            else:
                from toolcell.client import Client

                address = await app.start()
                async with Client(address) as client:
                    result = await client.call("text.wordcount", {"text": "a b c"}, timeout=60)
                assert result.status is Status.OK
        finally:
            await app.stop(grace_s=1.0)
        assert leftovers(engine(), instance) == []


# Run as another uid: open connections, optionally send the HTTP/2 preface (and an empty SETTINGS frame),
# then report for each how long after its opening the supervisor closed it (None: still open at the end).
HOLDER = r"""
import asyncio, json, sys, time
path, count, preface, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
async def hold(opened):
    reader, writer = await asyncio.open_unix_connection(path)
    if preface:
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
        await writer.drain()
    await opened.wait()
    start = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), wait):
            pass
        return round(time.monotonic() - start, 2)
    except (asyncio.TimeoutError, OSError):
        return None
async def main():
    opened = asyncio.Event()
    tasks = [asyncio.ensure_future(hold(opened)) for _ in range(count)]
    await asyncio.sleep(0.5)
    print("opened", flush=True)
    opened.set()
    print(json.dumps(await asyncio.gather(*tasks)), flush=True)
asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def _holder(uid: int, socket_path: Path, count: int, preface: bool, wait_s: float
                  ) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *_setpriv(uid), sys.executable, "-c", HOLDER, str(socket_path), str(count), "1" if preface else "0",
        str(wait_s), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        assert line.strip() == b"opened", (await proc.stderr.read()).decode() if proc.stderr else ""
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


async def _closings(proc: asyncio.subprocess.Process) -> list[float | None]:
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    closed: list[float | None] = json.loads(out.decode().strip().splitlines()[-1])
    return closed


async def test_idle_connections_from_one_uid_cannot_lock_out_other_callers(tmp_path: Path) -> None:
    with _socket_dir(os.geteuid(), 0o711) as d:
        sock = d / "tc.sock"
        doc = config_doc(f"test-{uuid.uuid4().hex[:10]}", str(sock), long={"timeout": "30s", "kill_grace": "1s"})
        doc["server"].update({"socket_mode": "0666", "max_connection_idle": "8s"})
        doc["tools"].append({"name": "python.long", "description": "a long, quiet call", "image": RUNNER_IMAGE,
                             "command": ["python3", "-I", "-u", "/opt/toolcell/tools/pyrun.py"], "profile": "long",
                             "input_schema": {"type": "object", "properties": {"code": {"type": "string"}}}})
        async with running_supervisor(tmp_path, doc) as (app, client):
            forwarder = app.transport.forwarder
            assert forwarder is not None
            cap, deadline = forwarder.max_per_uid, forwarder.handshake_timeout_s
            assert (cap, deadline) == (32, 5.0)  # the defaults
            # A long call on the caller's own connection: quiet for longer than the preface deadline and
            # gRPC's idle limit, and it must not be cut.
            long_call = asyncio.ensure_future(client.call(
                "python.long", {"code": "import time; time.sleep(10); print('done')"}, timeout=60))
            async with _holder(ATTACKER, sock, cap + 8, preface=False, wait_s=20) as silent, \
                    _holder(OTHER, sock, 1, preface=True, wait_s=20) as prefaced:
                assert forwarder.per_uid.get(ATTACKER) == cap and forwarder.refused["per_uid"] >= 8
                # The uid holding every slot it may have does not stop the owner from being served.
                result = await client.call("text.wordcount", {"text": "still served"}, timeout=60)
                assert result.status is Status.OK
                silent_closed = await _closings(silent)
                prefaced_closed = await _closings(prefaced)
            long_result = await long_call
        # Beyond the cap: closed at once. Within it: closed by the preface deadline, well before gRPC's
        # idle limit (8 s) would have.
        immediate = [t for t in silent_closed if t is not None and t < 1.0]
        at_deadline = [t for t in silent_closed if t is not None and deadline - 1.0 <= t < 8.0]
        assert len(immediate) == 8 and len(at_deadline) == cap, silent_closed
        # A connection that sent its preface is live: not cut at the preface deadline, only by gRPC's
        # idle limit once it has carried no call for 8 s.
        [t] = prefaced_closed
        assert t is not None and deadline + 0.5 <= t < 19.0, prefaced_closed
        assert long_result.status is Status.OK and "done" in long_result.output
        assert forwarder.refused["handshake"] >= cap
        assert forwarder.per_uid.get(ATTACKER) is None
