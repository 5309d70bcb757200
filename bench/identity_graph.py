"""Deterministic identity stitching: full rebuilds of the graph, and linking one item at a time.

1. Rebuild. An identifier edge list shaped like a real identity graph is generated with a fixed
   seed: most people have 1 to 5 identifiers (a geometric distribution), one in a hundred has a
   long tail of them (log-normal, up to a few hundred: cookies cleared on every visit), each
   person's identifiers are joined by a random tree of links plus repeated links (the same
   pair seen on many events), and a few shared-device hubs each join hundreds to thousands of
   people. Identifier numbers and edge order are shuffled, as hashed ids would be. The
   connected components of 1,000,000 and 10,000,000 links (200,000 and 1,000,000 with
   ``--quick``) are computed by ``rebuild.connected_components`` (numpy, hooking and pointer
   jumping) and, on the same edges in the same run, by ``scipy.sparse.csgraph`` (building the
   CSR matrix it needs included, as our input is an edge list too). Both partitions must agree.
   Best of the rounds run. Over-limit detection (components with more than one user id) is
   timed on the largest size.
2. Incremental. ``IdentityGraph.link`` (with trait survivorship and change tracking) is given
   one realistic item at a time, in-process: a graph preloaded with people, then page, track
   and identify events and CRM records of known and new people in random order, shared devices
   included. Items are serialized ``IngestedItem`` bytes as the consumer reads them from the
   log; p50/p99 are reported for ``link`` alone and for parse + extract + link. Every 500
   items are committed to SQLite (WAL, synchronous=FULL) as the consumer will: the graph's
   changes, each item's recent-event line and the log offset in one transaction; the batch
   time and the resulting items/s are reported too, and the resident memory the preloaded
   graph takes per profile. The figure over gRPC is measured once the consumer is wired into
   the service.

    python bench/identity_graph.py [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

from profilemesh.ingestion.v1 import event_log_pb2
from profilemesh.services.identity.extraction import EventSummary, extract, summarize
from profilemesh.services.identity.graph import IdentityGraph
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.rebuild import connected_components, over_limit_components
from profilemesh.services.identity.rules import Rules
from profilemesh.services.identity.store import GraphStore
from profilemesh.shared.log.sqlite_store import SqliteConsumerStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report, free_port, parse_args, percentile

T = TypeVar("T")
SEED = 20240501
TARGET_LINKS_PER_S = 1_000_000
TARGET_P99_MS = 2.0


# -- 1. rebuild -------------------------------------------------------------------------------


@dataclass
class EdgeList:
    """A generated identity graph: edges over numbered identifiers, and each one's type."""

    sources: NDArray[np.int64]
    targets: NDArray[np.int64]
    node_count: int
    is_user_id: NDArray[np.bool_]


