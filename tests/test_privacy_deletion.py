"""Erasure across the mesh, checked where the data lives.

Two people go through all five services (events, identify with consent, orders, a segment
with a webhook). Deleting one by a differently written email runs one job to SUCCEEDED with
every service reporting; afterwards no file under any service's data directory — SQLite
databases, log segments, Parquet, the features event store — holds any of their identifiers or
anything they sent, while the other person is intact; and a new event with their email is
acknowledged, dropped at ingestion, counted, and never re-creates a profile.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from profilemesh.activation.v1 import activation_service_pb2 as activation_pb2
from profilemesh.activation.v1 import activation_service_pb2_grpc, segment_pb2
from profilemesh.common.v1 import identifier_pb2, job_pb2
from profilemesh.identity.v1 import identity_service_pb2 as identity_pb2
from profilemesh.identity.v1 import identity_service_pb2_grpc
from profilemesh.ingestion.v1 import event_pb2, ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.services.cli import main
from profilemesh.shared.channel import create_channel
from profilemesh.shared.settings import Settings
from tests.receivers import SECRET, WebhookReceiver, eventually
from tests.running_service import Mesh
from tests.test_end_to_end import send


class Person:
    def __init__(self, key: str, first: str, last: str, phone: str) -> None:
        self.user = f"u-{key}-7731"
        self.anon = f"anon-{key}-phone-5521"
        self.email = f"{first}.{last}@Example.com"
        self.first, self.last, self.phone = first, last, phone

    def events(self) -> list[event_pb2.Event]:
        visit = event_pb2.Event(anonymous_id=self.anon)
        visit.page.name = "Pricing"
        visit.page.properties.update({"referrer_email": self.email.lower()})
        signin = event_pb2.Event(anonymous_id=self.anon, user_id=self.user)
        signin.identify.traits.update(
            {
                "email": self.email,
                "phone": self.phone,
                "first_name": self.first,
                "last_name": self.last,
                "consent": {"email": True},
            }
        )
        orders = []
        for revenue in (30.0, 55.5):
            order = event_pb2.Event(user_id=self.user)
            order.track.event = "Order Completed"
            order.track.properties.update({"revenue": revenue, "note": f"for {self.last}"})
            orders.append(order)
        return [visit, signin, *orders]

    def needles(self) -> list[bytes]:
        """What must be gone: every identifier in raw and normalised form, and their name."""
        return [
            text.encode()
            for text in (
                self.user,
                self.anon,
                self.email,
                self.email.lower(),
                self.phone,
                self.phone.replace(" ", ""),
                self.last,
            )
        ]


ALICE = Person("alice", "Alice", "Liddell", "+31 6 1234 5678")
BOB = Person("bob", "Robert", "Zimmerman", "+31 6 8765 4321")


def files_containing(root: Path, needles: list[bytes]) -> dict[str, list[str]]:
    """Every file under ``root`` holding one of ``needles`` (raw bytes), with what it holds."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        hits = [n.decode() for n in needles if n in data]
        if hits:
            found[str(path.relative_to(root))] = hits
    return found


async def test_a_deleted_person_is_gone_from_every_store_and_stays_gone(mesh: Mesh) -> None:
    settings = mesh.settings
    webhook = WebhookReceiver().start()
    try:
        await _erase(settings, webhook)
    finally:
        webhook.stop()


