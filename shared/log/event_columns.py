"""The event log's payload (``IngestedItem``) as flat columns, for its Parquet archive.

Features, backfills and people with DuckDB query the archive by these columns instead of
decoding protobuf: ``kind`` (event or record), ``type`` (track, identify...), ``event`` (the
track event or page/screen name), the ids, times, and properties/traits/context as JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
from google.protobuf import json_format

from profilemesh.ingestion.v1 import event_log_pb2

TIMESTAMP = pa.timestamp("ns", tz="UTC")

FIELDS = [
    pa.field("kind", pa.string()),
    pa.field("type", pa.string()),
    pa.field("event", pa.string()),
    pa.field("message_id", pa.string()),
    pa.field("user_id", pa.string()),
    pa.field("anonymous_id", pa.string()),
    pa.field("timestamp", TIMESTAMP),
    pa.field("received_at", TIMESTAMP),
    pa.field("source", pa.string()),
    pa.field("record_id", pa.string()),
    pa.field("properties", pa.string()),
    pa.field("context", pa.string()),
]


def _json(message: Any) -> str | None:
    if not message.ListFields():
        return None
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":"))


def _time(message: Any) -> int | None:
    return message.ToNanoseconds() if message.seconds or message.nanos else None


def decode_events(payloads: Sequence[bytes]) -> dict[str, list[Any]]:
    """The columns of :data:`FIELDS` for each ``IngestedItem`` payload."""
    columns: dict[str, list[Any]] = {field.name: [] for field in FIELDS}
    for payload in payloads:
        item = event_log_pb2.IngestedItem.FromString(payload)
        row: dict[str, Any] = dict.fromkeys(columns)
        row["received_at"] = _time(item.received_at)
        row["source"] = item.source or None
        if item.HasField("event"):
            event = item.event
            body = event.WhichOneof("body")
            row.update(
                kind="event",
                type=body,
                message_id=event.message_id,
                user_id=event.user_id or None,
                anonymous_id=event.anonymous_id or None,
                timestamp=_time(event.timestamp),
                context=_json(event.context),
            )
            if body is not None:
                detail = getattr(event, body)
                row["event"] = getattr(detail, "event", None) or getattr(detail, "name", None)
                for name in ("properties", "traits"):
                    if hasattr(detail, name):
                        row["properties"] = _json(getattr(detail, name))
        elif item.HasField("record"):
            record = item.record
            row.update(
                kind="record",
                source=record.source or row["source"],
                record_id=record.record_id,
                timestamp=_time(record.updated_at),
                properties=_json(record.attributes),
            )
        for name, value in row.items():
            columns[name].append(value)
    return columns
