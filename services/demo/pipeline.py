"""Waiting for the mesh to finish what it was given.

The demo feeds the mesh through its public API, so it knows the pipeline is done only by
watching: every log's end offsets stop moving (ingestion's events, identity's resolutions,
features' changes, scoring's scores, activation's memberships and deliveries) *and* the
services' processes stop using CPU. Logs alone are not enough: a consumer applying a large
batch publishes nothing until the batch commits, which can take seconds.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path

from profilemesh.shared.log.hosting import remote_log
from profilemesh.shared.settings import SERVICE_NAMES, Settings


async def log_ends(settings: Settings) -> dict[str, int]:
    """Each service's log: the sum of its partitions' end offsets."""
    ends = {}
    for service in SERVICE_NAMES:
        remote = remote_log(settings, service)  # from the service, or from NATS
        try:
            ends[service] = sum(p.next for p in await remote.offsets())
        finally:
            await remote.close()
    return ends


def cpu_seconds(pids: Sequence[int]) -> float:
    """User and system CPU time the processes used so far (Linux ``/proc``; 0 elsewhere)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


BUSY_SHARE = 0.15
"""Above this share of one core over a check interval, the mesh is still working."""


async def wait_until_quiet(
    settings: Settings,
    pids: Sequence[int] = (),
    *,
    quiet_seconds: float = 3.0,
    timeout: float = 900.0,
) -> float:
    """Return once no log has grown and the processes ``pids`` have been nearly idle for
    ``quiet_seconds``; the seconds waited."""
    started = time.monotonic()
    last = await log_ends(settings)
    cpu = cpu_seconds(pids)
    quiet_since = checked = time.monotonic()
    while time.monotonic() - quiet_since < quiet_seconds:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the mesh was still busy after {timeout:.0f}s: {last}")
        await asyncio.sleep(0.5)
        now, used = await log_ends(settings), cpu_seconds(pids)
        elapsed = time.monotonic() - checked
        busy = used - cpu > BUSY_SHARE * elapsed
        if now != last or busy:
            quiet_since = time.monotonic()
        last, cpu, checked = now, used, time.monotonic()
    return time.monotonic() - started