async def _erase(settings: Settings, webhook: WebhookReceiver) -> None:
    ingestion_channel = create_channel(settings.services.ingestion.target, settings)
    identity_channel = create_channel(settings.services.identity.target, settings)
    activation_channel = create_channel(settings.services.activation.target, settings)
    async with ingestion_channel, identity_channel, activation_channel:
        ingestion = ingestion_service_pb2_grpc.IngestionServiceStub(ingestion_channel)
        identity = identity_service_pb2_grpc.IdentityServiceStub(identity_channel)
        activation = activation_service_pb2_grpc.ActivationServiceStub(activation_channel)

        segment = (
            await activation.CreateSegment(
                activation_pb2.CreateSegmentRequest(
                    segment=segment_pb2.Segment(
                        name="Buyers",
                        expression="features.orders_lifetime >= 2 and consent.email",
                    )
                )
            )
        ).segment
        hook = segment_pb2.Destination(
            name="CRM webhook",
            activator="webhook",
            segment_id=segment.segment_id,
            triggers=[segment_pb2.DELIVERY_TRIGGER_ENTERED],
            consent_purpose="email",
            mappings=[
                segment_pb2.FieldMapping(source="identifiers.email", target="email"),
                segment_pb2.FieldMapping(source="traits.last_name", target="last_name"),
            ],
        )
        hook.config.update({"url": webhook.url, "secret": SECRET, "timeout_seconds": 2})
        await activation.CreateDestination(
            activation_pb2.CreateDestinationRequest(destination=hook)
        )

        await send(settings, *ALICE.events(), *BOB.events())
        await eventually(lambda: len(webhook.payloads()) == 2, 60, "both people delivered")
        data_dir = settings.data_dir
        before = files_containing(data_dir, ALICE.needles())
        assert any(path.startswith("identity/") for path in before), before
        assert any(path.startswith("activation/") for path in before), before

        deleted = await identity.DeleteProfile(
            identity_pb2.DeleteProfileRequest(
                identifier=identifier_pb2.Identifier(
                    type="email", value=" ALICE.liddell@example.COM"
                ),
                reason="ticket GDPR-1",
            )
        )
        job = deleted.job
        assert job.suppressed and job.reason == "ticket GDPR-1"
        deadline = time.monotonic() + 60
        while job.state == job_pb2.JOB_STATE_RUNNING:
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.2)
            job = (
                await identity.GetDeletion(identity_pb2.GetDeletionRequest(job_id=job.job_id))
            ).job
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED, job
        assert [p.service for p in job.services] == [
            "ingestion",
            "identity",
            "features",
            "scoring",
            "activation",
        ]
        assert all(p.state == job_pb2.JOB_STATE_SUCCEEDED for p in job.services), job

        # Searched in the files themselves: databases, WALs, log segments, Parquet.
        assert files_containing(data_dir, ALICE.needles()) == {}
        # The other person is intact, so the search above could have found something.
        assert any(p.startswith("identity/") for p in files_containing(data_dir, BOB.needles()))
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await identity.GetProfile(
                identity_pb2.GetProfileRequest(
                    identifier=identifier_pb2.Identifier(type="user_id", value=ALICE.user)
                )
            )
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        bob = await activation.GetUnifiedProfile(
            activation_pb2.GetUnifiedProfileRequest(
                identifier=identifier_pb2.Identifier(type="user_id", value=BOB.user)
            )
        )
        assert bob.profile.features and [c.purpose for c in bob.profile.consents] == ["email"]

        # She comes back with a new device: acknowledged, dropped, counted, not re-created.
        again = event_pb2.Event(anonymous_id="anon-new-tablet-0042")
        again.identify.traits.update({"email": ALICE.email.upper()})
        await send(settings, again)
        stats = await ingestion.GetSuppressionStats(
            ingestion_service_pb2.GetSuppressionStatsRequest()
        )
        assert stats.dropped_count == 1
        assert stats.suppressed_count >= 4
        await send(settings, *BOB.events()[3:])  # a later event of Bob's, through everything
        await eventually(
            lambda: files_containing(data_dir, [b"anon-new-tablet-0042"]) == {},
            5,
            "nothing of the dropped event anywhere",
        )
        resolved = await identity.ResolveIdentifiers(
            identity_pb2.ResolveIdentifiersRequest(
                identifiers=[
                    identifier_pb2.Identifier(type="email", value=ALICE.email),
                    identifier_pb2.Identifier(type="anonymous_id", value="anon-new-tablet-0042"),
                ]
            )
        )
        assert not any(r.found for r in resolved.resolutions)


async def test_the_privacy_commands_consent_suppress_and_forget(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in mesh.settings.to_env().items():
        monkeypatch.setenv(name, value)

    async def cli(*argv: str) -> tuple[int, str]:
        code = await asyncio.to_thread(main, list(argv))
        return code, capsys.readouterr().out

    code, out = await cli("consent", "email:erin@example.com", "email=yes", "sms=no")
    assert code == 0 and "email" in out and "granted" in out and "refused" in out
    assert (await cli("consent", "email:erin@example.com", "email=maybe"))[0] == 2
    code, out = await cli("suppress", "email:Mallory@Example.com", "--reason", "spam trap")
    assert code == 0 and "suppressed email:mallory@example.com" in out
    code, out = await cli("unsuppress", "email:mallory@example.com")
    assert code == 0 and out.startswith("1 of 1")
    code, out = await cli("forget", "email:erin@example.com", "--reason", "ticket 5")
    assert code == 0, out
    assert "SUCCEEDED" in out.splitlines()[1] and out.count("SUCCEEDED") == 6, out
    assert (await cli("forget", "email:erin@example.com"))[0] == 1  # no such profile any more
