"""OpenTelemetry SDK set-up (edge only; everything else uses the OTel API)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from runtime import __version__
from runtime.policy.scrub import Redactor
from runtime.settings import TelemetrySettings


class JsonLinesSpanExporter(SpanExporter):
    """One compact JSON object per finished span, appended to a file (0600)."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(json.loads(s.to_json()), separators=(",", ":")) for s in spans]
        with self._lock, open(self._path, "a", opener=lambda p, f: __import__("os").open(p, f, 0o600)) as fh:
            fh.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS


class RedactingFilter(logging.Filter):
    """Scrubs every log record: token shapes and every secret value the supervisor holds."""

    def __init__(self, redactor: Callable[[], Redactor]) -> None:
        super().__init__()
        self._redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        redactor = self._redactor()
        clean, counts = redactor.redact(message)
        if counts:
            record.msg, record.args = clean, ()
        if record.exc_text:
            record.exc_text = redactor.redact(record.exc_text)[0]
        return True


def install_log_redaction(holder: Any) -> None:
    """Attach the filter to every root handler; ``holder.redactor`` is read per record (reload-safe)."""
    filt = RedactingFilter(lambda: holder.redactor)
    for handler in logging.getLogger().handlers:
        handler.addFilter(filt)


def setup_tracing(settings: TelemetrySettings) -> TracerProvider:
    """Install a global TracerProvider with the configured exporters; returns it for shutdown."""
    provider = TracerProvider(resource=Resource.create({
        "service.name": settings.service_name, "service.version": __version__}))
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint
        insecure = endpoint.startswith("http://") or not endpoint.startswith("https://")
        provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint, insecure=insecure), schedule_delay_millis=500))
    if settings.span_file:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(settings.span_file)))
    if settings.console:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider
