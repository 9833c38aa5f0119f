"""Quoting caller strings: the one way an error, log line, span or audit record shows one.

A caller's tool name, invocation id, metadata key or JSON key is hostile: it may be a megabyte long,
carry terminal escapes, bidi overrides, NUL or lone surrogates. ``quote`` shows at most a short
escaped prefix, in printable ASCII only, and says how long the original was. It reads only the
prefix it shows (its cost does not grow with the input), so it is safe on any string at any time.

    quote("text.wordcount")        -> 'text.wordcount'
    quote("a\\n\\x1b[31m")           -> 'a\\n\\x1b[31m'
    quote("x" * 10_000, limit=8)   -> 'xxxxxxxx'...(10000 chars)
"""

from __future__ import annotations

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_QUOTED = {**_NAMED, "'": "\\'"}


def _escape_char(ch: str, named_map: dict[str, str]) -> str:
    named = named_map.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if 0x20 <= code < 0x7F:
        return ch
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _prefix(s: str, limit: int, named_map: dict[str, str]) -> tuple[str, bool]:
    """The escaped prefix of ``s`` that fits in ``limit`` characters, and whether that is all of ``s``."""
    out: list[str] = []
    used = 0
    for ch in s[: max(limit, 0)]:  # each character escapes to at least one: never more than limit of them
        piece = _escape_char(ch, named_map)
        if used + len(piece) > limit:
            return "".join(out), False
        out.append(piece)
        used += len(piece)
    return "".join(out), len(s) <= limit


def printable(s: str, limit: int = 64) -> str:
    """``s`` escaped into printable ASCII, at most ``limit`` characters of it, then ``...(N chars)`` if cut."""
    body, whole = _prefix(s, limit, _NAMED)
    return body if whole else f"{body}...({len(s)} chars)"


def quote(s: str, limit: int = 64) -> str:
    """``s`` between single quotes, escaped and cut like ``printable``: at most ``limit`` + 24 characters."""
    body, whole = _prefix(s, limit, _QUOTED)
    return f"'{body}'" if whole else f"'{body}'...({len(s)} chars)"
