"""Source connectors and source runs: Segment JSON and row conversion, the built-in file and
PostgreSQL connectors, and runs into a real in-process ``Intake`` that resume exactly."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.protobuf import json_format, struct_pb2

from profilemesh.common.v1 import job_pb2
from profilemesh.ingestion.v1 import (
    event_log_pb2,
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
    source_run_pb2,
)
from profilemesh.plugins.file_sources import CsvSource, JsonlSource, ParquetSource
from profilemesh.plugins.inline_source import InlineSource, InlineSourceConfig
from profilemesh.plugins.postgres_source import PostgresSource
from profilemesh.services.import_command import (
    UsageError,
    add_import_parser,
    build_config,
    run_import,
    summary,
)
from profilemesh.services.ingestion.intake import EventsOutcome, Intake
from profilemesh.services.ingestion.source_runs import (
    INTERRUPTED,
    STORE_NAME,
    RunState,
    SourceRunInfo,
    SourceRuns,
)
from profilemesh.services.ingestion.source_runs_servicer import SourceRunsServicer
from profilemesh.services.ingestion.tracking_plans import TrackingPlans
from profilemesh.shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from profilemesh.shared.extension_points import Checkpoint, SourceBatch, SourceConnector
from profilemesh.shared.hookspecs import hookimpl
from profilemesh.shared.log.api import type_url
from profilemesh.shared.log.embedded import EmbeddedLog
from profilemesh.shared.log.stores import files_under
from profilemesh.shared.plugin_manager import PluginSet, create_plugin_manager
from profilemesh.shared.record_rows import RecordMapping, record_from_item
from profilemesh.shared.segment_json import event_from_json
from profilemesh.shared.server import bind, create_server
from profilemesh.shared.settings import (
    ClientSettings,
    Endpoint,
    Endpoints,
    IngestionSettings,
    Settings,
)
from profilemesh.testing import check_source_connector
from tests.conftest import free_port
from tests.postgres_server import PostgresServer, running_postgres
from tests.store_backends import StoreHarness

START = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
MAPPING = {
    "record_id": "id",
    "identifiers": {"email": "email", "phone": "phone"},
    "updated_at": "updated_at",
}


def segment_events(count: int, prefix: str = "m") -> list[dict[str, Any]]:
    """``count`` Segment track events with distinct message ids, as a file would hold them."""
    return [
        {
            "type": "track",
            "messageId": f"{prefix}-{index}",
            "userId": f"user-{index % 7}",
            "event": "Order Completed",
            "properties": {"order_id": f"A{index}", "revenue": 10.5 + index},
            "timestamp": (START + timedelta(minutes=index)).isoformat(),
            "context": {"ip": "203.0.113.9", "locale": "en-GB"},
        }
        for index in range(count)
    ]


def customer_rows(count: int, first: int = 0) -> list[dict[str, Any]]:
    """``count`` flat CRM rows with ids from ``first``."""
    return [
        {
            "id": str(index),
            "email": f"person{index}@example.com",
            "phone": f"+3161234{index:04d}",
            "name": f"Person {index}",
            "updated_at": (START + timedelta(hours=index)).isoformat(),
        }
        for index in range(first, first + count)
    ]


def write_jsonl(path: Path, items: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# -- Segment JSON ------------------------------------------------------------------------------


def test_a_segment_track_event_converts_with_its_context_and_keeps_unknown_context_keys() -> None:
    event = event_from_json(
        {
            "type": "track",
            "messageId": "m-1",
            "userId": 42,
            "event": "Order Completed",
            "properties": {"revenue": 42.5, "currency": "EUR"},
            "timestamp": "2024-05-01T12:00:00.123456789Z",
            "sentAt": "2024-05-01T12:00:01+02:00",
            "integrations": {"All": True, "webhook": False},
            "context": {
                "ip": "203.0.113.9",
                "userAgent": "Mozilla/5.0",
                "app": {"name": "Shop", "build": 3021, "flavor": "pro"},
                "device": {"adTrackingEnabled": False, "advertisingId": "ad-1"},
                "screen": {"width": 390, "height": 844, "density": 3},
                "location": {"latitude": 48.85, "city": "Paris"},
                "campaign": {"name": "spring", "source": "newsletter"},
                "consent": {"categoryPreferences": {"ads": False, "analytics": True}},
                "traits": {"email": "ada@example.com"},
                "groupId": "acme",
                "referrer": {"type": "branch", "link": "https://example.com/x"},
                "experiment": {"arm": "B"},
            },
            "receivedAt": "2024-05-01T12:00:02Z",  # ingestion's to set: ignored
            "version": 2,
        }
    )

    assert (event.message_id, event.user_id, event.track.event) == ("m-1", "42", "Order Completed")
    assert event.track.properties["revenue"] == 42.5
    assert event.timestamp.ToJsonString() == "2024-05-01T12:00:00.123456789Z"
    assert event.sent_at.ToJsonString() == "2024-05-01T10:00:01Z"
    assert event.integrations["webhook"] is False
    context = event.context
    assert (context.ip, context.user_agent, context.group_id) == (
        "203.0.113.9",
        "Mozilla/5.0",
        "acme",
    )
    assert (context.app.name, context.app.build) == ("Shop", "3021")
    assert context.HasField("device") and context.device.HasField("ad_tracking_enabled")
    assert not context.device.ad_tracking_enabled and context.device.advertising_id == "ad-1"
    assert (context.screen.width, context.screen.density) == (390, 3.0)
    assert context.location.latitude == 48.85 and not context.location.HasField("speed")
    assert dict(context.consent.category_preferences) == {"ads": False, "analytics": True}
    assert context.traits["email"] == "ada@example.com"
    assert context.referrer.link == "https://example.com/x"
    assert context.extra["experiment"]["arm"] == "B"
    assert context.extra["app"]["flavor"] == "pro"  # unknown keys of known objects too
    assert not event.received_at.seconds


@pytest.mark.parametrize(
    ("data", "body", "expected"),
    [
        (
            {"type": "identify", "user_id": "u1", "traits": {"plan": "pro"}},
            "identify",
            {"traits": {"plan": "pro"}},
        ),
        (
            {"type": "page", "anonymous_id": "a1", "name": "Pricing", "category": "Docs"},
            "page",
            {"name": "Pricing", "category": "Docs"},
        ),
        ({"type": "screen", "userId": "u1", "name": "Checkout"}, "screen", {"name": "Checkout"}),
        (
            {"type": "group", "userId": "u1", "group_id": "acme", "traits": {"size": 120}},
            "group",
            {"groupId": "acme", "traits": {"size": 120.0}},
        ),
        ({"type": "alias", "userId": "u1", "previous_id": "a1"}, "alias", {"previousId": "a1"}),
    ],
)
def test_every_event_type_converts_from_camel_or_snake_case_keys(
    data: dict[str, Any], body: str, expected: dict[str, Any]
) -> None:
    event = event_from_json(data)

    assert event.WhichOneof("body") == body
    assert json_format.MessageToDict(getattr(event, body)) == expected


def test_a_historical_import_leaves_sent_at_out_so_the_time_is_not_moved_to_today() -> None:
    data = {"type": "track", "userId": "u", "event": "E", "sentAt": "2020-01-01T00:00:01Z"}

    assert event_from_json(data).HasField("sent_at")
    assert not event_from_json(data, correct_clock_skew=False).HasField("sent_at")


def test_what_cannot_be_converted_is_named_by_its_field_path() -> None:
    with pytest.raises(InvalidArgument) as raised:
        event_from_json(
            {
                "type": "tracks",
                "userId": "u1",
                "user_id": "u2",
                "timestamp": "yesterday",
                "properties": ["not", "an", "object"],
                "context": {"screen": {"width": "wide"}, "active": "yes"},
            },
            where="items[3]",
        )

    fields = {violation.field: violation.description for violation in raised.value.violations}
    assert set(fields) == {
        "items[3].type",
        "items[3].user_id",
        "items[3].timestamp",
        "items[3].context.screen.width",
        "items[3].context.active",
    }
    assert "'tracks' is not one of track" in fields["items[3].type"]
    assert "not an ISO 8601 time" in fields["items[3].timestamp"]


# -- record rows -------------------------------------------------------------------------------


def test_a_record_mapping_turns_a_row_into_a_customer_record() -> None:
    mapping = RecordMapping(
        record_id="id",
        source="crm",
        identifiers={"email": "email", "customer_id": "crm_id", "phones": "phone"},
        updated_at="changed",
    )

    record = record_from_item(
        mapping.to_item(
            {
                "id": 17.0,
                "email": "Ada@Example.com",
                "customer_id": 901,
                "phones": ["+31612345678", ""],
                "name": "Ada",
                "notes": "",
                "changed": "2024-05-01 10:00:00",
            }
        )
    )

    assert (record.source, record.record_id) == ("crm", "17")
    assert [(i.type, i.value) for i in record.identifiers] == [
        ("email", "Ada@Example.com"),
        ("crm_id", "901"),
        ("phone", "+31612345678"),
    ]
    # None keeps every other column, identifiers included; empty cells are left out.
    assert set(record.attributes.keys()) == {"email", "customer_id", "phones", "name"}
    assert record.updated_at.ToJsonString() == "2024-05-01T10:00:00Z"


def test_rows_a_mapping_cannot_use_become_problems_with_their_location() -> None:
    mapping = RecordMapping(record_id="id", updated_at="changed", attributes=["name"])

    items, problems = mapping.convert(
        [
            ("line 2", {"id": "1", "name": "Ada"}),
            ("line 3", {"id": " ", "name": "Bob"}),
            ("line 4", {"id": "3", "changed": "soon"}),
        ]
    )

    assert [item["record_id"] for item in items] == ["1"]
    assert problems == [
        ("line 3", "record_id: column 'id' is missing or empty"),
        ("line 4", "updated_at: column 'changed': 'soon' is not an ISO 8601 time"),
    ]


# -- file connectors ---------------------------------------------------------------------------


def _events_csv(path: Path, events: list[dict[str, Any]]) -> Path:
    return write_csv(
        path,
        ["type", "messageId", "userId", "event", "timestamp", "properties", "context.ip"],
        [
            [
                e["type"],
                e["messageId"],
                e["userId"],
                e["event"],
                e["timestamp"],
                json.dumps(e["properties"]),
                e["context"]["ip"],
            ]
            for e in events
        ],
    )


def _records_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    table = pa.Table.from_pylist(
        [
            {**row, "id": int(row["id"]), "updated_at": datetime.fromisoformat(row["updated_at"])}
            for row in rows
        ]
    )
    pq.write_table(table, path, row_group_size=4)  # several row groups: resuming skips some
    return path


@pytest.mark.parametrize("kind", ["events", "records"])
@pytest.mark.parametrize("connector", [CsvSource, JsonlSource, ParquetSource])
def test_the_file_connectors_pass_the_conformance_kit(
    tmp_path: Path, connector: type[SourceConnector], kind: str
) -> None:
    events, rows = segment_events(11), customer_rows(11)
    path = tmp_path / f"data.{connector.name}"
    if connector is CsvSource:
        if kind == "events":
            _events_csv(path, events)
        else:
            write_csv(path, list(rows[0]), [list(row.values()) for row in rows])
    elif connector is JsonlSource:
        write_jsonl(path, events if kind == "events" else rows)
    elif kind == "events":
        pq.write_table(pa.Table.from_pylist(events), path, row_group_size=4)
    else:
        _records_parquet(path, rows)
    config: dict[str, Any] = {"path": str(path), "kind": kind, "batch_size": 3}
    if kind == "records":
        config["mapping"] = MAPPING

    items = check_source_connector(
        connector,
        config,
        bad_config={**config, "kind": "records", "mapping": None, "batch_size": 0},
        expect_items=11,
    )

    if kind == "events":
        converted = [event_from_json(item) for item in items]
        assert [e.message_id for e in converted] == [e["messageId"] for e in events]
        assert converted[4].track.properties["revenue"] == 14.5
    else:
        records = [record_from_item(item) for item in items]
        assert [r.record_id for r in records] == [str(i) for i in range(11)]
        assert records[2].updated_at.ToDatetime(UTC) == START + timedelta(hours=2)


def test_a_bad_config_names_the_fields_to_fix(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as raised:
        CsvSource({"path": str(tmp_path), "kind": "records", "batch_size": 0, "delimter": ";"})

    assert {v.field for v in raised.value.violations} == {
        "config.mapping",
        "config.batch_size",
        "config.delimter",
    }


def _read(connector: SourceConnector, checkpoint: Checkpoint | None = None) -> list[SourceBatch]:
    with connector:
        connector.check()
        return list(connector.read(checkpoint))


def test_bad_lines_of_a_jsonl_file_are_problems_and_the_read_moves_past_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.jsonl"
    good = segment_events(3)
    lines = [
        json.dumps(good[0]),
        "{not json",
        "",
        "[1, 2]",
        json.dumps(good[1]),
        json.dumps(good[2]),
    ]
    path.write_text("\n".join(lines) + "\n")

    batches = _read(JsonlSource({"path": str(path), "batch_size": 3}))

    assert [len(b.items) for b in batches] == [1, 2]
    assert list(batches[0].problems) == [
        ("line 2", "not JSON: Expecting property name enclosed in double quotes at column 2"),
        ("line 4", "expected a JSON object, got list"),
    ]
    assert batches[-1].checkpoint == {"offset": path.stat().st_size, "line": 6}


def test_bad_rows_of_a_csv_file_are_problems_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "crm.csv"
    path.write_text(
        "id,email,name\n1,a@example.com,Ada\n2,b@example.com\n,c@example.com,Cy\n4,d@x,D\n"
    )

    batches = _read(
        CsvSource({"path": str(path), "kind": "records", "mapping": {"record_id": "id"}})
    )

    [batch] = batches
    assert [item["record_id"] for item in batch.items] == ["1", "4"]
    assert list(batch.problems) == [
        ("line 3", "2 cells; the header has 3"),
        ("line 4", "record_id: column 'id' is missing or empty"),
    ]
    assert batch.checkpoint == {"row": 4}


def test_a_file_that_changed_under_its_checkpoint_fails_instead_of_rereading(
    tmp_path: Path,
) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", segment_events(2))

    with pytest.raises(FailedPrecondition, match="not at the start of a line"):
        _read(JsonlSource({"path": str(path)}), {"offset": 5, "line": 1})
    with pytest.raises(FailedPrecondition, match="truncated"):
        _read(CsvSource({"path": str(_events_csv(path, segment_events(2)))}), {"row": 9})
    with pytest.raises(InvalidArgument, match=r"checkpoint\.row"):
        _read(CsvSource({"path": str(path)}), {"row": True})


# -- source runs into a real Intake ------------------------------------------------------------

_GATES: dict[str, threading.Event] = {}
"""Events a ``scripted`` connector waits on before its third batch, by name."""


class ScriptedConfig(InlineSourceConfig):
    """The inline source, plus ways to misbehave."""

    fail_after_batches: int | None = None
    gate: str | None = None


class ScriptedSource(InlineSource):
    """The inline source that fails after some batches, or waits before its third."""

    name = "scripted"
    description = "Inline items, with failures on demand (tests)."
    config_model = ScriptedConfig
    config: ScriptedConfig

    def read(self, checkpoint: Checkpoint | None) -> Iterator[SourceBatch]:
        for number, batch in enumerate(super().read(checkpoint)):
            if number == self.config.fail_after_batches:
                raise Unavailable("the source went away")
            if number == 2 and self.config.gate is not None:
                _GATES[self.config.gate].wait(10)
            yield batch


@hookimpl
def _register_test_sources(register: Callable[[type[SourceConnector]], None]) -> None:
    register(ScriptedSource)


@pytest.fixture
def plugins() -> PluginSet:
    """The installed plugins (csv, jsonl, parquet, postgres ...) plus ``scripted``."""
    plugins = create_plugin_manager()
    plugins.register(SimpleNamespace(register_sources=_register_test_sources), name="scripted")
    return plugins


@pytest.fixture
async def event_log(tmp_path: Path) -> AsyncIterator[EmbeddedLog]:
    log = await EmbeddedLog.open(
        tmp_path / "log",
        "events",
        partitions=4,
        payload_type=type_url(event_log_pb2.IngestedItem.DESCRIPTOR.full_name),
    )
    yield log
    await log.close()


@pytest.fixture
def intake(tmp_path: Path, event_log: EmbeddedLog) -> Intake:
    plans = TrackingPlans(tmp_path / "plans.json")
    return Intake(event_log, IngestionSettings(), plans, tmp_path / "dedup.snap")


@pytest.fixture
async def runs(
    stores: StoreHarness, plugins: PluginSet, intake: Intake
) -> AsyncIterator[SourceRuns]:
    """Source runs kept on each store backend in turn."""
    runs = SourceRuns(stores.open, plugins, intake)
    await runs.open()
    yield runs
    await runs.close()


async def logged_items(log: EmbeddedLog) -> list[event_log_pb2.IngestedItem]:
    """Everything in the event log, partition by partition."""
    items: list[event_log_pb2.IngestedItem] = []
    for partition in await log.offsets():
        async for batch in log.subscribe(partition.partition, partition.first, stop_at_end=True):
            items.extend(map(event_log_pb2.IngestedItem.FromString, batch.payload_list()))
    return items


async def logged_message_ids(log: EmbeddedLog) -> Counter[str]:
    return Counter(item.event.message_id for item in await logged_items(log))


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def counts(run: SourceRunInfo) -> tuple[RunState, int, int, int, int]:
    """A run's state and counters: read, accepted, duplicates, rejected."""
    return (
        run.state,
        run.items_read,
        run.items_accepted,
        run.items_duplicate,
        run.items_rejected,
    )


