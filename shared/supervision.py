"""Background work of a service: the log consumers, the outbox publisher, delivery workers.

Each runs as an asyncio task under :func:`fail_stop`: a task that fails leaves in-memory state
that may no longer match what was committed, so the service stops (SIGTERM to itself) and its
next start reloads from the store. :func:`stop_background` is the matching shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from profilemesh.shared.log.outbox import Outbox

log = logging.getLogger(__name__)


async def fail_stop(service: str, name: str, run: Callable[[], Awaitable[Any]]) -> None:
    """Run ``run()``; if it fails, log why and stop the service so it restarts clean."""
    try:
        await run()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s %s failed; stopping the service", service, name)
        os.kill(os.getpid(), signal.SIGTERM)


async def stop_background(
    consumers: Iterable[Any], tasks: Iterable[asyncio.Task[Any]], outbox: Outbox | None
) -> None:
    """Stop following the logs, cancel the tasks, then publish what the outbox still holds
    (what stays queued is published at the next start)."""
    for consumer in consumers:
        consumer.stop()
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if outbox is not None:
        try:
            await outbox.flush()
        except Exception:
            log.exception("publishing the outbox at shutdown failed")


async def repeat_when_notified(
    work: Callable[[], Awaitable[bool]],
    wake: asyncio.Event,
    *,
    retry_seconds: float,
    idle_seconds: float,
) -> None:
    """Run ``work`` now, then again whenever ``wake`` is set, until cancelled: sooner
    (``retry_seconds``) after a pass that left something to retry (``work`` returned False),
    else at the latest after ``idle_seconds``, in case a notice was missed."""
    while True:
        wake.clear()
        done = await work()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), idle_seconds if done else retry_seconds)
