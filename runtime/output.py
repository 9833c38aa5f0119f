"""Per-stream output accounting: byte caps, UTF-8 decoding, truncation flags. Pure."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field


@dataclass
class StreamBuffer:
    """Keeps at most ``cap`` bytes of one stream, decoded incrementally as valid UTF-8.

    Bytes past the cap are counted and dropped, so a flooding tool costs the supervisor at most
    ``cap`` bytes of memory per stream. Invalid UTF-8 is replaced, never passed through.
    """

    cap: int
    seen: int = 0
    kept: int = 0
    truncated: bool = False
    _parts: list[str] = field(default_factory=list)
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def feed(self, data: bytes) -> str:
        """Account ``data``; return the newly kept text (may be empty)."""
        self.seen += len(data)
        room = self.cap - self.kept
        if room <= 0:
            self.truncated = self.truncated or bool(data)
            return ""
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        self.kept += len(data)
        text = self._decoder.decode(data)
        if text:
            self._parts.append(text)
        return text

    def finish(self) -> str:
        """Flush a dangling partial UTF-8 sequence; return what it decoded to."""
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._parts.append(tail)
        return tail

    @property
    def text(self) -> str:
        return "".join(self._parts)
