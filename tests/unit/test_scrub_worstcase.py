"""Every pattern over tool output runs in linear time: worst-case inputs at the full 1 MiB cap.

Each input is one unit repeated up to the stdout cap (1 MiB of UTF-8): the shapes that made the old
backtracking patterns quadratic (newlines for ``^\\s*``, ``a.`` for the URL password, ...), every
token's prefix, escape introducers, invisible and combining characters. Each pattern alone, then the
whole pipeline (scrub, detect, the stream scrubber fed 4 KiB at a time), must finish within
``BOUND_S`` of CPU time: a generous bound that linear work meets by a wide margin while quadratic work
at this size would take minutes (15 KB of newlines already took 15 s before). CPU time of this
thread, not wall time, so a busy machine does not make the bound flaky.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from toolcell.output import Collected, inspect_output
from toolcell.policy import scrub as s

MiB = 1 << 20
BOUND_S = 2.0
CHUNK = 4096
CANARY = "tc-canary-3f9a1c0b7d2e48e6a5b4c3d2e1f0a9b8"
# A granted key file: ~3 KiB, so its fragments make a large literal alternation.
KEY_FILE = "".join(f"{(i * 2654435761) % (1 << 32):08x}" for i in range(384))
REDACTOR = s.Redactor({"canary": CANARY, "key": KEY_FILE})

UNITS = [
    # shapes the issue measured
    "\n", "a.", ":", "@", " ", "\t", "\r\n", "0", "a", "#", "-",
    # private keys
    "-----BEGIN ", "-----BEGIN PRIVATE KEY-----\n", "-----BEGIN RSA PRIVATE KEY-----", "PuTTY-User-Key-File-2:",
    # token prefixes
    "sk-", "sk-ant-", "sk-proj-", "sk_live_", "eyJ", "eyJa.", "eyJabcd.eyJabcd.", "ghp_", "github_pat_", "AKIA",
    "AIza", "ya29.", "xox", "xoxb-1-", "xapp-1-A-1-", "Bearer ", "bearer a", "Authorization: Basic ", "://a:",
    "a://a:", "a://a:b", "aws", "aws key ", "aws key '", "AccountKey=", "glpat-", "GR1348941", "//a/:_authToken=",
    "pypi-AgEIcHlwaS5vcmc", "SG.", "sq0csp-", "1234567890:", "AC", "M" * 24 + ".", "tc-canary-", KEY_FILE[:7],
    # injection markers' prefixes
    "<!--", "![", "![a](", "![a](https://x?", "<|", "</", "</system", "[INST", "<<", "ignore ",
    "ignore all previous ", "you are now ", "new instructions", "from now on, you ", "user:", "\nuser: x", "### ",
    # escapes and controls
    "\x1b", "\x1b[", "\x1b[1", "\x1b]", "\x1b[m", "\x1bP", "\x1b]8;;", "\x9b1", "\x9d", "\x00", "\r",
    # invisible, compatibility and combining characters
    "\u00ad", "\ufe0f", "\u200b", "\U000e0041", "\u00e9", "e\u0301", "\u0301", "\ufb01", "\uff41", "\u1100\u1161",
    "\u6f22",
]


def at_cap(unit: str) -> str:
    return unit * (MiB // len(unit.encode()))


def cpu(work: Callable[[], Any]) -> float:
    started = time.thread_time()
    work()
    return time.thread_time() - started


def stream(text: str) -> str:
    scrubber = s.StreamScrubber(REDACTOR)
    out = [scrubber.feed(text[i:i + CHUNK]) for i in range(0, len(text), CHUNK)]
    return "".join(out) + scrubber.finish()


def collected(data: bytes) -> Collected:
    both = Collected.create(MiB, MiB, 2 * MiB, REDACTOR, scrub_budget_s=60.0)
    for i in range(0, len(data), CHUNK):
        both.stdout.feed(data[i:i + CHUNK])
        both.stderr.feed(data[i:i + CHUNK])
    both.stdout.finish()
    both.stderr.finish()
    return both


@pytest.mark.parametrize("unit", UNITS, ids=[repr(u[:12]) for u in UNITS])
def test_every_pattern_and_the_pipeline_stay_linear(unit: str) -> None:
    text = at_cap(unit)
    timings: dict[str, float] = {}
    for p in s._BASE_PATTERNS:
        timings[f"redact {p.kind} {p.regex.pattern[:30]}"] = cpu(lambda p=p: list(p.regex.spans(text, p.group)))
    for kind, pattern in s._INJECTION:
        timings[f"inject {kind}"] = cpu(lambda pattern=pattern: pattern.count(text, s.MAX_MARKERS_COUNTED))
    timings["_DELETABLE"] = cpu(lambda: s._DELETABLE.search(text))
    timings["_open_key_block"] = cpu(lambda: s._open_key_block(text, len(text)))
    timings["_incomplete_escape_start"] = cpu(lambda: s._incomplete_escape_start(text))
    timings["normalization_boundary"] = cpu(lambda: s.normalization_boundary(text))
    timings["sanitize"] = cpu(lambda: s.sanitize(text))
    timings["scrub"] = cpu(lambda: s.scrub(text, REDACTOR))
    timings["detect_injection"] = cpu(lambda: s.detect_injection(text))
    timings["stream 4 KiB"] = cpu(lambda: stream(text))
    slow = {name: round(t, 2) for name, t in timings.items() if t > BOUND_S}
    assert slow == {}


@pytest.mark.parametrize("unit", ["\n", "a.", "\x1b]", "\u00ad", "ignore all previous instructions. "])
def test_both_streams_at_the_cap_and_the_verdict_stay_linear(unit: str) -> None:
    data = at_cap(unit).encode()
    both: list[Collected] = []
    assert cpu(lambda: both.append(collected(data))) < 2 * BOUND_S
    assert not both[0].budget_exceeded
    assert (both[0].stdout.text == "") == (unit in ("\x1b]", "\u00ad"))  # those are all removed
    assert cpu(lambda: inspect_output(both[0].stdout.text, both[0].stderr.text)) < BOUND_S


@pytest.mark.parametrize(
    ("label", "work", "text"),
    [
        ("fake_turn over 15 KB of newlines (was 14.8 s)", s.detect_injection, "\n" * 15_000),
        ("fake_turn over 40,000 newlines (was 172 s)", s.detect_injection, "\n" * 40_000),
        ("url_password over 120 KB of a.a.a. (was 30.6 s)", s.Redactor().redact, "a." * 60_000),
    ],
)
def test_the_issues_examples(label: str, work: Callable[[str], Any], text: str) -> None:
    assert cpu(lambda: work(text)) < 0.5, label
