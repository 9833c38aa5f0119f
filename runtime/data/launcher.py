"""toolcell warm-pool launcher: runs inside a pooled sandbox, in front of the tool.

Started with the tool's command as its arguments, it spawns the tool at once (so the interpreter and
the tool's imports are warm), with the tool's stdin a pipe that only this launcher holds, and then
blocks on its own stdin. It holds no arguments and no secrets until it is claimed. The claim is one
JSON line on its stdin::

    {"nonce": "<32 hex>", "arguments": "<the tool's arguments as JSON text>"}

It writes the arguments to the tool's stdin and closes it, waits for the tool, then writes one
trailer ``\\x1etoolcell-end:<nonce>:<exit status, 3 digits>\\n`` on stdout and on stderr (each stream
is complete once its trailer arrives, long before the engine has processed the container's exit),
and exits with the tool's status (128+N for signal N). SIGTERM/SIGINT/SIGHUP are forwarded to the
tool. The nonce arrives after the tool was spawned and this process is made non-dumpable, so the tool
cannot read it and forge an end. Standard library only; kept small: it is passed with ``python3 -c``.
"""
import contextlib
import json
import os
import signal
import subprocess  # nosec B404
import sys


def main() -> int:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE=0: no /proc/<pid>/mem for the tool
    except Exception:  # noqa: S110 # nosec B110 - best effort; the nonce only guards an early end
        pass
    child = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, close_fds=True)  # noqa: S603 # nosec B603

    def forward(signum: int, frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    line = sys.stdin.buffer.readline()
    try:
        envelope = json.loads(line)
        nonce = str(envelope["nonce"])
        arguments = str(envelope["arguments"]).encode()
    except (ValueError, KeyError, TypeError):
        child.kill()
        child.wait()
        return 125
    stdin = child.stdin
    if stdin is not None:
        with contextlib.suppress(OSError):  # the tool may exit without reading its input
            stdin.write(arguments)
            stdin.close()
    code = child.wait()
    status = 128 - code if code < 0 else code
    trailer = f"\x1etoolcell-end:{nonce}:{status:03d}\n".encode()
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.write(fd, trailer)
    return status


if __name__ == "__main__":
    sys.exit(main())
