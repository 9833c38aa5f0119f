"""The launcher's relay (``--relay``), run locally: a tool's one large write arrives whole however short the
writes to our side are, its status and signals pass through, and a daemon cannot hold the run open.

A non-blocking pipe as the launcher's stdout reproduces on Linux what gVisor's donated host stdio does
(a write(2) of 200,000 bytes returns 65,536): the same tool run directly on that pipe is the deny side.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from toolcell.backends.launcher import relay_command

SIZE = 200_000
ONE_WRITE = f"import os, sys; n = os.write(1, b'x' * {SIZE}); print(n, file=sys.stderr)"


def run_on_short_writing_stdout(command: list[str], timeout: float = 30) -> tuple[bytes, bytes, int]:
    """Run ``command`` with a non-blocking pipe as stdout, read slowly at first: its writes come back short."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    err = bytearray()
    reader = threading.Thread(target=lambda: err.extend(proc.stderr.read() if proc.stderr else b""))
    reader.start()
    assert proc.stdin is not None
    proc.stdin.close()
    time.sleep(0.3)  # the pipe fills before anyone reads it
    out = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([r], [], [], 0.5)
        if ready:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
    os.close(r)
    code = proc.wait(timeout=timeout)
    reader.join()
    return bytes(out), bytes(err), code


@pytest.mark.parametrize("relayed", [False, True], ids=["direct", "relayed"])
def test_one_large_write_arrives_whole_only_through_the_relay(relayed: bool) -> None:
    tool = [sys.executable, "-c", ONE_WRITE]
    command = list(relay_command(tuple(tool), python=sys.executable)) if relayed else tool
    out, err, code = run_on_short_writing_stdout(command)
    returned = int(err.split()[-1])
    if relayed:  # the tool's write went whole into the launcher's pipe, and all of it reached us
        assert (returned, len(out), code) == (SIZE, SIZE, 0)
    else:  # the probe reproduces the short write: the tool was told 65,536 and that is all that came
        assert returned < SIZE and len(out) == returned and code == 0


@pytest.mark.parametrize(
    ("code", "stdin", "expected"),
    [
        ("import sys; sys.stdout.write(sys.stdin.read().upper()); print('e', file=sys.stderr)",
         b"{}", (b"{}", b"e\n", 0)),
        ("import sys; print('failing', file=sys.stderr); sys.exit(7)", b"", (b"", b"failing\n", 7)),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", b"", (b"", b"", 128 + 9)),
        # 1 MiB on each stream, interleaved: neither blocks the other
        ("import sys\nfor _ in range(64):\n    sys.stdout.write('o' * 16384); sys.stderr.write('e' * 16384)",
         b"", (b"o" * (1 << 20), b"e" * (1 << 20), 0)),
    ],
)
def test_the_relay_keeps_streams_and_status(code: str, stdin: bytes, expected: tuple[bytes, bytes, int]) -> None:
    done = subprocess.run(list(relay_command((sys.executable, "-c", code), python=sys.executable)),
                          input=stdin, capture_output=True, timeout=30, check=False)
    assert (done.stdout, done.stderr, done.returncode) == expected


def test_sigterm_reaches_the_tool_behind_the_relay() -> None:
    code = "import time; print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen(list(relay_command((sys.executable, "-c", code), python=sys.executable)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM


def test_a_daemon_holding_the_pipe_does_not_hold_the_run() -> None:
    """What the tool wrote before it exited arrives; the run ends with the tool, not with its daemon."""
    code = ("import os, sys, time\n"
            "sys.stdout.write('before exit\\n'); sys.stdout.flush()\n"
            "if os.fork() == 0:\n"  # keeps the relay's pipe open (in our process group: killed below)
            "    time.sleep(30); os._exit(0)\n"
            "os.write(1, b'y' * 100000)\n")
    t0 = time.monotonic()
    proc = subprocess.Popen(list(relay_command((sys.executable, "-c", code), python=sys.executable)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    try:
        out = proc.stdout.read() if proc.stdout else b""  # EOF: the launcher exited (the daemon has no copy)
        assert proc.wait(timeout=10) == 0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    assert out == b"before exit\n" + b"y" * 100000
    assert time.monotonic() - t0 < 20  # not the daemon's 30 s


@pytest.mark.parametrize(("reader_stays", "expected"), [(True, 0), (False, 125)], ids=["delivered", "reader-gone"])
def test_output_that_could_not_be_delivered_whole_is_not_reported_clean(reader_stays: bool, expected: int) -> None:
    """A clean exit is reported clean only when every byte reached our side; else 125 and a note on stderr."""
    r, w = os.pipe()
    proc = subprocess.Popen(list(relay_command((sys.executable, "-c", ONE_WRITE), python=sys.executable)),
                            stdin=subprocess.DEVNULL, stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    received = 0
    if reader_stays:
        while chunk := os.read(r, 65536):
            received += len(chunk)
    os.close(r)  # reader gone: the launcher's writes fail (EPIPE)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == expected
    assert (b"could not be delivered whole" in err) is (not reader_stays)
    assert received == (SIZE if reader_stays else 0)
