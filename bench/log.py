"""Durable appends to the embedded log and Subscribe over gRPC, each next to a bare reference.

1. Appends: 16 asyncio producers append batches of 500 one-KB entries (keys over many users,
   so every partition is used) to an ``EmbeddedLog`` in a temporary directory; each append
   returns once durable. Reference, in the same run and on the same disk: one thread writing
   the same number of bytes sequentially to one file, in chunks of one batch per producer,
   each chunk followed by ``fdatasync`` (the same durability, with no log around it). Then
   one producer appending one record at a time: p50/p99 of a single durable append.
2. Subscribe: the ``events`` log is pre-filled in a fresh data directory, then
   ``profilemesh serve ingestion`` is started on it exactly as a user would, and every
   partition is read from offset 0 to its end through ``RemoteLog.subscribe`` (all partitions
   at once, every payload unpacked). Reference: the same read of the same log in-process,
   through ``EmbeddedLog.subscribe``.

Throughputs are the best of the rounds run (3 with ``--quick``, 5 otherwise), the log's and the
reference's alike: on a virtual disk the first pass over fresh page cache, and now and then
another, runs several times slower than the rest, whatever is measured.

    python bench/log.py [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from profilemesh.ingestion.v1 import event_log_pb2, event_pb2
from profilemesh.shared.log.api import Log, LogReader, type_url
from profilemesh.shared.log.client import RemoteLog
from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.log.hosting import STREAMS, open_log
from profilemesh.shared.log.segments import SEGMENT_SUFFIX
from profilemesh.shared.settings import Endpoint, Endpoints, Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report, free_port, parse_args, percentile, wait_serving

PRODUCERS = 16
BATCH = 500
PAYLOAD_BYTES = 1024
USERS = 100_000
PARTITIONS = 8
SINGLE_APPENDS = 500
MB = 1_000_000
PAYLOAD_TYPE = type_url(STREAMS["ingestion"][1])

Entries = list[tuple[str, bytes]]


def _event_payload(index: int) -> bytes:
    """A ~1 KB ``IngestedItem`` (what the events log holds, so the service that later serves
    the log can read it), padded with random text so nothing along the way compresses it."""
    event = event_pb2.Event(message_id=f"bench-{index}", user_id=f"user-{index:06d}")
    event.track.event = "Order Completed"
    item = event_log_pb2.IngestedItem(event=event, source="bench")
    padding = PAYLOAD_BYTES - item.ByteSize() - 24
    item.event.track.properties["blob"] = base64.b64encode(os.urandom(padding))[:padding].decode()
    return item.SerializeToString()


def _batches(count: int) -> list[Entries]:
    """``count`` distinct batches of ``BATCH`` entries: keys over ``USERS`` users, 1 KB
    payloads each."""
    payloads = [_event_payload(i) for i in range(1024)]
    keys = [f"user-{i:06d}" for i in range(USERS)]
    batches = []
    for b in range(count):
        first = b * BATCH
        batches.append(
            [(keys[(first + j) % USERS], payloads[(first + j) % 1024]) for j in range(BATCH)]
        )
    return batches


async def _produce(log: Log, batches: Sequence[Entries], rounds_per_producer: int) -> float:
    """``PRODUCERS`` tasks each appending ``rounds_per_producer`` batches; seconds taken."""

    async def producer(index: int) -> None:
        for round_ in range(rounds_per_producer):
            await log.append_batch(batches[(index + round_ * PRODUCERS) % len(batches)])

    started = time.perf_counter()
    await asyncio.gather(*(producer(index) for index in range(PRODUCERS)))
    return time.perf_counter() - started


def _stored_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob(f"*{SEGMENT_SUFFIX}"))


async def _log_appends(
    directory: Path, batches: Sequence[Entries], records: int
) -> tuple[float, int]:
    """Durable batched appends to a fresh log: (seconds, bytes the log stored)."""
    log = await EmbeddedLog.open(
        directory, "bench", partitions=PARTITIONS, payload_type=PAYLOAD_TYPE
    )
    try:
        elapsed = await _produce(log, batches, records // (PRODUCERS * BATCH))
    finally:
        await log.close()
    return elapsed, _stored_bytes(directory)


def _raw_appends(path: Path, total_bytes: int, chunks: int) -> float:
    """``total_bytes`` written sequentially to one file in ``chunks`` chunks, each followed by
    ``fdatasync``, from this thread: seconds taken."""
    chunk = os.urandom(total_bytes // chunks)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        started = time.perf_counter()
        for _ in range(chunks):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)


async def _single_appends(directory: Path, batch: Entries) -> list[float]:
    """One producer, one record per append, one after the other: latencies in ms."""
    log = await EmbeddedLog.open(
        directory, "bench", partitions=PARTITIONS, payload_type=PAYLOAD_TYPE
    )
    latencies = []
    try:
        for index in range(50 + SINGLE_APPENDS):  # the first 50 warm up
            key, payload = batch[index % len(batch)]
            started = time.perf_counter()
            await log.append(key, payload)
            latencies.append((time.perf_counter() - started) * 1000)
    finally:
        await log.close()
    return latencies[50:]


async def _bench_appends(root: Path, records: int, rounds: int, report: Report) -> None:
    batches = _batches(64)
    records -= records % (PRODUCERS * BATCH)
    chunks = records // (PRODUCERS * BATCH)
    log_best = raw_best = float("inf")
    stored = 0
    for round_ in range(rounds):
        # Alternate which goes first, so neither always gets the fresher disk.
        for which in ("log", "raw") if round_ % 2 == 0 else ("raw", "log"):
            directory = root / f"{which}-{round_}"
            if which == "log":
                elapsed, stored = await _log_appends(directory, batches, records)
                log_best = min(log_best, elapsed)
            else:
                directory.mkdir()
                # The same bytes the log stored (frames, keys, payloads): round 0 runs the
                # log first, so ``stored`` is known by now.
                raw_best = min(raw_best, _raw_appends(directory / "raw", stored, chunks))
            shutil.rmtree(directory)
    report.figures["append_records_per_s"] = records / log_best
    report.figures["append_mb_per_s"] = stored / log_best / MB
    report.figures["append_bytes_stored_per_record"] = stored / records
    report.references["raw_fdatasync_records_per_s"] = records / raw_best
    report.references["raw_fdatasync_mb_per_s"] = stored / raw_best / MB
    report.references["raw_fdatasync_chunk_mb"] = stored / chunks / MB
    report.ratios["append_vs_raw_fdatasync"] = raw_best / log_best
    report.target(
        "append_records_per_s",
        ">= 200,000 durable appends/s",
        report.figures["append_records_per_s"] >= 200_000,
    )

    latencies = await _single_appends(root / "single", batches[0])
    shutil.rmtree(root / "single")
    report.figures["single_append_p50_ms"] = percentile(latencies, 50)
    report.figures["single_append_p99_ms"] = percentile(latencies, 99)
    report.figures["single_append_mean_ms"] = statistics.fmean(latencies)
    report.target(
        "single_append_p99_ms",
        "single append p99 <= 5 ms",
        report.figures["single_append_p99_ms"] <= 5.0,
    )


async def _read_all(reader: LogReader, partitions: int) -> int:
    """Every partition from offset 0 to its end, all at once, every payload unpacked."""

    async def read(partition: int) -> int:
        count = 0
        async for batch in reader.subscribe(partition, 0, stop_at_end=True):
            count += len(batch.payload_list())
        return count

    return sum(await asyncio.gather(*(read(partition) for partition in range(partitions))))


async def _timed_read(reader: LogReader, partitions: int, expected: int) -> float:
    started = time.perf_counter()
    count = await _read_all(reader, partitions)
    elapsed = time.perf_counter() - started
    if count != expected:
        raise RuntimeError(f"read {count:,} messages, expected {expected:,}")
    return elapsed


async def _bench_subscribe(root: Path, records: int, rounds: int, report: Report) -> None:
    port = free_port()
    data_dir = root / "data"
    settings = Settings(
        data_dir=data_dir, services=Endpoints(ingestion=Endpoint(host="127.0.0.1", port=port))
    )
    partitions = settings.streams.partitions
    records -= records % (PRODUCERS * BATCH)

    log = await open_log(settings, "ingestion")
    try:
        await _produce(log, _batches(64), records // (PRODUCERS * BATCH))
    finally:
        await log.close()

    log = await open_log(settings, "ingestion")
    try:
        local = min([await _timed_read(log, partitions, records) for _ in range(rounds)])
    finally:
        await log.close()

    env = {
        **os.environ,
        "PROFILEMESH_DATA_DIR": str(data_dir),
        "PROFILEMESH_SERVICES__INGESTION__PORT": str(port),
        "PROFILEMESH_LOG_LEVEL": "WARNING",
    }
    service = subprocess.Popen(
        [sys.executable, "-m", "profilemesh.services.cli", "serve", "ingestion"], env=env
    )
    try:
        target = f"127.0.0.1:{port}"
        await wait_serving(target, service)
        remote = RemoteLog(target, STREAMS["ingestion"][0], settings)
        try:
            ranges = await remote.offsets()  # connects, and checks the service sees it all
            if sum(r.next - r.first for r in ranges) != records:
                raise RuntimeError(f"the service holds {ranges}, expected {records:,} records")
            remote_best = min(
                [await _timed_read(remote, len(ranges), records) for _ in range(rounds)]
            )
        finally:
            await remote.close()
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()

    report.figures["subscribe_grpc_messages_per_s"] = records / remote_best
    report.figures["subscribe_grpc_mb_per_s"] = records * PAYLOAD_BYTES / remote_best / MB
    report.references["subscribe_in_process_messages_per_s"] = records / local
    report.ratios["subscribe_grpc_vs_in_process"] = local / remote_best
    report.target(
        "subscribe_grpc_messages_per_s",
        ">= 100,000 messages/s",
        report.figures["subscribe_grpc_messages_per_s"] >= 100_000,
    )


async def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    append_records = 100_000 if args.quick else 400_000
    subscribe_records = 150_000 if args.quick else 500_000
    rounds = 3 if args.quick else 5
    report = Report("log")
    # The temporary directory is on the disk a data directory would be on (here: the same).
    root = Path(tempfile.mkdtemp(prefix="bench-log-"))
    try:
        await _bench_appends(root, append_records, rounds, report)
        await _bench_subscribe(root, subscribe_records, rounds, report)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"log: {append_records:,} appends by {PRODUCERS} producers in batches of {BATCH} "
        f"({PAYLOAD_BYTES} B payloads), {SINGLE_APPENDS} single appends; "
        f"{subscribe_records:,} messages read back over {PARTITIONS} partitions; "
        f"best of {rounds} round(s)"
    )
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
