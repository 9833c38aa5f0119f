"""Linear-time patterns for untrusted text: the one place a regular expression over tool output or a
caller's string is compiled.

Python's ``re`` backtracks: ``(?m)^\\s*...`` over 15 KB of newlines took 15 s, a URL-password pattern
over 120 KB of ``a.a.a.`` 30 s. RE2 (``google-re2``) compiles to automata and matches in time linear in
the text, whatever the pattern; it has no lookarounds or backreferences, so a pattern that needs them
fails here at import instead of backtracking at run time. ``translate`` turns a Python pattern we
borrow (detect-secrets' denylist) into RE2 syntax, or refuses.

Costs to know: each call encodes the text to UTF-8 once, and each match costs ~2 us of Python, so
callers that only count stop early (``count(limit=...)``) and the stream scrubber is budgeted
(``runtime/output.py``). The loop uses the ``re2`` module's compiled C++ object and ``_re2.RE2.Match``
directly (the module's own ``finditer`` costs ~20 us per match): keep the dependency on google-re2 1.x.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import re2  # type: ignore[import-untyped]
from re2 import _re2

# Memory for one compiled pattern and its DFA cache. The default (8 MiB) is ample for the fixed
# patterns; the alternation of a long granted secret's fragments (at most 20,000, see the Redactor)
# needs more, and a DFA cache that fills up makes RE2 fall back to its slower (still linear) NFA.
_MAX_MEM = 64 << 20

_UNANCHORED = _re2.RE2.Anchor.UNANCHORED


def _encode(text: str) -> bytes:
    # A lone surrogate (from a caller's string) becomes one "?" byte: one character, one byte, so the
    # character offsets below stay right.
    return text.encode("utf-8", "replace")


class LinearPattern:
    """A compiled RE2 pattern with the few operations the scrubber needs (str in, str offsets out).

    Matching runs on the UTF-8 bytes through RE2's own ``Match`` (the ``re2`` module's ``finditer``
    spends ~20 us of Python per match; this loop ~2 us); byte offsets become character offsets
    incrementally, so a whole scan stays linear.
    """

    __slots__ = ("_raw", "groups", "pattern")

    def __init__(self, pattern: str, capture: bool = True) -> None:
        options = re2.Options()
        options.max_mem = _MAX_MEM
        options.log_errors = False
        options.never_capture = not capture
        try:
            compiled: Any = re2.compile(pattern, options)
        except re2.error as exc:
            raise ValueError(f"not a linear-time (RE2) pattern: {pattern[:80]!r}: {exc}") from None
        self._raw: Any = compiled._regexp  # the C++ RE2 object
        self.pattern = pattern
        self.groups: int = compiled.groups

    def _byte_spans(self, data: bytes, group: int) -> Iterator[tuple[int, int]]:
        match, n, pos = self._raw.Match, len(data), 0
        while pos <= n:
            spans = match(_UNANCHORED, data, pos, n)
            start, end = spans[0]
            if start < 0:
                return
            g_start, g_end = spans[group] if group else (start, end)
            yield (g_start, g_end) if g_end > g_start else (start, end)
            if end > pos:
                pos = end
            else:  # an empty match: step over one character
                pos += 1
                while pos < n and data[pos] & 0xC0 == 0x80:
                    pos += 1

    def spans(self, text: str, group: int = 0) -> Iterator[tuple[int, int]]:
        """(start, end) of each successive non-overlapping match: of ``group`` when it took part and is
        not empty, else of the whole match."""
        if text.isascii():
            yield from self._byte_spans(text.encode("ascii"), group)
            return
        data = _encode(text)
        last_byte = last_char = 0
        for start, end in self._byte_spans(data, group):
            # start >= the previous match's end >= last_byte, so each byte is decoded once.
            first = last_char + len(data[last_byte:start].decode("utf-8", "replace"))
            last_byte, last_char = start, first
            yield first, first + len(data[start:end].decode("utf-8", "replace"))

    def search(self, text: str) -> bool:
        data = _encode(text)
        return bool(self._raw.Match(_UNANCHORED, data, 0, len(data))[0][0] >= 0)

    def count(self, text: str, limit: int) -> int:
        """Number of matches, counting no further than ``limit`` (each match costs Python time)."""
        n = 0
        for _ in self._byte_spans(_encode(text), 0):
            n += 1
            if n >= limit:
                break
        return n


def compile_linear(pattern: str, *, capture: bool = True) -> LinearPattern:
    """The one compile helper: RE2 syntax (``\\z`` not ``\\Z``; no lookaround, no backreference).
    ``capture=False`` ignores the groups (faster when only whether or where a match is matters)."""
    return LinearPattern(pattern, capture)


def escape(literal: str) -> str:
    """``literal`` as an RE2 pattern matching exactly it."""
    return str(re2.escape(literal))


# A negative lookahead at the very end of a pattern, over one character class: ``(?!\w)``, ``(?![...])``.
_TRAILING_LOOKAHEAD = re.compile(r"\(\?!(\\w|\[[^\]]*\])\)$")
_BIG_REPEAT = re.compile(r"(\{\d+),(\d+)\}")
_FLAGS = ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"))


def translate(regex: re.Pattern[str]) -> tuple[str, int]:
    """RE2 source equivalent to a compiled Python pattern, and by how much its group numbers shift.

    ``\\Z`` becomes ``\\z``; a repetition bound above RE2's limit (1000) becomes unbounded (matching a
    superset); a trailing ``(?!X)`` over one character becomes ``(?:[^X]|\\z)`` with the original body
    wrapped in a new group 1 (so the match itself is group 1 and the original group k is k + 1). Inline
    flags carry IGNORECASE/MULTILINE/DOTALL. Anything else RE2 lacks raises ValueError.
    """
    source = regex.pattern
    if regex.flags & re.VERBOSE and re.search(r"\s|#", source):
        raise ValueError(f"verbose pattern with whitespace or comments: {source[:80]!r}")
    source = source.replace(r"\Z", r"\z")
    source = _BIG_REPEAT.sub(lambda m: m.group(1) + "," + "}" if int(m.group(2)) > 1000 else m.group(0), source)
    shift = 0
    m = _TRAILING_LOOKAHEAD.search(source)
    if m is not None:
        negated = r"\W" if m.group(1) == r"\w" else "[^" + m.group(1)[1:]
        source = f"({source[:m.start()]})(?:{negated}|\\z)"
        shift = 1
    if re.search(r"\(\?<?[=!]|\(\?P=|\\[1-9]", source):
        raise ValueError(f"lookaround or backreference left in {source[:80]!r}")
    flags = "".join(letter for flag, letter in _FLAGS if regex.flags & flag)
    return (f"(?{flags}){source}" if flags else source), shift