async def run_to_end(
    runs: SourceRuns, connector: str, source: str, config: dict[str, Any], **kw: Any
) -> SourceRunInfo:
    started = await runs.start(connector, source, config, **kw)
    assert started.state is RunState.PENDING
    return await runs.wait(started.run_id)


async def test_a_run_stores_every_item_read_in_the_event_log_exactly_once(
    tmp_path: Path, runs: SourceRuns, event_log: EmbeddedLog
) -> None:
    events = segment_events(25)
    path = write_jsonl(tmp_path / "events.jsonl", events)

    run = await run_to_end(runs, "jsonl", "web_archive", {"path": str(path), "batch_size": 4})

    assert counts(run) == (RunState.SUCCEEDED, 25, 25, 0, 0), run.error
    assert run.checkpoint == {"offset": path.stat().st_size, "line": 25}
    assert run.started_at is not None and run.finished_at is not None
    items = await logged_items(event_log)
    assert Counter(i.event.message_id for i in items) == Counter(e["messageId"] for e in events)
    assert {item.source for item in items} == {"web_archive"}
    # Replayed history keeps its own time, not the import's.
    first = next(i for i in items if i.event.message_id == "m-0")
    assert first.event.timestamp.ToDatetime(UTC) == START


async def test_a_run_that_fails_midway_resumes_from_its_checkpoint_with_nothing_lost_or_repeated(
    runs: SourceRuns, event_log: EmbeddedLog
) -> None:
    events = segment_events(20)
    config: dict[str, Any] = {"items": events, "batch_size": 3}

    failed = await run_to_end(runs, "scripted", "app", {**config, "fail_after_batches": 3})
    resumed = await run_to_end(runs, "scripted", "app", config)

    assert failed.state is RunState.FAILED and failed.error == "the source went away"
    assert (failed.items_read, failed.checkpoint) == (9, {"next_index": 9})
    # Exactly the rest: none of the first nine again (they would come back as duplicates).
    assert counts(resumed) == (RunState.SUCCEEDED, 11, 11, 0, 0)
    assert await logged_message_ids(event_log) == Counter(e["messageId"] for e in events)


