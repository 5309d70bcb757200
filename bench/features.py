"""Features: online reads over gRPC, streaming updates, and the batch backfill next to plain DuckDB.

1. Online. ``profilemesh serve ingestion``, ``serve identity`` and ``serve features`` run as a
   user runs them, on free localhost ports over a fresh data directory. Events of 2,000 people
   (1,000 with ``--quick``) are sent through ``SendEvents``: ``Order Completed`` track events
   with a ``revenue``, ``Product Viewed`` with a ``product_id`` and page views with a
   ``context.device.type``, each person with a ``user_id``, spread over 400 days. Identity
   resolves them first; then features is started and timed until it has caught up on the
   resolution log (every person's ``orders_lifetime`` right, checked with ``BatchGetFeatures``):
   the real consumer path, from process start. Then, p50/p99 of ``GetFeatures`` of one profile
   by ``profile_id`` (every default feature) and of ``BatchGetFeatures`` of 100 profiles, each
   call followed by a bare gRPC health ``Check`` on the same server (the reference: what any
   call to that server costs) and an identity ``ResolveIdentifiers`` of one identifier.
   Last, one more order per person is sent and ``GetFeatures`` is timed while features applies
   them: the online latency during updates.
2. Streaming. In this process, ``ProfileState.apply`` with the built-in feature set over
   200,000 events (50,000 with ``--quick``) of 10,000 profiles, in time order, next to a plain
   Python loop doing the least equivalent work: one dict-of-counters increment per event
   (profile, type, name, day). Also the in-process cost of reading every default feature of a
   profile (``ProfileState.values``).
3. Backfill. 10,000,000 events of 1,000,000 profiles (1,000,000 of 100,000 with ``--quick``),
   generated column-wise with numpy and pyarrow (skewed activity, 400 days, 1% dated after
   as_of, JSON ``properties``/``context`` built with pyarrow.compute), are written to Parquet.
   Each query then runs in a fresh spawned process over ``read_parquet`` (peak RSS is the
   child's ``ru_maxrss``, VmHWM as a check; best time and largest peak of the rounds):
   ``batch.batch_values`` for eight RFM and engagement features, the same eight computed by a
   hand-written DuckDB query (one GROUP BY with FILTER clauses), and ``batch_values`` for every
   visible built-in feature. The first two must agree on every profile (integers exactly,
   doubles to 1e-9 relative) or the benchmark fails.

    python bench/features.py [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from grpc_health.v1 import health_pb2, health_pb2_grpc

from profilemesh.common.v1 import identifier_pb2, log_service_pb2, log_service_pb2_grpc
from profilemesh.features.v1 import features_service_pb2, features_service_pb2_grpc
from profilemesh.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from profilemesh.ingestion.v1 import event_pb2, ingestion_service_pb2, ingestion_service_pb2_grpc
from profilemesh.services.features.batch import batch_values
from profilemesh.services.features.definitions import FeatureSet
from profilemesh.services.features.events import ARROW_SCHEMA, NS_PER_DAY, FeatureEvent
from profilemesh.services.features.state import ProfileState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report, free_port, parse_args, percentile, wait_serving

SEED = 20240611
TARGET_ONLINE_P99_MS = 5.0
TARGET_BACKFILL_RATIO = 2.0
DAY_S = 86_400
SPAN_DAYS = 400

# -- 1. online, over gRPC -----------------------------------------------------------------------

SEND_BATCH = 500
BATCH_PROFILES = 100
DEVICES = ("mobile", "desktop", "tablet", "ios", "android")


@dataclass
class Person:
    user_id: str
    orders: int
    events: list[event_pb2.Event]


def _people(count: int, run: str, now_s: int) -> list[Person]:
    """Each person: 1 to 4 orders, 1 to 3 product views and 1 to 3 page views, in 400 days."""
    rng = random.Random(SEED)
    people = []
    for i in range(count):
        user_id = f"bench-{run}-{i:06d}"
        device = DEVICES[i % len(DEVICES)]
        events = []
        orders = rng.randint(1, 4)
        for n in range(orders):
            event = event_pb2.Event(user_id=user_id, message_id=f"{user_id}-o{n}")
            event.track.event = "Order Completed"
            event.track.properties.update(
                {"order_id": f"o-{i}-{n}", "revenue": round(rng.uniform(5, 400), 2)}
            )
            events.append(event)
        for n in range(rng.randint(1, 3)):
            event = event_pb2.Event(user_id=user_id, message_id=f"{user_id}-v{n}")
            event.track.event = "Product Viewed"
            event.track.properties.update({"product_id": f"p{rng.randrange(500)}"})
            events.append(event)
        for n in range(rng.randint(1, 3)):
            event = event_pb2.Event(user_id=user_id, message_id=f"{user_id}-p{n}")
            event.page.name = "Product"
            event.page.properties.update({"path": f"/p/{rng.randrange(500)}"})
            event.context.device.type = device
            event.context.library.name = "analytics.js"
            events.append(event)
        for event in events:
            event.timestamp.FromSeconds(now_s - rng.randrange(SPAN_DAYS * DAY_S))
        people.append(Person(user_id, orders, events))
    return people


class Services:
    """The mesh's services as subprocesses, on free ports, over one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.ports = {name: free_port() for name in ("ingestion", "identity", "features")}
        self.env = {
            **os.environ,
            "PROFILEMESH_DATA_DIR": str(data_dir),
            "PROFILEMESH_LOG_LEVEL": "WARNING",
            **{f"PROFILEMESH_SERVICES__{n.upper()}__PORT": str(p) for n, p in self.ports.items()},
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start(self, name: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "profilemesh.services.cli", "serve", name], env=self.env
        )
        self.processes[name] = process
        return process

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _rss_mib(pid: int) -> float:
    """Resident memory of a process now, from ``/proc`` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _logged(target: str, stream: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = log_service_pb2_grpc.LogServiceStub(channel)
        answer = await stub.GetOffsets(log_service_pb2.GetOffsetsRequest(stream=stream))
    return sum(p.next_offset - p.first_offset for p in answer.partitions)


async def _profile_ids(identity: grpc.aio.Channel, people: Sequence[Person]) -> list[str]:
    """Each person's profile id, from identity (empty while not resolved yet)."""
    stub = identity_service_pb2_grpc.IdentityServiceStub(identity)
    found: list[str] = []
    for start in range(0, len(people), 1000):
        request = identity_service_pb2.ResolveIdentifiersRequest(
            identifiers=[
                identifier_pb2.Identifier(type="user_id", value=p.user_id)
                for p in people[start : start + 1000]
            ]
        )
        answer = await stub.ResolveIdentifiers(request, timeout=30)
        found += [r.profile_id for r in answer.resolutions]
    return found


