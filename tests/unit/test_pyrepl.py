"""images/python/tools/pyrepl.py (python.repl, the resident form of pyrun.py for sessions), run with the
host's python: one JSON line per call, one `__main__` kept across calls, `NNN\\n` on TOOLCELL_CALL_FD."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PYREPL = Path(__file__).parent.parent.parent / "images" / "python" / "tools" / "pyrepl.py"
MAX_LINE = 64 << 20


@dataclass(frozen=True)
class Call:
    status: int
    stdout: str
    stderr: str


def code(source: str) -> bytes:
    return json.dumps({"code": source}).encode() + b"\n"


class Repl:
    """pyrepl.py as a session host runs it: stdin a pipe kept open, the call fd a pipe's write end."""

    def __init__(self) -> None:
        self.done_r, done_w = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-I", "-u", str(PYREPL)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(done_w,),
                                     env={**os.environ, "TOOLCELL_CALL_FD": str(done_w)})
        os.close(done_w)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out, self.err = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        for fd in (self.out, self.err):
            os.set_blocking(fd, False)

    def call(self, line: bytes, timeout: float = 20) -> Call:
        """Send one line; the status written to the call fd, and what stdout/stderr held by then."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line)
        self.proc.stdin.flush()
        reported = b""
        deadline = time.monotonic() + timeout
        while not reported.endswith(b"\n"):
            assert select.select([self.done_r], [], [], max(0.0, deadline - time.monotonic()))[0], "no status"
            chunk = os.read(self.done_r, 16)
            assert chunk, f"call fd closed (exit {self.proc.wait(5)}): {self.read(self.err)!r}"
            reported += chunk
        assert len(reported) == 4 and reported[:3].isdigit(), reported
        # The tool flushed before reporting: what it printed for this call is in the pipes already.
        return Call(int(reported[:3]), self.read(self.out).decode(), self.read(self.err).decode())

    @staticmethod
    def read(fd: int) -> bytes:
        data = b""
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return data
            if not chunk:
                return data
            data += chunk

    def close(self) -> int:
        """EOF on stdin: the exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(10)


@pytest.fixture
def repl() -> Iterator[Repl]:
    session = Repl()
    try:
        yield session
    finally:
        session.proc.kill()
        session.proc.wait()
        os.close(session.done_r)
        for stream in (session.proc.stdout, session.proc.stderr):
            if stream is not None:
                stream.close()


def test_state_survives_across_calls(repl: Repl) -> None:
    first = repl.call(code("import math\nx = 41\ndef f():\n    return x + 1\nprint('defined')"))
    assert first == Call(0, "defined\n", "")
    assert repl.call(code("print(f(), math.pi > 3, __name__)")) == Call(0, "42 True __main__\n", "")
    assert repl.close() == 0


def test_exception_reports_a_traceback_and_keeps_the_state(repl: Repl) -> None:
    repl.call(code("x = 'kept'\ndef g():\n    return 1 / 0"))
    failed = repl.call(code("print('before')\ng()"))
    assert (failed.status, failed.stdout) == (1, "before\n")
    assert failed.stderr.startswith("Traceback (most recent call last):\n")
    # the frames of both calls, with their own source lines; none of pyrepl.py's
    assert 'File "<code-2>", line 2, in <module>' in failed.stderr
    assert 'File "<code-1>", line 3, in g\n    return 1 / 0' in failed.stderr
    assert failed.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "pyrepl" not in failed.stderr
    assert repl.call(code("print(x)")) == Call(0, "kept\n", "")


def test_syntax_error_is_status_1(repl: Repl) -> None:
    failed = repl.call(code("def ("))
    assert failed.status == 1 and "SyntaxError" in failed.stderr and "pyrepl" not in failed.stderr
    assert repl.call(code("print(1)")).status == 0


# the code, its status, a substring of its stderr
EXITS = [
    ("raise SystemExit(3)", 3, ""),
    ("import sys\nsys.exit()", 0, ""),
    ("import sys\nsys.exit(0)", 0, ""),
    ("import sys\nsys.exit(256 + 7)", 7, ""),
    ("import sys\nsys.exit(-1)", 255, ""),
    ("import sys\nsys.exit(True)", 1, ""),
    ("import sys\nsys.exit('bye now')", 1, "bye now\n"),
]