async def test_a_cancelled_run_stops_at_a_checkpoint_and_the_next_run_reads_the_rest(
    runs: SourceRuns, event_log: EmbeddedLog
) -> None:
    events = segment_events(15)
    _GATES["cancel"] = gate = threading.Event()
    try:
        run = await runs.start(
            "scripted", "app", {"items": events, "batch_size": 3, "gate": "cancel"}
        )

        async def two_batches_stored() -> bool:
            return (await runs.get(run.run_id)).items_read == 6

        await eventually(two_batches_stored)
        await runs.cancel(run.run_id)
        cancelled = await runs.wait(run.run_id)
    finally:
        gate.set()

    assert cancelled.state is RunState.CANCELLED
    assert (cancelled.items_read, cancelled.checkpoint) == (6, {"next_index": 6})
    assert await runs.cancel(run.run_id) == cancelled  # a final run is left as it is
    rest = await run_to_end(runs, "scripted", "app", {"items": events, "batch_size": 3})
    assert counts(rest) == (RunState.SUCCEEDED, 9, 9, 0, 0)
    assert await logged_message_ids(event_log) == Counter(e["messageId"] for e in events)


async def test_runs_left_running_by_a_crash_are_failed_on_open_and_resume(
    stores: StoreHarness, plugins: PluginSet, intake: Intake, event_log: EmbeddedLog
) -> None:
    events = segment_events(12)
    first = SourceRuns(stores.open, plugins, intake)
    await first.open()
    _GATES["crash"] = gate = threading.Event()
    try:
        run = await first.start(
            "scripted", "app", {"items": events, "batch_size": 3, "gate": "crash"}
        )

        async def two_batches_stored() -> bool:
            return (await first.get(run.run_id)).items_read == 6

        await eventually(two_batches_stored)
        await first.close()
    finally:
        gate.set()
    # A killed process writes nothing more: its run is left RUNNING and its heartbeat stops.
    with stores.open(STORE_NAME).transaction() as tx:
        tx.execute(
            "UPDATE runs SET state = 'RUNNING', error = '', finished_at = NULL, heartbeat_at = NULL"
        )

    second = SourceRuns(stores.open, plugins, intake)
    await second.open()
    try:
        interrupted = await second.get(run.run_id)
        resumed = await run_to_end(second, "scripted", "app", {"items": events, "batch_size": 3})
    finally:
        await second.close()

    assert (interrupted.state, interrupted.error) == (RunState.FAILED, INTERRUPTED)
    assert counts(resumed) == (RunState.SUCCEEDED, 6, 6, 0, 0)
    assert await logged_message_ids(event_log) == Counter(e["messageId"] for e in events)