async def _orders_seen(features: grpc.aio.Channel, profile_ids: Sequence[str]) -> list[int]:
    """Each profile's ``orders_lifetime`` as features serves it (-1 when it has none yet)."""
    stub = features_service_pb2_grpc.FeaturesServiceStub(features)
    seen: list[int] = []
    for start in range(0, len(profile_ids), 1000):
        answer = await stub.BatchGetFeatures(
            features_service_pb2.BatchGetFeaturesRequest(
                profile_ids=profile_ids[start : start + 1000], feature_names=["orders_lifetime"]
            ),
            timeout=30,
        )
        for vector in answer.vectors:
            values = [v for v in vector.values if v.WhichOneof("value") == "int64_value"]
            seen.append(values[0].int64_value if values else -1)
    return seen


def bench_online(people_count: int, calls: int, batch_calls: int, report: Report) -> None:
    asyncio.run(_bench_online(people_count, calls, batch_calls, report))


async def _bench_online(people_count: int, calls: int, batch_calls: int, report: Report) -> None:
    people = _people(people_count, "online", int(time.time()) - 60)
    events = [e for p in people for e in p.events]
    random.Random(SEED + 1).shuffle(events)
    with tempfile.TemporaryDirectory(prefix="bench-features-") as data_dir:
        services = Services(Path(data_dir))
        try:
            for name in ("ingestion", "identity"):
                await wait_serving(services.target(name), services.start(name))
            async with (
                grpc.aio.insecure_channel(services.target("ingestion")) as ingestion,
                grpc.aio.insecure_channel(services.target("identity")) as identity,
            ):
                send = ingestion_service_pb2_grpc.IngestionServiceStub(ingestion).SendEvents
                started = time.perf_counter()
                for start in range(0, len(events), SEND_BATCH):
                    chunk = events[start : start + SEND_BATCH]
                    answer = await send(
                        ingestion_service_pb2.SendEventsRequest(events=chunk, source="bench"),
                        timeout=60,
                    )
                    if answer.accepted_count != len(chunk):
                        raise RuntimeError(f"ingestion accepted {answer.accepted_count} events")
                await _wait_for(
                    lambda: _logged(services.target("identity"), "resolutions"),
                    len(events),
                    "identity's resolution log",
                )
                identity_s = time.perf_counter() - started
                profile_ids = await _profile_ids(identity, people)
                if not all(profile_ids) or len(set(profile_ids)) != len(people):
                    raise RuntimeError("identity did not give every person a profile of their own")

                # Features starts now and catches up on the whole resolution log.
                started = time.perf_counter()
                process = services.start("features")
                await wait_serving(services.target("features"), process)
                serving = time.perf_counter()
                async with grpc.aio.insecure_channel(services.target("features")) as features:
                    last = _last_sent(events, people)
                    await _caught_up(
                        features, process, profile_ids, [p.orders for p in people], last
                    )
                    caught_up = time.perf_counter()
                    report.figures["features_rss_mib"] = _rss_mib(process.pid)
                    await _latencies(
                        features, identity, people, profile_ids, calls, batch_calls, report
                    )
                    await _while_applying(
                        features, send, process, people, profile_ids, calls, report
                    )
        finally:
            services.stop()
    figures = report.figures
    figures["online_people"] = len(people)
    figures["online_events"] = len(events)
    figures["identity_resolved_events_per_s"] = len(events) / identity_s
    figures["features_start_to_serving_s"] = serving - started
    figures["features_catch_up_s"] = caught_up - started
    figures["features_catch_up_events_per_s"] = len(events) / (caught_up - started)


