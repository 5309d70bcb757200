"""gRPC adapter of the activation service: protobuf in, protobuf out, no business logic."""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import struct_pb2

from profilemesh.activation.v1 import activation_service_pb2 as service_pb2
from profilemesh.activation.v1 import activation_service_pb2_grpc
from profilemesh.services.activation import deliveries, segments
from profilemesh.services.activation.domain import Activation
from profilemesh.services.activation.segment_expressions import parse_segment
from profilemesh.shared.errors import InvalidArgument, NotFound
from profilemesh.shared.identity_lookup import IdentityLookup

DEFAULT_PAGE = 100
MAX_PAGE = 1_000


def _page(size: int, token: str) -> tuple[int, int]:
    if size < 0:
        raise InvalidArgument.for_field("page_size", "must not be negative")
    if token and not token.isdigit():
        raise InvalidArgument.for_field("page_token", "not a token this RPC gave")
    return int(token or 0), min(size or DEFAULT_PAGE, MAX_PAGE)


class ActivationServicer(activation_service_pb2_grpc.ActivationServiceServicer):
    """Serves ``profilemesh.activation.v1.ActivationService`` over the activation domain."""

    def __init__(self, domain: Activation, identity: IdentityLookup) -> None:
        self.domain = domain
        self.identity = identity

    async def _profile_id(self, request: Any) -> str:
        if request.WhichOneof("entity") == "identifier":
            return await self.identity.profile_id(request.identifier, "identifier")
        if not request.profile_id:
            raise InvalidArgument.for_field("profile_id", "set profile_id or identifier")
        with self.domain.lock:
            return self.domain.views.canonical(request.profile_id)

    # -- segments -----------------------------------------------------------------------------

    async def CreateSegment(
        self, request: service_pb2.CreateSegmentRequest, context: Any
    ) -> service_pb2.CreateSegmentResponse:
        segment = await self.domain.create_segment(request.segment, request.validate_only)
        return service_pb2.CreateSegmentResponse(segment=segment)

    async def GetSegment(
        self, request: service_pb2.GetSegmentRequest, context: Any
    ) -> service_pb2.GetSegmentResponse:
        return service_pb2.GetSegmentResponse(segment=self.domain.book.get(request.segment_id))

    async def ListSegments(
        self, request: service_pb2.ListSegmentsRequest, context: Any
    ) -> service_pb2.ListSegmentsResponse:
        start, size = _page(request.page_size, request.page_token)
        book = self.domain.book
        every = sorted(book.segments, key=lambda s: (book.segments[s].name, s))
        page = [book.get(s) for s in every[start : start + size]]
        more = start + size < len(every)
        return service_pb2.ListSegmentsResponse(
            segments=page, next_page_token=str(start + size) if more else ""
        )

    async def UpdateSegment(
        self, request: service_pb2.UpdateSegmentRequest, context: Any
    ) -> service_pb2.UpdateSegmentResponse:
        segment = await self.domain.update_segment(request.segment, list(request.update_mask.paths))
        return service_pb2.UpdateSegmentResponse(segment=segment)

    async def DeleteSegment(
        self, request: service_pb2.DeleteSegmentRequest, context: Any
    ) -> service_pb2.DeleteSegmentResponse:
        await self.domain.delete_segment(request.segment_id)
        return service_pb2.DeleteSegmentResponse()

    async def ListMembers(
        self, request: service_pb2.ListMembersRequest, context: Any
    ) -> service_pb2.ListMembersResponse:
        self.domain.book.get(request.segment_id)
        start, size = _page(request.page_size, request.page_token)
        with self.domain.lock:
            members = sorted(
                self.domain.book.members[request.segment_id].items(), key=lambda m: (m[1], m[0])
            )
        response = service_pb2.ListMembersResponse(total_size=len(members))
        for profile_id, entered_at in members[start : start + size]:
            member = response.members.add(profile_id=profile_id)
            member.entered_at.FromNanoseconds(entered_at)
        if start + size < len(members):
            response.next_page_token = str(start + size)
        return response

    async def GetMembership(
        self, request: service_pb2.GetMembershipRequest, context: Any
    ) -> service_pb2.GetMembershipResponse:
        profile_id = await self._profile_id(request)
        with self.domain.lock:
            live = self.domain.views.canonical(profile_id)
            found = self.domain.book.memberships_of(live)
            names = {s: self.domain.book.segments[s].name for s, _ in found}
        response = service_pb2.GetMembershipResponse(profile_id=live)
        for segment_id, entered_at in found:
            membership = response.memberships.add(
                segment_id=segment_id, segment_name=names[segment_id]
            )
            membership.entered_at.FromNanoseconds(entered_at)
        return response

    async def CountMembers(
        self, request: service_pb2.CountMembersRequest, context: Any
    ) -> service_pb2.CountMembersResponse:
        if request.WhichOneof("target") == "expression":
            catalog = await self.domain.catalog(request.expression)
            expression = parse_segment(request.expression, catalog, field="expression")

            def count() -> int:
                with self.domain.lock:
                    return sum(1 for view in self.domain.views.all() if expression.matches(view))

            return service_pb2.CountMembersResponse(count=await asyncio.to_thread(count))
        self.domain.book.get(request.segment_id)
        with self.domain.lock:
            return service_pb2.CountMembersResponse(
                count=len(self.domain.book.members[request.segment_id])
            )

    async def EvaluateSegments(
        self, request: service_pb2.EvaluateSegmentsRequest, context: Any
    ) -> service_pb2.EvaluateSegmentsResponse:
        evaluation = self.domain.start_evaluation(list(request.segment_ids))
        return service_pb2.EvaluateSegmentsResponse(evaluation=evaluation.message)

    async def GetSegmentEvaluation(
        self, request: service_pb2.GetSegmentEvaluationRequest, context: Any
    ) -> service_pb2.GetSegmentEvaluationResponse:
        found = self.domain.evaluations.get(request.evaluation_id)
        if found is None:
            raise NotFound("no such evaluation", violations=[("evaluation_id", "unknown")])
        return service_pb2.GetSegmentEvaluationResponse(evaluation=found.message)

    async def GetMembershipHistory(
        self, request: service_pb2.GetMembershipHistoryRequest, context: Any
    ) -> service_pb2.GetMembershipHistoryResponse:
        if not request.profile_id and not request.segment_id:
            raise InvalidArgument.for_field("profile_id", "set profile_id or segment_id")
        after, size = _page(request.page_size, request.page_token)
        rows = self.domain.store.read(
            lambda c: segments.history(
                c,
                profile_id=request.profile_id,
                segment_id=request.segment_id,
                start_ns=request.start_time.ToNanoseconds()
                if request.HasField("start_time")
                else 0,
                end_ns=request.end_time.ToNanoseconds() if request.HasField("end_time") else 0,
                after_seq=after,
                limit=size + 1,
            )
        )
        response = service_pb2.GetMembershipHistoryResponse()
        for seq, profile_id, segment_id, transition, occurred_at, message_id in rows[:size]:
            change = response.changes.add(
                profile_id=profile_id,
                segment_id=segment_id,
                transition=transition,
                message_id=message_id,
            )
            change.occurred_at.FromNanoseconds(occurred_at)
            last = seq
        if len(rows) > size:
            response.next_page_token = str(last)
        return response

    # -- destinations -------------------------------------------------------------------------

    async def ListActivators(
        self, request: service_pb2.ListActivatorsRequest, context: Any
    ) -> service_pb2.ListActivatorsResponse:
        response = service_pb2.ListActivatorsResponse()
        for name, cls in sorted(self.domain.plugins.activators().items()):
            schema = struct_pb2.Struct()
            schema.update(cls.config_model.model_json_schema())
            response.activators.add(name=name, description=cls.description, config_schema=schema)
        return response

    async def CreateDestination(
        self, request: service_pb2.CreateDestinationRequest, context: Any
    ) -> service_pb2.CreateDestinationResponse:
        created = await asyncio.to_thread(self.domain.create_destination, request.destination)
        return service_pb2.CreateDestinationResponse(destination=created)

    async def GetDestination(
        self, request: service_pb2.GetDestinationRequest, context: Any
    ) -> service_pb2.GetDestinationResponse:
        return service_pb2.GetDestinationResponse(
            destination=self.domain.get_destination(request.destination_id)
        )

    async def ListDestinations(
        self, request: service_pb2.ListDestinationsRequest, context: Any
    ) -> service_pb2.ListDestinationsResponse:
        start, size = _page(request.page_size, request.page_token)
        every = sorted(
            (
                d
                for d in self.domain.destinations.values()
                if not request.segment_id or d.segment_id == request.segment_id
            ),
            key=lambda d: (d.name, d.destination_id),
        )
        more = start + size < len(every)
        return service_pb2.ListDestinationsResponse(
            destinations=every[start : start + size],
            next_page_token=str(start + size) if more else "",
        )

    async def UpdateDestination(
        self, request: service_pb2.UpdateDestinationRequest, context: Any
    ) -> service_pb2.UpdateDestinationResponse:
        updated = await asyncio.to_thread(
            self.domain.update_destination, request.destination, list(request.update_mask.paths)
        )
        return service_pb2.UpdateDestinationResponse(destination=updated)

    async def DeleteDestination(
        self, request: service_pb2.DeleteDestinationRequest, context: Any
    ) -> service_pb2.DeleteDestinationResponse:
        await self.domain.delete_destination(request.destination_id)
        return service_pb2.DeleteDestinationResponse()

    async def ListDeadLetters(
        self, request: service_pb2.ListDeadLettersRequest, context: Any
    ) -> service_pb2.ListDeadLettersResponse:
        if request.page_size < 0:
            raise InvalidArgument.for_field("page_size", "must not be negative")
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        rows = await asyncio.to_thread(
            self.domain.dead_letters, request.destination_id, request.page_token, size + 1
        )
        response = service_pb2.ListDeadLettersResponse(
            dead_letters=[deliveries.delivery_message(row) for row in rows[:size]]
        )
        if len(rows) > size:
            response.next_page_token = rows[size - 1]["delivery_id"]
        return response

    async def RetryDeadLetters(
        self, request: service_pb2.RetryDeadLettersRequest, context: Any
    ) -> service_pb2.RetryDeadLettersResponse:
        count = await asyncio.to_thread(
            self.domain.retry_dead_letters, request.destination_id, list(request.delivery_ids)
        )
        return service_pb2.RetryDeadLettersResponse(retried_count=count)

    # -- the unified profile --------------------------------------------------------------------

    async def GetUnifiedProfile(
        self, request: service_pb2.GetUnifiedProfileRequest, context: Any
    ) -> service_pb2.GetUnifiedProfileResponse:
        limit = min(request.recent_events_limit or 20, 100)
        if request.WhichOneof("lookup") == "identifier":
            identifier = request.identifier
            if not identifier.type or not identifier.value:
                raise InvalidArgument.for_field("identifier", "type and value are required")
            profile = await self.domain.unified_profile(identifier=identifier, recent_events=limit)
        elif request.profile_id:
            profile = await self.domain.unified_profile(
                profile_id=request.profile_id, recent_events=limit
            )
        else:
            raise InvalidArgument.for_field("profile_id", "set profile_id or identifier")
        return service_pb2.GetUnifiedProfileResponse(profile=profile)
