"""Fuzz the argument parser, the request checks and quote(): only a value or InvalidArguments, never a hang.

Bounded in the normal run (a few hundred examples each, well under a minute in all);
``TOOLCELL_FUZZ_EXAMPLES=20000 pytest tests/fuzz`` for a long pass.
"""

from __future__ import annotations

import ast
import json
import time
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.strategies import (
    BAD_NUMBERS,
    BAD_STRINGS,
    MIB,
    any_char,
    any_text,
    argument_texts,
    fuzz_settings,
    huge_text,
    json_ish,
    metadata_like,
    name_like,
)
from toolcell.errors import InvalidArguments
from toolcell.model import InvocationRequest
from toolcell.policy.arguments import ArgumentLimits, compile_schema, parse_arguments, validate_arguments
from toolcell.policy.requests import check_cancel, check_request
from toolcell.quoting import printable, quote

LIMITS = ArgumentLimits()  # the shipped defaults: 1 MiB, depth 32
SCHEMA = compile_schema({
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 3}, "n": {"type": "integer", "enum": [1, 2]}},
    "additionalProperties": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
}, key="fuzz")
# Fixed text + a path of at most 163 characters + a schema message of at most 200.
MESSAGE_MAX = 400
# One call on at most ~1.2 MiB of input; a super-linear pass takes minutes, a linear one well under 1 s.
CALL_BOUND_S = 20.0


def short_and_printable(exc: InvalidArguments) -> None:
    message = str(exc)
    assert len(message) <= MESSAGE_MAX, message[:500]
    assert message.isascii() and message.isprintable(), ascii(message[:500])
    assert len(exc.path) <= 170 and exc.path.isascii() and exc.path.isprintable()


def sound(value: Any) -> None:
    """What reaches a tool: strict JSON, UTF-8 encodable, and parsed back to the same value."""
    text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")
    assert parse_arguments(text, LIMITS) == value


def parse_or_refuse(text: str) -> None:
    started = time.monotonic()
    try:
        value = parse_arguments(text, LIMITS)
    except InvalidArguments as exc:
        short_and_printable(exc)
    else:
        assert isinstance(value, dict)
        sound(value)
    try:
        value = validate_arguments(SCHEMA, text, LIMITS)
    except InvalidArguments as exc:
        short_and_printable(exc)
    else:
        sound(value)
    assert time.monotonic() - started < CALL_BOUND_S


@fuzz_settings(200)
@given(argument_texts)
@example('{"a": "\\ud800"}')
@example('{"\\udc00": 1}')
@example('{"a": [1, {"b": 1e400}]}')
@example("[" * MIB)
@example('{"a": "' + "\\ud800" * 170_000 + '"}')
def test_parser_returns_a_value_or_refuses(text: str) -> None:
    parse_or_refuse(text)


@fuzz_settings(100)
@given(st.sampled_from(BAD_NUMBERS + BAD_STRINGS), st.lists(st.sampled_from(["a", "b c", "\u202e", 0, 3]),
                                                             max_size=12))
def test_bad_values_are_refused_at_any_depth(bad: str, path: list[str | int]) -> None:
    text = bad
    for part in reversed(path):
        text = f"[{text}]" if isinstance(part, int) else "{" + json.dumps(part) + ": " + text + "}"
    text = '{"root": ' + text + "}"
    try:
        parse_arguments(text, LIMITS)
    except InvalidArguments as exc:
        short_and_printable(exc)
        assert exc.path.startswith("root")
    else:
        raise AssertionError(f"accepted {text!r}")


# Values a caller may send: everything here must be accepted and reach the tool unchanged.
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**20) + 1, 10**20 - 1),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=50)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=40,
)


@fuzz_settings(100)
@given(json_values, st.booleans())
def test_ordinary_values_round_trip(value: Any, ascii_only: bool) -> None:
    text = json.dumps({"v": value}, ensure_ascii=ascii_only)
    assert parse_arguments(text, LIMITS) == {"v": value}


@fuzz_settings(100)
@given(json_ish)
def test_strict_parser_agrees_with_json_when_it_accepts(text: str) -> None:
    try:
        value = parse_arguments('{"v": ' + text + "}", LIMITS)
    except InvalidArguments as exc:
        short_and_printable(exc)
        return
    assert value == json.loads('{"v": ' + text + "}")


def request_strings(tool: str, invocation_id: str, metadata: dict[str, str], arguments: str) -> None:
    started = time.monotonic()
    try:
        check_request(InvocationRequest(tool=tool, arguments_json=arguments, invocation_id=invocation_id,
                                        caller_metadata=metadata), LIMITS)
    except InvalidArguments as exc:
        short_and_printable(exc)
        assert len(str(exc)) <= 200
        assert exc.path in ("tool", "invocation_id", "caller_metadata", "arguments_json") or (
            exc.path.startswith("caller_metadata[") and len(exc.path) <= 16 + 64 + 1)
    try:
        check_cancel(invocation_id)
    except InvalidArguments as exc:
        assert len(str(exc)) <= 200 and str(exc).isprintable()
    assert time.monotonic() - started < CALL_BOUND_S


@fuzz_settings(150)
@given(name_like, name_like, metadata_like, st.one_of(argument_texts, st.just("x" * (MIB + 1))))
def test_check_request_returns_or_refuses(tool: str, invocation_id: str, metadata: dict[str, str],
                                          arguments: str) -> None:
    request_strings(tool, invocation_id, metadata, arguments)


@fuzz_settings(300)
@given(st.one_of(any_text, huge_text, st.text(any_char, max_size=2000)), st.integers(0, 300))
def test_quote_is_short_printable_and_exact(text: str, limit: int) -> None:
    shown = quote(text, limit)
    assert shown.isascii() and shown.isprintable()
    assert len(shown) <= limit + 2 + len(f"...({len(text)} chars)")
    body = printable(text, limit)
    assert body.isascii() and body.isprintable()
    if not shown.endswith(" chars)"):  # shown whole: it reads back as exactly the original
        assert ast.literal_eval(shown) == text
    else:
        prefix = ast.literal_eval(shown[: shown.rindex("...(")])
        assert text.startswith(prefix)
