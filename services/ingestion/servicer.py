"""gRPC adapter of the ingestion service: protobuf in, protobuf out, no business logic.

``SendEvent``, ``SendEvents`` and ``StreamEvents`` receive their requests decoded as
``EncodedEvent``/``EncodedEvents`` (each event left as bytes; see ``event_views.proto``), which
the domain checks and stores without re-encoding. RPCs not built yet are inherited from the
generated base class, which answers UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

from google.protobuf import timestamp_pb2

from profilemesh.common.v1 import errors_pb2
from profilemesh.ingestion.v1 import (
    event_views_pb2,
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
    result_pb2,
)
from profilemesh.services.ingestion.domain import Ingestion
from profilemesh.services.ingestion.intake import EventsOutcome, RecordsOutcome
from profilemesh.services.ingestion.source_runs import SourceRuns
from profilemesh.services.ingestion.source_runs_servicer import SourceRunsServicer
from profilemesh.shared.errors import FieldViolation, InvalidArgument
from profilemesh.shared.settings import IngestionSettings

ACCEPTED = result_pb2.ITEM_STATUS_ACCEPTED
DUPLICATE = result_pb2.ITEM_STATUS_DUPLICATE
REJECTED = result_pb2.ITEM_STATUS_REJECTED

REQUEST_VIEWS = {
    "SendEvent": event_views_pb2.EncodedEvent,
    "SendEvents": event_views_pb2.EncodedEvents,
    "StreamEvents": event_views_pb2.EncodedEvents,
}
"""RPCs whose requests are decoded as wire-compatible views."""


def _violations(violations: Iterable[FieldViolation]) -> list[errors_pb2.FieldViolation]:
    return [errors_pb2.FieldViolation(field=v.field, description=v.description) for v in violations]


def event_results(outcome: EventsOutcome) -> list[result_pb2.EventResult]:
    """One result per event, in request order."""
    results = [
        result_pb2.EventResult(
            index=e.index,
            message_id=e.message_id,
            status=ACCEPTED,
            violations=_violations(e.flagged) if e.flagged else None,
        )
        for e in outcome.accepted
    ]
    results.extend(
        result_pb2.EventResult(index=e.index, message_id=e.message_id, status=DUPLICATE)
        for e in outcome.duplicates
    )
    results.extend(
        result_pb2.EventResult(
            index=e.index,
            message_id=e.message_id,
            status=REJECTED,
            violations=_violations(e.violations),
        )
        for e in outcome.rejected
    )
    if outcome.duplicates or outcome.rejected:
        results.sort(key=lambda result: result.index)
    return results


def _check_batch(
    events: list[bytes] | Any, limits: IngestionSettings, field: str = "events"
) -> None:
    if len(events) > limits.max_batch_events:
        raise InvalidArgument.for_field(
            field, f"{len(events)} events; a batch holds at most {limits.max_batch_events}"
        )
    size = sum(map(len, events))
    if size > limits.max_batch_bytes:
        raise InvalidArgument.for_field(
            field, f"{size} bytes; a batch holds at most {limits.max_batch_bytes}"
        )


class IngestionServicer(SourceRunsServicer, ingestion_service_pb2_grpc.IngestionServiceServicer):
    """Serves ``profilemesh.ingestion.v1.IngestionService`` over the ingestion domain."""

    def __init__(self, domain: Ingestion) -> None:
        self.domain = domain
        self.plans = domain.plans
        self.limits = domain.settings
        self.plugins = domain.plugins

    @property
    def source_runs(self) -> SourceRuns:
        """The domain's connector runs (the mixin's RPCs use them)."""
        return self.domain.source_runs

    async def SendEvent(
        self, request: event_views_pb2.EncodedEvent, context: Any
    ) -> ingestion_service_pb2.SendEventResponse:
        outcome = await self.domain.intake.send_events(
            [request.event],
            request.source,
            validate_only=request.validate_only,
            path="event",
            indexed=False,
        )
        if outcome.rejected:
            [rejected] = outcome.rejected
            raise InvalidArgument(
                "the event was rejected: "
                + "; ".join(f"{v.field}: {v.description}" for v in rejected.violations),
                violations=rejected.violations,
                reason="EVENT_REJECTED",
            )
        [result] = event_results(outcome)
        return ingestion_service_pb2.SendEventResponse(result=result)

    async def SendEvents(
        self, request: event_views_pb2.EncodedEvents, context: Any
    ) -> ingestion_service_pb2.SendEventsResponse:
        _check_batch(request.events, self.limits)
        outcome = await self.domain.intake.send_events(
            request.events, request.source, validate_only=request.validate_only
        )
        return ingestion_service_pb2.SendEventsResponse(
            results=event_results(outcome),
            accepted_count=len(outcome.accepted),
            duplicate_count=len(outcome.duplicates),
            rejected_count=len(outcome.rejected),
            flagged_count=sum(1 for e in outcome.accepted if e.flagged),
        )

    async def StreamEvents(
        self, requests: AsyncIterator[event_views_pb2.EncodedEvents], context: Any
    ) -> ingestion_service_pb2.StreamEventsResponse:
        response = ingestion_service_pb2.StreamEventsResponse()
        index = 0
        async for request in requests:
            _check_batch(request.events, self.limits, field=f"messages[{index}].events")
            outcome = await self.domain.intake.send_events(
                request.events, request.source, first_index=index
            )
            index += len(request.events)
            response.accepted_count += len(outcome.accepted)
            response.duplicate_count += len(outcome.duplicates)
            response.rejected_count += len(outcome.rejected)
            response.flagged_count += sum(1 for e in outcome.accepted if e.flagged)
            response.rejected.extend(
                result_pb2.EventResult(
                    index=e.index,
                    message_id=e.message_id,
                    status=REJECTED,
                    violations=_violations(e.violations),
                )
                for e in outcome.rejected
            )
        return response

    async def ImportRecords(
        self, request: ingestion_service_pb2.ImportRecordsRequest, context: Any
    ) -> ingestion_service_pb2.ImportRecordsResponse:
        _check_records_batch(request, self.limits)
        outcome = await self.domain.intake.import_records(
            request.records, validate_only=request.validate_only
        )
        return ingestion_service_pb2.ImportRecordsResponse(
            results=record_results(outcome),
            accepted_count=len(outcome.accepted),
            duplicate_count=len(outcome.duplicates),
            rejected_count=len(outcome.rejected),
        )

    # -- tracking plans --------------------------------------------------------------------

    async def CreateTrackingPlan(
        self, request: ingestion_service_pb2.CreateTrackingPlanRequest, context: Any
    ) -> ingestion_service_pb2.CreateTrackingPlanResponse:
        plan = self.plans.create(request.tracking_plan, _now())
        return ingestion_service_pb2.CreateTrackingPlanResponse(tracking_plan=plan)

    async def GetTrackingPlan(
        self, request: ingestion_service_pb2.GetTrackingPlanRequest, context: Any
    ) -> ingestion_service_pb2.GetTrackingPlanResponse:
        return ingestion_service_pb2.GetTrackingPlanResponse(
            tracking_plan=self.plans.get(request.name)
        )

    async def ListTrackingPlans(
        self, request: ingestion_service_pb2.ListTrackingPlansRequest, context: Any
    ) -> ingestion_service_pb2.ListTrackingPlansResponse:
        plans = self.plans.list()
        start = int(request.page_token or 0)
        size = request.page_size or 100
        page = plans[start : start + size]
        more = start + size < len(plans)
        return ingestion_service_pb2.ListTrackingPlansResponse(
            tracking_plans=page, next_page_token=str(start + size) if more else ""
        )

    async def UpdateTrackingPlan(
        self, request: ingestion_service_pb2.UpdateTrackingPlanRequest, context: Any
    ) -> ingestion_service_pb2.UpdateTrackingPlanResponse:
        plan = self.plans.update(request.tracking_plan, request.update_mask.paths, _now())
        return ingestion_service_pb2.UpdateTrackingPlanResponse(tracking_plan=plan)

    async def DeleteTrackingPlan(
        self, request: ingestion_service_pb2.DeleteTrackingPlanRequest, context: Any
    ) -> ingestion_service_pb2.DeleteTrackingPlanResponse:
        self.plans.delete(request.name)
        return ingestion_service_pb2.DeleteTrackingPlanResponse()

    # -- privacy -----------------------------------------------------------------------------

    async def SuppressIdentifiers(
        self, request: ingestion_service_pb2.SuppressIdentifiersRequest, context: Any
    ) -> ingestion_service_pb2.SuppressIdentifiersResponse:
        added = await self.domain.suppress([i.value for i in request.identifiers], request.reason)
        return ingestion_service_pb2.SuppressIdentifiersResponse(added_count=added)

    async def UnsuppressIdentifiers(
        self, request: ingestion_service_pb2.UnsuppressIdentifiersRequest, context: Any
    ) -> ingestion_service_pb2.UnsuppressIdentifiersResponse:
        removed = await self.domain.unsuppress([i.value for i in request.identifiers])
        return ingestion_service_pb2.UnsuppressIdentifiersResponse(removed_count=removed)

    async def PurgeIdentifiers(
        self, request: ingestion_service_pb2.PurgeIdentifiersRequest, context: Any
    ) -> ingestion_service_pb2.PurgeIdentifiersResponse:
        outcome = await self.domain.purge(request.job_id, [i.value for i in request.identifiers])
        return ingestion_service_pb2.PurgeIdentifiersResponse(
            purged_count=outcome.purged, scrubbed_source_run_count=outcome.scrubbed_source_runs
        )

    async def GetSuppressionStats(
        self, request: ingestion_service_pb2.GetSuppressionStatsRequest, context: Any
    ) -> ingestion_service_pb2.GetSuppressionStatsResponse:
        stats = await self.domain.suppression_stats()
        return ingestion_service_pb2.GetSuppressionStatsResponse(
            suppressed_count=stats.suppressed, dropped_count=stats.dropped
        )


def record_results(outcome: RecordsOutcome) -> list[result_pb2.RecordResult]:
    """One result per record, in request order."""
    results = [
        result_pb2.RecordResult(
            index=r.index, source=r.record.source, record_id=r.record.record_id, status=status
        )
        for status, group in ((ACCEPTED, outcome.accepted), (DUPLICATE, outcome.duplicates))
        for r in group
    ]
    results.extend(
        result_pb2.RecordResult(
            index=r.index,
            source=r.record.source,
            record_id=r.record.record_id,
            status=REJECTED,
            violations=_violations(r.violations),
        )
        for r in outcome.rejected
    )
    results.sort(key=lambda result: result.index)
    return results


def _check_records_batch(
    request: ingestion_service_pb2.ImportRecordsRequest, limits: IngestionSettings
) -> None:
    if len(request.records) > limits.max_batch_events:
        raise InvalidArgument.for_field(
            "records", f"{len(request.records)} records; at most {limits.max_batch_events}"
        )


def _now() -> timestamp_pb2.Timestamp:
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    return now
