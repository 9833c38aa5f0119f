"""Caller strings at the API edge: each bound tested on both sides, rejections name the field and quote short."""

from __future__ import annotations

import time
from typing import Any

import pytest

from toolcell.errors import InvalidArguments, InvocationConflict, InvocationNotFound, PermissionDenied, ToolNotFound
from toolcell.model import InvocationRequest
from toolcell.policy.arguments import ArgumentLimits
from toolcell.policy.requests import RequestLimits, check_cancel, check_request
from toolcell.quoting import printable, quote

LIMITS = ArgumentLimits(max_argument_bytes=4096)
MIB = 1024 * 1024
# The longest message any rejection here may carry: fixed text, a field name and one quote().
MESSAGE_MAX = 200


def request(**fields: Any) -> InvocationRequest:
    base: dict[str, Any] = {"tool": "text.wordcount", "arguments_json": '{"text": "x"}'}
    return InvocationRequest(**{**base, **fields})


# (field, allowed value, denied value, path named by the rejection, fragment of its message)
PAIRS: list[tuple[str, Any, Any, str, str]] = [
    ("tool", "a", "", "tool", "required"),
    ("tool", "t" * 128, "t" * 129, "tool", "longer than 128"),
    ("tool", "ns:tool-1_2.v3", "ns tool", "tool", "[A-Za-z0-9_.:-]"),
    ("tool", "text.wordcount", "text.wordcount\n", "tool", "'text.wordcount\\n'"),
    ("tool", "text.wordcount", "text.wordcount\x00", "tool", "\\x00"),
    ("tool", "text.wordcount", "t\u00e9xt", "tool", "'t\\xe9xt'"),
    ("tool", "text.wordcount", "text\u202ewordcount", "tool", "\\u202e"),
    ("tool", "text.wordcount", "t\ud800", "tool", "\\ud800"),
    ("tool", "text.wordcount", "a." * (MIB // 2), "tool", "...(1048576 chars)"),
    ("invocation_id", "", "a", "invocation_id", "8-128"),
    ("invocation_id", "a" * 8, "a" * 7, "invocation_id", "8-128"),
    ("invocation_id", "a" * 128, "a" * 129, "invocation_id", "8-128"),
    ("invocation_id", "inv_0123:abc.DEF-x", "inv_0123/abc", "invocation_id", "'inv_0123/abc'"),
    ("invocation_id", "inv_01234567", "inv_0123456\n", "invocation_id", "\\n"),
    ("invocation_id", "inv_01234567", "x" * MIB, "invocation_id", "...(1048576 chars)"),
    ("caller_metadata", {f"k{i}": "v" for i in range(32)}, {f"k{i}": "v" for i in range(33)},
     "caller_metadata", "more than 32 entries"),
    ("caller_metadata", {"k" * 64: "v"}, {"k" * 65: "v"}, "caller_metadata", "1-64 characters"),
    ("caller_metadata", {"mcp/request_id": "v"}, {"mcp request": "v"}, "caller_metadata", "'mcp request'"),
    ("caller_metadata", {"a": "v"}, {"": "v"}, "caller_metadata", "''"),
    ("caller_metadata", {"a": "v"}, {"a\x1b": "v"}, "caller_metadata", "\\x1b"),
    ("caller_metadata", {"a": "x" * 1024}, {"a": "x" * 1025}, "caller_metadata[a]", "1024 bytes"),
    ("caller_metadata", {"a": "\u00e9" * 512}, {"a": "\u00e9" * 513}, "caller_metadata[a]", "1024 bytes"),
    ("caller_metadata", {"a": "x" * 1000}, {"a": "x" * MIB}, "caller_metadata[a]", "1024 bytes"),
    ("caller_metadata", {"a": "tab\there"[:3]}, {"a": "tab\there"}, "caller_metadata[a]", "'\\t' at 3"),
    ("caller_metadata", {"a": "caf\u00e9 \u4e16\u754c"}, {"a": "x\u202ey"}, "caller_metadata[a]", "\\u202e"),
    ("caller_metadata", {"a": "ok"}, {"a": "\ud800"}, "caller_metadata[a]", "surrogate"),
    ("caller_metadata", {"a": "ok"}, {"a": "\x7f"}, "caller_metadata[a]", "\\x7f"),
    ("caller_metadata", {f"k{i}": "x" * 254 for i in range(31)}, {f"k{i}": "x" * 1000 for i in range(9)},
     "caller_metadata", "8192 bytes in all"),
    ("arguments_json", "x" * 4096, "x" * 4097, "arguments_json", "exceed 4096 bytes"),
    ("arguments_json", "\u00e9" * 2048, "\u00e9" * 2049, "arguments_json", "exceed 4096 bytes"),
    ("arguments_json", "{}", "x" * 16 * MIB, "arguments_json", "exceed 4096 bytes"),
]


@pytest.mark.parametrize(("field", "allowed", "denied", "path", "fragment"), PAIRS,
                         ids=[f"{p[0]}-{i}" for i, p in enumerate(PAIRS)])
def test_each_bound_allows_and_denies(field: str, allowed: Any, denied: Any, path: str, fragment: str) -> None:
    check_request(request(**{field: allowed}), LIMITS)
    started = time.monotonic()
    with pytest.raises(InvalidArguments) as info:
        check_request(request(**{field: denied}), LIMITS)
    assert time.monotonic() - started < 1.0  # a length test first: never a scan of 16 MiB
    message = str(info.value)
    assert info.value.path == path
    assert fragment in message
    assert len(message) <= MESSAGE_MAX, message
    assert message.isascii() and message.isprintable()


@pytest.mark.parametrize(
    ("invocation_id", "ok"),
    [("inv_0123456789abcdef", True), ("", False), ("short", False), ("x" * 129, False), ("a/b/c/d/e", False)],
)
def test_cancel_requires_a_well_formed_id(invocation_id: str, ok: bool) -> None:
    if ok:
        check_cancel(invocation_id)
        return
    with pytest.raises(InvalidArguments) as info:
        check_cancel(invocation_id)
    assert info.value.path == "invocation_id"
    assert len(str(info.value)) <= MESSAGE_MAX


def test_limits_are_a_value() -> None:
    tight = RequestLimits(max_tool_name=4)
    check_request(request(tool="abcd"), LIMITS, tight)
    with pytest.raises(InvalidArguments):
        check_request(request(tool="abcde"), LIMITS, tight)


@pytest.mark.parametrize(
    ("text", "limit", "quoted"),
    [
        ("text.wordcount", 64, "'text.wordcount'"),
        ("", 64, "''"),
        ("it's", 64, "'it\\'s'"),
        ("back\\slash", 64, "'back\\\\slash'"),
        ("a\n\r\t\x00\x1b\x7f", 64, "'a\\n\\r\\t\\x00\\x1b\\x7f'"),
        ("\u00e9\u202e\ud800\U0001f600", 64, "'\\xe9\\u202e\\ud800\\U0001f600'"),
        ("x" * 65, 64, "'" + "x" * 64 + "'...(65 chars)"),
        ("x" * 64, 64, "'" + "x" * 64 + "'"),
        ("\x00" * 20, 8, "'\\x00\\x00'...(20 chars)"),  # an escape is never split
        ("\U0001f600" * 3, 10, "'\\U0001f600'...(3 chars)"),
    ],
)
def test_quote_escapes_and_cuts(text: str, limit: int, quoted: str) -> None:
    assert quote(text, limit) == quoted


def test_printable_keeps_quotes_unescaped() -> None:
    assert printable("'text' is a required property") == "'text' is a required property"


@pytest.mark.parametrize("text", ["a." * (MIB // 2), "\n" * MIB, "\ud800" * MIB, "\U0001f600" * MIB])
def test_quote_reads_only_its_prefix(text: str) -> None:
    started = time.monotonic()
    for _ in range(1000):
        shown = quote(text)
    assert time.monotonic() - started < 5.0  # 1000 x a scan of 1 MiB would take far longer
    assert len(shown) <= 64 + 24 and shown.isascii() and shown.isprintable()


@pytest.mark.parametrize(
    "error",
    [
        ToolNotFound("a." * MIB),
        InvocationConflict.running("x" * MIB),
        InvocationNotFound.running("\x1b[2J" * MIB),
        PermissionDenied.to("call", "\u202e" * MIB),
    ],
    ids=["tool-not-found", "conflict", "not-found", "permission"],
)
def test_errors_quote_caller_strings(error: Exception) -> None:
    message = str(error)
    assert len(message) <= MESSAGE_MAX and message.isascii() and message.isprintable()
    assert "chars)" in message
