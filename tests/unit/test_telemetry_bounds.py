"""What telemetry keeps of hostile strings is bounded: span attributes, events and links (OTel SpanLimits),
log fields (capped, escaped, ASCII), and the JSON-lines span file (rotates, refuses planted paths)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from toolcell.safepath import UnsafePath
from toolcell.settings import TelemetrySettings, parse_config
from toolcell.telemetry import (
    EXCEPTION_MAX_CHARS,
    FIELD_MAX_CHARS,
    MESSAGE_MAX_CHARS,
    SPAN_LIMITS,
    JsonFormatter,
    JsonLinesSpanExporter,
    RedactingFilter,
    TextFormatter,
    setup_tracing,
)

MIB = 1024 * 1024


def _spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_span_attributes_events_and_links_are_cut_at_the_limits_at_the_full_cap(tmp_path: Path) -> None:
    provider = setup_tracing(TelemetrySettings(span_file=str(tmp_path / "spans.jsonl")))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("hostile") as span:
        span.set_attribute("toolcell.tool", "a." * (MIB // 2))  # 1 MiB, a caller's string
        for i in range(1000):
            span.set_attribute(f"k{i}", "v")
            if i < 100:
                span.add_event("e", {f"a{j}": "x" * 300 for j in range(20)})
    with tracer.start_as_current_span("quiet") as quiet:  # the same probe under the limits: kept whole
        quiet.set_attribute("toolcell.tool", "text.wordcount")
        quiet.add_event("e", {"a": "x" * 200})
    provider.shutdown()
    hostile, kept = _spans(tmp_path / "spans.jsonl")
    assert len(hostile["attributes"]) == SPAN_LIMITS.max_span_attributes == 64
    assert all(len(str(v)) <= 256 for v in hostile["attributes"].values())
    assert len(hostile["events"]) == 64
    assert all(len(e["attributes"]) <= 16 and all(len(v) <= 256 for v in e["attributes"].values())
               for e in hostile["events"])
    assert kept["attributes"]["toolcell.tool"] == "text.wordcount"
    assert kept["events"][0]["attributes"]["a"] == "x" * 200


def test_the_span_file_rotates_and_keeps_only_keep_older_files(tmp_path: Path) -> None:
    exporter = JsonLinesSpanExporter(str(tmp_path / "spans.jsonl"), max_bytes=4000, keep=2)
    provider = TracerProvider(span_limits=SPAN_LIMITS)
    tracer = provider.get_tracer("t")
    for i in range(200):
        span = tracer.start_span(f"span-{i}")
        span.end()
        exporter.export([span])  # type: ignore[list-item]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["spans.jsonl", "spans.jsonl.1", "spans.jsonl.2"]
    line = max(len(line) + 1 for p in tmp_path.iterdir() for line in p.read_text().splitlines())
    assert all(p.stat().st_size <= 4000 + line for p in tmp_path.iterdir())
    assert all(oct(p.stat().st_mode & 0o777) == oct(0o600) for p in tmp_path.iterdir())
    newest = [s["name"] for s in _spans(tmp_path / "spans.jsonl")]
    older = [s["name"] for s in _spans(tmp_path / "spans.jsonl.1")]
    assert newest[-1] == "span-199" and int(older[-1].split("-")[1]) + 1 == int(newest[0].split("-")[1])


def test_keep_zero_starts_the_file_again(tmp_path: Path) -> None:
    exporter = JsonLinesSpanExporter(str(tmp_path / "spans.jsonl"), max_bytes=2000, keep=0)
    tracer = TracerProvider().get_tracer("t")
    for i in range(50):
        span = tracer.start_span(f"span-{i}")
        span.end()
        exporter.export([span])  # type: ignore[list-item]
    assert [p.name for p in tmp_path.iterdir()] == ["spans.jsonl"]
    assert _spans(tmp_path / "spans.jsonl")[-1]["name"] == "span-49"


def _own_dir(tmp_path: Path) -> Path:
    (tmp_path / "d").mkdir(mode=0o700)
    return tmp_path / "d" / "spans.jsonl"


def _planted_symlink(tmp_path: Path) -> Path:
    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "target").write_text("")
    (tmp_path / "d" / "spans.jsonl").symlink_to(tmp_path / "target")
    return tmp_path / "d" / "spans.jsonl"


def _group_writable_dir(tmp_path: Path) -> Path:
    (tmp_path / "d").mkdir()
    os.chmod(tmp_path / "d", 0o770)
    return tmp_path / "d" / "spans.jsonl"


def _foreign_file(tmp_path: Path) -> Path:
    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "d" / "spans.jsonl").write_text("")
    os.chown(tmp_path / "d" / "spans.jsonl", 65534, 65534)
    return tmp_path / "d" / "spans.jsonl"


@pytest.mark.parametrize(("make", "refused"), [(_own_dir, False), (_planted_symlink, True),
                                               (_group_writable_dir, True), (_foreign_file, True)],
                         ids=["own directory", "a symlink in its place", "group-writable directory",
                              "another uid's file"])
def test_the_span_file_is_refused_where_another_user_could_have_planted_it(tmp_path: Path, make: Any,
                                                                           refused: bool) -> None:
    path = make(tmp_path)
    if refused:
        with pytest.raises(UnsafePath, match=r"telemetry\.span_file: refusing"):
            JsonLinesSpanExporter(str(path))
        if (tmp_path / "target").exists():
            assert (tmp_path / "target").read_text() == ""
    else:
        exporter = JsonLinesSpanExporter(str(path))
        span = TracerProvider().get_tracer("t").start_span("ok")
        span.end()
        exporter.export([span])  # type: ignore[list-item]
        assert _spans(path)[0]["name"] == "ok"


# --- log lines -----------------------------------------------------------------------------------------

def _record(message: str, *, exc: bool = False, **extra: Any) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(message)
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("toolcell.test", logging.WARNING, __file__, 1, "%s", (message,), exc_info)
    record.__dict__.update(extra)
    return record


# (case, message, extra fields): every one at or past the cap, the kind of input a caller controls
HOSTILE = [
    ("1 MiB of a.", "a." * (MIB // 2), {"tool": "a." * (MIB // 2)}),
    ("1 MiB of newlines", "\n" * MIB, {"invocation_id": "\n" * MIB}),
    ("bidi override and controls", "\u202eevil\x1b[2J\r\nforged line", {"error": "\u202e\x00\x07" * 1000}),
    ("a lone surrogate", "\ud800" * 10, {"reason": "\udfff"}),
]


@pytest.mark.parametrize(("message", "extra"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_json_log_lines_cap_every_field_and_are_one_ascii_line(message: str, extra: dict[str, Any]) -> None:
    line = JsonFormatter().format(_record(message, exc=True, **extra))
    assert line.isascii() and "\n" not in line and "\r" not in line
    doc = json.loads(line)
    assert len(doc["message"]) <= MESSAGE_MAX_CHARS + 40
    assert len(doc["exception"]) <= EXCEPTION_MAX_CHARS + 40
    for name in extra:
        assert len(doc[name]) <= FIELD_MAX_CHARS + 40
    if len(message) > MESSAGE_MAX_CHARS:
        assert doc["message"].startswith(message[:100]) and doc["message"].endswith(" more characters]")
    assert len(line) < 6 * (MESSAGE_MAX_CHARS + EXCEPTION_MAX_CHARS + 4 * FIELD_MAX_CHARS) + 1000


SECRET = "sekret-value-123"


# (case, message, extra fields): a held secret in each part, in a short and in a 1 MiB record
SECRET_PLACES = [
    ("in a short message", f"token {SECRET} seen", {}),
    ("at the start of 1 MiB", SECRET + "a." * (MIB // 2), {}),
    ("in an extra field", "failed", {"error": f"upstream said {SECRET}"}),
    ("in a 1 MiB extra field", "failed", {"reason": SECRET + "\n" * MIB}),
]


@pytest.mark.parametrize(("message", "extra"), [c[1:] for c in SECRET_PLACES], ids=[c[0] for c in SECRET_PLACES])
def test_redaction_covers_every_printed_part_and_reads_a_bounded_prefix(message: str, extra: dict[str, Any]) -> None:
    from toolcell.policy.scrub import Redactor

    record = _record(message, **extra)
    assert RedactingFilter(lambda: Redactor({"s": SECRET})).filter(record)
    line = JsonFormatter().format(record)
    assert SECRET not in line and len(line) < 4 * MESSAGE_MAX_CHARS
    assert len(record.getMessage()) <= MESSAGE_MAX_CHARS + 65536 + 100  # what the redactor read


def test_a_short_log_line_is_kept_whole() -> None:
    doc = json.loads(JsonFormatter().format(_record("finished", tool="text.wordcount", exit_code=0)))
    assert (doc["message"], doc["tool"], doc["exit_code"]) == ("finished", "text.wordcount", 0)


def test_text_log_lines_cap_the_message_and_escape_controls() -> None:
    formatter = TextFormatter()
    line = formatter.format(_record("call from \x1b[31mx\r\nWARNING toolcell: forged" + "z" * MIB))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\\x0a" in line
    assert len(line) < MESSAGE_MAX_CHARS + 200
    assert formatter.format(_record("plain words")).endswith("toolcell.test: plain words")


# --- configuration -------------------------------------------------------------------------------------

def test_defaults_of_the_bounds() -> None:
    config = parse_config({"version": 1}, environ={})
    assert (config.telemetry.span_file_max_bytes, config.telemetry.span_file_keep) == (16 * MIB, 3)
    assert (config.server.max_connections_per_uid, config.server.handshake_timeout_s) == (32, 5.0)


def test_the_bounds_are_configurable() -> None:
    """Needs the keys in data/config.schema.json (server.max_connections_per_uid, server.handshake_timeout,
    telemetry.span_file_max_bytes, telemetry.span_file_keep)."""
    config = parse_config({"version": 1,
                           "server": {"max_connections_per_uid": 4, "handshake_timeout": "2s"},
                           "telemetry": {"span_file_max_bytes": "1Mi", "span_file_keep": 5}}, environ={})
    assert (config.server.max_connections_per_uid, config.server.handshake_timeout_s) == (4, 2.0)
    assert (config.telemetry.span_file_max_bytes, config.telemetry.span_file_keep) == (MIB, 5)
