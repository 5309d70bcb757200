"""One trace follows a call from a client through service A into service B."""

from __future__ import annotations

from google.protobuf import struct_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from profilemesh.shared.channel import create_channel
from profilemesh.shared.server import create_server
from profilemesh.shared.settings import Settings
from tests.probe import Probe, probe_binding, probe_call


async def test_a_call_through_two_services_is_one_trace(
    spans: InMemorySpanExporter, mesh_settings: Settings
) -> None:
    server_b, port_b = create_server([probe_binding(Probe(mesh_settings))], mesh_settings, port=0)
    probe_a = Probe(mesh_settings, forward_to=f"127.0.0.1:{port_b}")
    server_a, port_a = create_server([probe_binding(probe_a)], mesh_settings, port=0)
    await server_b.start()
    await server_a.start()
    try:
        request = struct_pb2.Struct()
        request.update({"hello": "mesh"})
        with trace.get_tracer("test").start_as_current_span("caller") as root:
            async with create_channel(f"127.0.0.1:{port_a}", mesh_settings) as channel:
                answer = await probe_call(channel, "Forward")(request)
        assert answer == request
    finally:
        await server_a.stop(0)
        await server_b.stop(0)

    finished = spans.get_finished_spans()
    trace_id = root.get_span_context().trace_id
    assert {span.context.trace_id for span in finished} == {trace_id}

    def one(name_part: str, kind: SpanKind):  # type: ignore[no-untyped-def]
        matching = [s for s in finished if name_part in s.name and s.kind == kind]
        assert len(matching) == 1, [(s.name, s.kind) for s in finished]
        return matching[0]

    client_to_a = one("Forward", SpanKind.CLIENT)
    server_a_span = one("Forward", SpanKind.SERVER)
    client_to_b = one("Echo", SpanKind.CLIENT)
    server_b_span = one("Echo", SpanKind.SERVER)
    # The parent chain is unbroken: caller -> A (client, server) -> B (client, server).
    assert client_to_a.parent.span_id == root.get_span_context().span_id
    assert server_a_span.parent.span_id == client_to_a.context.span_id
    assert client_to_b.parent.span_id == server_a_span.context.span_id
    assert server_b_span.parent.span_id == client_to_b.context.span_id
    assert server_b_span.parent.is_remote


def test_json_logs_carry_the_current_trace_id(spans: InMemorySpanExporter) -> None:
    import json
    import logging

    from profilemesh.shared.json_logging import JsonFormatter

    record = logging.LogRecord("svc", logging.INFO, __file__, 1, "inside", None, None)
    with trace.get_tracer("test").start_as_current_span("work") as span:
        line = json.loads(JsonFormatter("features").format(record))
    context = span.get_span_context()
    assert line["trace_id"] == format(context.trace_id, "032x")
    assert line["span_id"] == format(context.span_id, "016x")


async def test_log_messages_carry_the_producers_trace_context(
    spans: InMemorySpanExporter, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from profilemesh.shared.log.embedded import EmbeddedLog
    from profilemesh.shared.telemetry import linked_context

    log = await EmbeddedLog.open(tmp_path, "s", partitions=1)
    with trace.get_tracer("test").start_as_current_span("produce") as producer:
        await log.append("k", b"payload")
    [batch] = await log.read(0, 0)
    await log.close()
    carried = trace.get_current_span(linked_context(batch.headers_of(0))).get_span_context()
    assert carried.trace_id == producer.get_span_context().trace_id
    assert carried.span_id == producer.get_span_context().span_id
