"""OpenTelemetry SDK set-up (edge only; everything else uses the OTel API)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from toolcell import __version__
from toolcell.policy.scrub import Redactor
from toolcell.safepath import open_private, private_dir
from toolcell.settings import TelemetrySettings

if TYPE_CHECKING:
    from toolcell.probehttp import Health, ProbeServer

# What one span may carry (caller strings reach attributes: tool names, ids, error messages). Values longer
# than this are cut by the SDK; attributes, events and links beyond the counts are dropped.
SPAN_LIMITS = SpanLimits(max_attributes=64, max_events=64, max_links=16, max_event_attributes=16,
                         max_link_attributes=16, max_attribute_length=256, max_span_attribute_length=256)


class JsonLinesSpanExporter(SpanExporter):
    """One compact JSON object per finished span, appended to a file (0600) that rotates.

    The directory must be ours alone and the file is opened without following symlinks
    (``safepath``). When a batch would take the file past ``max_bytes`` it becomes ``<file>.1`` (the
    older ones shift to ``.2`` ... ``.<keep>``, the oldest is removed) and a new file starts: on disk at
    most ``(keep + 1) * max_bytes`` plus one batch.
    """

    def __init__(self, path: str, *, max_bytes: int = 16 * 1024 * 1024, keep: int = 3) -> None:
        self._path = private_dir(Path(path).parent, key="telemetry.span_file") / Path(path).name
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        os.close(open_private(self._path, key="telemetry.span_file"))  # refuse a planted file at start-up

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(json.loads(s.to_json()), separators=(",", ":")) for s in spans]
        data = "".join(line + "\n" for line in lines).encode()
        with self._lock:
            fd = open_private(self._path, key="telemetry.span_file")
            try:
                size = os.fstat(fd).st_size
                if size and size + len(data) > self.max_bytes:
                    os.close(fd)
                    fd = -1
                    self._rotate()
                    fd = open_private(self._path, key="telemetry.span_file")
                with os.fdopen(fd, "ab", closefd=False) as fh:
                    fh.write(data)
            finally:
                if fd >= 0:
                    os.close(fd)
        return SpanExportResult.SUCCESS

    def _rotate(self) -> None:
        """``file`` -> ``file.1`` -> ... -> ``file.<keep>``; the oldest is removed (all in our private dir)."""
        name = self._path.name
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path.with_name(f"{name}.{self.keep}") if self.keep else self._path)
        for n in range(self.keep - 1, -1, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(self._path.with_name(f"{name}.{n}") if n else self._path,
                          self._path.with_name(f"{name}.{n + 1}"))


class RedactingFilter(logging.Filter):
    """Scrubs every log record: token shapes and every secret value the supervisor holds."""

    def __init__(self, redactor: Callable[[], Redactor]) -> None:
        super().__init__()
        self._redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        # Redaction reads at most a bounded prefix of each part (the formatter keeps less still): a cut
        # through a secret falls beyond what is printed unless the secret is longer than the margin.
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        redactor = self._redactor()
        cut = len(message) > MESSAGE_MAX_CHARS + _REDACT_MARGIN
        clean, counts = redactor.redact(message[:MESSAGE_MAX_CHARS + _REDACT_MARGIN] if cut else message)
        if counts or cut:
            record.msg, record.args = clean, ()
        if record.exc_text:
            record.exc_text = redactor.redact(record.exc_text[:EXCEPTION_MAX_CHARS + _REDACT_MARGIN])[0]
        for name in LOG_FIELDS:
            value = record.__dict__.get(name)
            if isinstance(value, str):
                record.__dict__[name] = redactor.redact(value[:FIELD_MAX_CHARS + _REDACT_MARGIN])[0]
        return True


def install_log_redaction(holder: Any) -> None:
    """Attach the filter to every root handler; ``holder.redactor`` is read per record (reload-safe)."""
    filt = RedactingFilter(lambda: holder.redactor)
    for handler in logging.getLogger().handlers:
        handler.addFilter(filt)


def setup_tracing(settings: TelemetrySettings) -> TracerProvider:
    """Install a global TracerProvider with the configured exporters; returns it for shutdown."""
    provider = TracerProvider(span_limits=SPAN_LIMITS, resource=Resource.create({
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
        exporter = JsonLinesSpanExporter(settings.span_file, max_bytes=settings.span_file_max_bytes,
                                         keep=settings.span_file_keep)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
    if settings.console:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


# Attributes a log call may attach with ``extra=``; anything else stays out of the JSON line.
LOG_FIELDS = ("tool", "invocation_id", "status", "ending", "exit_code", "duration_ms", "code", "error", "field",
              "reason", "session_id")
# The longest each part of a log line may be, in characters: an ``extra=`` field, the message, a traceback.
FIELD_MAX_CHARS = 256
MESSAGE_MAX_CHARS = 2048
EXCEPTION_MAX_CHARS = 16384
_REDACT_MARGIN = 65536  # redaction sees this much more than is printed, so no secret is cut before it
# C0 controls (but tab), DEL and C1 controls, shown as escapes in text lines (a newline would forge a line).
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x09), *range(0x0a, 0x20), *range(0x7f, 0xa0))}


def cap(value: str, limit: int) -> str:
    """``value`` if it fits, else its first ``limit`` characters and how many were cut (linear time)."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}...[{len(value) - limit} more characters]"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, trace/span ids, a few known fields.

    Runs after ``RedactingFilter`` (a handler's filters run before its formatter), so the message and
    traceback it prints are the redacted ones. Payloads are never logged by toolcell's own code. Every
    string is capped (``FIELD_MAX_CHARS`` ...) after redaction, and the line is ASCII: control and
    non-ASCII characters (bidi overrides, lone surrogates) are JSON escapes.
    """

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": cap(record.getMessage(), MESSAGE_MAX_CHARS),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            doc["trace_id"] = format(ctx.trace_id, "032x")
            doc["span_id"] = format(ctx.span_id, "016x")
        for name in LOG_FIELDS:
            if name in record.__dict__:
                value = record.__dict__[name]
                doc[name] = value if isinstance(value, int | float | bool) or value is None \
                    else cap(str(value), FIELD_MAX_CHARS)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exception"] = cap(record.exc_text, EXCEPTION_MAX_CHARS)
        return json.dumps(doc, ensure_ascii=True)


class TextFormatter(logging.Formatter):
    """``time level logger: message``, the message capped and its control characters escaped."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_text:  # set by RedactingFilter, which runs first
            record.exc_text = cap(record.exc_text, EXCEPTION_MAX_CHARS)
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = cap(record.message, MESSAGE_MAX_CHARS).translate(_CONTROLS)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return cap(super().formatException(ei), EXCEPTION_MAX_CHARS)


def setup_logging(log_format: str, verbose: bool = False) -> None:
    """Serve's logging: one stderr handler, JSON lines (or text); call before ``install_log_redaction``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


@dataclass
class MetricsHandle:
    provider: MeterProvider
    prometheus_address: str = ""
    _httpd: ProbeServer | None = field(default=None, repr=False)

    def set_health(self, health: Callable[[], Health]) -> None:
        """What the listener's ``/healthz`` reports from now on (``starting`` until this is called)."""
        if self._httpd is not None:
            self._httpd.health = health

    def shutdown(self) -> None:
        if self._httpd is not None:
            self._httpd.close()
        self.provider.shutdown()


def setup_metrics(settings: TelemetrySettings) -> MetricsHandle:
    """Install a global MeterProvider: OTLP/gRPC push when an endpoint is set, Prometheus pull when asked.

    The Prometheus listener is ``probehttp``'s (stdlib, its own threads): ``/metrics`` beside ``/healthz``
    and ``/livez`` for probes that start no interpreter (``MetricsHandle.set_health``).
    """
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

        from toolcell.probehttp import ProbeServer, parse_listen

        readers.append(PrometheusMetricReader())
        host, port = parse_listen(settings.prometheus_listen)
        httpd = ProbeServer(host, port).start()
        address = httpd.address
        logging.getLogger("toolcell.telemetry").info(
            "Prometheus metrics on http://%s/metrics (health: /healthz, /livez)", address)
    provider = MeterProvider(metric_readers=readers, resource=Resource.create({
        "service.name": settings.service_name, "service.version": __version__}))
    metrics.set_meter_provider(provider)
    return MetricsHandle(provider=provider, prometheus_address=address, _httpd=httpd)
