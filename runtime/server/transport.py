"""Where the gRPC server listens and how callers are identified at the transport.

- Unix socket (default): toolcell's own listener with SO_PEERCRED (``peer.PeerForwarder``), file mode
  from ``server.socket_mode``; gRPC itself listens on a private socket in a fresh 0700 directory.
- TCP with ``server.tls``: TLS with the server's certificate; with ``client_ca``, mTLS (a client
  certificate signed by that CA is required at the handshake).
- TCP with ``server.insecure: true``: plaintext, with a warning at start-up. Anything else is refused.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import grpc

from toolcell.access_settings import SecuritySettings
from toolcell.errors import ConfigError
from toolcell.policy.access import PeerCred
from toolcell.safepath import private_dir
from toolcell.server.peer import DEFAULT_HANDSHAKE_TIMEOUT_S, DEFAULT_MAX_PER_UID, PeerForwarder

log = logging.getLogger("toolcell.server")


def unix_path(address: str) -> Path | None:
    if address.startswith("unix://"):
        return Path(address[len("unix://"):])
    if address.startswith("unix:"):
        return Path(address[len("unix:"):])
    return None


def prepare_socket_path(path: Path) -> None:
    """Make sure the parent dir is ours alone (0700 if new; ``safepath.private_dir``), clear a stale socket;
    refuse to steal a live one."""
    private_dir(path.parent, key="server.listen")
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket", key="server.listen")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # stale: nobody listens
        return
    finally:
        probe.close()
    raise ConfigError(f"another process is already listening on {path}", key="server.listen")


def server_options(security: SecuritySettings, max_message_bytes: int) -> list[tuple[str, int]]:
    """Bounds so one misbehaving client can't hold the server."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", security.max_concurrent_streams),
        ("grpc.max_connection_idle_ms", int(security.max_connection_idle_s * 1000)),
        ("grpc.http2.max_pings_without_data", 2),
    ]


class Transport:
    def __init__(self, security: SecuritySettings, listen: str, socket_mode: int, *,
                 max_connections_per_uid: int = DEFAULT_MAX_PER_UID,
                 handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S) -> None:
        self.security = security
        self.listen = listen
        self.socket_mode = socket_mode
        self.max_connections_per_uid = max_connections_per_uid
        self.handshake_timeout_s = handshake_timeout_s
        self.peers: dict[str, PeerCred] = {}
        self.address = ""
        self._forwarder: PeerForwarder | None = None
        self._private_dir: Path | None = None

    def bind(self, server: grpc.aio.Server) -> None:
        """Add the gRPC port (before ``server.start()``)."""
        path = unix_path(self.listen)
        sec = self.security
        if path is not None:
            prepare_socket_path(path)
            self._private_dir = Path(tempfile.mkdtemp(prefix="toolcell-grpc-"))  # 0700, ours alone
            inner = self._private_dir / "grpc.sock"
            server.add_insecure_port(f"unix://{inner}")
            self._forwarder = PeerForwarder(path, inner, mode=self.socket_mode, max_connections=sec.max_connections,
                                            max_per_uid=self.max_connections_per_uid,
                                            handshake_timeout_s=self.handshake_timeout_s)
            self.peers = self._forwarder.peers
            self.address = f"unix://{path}"
            return
        try:
            if sec.tls is not None:
                creds = grpc.ssl_server_credentials(
                    [(sec.tls.key_pem, sec.tls.cert_pem)], root_certificates=sec.tls.client_ca_pem,
                    require_client_auth=sec.tls.client_ca_pem is not None)
                port = server.add_secure_port(self.listen, creds)
            else:
                log.warning("listening on plain TCP %s (server.insecure: true): no encryption, no transport "
                            "authentication; use TLS or a Unix socket outside tests", self.listen)
                port = server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {self.listen}: {exc}", key="server.listen") from exc
        self.address = f"{self.listen.rsplit(':', 1)[0]}:{port}"

    @property
    def forwarder(self) -> PeerForwarder | None:
        """The Unix-socket forwarder (its ``per_uid`` and ``refused`` counts), once bound to a Unix socket."""
        return self._forwarder

    async def start(self) -> None:
        if self._forwarder is not None:
            await self._forwarder.start()

    async def close(self) -> None:
        if self._forwarder is not None:
            await self._forwarder.stop()
            with contextlib.suppress(FileNotFoundError):
                self._forwarder.public.unlink()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
