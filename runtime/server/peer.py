"""The Unix-socket edge: who is calling, as the kernel tells it (SO_PEERCRED).

grpc-python does not expose the accepted socket, and its local credentials carry no uid (the
auth context says only ``local``). So toolcell accepts on the public socket itself, reads the peer's
uid/gid/pid with SO_PEERCRED, and forwards the bytes to the gRPC server on a private socket (in a
0700 directory only the supervisor can enter) from a kernel-autobound abstract address. That
address is unique while the connection lives and is what the gRPC handler sees as
``context.peer()`` (``unix-abstract:XXXXX``), so the handler maps it back to the credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from pathlib import Path

from runtime.policy.access import PeerCred

log = logging.getLogger("toolcell.server")

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_CHUNK = 64 * 1024


def peer_cred(sock: socket.socket) -> PeerCred:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCred(uid=uid, gid=gid, pid=pid)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(_CHUNK):
        writer.write(data)
        await writer.drain()


class PeerForwarder:
    """Public Unix socket -> private gRPC socket, remembering each connection's peer credentials."""

    def __init__(self, public: Path, upstream: Path, *, mode: int, max_connections: int) -> None:
        self.public = public
        self.upstream = upstream
        self.mode = mode
        self.max_connections = max_connections
        self.peers: dict[str, PeerCred] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        old = os.umask(0o177)  # born 0600: no window where others can connect
        try:
            self._server = await asyncio.start_unix_server(self._accept, path=str(self.public))
        finally:
            os.umask(old)
        os.chmod(self.public, self.mode)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) > self.max_connections:
            log.warning("refusing a connection: %d connections open (server.max_connections)", len(self._tasks) - 1)
            return
        cred = peer_cred(writer.get_extra_info("socket"))
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        key = ""
        try:
            up.bind("")  # Linux autobind: a unique abstract name, held until this socket closes
            key = "unix-abstract:" + up.getsockname()[1:].decode()
            self.peers[key] = cred
            up.setblocking(False)
            await asyncio.get_running_loop().sock_connect(up, str(self.upstream))
            up_reader, up_writer = await asyncio.open_unix_connection(sock=up)
            try:
                pumps = [asyncio.ensure_future(_pipe(reader, up_writer)),
                         asyncio.ensure_future(_pipe(up_reader, writer))]
                try:
                    await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for p in pumps:
                        p.cancel()
                    await asyncio.gather(*pumps, return_exceptions=True)
            finally:
                up_writer.close()
        finally:
            self.peers.pop(key, None)  # forget before the name can be reused
            with contextlib.suppress(OSError):
                up.close()
