"""Event ingestion over gRPC (batched, streamed, one at a time), next to its in-process ceiling.

Realistic track events (a unique message id each, users spread over 100,000 ids, a ~1 KB
``properties`` Struct and a browser context) are built and serialized before any timing, and
so are the requests that carry them: the client sends prebuilt ``SendEventsRequest``,
``StreamEventsRequest`` and ``SendEventRequest`` bytes through raw channel methods, so that on
this shared 2-core machine it spends as little CPU as possible next to the service.

Each part runs against ``profilemesh serve ingestion`` started exactly as a user would, on a
free localhost port, with a fresh data directory (so deduplication never sees an id twice):

a. Batched: ``CLIENTS`` concurrent callers, each sending ``SendEvents`` batches of ``BATCH``
   events one after the other; every response must say all of its events were accepted, and
   afterwards the log (``LogService.GetOffsets`` on ``events``) must hold exactly as many.
b. Streamed: ``STREAMS`` concurrent ``StreamEvents`` client streams of ``BATCH``-event
   messages; each final response must count all of its events accepted.
c. Single: one ``SendEvent`` at a time: p50/p99 of the acknowledgement (durable before it).
d. Reference, the in-process ceiling: in this process, a fresh ``Intake`` over a fresh event
   log (opened as the service opens its own) is given the same ``BATCH``-event batches from
   ``CLIENTS`` concurrent tasks: parse, checks, dedup and the durable append, without gRPC.

The ratio is (a) / (d): what the service keeps of the ceiling once requests cross gRPC. For
scale, (a) also reports the CPU time the service and this client spent per event, and the same
requests are sent to a bare grpc.aio server (a subprocess without interceptors answering each
with a prebuilt all-accepted response): what gRPC alone allows on this machine.

    python bench/ingest.py [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
from google.protobuf import struct_pb2

from profilemesh.common.v1 import log_service_pb2, log_service_pb2_grpc
from profilemesh.ingestion.v1 import event_pb2, ingestion_service_pb2, result_pb2
from profilemesh.services.ingestion.intake import Intake
from profilemesh.services.ingestion.tracking_plans import TrackingPlans
from profilemesh.shared.log.hosting import open_log
from profilemesh.shared.settings import IngestionSettings, Settings
from profilemesh.shared.wire import length_delimited, string_field

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report, free_port, parse_args, percentile, wait_serving

SERVICE = "/profilemesh.ingestion.v1.IngestionService"
CLIENTS = 8
STREAMS = 4
BATCH = 500
USERS = 100_000
TEMPLATES = 64
SOURCE = "bench"
WARMUP_BATCHES = 16
ACCEPTED = result_pb2.ITEM_STATUS_ACCEPTED

Batch = list[bytes]
"""Serialized ``Event`` s, one request's worth."""


# -- the events ------------------------------------------------------------------------------


def _properties(rng: random.Random) -> struct_pb2.Struct:
    """A ~1 KB ``Order Completed`` properties object, as a shop's front end would send it."""
    properties = struct_pb2.Struct()
    products: list[dict[str, str | float]] = [
        {
            "product_id": f"P{rng.randrange(10**6):06d}",
            "sku": f"SKU-{rng.randrange(10**8):08d}",
            "name": rng.choice(["Trail shoe", "Rain jacket", "Wool socks", "Day pack"]),
            "category": rng.choice(["Footwear", "Outerwear", "Accessories"]),
            "brand": rng.choice(["Northwind", "Contoso", "Fabrikam"]),
            "price": round(rng.uniform(5, 250), 2),
            "quantity": rng.randrange(1, 4),
            "url": f"https://shop.example.com/p/{rng.randrange(10**6)}",
        }
        for _ in range(4)
    ]
    properties.update(
        {
            "order_id": f"ORD-{rng.randrange(10**9):09d}",
            "checkout_id": f"CHK-{rng.randrange(10**9):09d}",
            "affiliation": "Online store",
            "revenue": round(rng.uniform(20, 900), 2),
            "shipping": 4.9,
            "tax": round(rng.uniform(1, 40), 2),
            "discount": 0,
            "coupon": rng.choice(["", "SPRING10", "WELCOME"]),
            "currency": "EUR",
            "products": products,
        }
    )
    return properties