async def test_rows_that_cannot_be_stored_are_counted_and_reported_with_reasons(
    tmp_path: Path, runs: SourceRuns, event_log: EmbeddedLog
) -> None:
    good = segment_events(4)
    no_user = {**good[0], "messageId": "anonymous", "userId": None}
    bad_time = {**good[0], "messageId": "when", "timestamp": "half past"}
    lines = [good[0], "{oops", no_user, good[1], bad_time, good[2], good[3]]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(f"{x if isinstance(x, str) else json.dumps(x)}\n" for x in lines))

    run = await run_to_end(runs, "jsonl", "app", {"path": str(path), "batch_size": 4})

    assert counts(run) == (RunState.SUCCEEDED, 7, 4, 0, 3)
    reasons = {r.where: r.description for r in run.rejections}
    assert reasons["line 2"].startswith("not JSON")
    assert reasons["items[1].user_id"] == "user_id or anonymous_id is required"
    assert reasons["items[3].timestamp"] == "'half past' is not an ISO 8601 time"
    assert set(await logged_message_ids(event_log)) == {e["messageId"] for e in good}


async def test_records_are_stored_under_the_source_and_an_unchanged_reimport_is_all_duplicates(
    tmp_path: Path, runs: SourceRuns, event_log: EmbeddedLog
) -> None:
    rows = customer_rows(5)
    path = write_csv(tmp_path / "crm.csv", list(rows[0]), [list(r.values()) for r in rows])
    config = {"path": str(path), "kind": "records", "mapping": MAPPING, "batch_size": 2}

    first = await run_to_end(runs, "csv", "crm", config)
    again = await run_to_end(runs, "csv", "crm", config, full_refresh=True)

    assert counts(first) == (RunState.SUCCEEDED, 5, 5, 0, 0)
    assert again.full_refresh and counts(again) == (RunState.SUCCEEDED, 5, 0, 5, 0)
    records = [item.record for item in await logged_items(event_log)]
    assert sorted(r.record_id for r in records) == [str(i) for i in range(5)]
    assert {r.source for r in records} == {"crm"}
    person3 = next(r for r in records if r.record_id == "3")
    assert [(i.type, i.value) for i in person3.identifiers] == [
        ("email", "person3@example.com"),
        ("phone", "+31612340003"),
    ]


