"""Throughput of the scale-out backend (PostgreSQL stores, NATS JetStream logs) next to the
embedded backend (SQLite/DuckDB files, file logs served over gRPC), in the same run.

For each backend the front of the mesh runs as a user would run it: ``profilemesh serve`` for
ingestion, identity and features, one process each, on fresh data (for the scale-out backend,
a throwaway PostgreSQL and ``nats-server -js`` from Debian's packages, started here):

a. Ingestion: ``CLIENTS`` concurrent callers send prebuilt ``SendEvents`` batches of ``BATCH``
   track events until all ``EVENTS`` are acknowledged (durable in the event log): events/s.
b. End to end: from the first send until features has applied every event — identity resolved
   it into a profile and published it, features applied it and committed its offset (read
   from features' own store: ``consumer_offsets``): events/s through three services and two
   logs.

The ratios are scale-out / embedded. One replica per service here: the scale-out backend
exists to run several (see ``tests/test_scaleout.py``), and on this 2-core machine the point is
what the network hops to PostgreSQL and NATS cost a single replica.

    python bench/scaleout.py [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg

from profilemesh.ingestion.v1 import event_pb2, ingestion_service_pb2
from profilemesh.shared.settings import (
    SERVICE_NAMES,
    Endpoint,
    Endpoints,
    NatsSettings,
    PostgresSettings,
    Settings,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import Report, free_port, parse_args, wait_serving

from tests.nats_server import running_nats
from tests.postgres_server import running_postgres

CLIENTS = 4
BATCH = 250
USERS = 2_000
FRONT = ("ingestion", "identity", "features")


def build_requests(events: int) -> list[bytes]:
    """Prebuilt ``SendEventsRequest`` bytes: orders of ``USERS`` users, unique message ids."""
    requests = []
    for start in range(0, events, BATCH):
        batch = []
        for index in range(start, min(events, start + BATCH)):
            event = event_pb2.Event(
                user_id=f"user-{index % USERS}", message_id=f"m-{uuid.uuid4().hex}"
            )
            event.track.event = "Order Completed"
            event.track.properties.update({"revenue": float(index % 97), "currency": "EUR"})
            event.context.page.url = "https://shop.example/checkout"
            batch.append(event)
        request = ingestion_service_pb2.SendEventsRequest(events=batch)
        requests.append(request.SerializeToString())
    return requests


class Front:
    """Ingestion, identity and features as processes, on one backend."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.processes: list[subprocess.Popen[bytes]] = []

    async def start(self) -> None:
        env = {**os.environ, **self.settings.to_env()}
        logs = self.settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for service in FRONT:
            with (logs / f"{service}.log").open("wb") as output:
                process = subprocess.Popen(
                    [sys.executable, "-m", "profilemesh.services.cli", "serve", service],
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            self.processes.append(process)
            await wait_serving(self.settings.services.of(service).target, process, 120)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def features_applied(settings: Settings) -> int:
    """Resolution entries features has committed, summed over partitions."""
    query = "SELECT coalesce(sum(next_offset), 0) FROM {table} WHERE stream = 'resolutions'"
    if settings.backend == "postgres":
        assert settings.postgres.dsn is not None
        with psycopg.connect(settings.postgres.dsn) as connection:
            row = connection.execute(
                query.format(table="profilemesh_features.consumer_offsets")
            ).fetchone()
    else:
        path = settings.service_data_dir("features") / "features.sqlite"
        if not path.exists():
            return 0
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as connection:
            row = connection.execute(query.format(table="consumer_offsets")).fetchone()
    return int(row[0]) if row else 0


async def run_backend(settings: Settings, requests: list[bytes], events: int) -> dict[str, float]:
    front = Front(settings)
    try:
        await front.start()
        target = settings.services.ingestion.target
        async with grpc.aio.insecure_channel(target) as channel:
            send = channel.unary_unary(
                "/profilemesh.ingestion.v1.IngestionService/SendEvents",
                request_serializer=None,
                response_deserializer=ingestion_service_pb2.SendEventsResponse.FromString,
            )
            queue = list(reversed(requests))

            async def client() -> int:
                accepted = 0
                while queue:
                    response = await send(queue.pop(), timeout=120)
                    accepted += response.accepted_count
                return accepted

            started = time.perf_counter()
            accepted = sum(await asyncio.gather(*(client() for _ in range(CLIENTS))))
            ingested = time.perf_counter() - started
        if accepted != events:
            raise RuntimeError(f"{accepted} of {events} events accepted")
        # Identity publishes one resolution per event, plus traits and merges: wait until
        # features has applied at least one entry per event and then stops moving.
        deadline = time.monotonic() + 600
        last, still_since = -1, time.perf_counter()
        while True:
            applied = await asyncio.to_thread(features_applied, settings)
            now = time.perf_counter()
            if applied != last:
                last, still_since = applied, now
            elif applied >= events and now - still_since > 1.0:
                end_to_end = still_since - started
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"features applied {applied} entries for {events} events")
            await asyncio.sleep(0.05)
    finally:
        front.stop()
    return {
        "ingest_events_per_second": events / ingested,
        "end_to_end_events_per_second": events / end_to_end,
        "end_to_end_seconds": end_to_end,
    }


def base_settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        grace_seconds=2.0,
        log_level="WARNING",
        services=Endpoints(**{name: Endpoint(port=free_port()) for name in SERVICE_NAMES}),
    )


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="profilemesh-scaleout-") as directory:
        yield Path(directory)


async def main() -> None:
    args = parse_args(__doc__ or "")
    events = 3_000 if args.quick else 20_000
    requests = build_requests(events)
    report = Report("scaleout")
    results: dict[str, dict[str, float]] = {}
    with scratch() as directory:
        results["embedded"] = await run_backend(
            base_settings(directory / "embedded"), requests, events
        )
        with running_postgres() as postgres, running_nats() as nats:
            settings = base_settings(directory / "scaleout").model_copy(
                update={
                    "backend": "postgres",
                    "postgres": PostgresSettings(dsn=postgres.dsn),
                    "nats": NatsSettings(url=nats.url),
                }
            )
            results["scaleout"] = await run_backend(settings, requests, events)
    report.figures["events"] = events
    for name, value in results["scaleout"].items():
        report.figures[f"scaleout_{name}"] = value
    for name, value in results["embedded"].items():
        report.references[f"embedded_{name}"] = value
    for name in ("ingest_events_per_second", "end_to_end_events_per_second"):
        report.ratios[f"{name}_scaleout_over_embedded"] = (
            results["scaleout"][name] / results["embedded"][name]
        )
    report.print()
    report.write(args.json)


if __name__ == "__main__":
    asyncio.run(main())
