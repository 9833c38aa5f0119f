"""Output accounting and scrubbing for one invocation: byte caps, UTF-8, redaction, a CPU budget. Pure.

Per stream: raw bytes -> ``StreamBuffer`` (cap, count, decode as valid UTF-8) -> ``StreamScrubber``
(escapes/controls/invisible characters removed, NFKC, secrets redacted, chunk boundaries handled) ->
what the caller sees. Only scrubbed text is kept; what a tool printed in the clear never leaves this
module.

The work is CPU-bound and linear, and meant to run off the event loop (``asyncio.to_thread``), one
call at a time per stream; a lock makes the two streams of one invocation safe to feed from different
threads. ``ScrubBudget`` caps the CPU seconds scrubbing one invocation may take: once spent, nothing
more is released (what is held, unscrubbed, is dropped and counted) and ``Collected.budget_exceeded``
says so.
"""

from __future__ import annotations

import codecs
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from toolcell.policy.scrub import Redactor, StreamScrubber, detect_injection

DEFAULT_SCRUB_BUDGET_S = 2.0

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
class ScrubBudget:
    """CPU seconds (of the feeding thread) both streams of one invocation may spend scrubbing."""

    limit_s: float = DEFAULT_SCRUB_BUDGET_S
    used_s: float = 0.0
    exceeded: bool = False
    # Output not released because the budget ran out: bytes fed afterwards plus the UTF-8 size of what
    # was held (unscrubbed) at that moment.
    dropped_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


@dataclass
class ScrubbedStream:
    """One stream: capped, decoded, scrubbed within the budget; keeps only the scrubbed text."""

    buffer: StreamBuffer
    scrubber: StreamScrubber
    budget: ScrubBudget = field(default_factory=ScrubBudget)
    _parts: list[str] = field(default_factory=list)

    def feed(self, data: bytes) -> str:
        """Scrubbed text newly releasable after ``data`` (may be empty)."""
        with self.budget.lock:
            if self.budget.exceeded:
                self.buffer.feed(data)  # still counted (seen, truncated), never scrubbed
                self.budget.dropped_bytes += len(data)
                return ""
            return self._charged(lambda: self.scrubber.feed(self.buffer.feed(data)))

    def finish(self) -> str:
        """Everything still held, scrubbed (nothing when the budget is spent)."""
        with self.budget.lock:
            if self.budget.exceeded:
                self.buffer.finish()
                return ""
            return self._charged(lambda: self.scrubber.feed(self.buffer.finish()) + self.scrubber.finish())

    def _charged(self, work: Callable[[], str]) -> str:
        started = time.thread_time()
        out = work()
        budget = self.budget
        budget.used_s += time.thread_time() - started
        if out:
            self._parts.append(out)  # scrubbed whole: releasable even if this call used up the budget
        if budget.used_s > budget.limit_s and not budget.exceeded:
            budget.exceeded = True
        if budget.exceeded:
            budget.dropped_bytes += self.scrubber.discard()
        return out

    @property
    def text(self) -> str:
        return "".join(self._parts)


@dataclass
class Collected:
    """Both streams of one invocation, sharing the byte cap and the scrubbing budget."""

    stdout: ScrubbedStream
    stderr: ScrubbedStream

    @classmethod
    def create(cls, stdout_cap: int, stderr_cap: int, total_cap: int, redactor: Redactor,
               scrub_budget_s: float = DEFAULT_SCRUB_BUDGET_S) -> Collected:
        budget, scrub_budget = Budget(total_cap), ScrubBudget(scrub_budget_s)
        return cls(
            stdout=ScrubbedStream(StreamBuffer(stdout_cap, budget, keep_text=False), StreamScrubber(redactor),
                                  scrub_budget),
            stderr=ScrubbedStream(StreamBuffer(stderr_cap, budget, keep_text=False), StreamScrubber(redactor),
                                  scrub_budget),
        )

    def stream(self, name: StreamName) -> ScrubbedStream:
        return self.stdout if name == "stdout" else self.stderr

    @property
    def budget(self) -> ScrubBudget:
        return self.stdout.budget

    @property
    def budget_exceeded(self) -> bool:
        """Scrubbing ran out of CPU budget: the output is incomplete (say "output withheld")."""
        return self.budget.exceeded

    @property
    def truncated(self) -> bool:
        return self.stdout.buffer.truncated or self.stderr.buffer.truncated or self.budget.exceeded

    @property
    def redactions(self) -> Counter[str]:
        return self.stdout.scrubber.redactions + self.stderr.scrubber.redactions

    @property
    def sanitized(self) -> Counter[str]:
        return self.stdout.scrubber.sanitized + self.stderr.scrubber.sanitized


def inspect_output(stdout: str, stderr: str) -> Counter[str]:
    """Prompt-injection markers in both (scrubbed) streams, by kind. Linear in the text (RE2, counts
    capped per kind); CPU-bound: call it off the event loop."""
    return detect_injection(stdout) + detect_injection(stderr)
