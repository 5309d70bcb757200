"""What only the embedded log does: its files, recovery, backpressure and Parquet archive."""

from __future__ import annotations

import os
import time
from pathlib import Path

import duckdb
import pytest

from profilemesh.ingestion.v1 import event_log_pb2, event_pb2
from profilemesh.shared.log import event_columns
from profilemesh.shared.log.api import LogFull, partition_for, type_url
from profilemesh.shared.log.archive import (
    PayloadColumns,
    Retention,
    archive_segment,
    load_manifest,
)
from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.log.segments import HEADER_SIZE

EVENTS_TYPE = type_url("profilemesh.ingestion.v1.IngestedItem")
ARCHIVE = Retention("archive", 0, PayloadColumns(event_columns.FIELDS, event_columns.decode_events))


async def _all_payloads(log: EmbeddedLog) -> dict[int, list[bytes]]:
    found: dict[int, list[bytes]] = {}
    for partition in range(log.partitions):
        payloads: list[bytes] = []
        async for batch in log.subscribe(partition, 0, stop_at_end=True):
            payloads.extend(batch.payload_list())
        found[partition] = payloads
    return found


def _segments(directory: Path, partition: int) -> list[Path]:
    return sorted((directory / f"p{partition:03d}").glob("*.log"))


async def test_a_torn_tail_is_cut_off_on_open(tmp_path: Path) -> None:
    log = await EmbeddedLog.open(tmp_path, "s", partitions=1)
    await log.append_batch([("k", b"one"), ("k", b"two")])
    await log.close()
    [segment] = _segments(tmp_path, 0)
    with segment.open("ab") as file:  # half a frame, as if the machine died mid-write
        file.write(b"PMLF" + b"\x00" * 10)
    log = await EmbeddedLog.open(tmp_path, "s", partitions=1)
    assert (await _all_payloads(log))[0] == [b"one", b"two"]
    assert (await log.append("k", b"three")).offset == 2
    await log.close()


async def test_a_corrupt_frame_and_everything_after_it_are_dropped(tmp_path: Path) -> None:
    log = await EmbeddedLog.open(tmp_path, "s", partitions=1)
    await log.append("k", b"good")
    await log.append("k", b"flipped")
    await log.close()
    [segment] = _segments(tmp_path, 0)
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # a bit flip inside the second frame's body
    segment.write_bytes(bytes(data))
    log = await EmbeddedLog.open(tmp_path, "s", partitions=1)
    assert (await _all_payloads(log))[0] == [b"good"]
    await log.close()


async def test_segments_roll_and_a_lost_index_is_rebuilt(tmp_path: Path) -> None:
    log = await EmbeddedLog.open(tmp_path, "s", partitions=1, segment_bytes=4096)
    for i in range(50):
        await log.append_batch([("k", f"{i}-{j}".encode() * 20) for j in range(5)])
    await log.close()
    segments = _segments(tmp_path, 0)
    assert len(segments) > 5
    for index in (tmp_path / "p000").glob("*.idx"):
        index.unlink()
    log = await EmbeddedLog.open(tmp_path, "s", partitions=1, segment_bytes=4096)
    expected = [f"{i}-{j}".encode() * 20 for i in range(50) for j in range(5)]
    assert (await _all_payloads(log))[0] == expected
    batches = await log.read(0, 123)
    assert batches[0].base_offset == 123
    assert batches[0].payload_list()[0] == expected[123]
    await log.close()


async def test_reopening_with_another_partition_count_is_refused(tmp_path: Path) -> None:
    log = await EmbeddedLog.open(tmp_path, "s", partitions=4)
    await log.close()
    with pytest.raises(ValueError, match="4 partitions"):
        await EmbeddedLog.open(tmp_path, "s", partitions=8)


async def test_appends_beyond_the_pending_bound_are_refused_not_buffered(
    tmp_path: Path,
) -> None:
    log = await EmbeddedLog.open(tmp_path, "s", partitions=2, max_pending_bytes=64 * 1024)
    payload = b"x" * 1024
    results = await _gather_settled(
        [log.append_batch([(f"k{i}", payload)] * 40) for i in range(30)]
    )
    refused = [r for r in results if isinstance(r, LogFull)]
    accepted = [r for r in results if not isinstance(r, BaseException)]
    assert refused, "nothing was refused although far more than the bound was waiting"
    assert accepted
    assert refused[0].retry_after_seconds > 0
    total = sum(r.next for r in await log.offsets())
    assert total == 40 * len(accepted)  # a refused append left nothing behind
    await log.close()


async def _gather_settled(coroutines: list) -> list:  # type: ignore[type-arg]
    import asyncio

    return await asyncio.gather(*coroutines, return_exceptions=True)


