"""Which supervisor instance this is: the owner recorded on every sandbox it makes.

Several supervisors may share one engine (replicas, a rolling update, a DaemonSet beside a sidecar), so an
instance name must be unique by default: ``TOOLCELL_INSTANCE``, else the config's ``server.instance``,
else ``<host name>-<id>``, the id kept beside the state file (``<state_file>.instance``) so that a restarted
supervisor is the same instance and sweeps what its previous run left at once. A pod's host name is the
pod's name; two supervisors on one host have different state files (one per socket).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
from pathlib import Path

from toolcell.settings import Config

log = logging.getLogger("toolcell.instance")

ENV_INSTANCE = "TOOLCELL_INSTANCE"
MAX_CHARS = 63
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def clean(name: str) -> str:
    """A name as it can be recorded everywhere (Docker labels, oci owner records, audit): short, plain."""
    return "".join(c if c in _PLAIN else "-" for c in name[:MAX_CHARS * 4]).strip("-.")[:MAX_CHARS] or "toolcell"


def _kept_id(path: Path) -> str:
    """The id kept at ``path``, made (8 hex digits, mode 0600) when missing."""
    try:
        text = path.read_text(encoding="ascii").strip()
        if len(text) == 8 and all(c in "0123456789abcdef" for c in text):
            return text
    except (OSError, UnicodeDecodeError):
        pass
    value = secrets.token_hex(4)
    tmp = path.with_name(f".{path.name}.{value}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(value + "\n")
    os.replace(tmp, path)
    return value


def auto_name(state_file: str, hostname: str | None = None) -> str:
    """``<host name>-<id kept beside the state file>`` (a fresh id, not kept, when it cannot be written)."""
    host = clean(hostname or socket.gethostname())[:MAX_CHARS - 9]
    try:
        ident = _kept_id(Path(state_file + ".instance"))
    except OSError as exc:
        ident = secrets.token_hex(4)
        log.warning("cannot keep the instance id beside %s (%s): this run is %s-%s; what it leaves is swept "
                    "when its leases expire", state_file, exc.strerror, host, ident)
    return f"{host}-{ident}"


def resolved(config: Config) -> Config:
    """``config`` with its instance name decided (an explicit one is kept, cleaned)."""
    chosen = config.environ.get(ENV_INSTANCE) or config.server.instance
    name = clean(chosen) if chosen else auto_name(config.server.state_file)
    if name == config.server.instance:
        return config
    return dataclasses.replace(config, server=dataclasses.replace(config.server, instance=name))
