"""toolcell session host: runs inside a session's sandbox, in front of the tool, for all of its calls.

A session is one sandbox leased to one principal across several calls (issue 18). This host is the
sandbox's main process. It waits for claims, one JSON line each on stdin::

    {"nonce": "<32 hex>", "arguments": "<the tool's stdin>", "env": {..}, "files": {..},
     "inputs": [{"path": "rel/path", "data": "<base64>"}], "collect": true}

(``env``/``files``: the tool's granted secrets, first claim only, before the tool exists.) Per claim it
writes the input files into the workspace (``ws_write_inputs``, prepended to this source), runs the call,
collects the output directory when asked (``ws_collect``) as one block on stdout::

    \\x1etoolcell-files:<nonce>:<payload length, 10 digits>\\n<payload>

and then ends the call with the trailer ``\\x1etoolcell-end:<nonce>:<NNN>\\n`` on stdout and on stderr.
The nonce arrives with the claim and is never given to the tool, so nothing the tool prints can end its
call early or forge its files.

Two kinds of tools:

- exec (default): the tool's command is spawned fresh for each call (its stdin the arguments, then EOF)
  in the same sandbox: what it leaves in the scratch space is there for the next call.
- ``--resident`` (a REPL, the MCP driver): spawned once, at the first claim; each call's stdin line is
  written to its stdin, which stays open; the tool writes ``NNN\\n`` to ``TOOLCELL_CALL_FD`` once the
  call's output is written. If it exits, its exit status is the call's, and the session is over.

EOF on stdin ends the session: the tool is stopped (its stdin closed, 1 s, SIGKILL) and the host exits 0.
SIGTERM/SIGINT/SIGHUP are passed on to the tool; the host then stops after the call that runs, or at once.
``--relay`` (gVisor): the tool's stdout/stderr are pipes this host copies out whole (see launcher.py).
This process is made non-dumpable before any tool exists, so a tool cannot read the nonces from its memory.

Standard library only: passed with ``python3 -I -S -c``.
"""
import array
import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess  # nosec B404
import sys
import termios
import threading
import typing

SH_CHUNK = 65536
SH_MAX_CLAIM = 64 << 20  # one claim line: the arguments and the input files (base64), bounded by the supervisor
SH_GRACE_S = 1.0
SH_REFUSED = 125
SH_OVER = 500  # added to a call's status in its trailer when the session ends with it


def sh_write_all(fd: int, data: bytes) -> bool:
    """Write every byte, over short writes; False once ``fd`` is gone."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except (BlockingIOError, InterruptedError):
            select.select([], [fd], [])
        except OSError:
            return False
    return True


class ShRelay(threading.Thread):
    """Copy the tool's pipes to our stdout/stderr; ``drain()`` copies what they hold now (a call's end)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pipes: dict[int, int] = {}
        self.ends: list[int] = []
        for target in (1, 2):
            r, w = os.pipe()
            self.pipes[r] = target
            self.ends.append(w)
        self.wake_r, self.wake_w = os.pipe()
        self.drained = threading.Event()
        self.lock = threading.Lock()

    def copy(self, r: int, size: int) -> int:
        data = os.read(r, size)
        if data:
            sh_write_all(self.pipes[r], data)
        return len(data)

    def drain(self) -> None:
        """Every byte the tool wrote before now is in the pipes (a pipe write completes or blocks): copy it."""
        self.drained.clear()
        os.write(self.wake_w, b"d")
        self.drained.wait()

    def run(self) -> None:
        open_pipes = list(self.pipes)
        while True:
            ready, _, _ = select.select([*open_pipes, self.wake_r], [], [])
            for r in [r for r in ready if r != self.wake_r]:
                if not self.copy(r, SH_CHUNK):
                    open_pipes.remove(r)
            if self.wake_r in ready:
                os.read(self.wake_r, 1)
                for r in open_pipes:
                    queued = array.array("i", [0])
                    fcntl.ioctl(r, termios.FIONREAD, queued)
                    left = queued[0]
                    while left > 0:
                        copied = self.copy(r, min(left, SH_CHUNK))
                        left = left - copied if copied else 0
                self.drained.set()


class ShStop(BaseException):
    """A signal while waiting for a claim: stop now (nothing runs that could be cut in half)."""