def _last_sent(events: Sequence[event_pb2.Event], people: Sequence[Person]) -> list[int]:
    """Indexes of the people of the last request sent: when features has their orders it has
    (nearly) caught up, and a check of everyone is worth its cost."""
    index = {p.user_id: i for i, p in enumerate(people)}
    return sorted({index[e.user_id] for e in events[-SEND_BATCH:]})[:100]


async def _caught_up(
    features: grpc.aio.Channel,
    process: subprocess.Popen[bytes],
    profile_ids: Sequence[str],
    expected: Sequence[int],
    sample: Sequence[int],
) -> None:
    """Return once every profile's ``orders_lifetime`` is as expected. A sample is polled
    every 50 ms; everyone (a heavier call, which would slow features down if polled that
    often) only when the sample is right."""
    deadline = time.monotonic() + 300
    sampled_ids = [profile_ids[i] for i in sample]
    sampled = [expected[i] for i in sample]
    while True:
        if await _orders_seen(features, sampled_ids) == sampled and await _orders_seen(
            features, profile_ids
        ) == list(expected):
            return
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError("features did not catch up on the resolution log")
        await asyncio.sleep(0.05)


async def _while_applying(
    features: grpc.aio.Channel,
    send: Any,
    process: subprocess.Popen[bytes],
    people: Sequence[Person],
    profile_ids: Sequence[str],
    calls: int,
    report: Report,
) -> None:
    """GetFeatures latency while features applies new events: one more order per person is
    sent (all of it before measuring, so that this client does nothing else meanwhile), then
    GetFeatures of random profiles is timed until features has applied every order."""
    now_s = int(time.time())
    wave = []
    for person in people:
        event = event_pb2.Event(user_id=person.user_id, message_id=f"{person.user_id}-wave")
        event.track.event = "Order Completed"
        event.track.properties.update({"revenue": 42.0})
        event.timestamp.FromSeconds(now_s - 60)
        wave.append(event)
    stub = features_service_pb2_grpc.FeaturesServiceStub(features)
    rng = random.Random(SEED + 5)
    expected = [p.orders + 1 for p in people]
    started = time.perf_counter()
    for start in range(0, len(wave), SEND_BATCH):
        sent = ingestion_service_pb2.SendEventsRequest(
            events=wave[start : start + SEND_BATCH], source="bench"
        )
        await send(sent, timeout=60)
    samples: list[float] = []
    sample = list(range(len(people) - 100, len(people)))
    while True:
        for _ in range(50):
            request = features_service_pb2.GetFeaturesRequest(
                profile_id=profile_ids[rng.randrange(len(people))]
            )
            t0 = time.perf_counter()
            await stub.GetFeatures(request, timeout=10)
            samples.append((time.perf_counter() - t0) * 1000)
        if time.perf_counter() - started > 300 or process.poll() is not None:
            raise RuntimeError("features did not apply the new orders")
        sampled = await _orders_seen(features, [profile_ids[i] for i in sample])
        if (
            sampled == [expected[i] for i in sample]
            and await _orders_seen(features, profile_ids) == expected
        ):
            break
    applied = time.perf_counter() - started
    figures = report.figures
    figures["while_applying_events"] = len(wave)
    figures["while_applying_send_to_applied_s"] = applied
    figures["while_applying_get_features_calls"] = len(samples)
    figures["while_applying_get_features_p50_ms"] = percentile(samples, 50)
    figures["while_applying_get_features_p99_ms"] = percentile(samples, 99)
    figures["while_applying_get_features_max_ms"] = max(samples)
    report.target(
        "while_applying_get_features_p99_ms",
        f"<= {TARGET_ONLINE_P99_MS} ms (during updates)",
        figures["while_applying_get_features_p99_ms"] <= TARGET_ONLINE_P99_MS,
    )


