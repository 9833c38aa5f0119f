"""Property tests of the output scrubber (hypothesis): no secret out, no exception, no hang.

Random text with a secret inserted at a random place, invisible characters sprinkled inside the
secret, the whole cut into random chunks (and split between the two streams): the secret never comes
out, whole or as a run of ``SECRET_FRAGMENT_CHARS``; streaming gives what scrubbing the whole text
gives. The bounded pass runs with the unit tests; ``TOOLCELL_FUZZ_EXAMPLES=5000`` runs a longer one.
"""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.strategies import any_text, fuzz_settings
from toolcell.output import Collected
from toolcell.policy.scrub import (
    SECRET_FRAGMENT_CHARS,
    Redactor,
    StreamScrubber,
    detect_injection,
    sanitize,
    scrub,
)

FUZZ = fuzz_settings(60)

GRANTED = "tc-canary-" + "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
GRANTED_UNICODE = "gehe\u0301im-pa\u00dfwort-\u00fcber-2024"  # decomposed accent, sharp s, umlaut
TOKENS = ["ghp_" + "Zq8Xw7Vu6Ts5Rq4Po3Nm2Lk1Jh0Gf9Ed8Cb", "AKIA" + "Q3ZRT5WXY7ABCD2E", "xoxb-" + "2222-3333-abcdefg",
          "sk-ant-api03-" + "k" * 40]
REDACTOR = Redactor({"canary": GRANTED, "unicode": GRANTED_UNICODE})
INVISIBLE = "\u00ad\u034f\u180b\u200b\u200c\u200d\u2060\u2063\ufe0f\ufeff\U000e0041\U000e0100\u202e\u2066"
# Surrounding text: ordinary characters plus everything the scrubber treats specially.
AROUND = st.lists(
    st.sampled_from(
        list("abcXYZ019 .:/@=-_\n\t'\"<>|![]()#") + list(INVISIBLE)
        + ["\x1b", "\x1b[", "\x1b]", "\x07", "\x9b", "\r", "\u0301", "\u0308", "\u00e9", "\ufb01", "\uff41",
           "\u1100", "\u1161", "\u6f22", "\ud7a3", "e", "\x00"]),
    max_size=200,
).map("".join)


def _sprinkle(secret: str, where: list[int], chars: list[str]) -> str:
    out = list(secret)
    for at, ch in sorted(zip(where, chars, strict=False), reverse=True):
        out.insert(at % (len(secret) + 1), ch)
    return "".join(out)


def _chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


def _stream(text: str, cuts: list[int]) -> str:
    scrubber = StreamScrubber(REDACTOR)
    return "".join(scrubber.feed(c) for c in _chunks(text, cuts)) + scrubber.finish()


def _leaks(out: str, secret: str) -> list[str]:
    clean = sanitize(secret)[0]
    runs = {clean[i:i + SECRET_FRAGMENT_CHARS] for i in range(len(clean) - SECRET_FRAGMENT_CHARS + 1)}
    return [r for r in runs if r in out]


SECRETS = st.sampled_from([GRANTED, GRANTED_UNICODE, *TOKENS])


@FUZZ
@given(before=AROUND, after=AROUND, secret=SECRETS,
       where=st.lists(st.integers(0, 200), max_size=12), chars=st.lists(st.sampled_from(INVISIBLE), max_size=12),
       cuts=st.lists(st.integers(0, 2000), max_size=20), sep=st.sampled_from(["", " ", "\n", "="]))
def test_a_secret_never_comes_out(before: str, after: str, secret: str, where: list[int], chars: list[str],
                                  cuts: list[int], sep: str) -> None:
    text = before + sep + _sprinkle(secret, where, chars) + sep + after
    started = time.thread_time()
    whole, _, _ = scrub(text, REDACTOR)
    streamed = _stream(text, cuts)
    detect_injection(text)
    assert time.thread_time() - started < 5.0  # small inputs: anything near this is a hang
    # Granted secrets always. A token shape when, once sanitised, it stands as a word: glued to random
    # letters it is no longer one, and an escape sequence just before it may eat its first character.
    if secret in (GRANTED, GRANTED_UNICODE) or (sep in (" ", "\n") and f"{sep}{secret}{sep}" in sanitize(text)[0]):
        assert _leaks(whole, secret) == [] and _leaks(streamed, secret) == []
    assert streamed == whole


@FUZZ
@given(text=AROUND, cuts=st.lists(st.integers(0, 400), max_size=30))
def test_streaming_equals_scrubbing_the_whole(text: str, cuts: list[int]) -> None:
    assert _stream(text, cuts) == scrub(text, REDACTOR)[0]


@FUZZ
@given(cut=st.integers(SECRET_FRAGMENT_CHARS, len(GRANTED) - SECRET_FRAGMENT_CHARS), before=AROUND, after=AROUND,
       out_cuts=st.lists(st.integers(0, 600), max_size=8), err_cuts=st.lists(st.integers(0, 600), max_size=8))
def test_a_secret_split_between_stdout_and_stderr_never_comes_out(cut: int, before: str, after: str,
                                                                   out_cuts: list[int], err_cuts: list[int]) -> None:
    both = Collected.create(1 << 20, 1 << 20, 2 << 20, REDACTOR)
    for chunk in _chunks(before + " " + GRANTED[:cut], out_cuts):
        both.stdout.feed(chunk.encode())
    for chunk in _chunks(GRANTED[cut:] + " " + after, err_cuts):
        both.stderr.feed(chunk.encode())
    both.stdout.finish()
    both.stderr.finish()
    assert not both.budget_exceeded
    # No run of 8 of its characters on either side (an escape sequence in ``before`` may eat one, so the
    # halves themselves need not be redacted as such).
    assert _leaks(both.stdout.text, GRANTED) == [] and _leaks(both.stderr.text, GRANTED) == []
    assert GRANTED[:cut] not in both.stdout.text and GRANTED[cut:] not in both.stderr.text


@FUZZ
@given(text=any_text, secret_at=st.integers(0, 200))
def test_caller_strings_lone_surrogates_included_never_raise(text: str, secret_at: int) -> None:
    # The same redactor cleans log lines and error messages, which quote callers' strings.
    at = secret_at % (len(text) + 1)
    out, _ = REDACTOR.redact(text[:at] + " " + GRANTED + " " + text[at:])
    assert GRANTED[:SECRET_FRAGMENT_CHARS] not in out and GRANTED[-SECRET_FRAGMENT_CHARS:] not in out
    sanitize(text)
    detect_injection(text)