class FailingIntake(Intake):
    """An Intake whose ``send_events`` calls raise the given errors first (``None``: works)."""

    failures: list[BaseException | None]

    async def send_events(
        self, events: Sequence[bytes], source: str = "api", **options: Any
    ) -> EventsOutcome:
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure
        return await super().send_events(events, source, **options)


@pytest.fixture
async def failing_runs(
    tmp_path: Path, stores: StoreHarness, plugins: PluginSet, event_log: EmbeddedLog
) -> AsyncIterator[tuple[SourceRuns, FailingIntake]]:
    intake = FailingIntake(
        event_log, IngestionSettings(), TrackingPlans(tmp_path / "p.json"), tmp_path / "d"
    )
    runs = SourceRuns(stores.open, plugins, intake)
    await runs.open()
    yield runs, intake
    await runs.close()


async def test_a_full_log_makes_the_run_wait_and_retry_the_same_batch(
    failing_runs: tuple[SourceRuns, FailingIntake],
) -> None:
    runs, intake = failing_runs
    full = ResourceExhausted("the event log is full", retry_after_seconds=0.01)
    intake.failures = [None, full, full]

    run = await run_to_end(runs, "scripted", "app", {"items": segment_events(5), "batch_size": 2})

    assert counts(run) == (RunState.SUCCEEDED, 5, 5, 0, 0)
    assert intake.failures == []


