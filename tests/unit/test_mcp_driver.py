"""The in-sandbox MCP driver (runtime/data/mcp_driver.py), run on the host in front of the fake server
tests/data/mcp_servers/hostile.py in each of its modes: frames on stdout, exit status, what the server saw."""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from toolcell.sources.driver import FINAL_KINDS, driver_command, driver_source

SERVER = Path(__file__).parent.parent / "data" / "mcp_servers" / "hostile.py"
MIB = 1 << 20
FRAME_KEYS = {"progress", "refused", "tools", "result", "error"}


def command(mode: str) -> list[str]:
    return [sys.executable, "-I", "-c", driver_source(), "--", sys.executable, "-I", str(SERVER), mode]


def line(request: dict[str, Any]) -> bytes:
    return json.dumps(request).encode() + b"\n"


def parse_frames(stdout: bytes) -> list[dict[str, Any]]:
    """Every line one frame of the protocol; exactly one final frame, the last."""
    frames = [json.loads(raw) for raw in stdout.splitlines()]
    for frame in frames:
        assert isinstance(frame, dict) and set(frame) <= FRAME_KEYS | {"server", "instructions"}, frame
    finals = [i for i, frame in enumerate(frames) if set(frame) & set(FINAL_KINDS)]
    assert finals == [len(frames) - 1], f"final frames at {finals} of {len(frames)}"
    return frames


@dataclass(frozen=True)
class Run:
    status: int
    frames: list[dict[str, Any]]
    stderr: str

    @property
    def final(self) -> dict[str, Any]:
        return self.frames[-1]

    def of(self, kind: str) -> list[Any]:
        return [frame[kind] for frame in self.frames if kind in frame]


def run(mode: str, request: bytes, env: dict[str, str] | None = None, argv: list[str] | None = None) -> Run:
    done = subprocess.run(argv or command(mode), input=request, capture_output=True, timeout=30, env=env, check=False)
    return Run(done.returncode, parse_frames(done.stdout), done.stderr.decode(errors="replace"))


def call(name: str, **arguments: Any) -> bytes:
    return line({"op": "call", "name": name, "arguments": arguments, "max_line": MIB, "roots": None})


LIST = line({"op": "list", "max_line": MIB})
ECHO = call("echo", text="hi")


def test_driver_command_is_the_driver_in_front_of_the_server() -> None:
    assert driver_command(["/opt/mcp/bin/srv", "--x"]) == \
        ("python3", "-I", "-c", driver_source(), "--", "/opt/mcp/bin/srv", "--x")
    assert "def main()" in driver_source()


# mode, request, exit status, final frame kind, a substring of the final frame's JSON
FINALS = [
    ("ok", LIST, 0, "tools", '"name":"secret"'),
    ("ok", ECHO, 0, "result", '"structuredContent":{"echo":"hi"}'),
    ("ok", call("fail"), 0, "result", '"isError":true'),
    ("ok", call("nope"), 0, "error", '{"code":-32602,"message":"unknown tool nope"}'),
    ("ok", b"not a request\n", 1, "error", "the request is malformed"),
    ("ok", line({"op": "call", "name": 3}), 1, "error", "the request is malformed"),
    ("ok", b"", 1, "error", "no request arrived"),
    ("crash-init", LIST, 1, "error", "the server exited during initialize (status 3)"),
    ("bad-version", LIST, 1, "error", "the server's protocol version is not supported"),
    ("invalid-json", ECHO, 1, "error", "the server wrote invalid JSON-RPC (not JSON)"),
    ("non-object", ECHO, 1, "error", "the server wrote invalid JSON-RPC (not an object)"),
    ("batch", ECHO, 1, "error", "the server wrote invalid JSON-RPC (a batch)"),
    ("wrong-id", ECHO, 1, "error", "the server wrote invalid JSON-RPC (a response to no request)"),
    ("exit-call", ECHO, 1, "error", "the server exited before answering tools/call (status 0)"),
    ("huge", ECHO, 1, "error", f"the server wrote a message over {MIB} bytes"),
    ("flood-bytes", line({"op": "call", "name": "x", "max_line": 65536}), 1, "error",
     "the server wrote a message over 65536 bytes"),
    ("request-flood", ECHO, 1, "error", "the server sent over 100 requests to the client"),
    ("bad-tools", line({"op": "list", "max_line": 1000}), 1, "error", "the server wrote a message over 1000 bytes"),
    # each page's line (413, 297, 142 bytes) fits, the pages' tools together (~650 bytes) do not
    ("paged", line({"op": "list", "max_line": 500}), 1, "error", "the server's tools list is over 500 bytes"),
]


