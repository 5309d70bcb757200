"""Consent as a first-class part of the profile, through the running mesh: decisions recorded
by RPC (before the person's first event, too) or carried by identify traits, latest per
purpose wins, each with its time and source, and activation's segments follow every change."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.protobuf import timestamp_pb2

from profilemesh.activation.v1 import activation_service_pb2 as activation_pb2
from profilemesh.activation.v1 import activation_service_pb2_grpc, segment_pb2
from profilemesh.common.v1 import identifier_pb2, profile_pb2
from profilemesh.identity.v1 import identity_service_pb2 as identity_pb2
from profilemesh.identity.v1 import identity_service_pb2_grpc
from profilemesh.ingestion.v1 import event_pb2, ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.shared.channel import create_channel
from tests.running_service import Mesh

CAROL = identifier_pb2.Identifier(type="email", value="Carol@Example.com")


def at(seconds_ago: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int((time.time() - seconds_ago) * 1e9))
    return stamp


def decision(purpose: str, granted: bool, seconds_ago: float) -> profile_pb2.ConsentState:
    return profile_pb2.ConsentState(purpose=purpose, granted=granted, updated_at=at(seconds_ago))


async def test_consent_is_recorded_dated_and_seen_by_activation(mesh: Mesh) -> None:
    settings = mesh.settings
    identity_channel = create_channel(settings.services.identity.target, settings)
    activation_channel = create_channel(settings.services.activation.target, settings)
    async with identity_channel, activation_channel:
        identity = identity_service_pb2_grpc.IdentityServiceStub(identity_channel)
        activation = activation_service_pb2_grpc.ActivationServiceStub(activation_channel)

        # Before any event: the profile is created for the identifier.
        first = await identity.UpdateConsent(
            identity_pb2.UpdateConsentRequest(
                identifier=CAROL, consents=[decision("email", True, 60)]
            )
        )
        assert [(c.purpose, c.granted, c.source) for c in first.consents] == [
            ("email", True, "api")
        ]
        # An older decision changes nothing.
        stale = await identity.UpdateConsent(
            identity_pb2.UpdateConsentRequest(
                profile_id=first.profile_id, consents=[decision("email", False, 3600)]
            )
        )
        assert [(c.purpose, c.granted) for c in stale.consents] == [("email", True)]

        segment = (
            await activation.CreateSegment(
                activation_pb2.CreateSegmentRequest(
                    segment=segment_pb2.Segment(name="Emailable", expression="consent.email")
                )
            )
        ).segment

        async def emailable(expected: bool) -> bool:
            try:
                response = await activation.GetMembership(
                    activation_pb2.GetMembershipRequest(identifier=CAROL)
                )
            except grpc.aio.AioRpcError:
                return False
            member = segment.segment_id in {m.segment_id for m in response.memberships}
            return member == expected

        await until(lambda: emailable(True), "Carol in the segment")

        # An identify carrying consent adds a purpose, dated by the event, sourced by it.
        signin = event_pb2.Event(user_id="u-carol")
        signin.identify.traits.update({"email": "carol@example.com", "consent": {"sms": True}})
        async with create_channel(settings.services.ingestion.target, settings) as channel:
            await ingestion_service_pb2_grpc.IngestionServiceStub(channel).SendEvents(
                ingestion_service_pb2.SendEventsRequest(events=[signin], source="web")
            )

        async def profile_has(expected: dict[str, tuple[bool, str]]) -> bool:
            profile = (
                await identity.GetProfile(identity_pb2.GetProfileRequest(identifier=CAROL))
            ).profile
            return {c.purpose: (c.granted, c.source) for c in profile.consents} == expected

        await until(
            lambda: profile_has({"email": (True, "api"), "sms": (True, "web")}),
            "sms consent from the identify",
        )
        # Withdrawn now: the latest decision wins everywhere.
        await identity.UpdateConsent(
            identity_pb2.UpdateConsentRequest(
                identifier=CAROL, consents=[decision("email", False, 0)]
            )
        )
        await until(lambda: emailable(False), "the withdrawal to reach activation")
        unified = await activation.GetUnifiedProfile(
            activation_pb2.GetUnifiedProfileRequest(identifier=CAROL)
        )
        assert {c.purpose: c.granted for c in unified.profile.consents} == {
            "email": False,
            "sms": True,
        }


async def test_bad_consent_requests_name_the_field(mesh: Mesh) -> None:
    settings = mesh.settings
    async with create_channel(settings.services.identity.target, settings) as channel:
        identity = identity_service_pb2_grpc.IdentityServiceStub(channel)
        cases = [
            (identity_pb2.UpdateConsentRequest(consents=[decision("email", True, 0)]), "target"),
            (identity_pb2.UpdateConsentRequest(identifier=CAROL), "consents"),
            (
                identity_pb2.UpdateConsentRequest(
                    identifier=CAROL, consents=[decision("Email Me", True, 0)]
                ),
                "consents[0].purpose",
            ),
            (
                identity_pb2.UpdateConsentRequest(
                    identifier=CAROL, consents=[decision("email", True, -86400)]
                ),
                "consents[0].updated_at",
            ),
        ]
        for request, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await identity.UpdateConsent(request)
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (failure.value.details() or ""), (field, failure.value.details())
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await identity.UpdateConsent(
                identity_pb2.UpdateConsentRequest(
                    profile_id="p_nobody", consents=[decision("email", True, 0)]
                )
            )
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    """Wait until the asynchronous ``check`` holds."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
