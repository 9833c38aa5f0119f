"""The RE2 wrapper: character offsets and matches agree with Python's re where both apply."""

from __future__ import annotations

import re

import pytest

from toolcell.policy.linear import compile_linear, escape

TEXTS = ["", "plain ascii key=abc123 and key=zz", "caf\u00e9 key=\u00e9t\u00e9 \u6f22\u5b57 key=x\U0001f600y",
         "lone \ud800 surrogate key=ab\udfffcd", "key=\n" * 3, "\x00\x1b[31mkey=red\x1b[0m"]
PATTERNS = [(r"key=(\w+)", 1), (r"key=(\S+)", 1), (r"(?i)KEY", 0), (r"x*", 0), (r"[^\x00-\x7f]+", 0), (r".", 0),
            (r"(?m)^key=$", 0), (r"(a)|(b)", 2)]


def _python(pattern: str, text: str, group: int) -> list[tuple[int, int]]:
    spans = []
    for m in re.finditer(pattern, text, re.ASCII):
        start, end = m.span(group)
        spans.append((start, end) if end > start else m.span())
    return spans


@pytest.mark.parametrize(("pattern", "group"), PATTERNS)
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_spans_agree_with_python_re(pattern: str, group: int, text: str) -> None:
    # A lone surrogate is seen as "?" (one character for one, so offsets still line up).
    as_seen = text.encode("utf-8", "replace").decode()
    assert list(compile_linear(pattern).spans(text, group)) == _python(pattern, as_seen, group)


@pytest.mark.parametrize("literal", ["a.b*c", "(x|y)", "\\", "\x00nul", "sp ace", "\u00e9\u6f22", "[^]-]", "$^"])
def test_escape_matches_exactly_the_literal(literal: str) -> None:
    pattern = compile_linear(escape(literal))
    assert list(pattern.spans(f"<{literal}>")) == [(1, 1 + len(literal))]
    assert not pattern.search(literal[:-1] + "#")


def test_count_stops_at_the_limit() -> None:
    assert compile_linear("a").count("a" * 10_000, 7) == 7
    assert compile_linear("a").count("bab", 7) == 1