@pytest.mark.parametrize(("mode", "request_line", "status", "kind", "needle"), FINALS,
                         ids=[f"{row[0]}-{i}" for i, row in enumerate(FINALS)])
def test_final_frame(mode: str, request_line: bytes, status: int, kind: str, needle: str) -> None:
    result = run(mode, request_line)
    assert (result.status, next(iter(result.final))) == (status, kind), result
    assert needle in json.dumps(result.final, separators=(",", ":"))
    if status == 1:  # the driver's own words: short, code -32000, never the server's bytes
        error = result.final["error"]
        assert error["code"] == -32000 and len(error["message"]) < 100 and "xxxx" not in error["message"]


def test_spawn_failure_is_an_error_frame() -> None:
    result = run("", LIST, argv=[sys.executable, "-I", "-c", driver_source(), "--", "/nonexistent/server"])
    assert result.status == 1
    assert result.final["error"]["message"] == "the server could not be started (FileNotFoundError)"


def test_list_reports_tools_server_and_instructions() -> None:
    result = run("ok", LIST)
    assert [t["name"] for t in result.final["tools"]] == ["echo", "image", "fail", "slow", "secret", "counter"]
    assert result.final["server"] == {"name": "hostile", "version": "1.0"}
    assert result.final["instructions"] == "mode ok"
    assert result.final["tools"][0]["outputSchema"]["required"] == ["echo"]


def test_paged_list_follows_next_cursor() -> None:
    result = run("paged", LIST)
    assert (result.status, [t["name"] for t in result.final["tools"]]) == \
        (0, ["echo", "image", "fail", "slow", "secret", "counter"])


def test_hostile_tool_entries_pass_through_unchanged_for_the_supervisor_to_judge() -> None:
    tools = run("bad-tools", LIST).final["tools"]
    assert len(tools) == 5000
    assert [t["name"] for t in tools[:2]] == ["has space", "new\nline"]
    assert tools[3]["description"].startswith("\x1b[31m") and tools[4]["inputSchema"] == "not an object"


def test_image_block_is_passed_whole() -> None:
    block = run("ok", call("image")).final["result"]["content"][0]
    assert (block["type"], block["mimeType"]) == ("image", "image/png")
    assert base64.b64decode(block["data"]).startswith(b"\x89PNG")


def test_environment_passes_through_to_the_server() -> None:
    result = run("ok", call("secret"), env={**os.environ, "API_KEY": "k-7f3a"})
    assert result.final["result"]["content"][0]["text"] == "k-7f3a"


def test_log_notifications_go_to_stderr_cut_to_4_kib() -> None:
    result = run("ok", call("echo", text="z" * 10_000))
    logs = [text for text in result.stderr.splitlines() if text.startswith("[info] echo: ")]
    assert len(logs) == 1 and len(logs[0]) <= 4096 and logs[0].startswith('[info] echo: {"said": "zzz')


def test_slow_call_streams_progress_then_the_result() -> None:
    result = run("ok", call("slow", seconds=1))
    progress = result.of("progress")
    assert len(progress) >= 3 and result.status == 0
    assert progress[0] == {"progress": 1, "total": 5.0, "message": "sleeping"}
    assert result.final["result"]["content"][0]["text"] == "slept 1.0"


