"""The MCP driver's ``--session`` form (runtime/data/mcp_driver.py, issue 18), run on the host in front of
tests/data/mcp_servers/hostile.py: one server for many request lines, each call's final frame on stdout
then its status line on TOOLCELL_CALL_FD, EOF on stdin the end (exit 0, the server reaped)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from toolcell.sources.driver import FINAL_KINDS, driver_command, driver_source

SERVER = Path(__file__).parent.parent / "data" / "mcp_servers" / "hostile.py"
MIB = 1 << 20


def line(request: dict[str, Any]) -> bytes:
    return json.dumps(request).encode() + b"\n"


def call(name: str, **arguments: Any) -> bytes:
    return line({"op": "call", "name": name, "arguments": arguments, "max_line": MIB, "roots": None})


LIST = line({"op": "list", "max_line": MIB})
COUNTER = call("counter")


def frames_of(stdout: bytes) -> list[dict[str, Any]]:
    """Whole lines, each a frame; exactly one final frame, the last."""
    assert stdout.endswith(b"\n"), stdout[-200:]
    frames = [json.loads(raw) for raw in stdout.splitlines()]
    finals = [i for i, frame in enumerate(frames) if set(frame) & set(FINAL_KINDS)]
    assert finals == [len(frames) - 1], f"final frames at {finals} of {len(frames)}"
    return frames


def text_of(frames: list[dict[str, Any]]) -> str:
    return str(frames[-1]["result"]["content"][0]["text"])


@dataclass(frozen=True)
class Answer:
    status: int
    frames: list[dict[str, Any]]
    stderr: str

    @property
    def final(self) -> dict[str, Any]:
        return self.frames[-1]


class Session:
    """The driver as a session host runs it: stdin kept open, TOOLCELL_CALL_FD a pipe's write end."""

    def __init__(self, mode: str, call_fd: bool = True) -> None:
        self.done_r, done_w = os.pipe()
        env = {k: v for k, v in os.environ.items() if k != "TOOLCELL_CALL_FD"}
        if call_fd:
            env["TOOLCELL_CALL_FD"] = str(done_w)
        argv = driver_command([sys.executable, "-I", str(SERVER), mode], sys.executable, session=True)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     pass_fds=(done_w,), env=env)
        os.close(done_w)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out, self.err = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        for fd in (self.out, self.err):
            os.set_blocking(fd, False)
        self.stderr = b""  # all of it so far

    def send(self, request: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(request)
        self.proc.stdin.flush()

    def status(self, timeout: float = 20) -> int | None:
        """The next status line on the call fd; None when it closed first."""
        reported, deadline = b"", time.monotonic() + timeout
        while not reported.endswith(b"\n"):
            assert select.select([self.done_r], [], [], max(0.0, deadline - time.monotonic()))[0], "no status"
            chunk = os.read(self.done_r, 16)
            if not chunk:
                assert reported == b"", reported
                return None
            reported += chunk
        assert len(reported) == 4 and reported[:3].isdigit(), reported
        return int(reported[:3])

    def call(self, request: bytes) -> Answer:
        """One request; its status line, and the frames on stdout by the time the status line came."""
        self.send(request)
        status = self.status()
        assert status is not None, f"the driver exited {self.proc.wait(5)}: {self.read(self.out)!r}"
        err = self.read(self.err)
        self.stderr += err
        return Answer(status, frames_of(self.read(self.out)), err.decode(errors="replace"))

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

    def wait_stderr(self, needle: bytes, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.stderr:
            assert time.monotonic() < deadline, f"{needle!r} not seen: {self.stderr[-300:]!r}"
            select.select([self.err], [], [], 0.1)
            self.stderr += self.read(self.err)

    def end(self, timeout: float = 10, seen: bytes = b"") -> tuple[int, list[dict[str, Any]], str]:
        """Wait for the driver's exit: its status, its last frames (after the stdout ``seen`` already), all of
        stderr. Stderr reaching EOF proves the server (which shares it) is gone too."""
        status = self.proc.wait(timeout)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        os.set_blocking(self.out, True)
        os.set_blocking(self.err, True)
        out = seen + self.proc.stdout.read()
        self.stderr += self.proc.stderr.read()
        return status, frames_of(out) if out else [], self.stderr.decode(errors="replace")

    def close(self, timeout: float = 10) -> tuple[int, list[dict[str, Any]], str]:
        """EOF on stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.end(timeout)


@pytest.fixture
def sessions() -> Iterator[list[Session]]:
    made: list[Session] = []
    try:
        yield made
    finally:
        for session in made:
            session.proc.kill()
            session.proc.wait()
            os.close(session.done_r)
            for stream in (session.proc.stdin, session.proc.stdout, session.proc.stderr):
                if stream is not None:
                    stream.close()


def open_session(sessions: list[Session], mode: str = "ok", call_fd: bool = True) -> Session:
    sessions.append(Session(mode, call_fd))
    return sessions[-1]


def test_driver_command_session_flag() -> None:
    server = ["/opt/mcp/bin/srv", "--session"]
    assert driver_command(server) == ("python3", "-I", "-c", driver_source(), "--", *server)
    assert driver_command(server, session=True) == \
        ("python3", "-I", "-c", driver_source(), "--session", "--", *server)


def test_counter_keeps_its_state_across_calls_and_eof_ends_the_session(sessions: list[Session]) -> None:
    session = open_session(sessions)
    first = session.call(COUNTER)
    assert first.status == 0 and text_of(first.frames).startswith("memory 1 disk ")
    second = session.call(COUNTER)
    assert second.status == 0 and text_of(second.frames).startswith("memory 2 disk ")
    status, frames, stderr = session.close()
    assert (status, frames) == (0, [])
    assert stderr.count("initialized") == 1  # one server, initialized once
    assert os.read(session.done_r, 16) == b""  # no status line for the end


# one session, these requests in turn: status line, final frame kind, a substring of its JSON
CALLS = [
    (COUNTER, 0, "result", '"text":"memory 1 disk '),
    (LIST, 0, "tools", '"name":"counter"'),
    (call("echo", text="hi"), 0, "result", '"structuredContent":{"echo":"hi"}'),
    (call("fail"), 0, "result", '"isError":true'),
    (call("nope"), 0, "error", '{"code":-32602,"message":"unknown tool nope"}'),
    (b"not a request\n", 1, "error", '{"code":-32000,"message":"the request is malformed"}'),
    (line({"op": "call", "name": 3}), 1, "error", "the request is malformed"),
    (b"\n\n" + call("image"), 0, "result", '"mimeType":"image/png"'),
    (COUNTER, 0, "result", '"text":"memory 2 disk '),  # the same server all along
]


def test_each_request_is_answered_with_a_status_line_and_the_session_goes_on(sessions: list[Session]) -> None:
    session = open_session(sessions)
    for request, status, kind, needle in CALLS:
        answer = session.call(request)
        assert (answer.status, next(iter(answer.final))) == (status, kind), (request, answer)
        assert needle in json.dumps(answer.final, separators=(",", ":")), (request, answer.final)
    assert session.close()[0] == 0


def test_log_lines_and_progress_are_out_before_the_status_line(sessions: list[Session]) -> None:
    session = open_session(sessions)
    echo = session.call(call("echo", text="logged"))
    assert '[info] echo: {"said": "logged"}' in echo.stderr
    for seconds in (0.6, 0.6):  # a second call streams its progress too
        slow = session.call(call("slow", seconds=seconds))
        assert slow.status == 0 and text_of(slow.frames) == f"slept {seconds}"
        progress = [frame["progress"] for frame in slow.frames if "progress" in frame]
        assert len(progress) >= 2 and progress[0]["message"] == "sleeping"
    assert session.close()[0] == 0


def test_a_last_request_without_newline_is_answered_then_eof_ends(sessions: list[Session]) -> None:
    session = open_session(sessions)
    session.send(COUNTER.rstrip(b"\n"))
    assert session.proc.stdin is not None
    session.proc.stdin.close()
    assert session.status() == 0
    status, frames, _ = session.end()
    assert status == 0 and text_of(frames).startswith("memory 1 ")


def test_eof_before_any_request_exits_0(sessions: list[Session]) -> None:
    session = open_session(sessions)
    session.wait_stderr(b"initialized\n")
    assert session.close()[:2] == (0, [])
    assert os.read(session.done_r, 16) == b""


def test_the_server_dying_ends_the_session_with_status_1(sessions: list[Session]) -> None:
    session = open_session(sessions, "exit-call")
    session.send(COUNTER)
    assert session.status() is None  # the call fd closed with the driver: no status line
    status, frames, _ = session.end()
    assert status == 1
    assert frames[-1] == {"error": {"code": -32000,
                                    "message": "the server exited before answering tools/call (status 0)"}}


def test_sigterm_between_calls_ends_the_session_with_143(sessions: list[Session]) -> None:
    session = open_session(sessions)
    assert session.call(COUNTER).status == 0
    session.proc.send_signal(signal.SIGTERM)
    assert session.status() is None
    status, frames, _ = session.end(5)
    assert (status, frames) == (143, [{"error": {"code": -32000, "message": "cancelled by the caller"}}])


def test_sigterm_during_a_call_cancels_that_call(sessions: list[Session]) -> None:
    session = open_session(sessions)
    assert session.call(COUNTER).status == 0  # request id 1
    session.send(call("slow", seconds=30))  # request id 2
    deadline = time.monotonic() + 10
    out = b""
    while b'{"progress":' not in out:
        assert time.monotonic() < deadline, "no progress"
        select.select([session.out], [], [], 0.1)
        out += session.read(session.out)
    session.proc.send_signal(signal.SIGTERM)
    assert session.status() is None
    status, frames, stderr = session.end(5, seen=out)
    assert status == 143 and frames[-1] == {"error": {"code": -32000, "message": "cancelled by the caller"}}
    assert "cancelled 2" in stderr


def test_session_without_a_call_fd_is_refused_before_the_server_starts(sessions: list[Session]) -> None:
    session = open_session(sessions, call_fd=False)
    status, frames, stderr = session.end()
    assert (status, frames) == (1, [{"error": {"code": -32000, "message": "--session needs TOOLCELL_CALL_FD"}}])
    assert "initialized" not in stderr
