"""gRPC adapter of the identity service: protobuf in, protobuf out, no business logic.

RPCs not built yet (consent, deletion, suppression) are inherited from the generated base
class, which answers UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
from typing import Any

from profilemesh.common.v1 import identifier_pb2, profile_pb2
from profilemesh.identity.v1 import identity_service_pb2 as service_pb2
from profilemesh.identity.v1 import identity_service_pb2_grpc
from profilemesh.services.identity import messages
from profilemesh.services.identity.domain import Identity
from profilemesh.services.identity.identifiers import Identifier
from profilemesh.services.identity.matching.api import match_records
from profilemesh.services.identity.matching.defaults import DEFAULT
from profilemesh.services.identity.matching.proto import (
    RECORD_ID_COLUMN,
    SOURCE_COLUMN,
    model_to_proto,
    records_from_proto,
    result_to_proto,
    settings_from_proto,
)
from profilemesh.services.identity.rules import Rules
from profilemesh.services.identity.store import GraphStore
from profilemesh.shared.errors import InvalidArgument, NotFound

# Parts of the unified profile other services own; until they serve them, GetProfile says so.
OTHER_SERVICES_PARTS = ("features", "scores", "clusters", "segments")
DEFAULT_RECENT_EVENTS = 20


class IdentityServicer(identity_service_pb2_grpc.IdentityServiceServicer):
    """Serves ``profilemesh.identity.v1.IdentityService`` over the identity domain."""

    def __init__(self, domain: Identity) -> None:
        self.domain = domain

    def _normalized(self, value: identifier_pb2.Identifier, field: str) -> Identifier | None:
        if not value.type or not value.value:
            raise InvalidArgument.for_field(field, "type and value are required")
        return self.domain.graph.rules.normalize(value.type, value.value)

    def _profile_id(self, request: Any, field: str = "identifier") -> str:
        """The live profile a request's ``lookup`` addresses (``profile_id`` or identifier)."""
        graph = self.domain.graph
        with self.domain.lock:
            if request.WhichOneof("lookup") == "profile_id":
                found = graph.canonical(request.profile_id)
                where = "profile_id"
            else:
                normalized = self._normalized(getattr(request, field), field)
                found = graph.resolve(normalized) if normalized is not None else None
                where = field
        if found is None:
            raise NotFound("no such profile", violations=[(where, "no profile has it")])
        return found

    async def GetProfile(
        self, request: service_pb2.GetProfileRequest, context: Any
    ) -> service_pb2.GetProfileResponse:
        if request.WhichOneof("lookup") is None:
            raise InvalidArgument.for_field("lookup", "a profile_id or an identifier is required")
        profile_id = self._profile_id(request)
        graph = self.domain.graph
        with self.domain.lock:
            members = graph.identifiers_of(profile_id)
            links = graph.links_of(profile_id)
            traits = graph.traits_of(profile_id)
            retired = sorted(
                {
                    retired_id
                    for record in graph.merges_of(profile_id)
                    if record.surviving_profile_id == profile_id
                    for retired_id in record.merged_profile_ids
                }
            )
        limit = request.recent_events_limit or DEFAULT_RECENT_EVENTS
        recent = await asyncio.to_thread(
            self.domain.store.read,
            lambda c: GraphStore.recent_events(c, profile_id, limit),
        )
        profile = profile_pb2.UnifiedProfile(
            profile_id=profile_id,
            identities=messages.identities(links, members),
            traits=messages.struct(traits),
            recent_events=[messages.event_summary(s) for s in recent],
            merged_profile_ids=retired,
        )
        return service_pb2.GetProfileResponse(
            profile=profile, unavailable_parts=OTHER_SERVICES_PARTS
        )

    async def ResolveIdentifiers(
        self, request: service_pb2.ResolveIdentifiersRequest, context: Any
    ) -> service_pb2.ResolveIdentifiersResponse:
        graph = self.domain.graph
        resolutions = []
        with self.domain.lock:
            for index, value in enumerate(request.identifiers):
                normalized = self._normalized(value, f"identifiers[{index}]")
                resolution = service_pb2.Resolution(identifier=value)
                if normalized is not None:
                    resolution.normalized_identifier.CopyFrom(messages.identifier(normalized))
                    resolution.blocked = graph.is_blocked(normalized) or graph.rules.is_blocked(
                        normalized
                    )
                    found = graph.resolve(normalized)
                    if found is not None:
                        resolution.profile_id, resolution.found = found, True
                resolutions.append(resolution)
        return service_pb2.ResolveIdentifiersResponse(resolutions=resolutions)

    async def MergeProfiles(
        self, request: service_pb2.MergeProfilesRequest, context: Any
    ) -> service_pb2.MergeProfilesResponse:
        outcome = await self.domain.merge(list(request.profile_ids), request.reason)
        record = outcome.record
        return service_pb2.MergeProfilesResponse(
            surviving_profile_id=record.surviving_profile_id,
            retired_profile_ids=record.merged_profile_ids,
            merge_id=record.merge_id,
        )

    async def UnmergeProfile(
        self, request: service_pb2.UnmergeProfileRequest, context: Any
    ) -> service_pb2.UnmergeProfileResponse:
        identifiers = []
        for index, value in enumerate(request.identifiers):
            normalized = self._normalized(value, f"identifiers[{index}]")
            if normalized is None:
                raise InvalidArgument.for_field(f"identifiers[{index}]", "not a valid identifier")
            identifiers.append(normalized)
        outcome = await self.domain.unmerge(request.profile_id, identifiers, request.reason)
        return service_pb2.UnmergeProfileResponse(
            resulting_profile_ids=outcome.record.resulting_profile_ids,
            merge_id=outcome.record.merge_id,
        )

    async def ListMerges(
        self, request: service_pb2.ListMergesRequest, context: Any
    ) -> service_pb2.ListMergesResponse:
        graph = self.domain.graph
        with self.domain.lock:
            if request.profile_id:
                if graph.canonical(request.profile_id) is None:
                    raise NotFound(
                        "no such profile", violations=[("profile_id", "no profile has it")]
                    )
                records = graph.merges_of(request.profile_id)
            else:
                records = graph.merges()
        if request.kind:
            kind = messages.KIND_FROM_PROTO.get(request.kind)
            records = [r for r in records if r.kind == kind]
        start = int(request.page_token or 0)
        size = request.page_size or 100
        page = records[start : start + size]
        more = start + size < len(records)
        return service_pb2.ListMergesResponse(
            merges=[messages.merge_record(r) for r in page],
            next_page_token=str(start + size) if more else "",
        )

    async def GetIdentityRules(
        self, request: service_pb2.GetIdentityRulesRequest, context: Any
    ) -> service_pb2.GetIdentityRulesResponse:
        response = service_pb2.GetIdentityRulesResponse(rules=self.domain.graph.rules.to_proto())
        model = self.domain.matcher.model
        if model is not None:
            response.matching_model.CopyFrom(model_to_proto(model.summary))
            response.matching_model_records = model.records
        return response

    async def UpdateIdentityRules(
        self, request: service_pb2.UpdateIdentityRulesRequest, context: Any
    ) -> service_pb2.UpdateIdentityRulesResponse:
        rules = Rules.from_proto(request.rules, where="rules")
        applied = await self.domain.set_rules(rules)
        return service_pb2.UpdateIdentityRulesResponse(rules=applied.to_proto())

    async def MatchRecords(
        self, request: service_pb2.MatchRecordsRequest, context: Any
    ) -> service_pb2.MatchRecordsResponse:
        if len(request.records) < 2:
            raise InvalidArgument.for_field("records", "at least two records are needed")
        configured = self.domain.graph.rules.matching
        if request.HasField("settings"):
            settings = settings_from_proto(request.settings)
        elif configured is not None and configured.comparisons:
            settings = settings_from_proto(configured, field="rules.matching")
        else:
            settings = DEFAULT
        if request.HasField("threshold"):
            if not 0 < request.threshold < 1:
                raise InvalidArgument.for_field("threshold", "must be between 0 and 1")
            settings = settings.model_copy(update={"match_threshold": request.threshold})
        rows = records_from_proto(request.records)
        result = await asyncio.to_thread(
            match_records,
            rows,
            settings=settings,
            id_column=RECORD_ID_COLUMN,
            source_column=SOURCE_COLUMN,
        )
        return result_to_proto(result)