def _item(i: int) -> bytes:
    event = event_pb2.Event(message_id=f"m{i}", user_id=f"u{i % 7}")
    if i % 3:
        event.track.event = "Order Completed"
        event.track.properties.update({"revenue": i, "sku": f"s{i}"})
    else:
        event.identify.traits.update({"email": f"u{i}@example.com"})
    event.timestamp.FromSeconds(1_700_000_000 + i)
    event.context.ip = "10.1.2.3"
    item = event_log_pb2.IngestedItem(event=event, source="api")
    item.received_at.FromSeconds(1_700_000_100 + i)
    return item.SerializeToString()


async def test_old_event_segments_become_parquet_that_duckdb_queries_and_replay_still_reads(
    tmp_path: Path,
) -> None:
    log = await EmbeddedLog.open(
        tmp_path / "events",
        "events",
        partitions=2,
        payload_type=EVENTS_TYPE,
        segment_bytes=2048,
        retention=ARCHIVE,
    )
    entries = [(f"u{i % 7}", _item(i)) for i in range(300)]
    for start in range(0, 300, 10):
        await log.append_batch(entries[start : start + 10], {"traceparent": "00-ab-cd-01"})
    before = await _all_payloads(log)
    assert log.maintain() > 0
    archive = tmp_path / "events" / "archive"
    files = list(archive.glob("day=*/*.parquet"))
    assert files
    by_type = dict(
        duckdb.sql(
            f"select type, count(*) from read_parquet('{archive}/*/*.parquet', "
            "hive_partitioning=true) group by type"
        ).fetchall()
    )
    archived_rows = sum(by_type.values())
    assert set(by_type) == {"track", "identify"} and archived_rows > 100
    [(revenue,)] = duckdb.sql(
        f"select sum(cast(json_extract(properties, '$.revenue') as double)) "
        f"from read_parquet('{archive}/*/*.parquet') where event = 'Order Completed'"
    ).fetchall()
    assert revenue > 0
    # Replay from offset 0 reads the archive, then the segments, without a gap.
    assert await _all_payloads(log) == before
    assert all(r.first == 0 for r in await log.offsets())
    await log.close()
    reopened = await EmbeddedLog.open(
        tmp_path / "events",
        "events",
        partitions=2,
        payload_type=EVENTS_TYPE,
        segment_bytes=2048,
        retention=ARCHIVE,
    )
    assert await _all_payloads(reopened) == before
    [archived_batch] = await reopened.read(partition_for("u1", 2), 0, max_records=5)
    assert archived_batch.headers_of(0)["traceparent"] == "00-ab-cd-01"
    assert archived_batch.payload_type == EVENTS_TYPE
    await reopened.close()


async def test_an_archive_interrupted_before_deleting_the_segment_is_finished_on_open(
    tmp_path: Path,
) -> None:
    log = await EmbeddedLog.open(tmp_path / "ev", "events", partitions=1, segment_bytes=1024)
    await log.append_batch([("u", _item(i)) for i in range(40)])
    for i in range(40, 80):
        await log.append("u", _item(i))
    before = await _all_payloads(log)
    await log.close()
    log = await EmbeddedLog.open(tmp_path / "ev", "events", partitions=1, segment_bytes=1024)
    part = log._parts[0]
    oldest = part.closed[0]
    archive_segment(oldest, 0, part.archive, ARCHIVE.columns, [])  # then "crash"
    await log.close()
    assert oldest.path.exists()
    reopened = await EmbeddedLog.open(tmp_path / "ev", "events", partitions=1, segment_bytes=1024)
    assert not oldest.path.exists()
    assert [s.base_offset for s in load_manifest(part.archive, 0)] == [oldest.base_offset]
    assert await _all_payloads(reopened) == before
    await reopened.close()


async def test_derived_logs_delete_old_segments(tmp_path: Path) -> None:
    retention = Retention("delete", after_seconds=3600)
    log = await EmbeddedLog.open(
        tmp_path, "resolutions", partitions=1, segment_bytes=1024, retention=retention
    )
    for i in range(100):
        await log.append("p", os.urandom(64) + str(i).encode())
    assert log.maintain() == 0  # nothing is an hour old yet
    later = time.time_ns() + 2 * 3600 * 10**9
    assert log.maintain(now_ns=later) > 0
    [retained] = await log.offsets()
    assert 0 < retained.first < retained.next == 100
    assert not list((tmp_path / "archive").glob("**/*.parquet"))
    batches = await log.read(0, retained.first)
    assert batches[0].base_offset == retained.first
    await log.close()


def test_frame_header_size_is_stable() -> None:
    # Changing the frame layout would make existing logs unreadable.
    assert HEADER_SIZE == 32