async def test_a_batch_the_log_failed_to_store_is_read_again_by_the_next_run(
    failing_runs: tuple[SourceRuns, FailingIntake], event_log: EmbeddedLog
) -> None:
    runs, intake = failing_runs
    events = segment_events(5)
    intake.failures = [None, OSError("No space left on device")]

    failed = await run_to_end(runs, "scripted", "app", {"items": events, "batch_size": 2})
    resumed = await run_to_end(runs, "scripted", "app", {"items": events, "batch_size": 2})

    assert failed.state is RunState.FAILED
    assert failed.error == "OSError: No space left on device"
    # The checkpoint is the one after the last *stored* batch, never the failed one's.
    assert (failed.items_read, failed.checkpoint) == (2, {"next_index": 2})
    assert counts(resumed) == (RunState.SUCCEEDED, 3, 3, 0, 0)
    assert await logged_message_ids(event_log) == Counter(e["messageId"] for e in events)


async def test_start_rejects_what_cannot_run_before_recording_anything(runs: SourceRuns) -> None:
    with pytest.raises(NotFound, match="no source called 'nope'"):
        await runs.start("nope", "app", {})
    with pytest.raises(InvalidArgument) as raised:
        await runs.start("jsonl", "app", {"path": "/x", "batch_size": 0})
    assert [v.field for v in raised.value.violations] == ["config.batch_size"]
    with pytest.raises(InvalidArgument, match="source required"):
        await runs.start("jsonl", "", {"path": "/x"})
    assert await runs.list() == ([], "")

    _GATES["busy"] = gate = threading.Event()
    try:
        busy = await runs.start(
            "scripted", "app", {"items": segment_events(9), "batch_size": 1, "gate": "busy"}
        )
        with pytest.raises(FailedPrecondition, match="still active"):
            await runs.start("scripted", "app", {"items": []})
    finally:
        gate.set()
    assert (await runs.wait(busy.run_id)).state is RunState.SUCCEEDED


async def test_a_connector_that_cannot_reach_its_source_fails_the_run_not_the_service(
    runs: SourceRuns, tmp_path: Path
) -> None:
    run = await run_to_end(runs, "jsonl", "app", {"path": str(tmp_path / "missing.jsonl")})

    assert run.state is RunState.FAILED
    assert run.error == f"{tmp_path / 'missing.jsonl'} is not a file"
    assert (await run_to_end(runs, "scripted", "app", {"items": []})).state is RunState.SUCCEEDED


async def test_runs_are_listed_newest_first_page_by_page(runs: SourceRuns) -> None:
    ids = [
        (await run_to_end(runs, "scripted", source, {"items": []})).run_id
        for source in ("a", "b", "a", "a")
    ]

    page, token = await runs.list(source="a", page_size=2)
    rest, last = await runs.list(source="a", page_size=2, page_token=token)

    assert [r.run_id for r in page + rest] == [ids[3], ids[2], ids[0]]
    assert last == ""
    with pytest.raises(InvalidArgument, match="page_token"):
        await runs.list(page_token="x")


# -- the servicer ------------------------------------------------------------------------------


class _Servicer(SourceRunsServicer):
    def __init__(self, runs: SourceRuns, plugins: PluginSet) -> None:
        self.source_runs = runs
        self.plugins = plugins


async def test_the_servicer_lists_connectors_with_their_config_schema(
    runs: SourceRuns, plugins: PluginSet
) -> None:
    response = await _Servicer(runs, plugins).ListConnectors(
        ingestion_service_pb2.ListConnectorsRequest(), None
    )

    connectors = {c.name: c for c in response.connectors}
    assert {"csv", "jsonl", "parquet", "postgres", "inline"} <= set(connectors)
    assert [c.name for c in response.connectors] == sorted(connectors)
    assert connectors["csv"].version
    schema = connectors["postgres"].config_schema
    assert set(schema["required"]) == {"dsn", "cursor_column"}
    assert "cursor_column" in schema["properties"]


async def test_the_servicer_starts_follows_and_lists_runs(
    runs: SourceRuns, plugins: PluginSet
) -> None:
    servicer = _Servicer(runs, plugins)
    config = struct_pb2.Struct()
    config.update({"items": segment_events(3), "batch_size": 2})  # numbers travel as doubles

    started = await servicer.StartSourceRun(
        ingestion_service_pb2.StartSourceRunRequest(
            connector="scripted", source="app", config=config
        ),
        None,
    )
    await runs.wait(started.run.run_id)
    got = await servicer.GetSourceRun(
        ingestion_service_pb2.GetSourceRunRequest(run_id=started.run.run_id), None
    )
    listed = await servicer.ListSourceRuns(
        ingestion_service_pb2.ListSourceRunsRequest(connector="scripted"), None
    )
    cancelled = await servicer.CancelSourceRun(
        ingestion_service_pb2.CancelSourceRunRequest(run_id=started.run.run_id), None
    )

    assert started.run.state == job_pb2.JOB_STATE_PENDING
    assert got.run.state == job_pb2.JOB_STATE_SUCCEEDED
    assert (got.run.items_read, got.run.items_accepted) == (3, 3)
    assert dict(got.run.checkpoint) == {"next_index": 3.0}
    assert got.run.finished_at.ToDatetime(UTC) >= got.run.started_at.ToDatetime(UTC)
    assert [r.run_id for r in listed.runs] == [started.run.run_id]
    assert cancelled.run == got.run
    with pytest.raises(NotFound):
        await servicer.GetSourceRun(ingestion_service_pb2.GetSourceRunRequest(run_id="nope"), None)


