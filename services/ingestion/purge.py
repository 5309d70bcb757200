"""Purging a person from everything ingestion keeps, given their identifiers.

Identity erases a person, then asks ingestion to purge their identifiers. Every item of the
event log that mentions one of them (compared by fingerprint, as suppression does) is redacted
where it lies, in segments and in the Parquet archive, its offset kept (see
:meth:`profilemesh.shared.log.api.Log.redact`); and what source runs stored about the items
they read (rejection reasons, errors, checkpoints) is erased where it mentions them.

The rest of ingestion's data directory holds no identifiers: the dedup snapshot holds 64-bit
hashes of message ids, the suppression list SHA-256 digests, the tracking plans describe
events rather than people, and a source run's configuration says where to read, not what.

A purge is idempotent: a record redacted once is not redacted again, so a retry after a crash
erases whatever is left and answers in the same form.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence, Set
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from profilemesh.ingestion.v1 import event_log_pb2
from profilemesh.services.ingestion.source_runs import SourceRuns
from profilemesh.services.ingestion.suppressions import fingerprints_of
from profilemesh.shared.errors import InvalidArgument
from profilemesh.shared.identifier_mentions import item_mentions, text_mentions
from profilemesh.shared.log.api import Log, RecordBatch, Selector

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PurgeOutcome:
    """What one purge erased."""

    purged: int
    """Records of the event log redacted by this purge."""
    scrubbed_source_runs: int
    """Source runs whose stored texts or checkpoint mentioned the person."""


def items_mentioning(hashes: Set[str]) -> Selector:
    """A selector of the event log's records whose ``IngestedItem`` mentions one of the
    hashed fingerprints ``hashes``."""

    def select(partition: int, batch: RecordBatch) -> list[bool]:
        return [_mentions(payload, hashes) for payload in batch.payload_list()]

    return select


def _mentions(payload: bytes, hashes: Set[str]) -> bool:
    if not payload:
        return False
    try:
        item = event_log_pb2.IngestedItem.FromString(payload)
    except DecodeError:
        log.warning("an undecodable payload in the event log was left as it is")
        return False
    return item_mentions(item, hashes, hashed=True, within_text=True)


async def purge(
    event_log: Log, source_runs: SourceRuns, job_id: str, values: Sequence[str]
) -> PurgeOutcome:
    """Erase what ingestion keeps that mentions identifier ``values``; ``InvalidArgument``
    for a missing ``job_id`` or bad identifiers, before anything is changed."""
    if not job_id:
        raise InvalidArgument.for_field("job_id", "required")
    hashes = frozenset().union(*fingerprints_of(values))
    purged = await event_log.redact(items_mentioning(hashes))
    scrubbed = await source_runs.scrub(lambda text: text_mentions(text, hashes, hashed=True))
    log.info(
        "identifiers purged",
        extra={"job_id": job_id, "purged": purged, "scrubbed_source_runs": scrubbed},
    )
    return PurgeOutcome(purged, scrubbed)
