"""gRPC adapter of the source-run RPCs: protobuf in, protobuf out, no business logic.

:class:`SourceRunsServicer` is a mixin of ``IngestionServicer``, which sets ``source_runs`` and
``plugins`` before serving. Domain errors raised here or by :class:`SourceRuns` are turned into
gRPC statuses by the error interceptor.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from profilemesh.common.v1 import errors_pb2, job_pb2
from profilemesh.ingestion.v1 import ingestion_service_pb2 as service_pb2
from profilemesh.ingestion.v1 import source_run_pb2
from profilemesh.services.ingestion.source_runs import SourceRunInfo, SourceRuns
from profilemesh.shared.extension_points import SourceConnector
from profilemesh.shared.plugin_manager import PluginSet

"""The ``SourceRun`` field for the first rejection reasons (``repeated
profilemesh.common.v1.FieldViolation``). Filled only when the contract has it; until then the
reasons are kept by the domain and only the counters travel."""


class SourceRunsServicer:
    """``ListConnectors``, ``StartSourceRun``, ``GetSourceRun``, ``ListSourceRuns`` and
    ``CancelSourceRun`` of ``profilemesh.ingestion.v1.IngestionService``."""

    source_runs: SourceRuns
    plugins: PluginSet

    async def ListConnectors(
        self, request: service_pb2.ListConnectorsRequest, context: Any
    ) -> service_pb2.ListConnectorsResponse:
        connectors = self.plugins.source_connectors()
        return service_pb2.ListConnectorsResponse(
            connectors=[connector_message(connectors[name]) for name in sorted(connectors)]
        )

    async def StartSourceRun(
        self, request: service_pb2.StartSourceRunRequest, context: Any
    ) -> service_pb2.StartSourceRunResponse:
        run = await self.source_runs.start(
            request.connector,
            request.source,
            struct_to_python(request.config),
            full_refresh=request.full_refresh,
        )
        return service_pb2.StartSourceRunResponse(run=run_message(run))

    async def GetSourceRun(
        self, request: service_pb2.GetSourceRunRequest, context: Any
    ) -> service_pb2.GetSourceRunResponse:
        run = await self.source_runs.get(request.run_id)
        return service_pb2.GetSourceRunResponse(run=run_message(run))

    async def ListSourceRuns(
        self, request: service_pb2.ListSourceRunsRequest, context: Any
    ) -> service_pb2.ListSourceRunsResponse:
        runs, next_page_token = await self.source_runs.list(
            source=request.source,
            connector=request.connector,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return service_pb2.ListSourceRunsResponse(
            runs=[run_message(run) for run in runs], next_page_token=next_page_token
        )

    async def CancelSourceRun(
        self, request: service_pb2.CancelSourceRunRequest, context: Any
    ) -> service_pb2.CancelSourceRunResponse:
        run = await self.source_runs.cancel(request.run_id)
        return service_pb2.CancelSourceRunResponse(run=run_message(run))


def connector_message(cls: type[SourceConnector]) -> service_pb2.Connector:
    """A connector class as the ``Connector`` message: name, description, version, schema."""
    schema = struct_pb2.Struct()
    json_format.ParseDict(cls.config_model.model_json_schema(), schema)
    return service_pb2.Connector(
        name=cls.name,
        description=cls.description,
        version=_distribution_version(cls.__module__.partition(".")[0]),
        config_schema=schema,
    )


def run_message(run: SourceRunInfo) -> source_run_pb2.SourceRun:
    """A run as the ``SourceRun`` message."""
    message = source_run_pb2.SourceRun(
        run_id=run.run_id,
        connector=run.connector,
        source=run.source,
        full_refresh=run.full_refresh,
        state=job_pb2.JobState.Value(f"JOB_STATE_{run.state.value}"),
        items_read=run.items_read,
        items_accepted=run.items_accepted,
        items_duplicate=run.items_duplicate,
        items_rejected=run.items_rejected,
        error=run.error,
        created_at=_timestamp(run.created_at),
        started_at=_timestamp(run.started_at),
        finished_at=_timestamp(run.finished_at),
    )
    if run.checkpoint is not None:
        json_format.ParseDict(dict(run.checkpoint), message.checkpoint)
    message.rejections.extend(
        errors_pb2.FieldViolation(field=r.where, description=r.description) for r in run.rejections
    )
    return message


def struct_to_python(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A ``Struct`` as plain JSON values, whole numbers as ``int``.

    ``Struct`` keeps every number as a double; configurations mean ``batch_size: 500``, not
    ``500.0``, and are stored and shown as given.
    """
    value = _whole_numbers_as_int(json_format.MessageToDict(struct))
    assert isinstance(value, dict)  # a Struct is a JSON object
    return value


def _whole_numbers_as_int(value: object) -> object:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value) if abs(value) < 2**53 else value
    if isinstance(value, dict):
        return {key: _whole_numbers_as_int(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers_as_int(item) for item in value]
    return value


def _timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


@functools.cache
def _distribution_version(package: str) -> str:
    """The version of the installed distribution providing top-level ``package``; ``""`` when
    it cannot be told (a plugin module not installed as a distribution)."""
    for distribution in importlib.metadata.packages_distributions().get(package, []):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""