class ShHost:
    def __init__(self, command: list[str], resident: bool, relay: bool, workspace: str, outputs: str,
                 caps: tuple[int, int, int]) -> None:
        self.command = command
        self.resident = resident
        self.relay = ShRelay() if relay else None
        if self.relay is not None:
            self.relay.start()
        self.workspace = workspace
        self.outputs = outputs
        self.caps = caps
        self.env: dict[str, str] | None = None  # the first claim's environment, for every spawn
        self.tool: subprocess.Popen[bytes] | None = None  # resident only
        self.call_r = -1
        self.calls_buffer = b""
        self.current: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.idle = False  # waiting for a claim: a signal ends the host at once

    # -- spawning ------------------------------------------------------------------------------------

    def spawn(self, extra_fds: tuple[int, ...] = (), extra_env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        out: int | None = None
        err: int | None = None
        if self.relay is not None:
            out, err = self.relay.ends
        env = {**(self.env or os.environ), **(extra_env or {})}
        return subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=out,  # noqa: S603 # nosec B603
                                stderr=err, close_fds=True, env=env, pass_fds=extra_fds,
                                cwd=self.workspace if self.workspace and os.path.isdir(self.workspace) else None)

    def first_claim(self, envelope: dict[str, typing.Any]) -> None:
        """Secrets come with the first claim only, before any tool exists."""
        extra = {str(k): str(v) for k, v in dict(envelope.get("env") or {}).items()}
        self.env = {**os.environ, **extra}
        for path, content in dict(envelope.get("files") or {}).items():
            fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
            with os.fdopen(fd, "w") as fh:
                fh.write(str(content))
        if self.resident:
            call_r, call_w = os.pipe()
            self.tool = self.spawn((call_w,), {"TOOLCELL_CALL_FD": str(call_w)})
            os.close(call_w)
            self.call_r = call_r

    # -- one call ------------------------------------------------------------------------------------

    def run_exec(self, arguments: bytes) -> int:
        try:
            child = self.current = self.spawn()
        except OSError as exc:  # no such command, or no process left to fork (the tool's pids limit): this
            # call fails, the session is still served (a traceback and a dead host would end it)
            sh_write_all(2, f"toolcell: cannot start the tool: {os.strerror(exc.errno or 0)}\n".encode())
            return 127 if isinstance(exc, FileNotFoundError) else 126
        stdin = child.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):  # the tool may exit without reading its input
                stdin.write(arguments)
                stdin.close()
        status = sh_exit_status(child.wait())
        self.current = None
        return status

    def run_resident(self, arguments: bytes) -> tuple[int, bool]:
        """(the call's status, whether the tool is gone)."""
        tool = self.tool
        if tool is None or tool.stdin is None:
            return SH_REFUSED, True
        line = arguments if arguments.endswith(b"\n") else arguments + b"\n"
        # A status line the tool wrote out of turn (twice for one call, or between calls) is not this call's.
        self.calls_buffer = b""
        while select.select([self.call_r], [], [], 0)[0]:
            if not os.read(self.call_r, 4096):
                break
        try:
            tool.stdin.write(line)
            tool.stdin.flush()
        except OSError:
            return sh_exit_status(tool.wait()), True
        while True:
            newline = self.calls_buffer.find(b"\n")
            if newline >= 0:
                reported, self.calls_buffer = self.calls_buffer[:newline], self.calls_buffer[newline + 1:]
                try:
                    return max(0, min(255, int(reported.strip() or b"0"))), False
                except ValueError:
                    return 1, False
            ready, _, _ = select.select([self.call_r], [], [], 0.25)
            if ready:
                data = os.read(self.call_r, 64)
                if data:
                    self.calls_buffer = (self.calls_buffer + data)[-64:]
                    continue
            if tool.poll() is not None:
                return sh_exit_status(tool.returncode), True
            if ready:  # EOF on the call fd while the tool lives: it can no longer say a call is done, so the
                tool.kill()  # session cannot go on; its end now, not at the call's timeout
                return sh_exit_status(tool.wait()), True

    def next_claim(self, claims: typing.BinaryIO) -> bytes:
        """The next claim line; b"" at EOF, or when a signal asks the host to stop."""
        try:
            self.idle = True
            if self.stopping:  # the signal came before ``idle`` was set
                return b""
            return claims.readline(SH_MAX_CLAIM + 1)
        except ShStop:
            return b""
        finally:
            self.idle = False

    def serve(self, claims: typing.BinaryIO) -> int:
        while not self.stopping:
            line = self.next_claim(claims)
            if not line:
                return self.stop()
            try:
                envelope = json.loads(line)
                nonce = str(envelope["nonce"])
                if len(nonce) != 32 or any(c not in "0123456789abcdef" for c in nonce):
                    raise ValueError("bad nonce")
                arguments = str(envelope["arguments"]).encode("utf-8", "surrogateescape")
                if self.env is None:
                    self.first_claim(envelope)
                elif envelope.get("env") or envelope.get("files"):
                    raise ValueError("secrets come with the first claim only")
            except (ValueError, KeyError, TypeError, OSError):
                self.stop()
                return SH_REFUSED
            ended = False
            try:
                ws_write_inputs(self.workspace, list(envelope.get("inputs") or []))  # type: ignore[name-defined] # noqa: F821
            except (ValueError, OSError) as exc:
                sh_write_all(2, f"toolcell: input files refused: {str(exc)[:200]}\n".encode())
                status = SH_REFUSED
            else:
                if self.resident:
                    status, ended = self.run_resident(arguments)
                else:
                    status = self.run_exec(arguments)
            if self.relay is not None:
                self.relay.drain()
            if envelope.get("collect") and self.outputs:
                try:
                    payload = ws_collect(self.outputs, *self.caps)  # type: ignore[name-defined] # noqa: F821
                except Exception:
                    payload = b'{"files": [], "skipped": {"error": 1}, "truncated": true}'
                sh_write_all(1, b"\x1etoolcell-files:%s:%010d\n" % (nonce.encode(), len(payload)) + payload)
            # The session is over (the resident tool is gone): the status says so, +500, before the host exits.
            trailer = f"\x1etoolcell-end:{nonce}:{status + (SH_OVER if ended else 0):03d}\n".encode()
            for fd in (1, 2):
                sh_write_all(fd, trailer)
            if ended:
                return status
        return self.stop()

    def stop(self) -> int:
        for child in (self.tool, self.current):
            if child is None or child.poll() is not None:
                continue
            with contextlib.suppress(OSError):
                if child.stdin is not None:
                    child.stdin.close()
            try:
                child.wait(SH_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        return 0

    def on_signal(self, signum: int, frame: object) -> None:
        """Pass the signal on to the tool; stop after the call that runs, or now if none does (the handler
        would otherwise swallow it while the host waits for a claim)."""
        self.stopping = True
        for child in (self.tool, self.current):
            if child is not None and child.poll() is None:
                child.send_signal(signum)
        if self.idle:
            raise ShStop()


def sh_exit_status(code: int) -> int:
    return 128 - code if code < 0 else min(code, 255)


def sh_main() -> int:
    argv = sys.argv[1:]
    options: dict[str, str] = {}
    while argv and argv[0].startswith("--"):
        flag = argv.pop(0)
        if flag == "--":
            break
        name, _, value = flag[2:].partition("=")
        options[name] = value
    caps = tuple(int(v) for v in options.get("caps", "64,8388608,4194304").split(","))
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE=0: no /proc/<pid>/mem or fd for the tool
    except Exception:  # noqa: S110 # nosec B110 - best effort
        pass
    workspace = options.get("workspace", "")
    if workspace:
        os.makedirs(workspace, mode=0o700, exist_ok=True)
    host = ShHost(argv, "resident" in options, "relay" in options, workspace,
                  options.get("outputs", ""), (caps[0], caps[1], caps[2]))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, host.on_signal)
    ready_fd = int(options.get("ready-fd") or -1)
    if ready_fd >= 0:  # waiting for the first claim now: tell the supervisor, then let go
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"r")
            os.close(ready_fd)
    try:
        return host.serve(sys.stdin.buffer)
    except ShStop:  # raised in the instant between a claim's read and ``idle`` cleared: nothing runs yet
        return host.stop()


if __name__ == "__main__":
    sys.exit(sh_main())
