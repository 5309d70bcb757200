"""Privacy requests from the command line, as a data-protection officer makes them.

::

    profilemesh forget email:ann@example.com --reason "ticket 4711"     # waits for the job
    profilemesh forget --job del_0123...                                 # a job's progress
    profilemesh suppress email:ann@example.com phone:+31612345678 --reason "asked by phone"
    profilemesh unsuppress email:ann@example.com --reason "signed up again"
    profilemesh consent email:ann@example.com email=yes sms=no

Each asks identity like any client would (the token needs ``privacy:admin``, or
``profiles:write`` for consent). Exit status: 0 done, 1 refused or failed, 2 malformed input.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import grpc

from profilemesh.common.v1 import identifier_pb2, job_pb2, profile_pb2
from profilemesh.identity.v1 import deletion_pb2, identity_service_pb2, identity_service_pb2_grpc
from profilemesh.shared.channel import channel_to
from profilemesh.shared.settings import Settings

YES = {"yes", "y", "true", "1", "granted"}
NO = {"no", "n", "false", "0", "denied", "withdrawn"}
POLL_SECONDS = 0.5


class UsageError(ValueError):
    """Malformed command-line input (exit status 2)."""


def add_privacy_parsers(commands: Any) -> None:
    forget = commands.add_parser(
        "forget", help="delete a person from every service and suppress their identifiers"
    )
    forget.add_argument("identifier", nargs="?", metavar="TYPE:VALUE")
    forget.add_argument("--reason", default="", help="e.g. the ticket of the erasure request")
    forget.add_argument(
        "--keep-unsuppressed", action="store_true", help="let later events create them again"
    )
    forget.add_argument("--job", help="show the progress of this deletion job instead")
    forget.add_argument("--no-wait", action="store_true", help="print the job id and return")
    forget.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")

    for name, help_text in (
        ("suppress", "drop every later event carrying these identifiers"),
        ("unsuppress", "accept events carrying these identifiers again"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("identifiers", nargs="+", metavar="TYPE:VALUE")
        command.add_argument("--reason", default="", help="kept with the change")

    consent = commands.add_parser("consent", help="record a person's consent decisions")
    consent.add_argument("identifier", metavar="TYPE:VALUE")
    consent.add_argument("decisions", nargs="+", metavar="PURPOSE=yes|no")
    consent.add_argument("--source", default="cli", help="where the decision came from")


def run_privacy_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(_run(args, settings))
    except UsageError as error:
        print(f"profilemesh {args.command}: {error}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as error:
        print(
            f"profilemesh {args.command}: {error.code().name}: {error.details()}", file=sys.stderr
        )
        return 1


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    async with channel_to("identity", settings) as channel:
        identity = identity_service_pb2_grpc.IdentityServiceStub(channel)
        if args.command == "forget":
            return await _forget(identity, args)
        if args.command == "consent":
            return await _consent(identity, args)
        identifiers = [parse_identifier(text) for text in args.identifiers]
        if args.command == "suppress":
            stored = await identity.SuppressIdentifiers(
                identity_service_pb2.SuppressIdentifiersRequest(
                    identifiers=identifiers, reason=args.reason
                )
            )
            for identifier in stored.identifiers:
                print(f"suppressed {identifier.type}:{identifier.value}")
            return 0
        removed = await identity.UnsuppressIdentifiers(
            identity_service_pb2.UnsuppressIdentifiersRequest(
                identifiers=identifiers, reason=args.reason
            )
        )
        print(f"{removed.removed_count} of {len(identifiers)} were suppressed and no longer are")
        return 0


async def _forget(
    identity: identity_service_pb2_grpc.IdentityServiceStub, args: argparse.Namespace
) -> int:
    if args.job:
        job = (
            await identity.GetDeletion(identity_service_pb2.GetDeletionRequest(job_id=args.job))
        ).job
    else:
        if not args.identifier:
            raise UsageError("give TYPE:VALUE of the person, or --job JOB_ID")
        job = (
            await identity.DeleteProfile(
                identity_service_pb2.DeleteProfileRequest(
                    identifier=parse_identifier(args.identifier),
                    reason=args.reason,
                    skip_suppression=args.keep_unsuppressed,
                )
            )
        ).job
        print(f"deletion {job.job_id} started")
        deadline = time.monotonic() + args.timeout
        while not args.no_wait and job.state == job_pb2.JOB_STATE_RUNNING:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_SECONDS)
            job = (
                await identity.GetDeletion(
                    identity_service_pb2.GetDeletionRequest(job_id=job.job_id)
                )
            ).job
    print(render_job(job))
    return 0 if job.state in (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_RUNNING) else 1


async def _consent(
    identity: identity_service_pb2_grpc.IdentityServiceStub, args: argparse.Namespace
) -> int:
    states = []
    for text in args.decisions:
        purpose, separator, answer = text.partition("=")
        if not separator or answer.lower() not in YES | NO:
            raise UsageError(f"{text!r}: write PURPOSE=yes or PURPOSE=no")
        states.append(
            profile_pb2.ConsentState(
                purpose=purpose.strip(), granted=answer.lower() in YES, source=args.source
            )
        )
    response = await identity.UpdateConsent(
        identity_service_pb2.UpdateConsentRequest(
            identifier=parse_identifier(args.identifier), consents=states
        )
    )
    print(f"profile {response.profile_id}")
    for state in response.consents:
        answer = "granted" if state.granted else "refused"
        print(f"  {state.purpose:<16} {answer:<8} {state.source} {state.updated_at.ToJsonString()}")
    return 0


def parse_identifier(text: str) -> identifier_pb2.Identifier:
    kind, separator, value = text.partition(":")
    if not separator or not kind or not value:
        raise UsageError(f"{text!r}: write TYPE:VALUE, e.g. email:ann@example.com")
    return identifier_pb2.Identifier(type=kind, value=value)


def render_job(job: deletion_pb2.DeletionJob) -> str:
    """A deletion job, one line per service."""
    lines = [
        f"deletion {job.job_id}: {job_pb2.JobState.Name(job.state).removeprefix('JOB_STATE_')}"
        + (f" ({job.error})" if job.error else ""),
        f"  profile {job.profile_id}, suppressed: {'yes' if job.suppressed else 'no'}",
    ]
    for progress in job.services:
        state = job_pb2.JobState.Name(progress.state).removeprefix("JOB_STATE_")
        lines.append(
            f"  {progress.service:<11} {state}" + (f" {progress.error}" if progress.error else "")
        )
    return "\n".join(lines)
