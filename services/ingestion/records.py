"""Customer records (CRM rows): checks, their dedup key and their log payload."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from profilemesh.ingestion.v1 import event_log_pb2, record_pb2
from profilemesh.services.ingestion.event_checks import MAX_ID_LENGTH
from profilemesh.shared.errors import FieldViolation


@dataclass(slots=True)
class CheckedRecord:
    """A record that passed the checks: its dedup key, partition key and payload."""

    index: int
    record: record_pb2.CustomerRecord
    dedup_id: str
    key: str
    payload: bytes


@dataclass(slots=True)
class RejectedRecord:
    """A record that failed a check, and why."""

    index: int
    record: record_pb2.CustomerRecord
    violations: list[FieldViolation]


def record_problems(
    record: record_pb2.CustomerRecord, where: str, max_bytes: int
) -> list[FieldViolation]:
    """What makes a record unusable for identity resolution."""
    problems = []
    if not record.source:
        problems.append(FieldViolation(f"{where}.source", "the source system is required"))
    if not record.record_id:
        problems.append(FieldViolation(f"{where}.record_id", "the record's id is required"))
    for name in ("source", "record_id"):
        if len(getattr(record, name)) > MAX_ID_LENGTH:
            problems.append(
                FieldViolation(f"{where}.{name}", f"longer than {MAX_ID_LENGTH} characters")
            )
    for i, identifier in enumerate(record.identifiers):
        if not identifier.type:
            problems.append(FieldViolation(f"{where}.identifiers[{i}].type", "required"))
        if not identifier.value:
            problems.append(FieldViolation(f"{where}.identifiers[{i}].value", "required"))
    if not record.identifiers and not record.attributes.fields:
        problems.append(FieldViolation(where, "a record needs identifiers or attributes"))
    size = record.ByteSize()
    if size > max_bytes:
        problems.append(FieldViolation(where, f"{size} bytes; the limit is {max_bytes}"))
    return problems


def record_dedup_id(record: record_pb2.CustomerRecord) -> str:
    """The id a record is deduplicated by: its source, id and a hash of its content, so that
    re-importing an unchanged row is a duplicate and a changed row is new evidence."""
    content = record.SerializeToString(deterministic=True)
    return f"record:{record.source}:{record.record_id}:{xxhash.xxh3_64_hexdigest(content)}"


def check_records(
    records: Sequence[record_pb2.CustomerRecord],
    received_at_ns: int,
    max_bytes: int,
    path: str = "records",
) -> tuple[list[CheckedRecord], list[RejectedRecord]]:
    """Split ``records`` into accepted (with payloads) and rejected ones."""
    accepted, rejected = [], []
    for index, record in enumerate(records):
        where = f"{path}[{index}]"
        problems = record_problems(record, where, max_bytes)
        if problems:
            rejected.append(RejectedRecord(index, record, problems))
            continue
        dedup_id = record_dedup_id(record)
        item = event_log_pb2.IngestedItem(record=record, source=record.source)
        item.received_at.FromNanoseconds(received_at_ns)
        key = f"{record.source}:{record.record_id}"
        accepted.append(CheckedRecord(index, record, dedup_id, key, item.SerializeToString()))
    return accepted, rejected
