"""Every RPC of the v1 surface is served; those not built yet answer UNIMPLEMENTED, not data."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import symbol_database

from profilemesh.services.runner import load_app
from profilemesh.shared.channel import create_channel
from profilemesh.shared.server import create_server
from profilemesh.shared.settings import SERVICE_NAMES, Settings

IMPLEMENTED = {
    "/profilemesh.common.v1.LogService/Subscribe",
    "/profilemesh.common.v1.LogService/GetOffsets",
    "/profilemesh.common.v1.AuditService/ListAuditEntries",
    "/profilemesh.common.v1.AuditService/VerifyAuditChain",
    *(
        f"/profilemesh.common.v1.AuthService/{name}"
        for name in ("CreateToken", "RevokeToken", "ListTokens", "VerifyToken")
    ),
    *(
        f"/profilemesh.ingestion.v1.IngestionService/{name}"
        for name in (
            "SendEvent",
            "SendEvents",
            "StreamEvents",
            "ImportRecords",
            "CreateTrackingPlan",
            "GetTrackingPlan",
            "ListTrackingPlans",
            "UpdateTrackingPlan",
            "DeleteTrackingPlan",
            "ListConnectors",
            "StartSourceRun",
            "GetSourceRun",
            "ListSourceRuns",
            "CancelSourceRun",
            "SuppressIdentifiers",
            "UnsuppressIdentifiers",
            "PurgeIdentifiers",
            "GetSuppressionStats",
        )
    ),
    *(
        f"/profilemesh.identity.v1.IdentityService/{name}"
        for name in (
            "GetProfile",
            "ResolveIdentifiers",
            "MergeProfiles",
            "UnmergeProfile",
            "ListMerges",
            "GetIdentityRules",
            "UpdateIdentityRules",
            "MatchRecords",
            "UpdateConsent",
            "DeleteProfile",
            "GetDeletion",
            "SuppressIdentifiers",
            "UnsuppressIdentifiers",
            "ReportDeletionProgress",
        )
    ),
    *(
        f"/profilemesh.features.v1.FeaturesService/{name}"
        for name in (
            "GetFeatures",
            "BatchGetFeatures",
            "GetHistoricalFeatures",
            "CreateFeatureDefinition",
            "GetFeatureDefinition",
            "ListFeatureDefinitions",
            "DeleteFeatureDefinition",
            "StartBackfill",
            "GetBackfill",
            "GetLifetimeValueModel",
        )
    ),
    *(
        f"/profilemesh.scoring.v1.ScoringService/{name}"
        for name in (
            "TrainModel",
            "GetTrainingRun",
            "ListModels",
            "GetModel",
            "PromoteModel",
            "Score",
            "ScoreBatch",
            "DiscoverClusters",
            "GetClustering",
            "ScoreLookalikes",
        )
    ),
    *(
        f"/profilemesh.activation.v1.ActivationService/{name}"
        for name in (
            "CreateSegment",
            "GetSegment",
            "ListSegments",
            "UpdateSegment",
            "DeleteSegment",
            "ListMembers",
            "GetMembership",
            "CountMembers",
            "EvaluateSegments",
            "GetSegmentEvaluation",
            "GetMembershipHistory",
            "ListActivators",
            "CreateDestination",
            "GetDestination",
            "ListDestinations",
            "UpdateDestination",
            "DeleteDestination",
            "ListDeadLetters",
            "RetryDeadLetters",
            "GetUnifiedProfile",
        )
    ),
}
"""Full method names that do real work; grows as the services are built."""


def _message_class(descriptor):  # type: ignore[no-untyped-def]
    return symbol_database.Default().GetSymbol(descriptor.full_name)


async def _one_request(request):  # type: ignore[no-untyped-def]
    yield request


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_every_rpc_answers_unimplemented_until_built(
    service: str, mesh_settings: Settings
) -> None:
    app = load_app(service, mesh_settings)
    server, port = create_server(app.bindings, mesh_settings, port=0)
    await server.start()
    checked = implemented = total = 0
    try:
        async with create_channel(f"127.0.0.1:{port}", mesh_settings) as channel:
            for binding in app.bindings:
                pool_service = _service_descriptor(binding.name)
                for method in pool_service.methods:
                    full = f"/{pool_service.full_name}/{method.name}"
                    total += 1
                    if full in IMPLEMENTED:
                        implemented += 1
                        continue
                    request = _message_class(method.input_type)()
                    response_type = _message_class(method.output_type)
                    code = await _call(channel, full, method, request, response_type)
                    assert code == grpc.StatusCode.UNIMPLEMENTED, f"{full} answered {code}"
                    checked += 1
    finally:
        await server.stop(0)
    # Every RPC was either checked here or is on the implemented list.
    assert checked + implemented == total > 0


def _service_descriptor(full_name: str):  # type: ignore[no-untyped-def]
    from google.protobuf import descriptor_pool

    return descriptor_pool.Default().FindServiceByName(full_name)


async def _call(channel, full, method, request, response_type) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    kwargs = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": response_type.FromString,
    }
    try:
        if method.client_streaming and method.server_streaming:
            async for _ in channel.stream_stream(full, **kwargs)(_one_request(request)):
                pass
        elif method.client_streaming:
            await channel.stream_unary(full, **kwargs)(_one_request(request))
        elif method.server_streaming:
            async for _ in channel.unary_stream(full, **kwargs)(request):
                pass
        else:
            await channel.unary_unary(full, **kwargs)(request)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_services_host_their_contract_and_the_log_service(mesh_settings: Settings) -> None:
    hosted = {
        name: [b.name for b in load_app(name, mesh_settings).bindings] for name in SERVICE_NAMES
    }
    assert hosted["identity"] == [
        "profilemesh.identity.v1.IdentityService",
        "profilemesh.common.v1.AuthService",
        "profilemesh.common.v1.LogService",
        "profilemesh.common.v1.AuditService",
    ]
    assert all("profilemesh.common.v1.LogService" in names for names in hosted.values())
    assert all("profilemesh.common.v1.AuditService" in names for names in hosted.values())
