"""toolcell warm-pool launcher: runs inside a pooled sandbox, in front of the tool.

Started with the tool's command as its arguments, it spawns the tool at once (so the interpreter and
the tool's imports are warm), with the tool's stdin a pipe that only this launcher holds, and then
waits for its claim. It holds no arguments and no secrets until it is claimed. The claim is one JSON
line::

    {"nonce": "<32 hex>", "arguments": "<the tool's arguments as JSON text>"}

It writes the arguments to the tool's stdin and closes it, waits for the tool, reports the tool's
exit status (128+N for signal N), and exits with it. SIGTERM/SIGINT/SIGHUP are forwarded to the tool.
This process is made non-dumpable before the tool exists, so the tool cannot read its memory or fds.

``--defer`` (tools granted secrets, pooled or cold: a cold sandbox is claimed at its start): the tool is
spawned only at the claim, whose ``env`` is added to its environment and whose ``files`` are written
first (0400, into the empty tmpfs the sandbox has at each file's directory): nothing secret is in the
sandbox before the claim, and nothing secret is ever a host file or part of the engine's record.

Two transports (``runtime/backends/channel.py``, ``attach.py``):

``--channel=<socket>`` first: connect three times to the supervisor's socket (tags c, o, e), wait for
    "g" on control, then spawn the tool with the o and e connections as its stdout and stderr. The
    claim arrives on control; the status goes back on control as ``NNN\\n``; after a 0 the launcher
    waits for the supervisor to close control before it exits.
otherwise: the claim arrives on stdin; the status is a trailer
    ``\\x1etoolcell-end:<nonce>:<NNN>\\n`` on stdout and on stderr (each stream is complete once its
    trailer arrives); after a 0 the launcher waits for EOF on stdin before it exits. The nonce arrives
    after the tool was spawned, so the tool cannot forge an end.

``--relay`` (attach transport, gVisor): the tool's stdout and stderr are pipes inside the sandbox that
    this launcher copies to its own, each write completed however many calls it takes. gVisor's donated
    host stdio answers a large write(2) with a short count (65,536 of 200,000 bytes) that tools (Python's
    ``sys.stdout`` among them) take as complete; a pipe inside gVisor blocks until it took everything,
    as on Linux. When the tool exits, what it wrote and the pipes still hold (FIONREAD) is copied, then
    the copy stops: a daemon that keeps the pipe open cannot hold the run open.
``--cold`` (with ``--relay``, an unpooled sandbox): no claim; the tool reads this launcher's stdin and the
    launcher exits with the tool's status once its output is copied.
``--tool-ready`` (not with ``--defer``): the tool is spawned with ``TOOLCELL_READY_FD`` naming a pipe it
    writes one byte to once it is ready (the MCP driver: its server initialized); the launcher waits for that
    byte (or the tool's end, at most 120 s) before it counts as waiting for its claim, and on the channel
    transport then sends "r" on control.
``--ready-fd=N``: once waiting for the claim (the tool spawned, unless deferred), write one byte to the
    inherited descriptor N and close it, so the supervisor counts the sandbox ready only then. The tool never
    holds it (spawned with close_fds).

Standard library only; kept small: it is passed with ``python3 -c``.
"""
import array
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess  # nosec B404
import sys
import termios
import threading
import typing

CHUNK = 65536
RELAY_FAILED = 125
TOOL_READY_TIMEOUT_S = 120.0


def write_all(fd: int, data: bytes) -> bool:
    """Write every byte, over short writes (gVisor's host stdio makes them); False once ``fd`` is gone."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except (BlockingIOError, InterruptedError):
            select.select([], [fd], [])
        except OSError:
            return False
    return True


class Relay(threading.Thread):
    """Copy the tool's pipes to our stdout/stderr until ``finish()``: then what they hold, and stop."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pipes: dict[int, int] = {}  # read end -> our fd
        self.ends: list[int] = []  # write ends, for the tool
        for target in (1, 2):
            r, w = os.pipe()
            self.pipes[r] = target
            self.ends.append(w)
        self.wake_r, self.wake_w = os.pipe()
        self.live = {t: True for t in (1, 2)}  # False once our side is gone: read and drop

    def finish(self, status: int) -> int:
        """The tool exited with ``status``: every byte it wrote is in the pipes now (a pipe write completes
        or blocks). Copy that, then the status to report: a clean exit whose output we could not deliver
        whole is not reported clean (125)."""
        os.write(self.wake_w, b"x")
        self.join()
        if status == 0 and not all(self.live.values()):
            write_all(2, b"toolcell launcher: the tool's output could not be delivered whole\n")
            return RELAY_FAILED
        return status

    def copy(self, r: int, size: int) -> int:
        """One read of up to ``size`` bytes, copied out; how many (0 at EOF)."""
        data = os.read(r, size)
        target = self.pipes[r]
        if data and self.live[target]:
            self.live[target] = write_all(target, data)
        return len(data)

    def run(self) -> None:
        open_pipes = list(self.pipes)
        while open_pipes:
            ready, _, _ = select.select([*open_pipes, self.wake_r], [], [])
            if self.wake_r in ready:
                break
            for r in ready:
                if not self.copy(r, CHUNK):
                    open_pipes.remove(r)
        for r in open_pipes:  # the tool is gone: copy what the pipe holds now, no more
            queued = array.array("i", [0])
            fcntl.ioctl(r, termios.FIONREAD, queued)
            left = queued[0]
            while left > 0:
                copied = self.copy(r, min(left, CHUNK))
                left = left - copied if copied else 0


