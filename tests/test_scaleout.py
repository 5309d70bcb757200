"""Three replicas of features on the scale-out backend (PostgreSQL stores, NATS JetStream logs,
throwaway servers) share the resolution log's partitions; one is killed with SIGKILL half-way.
The survivors take its partitions over, and every profile's features count each of its events
exactly once: nothing lost, nothing applied twice.

Either survivor answers for every profile (those the other applies are read from the shared
store), and a fresh replica, which loads every state from PostgreSQL, agrees. The test plays
identity: it appends ``EventResolved`` entries to the resolution log in NATS.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from google.protobuf import timestamp_pb2

from profilemesh.common.v1 import identifier_pb2
from profilemesh.features.v1 import features_service_pb2, features_service_pb2_grpc
from profilemesh.identity.v1 import resolution_log_pb2
from profilemesh.ingestion.v1 import event_log_pb2, event_pb2
from profilemesh.shared.channel import create_channel
from profilemesh.shared.health_client import check_health
from profilemesh.shared.log.hosting import open_nats_log
from profilemesh.shared.settings import NatsSettings, PostgresSettings, Settings, StreamSettings
from tests.conftest import free_port
from tests.nats_server import NatsServer, running_nats
from tests.postgres_server import PostgresServer, running_postgres

PROFILES = 120
ORDERS_PER_HALF = 4
PARTITIONS = 8


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[PostgresServer, NatsServer]]:
    with running_postgres() as postgres, running_nats() as nats:
        yield postgres, nats


def replica_settings(
    servers: tuple[PostgresServer, NatsServer], data_dir: Path, prefix: str
) -> Settings:
    postgres, nats = servers
    return Settings(
        data_dir=data_dir,
        grace_seconds=1.0,
        backend="postgres",
        postgres=PostgresSettings(dsn=postgres.dsn),
        nats=NatsSettings(url=nats.url, stream_prefix=prefix),
        streams=StreamSettings(partitions=PARTITIONS),
    )


class Replica:
    """``profilemesh serve features`` in a process of its own."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.settings = settings
        self.target = f"127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "profilemesh.services.cli", "serve", "features"]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)],
            env={**os.environ, **settings.to_env()},
        )

    async def serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while await check_health(self.target, self.settings) != "SERVING":
            assert self.process.poll() is None, "the replica exited"
            assert time.monotonic() < deadline, "the replica never served"
            await asyncio.sleep(0.2)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def order_entry(profile: int, number: int) -> tuple[str, bytes]:
    profile_id = f"p_{profile:05d}"
    event = event_pb2.Event(
        user_id=f"u{profile}", message_id=f"m-{profile}-{number}-{uuid.uuid4().hex[:6]}"
    )
    event.track.event = "Order Completed"
    event.track.properties.update({"revenue": 10.0})
    when = timestamp_pb2.Timestamp()
    when.FromNanoseconds(time.time_ns() - 3600 * 1_000_000_000 + number)
    event.timestamp.CopyFrom(when)
    entry = resolution_log_pb2.ResolutionEntry(
        event_resolved=resolution_log_pb2.EventResolved(
            profile_id=profile_id,
            item=event_log_pb2.IngestedItem(event=event, source="test"),
            identifiers=[identifier_pb2.Identifier(type="user_id", value=f"u{profile}")],
        ),
        occurred_at=when,
    )
    return profile_id, entry.SerializeToString()


def committed(dsn: str) -> int:
    """Resolution entries features has applied and committed, over every partition."""
    with psycopg.connect(dsn) as connection:
        row = connection.execute(
            "SELECT coalesce(sum(next_offset), 0) FROM profilemesh_features.consumer_offsets"
            " WHERE stream = 'resolutions'"
        ).fetchone()
    return int(row[0]) if row else 0


def lease_owners(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            "SELECT owner, count(*) FROM profilemesh_features.partition_leases"
            " WHERE owner <> '' AND consumer = 'features' GROUP BY owner"
        ).fetchall()
    return {str(owner): int(count) for owner, count in rows}


async def orders_by_profile(replica: Replica) -> dict[str, int]:
    async with create_channel(replica.target, replica.settings) as channel:
        features = features_service_pb2_grpc.FeaturesServiceStub(channel)
        response = await features.BatchGetFeatures(
            features_service_pb2.BatchGetFeaturesRequest(
                profile_ids=[f"p_{p:05d}" for p in range(PROFILES)],
                feature_names=["orders_lifetime"],
            )
        )
    return {v.profile_id: v.values[0].int64_value for v in response.vectors}


async def until(condition, what: str, timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def test_three_replicas_one_killed_apply_every_event_exactly_once(
    servers: tuple[PostgresServer, NatsServer], tmp_path: Path
) -> None:
    postgres, _ = servers
    prefix = f"t{uuid.uuid4().hex[:8]}"
    producer_settings = replica_settings(servers, tmp_path / "identity", prefix)
    resolutions = await open_nats_log(producer_settings, "identity")
    replicas = [
        Replica(replica_settings(servers, tmp_path / f"replica-{i}", prefix)) for i in range(3)
    ]
    try:
        for replica in replicas:
            await replica.serving()
        await until(lambda: len(lease_owners(postgres.dsn)) == 3, "three replicas sharing")

        first = [order_entry(p, n) for n in range(ORDERS_PER_HALF) for p in range(PROFILES)]
        for start in range(0, len(first), 200):
            await resolutions.append_batch(first[start : start + 200])
        await until(lambda: committed(postgres.dsn) >= len(first) // 3, "a third applied")

        replicas[2].kill()
        second = [
            order_entry(p, n)
            for n in range(ORDERS_PER_HALF, 2 * ORDERS_PER_HALF)
            for p in range(PROFILES)
        ]
        for start in range(0, len(second), 200):
            await resolutions.append_batch(second[start : start + 200])
        total = len(first) + len(second)
        await until(lambda: committed(postgres.dsn) == total, "everything applied")
        assert len(lease_owners(postgres.dsn)) == 2  # the dead replica's share was taken over
        expected = {f"p_{p:05d}": 2 * ORDERS_PER_HALF for p in range(PROFILES)}
        # Either survivor answers for every profile, those the other one applies included.
        for replica in replicas[:2]:
            assert await orders_by_profile(replica) == expected

        for replica in replicas[:2]:
            replica.stop()
        # A fresh replica reads every state from PostgreSQL: what the three committed.
        fresh = Replica(replica_settings(servers, tmp_path / "fresh", prefix))
        replicas.append(fresh)
        await fresh.serving()
        assert await orders_by_profile(fresh) == expected
    finally:
        for replica in replicas:
            replica.stop()
        await resolutions.close()
