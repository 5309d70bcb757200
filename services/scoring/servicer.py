"""gRPC adapter of the scoring service: protobuf in, protobuf out, no business logic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from profilemesh.scoring.v1 import scoring_service_pb2, scoring_service_pb2_grpc
from profilemesh.services.scoring.domain import Scoring, scores_table
from profilemesh.services.scoring.features_client import arrow_bytes
from profilemesh.shared.errors import InvalidArgument

service_pb2 = scoring_service_pb2
DEFAULT_CHUNK_ROWS = 65_536
DEFAULT_PAGE = 100
MAX_PAGE = 1_000


class ScoringServicer(scoring_service_pb2_grpc.ScoringServiceServicer):
    """Serves ``profilemesh.scoring.v1.ScoringService`` over the scoring domain."""

    def __init__(self, domain: Scoring) -> None:
        self.domain = domain

    async def TrainModel(
        self, request: service_pb2.TrainModelRequest, context: Any
    ) -> service_pb2.TrainModelResponse:
        return service_pb2.TrainModelResponse(run=self.domain.start_training(request))

    async def GetTrainingRun(
        self, request: service_pb2.GetTrainingRunRequest, context: Any
    ) -> service_pb2.GetTrainingRunResponse:
        return service_pb2.GetTrainingRunResponse(run=self.domain.run(request.run_id))

    async def ListModels(
        self, request: service_pb2.ListModelsRequest, context: Any
    ) -> service_pb2.ListModelsResponse:
        if request.page_size < 0:
            raise InvalidArgument.for_field("page_size", "must not be negative")
        versions = self.domain.registry.versions(
            request.model, request.kind, request.champions_only
        )
        start = _page_start(request.page_token)
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        more = start + size < len(versions)
        return service_pb2.ListModelsResponse(
            models=versions[start : start + size],
            next_page_token=str(start + size) if more else "",
        )

    async def GetModel(
        self, request: service_pb2.GetModelRequest, context: Any
    ) -> service_pb2.GetModelResponse:
        _require(request.model, "model")
        stored = self.domain.registry.get(request.model, request.version)
        return service_pb2.GetModelResponse(model_version=stored.metadata)

    async def PromoteModel(
        self, request: service_pb2.PromoteModelRequest, context: Any
    ) -> service_pb2.PromoteModelResponse:
        _require(request.model, "model")
        _require(request.version, "version")
        promoted, previous = self.domain.promote(request.model, request.version)
        return service_pb2.PromoteModelResponse(model_version=promoted, previous_version=previous)

    async def Score(
        self, request: service_pb2.ScoreRequest, context: Any
    ) -> service_pb2.ScoreResponse:
        _require(request.model, "model")
        entity = request.WhichOneof("entity")
        if entity == "identifier":
            profile_id, score = await self.domain.score(
                request.model, request.version, request.top_reasons, identifier=request.identifier
            )
        elif entity == "profile_id" and request.profile_id:
            profile_id, score = await self.domain.score(
                request.model, request.version, request.top_reasons, profile_id=request.profile_id
            )
        else:
            raise InvalidArgument.for_field("profile_id", "set profile_id or identifier")
        return service_pb2.ScoreResponse(profile_id=profile_id, score=score)

    async def ScoreBatch(
        self, request: service_pb2.ScoreBatchRequest, context: Any
    ) -> AsyncIterator[service_pb2.ScoreBatchResponse]:
        _require(request.model, "model")
        scorer, ids, scored = await self.domain.score_table(
            request.model, request.version, list(request.profile_ids), request.top_reasons
        )
        table = scores_table(scorer, ids, scored, request.top_reasons)
        chunk = request.max_rows_per_chunk or DEFAULT_CHUNK_ROWS
        for start in range(0, max(1, table.num_rows), chunk):
            yield service_pb2.ScoreBatchResponse(arrow_ipc=arrow_bytes(table.slice(start, chunk)))

    async def DiscoverClusters(
        self, request: service_pb2.DiscoverClustersRequest, context: Any
    ) -> service_pb2.DiscoverClustersResponse:
        clustering = await self.domain.discover_clusters(
            request.name, list(request.feature_names), request.k, request.max_k
        )
        return service_pb2.DiscoverClustersResponse(clustering=clustering)

    async def GetClustering(
        self, request: service_pb2.GetClusteringRequest, context: Any
    ) -> service_pb2.GetClusteringResponse:
        _require(request.name, "name")
        stored = self.domain.registry.clustering(request.name, request.version)
        return service_pb2.GetClusteringResponse(clustering=stored.metadata)

    async def ScoreLookalikes(
        self, request: service_pb2.ScoreLookalikesRequest, context: Any
    ) -> service_pb2.ScoreLookalikesResponse:
        if request.seed_segment_id:
            raise InvalidArgument.for_field(
                "seed_segment_id",
                "segments live in activation; pass their members as seed_profile_ids",
            )
        found, seed_size = await self.domain.lookalikes(
            list(request.seed_profile_ids), list(request.feature_names), request.top_n
        )
        return service_pb2.ScoreLookalikesResponse(
            lookalikes=[service_pb2.Lookalike(profile_id=p, similarity=s) for p, s in found],
            seed_size=seed_size,
        )


def _require(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument.for_field(field, "required")


def _page_start(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit():
        raise InvalidArgument.for_field("page_token", "not a token this RPC gave")
    return int(token)
