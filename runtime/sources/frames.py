"""The driver's stdout as frames: one JSON object per line, bounded, parsed strictly. Pure.

The sandbox's stdout is hostile whoever wrote it (the driver, or a server that subverted it): a line is
kept only up to the stream's byte cap, the search for line ends never rescans what was already seen, and
each line is parsed by the same bounded, strict JSON parser as a caller's arguments. Progress frames are
throttled (a server may send thousands); exactly one final frame (``tools``, ``result`` or ``error``) is
kept, anything after it is counted and ignored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from toolcell.errors import InvalidArguments
from toolcell.model import Progress
from toolcell.policy.arguments import ArgumentLimits, parse_arguments

FINAL_KINDS = ("tools", "result", "error")
PROGRESS_MESSAGE_MAX_CHARS = 1024
# At most this many progress events per second reach the caller; the rest are counted, not sent.
PROGRESS_PER_S = 20.0
REFUSED_METHODS_KEPT = 16
_TOOLS_KEYS = frozenset({"tools", "server", "instructions"})


def frame_limits(cap: int) -> ArgumentLimits:
    """Parsing limits for a frame of at most ``cap`` bytes (an image's base64 is one long string)."""
    return ArgumentLimits(max_argument_bytes=cap, max_depth=64, max_string_length=cap, max_array_length=100_000)


# What a frame adds around the server's message (the driver caps that at the stream's cap): its key, and the
# odd character the driver escapes that the server did not.
FRAME_SLACK_BYTES = 64 * 1024


@dataclass
class FrameReader:
    """Splits and parses one sandbox's stdout. ``feed`` returns the progress to forward now.

    ``cap`` bounds the bytes kept; build it with ``for_cap`` so a server message at the stream's cap still
    fits in its frame.
    """

    cap: int
    clock: Callable[[], float]
    seen: int = 0
    kept: int = 0
    truncated: bool = False
    final: Mapping[str, Any] | None = None
    # Why the stream is not a valid frame sequence ("" while it is); fixed once set.
    invalid: str = ""
    progress_dropped: int = 0
    after_final: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    _line: bytearray = field(default_factory=bytearray)
    _last_progress: float = float("-inf")

    @classmethod
    def for_cap(cls, cap: int, clock: Callable[[], float]) -> FrameReader:
        return cls(cap=cap + FRAME_SLACK_BYTES, clock=clock)

    def feed(self, data: bytes) -> list[Progress]:
        self.seen += len(data)
        out: list[Progress] = []
        if self.truncated:
            return out
        # One C-level split per chunk: 1 MiB of bare newlines is a million empty pieces, skipped cheaply.
        pieces = data.split(b"\n")
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if self.kept + len(piece) > self.cap:
                self.truncated = True
                self._line.clear()
                break
            self.kept += len(piece) + (0 if last else 1)
            if last:
                self._line += piece
                break
            if not piece and not self._line:
                continue
            self._line += piece
            line, self._line = bytes(self._line), bytearray()
            progress = self._frame(line)
            if progress is not None:
                out.append(progress)
        return out

    def finish(self) -> None:
        """End of stream: a last line without its newline is still a frame."""
        if self._line and not self.truncated:
            line, self._line = bytes(self._line), bytearray()
            self._frame(line)

    def _frame(self, line: bytes) -> Progress | None:
        if self.invalid or not line.strip():
            return None
        if self.final is not None:
            self.after_final += 1
            return None
        try:
            frame = parse_arguments(line.decode("utf-8"), frame_limits(self.cap))
        except (UnicodeDecodeError, InvalidArguments):
            self.invalid = "a line of the sandbox's output is not a JSON object"
            return None
        if "tools" in frame and set(frame) <= _TOOLS_KEYS:  # discovery's final frame
            self.final = frame
            return None
        if len(frame) != 1:
            self.invalid = "a frame must have exactly one key"
            return None
        ((kind, body),) = frame.items()
        if kind in FINAL_KINDS:
            if not isinstance(body, dict):
                self.invalid = f"a {kind} frame must hold an object"
                return None
            self.final = frame
            return None
        if kind == "refused" and isinstance(body, dict):
            method = body.get("method")
            name = method[:64] if isinstance(method, str) else "?"
            if name in self.refused or len(self.refused) < REFUSED_METHODS_KEPT:
                self.refused[name] += 1
            return None
        if kind == "progress" and isinstance(body, dict):
            return self._progress(body)
        self.invalid = "the sandbox wrote a frame of an unknown kind"
        return None

    def _progress(self, body: Mapping[str, Any]) -> Progress | None:
        value, total, message = body.get("progress"), body.get("total"), body.get("message", "")
        if not isinstance(value, int | float) or not _number(value) or (total is not None and not _number(total)) \
                or not isinstance(message, str):
            self.invalid = "a progress frame is malformed"
            return None
        now = self.clock()
        if now - self._last_progress < 1.0 / PROGRESS_PER_S:
            self.progress_dropped += 1
            return None
        self._last_progress = now
        return Progress(progress=float(value), total=None if total is None else float(total),
                        message=message[:PROGRESS_MESSAGE_MAX_CHARS])


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