# roots in the request, the answers the server reports, the methods refused in frames
REQUESTS = [
    (None, "roots/list: error -32601", ["sampling/createMessage", "elicitation/create", "roots/list"]),
    ([{"uri": "file:///data", "name": "data"}],
     'roots/list: result {"roots": [{"name": "data", "uri": "file:///data"}]}',
     ["sampling/createMessage", "elicitation/create"]),
]


@pytest.mark.parametrize(("roots", "roots_answer", "refused"), REQUESTS, ids=["no-roots", "roots"])
def test_server_requests_are_refused_but_roots_answered_when_given(
        roots: list[dict[str, str]] | None, roots_answer: str, refused: list[str]) -> None:
    result = run("requests", line({"op": "call", "name": "x", "arguments": {}, "max_line": MIB, "roots": roots}))
    assert result.status == 0
    assert result.final["result"]["content"][0]["text"].split("\n") == [
        "sampling/createMessage: error -32601", "elicitation/create: error -32601", roots_answer]
    assert [r["method"] for r in result.of("refused")] == refused


def read_until(stream: Any, needle: bytes, timeout: float) -> bytes:
    """Read a pipe until ``needle`` appears (or fail after ``timeout``)."""
    seen, deadline = b"", time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not seen in {timeout} s: {seen[-200:]!r}"
        if select.select([stream], [], [], left)[0]:
            chunk = os.read(stream.fileno(), 65536)
            assert chunk, f"EOF before {needle!r}: {seen[-200:]!r}"
            seen += chunk
    return seen


