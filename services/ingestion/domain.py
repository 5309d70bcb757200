"""The ingestion domain as a whole: what the servicer talks to, open once the log is.

It owns the tracking plans (available at once), and the intake (checks, dedup and durable
appends), which exists only while the event log is open; so do the suppression list and
purges, which act on what the intake stores.

Where its state lives. The suppression list and the source runs are consumer stores opened
through ``stores`` (:mod:`profilemesh.shared.log.stores`): SQLite files under ``data_dir`` on
the embedded backend, schemas of the shared PostgreSQL database on the ``postgres`` backend,
where every replica reads and writes the same ones and a pod's restart loses nothing. The
tracking plans come from configuration.

The deduplication snapshot stays a file under ``data_dir``, one per replica, on both backends.
Deduplication is a per-replica window, an optimisation over the event log and not a record of
its own: the snapshot only shortens the replay at start-up (without it, the replica replays the
retained log, which also teaches it the ids every other replica had stored by then). A client's
retry that reaches the replica which took the first attempt is answered as a duplicate; one
that reaches another replica after start-up is not recognised and is stored a second time,
with the same message id, and the event log's consumers see it twice. Moving the window into
the shared database would put a round trip on every append for a rare case; a load balancer
that keeps a client's connection on one replica (gRPC does, per channel) makes it rarer still.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from profilemesh.services.ingestion.intake import Intake
from profilemesh.services.ingestion.purge import PurgeOutcome, purge
from profilemesh.services.ingestion.source_runs import SourceRuns
from profilemesh.services.ingestion.suppressions import (
    REFRESH_SECONDS,
    SuppressionList,
    SuppressionStats,
)
from profilemesh.services.ingestion.tracking_plans import TrackingPlans
from profilemesh.shared.errors import Unavailable
from profilemesh.shared.log.api import Log
from profilemesh.shared.log.stores import StoreOpener, files_under
from profilemesh.shared.plugin_manager import PluginSet
from profilemesh.shared.settings import IngestionSettings

log = logging.getLogger(__name__)


class Ingestion:
    """The ingestion service's domain state: the dedup snapshot under ``data_dir``, the
    suppression list and source runs in the stores ``stores`` opens (by default SQLite files
    under ``data_dir``)."""

    def __init__(
        self,
        data_dir: Path,
        settings: IngestionSettings,
        plugins: PluginSet,
        stores: StoreOpener | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self.plugins = plugins
        self.stores = stores or files_under(data_dir)
        self.plans = TrackingPlans(data_dir / "tracking_plans.json")
        self._intake: Intake | None = None
        self._source_runs: SourceRuns | None = None
        self._snapshots: asyncio.Task[None] | None = None
        self._refreshes: asyncio.Task[None] | None = None

    @property
    def intake(self) -> Intake:
        """The intake; only while the service is running."""
        if self._intake is None:
            raise Unavailable("ingestion is starting or stopping")
        return self._intake

    @property
    def source_runs(self) -> SourceRuns:
        """Connector runs; only while the service is running."""
        if self._source_runs is None:
            raise Unavailable("ingestion is starting or stopping")
        return self._source_runs

    async def open(self, event_log: Log) -> None:
        """Load the plans file, recover deduplication from the log, start snapshots and
        connector runs."""
        if self.settings.tracking_plans_file is not None:
            self.plans.load_yaml(self.settings.tracking_plans_file)
        suppressions = SuppressionList(self.stores)
        await asyncio.to_thread(suppressions.open)
        if suppressions.shared:
            self._refreshes = asyncio.create_task(self._refresh_periodically(suppressions))
        intake = Intake(
            event_log, self.settings, self.plans, self.data_dir / "dedup.snapshot", suppressions
        )
        await intake.recover()
        self._intake = intake
        self._snapshots = asyncio.create_task(self._snapshot_periodically(intake))
        source_runs = SourceRuns(self.stores, self.plugins, intake)
        await source_runs.open()
        self._source_runs = source_runs

    async def close(self) -> None:
        """Stop connector runs (resumable) and snapshots; save a last snapshot (so the next
        start replays little)."""
        if self._source_runs is not None:
            await self._source_runs.close()
            self._source_runs = None
        for task in (self._snapshots, self._refreshes):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._snapshots = self._refreshes = None
        if self._intake is not None:
            await self._intake.save_snapshot()
            await asyncio.to_thread(self._intake.suppressions.close)
            self._intake = None

    # -- privacy -------------------------------------------------------------------------------

    async def suppress(self, values: Sequence[str], reason: str) -> int:
        """Suppress identifier ``values`` (durably); how many were not suppressed before."""
        return await asyncio.to_thread(self.intake.suppressions.suppress, values, reason)

    async def unsuppress(self, values: Sequence[str]) -> int:
        """Stop suppressing identifier ``values``; how many of them were suppressed."""
        return await asyncio.to_thread(self.intake.suppressions.unsuppress, values)

    async def suppression_stats(self) -> SuppressionStats:
        """The size of the suppression list and the number of items it made intake drop."""
        return await asyncio.to_thread(self.intake.suppressions.stats)

    async def purge(self, job_id: str, values: Sequence[str]) -> PurgeOutcome:
        """Erase every stored item that mentions identifier ``values`` (see :mod:`.purge`)."""
        return await purge(self.intake.log, self.source_runs, job_id, values)

    async def _snapshot_periodically(self, intake: Intake) -> None:
        while True:
            await asyncio.sleep(self.settings.dedup_snapshot_seconds)
            try:
                await intake.save_snapshot()
            except OSError:
                log.exception("saving the dedup snapshot failed; will retry")

    async def _refresh_periodically(self, suppressions: SuppressionList) -> None:
        """Enforce what other replicas suppress (or stop suppressing), within about
        :data:`REFRESH_SECONDS`: one small read of the list's version each time."""
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await asyncio.to_thread(suppressions.refresh)
            except Exception:
                log.exception("refreshing the suppression list failed; will retry")
