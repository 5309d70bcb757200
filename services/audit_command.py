"""``profilemesh audit``: who called what, from the services' audit logs.

::

    profilemesh audit
    profilemesh audit --service identity --since 2h
    profilemesh audit --token-id 3f9a0c1d2b4e5f60 --since 2025-06-01T00:00
    profilemesh audit --method /profilemesh.identity.v1.IdentityService/ --limit 500
    profilemesh audit --verify

Asks each service's AuditService (every service keeps its own log), newest first, merged
across services; ``--verify`` checks each log's hash chain instead. Times are UTC. Needs a
token with the ``audit:read`` scope. Exit status: 0 on success, 1 when a service refused or
could not be reached, or a chain is broken, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from profilemesh.common.v1 import audit_service_pb2, audit_service_pb2_grpc
from profilemesh.shared.channel import channel_to
from profilemesh.shared.settings import SERVICE_NAMES, Settings

PROGRAM = "profilemesh audit"
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_PAGE = 1000


def add_audit_parser(commands: Any) -> None:
    audit = commands.add_parser("audit", help="list who called what, from the audit logs")
    audit.add_argument("--service", choices=SERVICE_NAMES, help="one service (default: all)")
    audit.add_argument("--token-id", default="", help="only calls made with this token")
    audit.add_argument("--method", default="", help="only methods starting with this")
    audit.add_argument("--since", help="e.g. 30m, 2h, 7d or 2025-06-01T12:00 (UTC)")
    audit.add_argument("--until", help="same forms as --since")
    audit.add_argument("--limit", type=int, default=100, help="entries to show (default 100)")
    audit.add_argument("--verify", action="store_true", help="check the hash chains instead")


def run_audit(args: argparse.Namespace, settings: Settings) -> int:
    services = [args.service] if args.service else list(SERVICE_NAMES)
    try:
        request = build_request(args, datetime.now(UTC))
    except ValueError as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 2
    if args.verify:
        return asyncio.run(_verify(services, settings))
    return asyncio.run(_list(services, request, args.limit, settings))


def parse_when(text: str, now: datetime) -> datetime:
    """``30m``, ``2h``, ``7d`` (before ``now``) or an ISO 8601 time (UTC unless it says)."""
    relative = _RELATIVE.match(text.strip())
    if relative:
        amount, unit = relative.groups()
        return now - timedelta(**{_UNITS[unit]: float(amount)})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"cannot read the time {text!r}: use 30m, 2h, 7d or ISO 8601") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def build_request(
    args: argparse.Namespace, now: datetime
) -> audit_service_pb2.ListAuditEntriesRequest:
    """The ListAuditEntries request the options ask for (without paging)."""
    if args.limit < 1:
        raise ValueError("--limit must be at least 1")
    request = audit_service_pb2.ListAuditEntriesRequest(
        token_id=args.token_id, method_prefix=args.method
    )
    if args.since:
        request.since.FromDatetime(parse_when(args.since, now))
    if args.until:
        request.until.FromDatetime(parse_when(args.until, now))
    return request


async def _list(
    services: Sequence[str],
    request: audit_service_pb2.ListAuditEntriesRequest,
    limit: int,
    settings: Settings,
) -> int:
    results = await asyncio.gather(
        *(_entries(service, request, limit, settings) for service in services)
    )
    entries = [entry for found in results if found is not None for entry in found]
    entries.sort(key=lambda e: (e.time.ToNanoseconds(), e.sequence), reverse=True)
    for entry in entries[:limit]:
        print(render(entry))
    if not entries:
        print("no audit entries", file=sys.stderr)
    return 0 if all(found is not None for found in results) else 1


async def _entries(
    service: str,
    request: audit_service_pb2.ListAuditEntriesRequest,
    limit: int,
    settings: Settings,
) -> list[audit_service_pb2.AuditEntry] | None:
    """Up to ``limit`` newest entries of one service; None when it could not be asked."""
    found: list[audit_service_pb2.AuditEntry] = []
    page = audit_service_pb2.ListAuditEntriesRequest()
    page.CopyFrom(request)
    try:
        async with channel_to(service, settings) as channel:
            stub = audit_service_pb2_grpc.AuditServiceStub(channel)
            while len(found) < limit:
                page.page_size = min(_PAGE, limit - len(found))
                response = await stub.ListAuditEntries(page)
                found.extend(response.entries)
                if not response.next_page_token:
                    break
                page.page_token = response.next_page_token
    except grpc.aio.AioRpcError as error:
        print(f"{PROGRAM}: {service}: {error.code().name}: {error.details()}", file=sys.stderr)
        return None
    return found


async def _verify(services: Sequence[str], settings: Settings) -> int:
    intact = True
    for service in services:
        try:
            async with channel_to(service, settings) as channel:
                stub = audit_service_pb2_grpc.AuditServiceStub(channel)
                check = await stub.VerifyAuditChain(audit_service_pb2.VerifyAuditChainRequest())
        except grpc.aio.AioRpcError as error:
            print(f"{service:<11} {error.code().name}: {error.details()}")
            intact = False
            continue
        if check.chain_valid:
            print(f"{service:<11} chain intact ({check.entries_checked} entries)")
        else:
            print(f"{service:<11} chain BROKEN at entry {check.first_invalid_sequence}")
            intact = False
    return 0 if intact else 1


def render(entry: audit_service_pb2.AuditEntry) -> str:
    """One line per entry: time, service, method, status, duration, caller, peer."""
    when = entry.time.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    milliseconds = entry.duration.ToMicroseconds() / 1000
    caller = entry.token_name + (f" ({entry.token_id})" if entry.token_id else "")
    return (
        f"{when}  {entry.service:<10} {entry.method}  {entry.status_code}  "
        f"{milliseconds:.1f}ms  {caller}  {entry.peer}"
    )
