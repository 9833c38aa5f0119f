"""The warm-pool launcher protocol, engine-neutral and pure (no I/O beyond reading package data).

A pooled sandbox, and a cold one whose tool is granted secrets (``SandboxSpec.defer``: claimed at its
start), runs ``launch_command(tool command)``: the launcher (``runtime/data/launcher.py``) spawns the
tool, waits for one claim envelope on stdin, feeds the tool its arguments, and ends each
output stream with a trailer carrying a per-claim nonce and the tool's exit status. ``TrailerScanner``
finds that trailer in a stream's chunks without ever passing it (or a partial one) on to the caller.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from functools import cache
from importlib import resources

_TRAILER_HEAD = b"\x1etoolcell-end:"
_NONCE_HEX = 32
# head + nonce + ":" + 3-digit status + "\n"
TRAILER_BYTES = len(_TRAILER_HEAD) + _NONCE_HEX + 1 + 3 + 1
_STATUS = re.compile(rb"[0-9]{3}\n")


@cache
def launcher_source() -> str:
    return resources.files("toolcell.data").joinpath("launcher.py").read_text()


def launch_command(command: tuple[str, ...], python: str = "python3", channel: str = "",
                   defer: bool = False, relay: bool = False, ready_fd: int = 0,
                   tool_ready: bool = False) -> tuple[str, ...]:
    """The pooled sandbox's command: the launcher (isolated mode, inline source) in front of the tool.

    ``channel``: the socket path inside the sandbox to connect to (the channel transport), or "" (attach).
    ``defer``: spawn the tool only at the claim, with the claim's environment (tools granted secrets).
    ``relay``: the tool writes into pipes the launcher copies out whole (see ``relay_command``).
    ``ready_fd``: an inherited descriptor the launcher writes one byte to and closes once it waits for its
    claim (its tool spawned, unless deferred): a pooled sandbox counts as ready only then.
    ``tool_ready``: the tool itself says when it is ready (``SandboxSpec.ready_signal``; not when deferred).
    """
    flags = (("--defer",) if defer else ()) + (("--relay",) if relay else ()) + \
        (("--tool-ready",) if tool_ready and not defer else ()) + \
        ((f"--ready-fd={ready_fd}",) if ready_fd else ()) + ((f"--channel={channel}",) if channel else ())
    # -S: no site module (the launcher is standard library only): ~half a Python start, in every pooled sandbox.
    return (python, "-I", "-S", "-c", launcher_source(), *flags, *command)


def relay_command(command: tuple[str, ...], python: str = "python3") -> tuple[str, ...]:
    """An unpooled sandbox's command when its stdio cannot take a large write whole (gVisor's donated
    host pipes answer one write(2) of 200,000 bytes with 65,536): the launcher runs the tool on its stdin
    with stdout/stderr pipes inside the sandbox, copies them out over short writes, exits with its status."""
    return (python, "-I", "-S", "-c", launcher_source(), "--relay", "--cold", *command)


def new_nonce() -> str:
    return secrets.token_hex(_NONCE_HEX // 2)


def envelope(nonce: str, stdin: bytes, env: Mapping[str, str] | None = None,
             files: Mapping[str, str] | None = None) -> bytes:
    """The claim: one JSON line with the nonce, the tool's arguments (its whole stdin) and, for a deferred
    launcher, the tool's granted secrets: environment variables, and files (path -> content)."""
    text = stdin.decode("utf-8", "surrogateescape")
    claim: dict[str, object] = {"nonce": nonce, "arguments": text}
    if env:
        claim["env"] = dict(env)
    if files:
        claim["files"] = dict(files)
    return json.dumps(claim, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


class TrailerScanner:
    """One stream: pass bytes through until this claim's trailer; then report the exit status.

    Bytes that could be the start of the trailer are held back until they either complete it or
    turn out to be ordinary output, so the trailer never reaches the caller and output is not delayed
    unless it ends in something that looks like the trailer's first bytes.
    """

    def __init__(self, nonce: str) -> None:
        self._prefix = _TRAILER_HEAD + nonce.encode() + b":"
        self._held = b""
        self.status: int | None = None

    @property
    def done(self) -> bool:
        return self.status is not None

    def feed(self, data: bytes) -> bytes:
        """Return the bytes that are output; after the trailer, everything is dropped."""
        if self.status is not None:
            return b""
        buf = self._held + data
        self._held = b""
        at = buf.find(self._prefix)
        while at >= 0:
            tail = buf[at + len(self._prefix): at + len(self._prefix) + 4]
            if len(tail) < 4:
                self._held = buf[at:]
                return buf[:at]
            if _STATUS.fullmatch(tail):
                self.status = int(tail[:3])
                return buf[:at]
            at = buf.find(self._prefix, at + 1)
        # Hold back the longest suffix that is a proper prefix of the trailer's fixed part.
        for keep in range(min(len(self._prefix) - 1, len(buf)), 0, -1):
            if self._prefix.startswith(buf[-keep:]):
                self._held = buf[-keep:]
                return buf[:-keep]
        return buf

    def flush(self) -> bytes:
        """At end of stream without a trailer: what was held back is output after all."""
        held, self._held = self._held, b""
        return held if self.status is None else b""
