"""``profilemesh.common.v1.AuditService``: a service's audit log, read over gRPC.

Every service hosts it for its own log. A listing first waits for the entries still queued, so
a call shows up in a listing made right after it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from google.protobuf import timestamp_pb2

from profilemesh.common.v1 import audit_service_pb2, audit_service_pb2_grpc
from profilemesh.shared.auth.audit_log import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    AuditEntry,
    AuditLog,
    AuditQuery,
)
from profilemesh.shared.errors import InvalidArgument
from profilemesh.shared.server import ServiceBinding

SERVICE = audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name


class AuditServicer(audit_service_pb2_grpc.AuditServiceServicer):
    """Serves one service's :class:`AuditLog`."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    async def ListAuditEntries(
        self, request: audit_service_pb2.ListAuditEntriesRequest, context: Any
    ) -> audit_service_pb2.ListAuditEntriesResponse:
        query = query_of(request)
        await asyncio.to_thread(self.audit.flush)
        # One more than a page, to know whether another page follows.
        probe = dataclasses.replace(query, page_size=query.page_size + 1)
        entries = await asyncio.to_thread(self.audit.query, probe)
        page = entries[: query.page_size]
        more = len(entries) > query.page_size
        return audit_service_pb2.ListAuditEntriesResponse(
            entries=[entry_to_proto(entry) for entry in page],
            next_page_token=str(page[-1].sequence) if more else "",
        )

    async def VerifyAuditChain(
        self, request: audit_service_pb2.VerifyAuditChainRequest, context: Any
    ) -> audit_service_pb2.VerifyAuditChainResponse:
        await asyncio.to_thread(self.audit.flush)
        check = await asyncio.to_thread(self.audit.verify_chain)
        return audit_service_pb2.VerifyAuditChainResponse(
            chain_valid=check.valid,
            entries_checked=check.entries_checked,
            first_invalid_sequence=check.first_invalid_sequence,
        )


def audit_service_binding(servicer: AuditServicer, interceptors: tuple[Any, ...]) -> ServiceBinding:
    """The binding of ``servicer``, bringing the interceptors of the server hosting it."""
    return ServiceBinding(
        name=SERVICE,
        add_to_server=audit_service_pb2_grpc.add_AuditServiceServicer_to_server,
        servicer=servicer,
        interceptors=interceptors,
    )


def query_of(request: audit_service_pb2.ListAuditEntriesRequest) -> AuditQuery:
    """The query a request asks for; :class:`InvalidArgument` for a bad page size or token."""
    if request.page_size > MAX_PAGE_SIZE:
        raise InvalidArgument.for_field("page_size", f"at most {MAX_PAGE_SIZE}")
    before = None
    if request.page_token:
        if not request.page_token.isdigit():
            raise InvalidArgument.for_field("page_token", "not a token this service returned")
        before = int(request.page_token)
    return AuditQuery(
        since_us=_micros(request.since) if request.HasField("since") else None,
        until_us=_micros(request.until) if request.HasField("until") else None,
        token_id=request.token_id,
        method_prefix=request.method_prefix,
        page_size=request.page_size or DEFAULT_PAGE_SIZE,
        before_sequence=before,
    )


def entry_to_proto(entry: AuditEntry) -> audit_service_pb2.AuditEntry:
    """``entry`` as its protobuf message."""
    record = entry.record
    message = audit_service_pb2.AuditEntry(
        sequence=entry.sequence,
        service=record.service,
        method=record.method,
        token_id=record.token_id,
        token_name=record.token_name,
        peer=record.peer,
        status_code=record.status_code,
        hash=entry.hash,
    )
    message.time.FromMicroseconds(record.time_us)
    message.duration.FromMicroseconds(record.duration_us)
    return message


def _micros(timestamp: timestamp_pb2.Timestamp) -> int:
    return int(timestamp.ToMicroseconds())