# -- the import command ------------------------------------------------------------------------


def test_import_config_values_are_json_when_they_can_be_and_dotted_keys_nest(
    tmp_path: Path,
) -> None:
    config_file = tmp_path / "import.yaml"
    config_file.write_text("path: /data/a.csv\nmapping:\n  record_id: id\nbatch_size: 10\n")

    config = build_config(
        config_file,
        [
            "batch_size=500",
            "kind=records",
            "mapping.identifiers.email=email",
            'tags=[1, "a"]',
            "dsn=host=db port=5",
        ],
    )

    assert config == {
        "path": "/data/a.csv",
        "batch_size": 500,
        "kind": "records",
        "mapping": {"record_id": "id", "identifiers": {"email": "email"}},
        "tags": [1, "a"],
        "dsn": "host=db port=5",
    }
    for bad in (["novalue"], ["=x"], ["a..b=1"], ["kind=x", "kind.sub=1"]):
        with pytest.raises(UsageError):
            build_config(None, bad)


def test_the_import_summary_names_the_outcome_and_the_counters() -> None:
    run = source_run_pb2.SourceRun(
        run_id="r1",
        state=job_pb2.JOB_STATE_FAILED,
        items_read=10,
        items_accepted=7,
        items_duplicate=1,
        items_rejected=2,
        error="the source went away",
    )

    assert summary(run) == (
        "run r1 failed: read 10, accepted 7, duplicates 1, rejected 2\nerror: the source went away"
    )


# -- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


def _execute(
    dsn: str, *statements: str, rows: Sequence[Sequence[object]] = (), insert: str = ""
) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        for statement in statements:
            connection.execute(statement)
        if rows:
            connection.cursor().executemany(insert, rows)


