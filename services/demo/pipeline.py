"""Waiting for the mesh to finish what it was given, and asking it what it made.

The demo feeds the mesh through its public API, so it knows the pipeline is done only by
watching: every log's end offsets stop moving (ingestion's events, identity's resolutions,
features' changes, scoring's scores, activation's memberships and deliveries).
"""

from __future__ import annotations

import asyncio
import time

from profilemesh.shared.log.client import RemoteLog
from profilemesh.shared.log.hosting import STREAMS
from profilemesh.shared.settings import SERVICE_NAMES, Settings


async def log_ends(settings: Settings) -> dict[str, int]:
    """Each service's log: the sum of its partitions' end offsets."""
    ends = {}
    for service in SERVICE_NAMES:
        stream, _ = STREAMS[service]
        remote = RemoteLog(settings.services.of(service).target, stream, settings)
        try:
            ends[service] = sum(p.next for p in await remote.offsets())
        finally:
            await remote.close()
    return ends


async def wait_until_quiet(
    settings: Settings, *, quiet_seconds: float = 3.0, timeout: float = 600.0
) -> float:
    """Return once no log has grown for ``quiet_seconds``; the seconds waited."""
    started = time.monotonic()
    last = await log_ends(settings)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_seconds:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the mesh was still busy after {timeout:.0f}s: {last}")
        await asyncio.sleep(0.5)
        now = await log_ends(settings)
        if now != last:
            last, quiet_since = now, time.monotonic()
    return time.monotonic() - started
