"""The Unix-socket edge: who is calling, as the kernel tells it (SO_PEERCRED).

grpc-python does not expose the accepted socket, and its local credentials carry no uid (the
auth context says only ``local``). So toolcell accepts on the public socket itself, reads the peer's
uid/gid/pid with SO_PEERCRED, and forwards the bytes to the gRPC server on a private socket (in a
0700 directory only the supervisor can enter) from a kernel-autobound abstract address. That
address is unique while the connection lives and is what the gRPC handler sees as
``context.peer()`` (``unix-abstract:XXXXX``), so the handler maps it back to the credentials.

Bounds, so idle connections from one local user cannot lock the others out:
    per uid       at most ``max_per_uid`` open connections from one uid (SO_PEERCRED, read at accept)
    in total      at most ``max_connections``
    first bytes   a connection that has not sent the whole HTTP/2 client preface within
                  ``handshake_timeout_s`` of its accept is closed
    afterwards    gRPC's own ``grpc.max_connection_idle_ms`` (``server.max_connection_idle``) closes a
                  connection with no call in progress; a quiet connection carrying a long call is live
                  and stays (the forwarder never judges a connection by silence after its preface)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from toolcell.policy.access import PeerCred

log = logging.getLogger("toolcell.server")

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_EARLY_MAX = 1024 * 1024
# Every HTTP/2 client starts with these 24 bytes (RFC 9113, 3.4); a gRPC connection has sent them at once.
PREFACE_LEN = len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
DEFAULT_MAX_PER_UID = 32
DEFAULT_HANDSHAKE_TIMEOUT_S = 5.0
_WARN_EVERY_S = 10.0  # refusals are logged at most this often per reason (a flood must not flood the log)


def peer_cred(sock: socket.socket) -> PeerCred:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCred(uid=uid, gid=gid, pid=pid)


class _Relay(asyncio.Protocol):
    """One end of a forwarded connection: what it receives is written to the other end in the same callback.

    Protocols rather than streams: a message crosses the forwarder in one loop callback, with no task
    to wake (each hop of a warm call is on its critical path). Flow control: when the other end's
    write buffer is full, this end stops reading, so a slow reader holds bytes in the kernel, not here.
    """

    def __init__(self, on_made: Callable[[_Relay], None] = lambda r: None,
                 on_lost: Callable[[_Relay], None] = lambda r: None) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Relay | None = None
        self.uid: int | None = None  # the downstream end's caller, once counted against its uid's cap
        # Downstream only: bytes still owed of the client preface, and what to call once they are in.
        self.preface_due = 0
        self.on_preface: Callable[[_Relay], None] | None = None
        self._on_made = on_made
        self._on_lost = on_lost
        # Bytes that arrive before the other end exists (pause_reading in connection_made does not hold
        # on every 3.11 patch release); bounded by the first flight of an HTTP/2 client.
        self._early: list[bytes] = []
        self._early_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._on_made(self)

    def link(self, other: _Relay) -> None:
        self.other = other
        early, self._early, self._early_bytes = self._early, [], 0
        for data in early:
            self._forward(data)  # already counted against the preface when it arrived

    def data_received(self, data: bytes) -> None:
        if self.preface_due > 0:
            self.preface_due -= len(data)
            if self.preface_due <= 0 and self.on_preface is not None:
                self.on_preface(self)
        self._forward(data)

    def _forward(self, data: bytes) -> None:
        if self.other is None:
            self._early.append(data)
            self._early_bytes += len(data)  # a running count: many small pieces cost linear time
            if self._early_bytes > _EARLY_MAX and self.transport is not None:
                self.transport.close()
            return
        if self.other.transport is not None:
            self.other.transport.write(data)

    def eof_received(self) -> bool:
        other = self.other.transport if self.other is not None else None
        if other is not None and other.can_write_eof():
            other.write_eof()  # half-close travels on; keep the other direction open
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()
        self._on_lost(self)

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class PeerForwarder:
    """Public Unix socket -> private gRPC socket, remembering each connection's peer credentials."""

    def __init__(self, public: Path, upstream: Path, *, mode: int, max_connections: int,
                 max_per_uid: int = DEFAULT_MAX_PER_UID,
                 handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S) -> None:
        self.public = public
        self.upstream = upstream
        self.mode = mode
        self.max_connections = max_connections
        self.max_per_uid = max_per_uid
        self.handshake_timeout_s = handshake_timeout_s
        self.peers: dict[str, PeerCred] = {}
        self.per_uid: dict[int, int] = {}  # open connections by caller uid (no entry at zero)
        self.refused = {"total": 0, "per_uid": 0, "handshake": 0}  # connections closed by each bound
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.Transport] = set()  # accepted (downstream) connections
        self._tasks: set[asyncio.Task[None]] = set()
        self._deadlines: dict[_Relay, asyncio.TimerHandle] = {}
        self._warned: dict[str, float] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        old = os.umask(0o177)  # born 0600: no window where others can connect
        try:
            self._server = await loop.create_unix_server(
                lambda: _Relay(on_made=self._accepted, on_lost=self._gone), path=str(self.public))
        finally:
            os.umask(old)
        os.chmod(self.public, self.mode)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for handle in self._deadlines.values():
            handle.cancel()
        self._deadlines.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for transport in list(self._open):
            transport.close()
        if self._server is not None:
            await self._server.wait_closed()

    def _warn(self, reason: str, message: str, *args: object) -> None:
        self.refused[reason] += 1
        now = time.monotonic()
        if now - self._warned.get(reason, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            self._warned[reason] = now
            log.warning(message + " (%d such so far)", *args, self.refused[reason])

    def _accepted(self, down: _Relay) -> None:
        transport = down.transport
        if transport is None:
            return
        try:
            cred = peer_cred(transport.get_extra_info("socket"))
        except OSError:
            transport.close()
            return
        if len(self._open) >= self.max_connections:
            self._warn("total", "refusing a connection from uid %d: %d connections open (server.max_connections)",
                       cred.uid, len(self._open))
            transport.close()
            return
        if self.per_uid.get(cred.uid, 0) >= self.max_per_uid:
            self._warn("per_uid", "refusing a connection from uid %d: it has %d open "
                       "(server.max_connections_per_uid)", cred.uid, self.max_per_uid)
            transport.close()
            return
        self._open.add(transport)
        down.uid = cred.uid
        self.per_uid[cred.uid] = self.per_uid.get(cred.uid, 0) + 1
        down.preface_due = PREFACE_LEN
        down.on_preface = self._prefaced
        self._deadlines[down] = asyncio.get_running_loop().call_later(
            self.handshake_timeout_s, self._expire, down)
        transport.pause_reading()  # until its upstream connection is there
        task = asyncio.ensure_future(self._connect(down, transport, cred))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _prefaced(self, down: _Relay) -> None:
        down.on_preface = None
        handle = self._deadlines.pop(down, None)
        if handle is not None:
            handle.cancel()

    def _expire(self, down: _Relay) -> None:
        self._deadlines.pop(down, None)
        if down.transport is not None and not down.transport.is_closing():
            self._warn("handshake", "closing a connection from uid %s: no HTTP/2 preface within %gs "
                       "(server.handshake_timeout)", down.uid, self.handshake_timeout_s)
            down.transport.close()

    def _gone(self, down: _Relay) -> None:
        self._prefaced(down)
        if down.transport is not None:
            self._open.discard(down.transport)
        if down.uid is not None:
            left = self.per_uid.get(down.uid, 0) - 1
            if left > 0:
                self.per_uid[down.uid] = left
            else:
                self.per_uid.pop(down.uid, None)
            down.uid = None

    async def _connect(self, down: _Relay, transport: asyncio.Transport, cred: PeerCred) -> None:
        """Identify the caller and open its own upstream connection (a unique abstract name = its key)."""
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        key = ""

        def forget(_: _Relay) -> None:
            self.peers.pop(key, None)  # before the name can be reused

        try:
            up.bind("")  # Linux autobind: a unique abstract name, held until this socket closes
            key = "unix-abstract:" + up.getsockname()[1:].decode()
            self.peers[key] = cred
            up.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(up, str(self.upstream))
            upstream = _Relay(on_lost=forget)
            await loop.create_unix_connection(lambda: upstream, sock=up)
        except (OSError, asyncio.CancelledError) as exc:
            forget(down)
            with contextlib.suppress(OSError):
                up.close()
            transport.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("dropping a connection: cannot reach the gRPC server's private socket: %s", exc)
            return
        upstream.link(down)
        down.link(upstream)
        if transport.is_closing():  # the caller left while we connected
            if upstream.transport is not None:
                upstream.transport.close()
            return
        transport.resume_reading()
