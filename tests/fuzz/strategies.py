"""Hypothesis strategies for hostile callers: JSON-ish argument texts and request strings.

Shared by the pure fuzz (``test_fuzz_arguments``) and the fuzz through a real supervisor
(``test_fuzz_requests``). ``TOOLCELL_FUZZ_EXAMPLES`` raises the number of examples for a long run.
"""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

MIB = 1024 * 1024


def examples(default: int) -> int:
    """Examples per property: ``default`` in the normal run, ``TOOLCELL_FUZZ_EXAMPLES`` on demand."""
    return int(os.environ.get("TOOLCELL_FUZZ_EXAMPLES", default))


def fuzz_settings(default: int) -> settings:
    # No example database (nothing written into the tree), no deadline flakiness on a loaded 2-core
    # machine: a hang is caught by the callers' own generous bounds.
    return settings(max_examples=examples(default), deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


# Every code point, lone surrogates included (hypothesis leaves them out by default).
any_char = st.characters(exclude_categories=())
any_text = st.text(any_char, max_size=200)
hostile_unit = st.sampled_from(["a.", "\n", ":", "@", "\x1b[2J", "\u202e", "\u00ad", "\ud800", "\x00", "é", "'",
                                "\\", "a" * 7 + "@", "https://a:b@"])
# Long repetitions of the inputs that make backtracking patterns and naive escaping slow.
huge_text = st.builds(lambda unit, n: unit * n, hostile_unit, st.integers(1, 600_000))
decoded_bytes = st.one_of(
    st.binary(max_size=400).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.binary(max_size=400).map(lambda b: b.decode("latin-1")),
    st.binary(max_size=400).map(lambda b: b.decode("utf-8", "replace")),
)

# JSON-ish tokens: the bad ones (each must be refused) and the ordinary ones.
BAD_NUMBERS = ["1e400", "-1e400", "1e309", "-1E+309", "1.5e99999999999999999999", "1e-400", "-5e-99999",
               "NaN", "Infinity", "-Infinity", "1" * 21, "-" + "9" * 40, "0." + "1" * 70]
BAD_STRINGS = ['"\\ud800"', '"\\udfff"', '"a\\udc00b"', '"\\ude00\\ud83d"', '"\\ud83d"', '"x\\uDBFF"']
GOOD_NUMBERS = ["0", "-0", "1", "-1", "1.5", "1e308", "-1e308", "1e-300", "0e99999", "5e-324", "1" * 20,
                "1.7976931348623157e308", "2.5E+3"]
GOOD_STRINGS = ['""', '"x"', '"\\ud83d\\ude00"', '"\\u00e9"', '"\\\\ud800"', '"\\n\\t\\"\\/"', '"\\u0000"']
scalar_token = st.one_of(
    st.sampled_from(BAD_NUMBERS + BAD_STRINGS + GOOD_NUMBERS + GOOD_STRINGS + ["true", "false", "null"]),
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr).map(lambda s: s.replace("inf", "1e400")),
    any_text.map(lambda s: json.dumps(s, ensure_ascii=True)),
    any_text.map(lambda s: json.dumps(s, ensure_ascii=False)),
)
key_token = st.one_of(st.sampled_from(['"a"', '"a"', '"\\ud800"', '"k\\udc00"', '""', '"a b"', '"\\u202e"']),
                      any_text.map(lambda s: json.dumps(s)))
json_ish = st.recursive(
    scalar_token,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(key_token, inner), max_size=6).map(
            lambda kvs: "{" + ",".join(f"{k}: {v}" for k, v in kvs) + "}"),
    ),
    max_leaves=30,
)
json_object_ish = st.lists(st.tuples(key_token, json_ish), max_size=6).map(
    lambda kvs: "{" + ",".join(f"{k}: {v}" for k, v in kvs) + "}")


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[str]) -> str:
    """A JSON-ish text with a few random cuts, insertions and duplications."""
    text = draw(base)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["cut", "insert", "double"]))
        if op == "cut":
            text = text[:i] + text[i + draw(st.integers(1, 8)):]
        elif op == "insert":
            text = text[:i] + draw(st.text(any_char, min_size=1, max_size=4)) + text[i:]
        else:
            text = text[:i] + text[i:i + 16] + text[i:]
    return text


deep_nesting = st.tuples(
    st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"\\ud800":', "}"), ('[{"a": ', "}]")]),
    st.integers(1, 200_000),
    st.sampled_from(["1", "1e400", '"\\ud800"', "NaN", "", "[]"]),
).map(lambda t: t[0][0] * t[1] + t[2] + t[0][1] * t[1])

argument_texts = st.one_of(
    json_object_ish,
    json_ish,
    mutated(json_object_ish),
    deep_nesting,
    decoded_bytes,
    any_text,
    huge_text,
)

# Caller strings: near the allowed set and bounds, and anything at all.
NAME_CHARS = "abcXYZ019_.:-"
name_like = st.one_of(
    st.text(st.sampled_from(NAME_CHARS), max_size=140),
    st.text(st.sampled_from(NAME_CHARS + " /\n\x00é\u202e\ud800'\\"), max_size=140),
    any_text,
    huge_text,
)
metadata_like = st.dictionaries(
    st.one_of(st.text(st.sampled_from(NAME_CHARS + "/"), max_size=70), any_text, huge_text),
    st.one_of(st.text(max_size=1100), any_text, huge_text, st.just("x" * 1025)),
    max_size=40,
)
