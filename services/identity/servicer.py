"""gRPC adapter of the identity service: protobuf in, protobuf out, no business logic."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from profilemesh.common.v1 import identifier_pb2, job_pb2, profile_pb2
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

MAX_SUPPRESSIONS = 1000
"""Identifiers per SuppressIdentifiers / UnsuppressIdentifiers call."""
PURPOSE = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_CLOCK_SKEW_NS = 5 * 60 * 1_000_000_000
"""How far in the future a consent decision may be dated (clocks differ a little)."""
REPORTING_SERVICES = ("features", "scoring", "activation")
"""Services that report their part of a deletion (identity and ingestion are done here)."""

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
            consents = self.domain.consent.states(profile_id)
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
            consents=consents,
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

    # -- privacy -------------------------------------------------------------------------------

    def _target(self, request: Any) -> tuple[str | None, Identifier | None]:
        """The ``target`` oneof of a privacy request: a profile id or a normalised identifier."""
        which = request.WhichOneof("target")
        if which is None:
            raise InvalidArgument.for_field("target", "a profile_id or an identifier is required")
        if which == "profile_id":
            if not request.profile_id:
                raise InvalidArgument.for_field("profile_id", "must not be empty")
            return request.profile_id, None
        normalized = self._normalized(request.identifier, "identifier")
        if normalized is None:
            raise InvalidArgument.for_field("identifier", "not a valid identifier of its type")
        return None, normalized

    def _identifiers(self, values: Any) -> list[Identifier]:
        if not values:
            raise InvalidArgument.for_field("identifiers", "at least one is required")
        if len(values) > MAX_SUPPRESSIONS:
            raise InvalidArgument.for_field("identifiers", f"at most {MAX_SUPPRESSIONS}")
        found = []
        for index, value in enumerate(values):
            normalized = self._normalized(value, f"identifiers[{index}]")
            if normalized is None:
                raise InvalidArgument.for_field(f"identifiers[{index}]", "not a valid identifier")
            found.append(normalized)
        return found

    async def UpdateConsent(
        self, request: service_pb2.UpdateConsentRequest, context: Any
    ) -> service_pb2.UpdateConsentResponse:
        profile_id, identifier = self._target(request)
        if not request.consents:
            raise InvalidArgument.for_field("consents", "at least one decision is required")
        now = time.time_ns()
        decisions = []
        seen: set[str] = set()
        for index, state in enumerate(request.consents):
            purpose = state.purpose.strip()
            if not PURPOSE.fullmatch(purpose):
                raise InvalidArgument.for_field(
                    f"consents[{index}].purpose", "lower_snake_case, 1 to 64 characters"
                )
            if purpose in seen:
                raise InvalidArgument.for_field(
                    f"consents[{index}].purpose", f"{purpose!r} appears twice"
                )
            seen.add(purpose)
            updated_at = state.updated_at.ToNanoseconds() if state.HasField("updated_at") else now
            if updated_at > now + MAX_CLOCK_SKEW_NS:
                raise InvalidArgument.for_field(
                    f"consents[{index}].updated_at", "must not be in the future"
                )
            decisions.append((purpose, state.granted, updated_at, state.source or "api"))
        live, consents = await self.domain.update_consent(profile_id, identifier, decisions)
        return service_pb2.UpdateConsentResponse(profile_id=live, consents=consents)

    async def DeleteProfile(
        self, request: service_pb2.DeleteProfileRequest, context: Any
    ) -> service_pb2.DeleteProfileResponse:
        profile_id, identifier = self._target(request)
        job = await self.domain.delete(
            profile_id, identifier, request.reason, suppress=not request.skip_suppression
        )
        return service_pb2.DeleteProfileResponse(job=job)

    async def GetDeletion(
        self, request: service_pb2.GetDeletionRequest, context: Any
    ) -> service_pb2.GetDeletionResponse:
        if not request.job_id:
            raise InvalidArgument.for_field("job_id", "required")
        return service_pb2.GetDeletionResponse(job=await self.domain.deletion(request.job_id))

    async def ReportDeletionProgress(
        self, request: service_pb2.ReportDeletionProgressRequest, context: Any
    ) -> service_pb2.ReportDeletionProgressResponse:
        if not request.job_id:
            raise InvalidArgument.for_field("job_id", "required")
        if request.service not in REPORTING_SERVICES:
            raise InvalidArgument.for_field("service", f"one of {', '.join(REPORTING_SERVICES)}")
        if request.state not in (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED):
            raise InvalidArgument.for_field("state", "SUCCEEDED or FAILED")
        job = await self.domain.report_deletion(
            request.job_id, request.service, request.state, request.error
        )
        return service_pb2.ReportDeletionProgressResponse(job=job)

    async def SuppressIdentifiers(
        self, request: service_pb2.SuppressIdentifiersRequest, context: Any
    ) -> service_pb2.SuppressIdentifiersResponse:
        identifiers = self._identifiers(request.identifiers)
        await self.domain.suppress(identifiers, request.reason)
        return service_pb2.SuppressIdentifiersResponse(
            identifiers=[messages.identifier(i) for i in identifiers]
        )

    async def UnsuppressIdentifiers(
        self, request: service_pb2.UnsuppressIdentifiersRequest, context: Any
    ) -> service_pb2.UnsuppressIdentifiersResponse:
        identifiers = self._identifiers(request.identifiers)
        removed = await self.domain.unsuppress(identifiers, request.reason)
        return service_pb2.UnsuppressIdentifiersResponse(removed_count=removed)
