"""Tracing set-up from the standard OpenTelemetry variables.

With ``OTEL_TRACES_EXPORTER=none`` (our default) no SDK is installed: the API's no-op tracer
costs next to nothing per call. ``console`` prints spans; ``otlp`` sends them to the collector
named by the standard ``OTEL_EXPORTER_OTLP_*`` variables.

Trace context also travels through the logs: every appended record carries its producer's W3C
``traceparent``/``tracestate`` in its headers (:func:`trace_headers`), rows that background
work sends later keep theirs (:func:`stored_trace_context`), and the span over a batch
continues the first record's trace and links to every producer (:func:`batch_span`).
"""

from __future__ import annotations

import atexit
import itertools
import json
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.util.types import AttributeValue

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


MAX_LINKS = 128
"""Links a batch span keeps at most (the SDK's default limit; more would be dropped anyway)."""


def stored_trace_context() -> str | None:
    """The current trace context as text to keep with a row that background work picks up
    later (a queued log message, a delivery): JSON of its W3C headers; ``None`` outside a
    trace, so that nothing is stored when tracing is off and no caller sent a context."""
    headers = trace_headers()
    return json.dumps(headers, separators=(",", ":"), sort_keys=True) if headers else None


def restored_trace_context(text: str | None) -> dict[str, str]:
    """The headers :func:`stored_trace_context` kept (empty for ``None``)."""
    if not text:
        return {}
    headers: dict[str, str] = json.loads(text)
    return headers


def batch_span(
    tracer: trace.Tracer,
    name: str,
    carriers: Iterable[Mapping[str, str]],
    *,
    kind: trace.SpanKind,
    attributes: Mapping[str, AttributeValue],
) -> AbstractContextManager[trace.Span]:
    """The current span, until the block ends, of work on a batch of messages, each carrying
    the trace context of whatever produced it (``carriers``: one per message, in order).

    The span is the child of the first message's producer, so that one trace follows a message
    from service to service; it is linked to every distinct producer (the first one too), so
    that none of the others is lost. ``carriers`` is only read past its first element when the
    span is recorded: with tracing off, a batch costs one extraction, as a single message does.
    """
    messages = iter(carriers)
    first = next(messages, None)
    parent = linked_context(first) if first is not None else None
    span = tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
    if span.is_recording() and first is not None:
        for producer in _distinct_producers(itertools.chain((first,), messages)):
            span.add_link(producer)
    return trace.use_span(span, end_on_exit=True)


def _distinct_producers(carriers: Iterable[Mapping[str, str]]) -> list[trace.SpanContext]:
    seen_carriers: set[frozenset[tuple[str, str]]] = set()
    seen: set[tuple[int, int]] = set()
    producers = []
    previous: Mapping[str, str] | None = None
    for carrier in carriers:
        # Messages of one append share their headers (often the very same mapping): extract
        # each distinct set once.
        if carrier is previous:
            continue
        previous = carrier
        key = frozenset(carrier.items())
        if key in seen_carriers:
            continue
        seen_carriers.add(key)
        context = trace.get_current_span(linked_context(carrier)).get_span_context()
        if not context.is_valid or (context.trace_id, context.span_id) in seen:
            continue
        seen.add((context.trace_id, context.span_id))
        producers.append(context)
        if len(producers) == MAX_LINKS:
            break
    return producers
