"""Redacting records of the embedded log: erased from every file, offsets kept, consumers skip
them, and a crash in the middle leaves each file whole, old or new."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from profilemesh.shared.log import embedded
from profilemesh.shared.log.api import REDACTED_HEADER, LogRecord, RecordBatch
from profilemesh.shared.log.archive import Retention
from profilemesh.shared.log.consumer import LogConsumer
from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from tests.log_backends import APPLIED_SCHEMA, count_applied

SECRET = b"alice@example.org"
PARTITIONS = 2


async def open_log(directory: Path) -> EmbeddedLog:
    # Tiny segments and immediate archiving: a few hundred records span the archive, closed
    # segments and the active one.
    return await EmbeddedLog.open(
        directory,
        "events",
        partitions=PARTITIONS,
        segment_bytes=1024,
        retention=Retention("archive", 0),
    )


def payload(person: str, seq: int) -> bytes:
    contact = SECRET if person == "alice" else b"bob@example.org"
    return b"%s:%d:%s" % (person.encode(), seq, contact)


async def fill(log: EmbeddedLog, first: int, count: int) -> None:
    """``count`` records per person, alternating alice and bob, in small batches."""
    for seq in range(first, first + count, 5):
        entries = [
            (person, payload(person, n))
            for n in range(seq, min(seq + 5, first + count))
            for person in ("alice", "bob")
        ]
        await log.append_batch(entries, {"traceparent": "00-ab-cd-01"})


async def spread_over_every_kind_of_file(log: EmbeddedLog) -> None:
    """Records in Parquet files, in closed segments and in the active segments."""
    await fill(log, 0, 60)
    assert await asyncio.to_thread(log.maintain) > 0
    await fill(log, 60, 60)
    for part in log._parts:
        assert part.archived and part.closed


async def every_record(log: EmbeddedLog) -> list[LogRecord]:
    records = []
    for partition in range(log.partitions):
        async for batch in log.subscribe(partition, 0, stop_at_end=True, max_records=37):
            records.extend(batch)
    return records


def mentions_secret(partition: int, batch: RecordBatch) -> list[bool]:
    return [SECRET in payload for payload in batch.payload_list()]


def files_containing(directory: Path, needle: bytes) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and needle in p.read_bytes()]


def assert_redacted_as_expected(before: Sequence[LogRecord], after: Sequence[LogRecord]) -> None:
    """Same offsets; alice's records erased, bob's untouched."""
    assert [(r.partition, r.offset) for r in after] == [(r.partition, r.offset) for r in before]
    for old, new in zip(before, after, strict=True):
        if SECRET in old.payload:
            assert (new.key, new.payload) == ("", b"")
            assert new.headers[REDACTED_HEADER] == "1"
            assert new.headers["traceparent"] == "00-ab-cd-01"
        else:
            assert new == old


async def test_redaction_erases_marked_records_from_archive_closed_and_active_segments(
    tmp_path: Path,
) -> None:
    log = await open_log(tmp_path / "events")
    await spread_over_every_kind_of_file(log)
    before = await every_record(log)
    offsets = await log.offsets()

    redacted = await log.redact(mentions_secret)

    assert redacted == sum(SECRET in r.payload for r in before) == 120
    assert await log.offsets() == offsets
    assert_redacted_as_expected(before, await every_record(log))
    assert files_containing(tmp_path, SECRET) == []
    assert files_containing(tmp_path, b"alice:") == []
    assert await log.redact(mentions_secret) == 0  # nothing left to erase
    await log.close()


async def test_a_reopened_log_reads_redacted_records_and_appends_after_them(
    tmp_path: Path,
) -> None:
    log = await open_log(tmp_path / "events")
    await spread_over_every_kind_of_file(log)
    before = await every_record(log)
    await log.redact(mentions_secret)
    await log.close()

    reopened = await open_log(tmp_path / "events")
    assert_redacted_as_expected(before, await every_record(reopened))
    position = await reopened.append("bob", b"after")
    assert position.offset == max(r.offset for r in before if r.partition == position.partition) + 1
    assert (await reopened.read(position.partition, position.offset))[0].payload_list() == [
        b"after"
    ]
    await reopened.close()


async def test_appends_and_reads_during_a_redaction_lose_nothing(tmp_path: Path) -> None:
    log = await open_log(tmp_path / "events")
    await spread_over_every_kind_of_file(log)
    stop = asyncio.Event()
    acknowledged: list[tuple[int, int, bytes]] = []

    async def append_bob() -> None:
        seq = 0
        while not stop.is_set():
            data = b"bob:late:%d" % seq
            position = await log.append("bob", data)
            acknowledged.append((position.partition, position.offset, data))
            seq += 1

    async def read_along() -> int:
        reads = 0
        while not stop.is_set():
            reads += len(await every_record(log))
        return reads

    appender = asyncio.create_task(append_bob())
    reader = asyncio.create_task(read_along())
    await asyncio.sleep(0.05)
    redacted = await log.redact(mentions_secret)
    await asyncio.sleep(0.05)
    stop.set()
    await appender
    assert await reader > 0
    assert redacted == 120
    stored = {(r.partition, r.offset): r.payload for r in await every_record(log)}
    assert acknowledged and all(stored[(p, o)] == data for p, o, data in acknowledged)
    assert files_containing(tmp_path, SECRET) == []
    await log.close()


async def test_consumers_skip_redacted_records_and_commit_past_them(tmp_path: Path) -> None:
    log = await open_log(tmp_path / "events")
    await spread_over_every_kind_of_file(log)
    await log.append_batch([("alice", payload("alice", 999))])  # a batch that is all alice
    await log.redact(mentions_secret)
    store = SqliteConsumerStore(tmp_path / "consumer.sqlite3")
    store.schema(APPLIED_SCHEMA)
    seen: list[RecordBatch] = []

    def handler(tx: object, batch: RecordBatch) -> None:
        seen.append(batch)
        count_applied(tx, batch)  # type: ignore[arg-type]

    consumer = LogConsumer("reader", log, store, handler, max_records=50)
    await consumer.run_until_caught_up()

    applied = store.read(
        lambda c: c.execute("SELECT partition, offset, payload FROM applied").fetchall()
    )
    assert applied and all(payload.startswith(b"bob:") for _, _, payload in applied)
    assert len(applied) == 120
    assert all(not any(batch.redacted_flags()) for batch in seen)
    for batch in seen:  # each run the handler saw carries its true offsets
        for record in batch:
            assert record.payload.startswith(b"bob:")
    assert await consumer.lag() == dict.fromkeys(range(PARTITIONS), 0)
    store.close()
    await log.close()


def test_a_batch_splits_into_the_runs_around_its_redacted_records() -> None:
    batch = RecordBatch(
        partition=0,
        base_offset=10,
        append_time_ns=1,
        keys=["a", "", "c", "d", ""],
        payload_sizes=[1, 0, 1, 1, 0],
        payloads=b"acd",
        message_headers=[{}, {REDACTED_HEADER: "1"}, {}, {}, {REDACTED_HEADER: "1"}],
    )
    runs = batch.without_redacted()
    assert [(run.base_offset, list(run.keys), run.payload_list()) for run in runs] == [
        (10, ["a"], [b"a"]),
        (12, ["c", "d"], [b"c", b"d"]),
    ]
    plain = RecordBatch(0, 0, 1, ["a"], [1], b"a")
    assert plain.without_redacted() == [plain]


# Alice's partition has two archived files, two closed segments and the active one, replaced
# in that order.
@pytest.mark.parametrize("crash_at_replacement", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("moment", ["before", "after"])
async def test_a_crash_while_replacing_files_leaves_each_file_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at_replacement: int, moment: str
) -> None:
    log = await open_log(tmp_path / "events")
    await spread_over_every_kind_of_file(log)
    before = await every_record(log)
    replaced = 0
    real_replace = embedded.replace_file

    class Crash(Exception):
        pass

    def replace_then_maybe_crash(temporary: Path, target: Path) -> None:
        nonlocal replaced
        if replaced == crash_at_replacement:
            if moment == "after":
                real_replace(temporary, target)
            # What the disk holds at this instant is what a machine dying now would leave.
            shutil.copytree(tmp_path / "events", tmp_path / "crashed")
            raise Crash
        replaced += 1
        real_replace(temporary, target)

    monkeypatch.setattr(embedded, "replace_file", replace_then_maybe_crash)
    with pytest.raises(Crash):
        await log.redact(mentions_secret)
    monkeypatch.setattr(embedded, "replace_file", real_replace)
    await log.append("bob", b"still appending")  # the writer was not left paused
    await log.close()

    crashed = await open_log(tmp_path / "crashed")
    after = await every_record(crashed)
    assert [(r.partition, r.offset) for r in after] == [(r.partition, r.offset) for r in before]
    for old, new in zip(before, after, strict=True):
        assert new == old or (new.payload == b"" and new.headers[REDACTED_HEADER] == "1")
    erased = sum(not r.payload for r in after)
    assert (erased > 0) == (crash_at_replacement > 0 or moment == "after")
    assert not list((tmp_path / "crashed").rglob("*.tmp"))
    # The retry erases what is left, and the log is whole.
    assert await crashed.redact(mentions_secret) == 120 - erased
    assert_redacted_as_expected(before, await every_record(crashed))
    await crashed.close()