def test_the_postgres_connector_passes_the_conformance_kit_for_events(
    postgres: PostgresServer,
) -> None:
    events = segment_events(10)
    _execute(
        postgres.dsn,
        "CREATE TABLE tracks (id int PRIMARY KEY, at timestamptz NOT NULL, body jsonb NOT NULL)",
        insert="INSERT INTO tracks VALUES (%s, %s, %s)",
        # Pairs of rows share a time: the key breaks the ties.
        rows=[(i, START + timedelta(hours=i // 2), json.dumps(e)) for i, e in enumerate(events)],
    )
    config = {
        "dsn": postgres.dsn,
        "table": "public.tracks",
        "cursor_column": "at",
        "key_column": "id",
        "json_column": "body",
        "batch_size": 3,
    }

    items = check_source_connector(
        PostgresSource, config, bad_config={**config, "query": "SELECT 1"}, expect_items=10
    )

    assert [item["messageId"] for item in items] == [e["messageId"] for e in events]


def test_the_postgres_connector_passes_the_conformance_kit_for_records_from_a_query(
    postgres: PostgresServer,
) -> None:
    rows = customer_rows(8)
    _execute(
        postgres.dsn,
        "CREATE TABLE people (id text PRIMARY KEY, email text, phone text, name text, "
        "updated_at timestamp NOT NULL)",
        insert="INSERT INTO people VALUES (%s, %s, %s, %s, %s)",
        rows=[
            [*list(r.values())[:4], datetime.fromisoformat(r["updated_at"]).replace(tzinfo=None)]
            for r in rows
        ],
    )
    config = {
        "dsn": postgres.dsn,
        "query": "SELECT * FROM people WHERE email LIKE '%@example.com'",
        "cursor_column": "updated_at",
        "key_column": "id",
        "kind": "records",
        "mapping": MAPPING,
        "batch_size": 3,
    }

    items = check_source_connector(PostgresSource, config, expect_items=8)

    assert record_from_item(items[7]).record_id == "7"


def test_postgres_check_says_what_is_wrong_with_the_source(postgres: PostgresServer) -> None:
    base = {"dsn": postgres.dsn, "cursor_column": "id", "json_column": "body"}

    with pytest.raises(FailedPrecondition, match="does not exist"):
        PostgresSource({**base, "table": "missing"}).check()
    with pytest.raises(FailedPrecondition, match="no column 'body'"):
        PostgresSource({**base, "query": "SELECT 1 AS id"}).check()
    unreachable = {**base, "table": "t", "dsn": "host=127.0.0.1 port=1 connect_timeout=1"}
    with pytest.raises(Unavailable, match="cannot connect"):
        PostgresSource(unreachable).check()


async def test_a_second_postgres_run_reads_only_the_rows_added_since_the_first(
    postgres: PostgresServer, runs: SourceRuns, event_log: EmbeddedLog
) -> None:
    insert = "INSERT INTO customers (email, phone, name, updated_at) VALUES (%s, %s, %s, %s)"

    def add(rows: list[dict[str, Any]]) -> None:
        _execute(
            postgres.dsn,
            insert=insert,
            rows=[[r["email"], r["phone"], r["name"], r["updated_at"]] for r in rows],
        )

    _execute(
        postgres.dsn,
        "DROP TABLE IF EXISTS customers",  # the test runs once per store backend
        "CREATE TABLE customers (id serial PRIMARY KEY, email text, phone text, name text, "
        "updated_at timestamptz NOT NULL)",
    )
    add(customer_rows(7))
    config = {
        "dsn": postgres.dsn,
        "table": "customers",
        "cursor_column": "updated_at",
        "key_column": "id",
        "kind": "records",
        "mapping": {**MAPPING, "source": "billing"},
        "batch_size": 3,
    }

    first = await run_to_end(runs, "postgres", "billing_db", config)
    add(customer_rows(4, first=7))
    second = await run_to_end(runs, "postgres", "billing_db", config)
    third = await run_to_end(runs, "postgres", "billing_db", config)

    assert counts(first) == (RunState.SUCCEEDED, 7, 7, 0, 0)
    assert counts(second) == (RunState.SUCCEEDED, 4, 4, 0, 0)
    assert (third.items_read, third.checkpoint) == (0, None)
    assert second.checkpoint is not None
    cursor, key = second.checkpoint["cursor"], second.checkpoint["key"]
    assert isinstance(cursor, dict) and cursor["type"] == "timestamptz"
    assert datetime.fromisoformat(cursor["value"]) == START + timedelta(hours=10)
    assert key == {"type": "int", "value": 11}
    records = [item.record for item in await logged_items(event_log)]
    assert sorted(int(r.record_id) for r in records) == list(range(1, 12))
    assert {r.source for r in records} == {"billing"}


class _IngestionStub(SourceRunsServicer, ingestion_service_pb2_grpc.IngestionServiceServicer):
    """Just the source-run RPCs of the ingestion service, over a real Intake."""

    def __init__(self, runs: SourceRuns, plugins: PluginSet) -> None:
        self.source_runs = runs
        self.plugins = plugins


@contextmanager
def serving_source_runs(tmp_path: Path, plugins: PluginSet) -> Iterator[Settings]:
    """The source-run RPCs served on a free port from a thread with its own event loop, as
    ``profilemesh import`` (which runs its own loop) meets them; yields settings pointing there."""
    settings = Settings(
        data_dir=tmp_path / "data",
        services=Endpoints(ingestion=Endpoint(port=free_port())),
        client=ClientSettings(max_attempts=2, initial_backoff_seconds=0.05),
    )
    ready = threading.Event()
    control: dict[str, Any] = {}

    async def serve() -> None:
        log = await EmbeddedLog.open(tmp_path / "served-log", "events", partitions=2)
        intake = Intake(
            log, IngestionSettings(), TrackingPlans(tmp_path / "p.json"), tmp_path / "d"
        )
        runs = SourceRuns(files_under(tmp_path), plugins, intake)
        await runs.open()
        binding = bind(
            ingestion_service_pb2,
            ingestion_service_pb2_grpc,
            "IngestionService",
            _IngestionStub(runs, plugins),
        )
        server, _ = create_server([binding], settings, port=settings.services.ingestion.port)
        await server.start()
        control.update(loop=asyncio.get_running_loop(), stop=asyncio.Event())
        ready.set()
        await control["stop"].wait()
        await server.stop(0)
        await runs.close()
        await log.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the test server did not start"
    try:
        yield settings
    finally:
        control["loop"].call_soon_threadsafe(control["stop"].set)
        thread.join(10)


def _import(settings: Settings, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_import_parser(parser.add_subparsers(dest="command"))
    return run_import(parser.parse_args(["import", *argv]), settings)


def test_profilemesh_import_runs_a_connector_and_exits_by_its_outcome(
    tmp_path: Path, plugins: PluginSet, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "events.jsonl", [*segment_events(5), {"type": "track"}])
    missing = tmp_path / "missing.jsonl"

    with serving_source_runs(tmp_path, plugins) as settings:
        succeeded = _import(
            settings,
            "web",
            "--connector",
            "jsonl",
            "--config",
            f"path={path}",
            "--config",
            "batch_size=2",
        )
        succeeded_out = capsys.readouterr().out
        failed = _import(settings, "other", "--connector", "jsonl", "--config", f"path={missing}")
        failed_out = capsys.readouterr().out
        invalid = _import(settings, "web", "--connector", "jsonl", "--config", "batch_size=0")
        invalid_err = capsys.readouterr().err
        unknown = _import(settings, "web", "--connector", "nope")
        unknown_err = capsys.readouterr().err
    unreachable = _import(settings, "web", "--connector", "jsonl", "--config", f"path={path}")
    unreachable_err = capsys.readouterr().err

    assert succeeded == 0
    assert "succeeded: read 6, accepted 5, duplicates 0, rejected 1" in succeeded_out
    assert failed == 1 and f"error: {missing} is not a file" in failed_out
    assert invalid == 2 and "config.batch_size" in invalid_err and "config.path" in invalid_err
    assert unknown == 2 and "no source called 'nope'" in unknown_err
    assert unreachable == 2 and "cannot reach the ingestion service" in unreachable_err
    for message in (invalid_err, unknown_err, unreachable_err):
        assert message.count("\n") == 1 and "Traceback" not in message
