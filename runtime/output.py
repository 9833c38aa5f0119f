"""Output accounting and scrubbing for one invocation: byte caps, UTF-8, redaction. Pure.

Per stream: raw bytes -> ``StreamBuffer`` (cap, count, decode as valid UTF-8) -> ``StreamScrubber``
(escapes/controls removed, secrets redacted, chunk boundaries handled) -> what the caller sees.
Only scrubbed text is kept; what a tool printed in the clear never leaves this module.
"""

from __future__ import annotations

import codecs
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from runtime.policy.scrub import Redactor, StreamScrubber

StreamName = Literal["stdout", "stderr"]


@dataclass
class Budget:
    """Bytes both streams may still keep together (the profile's total cap)."""

    remaining: int


@dataclass
class StreamBuffer:
    """Keeps at most ``cap`` bytes of one stream (and no more than the shared budget allows).

    Bytes past the cap are counted and dropped, so a flooding tool costs the supervisor at most
    ``cap`` bytes of memory per stream. Invalid UTF-8 is replaced, never passed through.
    """

    cap: int
    budget: Budget | None = None
    # Keep the decoded text (``text``)? Off when a scrubber keeps what matters: no clear-text copy.
    keep_text: bool = True
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
        if self.budget is not None:
            room = min(room, self.budget.remaining)
        if room <= 0:
            self.truncated = self.truncated or bool(data)
            return ""
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        self.kept += len(data)
        if self.budget is not None:
            self.budget.remaining -= len(data)
        text = self._decoder.decode(data)
        if text and self.keep_text:
            self._parts.append(text)
        return text

    def finish(self) -> str:
        """Flush a dangling partial UTF-8 sequence; return what it decoded to."""
        tail = self._decoder.decode(b"", final=True)
        if tail and self.keep_text:
            self._parts.append(tail)
        return tail

    @property
    def text(self) -> str:
        return "".join(self._parts)


@dataclass
class ScrubbedStream:
    """One stream: capped, decoded, scrubbed; keeps only the scrubbed text."""

    buffer: StreamBuffer
    scrubber: StreamScrubber
    _parts: list[str] = field(default_factory=list)

    def feed(self, data: bytes) -> str:
        text = self.buffer.feed(data)
        out = self.scrubber.feed(text) if text else ""
        if out:
            self._parts.append(out)
        return out

    def finish(self) -> str:
        out = self.scrubber.feed(self.buffer.finish()) + self.scrubber.finish()
        if out:
            self._parts.append(out)
        return out

    @property
    def text(self) -> str:
        return "".join(self._parts)


@dataclass
class Collected:
    """Both streams of one invocation."""

    stdout: ScrubbedStream
    stderr: ScrubbedStream

    @classmethod
    def create(cls, stdout_cap: int, stderr_cap: int, total_cap: int, redactor: Redactor) -> Collected:
        budget = Budget(total_cap)
        return cls(
            stdout=ScrubbedStream(StreamBuffer(stdout_cap, budget, keep_text=False), StreamScrubber(redactor)),
            stderr=ScrubbedStream(StreamBuffer(stderr_cap, budget, keep_text=False), StreamScrubber(redactor)),
        )

    def stream(self, name: StreamName) -> ScrubbedStream:
        return self.stdout if name == "stdout" else self.stderr

    @property
    def truncated(self) -> bool:
        return self.stdout.buffer.truncated or self.stderr.buffer.truncated

    @property
    def redactions(self) -> Counter[str]:
        return self.stdout.scrubber.redactions + self.stderr.scrubber.redactions

    @property
    def sanitized(self) -> Counter[str]:
        return self.stdout.scrubber.sanitized + self.stderr.scrubber.sanitized
