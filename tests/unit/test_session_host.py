"""The session host (runtime/data/session_host.py with workspace.py in front), run for real with this
machine's python: claims built by ``claim()`` on its stdin, its stdout/stderr split by ``CallScanner`` and
``TrailerScanner`` exactly as the supervisor splits a session sandbox's output."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from toolcell.backends.launcher import TrailerScanner, new_nonce
from toolcell.model import InputFile, WorkspacePolicy
from toolcell.policy.scrub import Redactor
from toolcell.policy.spec import HostSpec
from toolcell.sessions.host import SESSION_OVER, CallScanner, claim, host_command
from toolcell.workspace import encode_inputs, parse_collected, payload_cap

PYREPL = Path(__file__).resolve().parents[2] / "images" / "python" / "tools" / "pyrepl.py"
REFUSED = 125
FILES_CAP = 1 << 20
CALL_TIMEOUT_S = 20.0

# An exec-mode tool: JSON arguments on stdin; keeps a call counter in its working directory (the workspace).
EXEC_TOOL = r"""
import json, os, sys
args = json.loads(sys.stdin.read() or "{}")
n = int(open("count").read()) + 1 if os.path.exists("count") else 1
with open("count", "w") as fh:
    fh.write(str(n))
report = {"call": n, "cwd": os.getcwd()}
for name in args.get("env", []):
    report[name] = os.environ.get(name)
if "read" in args:
    with open(args["read"]) as fh:
        report["read"] = fh.read()
for path, text in args.get("write", {}).items():
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
sys.stdout.write(json.dumps(report) + "\n" + args.get("raw", ""))
sys.stdout.flush()
sys.stderr.write(args.get("stderr", ""))
sys.stderr.flush()
if "sleep" in args:
    open("sleeping", "w").close()
    import time
    time.sleep(args["sleep"])
sys.exit(args.get("exit", 0))
"""

# A resident tool speaking the status-line protocol by hand: each stdin line is a command.
RESIDENT_TOOL = r"""
import os, signal, sys, time
fd = int(os.environ["TOOLCELL_CALL_FD"])
while True:
    line = sys.stdin.buffer.readline()
    if not line:
        if os.environ.get("STUBBORN"):  # ignores stdin EOF and SIGTERM: only SIGKILL ends it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(1)
        sys.exit(0)
    cmd = line.decode().rstrip("\n")
    sys.stdout.write(f"got {cmd} pid={os.getpid()}\n")
    sys.stdout.flush()
    if cmd.startswith("exit "):
        sys.exit(int(cmd[5:]))
    if cmd == "twice":  # out of turn: a second status line for the same call
        os.write(fd, b"000\n005\n")
        continue
    if cmd == "close":  # breaks the protocol: can no longer say a call is done, and keeps running
        os.close(fd)
        while True:
            time.sleep(1)
    os.write(fd, (cmd[7:] if cmd.startswith("report ") else "000").encode() + b"\n")