@pytest.mark.parametrize(("source", "status", "stderr"), EXITS, ids=[row[0].split("\n")[-1] for row in EXITS])
def test_system_exit_is_the_call_status_and_the_session_goes_on(
        repl: Repl, source: str, status: int, stderr: str) -> None:
    repl.call(code("kept = 'yes'"))
    result = repl.call(code("print('out')\n" + source))
    assert (result.status, result.stdout, result.stderr) == (status, "out\n", stderr)
    assert repl.call(code("print(kept)")) == Call(0, "yes\n", "")


INVALID = [
    (b"not json\n", "Expecting value"),
    (b"\n", "Expecting value"),
    (b"[1]\n", "arguments must be a JSON object"),
    (b'{"code": 3}\n', 'argument "code" must be a string'),
    (b'{"source": "print(1)"}\n', 'argument "code" must be a string'),
    (b'{"code": "\xff"}\n', "can't decode"),
    (b"[" * 200_000 + b"\n", "arguments nested too deep"),
]


@pytest.mark.parametrize(("line", "message"), INVALID, ids=[f"invalid-{i}" for i in range(len(INVALID))])
def test_invalid_arguments_are_status_2_and_the_session_goes_on(repl: Repl, line: bytes, message: str) -> None:
    repl.call(code("kept = 5"))
    result = repl.call(line)
    assert (result.status, result.stdout) == (2, "")
    assert result.stderr.startswith("python.repl: invalid arguments: ") and message in result.stderr
    assert len(result.stderr) < 300
    assert repl.call(code("print(kept)")) == Call(0, "5\n", "")


def padded(size: int) -> bytes:
    """A valid call line of exactly ``size`` bytes before its newline (an unknown key pads it)."""
    head = b'{"code": "print(\'ran\')", "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}' + b"\n"


def test_a_line_at_the_cap_runs_one_byte_over_is_refused_and_skipped(repl: Repl) -> None:
    at_cap = padded(MAX_LINE)
    assert len(at_cap) == MAX_LINE + 1
    assert repl.call(at_cap) == Call(0, "ran\n", "")
    over = repl.call(padded(MAX_LINE + 1))
    assert (over.status, over.stdout) == (2, "")
    assert over.stderr == f"python.repl: invalid arguments: the call line is over {MAX_LINE} bytes\n"
    # the rest of the long line was skipped, not read as the next call
    assert repl.call(code("print('next')")) == Call(0, "next\n", "")
    assert repl.close() == 0


def test_output_is_flushed_before_the_status(repl: Repl) -> None:
    result = repl.call(code("import sys\nsys.stdout.write('no newline')\nsys.stderr.write('err no newline')"))
    assert result == Call(0, "no newline", "err no newline")


def test_the_codes_stdin_is_empty_and_the_call_fd_is_private(repl: Repl) -> None:
    source = ("import os, subprocess, sys\n"
              "print(repr(sys.stdin.read()), 'TOOLCELL_CALL_FD' in os.environ)\n"
              "subprocess.run([sys.executable, '-c', 'import sys; print(len(sys.stdin.buffer.read()))'], check=True)")
    assert repl.call(code(source)) == Call(0, "'' False\n0\n", "")
    assert repl.call(code("print('still served')")) == Call(0, "still served\n", "")


def test_eof_exits_0_and_closes_the_call_fd(repl: Repl) -> None:
    repl.call(code("x = 1"))
    assert repl.close() == 0
    assert os.read(repl.done_r, 16) == b""


def test_eof_after_a_last_line_without_newline_runs_it(repl: Repl) -> None:
    assert repl.proc.stdin is not None
    repl.proc.stdin.write(code("print('last')").rstrip(b"\n"))
    assert repl.close() == 0
    assert os.read(repl.done_r, 16) == b"000\n"
    assert repl.read(repl.out) == b"last\n"


# TOOLCELL_CALL_FD: not a session, not a number, no open fd
@pytest.mark.parametrize("value", [None, "", "x", "-1", "987"])
def test_without_a_call_fd_it_refuses_to_start(value: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TOOLCELL_CALL_FD"}
    if value is not None:
        env["TOOLCELL_CALL_FD"] = value
    done = subprocess.run([sys.executable, "-I", "-u", str(PYREPL)], input=code("print('ran')"),
                          capture_output=True, env=env, timeout=20, check=False)
    assert (done.returncode, done.stdout) == (2, b"")
    assert b"only in a session" in done.stderr