def generate_edges(links: int, rng: np.random.Generator) -> EdgeList:
    """Exactly ``links`` edges shaped like a real identity graph (see the module docstring)."""
    people = int(links / 2.0)  # about two links per person with the shapes below
    sizes = rng.geometric(0.45, people)  # 1 to 5 identifiers for 95% of people
    tail = rng.random(people) < 0.01
    sizes[tail] = np.minimum(10 + rng.lognormal(2.5, 1.0, tail.sum()).astype(np.int64), 500)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    nodes = int(sizes.sum())
    owner = np.repeat(np.arange(people), sizes)
    position = np.arange(nodes) - starts[owner]
    # A random recursive tree per person: each identifier links to one seen before it.
    later = position > 0
    tree_targets = np.flatnonzero(later)
    tree_sources = starts[owner[later]] + (rng.random(later.sum()) * position[later]).astype(
        np.int64
    )
    # The same people seen again on other events: extra links inside each person.
    multi = np.flatnonzero(sizes > 1)
    repeats = rng.choice(multi, size=len(tree_targets) // 4)
    repeat_sources = starts[repeats] + (rng.random(len(repeats)) * sizes[repeats]).astype(np.int64)
    repeat_targets = starts[repeats] + (rng.random(len(repeats)) * sizes[repeats]).astype(np.int64)
    # Shared devices (kiosks, family tablets): a few hubs joining many people.
    hubs = max(3, people // 100_000)
    degrees = np.minimum(200 + rng.lognormal(6.0, 1.0, hubs).astype(np.int64), 20_000)
    hub_nodes = nodes + np.repeat(np.arange(hubs), degrees)
    hub_people = rng.integers(0, people, int(degrees.sum()))
    hub_targets = starts[hub_people] + (rng.random(len(hub_people)) * sizes[hub_people]).astype(
        np.int64
    )
    nodes += hubs

    sources = np.concatenate((tree_sources, repeat_sources, hub_nodes))
    targets = np.concatenate((tree_targets, repeat_targets, hub_targets))
    while len(sources) < links:  # top up with more repeated links if short
        extra = rng.integers(0, len(sources), links - len(sources))
        sources = np.concatenate((sources, sources[extra]))
        targets = np.concatenate((targets, targets[extra]))
    order = rng.permutation(len(sources))[:links]
    relabel = rng.permutation(nodes)  # hashed ids carry no locality
    is_user_id = np.zeros(nodes, dtype=bool)
    is_user_id[relabel[starts[rng.random(people) < 0.6]]] = True  # 60% of people signed in
    return EdgeList(relabel[sources[order]], relabel[targets[order]], nodes, is_user_id)


def scipy_labels(edges: EdgeList) -> tuple[int, NDArray[np.int32]]:
    """The reference: scipy's connected components on the same edges, CSR build included."""
    n = edges.node_count
    weights = np.ones(len(edges.sources), dtype=np.int8)
    matrix = coo_matrix((weights, (edges.sources, edges.targets)), shape=(n, n)).tocsr()
    count, labels = scipy_components(matrix, directed=False)
    return int(count), labels


def same_partition(ours: NDArray[np.int64], theirs: NDArray[np.int32], count: int) -> bool:
    """Whether two labelings describe the same partition (a bijection between labels)."""
    pairs = np.unique(ours.astype(np.int64) * (count + 1) + theirs)
    return len(pairs) == count == len(np.unique(ours))


def best_of(rounds: int, run: Callable[[], T]) -> tuple[float, T]:
    """(best seconds, last result) of ``rounds`` calls of ``run``."""
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def bench_rebuild(sizes: list[int], rounds: int, report: Report) -> None:
    """Rebuild each size of generated graph, next to scipy on the same edges."""
    rng = np.random.default_rng(SEED)
    for links in sizes:
        label = f"{links // 1_000_000}m" if links >= 1_000_000 else f"{links // 1000}k"
        seconds, over = _rebuild_one(generate_edges(links, rng), label, rounds, report)
        gc.collect()
    # Over-limit detection (more than one user id per profile), on the largest size.
    report.figures["over_limit_detection_seconds"] = seconds
    report.figures["over_limit_profiles"] = over


def _rebuild_one(edges: EdgeList, label: str, rounds: int, report: Report) -> tuple[float, int]:
    """Report one size; returns (seconds, count) of its over-limit detection."""
    links = len(edges.sources)
    ours_s, labels = best_of(
        rounds, lambda: connected_components(edges.sources, edges.targets, edges.node_count)
    )
    scipy_s, (count, reference) = best_of(rounds, lambda: scipy_labels(edges))
    if not same_partition(labels, reference, count):
        raise AssertionError(f"rebuild of {links:,} links disagrees with scipy")
    report.figures[f"rebuild_{label}_links_per_s"] = links / ours_s
    report.figures[f"rebuild_{label}_seconds"] = ours_s
    report.figures[f"rebuild_{label}_identifiers"] = edges.node_count
    report.figures[f"rebuild_{label}_profiles"] = count
    report.figures[f"rebuild_{label}_largest_profile"] = int(np.bincount(labels).max())
    report.references[f"scipy_{label}_links_per_s"] = links / scipy_s
    report.ratios[f"rebuild_{label}_vs_scipy"] = scipy_s / ours_s
    report.target(
        f"rebuild_{label}_links_per_s",
        f">= {TARGET_LINKS_PER_S:,} links/s",
        links / ours_s >= TARGET_LINKS_PER_S,
    )
    types = edges.is_user_id.astype(np.int64)  # type 1: user_id, type 0: the rest
    started = time.perf_counter()
    over = over_limit_components(labels, types, [0, 1])
    return time.perf_counter() - started, len(over)


# -- 2. incremental ---------------------------------------------------------------------------


def person_items(person: int, rng: np.random.Generator, devices: int) -> list[bytes]:
    """The items one person produces: visits, a sign-in, maybe a CRM record."""
    items: list[event_log_pb2.IngestedItem] = []
    anonymous = [f"anon-{person}-{n}" for n in range(int(rng.geometric(0.6)))]
    device = f"device-shared-{rng.integers(devices)}" if rng.random() < 0.05 else f"device-{person}"
    signed_in = rng.random() < 0.6
    for anonymous_id in anonymous:
        for n in range(int(rng.integers(1, 4))):
            item = event_log_pb2.IngestedItem(source="web")
            event = item.event
            event.message_id = f"m-{person}-{anonymous_id}-{n}"
            event.anonymous_id = anonymous_id
            event.timestamp.FromNanoseconds(1_700_000_000_000_000_000 + len(items) * 10**9)
            event.context.device.id = device
            event.context.user_agent = "Mozilla/5.0 (X11; Linux x86_64)"
            if n % 2:
                event.track.event = "Product Viewed"
                event.track.properties.update({"sku": f"sku-{n}", "price": 19.9})
            else:
                event.page.name = "Home"
                event.page.properties.update({"path": "/", "title": "Home"})
            items.append(item)
        if signed_in:
            item = event_log_pb2.IngestedItem(source="web")
            event = item.event
            event.message_id = f"i-{person}-{anonymous_id}"
            event.user_id = f"user-{person}"
            event.anonymous_id = anonymous_id
            event.timestamp.FromNanoseconds(1_700_000_000_000_000_000 + len(items) * 10**9)
            event.identify.traits.update(
                {
                    "email": f"Person.{person}@Example.com",
                    "first_name": f"First{person}",
                    "plan": "pro" if rng.random() < 0.3 else "free",
                    "city": "Lyon",
                }
            )
            items.append(item)
    if signed_in and rng.random() < 0.3:
        item = event_log_pb2.IngestedItem(source="import")
        record = item.record
        record.source = "salesforce"
        record.record_id = f"003{person:08d}"
        record.attributes.update(
            {
                "email": f"person.{person}@example.com",
                "phone": f"+3361{person % 10_000_000:07d}",
                "first_name": f"First{person}",
                "last_name": f"Last{person}",
            }
        )
        record.updated_at.FromNanoseconds(1_690_000_000_000_000_000)
        items.append(item)
    return [item.SerializeToString() for item in items]


CONSUMER_BATCH = 500
"""Items the consumer applies per transaction (graph changes, recent events and offset)."""


def bench_incremental(
    preload_people: int, measured_people: int, data_dir: Path, report: Report
) -> None:
    """Link one item at a time into a preloaded graph, saving each batch as the consumer will."""
    rng = np.random.default_rng(SEED + 1)
    rules = Rules(default_region="FR")
    graph = IdentityGraph(rules)
    store = SqliteConsumerStore(data_dir / "identity.db")
    store.schema(GraphStore.schema())
    devices = max(10, (preload_people + measured_people) // 2000)
    gc.collect()
    rss_before = _rss_bytes()
    started = time.perf_counter()
    for person in range(preload_people):
        for data in person_items(person, rng, devices):
            graph.link(extract(event_log_pb2.IngestedItem.FromString(data), rules, graph.knows))
        if person % 1000 == 999:
            with store.transaction() as tx:
                GraphStore.save(tx, graph.drain_changes())
    with store.transaction() as tx:
        GraphStore.save(tx, graph.drain_changes())
    preload_s = time.perf_counter() - started
    gc.collect()
    bytes_per_profile = (_rss_bytes() - rss_before) / len(graph)
    # What the service does once it has loaded its graph at start-up: move the loaded objects
    # out of the collector's reach, so that a full collection does not walk the whole graph
    # (hundreds of milliseconds at a few million objects) in the middle of an item.
    gc.collect()
    gc.freeze()

    # Known people come back (new items of preloaded people) next to new people.
    items: list[bytes] = []
    for n in range(measured_people):
        person = int(rng.integers(preload_people)) if n % 2 else preload_people + n
        items.extend(person_items(person, rng, devices))
    order = rng.permutation(len(items)).tolist()
    link_ms: list[float] = []
    total_ms: list[float] = []
    batch_ms: list[float] = []
    refused = merged = 0
    clock = time.perf_counter_ns
    consumer_started = time.perf_counter()
    for first in range(0, len(order), CONSUMER_BATCH):
        batch_started = clock()
        recent: list[tuple[str, Identifier, EventSummary]] = []
        for index in order[first : first + CONSUMER_BATCH]:
            t0 = clock()
            item = event_log_pb2.IngestedItem.FromString(items[index])
            evidence = extract(item, rules, graph.knows)
            t1 = clock()
            outcome = graph.link(evidence)
            t2 = clock()
            link_ms.append((t2 - t1) / 1e6)
            total_ms.append((t2 - t0) / 1e6)
            refused += len(outcome.refused)
            merged += len(outcome.merged)
            if outcome.profile_id is not None and outcome.anchor is not None:
                recent.append((outcome.profile_id, outcome.anchor, summarize(item)))
        with store.transaction() as tx:
            GraphStore.save(tx, graph.drain_changes())
            GraphStore.append_recent_events(tx, recent)
            store.commit_offset(tx, "identity", "events", 0, first + CONSUMER_BATCH)
        batch_ms.append((clock() - batch_started) / 1e6)
    consumer_s = time.perf_counter() - consumer_started
    gc.unfreeze()

    figures = report.figures
    figures["incremental_items"] = len(link_ms)
    figures["incremental_preloaded_profiles"] = preload_people
    figures["incremental_preload_seconds"] = preload_s
    figures["memory_bytes_per_profile"] = bytes_per_profile
    figures["incremental_live_profiles"] = len(graph)
    figures["incremental_merges"] = merged
    figures["incremental_refusals"] = refused
    figures["incremental_link_p50_ms"] = percentile(link_ms, 50)
    figures["incremental_link_p99_ms"] = percentile(link_ms, 99)
    figures["incremental_link_max_ms"] = max(link_ms)
    figures["incremental_parse_extract_link_p50_ms"] = percentile(total_ms, 50)
    figures["incremental_parse_extract_link_p99_ms"] = percentile(total_ms, 99)
    figures["incremental_parse_extract_link_items_per_s"] = len(total_ms) / (sum(total_ms) / 1000)
    figures[f"consumer_batch_{CONSUMER_BATCH}_p50_ms"] = percentile(batch_ms, 50)
    figures[f"consumer_batch_{CONSUMER_BATCH}_p99_ms"] = percentile(batch_ms, 99)
    figures["consumer_items_per_s"] = len(link_ms) / consumer_s
    report.target(
        "incremental_parse_extract_link_p99_ms",
        f"<= {TARGET_P99_MS} ms (in-process)",
        figures["incremental_parse_extract_link_p99_ms"] <= TARGET_P99_MS,
    )


def bench_grpc(events: int, report: Report) -> None:
    """Event -> profile over gRPC: ``profilemesh serve ingestion`` and ``serve identity`` run as
    a user runs them; each event is sent with ``SendEvent`` (durable ack), then
    ``ResolveIdentifiers`` is called until identity has resolved it. Also the latency of a
    ``ResolveIdentifiers`` call on its own."""
    asyncio.run(_bench_grpc(events, report))


async def _bench_grpc(events: int, report: Report) -> None:
    import grpc

    from profilemesh.common.v1 import identifier_pb2
    from profilemesh.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
    from profilemesh.ingestion.v1 import (
        event_pb2,
        ingestion_service_pb2,
        ingestion_service_pb2_grpc,
    )

    ports = {"ingestion": free_port(), "identity": free_port()}
    with tempfile.TemporaryDirectory(prefix="bench-identity-grpc-") as data_dir:
        env = {
            **os.environ,
            "PROFILEMESH_DATA_DIR": data_dir,
            "PROFILEMESH_LOG_LEVEL": "WARNING",
            **{f"PROFILEMESH_SERVICES__{n.upper()}__PORT": str(p) for n, p in ports.items()},
        }
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "profilemesh.services.cli", "serve", name], env=env
            )
            for name in ports
        ]
        try:
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{ports['ingestion']}") as ingestion,
                grpc.aio.insecure_channel(f"127.0.0.1:{ports['identity']}") as identity,
            ):
                send = ingestion_service_pb2_grpc.IngestionServiceStub(ingestion).SendEvent
                resolve = identity_service_pb2_grpc.IdentityServiceStub(identity)
                for channel in (ingestion, identity):
                    await asyncio.wait_for(channel.channel_ready(), 30)
                end_to_end: list[float] = []
                lookups: list[float] = []
                for i in range(events + 50):
                    event = event_pb2.Event(user_id=f"u-{i}", anonymous_id=f"a-{i}")
                    event.identify.traits.update({"email": f"person{i}@example.com"})
                    wanted = identity_service_pb2.ResolveIdentifiersRequest(
                        identifiers=[
                            identifier_pb2.Identifier(type="email", value=f"person{i}@example.com")
                        ]
                    )
                    started = time.perf_counter()
                    await send(ingestion_service_pb2.SendEventRequest(event=event), timeout=10)
                    while True:
                        asked = time.perf_counter()
                        answer = await resolve.ResolveIdentifiers(wanted, timeout=10)
                        if answer.resolutions[0].found:
                            break
                    done = time.perf_counter()
                    if i >= 50:  # warm-up
                        end_to_end.append((done - started) * 1000)
                        lookups.append((done - asked) * 1000)
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=30)
    figures = report.figures
    figures["grpc_event_to_profile_p50_ms"] = percentile(end_to_end, 50)
    figures["grpc_event_to_profile_p99_ms"] = percentile(end_to_end, 99)
    figures["grpc_resolve_call_p50_ms"] = percentile(lookups, 50)
    figures["grpc_resolve_call_p99_ms"] = percentile(lookups, 99)
    report.target(
        "grpc_resolve_call_p99_ms",
        f"<= {TARGET_P99_MS} ms (over gRPC)",
        figures["grpc_resolve_call_p99_ms"] <= TARGET_P99_MS,
    )


def _rss_bytes() -> int:
    """Resident memory of this process (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    sizes = [200_000, 1_000_000] if args.quick else [1_000_000, 10_000_000]
    rounds = 2 if args.quick else 3
    preload, measured = (20_000, 10_000) if args.quick else (200_000, 50_000)
    report = Report("identity_graph")
    # Incremental first, in a fresh process, so that its resident memory figure is the graph's.
    with tempfile.TemporaryDirectory(prefix="bench-identity-") as data_dir:
        bench_incremental(preload, measured, Path(data_dir), report)
    bench_rebuild(sizes, rounds, report)
    bench_grpc(300 if args.quick else 2000, report)
    print(
        f"identity_graph: rebuild of {', '.join(f'{s:,}' for s in sizes)} links (best of "
        f"{rounds}) next to scipy's connected_components; {measured:,} people's items linked "
        f"one at a time after preloading {preload:,} people"
    )
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
