"""The process ``test_log_crash`` kills: a producer or a consumer of a log, run until SIGKILL.

Run as ``python -m tests.log_crash_child produce|consume ...`` from the repository root. It
prints ``ready`` once the log is open, then (producer) one ``ack <producer> <first> <last>``
line per batch, written only after ``append_batch`` returned, or (consumer) ``done`` once it
has applied everything. Every line is flushed at once: what the parent reads after the kill is
exactly what was acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import time
from pathlib import Path

from profilemesh.shared.log.api import RecordBatch
from profilemesh.shared.log.consumer import LogConsumer
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore
from tests.log_backends import APPLIED_SCHEMA, BACKENDS_BY_NAME, count_applied

STREAM = "crash"
PARTITIONS = 4
CONSUMER = "crash-consumer"
KEYS_PER_PRODUCER = 3
MAX_BATCH = 30
# Payload padding sizes: mostly small records, some large enough to roll segments often.
PADDING = (0, 0, 16, 200, 3000, 9000)


def payload(producer: str, key: str, seq: int, padding: bytes) -> bytes:
    """``producer:key:seq:padding``: a record identifies its producer and its place."""
    return f"{producer}:{key}:{seq}:".encode() + padding


def parse_payload(data: bytes) -> tuple[str, str, int]:
    """(producer, key, seq) of a payload made by :func:`payload`."""
    producer, key, seq, _ = data.split(b":", 3)
    return producer.decode(), key.decode(), int(seq)


def producer_keys(producer: str) -> list[str]:
    """The keys one producer appends to (its own, so its order per key is checkable)."""
    return [f"{producer}-k{i}" for i in range(KEYS_PER_PRODUCER)]


async def produce(backend: str, location: str, round_: int, producers: int, seed: int) -> None:
    """Append batches from ``producers`` concurrent tasks until killed."""
    log = await BACKENDS_BY_NAME[backend].open_log(location, STREAM, PARTITIONS)
    print("ready", flush=True)

    async def producer(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        name = f"r{round_}p{index}"
        keys = producer_keys(name)
        seq = 0
        while True:
            size = rng.randint(1, MAX_BATCH)
            batch = [
                (keys[s % len(keys)], payload(name, keys[s % len(keys)], s, b"x" * pad))
                for s in range(seq, seq + size)
                for pad in [rng.choice(PADDING)]
            ]
            await log.append_batch(batch)
            print(f"ack {name} {seq} {seq + size - 1}", flush=True)
            seq += size

    await asyncio.gather(*(producer(index) for index in range(producers)))


async def consume(backend: str, location: str, store_path: Path, batch_seconds: float) -> None:
    """Apply the whole log to SQLite state through a LogConsumer, then print ``done``."""
    log = await BACKENDS_BY_NAME[backend].open_log(location, STREAM, PARTITIONS)
    store = SqliteConsumerStore(store_path)
    store.schema(APPLIED_SCHEMA)

    def slow_count(tx: sqlite3.Connection, batch: RecordBatch) -> None:
        count_applied(tx, batch)
        # Inside the transaction, after writing: most kills land between writing and commit.
        time.sleep(batch_seconds)

    consumer = LogConsumer(CONSUMER, log, store, slow_count)
    print("ready", flush=True)
    await consumer.run_until_caught_up()
    print("done", flush=True)
    store.close()
    await log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    producing = commands.add_parser("produce")
    producing.add_argument("backend")
    producing.add_argument("location")
    producing.add_argument("--round", type=int, required=True)
    producing.add_argument("--producers", type=int, default=4)
    producing.add_argument("--seed", type=int, required=True)
    consuming = commands.add_parser("consume")
    consuming.add_argument("backend")
    consuming.add_argument("location")
    consuming.add_argument("--store", type=Path, required=True)
    consuming.add_argument("--batch-seconds", type=float, default=0.01)
    args = parser.parse_args()
    if args.command == "produce":
        asyncio.run(produce(args.backend, args.location, args.round, args.producers, args.seed))
    else:
        asyncio.run(consume(args.backend, args.location, args.store, args.batch_seconds))


if __name__ == "__main__":
    main()
