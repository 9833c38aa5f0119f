"""The warm-pool launcher protocol: the trailer scanner (pure) and the launcher itself (run locally)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolcell.backends.channel import ChannelListener, ChannelStream
from toolcell.backends.launcher import TRAILER_BYTES, TrailerScanner, envelope, launch_command, new_nonce
from toolcell.errors import BackendError


def trailer(nonce: str, status: int) -> bytes:
    return f"\x1etoolcell-end:{nonce}:{status:03d}\n".encode()


def test_trailer_has_the_documented_length() -> None:
    assert len(trailer(new_nonce(), 0)) == TRAILER_BYTES


def test_scanner_passes_output_and_stops_at_the_trailer() -> None:
    """Output before the trailer passes; the trailer and anything after it never do."""
    nonce = new_nonce()
    s = TrailerScanner(nonce)
    assert s.feed(b"hello ") == b"hello "
    assert s.feed(b"world\n" + trailer(nonce, 3) + b"late") == b"world\n"
    assert s.status == 3 and s.done
    assert s.feed(b"more") == b"" and s.flush() == b""


@pytest.mark.parametrize("cut", range(1, TRAILER_BYTES))
def test_scanner_finds_a_trailer_split_anywhere(cut: int) -> None:
    nonce = new_nonce()
    data = b"out" + trailer(nonce, 0)
    s = TrailerScanner(nonce)
    got = s.feed(data[: 3 + cut]) + s.feed(data[3 + cut:])
    assert got == b"out" and s.status == 0


def test_a_forged_trailer_with_another_nonce_is_ordinary_output() -> None:
    s = TrailerScanner(new_nonce())
    forged = trailer(new_nonce(), 0)
    assert s.feed(forged) + s.flush() == forged
    assert s.status is None


def test_held_back_prefix_is_released_when_it_turns_out_to_be_output() -> None:
    nonce = new_nonce()
    s = TrailerScanner(nonce)
    assert s.feed(b"a\x1etoolcell-") == b"a"  # could be the start of the trailer
    assert s.feed(b"other") == b"\x1etoolcell-other"
    assert s.feed(b"x\x1e") == b"x"
    assert s.flush() == b"\x1e"  # the stream ended without a trailer: it was output after all


def run_launcher(tool: list[str], envelope_bytes: bytes | None,
                 timeout: float = 10) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.Popen(list(launch_command(tuple(tool), python=sys.executable)), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(envelope_bytes or b"", timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


ECHO = [sys.executable, "-c", "import sys; d = sys.stdin.read(); print(d.upper()); print('e', file=sys.stderr)"]


def test_launcher_feeds_the_arguments_and_ends_both_streams_with_the_trailer() -> None:
    nonce = new_nonce()
    done = run_launcher(ECHO, envelope(nonce, b'{"a": "x"}'))
    assert done.returncode == 0
    assert done.stdout == b'{"A": "X"}\n' + trailer(nonce, 0)
    assert done.stderr == b"e\n" + trailer(nonce, 0)


def test_launcher_reports_the_tools_status_and_signal() -> None:
    nonce = new_nonce()
    done = run_launcher([sys.executable, "-c", "import sys; sys.exit(7)"], envelope(nonce, b"{}"))
    assert done.returncode == 7 and done.stdout.endswith(trailer(nonce, 7))
    done = run_launcher([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                        envelope(nonce, b"{}"))
    assert done.returncode == 137 and done.stdout.endswith(trailer(nonce, 137))


def test_launcher_refuses_a_bad_envelope_and_kills_the_tool() -> None:
    done = run_launcher(ECHO, b"not json\n")
    assert done.returncode == 125 and b"toolcell-end" not in done.stdout


def test_launcher_forwards_sigterm_to_the_tool() -> None:
    tool = [sys.executable, "-c", "import sys, time; sys.stdin.read(); print('up', flush=True); time.sleep(30)"]
    proc = subprocess.Popen(list(launch_command(tuple(tool), python=sys.executable)), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    nonce = new_nonce()
    proc.stdin.write(envelope(nonce, b"{}"))
    proc.stdin.close()
    assert proc.stdout.readline() == b"up\n"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 5
    assert proc.stdout.read() == trailer(nonce, 128 + signal.SIGTERM)


def test_envelope_is_one_json_line() -> None:
    line = envelope("n" * 32, '{"t": "é\\n"}'.encode())
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"nonce": "n" * 32, "arguments": '{"t": "é\\n"}'}


async def test_channel_transport_end_to_end_on_the_host(tmp_path: Path) -> None:
    """The launcher over a real channel: the tool's output arrives on its own sockets, the status on control,
    and once the launcher is connected there is nothing left for anyone else to connect to."""
    listener = ChannelListener(tmp_path / "channels")
    sock_path = listener.directory / "c.sock"
    assert oct(listener.directory.stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "channels").stat().st_mode & 0o777) == "0o700"
    tool = [sys.executable, "-c", "import sys, os; d = sys.stdin.read(); print(d.upper()); print('e', file=sys.stderr);"
            " print(os.path.exists(sys.argv[1]), file=sys.stderr); sys.exit(3)", str(sock_path)]
    proc = await asyncio.create_subprocess_exec(*launch_command(tuple(tool), python=sys.executable,
                                                                channel=str(sock_path)))
    conns = await listener.accept(timeout_s=10)
    assert not listener.directory.exists()  # gone before the launcher was told to go on
    stream = ChannelStream(conns)
    stream.expect_trailer(new_nonce(), judge=lambda status: status)
    stream.send(envelope("n" * 32, b'{"a": "x"}'))
    out: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    async for name, data in stream.chunks():
        out[name] += data
    assert await stream.trailer == 3 and await proc.wait() == 3
    assert out == {"stdout": b'{"A": "X"}\n', "stderr": b"e\nFalse\n"}  # the tool saw no socket to connect to


async def test_channel_refuses_a_stranger_and_times_out(tmp_path: Path) -> None:
    listener = ChannelListener(tmp_path / "channels")
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stranger.connect(str(listener.directory / "c.sock"))
    stranger.sendall(b"x")
    with pytest.raises(BackendError, match="unexpected connection"):
        await listener.accept(timeout_s=5)
    assert not listener.directory.exists()
    stranger.close()
    quiet = ChannelListener(tmp_path / "channels")
    with pytest.raises(BackendError, match=r"did not connect within 0\.2s"):
        await quiet.accept(timeout_s=0.2)
    assert not quiet.directory.exists()


async def test_after_a_clean_exit_the_launcher_waits_for_the_supervisor_to_let_go(tmp_path: Path) -> None:
    listener = ChannelListener(tmp_path / "channels")
    tool = [sys.executable, "-c", "import sys; sys.stdin.read(); print('ok')"]
    proc = await asyncio.create_subprocess_exec(*launch_command(tuple(tool), python=sys.executable,
                                                                channel=str(listener.directory / "c.sock")))
    stream = ChannelStream(await listener.accept(timeout_s=10))
    stream.expect_trailer(new_nonce(), judge=lambda status: status)
    stream.send(envelope("n" * 32, b"{}"), half_close=False)  # as a claim is sent
    assert b"".join([data async for _, data in stream.chunks()]) == b"ok\n"
    assert await stream.trailer == 0
    with pytest.raises(TimeoutError):  # decided, but still there: its exit waits for the sandbox's removal
        await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=0.3)
    stream.close()
    assert await asyncio.wait_for(proc.wait(), timeout=10) == 0


def test_a_deferred_launcher_spawns_the_tool_at_the_claim_with_its_environment() -> None:
    nonce = new_nonce()
    tool = [sys.executable, "-c", "import os, sys; sys.stdin.read(); print(os.environ.get('GRANTED'))"]
    proc = subprocess.Popen(list(launch_command(tuple(tool), python=sys.executable, defer=True)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _ = proc.communicate(envelope(nonce, b"{}", env={"GRANTED": "s3cret"}), timeout=10)
    assert proc.returncode == 0 and out == b"s3cret\n" + trailer(nonce, 0)
    # A launcher that spawned its tool already cannot change its environment: it refuses the claim.
    done = run_launcher(tool, envelope(nonce, b"{}", env={"GRANTED": "s3cret"}))
    assert done.returncode == 125 and b"s3cret" not in done.stdout


def test_a_deferred_launcher_writes_granted_files_before_the_tool_starts(tmp_path: Path) -> None:
    nonce = new_nonce()
    secret = tmp_path / "a"
    tool = [sys.executable, "-c", "import os, sys; sys.stdin.read(); p = sys.argv[1]; "
            "print(oct(os.stat(p).st_mode & 0o777), open(p).read())", str(secret)]
    proc = subprocess.Popen(list(launch_command(tuple(tool), python=sys.executable, defer=True)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _ = proc.communicate(envelope(nonce, b"{}", files={str(secret): "s3cret"}), timeout=10)
    assert proc.returncode == 0 and out == b"0o400 s3cret\n" + trailer(nonce, 0)
    # An existing file (or a symlink planted there) is never written through: the claim is refused.
    done = run_launcher(["--defer", *tool], envelope(nonce, b"{}", files={str(secret): "other"}))
    assert done.returncode == 125 and secret.read_text() == "s3cret"


def test_sweep_removes_only_listener_directories_no_live_one_could_be(tmp_path: Path) -> None:
    base = tmp_path / "channels"
    old, fresh = ChannelListener(base), ChannelListener(base)
    os.utime(old.directory, (time.time() - 3600, time.time() - 3600))  # as a killed supervisor leaves it
    assert ChannelListener.sweep(base) == 1
    assert not old.directory.exists() and fresh.directory.exists()
    fresh.close()
    assert ChannelListener.sweep(tmp_path / "never-made") == 0


@pytest.mark.parametrize("defer", [False, True])
def test_the_launcher_says_ready_on_its_fd_only_once_waiting_and_the_tool_never_holds_it(defer: bool) -> None:
    """``--ready-fd``: one byte once the launcher waits for its claim (the tool spawned, unless deferred);
    the descriptor is closed then and the tool never inherits it."""
    ready_r, ready_w = os.pipe()
    tool = [sys.executable, "-c", "import os, sys; sys.stdin.read(); "
            "print('fd3', 'open' if os.path.exists('/proc/self/fd/3') else 'closed')"]
    argv = list(launch_command(tuple(tool), python=sys.executable, defer=defer, ready_fd=3))
    # Put the write end at fd 3 in the child, as runc's --preserve-fds 1 does.
    proc = subprocess.Popen(["/bin/bash", "-c", f'exec 3>&{ready_w} {ready_w}>&-; exec "$@"', "bash", *argv],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(ready_w,))
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"r", "ready before any claim"
        assert os.read(ready_r, 1) == b"", "then closed: EOF once nobody else holds it"
        nonce = new_nonce()
        out, err = proc.communicate(envelope(nonce, b"{}\n", {"A": "b"} if defer else None), timeout=30)
    finally:
        os.close(ready_r)
        if proc.poll() is None:
            proc.kill()
    assert b"fd3 closed" in out, (out, err)


@pytest.mark.parametrize(("signals", "ready_after_s"), [(True, 0.8), (False, 0.8)])
def test_with_tool_ready_the_launcher_is_ready_only_once_its_tool_said_so(signals: bool,
                                                                          ready_after_s: float) -> None:
    """``--tool-ready``: the tool gets a pipe in TOOLCELL_READY_FD and the launcher's own ready byte waits for
    the tool's (an MCP server initializing), or for the tool's end if it never says; the tool's children
    never hold the pipe."""
    body = ("import os, sys, time; time.sleep(0.8); fd = int(os.environ['TOOLCELL_READY_FD']); "
            + ("os.write(fd, b'r'); os.close(fd); " if signals else "os.close(fd); ")
            + "sys.stdin.read(); print('env', 'TOOLCELL_READY_FD' in os.environ)")
    tool = [sys.executable, "-c", body]
    argv = list(launch_command(tuple(tool), python=sys.executable, ready_fd=3, tool_ready=True))
    assert "--tool-ready" in argv
    ready_r, ready_w = os.pipe()
    started = time.monotonic()
    proc = subprocess.Popen(["/bin/bash", "-c", f'exec 3>&{ready_w} {ready_w}>&-; exec "$@"', "bash", *argv],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(ready_w,))
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"r"
        assert time.monotonic() - started >= ready_after_s, "not before the tool was ready"
        out, err = proc.communicate(envelope(new_nonce(), b"{}\n"), timeout=30)
    finally:
        os.close(ready_r)
        if proc.poll() is None:
            proc.kill()
    assert b"env True" in out, (out, err)
    assert "--tool-ready" not in launch_command(("x",), defer=True, tool_ready=True), "deferred: no tool yet"