def test_warm_order_initialize_before_the_request_is_read() -> None:
    proc = subprocess.Popen(command("ok"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_until(proc.stderr, b"initialized\n", 10)  # nothing written to the driver's stdin yet
        time.sleep(0.2)
        assert proc.poll() is None
        out, _ = proc.communicate(ECHO, timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0 and parse_frames(out)[-1]["result"]["content"][0]["text"] == "hi"


def stop(proc: subprocess.Popen[bytes], signum: int, within: float) -> float:
    """Signal the driver; how long it took to exit (fail if longer than ``within``)."""
    start = time.monotonic()
    proc.send_signal(signum)
    try:
        proc.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the driver did not exit within {within} s of signal {signum}")
    return time.monotonic() - start


class Drain(threading.Thread):
    """Reads a pipe to EOF as fast as it fills, keeping its last ``keep`` bytes."""

    def __init__(self, stream: Any, keep: int, watch: bytes = b"") -> None:
        super().__init__(daemon=True)
        self.fd, self.keep = stream.fileno(), keep
        self.data = bytearray()
        self.trimmed = False
        self.lock = threading.Lock()
        # Whether ``watch`` ever went by, trimmed or not (a flood may bury it under more than ``keep`` bytes).
        self.watch, self.seen = watch, False

    def run(self) -> None:
        while chunk := os.read(self.fd, 65536):
            with self.lock:
                if self.watch and not self.seen:
                    self.seen = self.watch in bytes(self.data[-len(self.watch):]) + chunk
                self.data += chunk
                if len(self.data) > 2 * self.keep:
                    del self.data[:-self.keep]
                    self.trimmed = True

    def wait_for(self, needle: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if needle in self.data:
                    return
            assert time.monotonic() < deadline and self.is_alive(), f"{needle!r} not seen in {timeout} s"
            time.sleep(0.02)


# mode, request, what to wait for on (stdout|stderr) before the signal, signal, expected on stderr after
SIGNALS = [
    ("ok", call("slow", seconds=30), ("stdout", b'{"progress":'), signal.SIGTERM, "cancelled 1"),
    ("hang-call", ECHO, ("stderr", b"initialized\n"), signal.SIGTERM, "cancelled 1"),
    ("hang-call", ECHO, ("stderr", b"initialized\n"), signal.SIGINT, "cancelled 1"),
    ("hang-call", ECHO, ("stderr", b"initialized\n"), signal.SIGHUP, "cancelled 1"),
    ("hang", ECHO, ("sleep", b""), signal.SIGTERM, ""),  # never initialized: nothing to cancel; killed
    ("flood", ECHO, ("stdout", b'{"progress":'), signal.SIGTERM, "cancelled 1"),
    ("flood-stderr", ECHO, ("stderr", b"yyyy"), signal.SIGTERM, "cancelled 1"),
]


@pytest.mark.parametrize(("mode", "request_line", "wait", "signum", "server_saw"), SIGNALS,
                         ids=[f"{row[0]}-{row[3].name}" for row in SIGNALS])
def test_signal_cancels_the_call_and_exits_143(mode: str, request_line: bytes, wait: tuple[str, bytes],
                                               signum: signal.Signals, server_saw: str) -> None:
    proc = subprocess.Popen(command(mode), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    drains = {"stdout": Drain(proc.stdout, 64 * MIB), "stderr": Drain(proc.stderr, MIB, server_saw.encode())}
    try:
        for drain in drains.values():
            drain.start()
        assert proc.stdin is not None
        proc.stdin.write(request_line)
        proc.stdin.flush()
        where, needle = wait
        if where == "sleep":
            time.sleep(0.5)
        else:
            drains[where].wait_for(needle, 10)
        took = stop(proc, signum, 5)
        assert took < 4, f"exit took {took:.1f} s"
        for drain in drains.values():
            drain.join(5)
    finally:
        proc.kill()
        proc.wait()
    assert not drains["stdout"].trimmed
    frames = parse_frames(bytes(drains["stdout"].data))
    assert proc.returncode == 143
    assert frames[-1] == {"error": {"code": -32000, "message": "cancelled by the caller"}}
    assert drains["stderr"].seen or not server_saw  # its stderr flood may go on after it, past what is kept
    if mode in ("ok", "flood"):
        assert any("progress" in f for f in frames)


def test_sigterm_exits_promptly_while_nobody_reads_stdout() -> None:
    """The progress flood fills the stdout pipe nobody reads: the signal is still handled at once."""
    proc = subprocess.Popen(command("flood"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdin is not None
        proc.stdin.write(ECHO)
        proc.stdin.flush()
        time.sleep(1.5)
        assert proc.poll() is None
        took = stop(proc, signal.SIGTERM, 5)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143 and took < 4


# Runs a command as its forked child and reports the child's peak RSS (its reaped children included) on
# stderr: a child forked from pytest itself would inherit pytest's own high-water mark across exec.
PEAK_RSS = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"maxrss {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_huge_line_is_refused_fast_in_bounded_memory() -> None:
    """A 50 MiB result line against a 1 MiB cap: an error frame within seconds; neither the driver nor the
    (streaming) server it reaps ever held the line."""
    start = time.monotonic()
    result = run("huge", ECHO, argv=[sys.executable, "-I", "-S", "-c", PEAK_RSS, *command("huge")])
    took = time.monotonic() - start
    assert result.final["error"]["message"] == f"the server wrote a message over {MIB} bytes"
    assert result.status == 1 and took < 5
    peak_kib = int(result.stderr.rsplit("maxrss ", 1)[1])
    assert peak_kib < 40 * 1024, f"peak RSS {peak_kib} KiB"


# Robustness the supervisor counts on, each with a predicate over the run.
CHECKS: list[tuple[str, bytes, Callable[[Run], bool]]] = [
    ("ok", line({"op": "list", "max_line": MIB, "extra": 1}), lambda r: r.status == 0),
    ("ok", ECHO.rstrip(b"\n"), lambda r: r.status == 0 and "result" in r.final),  # no newline, then EOF
    ("ok", b"\n" + ECHO, lambda r: r.status == 0 and "result" in r.final),  # a blank line first
]


@pytest.mark.parametrize(("mode", "request_line", "check"), CHECKS, ids=["extra-key", "no-newline", "blank-first"])
def test_request_line_forms(mode: str, request_line: bytes, check: Callable[[Run], bool]) -> None:
    result = run(mode, request_line)
    assert check(result), result
