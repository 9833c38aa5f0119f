"""A sandbox's streams, driven by the event loop: stdin out, stdout and stderr in.

``SandboxStream`` is what the Docker backend's sandbox consumes, over one of two transports:

- ``AttachStream``: the engine's attach connection. The engine multiplexes a non-TTY container's stdout
  and stderr on one hijacked HTTP connection, each frame ``[stream id, 0, 0, 0, payload size (4 bytes,
  big-endian)] + payload`` (``FrameDemux``). A claimed pooled sandbox ends at the launcher's in-band
  trailers (``expect_trailer``).
- ``ChannelStream`` (``channel.py``): a pooled sandbox's private Unix-socket channel, no engine relay.

Sockets are read with ``add_reader`` rather than on a thread per sandbox: a chunk reaches its consumer,
and a pooled run's end reaches the pipeline, in the loop iteration the bytes arrive in, with no thread
hop (a warm call is a few ms long; each hop cost ~0.5 ms on a loaded 2-core host).

Bounded: at most ``QUEUE_CHUNKS`` chunks (each <= ``RECV_BYTES``) wait for the consumer; then the
sockets are no longer read, the buffers before them fill, and the tool's writes block. What one
sandbox can make the supervisor hold is ~1 MiB, however much it prints. Pure asyncio and sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Final

from toolcell.backends.base import StreamName
from toolcell.backends.launcher import TrailerScanner

__all__ = ["QUEUE_CHUNKS", "RECV_BYTES", "AttachStream", "FrameDemux", "SandboxStream"]

RECV_BYTES: Final = 64 * 1024
QUEUE_CHUNKS: Final = 16
_FRAME_HEADER: Final = 8
_STREAM_IDS: Final[dict[int, StreamName]] = {1: "stdout", 2: "stderr"}


class _Eof:
    """End of output: EOF, an error, the trailers, or the stream was closed."""


_EOF: Final = _Eof()
_Item = tuple[StreamName, bytes] | _Eof | OSError


class FrameDemux:
    """Split the engine's multiplexed stream into (stream, payload) pieces; frames may span reads."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._remaining = 0
        self._stream: StreamName | None = None

    def feed(self, data: bytes) -> list[tuple[StreamName, bytes]]:
        """The payload in ``data``, consecutive pieces of one stream joined; unknown stream ids dropped."""
        out: list[tuple[StreamName, bytes]] = []
        pos, size = 0, len(data)
        while pos < size:
            if self._remaining == 0:
                take = min(_FRAME_HEADER - len(self._header), size - pos)
                self._header += data[pos:pos + take]
                pos += take
                if len(self._header) == _FRAME_HEADER:
                    self._stream = _STREAM_IDS.get(self._header[0])
                    self._remaining = int.from_bytes(self._header[4:8], "big")
                    self._header.clear()
                continue
            take = min(self._remaining, size - pos)
            stream = self._stream
            if stream is not None:
                piece = data[pos:pos + take]
                if out and out[-1][0] == stream:
                    out[-1] = (stream, out[-1][1] + piece)
                else:
                    out.append((stream, piece))
            pos += take
            self._remaining -= take
        return out


