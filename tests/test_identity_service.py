"""Identity over real sockets: it follows ingestion's log, stitches, serves and publishes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from profilemesh.common.v1 import identifier_pb2
from profilemesh.identity.v1 import identity_service_pb2 as identity_pb2
from profilemesh.identity.v1 import identity_service_pb2_grpc, merge_pb2, resolution_log_pb2
from profilemesh.ingestion.v1 import (
    event_pb2,
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
    record_pb2,
)
from profilemesh.shared.channel import create_channel
from profilemesh.shared.log.client import RemoteLog
from profilemesh.shared.settings import IdentitySettings, Settings
from tests.running_service import RunningIngestion, RunningService
from tests.test_matching import synthetic_people


class Mesh:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ingestion = RunningIngestion(settings, port=settings.services.ingestion.port)
        self.identity = RunningService(settings, "identity", settings.services.identity.port)


@pytest.fixture
async def mesh(mesh_settings: Settings) -> AsyncIterator[Mesh]:
    running = Mesh(mesh_settings)
    await running.ingestion.start()
    await running.identity.start()
    yield running
    await running.identity.stop()
    if running.ingestion.server is not None:
        await running.ingestion.stop()


def _event(kind: str, *, user: str = "", anon: str = "", **traits: object) -> event_pb2.Event:
    event = event_pb2.Event(user_id=user, anonymous_id=anon)
    if kind == "identify":
        event.identify.traits.update(traits)
    else:
        event.track.event = "Product Viewed"
    return event


async def _send(settings: Settings, *events: event_pb2.Event) -> None:
    async with create_channel(settings.services.ingestion.target, settings) as channel:
        stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
        response = await stub.SendEvents(ingestion_service_pb2.SendEventsRequest(events=events))
        assert response.accepted_count == len(events)


async def _resolve(settings: Settings, kind: str, value: str, timeout: float = 10) -> str:
    """The profile of an identifier once identity has caught up with it."""
    async with create_channel(settings.services.identity.target, settings) as channel:
        stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            response = await stub.ResolveIdentifiers(
                identity_pb2.ResolveIdentifiersRequest(
                    identifiers=[identifier_pb2.Identifier(type=kind, value=value)]
                )
            )
            [resolution] = response.resolutions
            if resolution.found:
                return resolution.profile_id
            assert asyncio.get_running_loop().time() < deadline, f"{kind}:{value} never resolved"
            await asyncio.sleep(0.05)


async def _resolutions(
    settings: Settings, resolved: int
) -> list[resolution_log_pb2.ResolutionEntry]:
    """The resolution log once it holds at least ``resolved`` EventResolved entries."""
    remote = RemoteLog(settings.services.identity.target, "resolutions", settings)
    try:
        for _ in range(200):
            entries = []
            for partition in await remote.offsets():
                for batch in await remote.read(partition.partition, partition.first, 10_000):
                    entries.extend(
                        resolution_log_pb2.ResolutionEntry.FromString(p)
                        for p in batch.payload_list()
                    )
            if sum(e.HasField("event_resolved") for e in entries) >= resolved:
                return entries
            await asyncio.sleep(0.05)
    finally:
        await remote.close()
    raise AssertionError(f"only {len(entries)} resolution entries")


async def test_one_person_across_devices_becomes_one_profile(mesh: Mesh) -> None:
    settings = mesh.settings
    await _send(
        settings,
        _event("track", anon="phone-1"),
        _event("identify", anon="phone-1", email=" Ada@Example.COM "),
        _event("track", anon="laptop-9"),
        _event("identify", anon="laptop-9", user="u-42", email="ada@example.com"),
    )
    profile = await _resolve(settings, "user_id", "u-42")
    assert await _resolve(settings, "anonymous_id", "phone-1") == profile
    assert await _resolve(settings, "anonymous_id", "laptop-9") == profile
    assert await _resolve(settings, "email", "ADA@example.com") == profile

    async with create_channel(settings.services.identity.target, settings) as channel:
        stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
        response = await stub.GetProfile(
            identity_pb2.GetProfileRequest(
                identifier=identifier_pb2.Identifier(type="email", value="ada@example.com")
            )
        )
    found = response.profile
    assert found.profile_id == profile
    assert {(i.identifier.type, i.identifier.value) for i in found.identities} == {
        ("anonymous_id", "phone-1"),
        ("anonymous_id", "laptop-9"),
        ("user_id", "u-42"),
        ("email", "ada@example.com"),
    }
    assert found.traits["email"] == "ada@example.com"
    assert len(found.recent_events) == 4
    assert "features" in response.unavailable_parts

    entries = await _resolutions(settings, 4)
    resolved = [e.event_resolved for e in entries if e.HasField("event_resolved")]
    assert len(resolved) == 4
    assert {e.item.event.anonymous_id for e in resolved} == {"phone-1", "laptop-9"}
    merges = [e.profiles_merged for e in entries if e.HasField("profiles_merged")]
    assert merges and all(m.surviving_profile_id == profile for m in merges)


async def test_manual_merge_and_unmerge_restore_both_profiles(mesh: Mesh) -> None:
    settings = mesh.settings
    await _send(settings, _event("track", user="a-1"), _event("track", user="b-2"))
    first = await _resolve(settings, "user_id", "a-1")
    second = await _resolve(settings, "user_id", "b-2")
    async with create_channel(settings.services.identity.target, settings) as channel:
        stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.MergeProfiles(
                identity_pb2.MergeProfilesRequest(profile_ids=[first, second], reason="same")
            )
        # Two user_ids on one profile break the default limit of one.
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        await _send(settings, _event("track", anon="dev-3"), _event("track", anon="dev-4"))
        third = await _resolve(settings, "anonymous_id", "dev-3")
        fourth = await _resolve(settings, "anonymous_id", "dev-4")
        merged = await stub.MergeProfiles(
            identity_pb2.MergeProfilesRequest(profile_ids=[third, fourth], reason="support ticket")
        )
        assert merged.surviving_profile_id in (third, fourth)
        assert await _resolve(settings, "anonymous_id", "dev-4") == merged.surviving_profile_id
        split = await stub.UnmergeProfile(
            identity_pb2.UnmergeProfileRequest(
                profile_id=merged.surviving_profile_id,
                identifiers=[identifier_pb2.Identifier(type="anonymous_id", value="dev-4")],
                reason="wrong merge",
            )
        )
        assert set(split.resulting_profile_ids) == {third, fourth}
        history = await stub.ListMerges(identity_pb2.ListMergesRequest(profile_id=third))
    assert {m.reason for m in history.merges} >= {"support ticket", "wrong merge"}
    assert await _resolve(settings, "anonymous_id", "dev-3") == third
    assert await _resolve(settings, "anonymous_id", "dev-4") == fourth
    # The resolution log says which identifiers went where, for consumers to split state.
    entries = await _resolutions(settings, 4)
    [unmerged] = [e.profile_unmerged for e in entries if e.HasField("profile_unmerged")]
    members = {
        p.profile_id: {(i.type, i.value) for i in p.identifiers}
        for p in unmerged.resulting_profiles
    }
    assert members == {third: {("anonymous_id", "dev-3")}, fourth: {("anonymous_id", "dev-4")}}


async def test_the_graph_survives_a_restart(mesh: Mesh) -> None:
    settings = mesh.settings
    await _send(settings, _event("identify", user="u-7", email="grace@example.com"))
    profile = await _resolve(settings, "email", "grace@example.com")
    await mesh.identity.stop()
    await mesh.identity.start()
    assert await _resolve(settings, "user_id", "u-7") == profile
    await _send(settings, _event("track", user="u-7"))
    entries = await _resolutions(settings, 2)
    assert len([e for e in entries if e.HasField("event_resolved")]) == 2  # none repeated


async def test_records_are_linked_by_their_identifiers_and_matched_on_request(mesh: Mesh) -> None:
    settings = mesh.settings
    crm = record_pb2.CustomerRecord(source="crm", record_id="c-1")
    crm.identifiers.add(type="email", value="linus@example.com")
    crm.attributes.update({"first_name": "Linus"})
    async with create_channel(settings.services.ingestion.target, settings) as channel:
        stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
        await stub.ImportRecords(ingestion_service_pb2.ImportRecordsRequest(records=[crm]))
    await _send(settings, _event("identify", user="u-9", email="linus@example.com"))
    assert await _resolve(settings, "email", "linus@example.com") == await _resolve(
        settings, "user_id", "u-9"
    )
    people = []
    for i, (first, last) in enumerate([("Jonathan", "Smith"), ("Jon", "Smith"), ("Mary", "Jones")]):
        record = record_pb2.CustomerRecord(source="shop", record_id=f"s-{i}")
        record.attributes.update(
            {"first_name": first, "last_name": last, "date_of_birth": "1980-02-03",
             "city": "Leeds"}
        )  # fmt: skip
        people.append(record)
    async with create_channel(settings.services.identity.target, settings) as channel:
        stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as too_few:
            await stub.MatchRecords(identity_pb2.MatchRecordsRequest(records=people[:1]))
        assert too_few.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        matched = await stub.MatchRecords(identity_pb2.MatchRecordsRequest(records=people))
    assert matched.model.candidate_pairs >= 1
    for match in matched.matches:
        assert match.comparisons  # every accepted pair is explained


async def test_records_without_a_shared_key_are_matched_as_they_arrive(
    mesh_settings: Settings, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("matching:\n  enabled: true\n")
    settings = mesh_settings.model_copy(
        update={"identity": IdentitySettings(rules_file=rules, match_min_records=60)}
    )
    running = Mesh(settings)
    await running.ingestion.start()
    await running.identity.start()
    try:
        rows, truth = synthetic_people(seed=21, people=120)
        records = []
        for row in rows:
            record = record_pb2.CustomerRecord(source="shop", record_id=row["id"])
            # No email or phone: nothing deterministic links the duplicates.
            record.attributes.update(
                {k: v for k, v in row.items() if k not in ("id", "email", "phone") and v}
            )
            records.append(record)
        async with create_channel(settings.services.ingestion.target, settings) as channel:
            stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
            # The first records fit the model; the rest are matched one batch at a time.
            for start in range(0, len(records), 20):
                await stub.ImportRecords(
                    ingestion_service_pb2.ImportRecordsRequest(records=records[start : start + 20])
                )
        profile = {
            row["id"]: await _resolve(settings, "crm_id", f"shop:{row['id']}") for row in rows
        }
        together = {frozenset((a, b)) for a, b in truth if profile[a] == profile[b]}
        assert len(together) >= 0.8 * len(truth), (len(together), len(truth))
        ids = sorted(profile)
        wrongly = [
            (a, b)
            for i, a in enumerate(ids)
            for b in ids[i + 1 :]
            if profile[a] == profile[b] and frozenset((a, b)) not in truth
        ]
        assert len(wrongly) <= 0.05 * len(truth), wrongly
        some_duplicate = next(iter(together))
        a, _ = tuple(some_duplicate)
        async with create_channel(settings.services.identity.target, settings) as channel:
            stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
            history = await stub.ListMerges(identity_pb2.ListMergesRequest(profile_id=profile[a]))
            rules = await stub.GetIdentityRules(identity_pb2.GetIdentityRulesRequest())
        assert rules.matching_model_records >= 60
        assert rules.matching_model.levels
        probabilistic = [
            m for m in history.merges if m.origin == merge_pb2.MERGE_ORIGIN_PROBABILISTIC
        ]
        assert probabilistic
        assert all(m.evidence.match_probability >= 0.95 for m in probabilistic)
    finally:
        await running.identity.stop()
        await running.ingestion.stop()
