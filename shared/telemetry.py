"""Tracing set-up from the standard OpenTelemetry variables.

With ``OTEL_TRACES_EXPORTER=none`` (our default) no SDK is installed: the API's no-op tracer
costs next to nothing per call. ``console`` prints spans; ``otlp`` sends them to the collector
named by the standard ``OTEL_EXPORTER_OTLP_*`` variables.
"""

from __future__ import annotations

import atexit
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from profilemesh.shared.settings import Settings


def configure_tracing(settings: Settings, service: str) -> TracerProvider | None:
    """Install the process-wide tracer provider for ``service``; ``None`` when tracing is off."""
    if settings.traces_exporter == "none":
        return None
    name = settings.service_name or f"profilemesh-{service}"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(_exporter(settings.traces_exporter)))
    trace.set_tracer_provider(provider)
    # Flush what is buffered when the process ends normally.
    atexit.register(provider.shutdown)
    return provider


def _exporter(kind: str) -> SpanExporter:
    if kind == "console":
        return ConsoleSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as error:  # the exporter is an optional extra
        raise RuntimeError(
            "OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter: pip install 'profilemesh[otlp]'"
        ) from error
    exporter: SpanExporter = OTLPSpanExporter()
    return exporter


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits, or ``None`` outside a sampled trace."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x")


def trace_headers() -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``...), for a log message, so
    that whoever consumes it can link its work to the span that produced it."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def linked_context(headers: Mapping[str, str]) -> Context:
    """The trace context carried by a log message's headers (empty when there is none)."""
    return propagate.extract(headers)