"""



def encode_input(path: str, data: bytes) -> dict[str, str]:
    """One claim input, as the supervisor encodes it (``toolcell.workspace.encode_inputs``)."""
    return encode_inputs([InputFile(path=path, data=data)])[0]


@dataclass
class Call:
    status: int | None
    stdout: bytes
    stderr: bytes
    payload: bytes | None
    refused: str
    over: bool = False  # the trailer said the session ends with this call


class Host:
    """The host as a subprocess; ``call`` sends one claim and reads until both of its trailers."""

    def __init__(self, tmp: Path, command: Sequence[str], *, resident: bool = False, relay: bool = False,
                 outputs: bool = True, env: Mapping[str, str] | None = None) -> None:
        self.workspace = tmp / "ws"
        self.outputs = self.workspace / "out"
        spec = HostSpec(resident=resident, workspace=str(self.workspace),
                        outputs=str(self.outputs) if outputs else "")
        argv = host_command(tuple(command), spec, relay=relay, python=sys.executable)
        assert argv[:5] == (sys.executable, "-I", "-S", "-c", argv[4]) and argv[argv.index("--") + 1:] == \
            tuple(command)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out, self.err = self.proc.stdout.fileno(), self.proc.stderr.fileno()
        for fd in (self.out, self.err):
            os.set_blocking(fd, False)

    def send(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    def call(self, stdin: bytes, *, env: Mapping[str, str] | None = None, files: Mapping[str, str] | None = None,
             inputs: Sequence[Mapping[str, str]] = (), collect: bool = False) -> Call:
        nonce = new_nonce()
        self.send(claim(nonce, stdin, env=env, files=files, inputs=inputs, collect=collect))
        return self.read(nonce)

    def read(self, nonce: str) -> Call:
        out, err = CallScanner(nonce, FILES_CAP), TrailerScanner(nonce)
        stdout, stderr = bytearray(), bytearray()
        open_fds = {self.out, self.err}
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while not (out.done and err.done) and open_fds:
            ready, _, _ = select.select(list(open_fds), [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no trailer in {CALL_TIMEOUT_S} s: {bytes(stdout)!r} {bytes(stderr)!r}"
            for fd in ready:
                data = os.read(fd, 65536)
                if not data:
                    open_fds.discard(fd)
                elif fd == self.out:
                    stdout += out.feed(data)
                else:
                    stderr += err.feed(data)
        if not (out.done and err.done):
            stdout += out.flush()
            stderr += err.flush()
        status = out.status if err.done else None
        over = status is not None and status >= SESSION_OVER  # the host ends the session with this call
        if over and status is not None:
            status -= SESSION_OVER
        return Call(status, bytes(stdout), bytes(stderr), out.files.payload, out.files.refused, over)

    def exited(self, timeout: float = 10.0) -> int | None:
        """The host's exit status; None while it still runs after ``timeout`` s."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self, timeout: float = 10.0) -> int | None:
        """EOF on the host's stdin; its exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.exited(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):  # stdin's buffer, to a host that is gone
                    stream.close()


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    made: list[Host] = []
    yield made
    for host in made:
        host.kill()


def exec_host(tmp_path: Path, hosts: list[Host], **kwargs: Any) -> Host:
    tool = tmp_path / "tool.py"
    tool.write_text(EXEC_TOOL)
    hosts.append(Host(tmp_path, [sys.executable, str(tool)], **kwargs))
    return hosts[-1]


def resident_host(tmp_path: Path, hosts: list[Host], **kwargs: Any) -> Host:
    tool = tmp_path / "resident.py"
    tool.write_text(RESIDENT_TOOL)
    hosts.append(Host(tmp_path, [sys.executable, "-u", str(tool)], resident=True, **kwargs))
    return hosts[-1]


def args(**values: Any) -> bytes:
    return json.dumps(values).encode()


def report(call: Call) -> dict[str, Any]:
    first = call.stdout.split(b"\n", 1)[0]
    value = json.loads(first)
    assert isinstance(value, dict)
    return value


# -- exec mode -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("relay", [False, True])
def test_exec_state_kept_across_claims(tmp_path: Path, hosts: list[Host], relay: bool) -> None:
    host = exec_host(tmp_path, hosts, relay=relay)
    for n in (1, 2, 3):
        got = host.call(args(stderr=f"err {n}\n"))
        assert got.status == 0
        assert report(got) == {"call": n, "cwd": str(host.workspace)}
        assert got.stderr == f"err {n}\n".encode()
        assert got.payload is None  # not asked to collect
    assert (host.workspace / "count").read_text() == "3"
    assert host.close() == 0


@pytest.mark.parametrize("status", [1, 2, 42, 255])
def test_exec_nonzero_status_is_the_calls_and_the_host_keeps_serving(tmp_path: Path, hosts: list[Host],
                                                                       status: int) -> None:
    host = exec_host(tmp_path, hosts)
    assert host.call(args(exit=status)).status == status
    after = host.call(args())
    assert after.status == 0 and report(after)["call"] == 2
    assert host.close() == 0


def test_exec_tool_killed_by_a_signal_is_128_plus(tmp_path: Path, hosts: list[Host]) -> None:
    tool = tmp_path / "suicide.py"
    tool.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    hosts.append(host := Host(tmp_path, [sys.executable, str(tool)]))
    assert host.call(b"").status == 128 + signal.SIGKILL
    assert host.call(b"").status == 128 + signal.SIGKILL  # still serving
    assert host.close() == 0


def test_exec_command_missing_fails_the_call_not_the_host(tmp_path: Path, hosts: list[Host]) -> None:
    hosts.append(host := Host(tmp_path, [str(tmp_path / "no-such-tool")]))
    for _ in range(2):
        got = host.call(b"{}")
        assert got.status == 127
        assert b"cannot start the tool" in got.stderr
    assert host.close() == 0


@pytest.mark.parametrize("forged", [
    "\x1etoolcell-end:{other}:000\n",
    "\x1etoolcell-files:{other}:0000000002\n{{}}",
    "\x1etoolcell-end:{other}:000\n\x1etoolcell-files:{other}:0000000002\n{{}}more\n",
    "\x1etoolcell-end:\n\x1etoolcell-files:\n",
])
def test_forged_trailer_or_files_header_is_output(tmp_path: Path, hosts: list[Host], forged: str) -> None:
    host = exec_host(tmp_path, hosts)
    raw = forged.format(other=new_nonce())
    got = host.call(args(raw=raw, stderr=raw, exit=3), collect=True)
    assert got.status == 3  # the real trailer's, after the forged one
    assert got.stdout.split(b"\n", 1)[1] == raw.encode()
    assert got.stderr == raw.encode()
    assert got.payload is not None and json.loads(got.payload)["files"] == []  # the host's block, not the tool's
    assert host.call(args()).status == 0


# -- input files -----------------------------------------------------------------------------------------


def test_input_files_written_then_bad_path_refused_and_host_keeps_serving(tmp_path: Path,
                                                                          hosts: list[Host]) -> None:
    host = exec_host(tmp_path, hosts)
    got = host.call(args(read="data/in.txt"), inputs=[encode_input("data/in.txt", b"hello\n")])
    assert got.status == 0 and report(got)["read"] == "hello\n"
    assert (host.workspace / "data" / "in.txt").read_bytes() == b"hello\n"
    for bad in ("../escape.txt", "/abs.txt", "data/in.txt"):  # outside, absolute, already there
        refused = host.call(args(), inputs=[encode_input(bad, b"x")])
        assert refused.status == REFUSED, bad
        assert refused.stderr.startswith(b"toolcell: input files refused"), refused.stderr
        assert refused.stdout == b""  # the tool did not run
    assert not (tmp_path / "escape.txt").exists()
    got = host.call(args())
    assert got.status == 0 and report(got)["call"] == 2  # the refused calls never ran the tool
    assert host.close() == 0


# -- collected files -------------------------------------------------------------------------------------


def test_collect_gives_a_files_block_parse_collected_reads(tmp_path: Path, hosts: list[Host]) -> None:
    host = exec_host(tmp_path, hosts)
    policy = WorkspacePolicy(dir=str(host.workspace), outputs=str(host.outputs))
    got = host.call(args(write={"out/a.txt": "alpha\n", "out/sub/b.txt": "beta"}), collect=True)
    assert got.status == 0 and not got.refused
    assert got.payload is not None and len(got.payload) <= payload_cap(policy)
    collected = parse_collected(got.payload, policy, Redactor({}))
    assert {f.path: f.text for f in collected.files} == {"a.txt": "alpha\n", "sub/b.txt": "beta"}
    assert not collected.truncated and not collected.skipped
    assert b"toolcell-files" not in got.stdout
    # Not asked: no block, even though the files are there.
    assert host.call(args()).payload is None
    assert host.close() == 0


def test_collect_without_an_outputs_dir_gives_no_block(tmp_path: Path, hosts: list[Host]) -> None:
    host = exec_host(tmp_path, hosts, outputs=False)
    got = host.call(args(write={"out/a.txt": "alpha"}), collect=True)
    assert got.status == 0 and got.payload is None


# -- the claims themselves -------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    b"not json\n",
    b"[]\n",
    b'{"arguments": ""}\n',  # no nonce
    b'{"nonce": "abc", "arguments": ""}\n',  # not 32 hex
    b'{"nonce": "' + b"G" * 32 + b'", "arguments": ""}\n',
    b'{"nonce": "' + b"a" * 32 + b'"}\n',  # no arguments
])
def test_a_bad_claim_ends_the_host_with_125(tmp_path: Path, hosts: list[Host], line: bytes) -> None:
    host = exec_host(tmp_path, hosts)
    host.send(line)
    assert host.exited(10) == REFUSED
    assert not (host.workspace / "count").exists()  # nothing ran


def test_a_bad_claim_after_good_ones_ends_the_host_with_125(tmp_path: Path, hosts: list[Host]) -> None:
    host = exec_host(tmp_path, hosts)
    assert host.call(args()).status == 0
    host.send(b"{\n")
    assert host.exited(10) == REFUSED


def test_secrets_on_the_first_claim_reach_every_spawn(tmp_path: Path, hosts: list[Host]) -> None:
    host = exec_host(tmp_path, hosts)
    secret_file = tmp_path / "secret.txt"
    first = host.call(args(env=["TC_SECRET"], read=str(secret_file)), env={"TC_SECRET": "s3cret"},
                      files={str(secret_file): "file-secret"})
    assert first.status == 0
    assert report(first)["TC_SECRET"] == "s3cret" and report(first)["read"] == "file-secret"
    assert secret_file.stat().st_mode & 0o777 == 0o400
    for n in (2, 3):
        later = host.call(args(env=["TC_SECRET"]))
        assert later.status == 0 and report(later) == {"call": n, "cwd": str(host.workspace), "TC_SECRET": "s3cret"}
    assert host.close() == 0


@pytest.mark.parametrize("kind", ["env", "files"])
def test_secrets_on_a_later_claim_are_refused(tmp_path: Path, hosts: list[Host], kind: str) -> None:
    host = exec_host(tmp_path, hosts)
    assert host.call(args(), env={"TC_SECRET": "s3cret"}).status == 0
    late = tmp_path / "late-secret"
    nonce = new_nonce()
    host.send(claim(nonce, args(env=["TC_OTHER"]), env={"TC_OTHER": "x"} if kind == "env" else None,
                    files={str(late): "x"} if kind == "files" else None))
    assert host.exited(10) == REFUSED
    assert host.read(nonce).status is None  # no trailer: the call never ran
    assert (host.workspace / "count").read_text() == "1"
    assert not late.exists()


def test_secrets_on_the_second_claim_when_the_first_had_none_are_refused(tmp_path: Path,
                                                                           hosts: list[Host]) -> None:
    host = exec_host(tmp_path, hosts)
    assert host.call(args()).status == 0
    host.send(claim(new_nonce(), args(), env={"TC_SECRET": "late"}))
    assert host.exited(10) == REFUSED


def test_eof_on_stdin_ends_an_idle_exec_host_with_0(tmp_path: Path, hosts: list[Host]) -> None:
    host = exec_host(tmp_path, hosts)
    assert host.close() == 0  # no claim at all


# -- resident mode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "status"), [
    ("ok", 0),
    ("report 007", 7),
    ("report 255", 255),
    ("report 999", 255),  # clamped
    ("report -5", 0),
    ("report abc", 1),  # not a number: a failed call
    ("report ", 0),
])
def test_resident_status_line_protocol(tmp_path: Path, hosts: list[Host], line: str, status: int) -> None:
    host = resident_host(tmp_path, hosts)
    got = host.call(line.encode())
    assert got.status == status
    assert got.stdout.startswith(f"got {line} pid=".encode())
    again = host.call(b"ok")  # the same process serves the next call
    assert again.status == 0
    assert again.stdout.split(b"pid=")[1] == got.stdout.split(b"pid=")[1]
    assert host.close() == 0


def test_resident_tool_exit_is_the_calls_status_and_ends_the_host(tmp_path: Path, hosts: list[Host]) -> None:
    host = resident_host(tmp_path, hosts)
    assert host.call(b"ok").status == 0
    assert not host.call(b"ok").over
    got = host.call(b"exit 9")
    assert (got.status, got.over) == (9, True)  # the trailer says the session ends with this call
    assert host.exited(10) == 9


def test_resident_stubborn_tool_is_killed_at_stdin_eof(tmp_path: Path, hosts: list[Host]) -> None:
    host = resident_host(tmp_path, hosts, env={"STUBBORN": "1"})
    got = host.call(b"ok")
    pid = int(got.stdout.split(b"pid=")[1])
    started = time.monotonic()
    assert host.close(timeout=15) == 0
    assert time.monotonic() - started < 8  # stdin closed, 1 s grace, SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def repl_call(source: str) -> bytes:
    return json.dumps({"code": source}).encode() + b"\n"


@pytest.mark.parametrize("relay", [False, True])
def test_pyrepl_keeps_variables_across_claims(tmp_path: Path, hosts: list[Host], relay: bool) -> None:
    hosts.append(host := Host(tmp_path, [sys.executable, "-I", "-u", str(PYREPL)], resident=True, relay=relay))
    assert host.call(repl_call("x = 40\nprint('set')")) == Call(0, b"set\n", b"", None, "")
    got = host.call(repl_call("x += 2\nprint(x)"))
    assert (got.status, got.stdout) == (0, b"42\n")
    raised = host.call(repl_call("raise ValueError('boom')"))
    assert raised.status == 1 and b"ValueError: boom" in raised.stderr
    for code, status in (("raise SystemExit(3)", 3), ("import sys; sys.exit()", 0), ("raise SystemExit(300)", 44)):
        assert host.call(repl_call(code)).status == status  # SystemExit keeps the session
    assert host.call(repl_call("print(x)")).stdout == b"42\n"
    bad = host.call(b"not json")  # the host adds the newline
    assert bad.status == 2 and b"invalid arguments" in bad.stderr
    assert host.call(repl_call("print(x * 2)")).stdout == b"84\n"
    assert host.close() == 0


def test_pyrepl_never_sees_the_nonce_or_the_call_fd_env(tmp_path: Path, hosts: list[Host]) -> None:
    hosts.append(host := Host(tmp_path, [sys.executable, "-I", "-u", str(PYREPL)], resident=True))
    nonce = new_nonce()
    host.send(claim(nonce, repl_call("import os, sys; print(os.environ.get('TOOLCELL_CALL_FD'), sys.argv)")))
    got = host.read(nonce)
    assert got.status == 0 and got.stdout == b"None ['<code>']\n"
    assert nonce.encode() not in got.stdout
    assert host.close() == 0


def test_pyrepl_inputs_in_the_workspace_and_outputs_collected(tmp_path: Path, hosts: list[Host]) -> None:
    hosts.append(host := Host(tmp_path, [sys.executable, "-I", "-u", str(PYREPL)], resident=True))
    source = "import os; print(open('in.txt').read()); os.makedirs('out', exist_ok=True)\n" \
             "open('out/r.txt', 'w').write('result')"
    got = host.call(repl_call(source), inputs=[encode_input("in.txt", b"given")], collect=True)
    assert got.status == 0 and got.stdout == b"given\n"
    assert got.payload is not None
    policy = WorkspacePolicy(dir=str(host.workspace), outputs=str(host.outputs))
    assert [(f.path, f.text) for f in parse_collected(got.payload, policy, Redactor({})).files] == [("r.txt", "result")]
    assert host.close() == 0


# -- signals ---------------------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float = CALL_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_ends_an_idle_host_at_once(tmp_path: Path, hosts: list[Host], signum: int) -> None:
    host = exec_host(tmp_path, hosts)
    assert host.call(args()).status == 0
    host.proc.send_signal(signum)
    assert host.exited(5) == 0  # not left waiting for a claim that never comes


def test_a_signal_ends_an_idle_resident_host_and_its_stubborn_tool(tmp_path: Path, hosts: list[Host]) -> None:
    host = resident_host(tmp_path, hosts, env={"STUBBORN": "1"})
    pid = int(host.call(b"ok").stdout.split(b"pid=")[1])
    host.proc.send_signal(signal.SIGTERM)
    assert host.exited(10) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_signal_during_a_call_reaches_the_tool_and_the_call_ends_first(tmp_path: Path,
                                                                          hosts: list[Host]) -> None:
    host = exec_host(tmp_path, hosts)
    nonce = new_nonce()
    host.send(claim(nonce, args(sleep=60)))
    wait_for((host.workspace / "sleeping").exists)
    host.proc.send_signal(signal.SIGTERM)
    got = host.read(nonce)
    assert got.status == 128 + signal.SIGTERM  # the tool's death, reported with the trailer
    assert host.exited(5) == 0
    assert (host.workspace / "count").read_text() == "1"


def test_resident_status_written_twice_is_not_the_next_calls(tmp_path: Path, hosts: list[Host]) -> None:
    host = resident_host(tmp_path, hosts)
    assert host.call(b"twice").status == 0
    assert host.call(b"report 003").status == 3  # its own line, not the stale 005
    assert host.close() == 0


def test_resident_tool_that_closes_its_call_fd_ends_the_session_at_once(tmp_path: Path, hosts: list[Host]) -> None:
    host = resident_host(tmp_path, hosts)
    started = time.monotonic()
    got = host.call(b"close")
    assert (got.status, got.over) == (128 + 9, True)  # killed: it can no longer end a call
    assert time.monotonic() - started < 5  # not at the call's timeout
    assert host.exited(10) == 128 + 9
