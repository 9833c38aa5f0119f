"""The session host's protocol, supervisor side: pure (no I/O beyond reading package data).

A session's sandbox runs ``host_command(...)``: the session host (``runtime/data/session_host.py``, with the
workspace functions of ``runtime/data/workspace.py`` in front of it) serves one claim per call. Each
claim carries a fresh nonce; the host ends the call's stdout with an optional files block and the
trailer, and its stderr with the trailer, both naming that nonce. ``CallScanner`` strips them from the
call's output as it streams, never passing on a byte of either (or a partial one), and keeps the files
block within its cap however long the host says it is.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

from toolcell.backends.launcher import TrailerScanner
from toolcell.policy.spec import HostSpec

_FILES_HEAD = b"\x1etoolcell-files:"
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


def encode_input(path: str, data: bytes) -> dict[str, str]:
    return {"path": path, "data": base64.b64encode(data).decode("ascii")}


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
        out = bytearray()
        while data:
            if self._remaining >= 0:
                take = data[:self._remaining]
                if not self.files.refused:
                    self._payload += take
                self._remaining -= len(take)
                data = data[len(take):]
                if self._remaining == 0:
                    self._remaining = -1
                    if not self.files.refused:
                        self.files.payload = bytes(self._payload)
                    self._payload = bytearray()
                continue
            if self._files_seen:
                out += self._end.feed(data)
                break
            buf = self._held + data
            self._held = b""
            data = b""
            at = buf.find(self._head)
            if at < 0:
                keep = _held_prefix(buf, self._head)
                out += self._end.feed(buf[:len(buf) - keep])
                self._held = buf[len(buf) - keep:]
                break
            out += self._end.feed(buf[:at])
            length = buf[at + len(self._head): at + len(self._head) + _LENGTH_BYTES]
            if len(length) < _LENGTH_BYTES:
                self._held = buf[at:]
                break
            if not _LENGTH.fullmatch(length):  # not the host's (it cannot be: the nonce is the host's)
                out += self._end.feed(buf[at:at + 1])
                data = buf[at + 1:]
                continue
            self._files_seen = True
            self._remaining = int(length[:10])
            if self._remaining > self._cap:
                self.files.refused = f"the output files' description is larger than {self._cap} bytes"
            if self._remaining == 0:
                self._remaining = -1
                self.files.payload = b"" if not self.files.refused else None
            data = buf[at + len(self._head) + _LENGTH_BYTES:]
        return bytes(out)

    def flush(self) -> bytes:
        """The stream ended without a trailer: what was held back is output after all."""
        held, self._held = self._held, b""
        return self._end.feed(held) + self._end.flush() if held else self._end.flush()


def _held_prefix(buf: bytes, head: bytes) -> int:
    """The length of the longest suffix of ``buf`` that is a proper prefix of ``head``."""
    start = buf.find(head[:1], max(0, len(buf) - len(head) + 1))
    while start >= 0:
        if head.startswith(buf[start:]):
            return len(buf) - start
        start = buf.find(head[:1], start + 1)
    return 0
