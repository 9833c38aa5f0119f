"""The attach stream read on the event loop: framing, a claimed run's trailers, stdin with half-close,
and the bound on what a sandbox that prints without end can make the supervisor hold."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from toolcell.backends.attach import QUEUE_CHUNKS, RECV_BYTES, AttachStream, FrameDemux

OUT, ERR = 1, 2


def frame(stream: int, data: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data


@pytest.mark.parametrize(("pieces", "expected"), [
    ([frame(OUT, b"hello")], [("stdout", b"hello")]),
    ([frame(OUT, b"a") + frame(OUT, b"b") + frame(ERR, b"c")], [("stdout", b"ab"), ("stderr", b"c")]),
    ([frame(ERR, b"split")[:3], frame(ERR, b"split")[3:10], frame(ERR, b"split")[10:]],
     [("stderr", b"sp"), ("stderr", b"lit")]),
    ([frame(3, b"unknown stream") + frame(OUT, b"kept")], [("stdout", b"kept")]),
    ([frame(OUT, b"")], []),
])
def test_frames_are_demultiplexed_across_reads(pieces: list[bytes], expected: list[tuple[str, bytes]]) -> None:
    demux = FrameDemux()
    out = [item for piece in pieces for item in demux.feed(piece)]
    assert out == expected


async def _collect(stream: AttachStream) -> list[tuple[str, bytes]]:
    return [item async for item in stream.chunks()]


async def test_output_until_eof_and_stdin_is_written_then_half_closed() -> None:
    ours, engine = socket.socketpair()
    stream = AttachStream(ours)
    stdin = b"x" * (4 * 1024 * 1024)  # more than the socket buffer: written as the peer drains
    stream.send(stdin)
    received = bytearray()
    engine.setblocking(False)
    loop = asyncio.get_running_loop()
    while chunk := await loop.sock_recv(engine, 1 << 20):  # ends only at the half-close
        received += chunk
    assert bytes(received) == stdin
    await loop.sock_sendall(engine, frame(OUT, b"out") + frame(ERR, b"err"))
    engine.close()
    assert await asyncio.wait_for(_collect(stream), 5) == [("stdout", b"out"), ("stderr", b"err")]
    assert stream.ended and await stream.trailer is None


async def test_a_claimed_run_ends_at_its_trailers_with_the_judged_status() -> None:
    ours, engine = socket.socketpair()
    stream = AttachStream(ours)
    nonce = "ab" * 16
    stream.expect_trailer(nonce, judge=lambda status: status + 100)
    trailer = f"\x1etoolcell-end:{nonce}:003\n".encode()
    engine.sendall(frame(OUT, b"result" + trailer) + frame(ERR, b"warn" + trailer) + frame(OUT, b"after the end"))
    assert await asyncio.wait_for(_collect(stream), 5) == [("stdout", b"result"), ("stderr", b"warn")]
    assert await stream.trailer == 103
    assert stream.ended and ours.fileno() >= 0  # kept open: the launcher exits when we let go
    stream.close()
    assert ours.fileno() == -1
    engine.close()


async def test_a_slow_consumer_stops_the_reading_so_memory_stays_bounded() -> None:
    ours, engine = socket.socketpair()
    stream = AttachStream(ours)
    engine.setblocking(False)
    payload = b"y" * (RECV_BYTES - 8)
    wire = memoryview(frame(OUT, payload) * 64)  # 4 MiB the tool prints while nobody consumes
    sent = 0
    loop = asyncio.get_running_loop()
    for _ in range(3):  # until the engine's side is blocked even after the loop had its turns
        with contextlib.suppress(BlockingIOError):
            while sent < len(wire):
                sent += engine.send(wire[sent:])
        await asyncio.sleep(0.05)
    assert sent < len(wire) // 2  # the writer is blocked: the stream stopped reading
    assert stream._queue.qsize() <= QUEUE_CHUNKS + 2  # one read's pieces may cross the mark

    async def write_the_rest() -> None:
        await loop.sock_sendall(engine, wire[sent:])
        engine.close()

    writer = asyncio.ensure_future(write_the_rest())
    got = sum([len(data) async for _, data in stream.chunks()])
    await writer
    assert got == 64 * len(payload)  # nothing lost: reading resumed as the consumer caught up


async def test_close_ends_the_output_at_once() -> None:
    ours, engine = socket.socketpair()
    stream = AttachStream(ours)
    stream.close()
    assert await asyncio.wait_for(_collect(stream), 1) == []
    assert stream.ended and await stream.trailer is None
    engine.close()
