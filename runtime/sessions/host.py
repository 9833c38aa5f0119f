"""The session host's protocol, supervisor side: pure (no I/O beyond reading package data).

A session's sandbox runs ``host_command(...)``: the session host (``runtime/data/session_host.py``, with the
workspace functions of ``runtime/data/workspace.py`` in front of it) serves one claim per call. Each
claim carries a fresh nonce; the host ends the call's stdout with an optional files block and the
trailer, and its stderr with the trailer, both naming that nonce. ``CallScanner`` strips them from the
call's output as it streams, never passing on a byte of either (or a partial one), and keeps the files
block within its cap however long the host says it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

from toolcell.backends.launcher import TrailerScanner
from toolcell.policy.spec import HostSpec

_FILES_HEAD = b"\x1etoolcell-files:"
# A trailer's status of at least this says the session ended with the call (the host's SH_OVER).
SESSION_OVER = 500
_LENGTH = re.compile(rb"[0-9]{10}\n")
_LENGTH_BYTES = 11


@cache
def host_source() -> str:
    """The workspace functions, then the host: one ``python3 -c`` program."""
    data = resources.files("toolcell.data")
    return data.joinpath("workspace.py").read_text() + "\n\n" + data.joinpath("session_host.py").read_text()


def host_command(command: tuple[str, ...], host: HostSpec, *, relay: bool = False, ready_fd: int = 0,
                 python: str = "python3") -> tuple[str, ...]:
    """The session sandbox's command: the host (isolated mode, inline source) in front of the tool's."""
    flags = (("--resident",) if host.resident else ()) + (("--relay",) if relay else ()) + \
        ((f"--workspace={host.workspace}",) if host.workspace else ()) + \
        ((f"--outputs={host.outputs}",) if host.outputs else ()) + \
        (f"--caps={','.join(str(c) for c in host.caps)}",) + ((f"--ready-fd={ready_fd}",) if ready_fd else ())
    return (python, "-I", "-S", "-c", host_source(), *flags, "--", *command)


def claim(nonce: str, stdin: bytes, *, env: Mapping[str, str] | None = None, files: Mapping[str, str] | None = None,
          inputs: Sequence[Mapping[str, str]] = (), collect: bool = False) -> bytes:
    """One call's claim line: the nonce, the tool's stdin, (first call) secrets, input files, collect or not."""
    body: dict[str, object] = {"nonce": nonce, "arguments": stdin.decode("utf-8", "surrogateescape")}
    if env:
        body["env"] = dict(env)
    if files:
        body["files"] = dict(files)
    if inputs:
        body["inputs"] = [dict(i) for i in inputs]
    if collect:
        body["collect"] = True
    return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


@dataclass
class FilesBlock:
    """What the host said about the output files: its payload (None: no block), or why it was refused."""

    payload: bytes | None = None
    refused: str = ""


class CallScanner:
    """One call's stdout: pass output through; take the files block (bounded) and stop at the trailer."""

    def __init__(self, nonce: str, files_cap: int) -> None:
        self._end = TrailerScanner(nonce)
        self._head = _FILES_HEAD + nonce.encode() + b":"
        self._cap = files_cap
        self._held = b""
        self._remaining = -1  # payload bytes still to come; -1: not inside the block
        self._payload = bytearray()
        self.files = FilesBlock()
        self._files_seen = False

    @property
    def done(self) -> bool:
        return self._end.done

    @property
    def status(self) -> int | None:
        return self._end.status

    def feed(self, data: bytes) -> bytes:
        # One pass over ``held + data`` by index: every byte is looked at and copied a bounded number of times
        # (slicing the rest of the buffer at each false header would be quadratic in a hostile stream).
        out = bytearray()
        buf = self._held + data if self._held else data
        self._held = b""
        pos = 0
        while pos < len(buf):
            if self._remaining >= 0:
                take = min(self._remaining, len(buf) - pos)
                if not self.files.refused:
                    self._payload += memoryview(buf)[pos:pos + take]
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    self._remaining = -1
                    if not self.files.refused:
                        self.files.payload = bytes(self._payload)
                    self._payload = bytearray()
                continue
            if self._files_seen:
                out += self._end.feed(buf[pos:])
                break
            at, length = self._find_header(buf, pos)
            if at < 0:
                keep = _held_prefix(buf, self._head, pos)
                out += self._end.feed(buf[pos:len(buf) - keep])
                self._held = buf[len(buf) - keep:]
                break
            out += self._end.feed(buf[pos:at])
            if len(length) < _LENGTH_BYTES:
                self._held = buf[at:]
                break
            self._files_seen = True
            self._remaining = int(length[:10])
            if self._remaining > self._cap:
                self.files.refused = f"the output files' description is larger than {self._cap} bytes"
            if self._remaining == 0:
                self._remaining = -1
                self.files.payload = b"" if not self.files.refused else None
            pos = at + len(self._head) + _LENGTH_BYTES
        return bytes(out)

    def _find_header(self, buf: bytes, pos: int) -> tuple[int, bytes]:
        """The first header in ``buf[pos:]`` whose length is well-formed or not all there yet: (its offset,
        the length bytes present); (-1, b"") for none. One with a malformed length is not the host's (it
        cannot be: the nonce is the host's): its bytes are output."""
        at = buf.find(self._head, pos)
        while at >= 0:
            start = at + len(self._head)
            length = buf[start:start + _LENGTH_BYTES]
            if len(length) < _LENGTH_BYTES or _LENGTH.fullmatch(length):
                return at, length
            at = buf.find(self._head, at + 1)
        return -1, b""

    def flush(self) -> bytes:
        """The stream ended without a trailer: what was held back is output after all."""
        held, self._held = self._held, b""
        return self._end.feed(held) + self._end.flush() if held else self._end.flush()


def _held_prefix(buf: bytes, head: bytes, pos: int = 0) -> int:
    """The length of the longest suffix of ``buf[pos:]`` that is a proper prefix of ``head``."""
    start = buf.find(head[:1], max(pos, len(buf) - len(head) + 1))
    while start >= 0:
        if head.startswith(buf[start:]):
            return len(buf) - start
        start = buf.find(head[:1], start + 1)
    return 0