async def _wait_for(count: Any, expected: int, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while (seen := await count()) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} holds {seen:,} entries, expected {expected:,}")
        await asyncio.sleep(0.05)


async def _latencies(
    features: grpc.aio.Channel,
    identity: grpc.aio.Channel,
    people: Sequence[Person],
    profile_ids: Sequence[str],
    calls: int,
    batch_calls: int,
    report: Report,
) -> None:
    """GetFeatures, BatchGetFeatures, and after each a health Check and a ResolveIdentifiers."""
    stub = features_service_pb2_grpc.FeaturesServiceStub(features)
    health = health_pb2_grpc.HealthStub(features)
    resolve = identity_service_pb2_grpc.IdentityServiceStub(identity).ResolveIdentifiers
    check = health_pb2.HealthCheckRequest()
    rng = random.Random(SEED + 2)
    clock = time.perf_counter
    warmup = max(100, calls // 10)
    single: list[float] = []
    bare: list[float] = []
    lookup: list[float] = []
    values_per_vector = 0
    for n in range(warmup + calls):
        index = rng.randrange(len(people))
        request = features_service_pb2.GetFeaturesRequest(profile_id=profile_ids[index])
        wanted = identity_service_pb2.ResolveIdentifiersRequest(
            identifiers=[identifier_pb2.Identifier(type="user_id", value=people[index].user_id)]
        )
        t0 = clock()
        answer = await stub.GetFeatures(request, timeout=10)
        t1 = clock()
        await health.Check(check, timeout=10)
        t2 = clock()
        await resolve(wanted, timeout=10)
        t3 = clock()
        if n >= warmup:
            single.append((t1 - t0) * 1000)
            bare.append((t2 - t1) * 1000)
            lookup.append((t3 - t2) * 1000)
        values_per_vector = len(answer.vector.values)
        orders = next(v.int64_value for v in answer.vector.values if v.name == "orders_lifetime")
        if orders != people[index].orders or answer.vector.profile_id != profile_ids[index]:
            raise RuntimeError(f"GetFeatures of {profile_ids[index]} gave {orders} orders")
    batched: list[float] = []
    batch_bare: list[float] = []
    for n in range(10 + batch_calls):
        chosen = rng.sample(range(len(people)), BATCH_PROFILES)
        many = features_service_pb2.BatchGetFeaturesRequest(
            profile_ids=[profile_ids[i] for i in chosen]
        )
        t0 = clock()
        vectors = await stub.BatchGetFeatures(many, timeout=10)
        t1 = clock()
        await health.Check(check, timeout=10)
        t2 = clock()
        if n >= 10:
            batched.append((t1 - t0) * 1000)
            batch_bare.append((t2 - t1) * 1000)
        if len(vectors.vectors) != BATCH_PROFILES or any(
            len(v.values) != values_per_vector for v in vectors.vectors
        ):
            raise RuntimeError("BatchGetFeatures did not return every profile's values")

    figures, references, ratios = report.figures, report.references, report.ratios
    figures["get_features_values_per_profile"] = values_per_vector
    figures["get_features_p50_ms"] = percentile(single, 50)
    figures["get_features_p99_ms"] = percentile(single, 99)
    figures[f"batch_get_features_{BATCH_PROFILES}_p50_ms"] = percentile(batched, 50)
    figures[f"batch_get_features_{BATCH_PROFILES}_p99_ms"] = percentile(batched, 99)
    figures["batch_get_features_profiles_per_s"] = BATCH_PROFILES / (np.mean(batched) / 1000)
    references["health_check_p50_ms"] = percentile(bare, 50)
    references["health_check_p99_ms"] = percentile(bare, 99)
    references["health_check_during_batch_p50_ms"] = percentile(batch_bare, 50)
    references["identity_resolve_one_p50_ms"] = percentile(lookup, 50)
    references["identity_resolve_one_p99_ms"] = percentile(lookup, 99)
    ratios["get_features_p50_vs_health_check"] = percentile(single, 50) / percentile(bare, 50)
    ratios["get_features_p99_vs_health_check"] = percentile(single, 99) / percentile(bare, 99)
    ratios["get_features_p50_vs_identity_resolve"] = percentile(single, 50) / percentile(lookup, 50)
    ratios[f"batch_{BATCH_PROFILES}_p50_vs_{BATCH_PROFILES}_single_p50"] = percentile(
        batched, 50
    ) / (BATCH_PROFILES * percentile(single, 50))
    report.target(
        "get_features_p99_ms",
        f"<= {TARGET_ONLINE_P99_MS} ms (over gRPC)",
        figures["get_features_p99_ms"] <= TARGET_ONLINE_P99_MS,
    )


# -- 2. streaming updates, in process -----------------------------------------------------------


def _feature_events(count: int, profiles: int, now_ns: int) -> list[FeatureEvent]:
    """``count`` events of ``profiles`` people in time order, of the kinds the built-ins read."""
    rng = random.Random(SEED + 3)
    events = []
    devices = [
        {"device": {"type": "mobile"}, "os": {"name": "iOS"}, "library": {"name": "analytics-ios"}},
        {"device": {"type": "desktop"}, "library": {"name": "analytics.js"}},
        {"device": {"type": "tablet"}, "library": {"name": "analytics.js"}},
        {"device": {"type": "android"}, "os": {"name": "Android"}},
    ]
    for _ in range(count):
        person = int(profiles * rng.random() ** 2)  # skewed: a few people do a lot
        profile_id = f"profile-{person:07d}"
        context = devices[person % len(devices)]
        draw = rng.random()
        properties: dict[str, Any]
        if draw < 0.12:
            kind, name = "track", "Order Completed"
            properties = {
                "order_id": f"o{rng.randrange(10**9)}",
                "revenue": rng.randrange(500, 40000) / 100,
            }
        elif draw < 0.45:
            kind, name = "track", "Product Viewed"
            properties = {
                "product_id": f"p{rng.randrange(5000)}",
                "price": rng.randrange(100, 9000) / 100,
            }
        elif draw < 0.85:
            kind, name = "page", "Product"
            properties = {"path": f"/p/{rng.randrange(5000)}"}
        elif draw < 0.92:
            kind, name, properties = "screen", "Home", {}
        elif draw < 0.95:
            kind, name = "track", "Survey Answered"
            properties = {"survey": "nps", "score": rng.randrange(11)}
        else:
            kind, name, properties, context = "identify", "", {"plan": "pro"}, {}
        timestamp = now_ns - rng.randrange(SPAN_DAYS * NS_PER_DAY)
        events.append(FeatureEvent(profile_id, timestamp, kind, name, properties, context))
    events.sort(key=lambda e: e.timestamp_ns)
    return events


def bench_streaming(count: int, profiles: int, report: Report) -> None:
    feature_set = FeatureSet()
    now_ns = time.time_ns()
    events = _feature_events(count, profiles, now_ns)
    # Warm-up: the feature set builds its reading plans on first use.
    warm: dict[str, ProfileState] = {}
    for event in events[:2000]:
        warm.setdefault(event.profile_id, ProfileState()).apply(event, feature_set)
    ours_s = reference_s = float("inf")
    for _ in range(3):
        gc.collect()
        states: dict[str, ProfileState] = {}
        started = time.perf_counter()
        for event in events:
            state = states.get(event.profile_id)
            if state is None:
                state = states[event.profile_id] = ProfileState()
            state.apply(event, feature_set)
        ours_s = min(ours_s, time.perf_counter() - started)

        gc.collect()
        counters: dict[str, dict[tuple[str, str, int], int]] = {}
        started = time.perf_counter()
        for event in events:
            counter = counters.get(event.profile_id)
            if counter is None:
                counter = counters[event.profile_id] = {}
            key = (event.type, event.name, event.timestamp_ns // NS_PER_DAY)
            counter[key] = counter.get(key, 0) + 1
        reference_s = min(reference_s, time.perf_counter() - started)
    # Reading every default feature of a profile, as GetFeatures does (without gRPC).
    ids = sorted(states)
    rng = random.Random(SEED + 4)
    reads: list[float] = []
    for _ in range(3000):
        state = states[ids[rng.randrange(len(ids))]]
        started = time.perf_counter()
        state.values(feature_set, now_ns)
        reads.append((time.perf_counter() - started) * 1000)
    figures = report.figures
    figures["streaming_events"] = len(events)
    figures["streaming_profiles"] = len(states)
    figures["streaming_apply_events_per_s"] = len(events) / ours_s
    figures["streaming_apply_us_per_event"] = ours_s / len(events) * 1e6
    figures["state_values_all_default_p50_ms"] = percentile(reads[300:], 50)
    figures["state_values_all_default_p99_ms"] = percentile(reads[300:], 99)
    report.references["dict_counter_events_per_s"] = len(events) / reference_s
    report.ratios["streaming_apply_vs_dict_counter"] = reference_s / ours_s


# -- 3. batch backfill --------------------------------------------------------------------------

AS_OF_NS = 1_751_306_400 * 10**9
"""2025-06-30T18:00:00Z."""
ROW_GROUP = 131_072
COMPARED = (
    "orders_lifetime",
    "orders_90d",
    "revenue_90d",
    "recency_days",
    "frequency_365d",
    "monetary_365d",
    "events_30d",
    "page_views_30d",
)
"""The features the hand-written query reproduces."""

PLAIN_SQL = f"""
WITH e AS (
    SELECT
        profile_id,
        timestamp_ns AS ts,
        timestamp_ns // {NS_PER_DAY} AS day,
        type,
        type = 'track' AND name = 'Order Completed' AS is_order,
        CASE WHEN type = 'track' AND name = 'Order Completed'
            THEN TRY_CAST(json_extract_string(properties, '$.revenue') AS DOUBLE) END AS revenue
    FROM events
    WHERE timestamp_ns <= $as_of AND type IN ('track', 'page', 'screen')
)
SELECT
    profile_id,
    count(*) FILTER (WHERE is_order) AS orders_lifetime,
    count(*) FILTER (WHERE is_order AND day > $as_of_day - 90) AS orders_90d,
    sum(revenue) FILTER (WHERE day > $as_of_day - 90) AS revenue_90d,
    ($as_of - max(ts) FILTER (WHERE is_order)) / {float(NS_PER_DAY)} AS recency_days,
    count(*) FILTER (WHERE is_order AND day > $as_of_day - 365) AS frequency_365d,
    sum(revenue) FILTER (WHERE day > $as_of_day - 365) AS monetary_365d,
    count(*) FILTER (WHERE day > $as_of_day - 30) AS events_30d,
    count(*) FILTER (WHERE type = 'page' AND day > $as_of_day - 30) AS page_views_30d
FROM e
GROUP BY profile_id
ORDER BY profile_id
"""
"""What one would write by hand for :data:`COMPARED`, with the built-ins' semantics: windows of
the last N UTC days including as_of's, events at or before as_of, behavioural events are track,
page and screen."""

# Event kinds: (type, name, share of events, properties template or None). A template is three
# pieces around two per-row values: piece0 + value1 + piece1 + value2 + piece2.
KINDS: tuple[tuple[str, str, float, tuple[str, str, str] | None], ...] = (
    ("track", "Order Completed", 0.094, ('{"order_id":"o', '","revenue":', ',"currency":"EUR"}')),
    ("track", "Order Completed", 0.003, ('{"order_id":"o', '","revenue":"', '","currency":"EUR"}')),
    ("track", "Order Completed", 0.003, ('{"order_id":"o', '","currency":"EUR","discount":', "}")),
    ("track", "Product Viewed", 0.30, ('{"product_id":"p', '","price":', "}")),
    ("track", "Cart Viewed", 0.05, None),
    ("track", "Survey Answered", 0.02, ('{"survey":"nps","response_id":"r', '","score":', "}")),
    ("page", "Product", 0.30, ('{"path":"/p/', '","load_ms":', "}")),
    ("page", "Home", 0.10, None),
    ("screen", "Home", 0.08, None),
    ("identify", "", 0.05, ('{"plan":"pro","account":"a', '","seats":', "}")),
)
CONTEXTS = (
    '{"device":{"type":"mobile"},"library":{"name":"analytics.js"}}',
    '{"device":{"type":"desktop"},"library":{"name":"analytics.js"}}',
    '{"device":{"type":"tablet"},"library":{"name":"analytics.js"}}',
    '{"device":{"type":"ios"},"os":{"name":"iOS"},"library":{"name":"analytics-ios"}}',
    '{"device":{"type":"android"},"os":{"name":"Android"},"library":{"name":"analytics-android"}}',
)


def generate_events(profiles: int, count: int, path: Path) -> None:
    """``count`` events of ``profiles`` people, column-wise, written to Parquet at ``path``."""
    rng = np.random.default_rng(SEED + 5)
    # Skewed activity: low numbers are the busy people; ids are shuffled so that the order of
    # profile ids says nothing about activity.
    person = (profiles * rng.random(count) ** 2).astype(np.int64)
    person = rng.permutation(profiles)[person]
    ages = rng.integers(0, SPAN_DAYS * NS_PER_DAY, count)
    future = rng.random(count) < 0.01  # dated after as_of: every query must leave them out
    timestamps = np.where(future, AS_OF_NS + ages % (3 * NS_PER_DAY), AS_OF_NS - ages)
    order = np.argsort(timestamps, kind="stable")  # log order
    person, timestamps = person[order], timestamps[order]
    del ages, future, order

    shares = np.array([k[2] for k in KINDS])
    kind = rng.choice(len(KINDS), size=count, p=shares / shares.sum()).astype(np.int32)
    kinds = pa.array(kind)
    types = pa.array([k[0] for k in KINDS]).take(kinds)
    names = pa.array([k[1] for k in KINDS]).take(kinds)
    pieces = [pa.array([None if k[3] is None else k[3][i] for k in KINDS]) for i in range(3)]

    # value1: a product number for product views (a catalogue of 20,000), else a row number;
    # value2: a score for surveys, else an amount of money.
    product = kind == 3
    first = np.where(product, rng.integers(0, 20_000, count), np.arange(count))
    amount = np.round(rng.uniform(5, 400, count), 2)
    second = np.where(kind == 5, rng.integers(0, 11, count).astype(np.float64), amount)
    del product, amount
    properties = pc.binary_join_element_wise(
        pieces[0].take(kinds),
        pc.cast(pa.array(first), pa.string()),
        pieces[1].take(kinds),
        pc.cast(pa.array(second), pa.string()),
        pieces[2].take(kinds),
        "",
    )
    del first, second
    device = pa.array(person % len(CONTEXTS))
    context = pc.if_else(
        pc.equal(types, "identify"), pa.scalar(None, pa.string()), pa.array(CONTEXTS).take(device)
    )
    profile_ids = pc.binary_join_element_wise(
        "p", pc.utf8_lpad(pc.cast(pa.array(person), pa.string()), 7, "0"), ""
    )
    table = pa.table(
        [profile_ids, pa.array(timestamps), types, names, properties, context],
        schema=ARROW_SCHEMA,
    )
    pq.write_table(table, path, row_group_size=ROW_GROUP)


def _memory() -> dict[str, float]:
    """This process's peak RSS as ``getrusage`` gives it, and its VmHWM and VmRSS (bytes).

    On Linux ``ru_maxrss`` survives fork and exec: a child's starts at its parent's RSS at the
    fork. The parent of the queries holds no events (they are generated in a child too), so the
    queries' ``ru_maxrss`` is their own; VmHWM, which exec resets, is kept as a check."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "hwm": int(status["VmHWM"].split()[0]) * 1024,
        "rss": int(status["VmRSS"].split()[0]) * 1024,
    }


def _child_query(kind: str, parquet: str, names: list[str] | None, out: str) -> dict[str, float]:
    """One query in this (fresh) process: seconds, peak RSS and the RSS before it."""
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet('{parquet}')")
    feature_set = FeatureSet()
    before = _memory()
    started = time.perf_counter()
    if kind == "plain":
        params = {"as_of": AS_OF_NS, "as_of_day": AS_OF_NS // NS_PER_DAY}
        result = con.sql(PLAIN_SQL, params=params).to_arrow_table()
    else:
        result = batch_values(con, "events", feature_set, AS_OF_NS, names)
    seconds = time.perf_counter() - started
    after = _memory()
    pq.write_table(result, out)
    return {
        "seconds": seconds,
        "peak_rss": after["ru_maxrss"],
        "peak_hwm": after["hwm"],
        "rss_before": before["rss"],
        "rows": result.num_rows,
    }


def _child_generate(profiles: int, count: int, path: str) -> dict[str, float]:
    started = time.perf_counter()
    generate_events(profiles, count, Path(path))
    return {"seconds": time.perf_counter() - started, "peak_rss": _memory()["ru_maxrss"]}


def _in_child(function: Any, *args: Any) -> dict[str, float]:
    """``function(*args)`` in a fresh spawned process."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        result: dict[str, float] = pool.apply(function, args)
        return result


def _compare(ours: pa.Table, plain: pa.Table) -> None:
    """Fail loudly unless both give the same profiles and values."""
    if ours.column("profile_id") != plain.column("profile_id"):
        raise AssertionError("the backfill and the plain query disagree on the profiles")
    for name in COMPARED:
        a, b = ours.column(name).combine_chunks(), plain.column(name).combine_chunks()
        if not pc.equal(pc.is_null(a), pc.is_null(b)).to_numpy(zero_copy_only=False).all():
            raise AssertionError(f"{name}: the two queries disagree on which values are null")
        x = pc.fill_null(a, 0).to_numpy(zero_copy_only=False)
        y = pc.fill_null(b, 0).to_numpy(zero_copy_only=False)
        if pa.types.is_integer(a.type) and pa.types.is_integer(b.type):
            differ = x != y
        else:
            x, y = x.astype(np.float64), y.astype(np.float64)
            differ = ~np.isclose(x, y, rtol=1e-9, atol=1e-9)
        if differ.any():
            bad = np.flatnonzero(differ)[:5]
            raise AssertionError(
                f"{name}: the backfill and the plain query differ on {int(differ.sum()):,} "
                f"profiles, e.g. {ours.column('profile_id').take(bad).to_pylist()}: "
                f"{x[bad].tolist()} vs {y[bad].tolist()}"
            )


def bench_backfill(profiles: int, count: int, rounds: int, report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-features-batch-") as tmp:
        root = Path(tmp)
        parquet = root / "events.parquet"
        generated = _in_child(_child_generate, profiles, count, str(parquet))
        report.figures["backfill_generate_s"] = generated["seconds"]
        report.figures["backfill_events"] = count
        report.figures["backfill_parquet_mib"] = parquet.stat().st_size / 2**20
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "plain": [], "all": []}
        outputs = {key: str(root / f"{key}.parquet") for key in runs}
        for _ in range(rounds):
            runs["plain"].append(
                _in_child(_child_query, "plain", str(parquet), None, outputs["plain"])
            )
            runs["ours"].append(
                _in_child(_child_query, "ours", str(parquet), list(COMPARED), outputs["ours"])
            )
            runs["all"].append(_in_child(_child_query, "all", str(parquet), None, outputs["all"]))
        ours = pq.read_table(outputs["ours"])
        _compare(ours, pq.read_table(outputs["plain"]))
        every = pq.read_metadata(outputs["all"])
        if every.num_rows < ours.num_rows:
            raise AssertionError("the backfill of every feature lost profiles")
        columns = every.num_columns - 1
    best = {key: min(r["seconds"] for r in value) for key, value in runs.items()}
    peak = {key: max(r["peak_rss"] for r in value) / 2**20 for key, value in runs.items()}
    hwm = {key: max(r["peak_hwm"] for r in value) / 2**20 for key, value in runs.items()}
    base = {key: min(r["rss_before"] for r in value) / 2**20 for key, value in runs.items()}
    figures = report.figures
    figures["backfill_profiles"] = ours.num_rows
    figures["backfill_8_features_s"] = best["ours"]
    figures["backfill_8_features_events_per_s"] = count / best["ours"]
    figures["backfill_8_features_peak_rss_mib"] = peak["ours"]
    figures["backfill_8_features_vm_hwm_mib"] = hwm["ours"]
    figures["backfill_all_features_s"] = best["all"]
    figures["backfill_all_features_count"] = columns
    figures["backfill_all_features_peak_rss_mib"] = peak["all"]
    figures["backfill_child_rss_before_query_mib"] = base["ours"]
    figures["backfill_generate_peak_rss_mib"] = generated["peak_rss"] / 2**20
    report.references["plain_duckdb_8_features_s"] = best["plain"]
    report.references["plain_duckdb_8_features_peak_rss_mib"] = peak["plain"]
    report.references["plain_duckdb_8_features_vm_hwm_mib"] = hwm["plain"]
    report.ratios["backfill_8_features_time_vs_plain"] = best["ours"] / best["plain"]
    report.ratios["backfill_8_features_peak_rss_vs_plain"] = peak["ours"] / peak["plain"]
    report.ratios["backfill_all_features_time_vs_plain_8"] = best["all"] / best["plain"]
    report.target(
        "backfill_8_features_time_vs_plain",
        f"<= {TARGET_BACKFILL_RATIO}x plain DuckDB",
        best["ours"] / best["plain"] <= TARGET_BACKFILL_RATIO,
    )


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    quick = args.quick
    report = Report("features")
    people, calls, batch_calls = (1000, 500, 100) if quick else (2000, 2000, 300)
    streamed = 50_000 if quick else 200_000
    profiles, events = (100_000, 1_000_000) if quick else (1_000_000, 10_000_000)
    rounds = 3
    # The backfill first, while this process is small: its children's peak RSS starts at ours.
    bench_backfill(profiles, events, rounds, report)
    bench_streaming(streamed, 10_000, report)
    bench_online(people, calls, batch_calls, report)
    figures, ratios = report.figures, report.ratios
    print(
        f"features: GetFeatures p99 {figures['get_features_p99_ms']:.2f} ms over gRPC "
        f"({ratios['get_features_p99_vs_health_check']:.1f}x a health check); "
        f"{figures['streaming_apply_events_per_s']:,.0f} events/s streamed in process "
        f"({ratios['streaming_apply_vs_dict_counter']:.2f}x a dict counter); backfill of "
        f"{events:,} events in {figures['backfill_8_features_s']:.1f} s "
        f"({ratios['backfill_8_features_time_vs_plain']:.2f}x plain DuckDB), every feature in "
        f"{figures['backfill_all_features_s']:.1f} s"
    )
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
