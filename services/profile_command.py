"""``profilemesh profile TYPE:VALUE``: a person's unified profile, readably.

::

    profilemesh profile email:ann@example.com
    profilemesh profile anonymous_id:7f0c... --events 5
    profilemesh profile --profile-id 0f6c... --json

Asks activation's GetUnifiedProfile, like any client. Exit status: 0 when found, 1 when no
profile has the identifier or a service refused, 2 for a malformed identifier.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import json_format

from profilemesh.activation.v1 import activation_service_pb2, activation_service_pb2_grpc
from profilemesh.common.v1 import identifier_pb2, profile_pb2
from profilemesh.shared.channel import channel_to
from profilemesh.shared.settings import Settings


def add_profile_parser(commands: Any) -> None:
    profile = commands.add_parser("profile", help="show a person's unified profile")
    profile.add_argument("identifier", nargs="?", metavar="TYPE:VALUE")
    profile.add_argument("--profile-id", help="look up by profile id instead")
    profile.add_argument("--events", type=int, default=10, help="recent events to show")
    profile.add_argument("--json", action="store_true", help="print the profile as JSON")


def run_profile(args: argparse.Namespace, settings: Settings) -> int:
    request = activation_service_pb2.GetUnifiedProfileRequest(recent_events_limit=args.events)
    if args.profile_id:
        request.profile_id = args.profile_id
    else:
        kind, separator, value = (args.identifier or "").partition(":")
        if not separator or not kind or not value:
            print(
                "profilemesh profile: give TYPE:VALUE, e.g. email:ann@example.com", file=sys.stderr
            )
            return 2
        request.identifier.CopyFrom(identifier_pb2.Identifier(type=kind, value=value))
    try:
        profile = asyncio.run(_fetch(request, settings))
    except grpc.aio.AioRpcError as error:
        print(f"profilemesh profile: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(profile), indent=2))
    else:
        print(render(profile))
    return 0


async def _fetch(
    request: activation_service_pb2.GetUnifiedProfileRequest, settings: Settings
) -> profile_pb2.UnifiedProfile:
    async with channel_to("activation", settings) as channel:
        stub = activation_service_pb2_grpc.ActivationServiceStub(channel)
        response = await stub.GetUnifiedProfile(request)
    profile: profile_pb2.UnifiedProfile = response.profile
    return profile


def _when(timestamp: Any) -> str:
    if not timestamp.seconds and not timestamp.nanos:
        return "-"
    return datetime.fromtimestamp(timestamp.seconds, UTC).strftime("%Y-%m-%d %H:%M")


def _value(value: profile_pb2.FeatureValue) -> str:
    kind = value.WhichOneof("value")
    if kind is None:
        return "-"
    shown = getattr(value, kind)
    if isinstance(shown, float):
        return f"{shown:,.4g}"
    return str(shown)


def render(profile: profile_pb2.UnifiedProfile) -> str:
    """The profile as sections of aligned lines."""
    lines = [f"profile {profile.profile_id}   created {_when(profile.created_at)}"]
    if profile.merged_profile_ids:
        lines.append(f"  merged: {', '.join(profile.merged_profile_ids)}")
    lines.append("identities")
    for identity in profile.identities:
        sources = ", ".join(identity.sources)
        lines.append(
            f"  {identity.identifier.type:<14} {identity.identifier.value:<36} "
            f"last seen {_when(identity.last_seen)}  {sources}"
        )
    traits = json_format.MessageToDict(profile.traits)
    if traits:
        lines.append("traits")
        lines.extend(f"  {name:<20} {json.dumps(value)}" for name, value in sorted(traits.items()))
    if profile.consents:
        lines.append("consent")
        for consent in profile.consents:
            state = "granted" if consent.granted else "denied"
            lines.append(f"  {consent.purpose:<20} {state}  ({consent.source or '-'})")
    if profile.features:
        lines.append("features")
        lines.extend(f"  {f.name:<28} {_value(f)}" for f in profile.features)
    if profile.scores:
        lines.append("scores")
        for score in profile.scores:
            lines.append(f"  {score.model:<20} {score.score:.3f}  (version {score.model_version})")
            for reason in score.reasons:
                lines.append(f"      {reason.contribution:+.3f}  {reason.feature}")
    if profile.clusters:
        lines.append("clusters")
        for cluster in profile.clusters:
            lines.append(f"  {cluster.clustering:<20} [{cluster.cluster_id}] {cluster.persona}")
    lines.append("segments")
    if not profile.segments:
        lines.append("  (none)")
    for membership in profile.segments:
        lines.append(
            f"  {membership.segment_name or membership.segment_id:<28}"
            f" since {_when(membership.entered_at)}"
        )
    if profile.recent_events:
        lines.append("recent events")
        for event in profile.recent_events:
            lines.append(f"  {_when(event.timestamp)}  {event.name or '-'}")
    return "\n".join(lines)