class SandboxStream:
    """Output queue, backpressure, stdin writing and the end, shared by both transports.

    Owned by the running event loop from construction on. ``on_end`` runs (on the loop) once output
    is over, whatever ended it. A transport reads its sockets in ``_resume``/``_pause`` callbacks,
    queues with ``_put`` and ends with ``_finish``.
    """

    def __init__(self, stdin: socket.socket, sockets: list[socket.socket],
                 on_end: Callable[[], None] = lambda: None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stdin = stdin
        self._sockets = sockets
        for sock in sockets:
            sock.setblocking(False)
        self._on_end = on_end
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._reading = False
        self._ended = False
        self._pending: memoryview | None = None  # stdin not yet written
        self._half_close = True
        self._judge: Callable[[int], int | None] = lambda status: status
        # The launcher's exit status as judged by ``expect_trailer``'s caller, or None: ask the engine.
        self.trailer: asyncio.Future[int | None] = self._loop.create_future()

    @property
    def ended(self) -> bool:
        return self._ended

    def expect_trailer(self, nonce: str, judge: Callable[[int], int | None]) -> None:
        """From now on, end at this claim's trailer; ``judge`` maps the launcher's status to the result."""
        self._judge = judge

    def send(self, data: bytes, *, half_close: bool = True) -> None:
        """Write ``data`` as the tool's whole stdin, then half-close (the reader sees EOF); a claim is
        sent with ``half_close=False``: EOF is what tells a launcher that decided its run to exit.

        A small input fits the socket buffer and goes at once; the rest as the socket drains. A tool may
        exit without reading its input: that is not an error.
        """
        if self._ended:
            return
        if self._pending is not None:  # a session's next claim behind the last one (never with an EOF)
            if not half_close and not self._half_close:
                self._pending = memoryview(bytes(self._pending) + data)
            return
        self._half_close = half_close
        self._pending = memoryview(data)
        self._on_writable()
        if self._pending is not None:
            self._loop.add_writer(self._stdin.fileno(), self._on_writable)

    async def chunks(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        """Output as it arrives, until the end; a read error is raised (as ``OSError``) after the output."""
        while True:
            item = await self._queue.get()
            if isinstance(item, _Eof):
                return
            if isinstance(item, OSError):
                raise item
            if not self._reading and not self._ended and self._queue.qsize() < QUEUE_CHUNKS // 2:
                self._resume()
            yield item

    def close(self) -> None:
        """Stop reading and writing now (the sandbox is being removed); a consumer sees the end."""
        self._finish(_EOF, flush=False)

    # -- for transports -----------------------------------------------------------------------------

    def _resume(self) -> None:
        raise NotImplementedError

    def _pause(self) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        """At an end without a trailer: queue what was held back (in-band trailer scanning)."""

    def _put(self, stream: StreamName, data: bytes) -> None:
        self._queue.put_nowait((stream, data))
        if self._queue.qsize() >= QUEUE_CHUNKS:
            self._pause()  # the consumer is behind: leave the rest in the buffers before us

    def _end_at_trailer(self, status: int | None) -> None:
        """A pooled run is over. The sockets stay open until ``close()`` (the sandbox's removal, off the
        call's path): a launcher that reported a clean exit waits for that, so the container's exit -- a
        burst of engine work -- does not compete with the result on its way back to the caller."""
        self.trailer.set_result(None if status is None else self._judge(status))
        self._finish(_EOF, keep_open=True)

    def _on_writable(self) -> None:
        pending = self._pending
        if pending is None:
            return
        try:
            while pending:
                pending = pending[self._stdin.send(pending):]
        except (BlockingIOError, InterruptedError):
            self._pending = pending
            return
        except OSError:
            pass  # the tool exited without reading: the rest of its input is moot
        self._pending = None
        self._loop.remove_writer(self._stdin.fileno())  # a no-op when all went at once
        if self._half_close:
            with contextlib.suppress(OSError):
                self._stdin.shutdown(socket.SHUT_WR)

    def _finish(self, end: _Eof | OSError, *, flush: bool = True, keep_open: bool = False) -> None:
        if self._ended:
            if not keep_open:
                self._close_sockets()
            return
        self._ended = True
        self._pause()
        if self._pending is not None:
            self._loop.remove_writer(self._stdin.fileno())
            self._pending = None
        if flush and not self.trailer.done():
            self._flush()
        if not self.trailer.done():
            self.trailer.set_result(None)
        if not keep_open:
            self._close_sockets()
        self._queue.put_nowait(end)
        self._on_end()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            if sock.fileno() >= 0:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


class AttachStream(SandboxStream):
    """The engine's attach socket: stdin out, multiplexed stdout/stderr in."""

    def __init__(self, sock: socket.socket, on_end: Callable[[], None] = lambda: None) -> None:
        super().__init__(sock, [sock], on_end)
        self._sock = sock
        self._fd = sock.fileno()
        self._demux = FrameDemux()
        self._scanners: dict[StreamName, TrailerScanner] | None = None
        self._resume()

    def expect_trailer(self, nonce: str, judge: Callable[[int], int | None]) -> None:
        super().expect_trailer(nonce, judge)
        self._scanners = {"stdout": TrailerScanner(nonce), "stderr": TrailerScanner(nonce)}

    def _resume(self) -> None:
        if not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _flush(self) -> None:
        for name, scanner in (self._scanners or {}).items():
            held = scanner.flush()
            if held:
                self._queue.put_nowait((name, held))

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        if not data:
            self._finish(_EOF)
            return
        scanners = self._scanners
        for stream, payload in self._demux.feed(data):
            if scanners is not None:
                payload = scanners[stream].feed(payload)
            if payload:
                self._put(stream, payload)
            if scanners is not None and scanners["stdout"].done and scanners["stderr"].done:
                self._end_at_trailer(scanners["stdout"].status)
                return
