"""OpenTelemetry SDK set-up (edge only; everything else uses the OTel API)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
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
        # Batched on the SDK's own thread: a synchronous file write per span would block the event loop
        # about a dozen times per invocation (found profiling the warm path). Flushed on shutdown.
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(settings.span_file),
                                                       schedule_delay_millis=200))
    if settings.console:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


# Attributes a log call may attach with ``extra=``; anything else stays out of the JSON line.
LOG_FIELDS = ("tool", "invocation_id", "status", "exit_code", "duration_ms", "code", "error", "field", "reason")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, trace/span ids, a few known fields.

    Runs after ``RedactingFilter`` (a handler's filters run before its formatter), so the message and
    traceback it prints are the redacted ones. Payloads are never logged by toolcell's own code.
    """

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            doc["trace_id"] = format(ctx.trace_id, "032x")
            doc["span_id"] = format(ctx.span_id, "016x")
        for name in LOG_FIELDS:
            if name in record.__dict__:
                doc[name] = record.__dict__[name]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(log_format: str, verbose: bool = False) -> None:
    """Serve's logging: one stderr handler, JSON lines (or text); call before ``install_log_redaction``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


@dataclass
class MetricsHandle:
    provider: MeterProvider
    prometheus_address: str = ""
    _httpd: Any = field(default=None, repr=False)

    def shutdown(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        self.provider.shutdown()


def setup_metrics(settings: TelemetrySettings) -> MetricsHandle:
    """Install a global MeterProvider: OTLP/gRPC push when an endpoint is set, Prometheus pull when asked."""
    readers: list[MetricReader] = []
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        endpoint = settings.otlp_endpoint
        readers.append(PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://")),
            export_interval_millis=settings.metrics_interval_s * 1000))
    httpd, address = None, ""
    if settings.prometheus_listen:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import REGISTRY, start_http_server

        readers.append(PrometheusMetricReader())
        host, _, port = settings.prometheus_listen.rpartition(":")
        httpd, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
        address = f"{host or '127.0.0.1'}:{httpd.server_port}"
        logging.getLogger("toolcell.telemetry").info("Prometheus metrics on http://%s/metrics", address)
    provider = MeterProvider(metric_readers=readers, resource=Resource.create({
        "service.name": settings.service_name, "service.version": __version__}))
    metrics.set_meter_provider(provider)
    return MetricsHandle(provider=provider, prometheus_address=address, _httpd=httpd)
