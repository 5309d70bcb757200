"""gRPC adapter of the features service: protobuf in, protobuf out, no business logic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pyarrow as pa
import pyarrow.ipc

from profilemesh.features.v1 import backfill_pb2, feature_vector_pb2, features_service_pb2_grpc
from profilemesh.features.v1 import features_service_pb2 as service_pb2
from profilemesh.services.features.definitions import definition_from_proto
from profilemesh.services.features.domain import BackfillJob, Features
from profilemesh.services.features.values import feature_values, timestamp
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument, NotFound
from profilemesh.shared.identity_lookup import IdentityLookup

DEFAULT_CHUNK_ROWS = 65_536
MAX_BATCH_PROFILES = 1_000
_JOB_STATES = {
    "PENDING": 1,
    "RUNNING": 2,
    "SUCCEEDED": 3,
    "FAILED": 4,
}


class FeaturesServicer(features_service_pb2_grpc.FeaturesServiceServicer):
    """Serves ``profilemesh.features.v1.FeaturesService`` over the features domain."""

    def __init__(self, domain: Features, identity: IdentityLookup) -> None:
        self.domain = domain
        self.identity = identity

    def _vector(self, profile_id: str, names: Any) -> feature_vector_pb2.FeatureVector:
        live, values, as_of = self.domain.online_values(profile_id, list(names))
        return feature_vector_pb2.FeatureVector(
            profile_id=live,
            values=feature_values(self.domain.feature_set, values, as_of),
            as_of=timestamp(as_of),
        )

    async def GetFeatures(
        self, request: service_pb2.GetFeaturesRequest, context: Any
    ) -> service_pb2.GetFeaturesResponse:
        entity = request.WhichOneof("entity")
        if entity == "identifier":
            profile_id = await self.identity.profile_id(request.identifier, "identifier")
        elif entity == "profile_id" and request.profile_id:
            profile_id = request.profile_id
        else:
            raise InvalidArgument.for_field("profile_id", "set profile_id or identifier")
        return service_pb2.GetFeaturesResponse(
            vector=self._vector(profile_id, request.feature_names)
        )

    async def BatchGetFeatures(
        self, request: service_pb2.BatchGetFeaturesRequest, context: Any
    ) -> service_pb2.BatchGetFeaturesResponse:
        if not request.profile_ids:
            raise InvalidArgument.for_field("profile_ids", "name at least one profile")
        if len(request.profile_ids) > MAX_BATCH_PROFILES:
            raise InvalidArgument.for_field(
                "profile_ids", f"at most {MAX_BATCH_PROFILES} profiles per call"
            )
        # Many profiles take milliseconds of CPU: off the event loop, so other calls go on.
        found, as_of = await asyncio.to_thread(
            self.domain.online_many, list(request.profile_ids), list(request.feature_names)
        )
        feature_set = self.domain.feature_set
        vectors = []
        for live, values in found:
            if values is None:
                # An unknown profile has no events: its vector is present and empty.
                vectors.append(feature_vector_pb2.FeatureVector(profile_id=live))
                continue
            vectors.append(
                feature_vector_pb2.FeatureVector(
                    profile_id=live,
                    values=feature_values(feature_set, values, as_of),
                    as_of=timestamp(as_of),
                )
            )
        return service_pb2.BatchGetFeaturesResponse(vectors=vectors)

    async def GetHistoricalFeatures(
        self, request: service_pb2.GetHistoricalFeaturesRequest, context: Any
    ) -> AsyncIterator[service_pb2.GetHistoricalFeaturesResponse]:
        if request.cutoffs and request.entity_rows_arrow:
            raise InvalidArgument.for_field("cutoffs", "set either cutoffs or entity_rows_arrow")
        rows = None if request.cutoffs else _entity_rows(request.entity_rows_arrow)
        extra = [
            definition_from_proto(d, f"extra_definitions[{i}]")
            for i, d in enumerate(request.extra_definitions)
        ]
        table = await asyncio.to_thread(
            self.domain.historical,
            rows,
            list(request.feature_names),
            extra,
            [c.ToNanoseconds() for c in request.cutoffs],
        )
        chunk = request.max_rows_per_chunk or DEFAULT_CHUNK_ROWS
        for start in range(0, max(1, table.num_rows), chunk):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table.slice(start, chunk))
            yield service_pb2.GetHistoricalFeaturesResponse(arrow_ipc=sink.getvalue().to_pybytes())

    async def CreateFeatureDefinition(
        self, request: service_pb2.CreateFeatureDefinitionRequest, context: Any
    ) -> service_pb2.CreateFeatureDefinitionResponse:
        definition = definition_from_proto(request.definition, "definition")
        created, job = await self.domain.create_definition(definition)
        return service_pb2.CreateFeatureDefinitionResponse(
            definition=self.domain.registry.to_proto(created), backfill=_job(job)
        )

    async def GetFeatureDefinition(
        self, request: service_pb2.GetFeatureDefinitionRequest, context: Any
    ) -> service_pb2.GetFeatureDefinitionResponse:
        definition = self.domain.registry.get(request.name, request.version)
        return service_pb2.GetFeatureDefinitionResponse(
            definition=self.domain.registry.to_proto(definition)
        )

    async def ListFeatureDefinitions(
        self, request: service_pb2.ListFeatureDefinitionsRequest, context: Any
    ) -> service_pb2.ListFeatureDefinitionsResponse:
        if request.page_size < 0:
            raise InvalidArgument.for_field("page_size", "must not be negative")
        registry = self.domain.registry
        every = registry.all_definitions(request.all_versions)
        start = 0
        if request.page_token:
            try:
                start = int(request.page_token)
            except ValueError:
                raise InvalidArgument.for_field("page_token", "not a token this RPC gave") from None
        size = request.page_size or 100
        page = every[start : start + size]
        more = start + size < len(every)
        return service_pb2.ListFeatureDefinitionsResponse(
            definitions=[registry.to_proto(d) for d in page],
            next_page_token=str(start + size) if more else "",
        )

    async def DeleteFeatureDefinition(
        self, request: service_pb2.DeleteFeatureDefinitionRequest, context: Any
    ) -> service_pb2.DeleteFeatureDefinitionResponse:
        if not request.name:
            raise InvalidArgument.for_field("name", "required")
        await self.domain.delete_definition(request.name, request.version)
        return service_pb2.DeleteFeatureDefinitionResponse()

    async def StartBackfill(
        self, request: service_pb2.StartBackfillRequest, context: Any
    ) -> service_pb2.StartBackfillResponse:
        names = [n.partition("@")[0] for n in request.feature_names]
        for index, name in enumerate(names):
            if name not in self.domain.feature_set:
                raise InvalidArgument.for_field(f"feature_names[{index}]", f"no feature {name!r}")
        return service_pb2.StartBackfillResponse(job=_job(self.domain.start_backfill(names)))

    async def GetLifetimeValueModel(
        self, request: service_pb2.GetLifetimeValueModelRequest, context: Any
    ) -> service_pb2.GetLifetimeValueModelResponse:
        model = await asyncio.to_thread(self.domain.fit_lifetime_value)
        if model is None:
            raise FailedPrecondition(
                "too few purchasers to fit the lifetime value model yet",
                violations=[("model", "not fitted")],
            )
        return service_pb2.GetLifetimeValueModelResponse(model=model.to_proto())

    async def GetBackfill(
        self, request: service_pb2.GetBackfillRequest, context: Any
    ) -> service_pb2.GetBackfillResponse:
        job = self.domain.jobs.get(request.job_id)
        if job is None:
            raise NotFound("no such backfill", violations=[("job_id", "unknown")])
        return service_pb2.GetBackfillResponse(job=_job(job))


def _entity_rows(data: bytes) -> pa.Table:
    """The request's entity rows, checked: INVALID_ARGUMENT naming what is wrong."""
    field = "entity_rows_arrow"
    try:
        table = pa.ipc.open_stream(data).read_all()
    except (pa.ArrowInvalid, OSError) as error:
        raise InvalidArgument.for_field(field, f"not an Arrow IPC stream: {error}") from None
    for column, accepted in (
        ("profile_id", pa.types.is_string),
        ("event_timestamp", pa.types.is_timestamp),
    ):
        if column not in table.column_names:
            raise InvalidArgument.for_field(field, f"needs a {column!r} column")
        if not accepted(table.schema.field(column).type):
            raise InvalidArgument.for_field(
                field, f"{column!r} has type {table.schema.field(column).type}"
            )
    if table.column("profile_id").null_count or table.column("event_timestamp").null_count:
        raise InvalidArgument.for_field(field, "profile_id and event_timestamp must not be null")
    return table


def _job(job: BackfillJob) -> backfill_pb2.BackfillJob:
    message = backfill_pb2.BackfillJob(
        job_id=job.job_id,
        feature_names=job.feature_names,
        state=_JOB_STATES[job.state],  # type: ignore[arg-type]
        progress=job.progress,
        events_processed=job.events_processed,
        profiles_updated=job.profiles_updated,
        error=job.error,
        created_at=timestamp(job.created_at),
    )
    if job.started_at:
        message.started_at.CopyFrom(timestamp(job.started_at))
    if job.finished_at:
        message.finished_at.CopyFrom(timestamp(job.finished_at))
    return message