def _templates(count: int, now_ms: int) -> list[bytes]:
    """Serialized events without ids (fields 1-3): times (to the millisecond, as SDKs send
    them), context and a track body."""
    rng = random.Random(7)
    templates = []
    for _ in range(count):
        event = event_pb2.Event(
            context=event_pb2.Context(
                ip=f"203.0.113.{rng.randrange(256)}",
                user_agent="Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/124.0",
                locale="en-GB",
                library=event_pb2.Library(name="analytics.js", version="5.2.0"),
                page=event_pb2.Page(path="/checkout/complete", url="https://shop.example.com/"),
            ),
            track=event_pb2.TrackEvent(event="Order Completed", properties=_properties(rng)),
        )
        event.timestamp.FromMilliseconds(now_ms - rng.randrange(60_000))
        event.sent_at.FromMilliseconds(now_ms)
        templates.append(event.SerializeToString(deterministic=True))
    return templates


def _events(prefix: str, count: int) -> list[bytes]:
    """``count`` serialized track events with unique message ids starting with ``prefix``.

    The ids (fields 1 and 2) precede the template (fields 4 and up), so each is exactly what
    ``Event.SerializeToString(deterministic=True)`` would give, at a fraction of the cost."""
    templates = _templates(TEMPLATES, time.time_ns() // 1_000_000)
    return [
        string_field(1, f"{prefix}-{i:08d}")
        + string_field(2, f"user-{(i * 7919) % USERS:06d}")
        + templates[i % TEMPLATES]
        for i in range(count)
    ]


def _batches(prefix: str, count: int) -> list[Batch]:
    """``count`` batches of ``BATCH`` distinct events."""
    events = _events(prefix, count * BATCH)
    return [events[i * BATCH : (i + 1) * BATCH] for i in range(count)]


def _request(batch: Batch) -> bytes:
    """A serialized ``SendEventsRequest`` (or ``StreamEventsRequest``: the same fields)."""
    return b"".join(length_delimited(1, event) for event in batch) + string_field(2, SOURCE)


def _check_encoding(batch: Batch) -> None:
    """The hand-built bytes are what the protobuf runtime builds (so the service sees the
    requests a real client would send), and the properties are about 1 KB."""
    events = [event_pb2.Event.FromString(event) for event in batch]
    request = ingestion_service_pb2.SendEventsRequest(events=events, source=SOURCE)
    sizes = [len(event.track.properties.SerializeToString()) for event in events]
    if (
        [event.SerializeToString(deterministic=True) for event in events] != batch
        or request.SerializeToString(deterministic=True) != _request(batch)
        or not 900 <= min(sizes) <= max(sizes) <= 1300
    ):
        raise RuntimeError("the prebuilt requests are not what protobuf would send")


# -- the service -----------------------------------------------------------------------------


class Service:
    """``profilemesh serve ingestion`` in a subprocess, on a free port, over ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PROFILEMESH_DATA_DIR": str(data_dir),
            "PROFILEMESH_SERVICES__INGESTION__PORT": str(self.port),
            "PROFILEMESH_LOG_LEVEL": "WARNING",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "profilemesh.services.cli", "serve", "ingestion"], env=env
        )

    async def __aenter__(self) -> Service:
        try:
            await wait_serving(self.target, self.process)
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    async def logged(self) -> int:
        """How many messages the service's ``events`` log holds (``GetOffsets``)."""
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = log_service_pb2_grpc.LogServiceStub(channel)
            answer = await stub.GetOffsets(log_service_pb2.GetOffsetsRequest(stream="events"))
        return sum(p.next_offset - p.first_offset for p in answer.partitions)

    def stop(self) -> None:
        """SIGTERM, and wait for the process (kill it if it does not stop)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- (a) batched -----------------------------------------------------------------------------


def _check_batch_response(response: ingestion_service_pb2.SendEventsResponse) -> None:
    if (
        response.accepted_count != BATCH
        or response.duplicate_count
        or response.rejected_count
        or len(response.results) != BATCH
        or any(result.status != ACCEPTED for result in response.results)
    ):
        raise RuntimeError(
            f"not all accepted: {response.accepted_count} accepted, "
            f"{response.duplicate_count} duplicates, {response.rejected_count} rejected"
        )


async def _send_batches(target: str, requests: Sequence[bytes]) -> float:
    """``CLIENTS`` callers (one channel each) share ``requests``: seconds taken."""
    queue = iter(requests)

    async def client() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            send = channel.unary_unary(
                f"{SERVICE}/SendEvents",
                request_serializer=None,
                response_deserializer=ingestion_service_pb2.SendEventsResponse.FromString,
            )
            await channel.channel_ready()
            for request in queue:
                _check_batch_response(await send(request, timeout=60))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return time.perf_counter() - started


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from ``/proc`` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _bench_batched(root: Path, batches: int, report: Report) -> None:
    warmup = [_request(b) for b in _batches("warm", WARMUP_BATCHES)]
    requests = [_request(b) for b in _batches("batched", batches)]
    events = batches * BATCH
    async with Service(root / "batched") as service:
        await _send_batches(service.target, warmup)
        service_cpu, client_cpu = _cpu_seconds(service.process.pid), time.process_time()
        elapsed = await _send_batches(service.target, requests)
        service_cpu = _cpu_seconds(service.process.pid) - service_cpu
        client_cpu = time.process_time() - client_cpu
        expected = (len(warmup) + len(requests)) * BATCH
        logged = await service.logged()
    if logged != expected:
        raise RuntimeError(f"the log holds {logged:,} events; {expected:,} were accepted")
    report.figures["batched_events_per_s"] = events / elapsed
    report.figures["batched_mb_per_s"] = sum(map(len, requests)) / elapsed / 1e6
    report.figures["batched_call_ms_mean"] = elapsed / batches * CLIENTS * 1000
    report.figures["batched_service_cpu_us_per_event"] = service_cpu / events * 1e6
    report.figures["batched_client_cpu_us_per_event"] = client_cpu / events * 1e6

    async with BareServer() as bare:
        await _send_batches(bare.target, warmup)
        elapsed = await _send_batches(bare.target, requests)
    report.references["bare_grpc_events_per_s"] = events / elapsed


# -- a bare gRPC server, for scale -----------------------------------------------------------


def _bare_response() -> bytes:
    """What the service answers to a batch of ``BATCH`` accepted events."""
    return ingestion_service_pb2.SendEventsResponse(
        results=[
            result_pb2.EventResult(index=i, message_id=f"batched-{i:08d}", status=ACCEPTED)
            for i in range(BATCH)
        ],
        accepted_count=BATCH,
    ).SerializeToString()


async def _serve_bare(port: int) -> None:
    """A bare grpc.aio server (no interceptors) answering ``SendEvents`` with a prebuilt
    all-accepted response, whatever the request: what gRPC alone costs the same calls."""
    response = _bare_response()

    async def send_events(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    max_bytes = Settings().max_message_mib * 1024 * 1024
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_bytes)])
    handler = grpc.unary_unary_rpc_method_handler(send_events)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE[1:], {"SendEvents": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


class BareServer:
    """:func:`_serve_bare` in a subprocess on a free port."""

    def __init__(self) -> None:
        port = free_port()
        self.target = f"127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, __file__, "--bare-server", str(port)])

    async def __aenter__(self) -> BareServer:
        deadline = time.monotonic() + 30
        while True:
            try:
                async with grpc.aio.insecure_channel(self.target) as channel:
                    await channel.unary_unary(f"{SERVICE}/SendEvents")(b"", timeout=0.5)
                return self
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    await self.__aexit__()
                    raise
                await asyncio.sleep(0.1)

    async def __aexit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


# -- (b) streamed ----------------------------------------------------------------------------


async def _stream(target: str, messages: Sequence[bytes]) -> float:
    """``STREAMS`` concurrent streams, each of ``messages[i::STREAMS]``: seconds taken."""

    async def stream(index: int, channel: grpc.aio.Channel) -> None:
        call = channel.stream_unary(
            f"{SERVICE}/StreamEvents",
            request_serializer=None,
            response_deserializer=ingestion_service_pb2.StreamEventsResponse.FromString,
        )
        mine = messages[index::STREAMS]

        async def requests() -> AsyncIterator[bytes]:
            for message in mine:
                yield message

        response = await call(requests(), timeout=300)
        if response.accepted_count != len(mine) * BATCH or response.rejected_count:
            raise RuntimeError(f"stream {index}: {response}")

    async def client(index: int) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            await channel.channel_ready()
            await stream(index, channel)

    started = time.perf_counter()
    await asyncio.gather(*(client(index) for index in range(STREAMS)))
    return time.perf_counter() - started


async def _bench_streamed(root: Path, batches: int, report: Report) -> None:
    warmup = [_request(b) for b in _batches("warm", WARMUP_BATCHES)]
    messages = [_request(b) for b in _batches("streamed", batches)]
    async with Service(root / "streamed") as service:
        await _stream(service.target, warmup)
        elapsed = await _stream(service.target, messages)
        expected = (len(warmup) + len(messages)) * BATCH
        logged = await service.logged()
    if logged != expected:
        raise RuntimeError(f"the log holds {logged:,} events; {expected:,} were accepted")
    report.figures["streamed_events_per_s"] = batches * BATCH / elapsed


# -- (c) single ------------------------------------------------------------------------------


async def _bench_single(root: Path, count: int, report: Report) -> None:
    warmup = 100
    events = _events("single", warmup + count)
    requests = [length_delimited(1, event) + string_field(2, SOURCE) for event in events]
    latencies: list[float] = []
    async with Service(root / "single") as service:
        async with grpc.aio.insecure_channel(service.target) as channel:
            send = channel.unary_unary(
                f"{SERVICE}/SendEvent",
                request_serializer=None,
                response_deserializer=ingestion_service_pb2.SendEventResponse.FromString,
            )
            for request in requests:
                started = time.perf_counter()
                response = await send(request, timeout=10)
                latencies.append((time.perf_counter() - started) * 1000)
                if response.result.status != ACCEPTED:
                    raise RuntimeError(f"not accepted: {response}")
        logged = await service.logged()
    if logged != len(requests):
        raise RuntimeError(f"the log holds {logged:,} events; {len(requests):,} were accepted")
    latencies = latencies[warmup:]
    report.figures["single_p50_ms"] = percentile(latencies, 50)
    report.figures["single_p99_ms"] = percentile(latencies, 99)
    report.figures["single_max_ms"] = max(latencies)


# -- (d) the in-process ceiling --------------------------------------------------------------


async def _bench_in_process(root: Path, batches: int, report: Report) -> None:
    """The same batches given to ``Intake.send_events`` by ``CLIENTS`` tasks in this process,
    over the event log opened as the service opens it (``open_log``)."""
    warmup = _batches("warm", WARMUP_BATCHES)
    measured = _batches("in-process", batches)
    data_dir = root / "in-process"
    settings = Settings(data_dir=data_dir)
    log = await open_log(settings, "ingestion")
    service_dir = settings.service_data_dir("ingestion")
    intake = Intake(
        log,
        IngestionSettings(),
        TrackingPlans(service_dir / "tracking_plans.json"),
        service_dir / "dedup.snapshot",
    )
    try:
        await intake.recover()

        async def run(work: Sequence[Batch]) -> float:
            queue = iter(work)

            async def task() -> None:
                for batch in queue:
                    outcome = await intake.send_events(batch, SOURCE)
                    if len(outcome.accepted) != BATCH:
                        raise RuntimeError(f"in-process: {len(outcome.accepted)} accepted")

            started = time.perf_counter()
            await asyncio.gather(*(task() for _ in range(CLIENTS)))
            return time.perf_counter() - started

        await run(warmup)
        elapsed = await run(measured)
        logged = sum(r.next - r.first for r in await log.offsets())
    finally:
        await log.close()
    if logged != (len(warmup) + len(measured)) * BATCH:
        raise RuntimeError(f"in-process: the log holds {logged:,} events")
    report.references["in_process_events_per_s"] = batches * BATCH / elapsed


# -- main ------------------------------------------------------------------------------------


async def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    events = 100_000 if args.quick else 400_000
    batches = events // BATCH
    singles = 500 if args.quick else 2_000
    _check_encoding(_batches("check", 1)[0])
    report = Report("ingest")
    # On the disk a data directory would be on (here: the same as the temporary directory).
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        await _bench_in_process(root, batches, report)
        await _bench_batched(root, batches, report)
        await _bench_streamed(root, batches, report)
        await _bench_single(root, singles, report)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    batched = report.figures["batched_events_per_s"]
    ceiling = report.references["in_process_events_per_s"]
    report.ratios["batched_vs_in_process"] = batched / ceiling
    report.ratios["streamed_vs_in_process"] = report.figures["streamed_events_per_s"] / ceiling
    report.ratios["batched_vs_bare_grpc"] = batched / report.references["bare_grpc_events_per_s"]
    report.target("batched_events_per_s", ">= 100,000 events/s", batched >= 100_000)
    report.target(
        "batched_vs_in_process",
        ">= 0.5 of in-process",
        report.ratios["batched_vs_in_process"] >= 0.5,
    )
    report.target("single_p99_ms", "p99 <= 5 ms", report.figures["single_p99_ms"] <= 5.0)
    print(
        f"ingest: {events:,} events ({BATCH} per batch, {CLIENTS} clients) batched and "
        f"in-process, the same over {STREAMS} streams; {singles:,} single events one at a time"
    )
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--bare-server":
        asyncio.run(_serve_bare(int(sys.argv[2])))
    else:
        sys.exit(asyncio.run(main()))
