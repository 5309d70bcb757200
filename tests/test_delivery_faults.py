"""Deliveries survive a failing receiver and a killed activation service: the five services run
as processes (``profilemesh serve``), the webhook receiver answers 5xx, stalls past the timeout
and refuses connections for a while, activation is killed with SIGKILL while it delivers and
started again; every delivery arrives, each key is applied once, and the deliveries of a
destination that never answers end in the dead-letter queue."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from profilemesh.activation.v1 import activation_service_pb2 as activation_pb2
from profilemesh.activation.v1 import activation_service_pb2_grpc, segment_pb2
from profilemesh.ingestion.v1 import event_pb2, ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.shared.channel import create_channel
from profilemesh.shared.settings import SERVICE_NAMES, Settings
from tests.conftest import free_port
from tests.receivers import SECRET, WebhookReceiver, eventually

PEOPLE = 30


class Processes:
    def __init__(self, settings: Settings, env: dict[str, str]) -> None:
        self.settings = settings
        self.env = env
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        self.running[name] = subprocess.Popen(
            [sys.executable, "-m", "profilemesh.services.cli", "serve", name], env=self.env
        )

    async def ready(self, name: str) -> None:
        from bench.harness import wait_serving

        await wait_serving(self.settings.services.of(name).target, self.running[name])

    def kill(self, name: str) -> None:
        self.running[name].send_signal(signal.SIGKILL)
        self.running[name].wait(timeout=10)

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.terminate()
        for process in self.running.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def processes(mesh_settings: Settings, mesh_env: dict[str, str]) -> Iterator[Processes]:
    env = {
        **mesh_env,
        "PROFILEMESH_ACTIVATION__MAX_ATTEMPTS": "5",
        "PROFILEMESH_ACTIVATION__INITIAL_BACKOFF_SECONDS": "0.05",
        "PROFILEMESH_ACTIVATION__MAX_BACKOFF_SECONDS": "0.3",
        "PROFILEMESH_LOG_LEVEL": "WARNING",
    }
    running = Processes(mesh_settings, env)
    try:
        yield running
    finally:
        running.stop_all()


def person_events(number: int) -> list[Any]:
    identify = event_pb2.Event(user_id=f"p-{number}")
    identify.identify.traits.update(
        {"email": f"person{number}@example.com", "consent": {"email": True}}
    )
    order = event_pb2.Event(user_id=f"p-{number}")
    order.track.event = "Order Completed"
    order.track.properties.update({"revenue": 10 + number})
    return [identify, order]


async def test_deliveries_survive_a_failing_receiver_and_a_killed_activation(
    processes: Processes, mesh_settings: Settings
) -> None:
    settings = mesh_settings
    for name in SERVICE_NAMES:
        processes.start(name)
    for name in SERVICE_NAMES:
        await processes.ready(name)
    receiver = WebhookReceiver()  # not started yet: connections are refused at first
    nowhere = free_port()
    async with create_channel(settings.services.activation.target, settings) as channel:
        activation = activation_service_pb2_grpc.ActivationServiceStub(channel)
        await activation.CreateSegment(
            activation_pb2.CreateSegmentRequest(
                segment=segment_pb2.Segment(
                    segment_id="buyers",
                    name="Buyers",
                    expression="features.orders_lifetime >= 1 and consent.email",
                )
            )
        )
        for url, name in ((receiver.url, "flaky"), (f"http://127.0.0.1:{nowhere}/x", "gone")):
            destination = segment_pb2.Destination(
                name=name,
                activator="webhook",
                segment_id="buyers",
                triggers=[segment_pb2.DELIVERY_TRIGGER_ENTERED],
                consent_purpose="email",
                rate_limit_per_second=1000,
            )
            destination.config.update({"url": url, "secret": SECRET, "timeout_seconds": 0.5})
            created = await activation.CreateDestination(
                activation_pb2.CreateDestinationRequest(destination=destination)
            )
            if name == "gone":
                gone = created.destination.destination_id

    async with create_channel(settings.services.ingestion.target, settings) as channel:
        await ingestion_service_pb2_grpc.IngestionServiceStub(channel).SendEvents(
            ingestion_service_pb2.SendEventsRequest(
                events=[e for n in range(PEOPLE) for e in person_events(n)]
            )
        )
    # Refused connections for a while, then 5xx answers and a stall past the timeout.
    await asyncio.sleep(1.0)
    failures = iter([500, 503, 502] * 10)
    receiver.failing = lambda: next(failures, None)
    receiver.stall_seconds = 0.8
    receiver.start()
    await asyncio.sleep(0.6)
    receiver.stall_seconds = 0.0
    # Activation dies in the middle of delivering, and comes back.
    processes.kill("activation")
    processes.start("activation")
    await processes.ready("activation")

    await eventually(lambda: len(receiver.applied) == PEOPLE, 90, "every delivery")
    assert receiver.requests >= PEOPLE  # retries happened
    assert receiver.bad_signatures == 0
    profiles = {p["profile_id"] for p in receiver.payloads()}
    assert len(profiles) == PEOPLE  # each person once, each key applied once

    async with create_channel(settings.services.activation.target, settings) as channel:
        activation = activation_service_pb2_grpc.ActivationServiceStub(channel)
        deadline = time.monotonic() + 60
        while True:
            dead = await activation.ListDeadLetters(
                activation_pb2.ListDeadLettersRequest(destination_id=gone, page_size=1000)
            )
            if len(dead.dead_letters) == PEOPLE or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert len(dead.dead_letters) == PEOPLE
        assert all(d.attempts == 5 and d.last_error for d in dead.dead_letters)
        assert all(d.state == segment_pb2.DELIVERY_STATE_DEAD_LETTERED for d in dead.dead_letters)
        retried = await activation.RetryDeadLetters(
            activation_pb2.RetryDeadLettersRequest(destination_id=gone)
        )
        assert retried.retried_count == PEOPLE
    receiver.stop()
