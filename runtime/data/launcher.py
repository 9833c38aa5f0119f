"""toolcell warm-pool launcher: runs inside a pooled sandbox, in front of the tool.

Started with the tool's command as its arguments, it spawns the tool at once (so the interpreter and
the tool's imports are warm), with the tool's stdin a pipe that only this launcher holds, and then
waits for its claim. It holds no arguments and no secrets until it is claimed. The claim is one JSON
line::

    {"nonce": "<32 hex>", "arguments": "<the tool's arguments as JSON text>"}

It writes the arguments to the tool's stdin and closes it, waits for the tool, reports the tool's
exit status (128+N for signal N), and exits with it. SIGTERM/SIGINT/SIGHUP are forwarded to the tool.
This process is made non-dumpable before the tool exists, so the tool cannot read its memory or fds.

``--defer`` (tools granted secrets): the tool is spawned only at the claim, whose ``env`` is added to its
environment and whose ``files`` are written first (0400, into the empty tmpfs the sandbox has at each
file's directory): nothing secret is in the sandbox before the claim.

Two transports (``runtime/backends/channel.py``, ``attach.py``):

``--channel=<socket>`` first: connect three times to the supervisor's socket (tags c, o, e), wait for
    "g" on control, then spawn the tool with the o and e connections as its stdout and stderr. The
    claim arrives on control; the status goes back on control as ``NNN\\n``; after a 0 the launcher
    waits for the supervisor to close control before it exits.
otherwise: the claim arrives on stdin; the status is a trailer
    ``\\x1etoolcell-end:<nonce>:<NNN>\\n`` on stdout and on stderr (each stream is complete once its
    trailer arrives); after a 0 the launcher waits for EOF on stdin before it exits. The nonce arrives
    after the tool was spawned, so the tool cannot forge an end.

Standard library only; kept small: it is passed with ``python3 -c``.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess  # nosec B404
import sys
import typing


def connect(path: str, tag: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(tag)
    return sock


def spawn(command: list[str], channel: list[socket.socket] | None, env: dict[str, str] | None
          ) -> subprocess.Popen[bytes]:
    if channel is None:
        return subprocess.Popen(command, stdin=subprocess.PIPE, close_fds=True, env=env)  # noqa: S603 # nosec B603
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=channel[1].fileno(),  # noqa: S603 # nosec B603
                            stderr=channel[2].fileno(), close_fds=True, env=env)


def main() -> int:
    command = sys.argv[1:]
    channel = None
    defer = bool(command) and command[0] == "--defer"
    if defer:
        command.pop(0)
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
    claims: typing.BinaryIO = channel[0].makefile("rb") if channel is not None else sys.stdin.buffer
    children: list[subprocess.Popen[bytes]] = []
    if not defer:
        children.append(spawn(command, channel, None))

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
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
        return 125
    if defer:  # granted secrets arrive with the claim: the tool starts now, with them in its environment
        children.append(spawn(command, channel, {**os.environ, **extra}))
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
    code = child.wait()
    status = 128 - code if code < 0 else code
    if channel is not None:
        with contextlib.suppress(OSError):
            channel[0].sendall(f"{status:03d}\n".encode())
            if status == 0:  # decided: exit (a burst of engine work) only when the supervisor lets go
                channel[0].recv(1)
        return status
    trailer = f"\x1etoolcell-end:{nonce}:{status:03d}\n".encode()
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.write(fd, trailer)
    if status == 0:  # decided: exit (a burst of engine work) only when the supervisor lets go
        with contextlib.suppress(OSError):
            claims.read()
    return status


if __name__ == "__main__":
    sys.exit(main())
