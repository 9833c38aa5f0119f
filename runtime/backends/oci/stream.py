"""A sandbox's stdio as three host pipes, driven by the event loop (``add_reader``/``add_writer``).

``runc run`` without a terminal hands its own stdin, stdout and stderr to the container's init, so the
tool reads and writes these pipes itself: no relay, no copy on the way. Pipes rather than sockets:
a tool may ``open("/dev/stdout")``, which fails on a socket.

Bounded as ``attach.SandboxStream``: at most ``QUEUE_CHUNKS`` chunks of ``RECV_BYTES`` wait for the
consumer; then the pipes are no longer read, they fill, and the tool's writes block. What one sandbox
can make the supervisor hold is ~1 MiB, however much it prints.

The streams end at EOF on both pipes (every holder of their write ends gone: the tool, anything it
forked, and ``runc run`` itself), or, for a launcher-fronted run, at the launcher's trailer on both
(``expect_trailer``); the pipes then stay open until ``close()`` so a launcher that reported a clean
exit waits for EOF on its stdin before exiting, off the call's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Final

from toolcell.backends.attach import QUEUE_CHUNKS, RECV_BYTES
from toolcell.backends.base import StreamName
from toolcell.backends.launcher import TrailerScanner

__all__ = ["PipeStream"]


class _Eof:
    """End of output."""


_EOF: Final = _Eof()
_Item = tuple[StreamName, bytes] | _Eof


class PipeStream:
    """Our ends of one sandbox's stdio pipes: ``stdin`` written, ``stdout``/``stderr`` read (fds we own)."""

    def __init__(self, stdin: int, stdout: int, stderr: int, on_end: Callable[[], None] = lambda: None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stdin = stdin
        self._outs: dict[int, StreamName] = {stdout: "stdout", stderr: "stderr"}
        for fd in (stdin, stdout, stderr):
            os.set_blocking(fd, False)
        self._open: set[int] = {stdout, stderr}  # read ends not yet at EOF
        self._on_end = on_end
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._reading = False
        self._ended = False
        self._closed = False
        self._pending: memoryview | None = None
        self._half_close = True
        self._scanners: dict[StreamName, TrailerScanner] | None = None
        self._judge: Callable[[int], int | None] = lambda status: status
        # The launcher's exit status as judged by ``expect_trailer``'s caller, or None: ask the process.
        self.trailer: asyncio.Future[int | None] = self._loop.create_future()
        self._resume()

    @property
    def ended(self) -> bool:
        return self._ended

    def expect_trailer(self, nonce: str, judge: Callable[[int], int | None]) -> None:
        """From now on, end at this claim's trailer; ``judge`` maps the launcher's status to the result."""
        self._judge = judge
        self._scanners = {"stdout": TrailerScanner(nonce), "stderr": TrailerScanner(nonce)}

    def send(self, data: bytes, *, half_close: bool = True) -> None:
        """Write ``data`` to stdin, then close it (EOF) unless ``half_close`` is False (a claim: EOF is
        what tells a launcher that decided its run to exit). A tool that exits unread is not an error."""
        if self._closed:
            return
        if self._pending is not None:  # a session's next claim behind the last one (never with an EOF)
            if not half_close and not self._half_close:
                self._pending = memoryview(bytes(self._pending) + data)
            return
        self._half_close = half_close
        self._pending = memoryview(data)
        self._on_writable()
        if self._pending is not None:
            self._loop.add_writer(self._stdin, self._on_writable)

    async def chunks(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        """Output as it arrives, until the end."""
        while True:
            item = await self._queue.get()
            if isinstance(item, _Eof):
                return
            if not self._reading and not self._ended and self._queue.qsize() < QUEUE_CHUNKS // 2:
                self._resume()
            yield item

    def close(self) -> None:
        """Stop reading and writing now and close every pipe (the sandbox is being removed)."""
        self._finish(flush=False)
        self._close_fds()

    # -- internals ----------------------------------------------------------------------------------

    def _resume(self) -> None:
        if not self._reading and not self._ended:
            for fd in self._open:
                self._loop.add_reader(fd, self._on_readable, fd)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            for fd in self._open:
                self._loop.remove_reader(fd)
            self._reading = False

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(fd)
            self._open.discard(fd)
            if not self._open:
                self._finish()
            return
        name = self._outs[fd]
        scanners = self._scanners
        if scanners is not None:
            data = scanners[name].feed(data)
        if data:
            self._queue.put_nowait((name, data))
            if self._queue.qsize() >= QUEUE_CHUNKS:
                self._pause()  # the consumer is behind: leave the rest in the pipes
        if scanners is not None and scanners["stdout"].done and scanners["stderr"].done:
            status = scanners["stdout"].status
            if not self.trailer.done():
                self.trailer.set_result(None if status is None else self._judge(status))
            self._finish()

    def _on_writable(self) -> None:
        pending = self._pending
        if pending is None:
            return
        try:
            while pending:
                pending = pending[os.write(self._stdin, pending):]
        except (BlockingIOError, InterruptedError):
            self._pending = pending
            return
        except OSError:
            pass  # the tool exited without reading: the rest of its input is moot
        self._pending = None
        self._loop.remove_writer(self._stdin)
        if self._half_close:
            self._close_stdin()

    def _close_stdin(self) -> None:
        if self._stdin >= 0:
            if self._pending is not None:
                self._loop.remove_writer(self._stdin)
                self._pending = None
            with contextlib.suppress(OSError):
                os.close(self._stdin)
            self._stdin = -1

    def _finish(self, *, flush: bool = True) -> None:
        if self._ended:
            return
        self._ended = True
        self._pause()
        if flush and self._scanners is not None and not self.trailer.done():
            for name, scanner in self._scanners.items():  # no trailer came: what was held back is output
                held = scanner.flush()
                if held:
                    self._queue.put_nowait((name, held))
        if not self.trailer.done():
            self.trailer.set_result(None)
        self._queue.put_nowait(_EOF)
        self._on_end()

    def _close_fds(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_stdin()
        for fd in self._outs:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._open.clear()
