"""Through all five services over real sockets: a person's CRM record and web events are
ingested, resolved into one profile, featured, scored and clustered; the person enters a
segment and a real webhook receiver and a real SMTP server each get exactly one delivery; the
person's behaviour changes and the exit is delivered; the unified profile is the same, with
every part filled in, by the CRM identifier and by the first anonymous id."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
from typing import Any

import grpc
import pytest

from profilemesh.activation.v1 import activation_service_pb2 as activation_pb2
from profilemesh.activation.v1 import activation_service_pb2_grpc, segment_pb2
from profilemesh.common.v1 import identifier_pb2, job_pb2
from profilemesh.ingestion.v1 import (
    event_pb2,
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
    record_pb2,
)
from profilemesh.scoring.v1 import scoring_service_pb2 as scoring_pb2
from profilemesh.scoring.v1 import scoring_service_pb2_grpc
from profilemesh.shared.channel import create_channel
from profilemesh.shared.settings import Settings
from tests.receivers import SECRET, SmtpReceiver, WebhookReceiver, eventually
from tests.running_service import Mesh
from tests.test_scoring_service import caught_up, churn_request, customer_events, trained

CUSTOMERS = 150


def ident(kind: str, value: str) -> identifier_pb2.Identifier:
    return identifier_pb2.Identifier(type=kind, value=value)


def order(user: str, revenue: float) -> event_pb2.Event:
    event = event_pb2.Event(user_id=user)
    event.track.event = "Order Completed"
    event.track.properties.update({"revenue": revenue})
    return event


async def send(settings: Settings, *events: event_pb2.Event) -> None:
    async with create_channel(settings.services.ingestion.target, settings) as channel:
        stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
        for start in range(0, len(events), 500):
            response = await stub.SendEvents(
                ingestion_service_pb2.SendEventsRequest(events=events[start : start + 500])
            )
            assert response.accepted_count == len(events[start : start + 500])


async def test_a_person_flows_through_all_five_services(mesh: Mesh) -> None:
    settings = mesh.settings
    webhook = WebhookReceiver().start()
    smtp = SmtpReceiver().start()
    try:
        await _journey(settings, webhook, smtp)
    finally:
        webhook.stop()
        smtp.stop()


async def _journey(settings: Settings, webhook: WebhookReceiver, smtp: SmtpReceiver) -> None:
    # A history of other customers, so that a churn model and clusters can be trained.
    rng = random.Random(3)
    history = [e for c in range(CUSTOMERS) for e in customer_events(rng, c)]
    await send(settings, *history)
    await caught_up(settings, history)
    scoring_channel = create_channel(settings.services.scoring.target, settings)
    activation_channel = create_channel(settings.services.activation.target, settings)
    async with scoring_channel, activation_channel:
        scoring = scoring_service_pb2_grpc.ScoringServiceStub(scoring_channel)
        activation = activation_service_pb2_grpc.ActivationServiceStub(activation_channel)
        run = await trained(scoring, churn_request())
        assert run.state == job_pb2.JOB_STATE_SUCCEEDED, run.error
        await scoring.DiscoverClusters(
            scoring_pb2.DiscoverClustersRequest(
                name="behaviour", feature_names=["recency_days", "frequency_365d"], k=3
            )
        )
        # Buyers with one or two orders, who agreed to email, with a churn score.
        segment = (
            await activation.CreateSegment(
                activation_pb2.CreateSegmentRequest(
                    segment=segment_pb2.Segment(
                        segment_id="new-buyers",
                        name="New buyers",
                        expression=(
                            "features.orders_lifetime >= 1 and features.orders_lifetime < 3"
                            " and scores.churn >= 0 and consent.email"
                        ),
                    )
                )
            )
        ).segment
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await activation.CreateSegment(
                activation_pb2.CreateSegmentRequest(
                    segment=segment_pb2.Segment(name="Typo", expression="features.orderz_90d >= 1")
                )
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "orderz_90d" in (bad.value.details() or "")

        hook = segment_pb2.Destination(
            name="CRM webhook",
            activator="webhook",
            segment_id=segment.segment_id,
            triggers=[
                segment_pb2.DELIVERY_TRIGGER_ENTERED,
                segment_pb2.DELIVERY_TRIGGER_EXITED,
            ],
            consent_purpose="email",
            mappings=[
                segment_pb2.FieldMapping(
                    source="identifiers.email", target="email_sha256", hash=True
                ),
                segment_pb2.FieldMapping(source="traits.first_name", target="first_name"),
                segment_pb2.FieldMapping(source="scores.churn", target="churn"),
            ],
        )
        hook.config.update({"url": webhook.url, "secret": SECRET, "timeout_seconds": 2})
        await activation.CreateDestination(
            activation_pb2.CreateDestinationRequest(destination=hook)
        )
        mail = segment_pb2.Destination(
            name="Welcome email",
            activator="email",
            segment_id=segment.segment_id,
            triggers=[segment_pb2.DELIVERY_TRIGGER_ENTERED],
            consent_purpose="email",
            mappings=[
                segment_pb2.FieldMapping(source="identifiers.email", target="email"),
                segment_pb2.FieldMapping(source="traits.first_name", target="first_name"),
            ],
        )
        mail.config.update(
            {
                "host": "127.0.0.1",
                "port": smtp.port,
                "from_address": "hello@shop.example",
                "starttls": False,
                "templates": {"entered": {"subject": "Welcome, $first_name", "body": "Hi!"}},
            }
        )
        await activation.CreateDestination(
            activation_pb2.CreateDestinationRequest(destination=mail)
        )

        # Ann: a CRM record, then an anonymous visit, then she signs in and buys.
        record = record_pb2.CustomerRecord(source="crm", record_id="ann-1")
        record.identifiers.add(type="email", value="Ann@Example.com")
        record.attributes.update({"first_name": "Ann", "city": "Leeds"})
        async with create_channel(settings.services.ingestion.target, settings) as channel:
            await ingestion_service_pb2_grpc.IngestionServiceStub(channel).ImportRecords(
                ingestion_service_pb2.ImportRecordsRequest(records=[record])
            )
        visit = event_pb2.Event(anonymous_id="anon-ann")
        visit.page.name = "Home"
        visit.context.device.type = "mobile"
        signin = event_pb2.Event(anonymous_id="anon-ann", user_id="u-ann")
        signin.identify.traits.update(
            {"email": "ann@example.com", "first_name": "Ann", "consent": {"email": True}}
        )
        await send(settings, visit, signin, order("u-ann", 40.0))

        await eventually(lambda: len(webhook.payloads()) == 1, 60, "the webhook entry")
        await eventually(lambda: len(smtp.messages) == 1, 30, "the welcome email")
        [entered] = webhook.payloads()
        assert entered["transition"] == "entered"
        assert entered["segment_id"] == "new-buyers"
        assert entered["fields"]["first_name"] == "Ann"
        assert entered["fields"]["email_sha256"] == hashlib.sha256(b"ann@example.com").hexdigest()
        assert 0.0 <= entered["fields"]["churn"] <= 1.0
        assert smtp.messages[0]["To"] == "ann@example.com"
        assert smtp.messages[0]["Subject"] == "Welcome, Ann"

        # Two more orders: Ann is no longer a new buyer, and the webhook hears it once.
        await send(settings, order("u-ann", 25.0), order("u-ann", 30.0))
        await eventually(lambda: len(webhook.payloads()) == 2, 60, "the webhook exit")
        exited = [p for p in webhook.payloads() if p["transition"] == "exited"]
        assert len(exited) == 1 and exited[0]["profile_id"] == entered["profile_id"]
        await asyncio.sleep(0.5)
        assert len(smtp.messages) == 1  # the email destination listens to entries only
        assert webhook.bad_signatures == 0

        # One profile, every part, by the CRM identifier and by the first anonymous id.
        by_crm = (
            await activation.GetUnifiedProfile(
                activation_pb2.GetUnifiedProfileRequest(identifier=ident("crm_id", "crm:ann-1"))
            )
        ).profile
        by_visit = (
            await activation.GetUnifiedProfile(
                activation_pb2.GetUnifiedProfileRequest(
                    identifier=ident("anonymous_id", "anon-ann")
                )
            )
        ).profile
        assert by_crm.profile_id == by_visit.profile_id == entered["profile_id"]
        assert by_crm == by_visit or _same_parts(by_crm, by_visit)
        profile = by_crm
        kinds = {i.identifier.type for i in profile.identities}
        assert {"crm_id", "email", "anonymous_id", "user_id"} <= kinds
        assert profile.traits["first_name"] == "Ann"
        assert any(c.purpose == "email" and c.granted for c in profile.consents)
        features = {f.name: f for f in profile.features}
        assert features["orders_lifetime"].int64_value == 3
        assert [s.model for s in profile.scores] == ["churn"]
        assert profile.scores[0].reasons
        assert [c.clustering for c in profile.clusters] == ["behaviour"]
        assert profile.recent_events and profile.recent_events[0].name == "Order Completed"
        assert [s.segment_id for s in profile.segments] == []  # she left

    # The command line shows the same profile readably.
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "profilemesh.services.cli", "profile", "email:ANN@example.com"],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert profile.profile_id in result.stdout
    assert "orders_lifetime" in result.stdout and "churn" in result.stdout


def _same_parts(a: Any, b: Any) -> bool:
    return (
        a.profile_id == b.profile_id
        and list(a.identities) == list(b.identities)
        and a.traits == b.traits
        and [f.name for f in a.features] == [f.name for f in b.features]
        and list(a.scores) == list(b.scores)
        and list(a.segments) == list(b.segments)
    )
