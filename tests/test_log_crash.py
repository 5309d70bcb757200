"""Crash safety: a producer or consumer process killed with SIGKILL at random points loses
nothing it acknowledged, duplicates nothing, and applies every record exactly once.

The processes are ``tests/log_crash_child.py``; the random points come from seeded generators,
so a failure replays with the same delays.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from profilemesh.shared.log.api import Log, LogRecord
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from tests.log_backends import BACKENDS, LogBackend, applied_counts
from tests.log_crash_child import (
    CONSUMER,
    MAX_BATCH,
    PARTITIONS,
    STREAM,
    parse_payload,
    producer_keys,
)

ROOT = Path(__file__).resolve().parent.parent
PRODUCER_ROUNDS = 6
CONSUMER_KILLS = 5
# Long enough never to fire on a slow machine; short enough that a hang fails the test.
TIMEOUT = 60.0


@pytest.fixture(params=BACKENDS, ids=lambda backend: backend.name)
async def located(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[LogBackend, str]]:
    backend: LogBackend = request.param
    async with backend.location(tmp_path) as location:
        yield backend, location


_running: list[Child] = []


@pytest.fixture(autouse=True)
async def no_child_left_behind(located: tuple[LogBackend, str]) -> AsyncIterator[None]:
    """A failing test must not leave a producer appending forever (killed before the
    location is torn down)."""
    yield
    while _running:
        await _running.pop().kill()


class Child:
    """One run of ``tests.log_crash_child``, its stdout and stderr kept in files."""

    def __init__(self, process: asyncio.subprocess.Process, stdout: Path, stderr: Path) -> None:
        self.process = process
        self.stdout = stdout
        self.stderr = stderr

    @classmethod
    async def start(cls, directory: Path, name: str, *args: str) -> Child:
        stdout, stderr = directory / f"{name}.out", directory / f"{name}.err"
        # Files, not pipes: a child never blocks on a full pipe, and every line it flushed
        # before the kill is there to read afterwards.
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.log_crash_child",
                *args,
                cwd=ROOT,
                stdout=out,
                stderr=err,
            )
        return cls(process, stdout, stderr)

    def lines(self) -> list[str]:
        """Every complete line written so far (a line cut by the kill is not complete)."""
        text = self.stdout.read_text()
        return text.split("\n")[:-1]

    async def wait_for_line(self, line: str) -> None:
        """Wait until the child printed ``line``; fail if it exits first."""
        async with asyncio.timeout(TIMEOUT):
            while line not in self.lines():
                if self.process.returncode is not None:
                    raise AssertionError(f"child exited early:\n{self.stderr.read_text()}")
                await asyncio.sleep(0.005)

    async def kill(self) -> bool:
        """SIGKILL the child; whether it was still running (not finished on its own)."""
        running = self.process.returncode is None
        if running:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        return running and self.process.returncode == -signal.SIGKILL


async def records_of(log: Log) -> list[LogRecord]:
    """Every record of every partition, partition by partition."""
    records: list[LogRecord] = []
    for partition in range(log.partitions):
        async for batch in log.subscribe(partition, 0, stop_at_end=True):
            records.extend(batch)
    return records


def assert_dense(records: list[LogRecord]) -> None:
    by_partition: dict[int, list[int]] = defaultdict(list)
    for record in records:
        by_partition[record.partition].append(record.offset)
    for partition, offsets in by_partition.items():
        assert offsets == list(range(len(offsets))), f"partition {partition} has gaps"


async def test_every_acknowledged_append_survives_sigkill_at_random_points(
    located: tuple[LogBackend, str], tmp_path: Path
) -> None:
    backend, location = located
    rng = random.Random(20240611)
    last_acked: dict[str, int] = {}  # producer -> last acknowledged sequence number
    rounds_with_acks = 0
    for round_ in range(PRODUCER_ROUNDS):
        # Each round is a fresh process reopening (and recovering) the same log.
        seed = str(rng.randrange(1 << 30))
        child = await Child.start(
            tmp_path, f"produce-{round_}", "produce", backend.name, location,
            "--round", str(round_), "--seed", seed,
        )  # fmt: skip
        await child.wait_for_line("ready")
        await asyncio.sleep(rng.uniform(0.02, 0.4))
        assert await child.kill(), f"producer exited on its own:\n{child.stderr.read_text()}"

        acks = [line.split() for line in child.lines() if line.startswith("ack ")]
        rounds_with_acks += bool(acks)
        for _, producer, first, final in acks:
            # A producer appends one batch at a time, so its acks are contiguous.
            assert int(first) == last_acked.get(producer, -1) + 1
            last_acked[producer] = int(final)
    assert rounds_with_acks >= 1

    log = await backend.open_log(location, STREAM, PARTITIONS)
    try:
        records = await records_of(log)
        assert_dense(records)

        parsed = [parse_payload(record.payload) for record in records]
        present = Counter((producer, seq) for producer, _, seq in parsed)
        duplicates = [record for record, count in present.items() if count > 1]
        assert duplicates == []
        for producer, last in last_acked.items():
            missing = [seq for seq in range(last + 1) if (producer, seq) not in present]
            assert missing == [], f"{producer} lost acknowledged records"
        # Beyond its acks a producer can only have left its one batch in flight.
        for producer, seq in present:
            assert seq <= last_acked.get(producer, -1) + MAX_BATCH

        by_key: dict[tuple[str, str], list[int]] = defaultdict(list)
        for record, (producer, key, seq) in zip(records, parsed, strict=True):
            assert record.key == key and key in producer_keys(producer)
            by_key[producer, key].append(seq)
        for (producer, key), sequences in by_key.items():
            assert sequences == sorted(sequences), f"{producer}/{key} out of order"

        # The recovered log takes appends again, continuing each partition's offsets.
        ranges = await log.offsets()
        [(partition, offset)] = await log.append_batch([("after", b"after the crashes")])
        assert offset == ranges[partition].next
    finally:
        await log.close()


def assert_state_matches_offsets(store_path: Path) -> int:
    """State and offsets agree (the records below each committed offset are applied once,
    no others); how many records are applied."""
    store = SqliteConsumerStore(store_path)
    try:
        committed = store.committed(CONSUMER, STREAM)
        counts = applied_counts(store)
    finally:
        store.close()
    expected = {(p, offset): 1 for p, end in committed.items() for offset in range(end)}
    assert counts == expected
    return len(counts)


async def test_a_consumer_killed_at_random_points_applies_every_record_exactly_once(
    located: tuple[LogBackend, str], tmp_path: Path
) -> None:
    backend, location = located
    rng = random.Random(77)
    log = await backend.open_log(location, STREAM, PARTITIONS)
    try:
        sequence = 0
        while sequence < 1200:
            size = rng.randint(1, 40)
            await log.append_batch(
                [
                    (f"user-{rng.randrange(500)}", f"event {sequence + i}".encode())
                    for i in range(size)
                ]
            )
            sequence += size
        records = await records_of(log)
    finally:
        await log.close()  # the children open it; two open instances must not share files
    store_path = tmp_path / "consumer.sqlite3"

    # Each apply sleeps 10 ms inside its transaction and there are hundreds of batches, so
    # the whole run takes seconds: longer than all the kill delays together, so every kill
    # lands in the middle of the run, most of them in the middle of a transaction.
    progress = [0]
    for kill in range(CONSUMER_KILLS):
        child = await Child.start(
            tmp_path, f"consume-{kill}", "consume", backend.name, location,
            "--store", str(store_path), "--batch-seconds", "0.01",
        )  # fmt: skip
        await child.wait_for_line("ready")
        await asyncio.sleep(rng.uniform(0.1, 0.35))
        assert await child.kill(), "the consumer finished before it could be killed"
        progress.append(assert_state_matches_offsets(store_path))
    assert progress == sorted(progress)
    assert 0 < progress[-1] < len(records)

    child = await Child.start(
        tmp_path, "consume-final", "consume", backend.name, location, "--store", str(store_path)
    )
    async with asyncio.timeout(TIMEOUT):
        assert await child.process.wait() == 0, child.stderr.read_text()
    assert child.lines()[-1] == "done"

    assert assert_state_matches_offsets(store_path) == len(records)
    store = SqliteConsumerStore(store_path)
    try:
        payloads = store.read(
            lambda connection: {
                (p, offset): payload
                for p, offset, payload in connection.execute(
                    "SELECT partition, offset, payload FROM applied"
                )
            }
        )
        assert store.committed(CONSUMER, STREAM) == {
            p: max(r.offset for r in records if r.partition == p) + 1
            for p in {r.partition for r in records}
        }
    finally:
        store.close()
    assert payloads == {(r.partition, r.offset): r.payload for r in records}