def connect(path: str, tag: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(tag)
    return sock


def spawn(command: list[str], channel: list[socket.socket] | None, env: dict[str, str] | None,
          relay: Relay | None = None, stdin: int = subprocess.PIPE,
          pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    out: int | None = None
    err: int | None = None
    if channel is not None:
        out, err = channel[1].fileno(), channel[2].fileno()
    elif relay is not None:
        out, err = relay.ends
    child = subprocess.Popen(command, stdin=stdin, stdout=out, stderr=err,  # noqa: S603 # nosec B603
                             close_fds=True, env=env, pass_fds=pass_fds)
    if relay is not None:  # only the tool holds the write ends: EOF when it and its children are done
        for fd in relay.ends:
            os.close(fd)
        relay.start()
    return child


def exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def forward_signals(children: list[subprocess.Popen[bytes]]) -> None:
    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)


def run_cold(command: list[str]) -> int:
    """``--cold --relay``: run the tool on our stdin, copy its output, exit with its status."""
    relay = Relay()
    children = [spawn(command, None, None, relay, stdin=0)]
    forward_signals(children)
    return relay.finish(exit_status(children[0].wait()))


def main() -> int:
    command = sys.argv[1:]
    channel = None
    flags = set()
    while command and command[0] in ("--defer", "--relay", "--cold", "--tool-ready"):
        flags.add(command.pop(0))
    ready_fd = -1
    if command and command[0].startswith("--ready-fd="):
        ready_fd = int(command.pop(0)[len("--ready-fd="):])
    defer, relay = "--defer" in flags, Relay() if "--relay" in flags else None
    if command and command[0].startswith("--channel="):
        path = command.pop(0)[len("--channel="):]
        channel = [connect(path, tag) for tag in (b"c", b"o", b"e")]
        if channel[0].recv(1) != b"g":
            return 125
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE=0: no /proc/<pid>/mem or fd for the tool
    except Exception:  # noqa: S110 # nosec B110 - best effort; the nonce only guards an early end
        pass
    if "--cold" in flags:
        return run_cold(command)
    claims: typing.BinaryIO = channel[0].makefile("rb") if channel is not None else sys.stdin.buffer
    children: list[subprocess.Popen[bytes]] = []
    if not defer and "--tool-ready" in flags:
        # The tool says when it is ready (an MCP server initialized): one byte, or EOF if it ends first.
        ready_r, ready_w = os.pipe()
        children.append(spawn(command, channel, {**os.environ, "TOOLCELL_READY_FD": str(ready_w)}, relay,
                              pass_fds=(ready_w,)))
        os.close(ready_w)
        select.select([ready_r], [], [], TOOL_READY_TIMEOUT_S)
        os.close(ready_r)
        if channel is not None:
            with contextlib.suppress(OSError):
                channel[0].sendall(b"r")
    elif not defer:
        children.append(spawn(command, channel, None, relay))
    forward_signals(children)
    if ready_fd >= 0:  # waiting for the claim now: tell the supervisor, then let go of the descriptor
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"r")
            os.close(ready_fd)
    line = claims.readline()
    try:
        envelope = json.loads(line)
        nonce = str(envelope["nonce"])
        arguments = str(envelope["arguments"]).encode()
        extra = {str(k): str(v) for k, v in dict(envelope.get("env") or {}).items()}
        files = {str(k): str(v) for k, v in dict(envelope.get("files") or {}).items()}
        if (extra or files) and not defer:
            raise ValueError("the tool is already running: its secrets must come before it")
        for path, content in files.items():  # into the sandbox's own empty tmpfs at the file's directory
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
            with os.fdopen(fd, "w") as fh:
                fh.write(content)
    except (ValueError, KeyError, TypeError, OSError):
        for child in children:
            child.kill()
            child.wait()
        if relay is not None and children:
            relay.finish(125)
        return 125
    if defer:  # granted secrets arrive with the claim: the tool starts now, with them in its environment
        children.append(spawn(command, channel, {**os.environ, **extra}, relay))
        del extra, files, envelope, line
    if channel is not None:
        channel[1].close()
        channel[2].close()
    child = children[0]
    stdin = child.stdin
    if stdin is not None:
        with contextlib.suppress(OSError):  # the tool may exit without reading its input
            stdin.write(arguments)
            stdin.close()
    status = exit_status(child.wait())
    if relay is not None:  # the trailer comes after the last byte of output
        status = relay.finish(status)
    if channel is not None:
        with contextlib.suppress(OSError):
            channel[0].sendall(f"{status:03d}\n".encode())
            if status == 0:  # decided: exit (a burst of engine work) only when the supervisor lets go
                channel[0].recv(1)
        return status
    trailer = f"\x1etoolcell-end:{nonce}:{status:03d}\n".encode()
    for fd in (1, 2):
        write_all(fd, trailer)
    if status == 0:  # decided: exit (a burst of engine work) only when the supervisor lets go
        with contextlib.suppress(OSError):
            claims.read()
    return status


if __name__ == "__main__":
    sys.exit(main())
