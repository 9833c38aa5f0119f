"""A pooled sandbox's private channel: three Unix-socket connections straight to the supervisor.

Why: through the engine's attach relay, a warm call's bytes cross dockerd and containerd-shim (two
copies each way, and their CPU on a 2-core host) for the claim, for the output and again for the
launcher's trailers. Over the channel the tool writes its output into the supervisor's socket itself.

    control   supervisor -> launcher: "g" (go), then the claim envelope;
              launcher -> supervisor: "<exit status, 3 digits>\\n" once the tool has exited; after a clean
              exit the launcher stays until we close control (the sandbox's removal, off the call's path)
    stdout    the tool's fd 1 itself (nobody copies it)
    stderr    the tool's fd 2 itself

Set-up, before the tool exists: the supervisor listens on ``c.sock`` in a fresh directory of its own,
which the engine bind-mounts read-only into the sandbox at ``CHANNEL_DIR``. The launcher connects three
times, tagging each connection with one byte (``c``, ``o``, ``e``). The supervisor accepts exactly
three, closes and unlinks the listener, removes the directory, and only then sends "g": the launcher
spawns the tool after "g", so nothing the tool runs can open a fourth connection (there is nothing
left to connect to) and the control connection is the launcher's alone (fds are not inherited, the
launcher is not dumpable). Output written before the tool's exit is in our receive buffers when the
status arrives (AF_UNIX writes are queued on the peer synchronously), so the streams are complete then.

Works where the engine and the supervisor share a filesystem and the OCI runtime can connect to a
host socket (runc). Elsewhere (runsc, a supervisor in a container) the attach transport is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from toolcell.backends.attach import RECV_BYTES, SandboxStream
from toolcell.backends.base import StreamName
from toolcell.errors import BackendError
from toolcell.safepath import private_dir

__all__ = ["ACCEPT_TIMEOUT_S", "CHANNEL_DIR", "ChannelListener", "ChannelStream"]

CHANNEL_DIR: Final = "/run/toolcell-channel"
_SOCKET: Final = "c.sock"
_TAGS: Final = {b"c": "control", b"o": "stdout", b"e": "stderr"}
_STATUS: Final = re.compile(rb"([0-9]{3})\n")
# The longest a pooled sandbox's launcher may take to connect its channel.
ACCEPT_TIMEOUT_S: Final = 20.0


class ChannelListener:
    """One sandbox's listener, in a fresh directory under ``base`` (a directory only we can enter)."""

    def __init__(self, base: Path) -> None:
        # The one gate on the host side: a real directory of ours (no symlink, nobody else's, no group or
        # other write bit; ``safepath.private_dir``), set to 0700 so only the supervisor's uid enters.
        base = private_dir(base, chmod=0o700, key="engine.pool_channel")
        self.directory = base / secrets.token_hex(8)
        # 0755 / 0666: the sandbox's (unknown, non-root) uid must reach and connect to the socket. Nobody
        # else can: the directory is reachable only through ``base`` (0700) or the sandbox's own mount.
        self.directory.mkdir(mode=0o755)
        os.chmod(self.directory, 0o755)  # noqa: S103 # nosec B103 - behind the private base directory (see above)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(str(self.directory / _SOCKET))
            os.chmod(self.directory / _SOCKET, 0o666)  # noqa: S103 # nosec B103 - behind the private base directory
            self._sock.listen(3)
            self._sock.setblocking(False)
        except OSError:
            self.close()
            raise

    async def accept(self, timeout_s: float = ACCEPT_TIMEOUT_S) -> dict[str, socket.socket]:
        """The launcher's three connections, by role; then the listener is gone and the launcher may go."""
        loop = asyncio.get_running_loop()
        found: dict[str, socket.socket] = {}
        try:
            async with asyncio.timeout(timeout_s):
                while len(found) < len(_TAGS):
                    conn, _ = await loop.sock_accept(self._sock)
                    conn.setblocking(False)
                    role = _TAGS.get(await loop.sock_recv(conn, 1))
                    if role is None or role in found:
                        conn.close()
                        raise BackendError("the pooled sandbox's channel got an unexpected connection")
                    found[role] = conn
        except BaseException as exc:
            for conn in found.values():
                conn.close()
            if isinstance(exc, TimeoutError):
                raise BackendError(f"the pooled sandbox's launcher did not connect within {timeout_s:g}s") from exc
            raise
        finally:
            self.close()
        found["control"].send(b"g")
        return found

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    @staticmethod
    def sweep(base: Path, older_than_s: float = 10 * ACCEPT_TIMEOUT_S) -> int:
        """Remove listener directories a killed supervisor left behind; returns how many.

        A live one exists only between its creation and its launcher's connections (at most
        ``ACCEPT_TIMEOUT_S``), so anything much older is a leftover, whichever supervisor made it.
        """
        removed = 0
        cutoff = time.time() - older_than_s
        with contextlib.suppress(FileNotFoundError):
            base = private_dir(base, create=False, key="engine.pool_channel")  # never sweep another's dir
            for entry in base.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_dir() and not entry.is_symlink() and entry.stat().st_mtime < cutoff:
                        shutil.rmtree(entry, ignore_errors=True)
                        removed += 1
        return removed


class ChannelStream(SandboxStream):
    """The three connections of one claimed (or waiting) pooled sandbox."""

    def __init__(self, conns: dict[str, socket.socket], on_end: Callable[[], None] = lambda: None) -> None:
        self._control = conns["control"]
        self._outputs: dict[StreamName, socket.socket] = {"stdout": conns["stdout"], "stderr": conns["stderr"]}
        super().__init__(self._control, [self._control, *self._outputs.values()], on_end)
        self._open: set[StreamName] = set(self._outputs)  # output sockets not yet at EOF
        self._status = b""
        self._claimed = False
        self._loop.add_reader(self._control.fileno(), self._on_control)
        self._resume()

    def expect_trailer(self, nonce: str, judge: Callable[[int], int | None]) -> None:
        super().expect_trailer(nonce, judge)
        self._claimed = True

    def _resume(self) -> None:
        if not self._reading:
            for name in self._open:
                self._loop.add_reader(self._outputs[name].fileno(), self._on_output, name)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            for name in self._open:
                self._loop.remove_reader(self._outputs[name].fileno())
            self._reading = False
        if self._ended:
            self._loop.remove_reader(self._control.fileno())

    def _on_output(self, name: StreamName) -> None:
        try:
            data = self._outputs[name].recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        if not data:  # the tool (and whatever it started) closed this stream; the end comes on control
            self._loop.remove_reader(self._outputs[name].fileno())
            self._open.discard(name)
            return
        self._put(name, data)

    def _on_control(self) -> None:
        try:
            data = self._control.recv(16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        self._status += data
        match = _STATUS.fullmatch(self._status)
        if data and not match and len(self._status) < 4:
            return  # the status line is still arriving
        if not (match and self._claimed):  # launcher gone, or speaking out of turn: the engine decides
            self._finish_outputs()
            self._end_at_trailer(None)
            return
        self._finish_outputs()
        self._end_at_trailer(int(match.group(1)))

    def _finish_outputs(self) -> None:
        """Everything the tool wrote before it exited is already queued on our sockets: take it all."""
        for name in sorted(self._open):
            sock = self._outputs[name]
            with contextlib.suppress(OSError):
                while data := sock.recv(RECV_BYTES):
                    self._queue.put_nowait((name, data))  # bounded by the socket buffer, not by the queue
