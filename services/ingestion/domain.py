"""The ingestion domain as a whole: what the servicer talks to, open once the log is.

It owns the tracking plans (available at once), and the intake (checks, dedup and durable
appends), which exists only while the event log is open; so do the suppression list and
purges, which act on what the intake stores.
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
from profilemesh.services.ingestion.suppressions import SuppressionList, SuppressionStats
from profilemesh.services.ingestion.tracking_plans import TrackingPlans
from profilemesh.shared.errors import Unavailable
from profilemesh.shared.log.api import Log
from profilemesh.shared.plugin_manager import PluginSet
from profilemesh.shared.settings import IngestionSettings

log = logging.getLogger(__name__)


class Ingestion:
    """The ingestion service's domain state, kept under ``data_dir``."""

    def __init__(self, data_dir: Path, settings: IngestionSettings, plugins: PluginSet) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self.plugins = plugins
        self.plans = TrackingPlans(data_dir / "tracking_plans.json")
        self._intake: Intake | None = None
        self._source_runs: SourceRuns | None = None
        self._snapshots: asyncio.Task[None] | None = None

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
        suppressions = SuppressionList(self.data_dir / "suppressions.sqlite")
        await asyncio.to_thread(suppressions.open)
        intake = Intake(
            event_log, self.settings, self.plans, self.data_dir / "dedup.snapshot", suppressions
        )
        await intake.recover()
        self._intake = intake
        self._snapshots = asyncio.create_task(self._snapshot_periodically(intake))
        source_runs = SourceRuns(self.data_dir / "source_runs.sqlite", self.plugins, intake)
        await source_runs.open()
        self._source_runs = source_runs

    async def close(self) -> None:
        """Stop connector runs (resumable) and snapshots; save a last snapshot (so the next
        start replays little)."""
        if self._source_runs is not None:
            await self._source_runs.close()
            self._source_runs = None
        if self._snapshots is not None:
            self._snapshots.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._snapshots
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
