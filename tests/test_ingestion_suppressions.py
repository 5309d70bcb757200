"""Ingestion's suppression list, on each store backend: what it keeps, and that replicas sharing
one store (the ``postgres`` backend) enforce each other's suppressions and count drops together.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from profilemesh.ingestion.v1 import event_log_pb2, event_pb2
from profilemesh.services.ingestion import domain
from profilemesh.services.ingestion.domain import Ingestion
from profilemesh.services.ingestion.suppressions import SuppressionList, SuppressionStats
from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.plugin_manager import create_plugin_manager
from profilemesh.shared.settings import IngestionSettings
from tests.store_backends import StoreHarness

ANN = "ann@example.com"
BOB = "bob@example.com"


@dataclass(frozen=True)
class Item:
    """An accepted item, as intake hands it to the list."""

    payload: bytes


def item_of(user_id: str, message_id: str) -> Item:
    event = event_pb2.Event(user_id=user_id, message_id=message_id)
    event.track.event = "Order Completed"
    return Item(event_log_pb2.IngestedItem(event=event).SerializeToString())


def opened(stores: StoreHarness) -> SuppressionList:
    suppressions = SuppressionList(stores.open)
    suppressions.open()
    return suppressions


def test_a_suppression_is_kept_as_digests_and_survives_a_restart(stores: StoreHarness) -> None:
    first = opened(stores)
    assert first.suppress([ANN, BOB], reason=f"deleted {ANN}") == 2
    assert first.suppress([ANN], reason="again") == 0
    first.count_dropped(3)
    first.close()

    restarted = opened(stores)

    assert restarted.active
    kept, dropped = restarted.split([item_of(ANN, "m1"), item_of("carol", "m2")])
    assert [i.payload for i in dropped] == [item_of(ANN, "m1").payload]
    assert len(kept) == 1
    assert restarted.stats().dropped == 3
    assert not any(ANN in digest for digest in restarted.hashes)


def test_an_unsuppressed_identifier_is_stored_again(stores: StoreHarness) -> None:
    suppressions = opened(stores)
    suppressions.suppress([ANN], reason="deleted")

    assert suppressions.unsuppress([ANN, BOB]) == 1

    assert not suppressions.active
    assert suppressions.stats() == SuppressionStats(suppressed=0, dropped=0)
    assert opened(stores).hashes == frozenset()


def test_replicas_sharing_the_list_enforce_each_others_suppressions_and_share_the_count(
    stores: StoreHarness,
) -> None:
    # Two ingestion replicas: each its own in-memory copy, one store between them.
    one, other = opened(stores), opened(stores)
    assert not other.refresh()  # nothing changed: one read of the version, no reload

    one.suppress([ANN], reason="deleted")
    assert other.split([item_of(ANN, "m1")])[1] == []  # not yet refreshed
    assert other.refresh()

    kept, dropped = other.split([item_of(ANN, "m1"), item_of(BOB, "m2")])
    assert (len(kept), len(dropped)) == (1, 1)
    other.count_dropped(len(dropped))
    one.count_dropped(2)
    assert one.stats() == other.stats() == SuppressionStats(suppressed=len(one.hashes), dropped=3)

    other.unsuppress([ANN])
    assert one.refresh()
    assert one.split([item_of(ANN, "m3")])[1] == []


async def test_two_ingestion_replicas_on_one_database_drop_what_either_suppressed(
    stores: StoreHarness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if stores.backend != "postgres":
        pytest.skip("only the postgres backend shares the list between replicas")
    monkeypatch.setattr(domain, "REFRESH_SECONDS", 0.05)
    plugins = create_plugin_manager()
    replicas, logs = [], []
    for name in ("a", "b"):
        log = await EmbeddedLog.open(tmp_path / name / "log", "events", partitions=1)
        replica = Ingestion(tmp_path / name, IngestionSettings(), plugins, stores=stores.open)
        await replica.open(log)
        replicas.append(replica)
        logs.append(log)
    one, other = replicas
    event = event_pb2.Event(user_id=ANN, message_id="m1")
    event.track.event = "Order Completed"
    try:
        await one.suppress([ANN], reason="deleted")
        deadline = asyncio.get_running_loop().time() + 10
        while not other.intake.suppressions.active:
            assert asyncio.get_running_loop().time() < deadline, "the other replica never saw it"
            await asyncio.sleep(0.02)

        outcome = await other.intake.send_events([event.SerializeToString()])

        assert len(outcome.suppressed) == 1
        assert [r.next for r in await logs[1].offsets()] == [0]
        assert (await one.suppression_stats()).dropped == 1
    finally:
        for replica, log in zip(replicas, logs, strict=True):
            await replica.close()
            await log.close()
