"""The SO_PEERCRED forwarder in front of the gRPC socket: bytes pass intact both ways, half-close travels,
each connection is known by its upstream name with the kernel's credentials, and limits hold."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from toolcell.server.peer import PREFACE_LEN, PeerForwarder, _Relay

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))


@contextlib.asynccontextmanager
async def forwarder(tmp_path: Path, max_connections: int = 8, max_per_uid: int = 32,
                    handshake_timeout_s: float = 5.0) -> AsyncIterator[tuple[PeerForwarder, list[bytes]]]:
    """An upstream that answers each connection with the SHA-256 of all it received (after EOF)."""
    seen: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peername"))
        digest = hashlib.sha256()
        while data := await reader.read(65536):
            digest.update(data)
        writer.write(digest.hexdigest().encode())
        await writer.drain()
        writer.close()

    inner = tmp_path / "inner.sock"
    server = await asyncio.start_unix_server(upstream, path=str(inner))
    fwd = PeerForwarder(tmp_path / "public.sock", inner, mode=0o600, max_connections=max_connections,
                        max_per_uid=max_per_uid, handshake_timeout_s=handshake_timeout_s)
    await fwd.start()
    try:
        yield fwd, seen
    finally:
        await fwd.stop()
        server.close()
        await server.wait_closed()


async def test_bytes_pass_intact_and_half_close_travels_to_the_upstream(tmp_path: Path) -> None:
    payload = os.urandom(8 * 1024 * 1024)  # many times the socket buffers: flow control is exercised
    async with forwarder(tmp_path) as (fwd, seen):
        reader, writer = await asyncio.open_unix_connection(str(fwd.public))
        writer.write(payload)  # sent at once, before the forwarder's upstream connection exists
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
    assert answer.decode() == hashlib.sha256(payload).hexdigest()
    assert len(seen) == 1 and seen[0].startswith(b"\x00")  # the upstream sees the autobound abstract name


async def test_each_connection_is_mapped_to_the_callers_credentials_until_it_closes(tmp_path: Path) -> None:
    async with forwarder(tmp_path) as (fwd, _):
        _, writer = await asyncio.open_unix_connection(str(fwd.public))
        for _ in range(100):
            if fwd.peers:
                break
            await asyncio.sleep(0.01)
        [(key, cred)] = fwd.peers.items()
        assert key.startswith("unix-abstract:")
        assert (cred.uid, cred.gid, cred.pid) == (os.getuid(), os.getgid(), os.getpid())
        writer.close()
        for _ in range(100):
            if not fwd.peers:
                break
            await asyncio.sleep(0.01)
        assert fwd.peers == {}


async def test_connections_beyond_the_limit_are_closed(tmp_path: Path) -> None:
    async with forwarder(tmp_path, max_connections=1) as (fwd, _):
        _, first = await asyncio.open_unix_connection(str(fwd.public))
        await asyncio.sleep(0.05)
        reader, second = await asyncio.open_unix_connection(str(fwd.public))
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed without a byte
        second.close()
        first.close()


def test_bytes_received_before_the_other_end_exists_are_kept_in_order() -> None:
    relay, sink = _Relay(), _Relay()
    sink.transport = _Recorder()
    relay.data_received(b"PRI * HTTP/2.0")
    relay.data_received(b"\r\n")
    relay.link(sink)
    relay.data_received(b"SETTINGS")
    assert sink.transport.written == [b"PRI * HTTP/2.0", b"\r\n", b"SETTINGS"]


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the forwarder closed this connection (EOF) within ``seconds``."""
    try:
        return await asyncio.wait_for(reader.read(), timeout=seconds) == b""
    except TimeoutError:
        return False


async def test_one_uid_gets_at_most_max_per_uid_connections_and_its_slots_come_back(tmp_path: Path) -> None:
    async with forwarder(tmp_path, max_connections=8, max_per_uid=2) as (fwd, _):
        held = [await asyncio.open_unix_connection(str(fwd.public)) for _ in range(2)]
        reader, extra = await asyncio.open_unix_connection(str(fwd.public))
        assert await _closed_within(reader, 5)  # the third from the same uid: closed without a byte
        extra.close()
        assert fwd.per_uid == {os.getuid(): 2} and fwd.refused["per_uid"] == 1
        held[0][1].close()
        for _ in range(100):
            if fwd.per_uid == {os.getuid(): 1}:
                break
            await asyncio.sleep(0.01)
        reader, again = await asyncio.open_unix_connection(str(fwd.public))
        assert not await _closed_within(reader, 0.3)  # a slot freed: accepted again
        again.close()
        held[1][1].close()
        for _ in range(100):
            if not fwd.per_uid:
                break
            await asyncio.sleep(0.01)
        assert fwd.per_uid == {}


# (what the connection sends, and when; closed by the preface deadline?)
HANDSHAKES = [
    ("nothing", [], True),
    ("one byte short of the preface", [PREFACE[:-1]], True),
    ("the preface in one piece", [PREFACE], False),
    ("the preface byte by byte", [PREFACE[i:i + 1] for i in range(PREFACE_LEN)], False),
]


@pytest.mark.parametrize(("pieces", "closed"), [h[1:] for h in HANDSHAKES], ids=[h[0] for h in HANDSHAKES])
async def test_a_connection_that_does_not_send_the_preface_in_time_is_closed(
        tmp_path: Path, pieces: list[bytes], closed: bool) -> None:
    async with forwarder(tmp_path, handshake_timeout_s=0.3) as (fwd, _):
        reader, writer = await asyncio.open_unix_connection(str(fwd.public))
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        # Well past the deadline; a live connection then stays quiet and is not judged by its silence.
        assert await _closed_within(reader, 1.5) is closed
        assert fwd.refused["handshake"] == (1 if closed else 0)
        writer.close()


def test_bytes_held_before_the_link_count_once_toward_the_preface() -> None:
    prefaced: list[_Relay] = []
    relay, sink = _Relay(), _Relay()
    sink.transport = _Recorder()
    relay.preface_due, relay.on_preface = PREFACE_LEN, prefaced.append
    relay.data_received(PREFACE[:12])
    relay.link(sink)  # the held 12 bytes are forwarded, not counted again
    assert prefaced == [] and relay.preface_due == PREFACE_LEN - 12
    relay.data_received(PREFACE[12:])
    assert prefaced == [relay] and sink.transport.written == [PREFACE[:12], PREFACE[12:]]
