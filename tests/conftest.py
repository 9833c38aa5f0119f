"""Session-wide capture for the canary check (issue 5).

Every span finished in this process goes to an in-memory exporter and every log record to a
capturing handler. A canary secret (``support.CANARY``) is granted to one test tool; at the end of
the session no captured span or log line may contain it, in any encoding the redactor knows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support import CANARY
from toolcell.policy.scrub import encoded_variants

SPANS = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_provider)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


LOGS = _Capture()


@pytest.fixture(scope="session", autouse=True)
def canary_never_leaks() -> Iterator[None]:
    root = logging.getLogger()
    root.addHandler(LOGS)
    root.setLevel(logging.INFO)
    logging.getLogger("toolcell").setLevel(logging.DEBUG)
    yield
    root.removeHandler(LOGS)
    variants = encoded_variants(CANARY)
    spans = [s.to_json() for s in SPANS.get_finished_spans()]
    leaks = [v for v in variants if any(v in s for s in spans) or any(v in line for line in LOGS.lines)]
    assert not leaks, f"the canary secret leaked into spans or logs: {leaks}"
