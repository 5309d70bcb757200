"""``profilemesh import``: run a source connector in the ingestion service and follow it.

::

    profilemesh import SOURCE --connector X [--config key=value ...] [--config-file FILE]
                       [--full-refresh] [--detach]

The configuration comes from ``--config-file`` (YAML or JSON), then each ``--config`` on top
of it: a value is read as JSON when it is JSON (``batch_size=500``, ``tags=["a"]``), else as
text (``path=/data/crm.csv``), and a dotted key nests (``mapping.record_id=id``). The command
starts the run, shows its progress until it ends and prints a summary. Exit status: 0 when the
run succeeded, 1 when it failed or was cancelled, 2 for bad arguments or an unreachable service.
Ctrl-C asks the service to cancel the run at its next checkpoint (start it again to resume).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from tqdm import tqdm

from profilemesh.common.v1 import job_pb2
from profilemesh.ingestion.v1 import (
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
    source_run_pb2,
)
from profilemesh.shared.channel import channel_to
from profilemesh.shared.settings import Settings

PROGRAM = "profilemesh import"
FINAL_STATES = frozenset(
    {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
)
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class UsageError(Exception):
    """Bad arguments: reported in one line, exit status 2."""


def add_import_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``import`` command to ``subparsers`` (from ``add_subparsers``); returns it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "import",
        help="read a source into ingestion through a connector plugin",
        description="Run a source connector in the ingestion service and follow its progress.",
    )
    parser.add_argument("source", help="name to ingest the items under, e.g. billing_db")
    parser.add_argument("--connector", required=True, help="connector plugin, e.g. csv")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a configuration value (JSON or text); dotted keys nest; repeatable",
    )
    parser.add_argument("--config-file", type=Path, help="configuration as a YAML or JSON object")
    parser.add_argument(
        "--full-refresh",
        action="store_true",
        help="ignore the stored checkpoint and read the source from the beginning",
    )
    parser.add_argument(
        "--detach", action="store_true", help="print the run id and return without waiting"
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=0.5, help="how often progress is asked for"
    )
    return parser


def run_import(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``profilemesh import`` with parsed ``args``; returns the exit status."""
    try:
        config = build_config(args.config_file, args.config)
    except UsageError as error:
        return _fail(str(error), 2)
    started: list[str] = []  # the run id, once known, for Ctrl-C
    try:
        return asyncio.run(_import(args, settings, config, started))
    except KeyboardInterrupt:
        if not started:
            return _fail("interrupted before the run started", 130)
        asyncio.run(_cancel(settings, started[0]))
        return _fail(
            f"interrupted: asked ingestion to cancel run {started[0]} at its next checkpoint; "
            f"run the same import again to resume",
            130,
        )


def build_config(config_file: Path | None, pairs: Sequence[str]) -> dict[str, Any]:
    """The configuration from ``config_file`` with each ``key=value`` of ``pairs`` on top."""
    config: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text())
        except OSError as error:
            raise UsageError(f"cannot read --config-file {config_file}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise UsageError(f"--config-file {config_file} is not YAML or JSON: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UsageError(f"--config-file {config_file} must hold an object (key: value)")
        config = loaded or {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals or not key or any(not part for part in key.split(".")):
            raise UsageError(f"--config {pair!r}: expected KEY=VALUE, e.g. batch_size=500")
        _set(config, key.split("."), _parse_value(text), pair)
    return config


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a path, a name, a DSN: plain text needs no quotes


def _set(config: dict[str, Any], keys: list[str], value: Any, pair: str) -> None:
    target = config
    for depth, key in enumerate(keys[:-1]):
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            prefix = ".".join(keys[: depth + 1])
            raise UsageError(f"--config {pair!r}: {prefix} is already set to a non-object value")
    target[keys[-1]] = value


async def _import(
    args: argparse.Namespace, settings: Settings, config: dict[str, Any], started: list[str]
) -> int:
    target = settings.services.of("ingestion").target
    request = ingestion_service_pb2.StartSourceRunRequest(
        connector=args.connector, source=args.source, full_refresh=args.full_refresh
    )
    try:
        json_format.ParseDict(config, request.config)
    except json_format.ParseError as error:
        return _fail(f"the configuration is not JSON: {error}", 2)
    async with channel_to("ingestion", settings) as channel:
        stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
        try:
            run = (await stub.StartSourceRun(request)).run
        except grpc.aio.AioRpcError as error:
            return _fail(_rpc_problem(error, target), 2)
        started.append(run.run_id)
        if args.detach:
            print(run.run_id)
            return 0
        try:
            run = await _follow(stub, run, args.poll_seconds)
        except grpc.aio.AioRpcError as error:
            return _fail(f"lost track of run {run.run_id}: {_rpc_problem(error, target)}", 2)
    print(summary(run))
    return 0 if run.state == job_pb2.JOB_STATE_SUCCEEDED else 1


async def _follow(
    stub: ingestion_service_pb2_grpc.IngestionServiceStub,
    run: source_run_pb2.SourceRun,
    poll_seconds: float,
) -> source_run_pb2.SourceRun:
    """Poll the run until it is final, showing items read on a progress bar (on a terminal)."""
    with tqdm(desc=f"{run.source} ({run.connector})", unit=" items", disable=None) as bar:
        while True:
            bar.update(run.items_read - bar.n)
            bar.set_postfix(
                accepted=run.items_accepted,
                duplicates=run.items_duplicate,
                rejected=run.items_rejected,
                refresh=False,
            )
            if run.state in FINAL_STATES:
                return run
            await asyncio.sleep(poll_seconds)
            request = ingestion_service_pb2.GetSourceRunRequest(run_id=run.run_id)
            run = (await stub.GetSourceRun(request)).run


async def _cancel(settings: Settings, run_id: str) -> None:
    async with channel_to("ingestion", settings) as channel:
        stub = ingestion_service_pb2_grpc.IngestionServiceStub(channel)
        try:
            await stub.CancelSourceRun(ingestion_service_pb2.CancelSourceRunRequest(run_id=run_id))
        except grpc.aio.AioRpcError as error:
            print(f"{PROGRAM}: could not cancel run {run_id}: {error.details()}", file=sys.stderr)


def summary(run: source_run_pb2.SourceRun) -> str:
    """What a finished run did, in a few lines: outcome, counters, first rejection reasons."""
    state = job_pb2.JobState.Name(run.state).removeprefix("JOB_STATE_").lower()
    lines = [
        f"run {run.run_id} {state}: read {run.items_read}, accepted {run.items_accepted}, "
        f"duplicates {run.items_duplicate}, rejected {run.items_rejected}"
    ]
    if run.error:
        lines.append(f"error: {run.error}")
    for reason in run.rejections:
        lines.append(f"  rejected {reason.field}: {reason.description}")
    if run.rejections and run.items_rejected > len(run.rejections):
        lines.append(f"  ... and {run.items_rejected - len(run.rejections)} more")
    return "\n".join(lines)


def _rpc_problem(error: grpc.aio.AioRpcError, target: str) -> str:
    """One line saying why a call failed, with the fields the service named."""
    code = error.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"cannot reach the ingestion service at {target}: is it running? ({code.name})"
    message = error.details() or code.name
    fields = [
        f"{violation.field}: {violation.description}"
        for violation in _field_violations(error)
        if violation.field and violation.field not in message
    ]
    return "; ".join([message, *fields])


def _field_violations(
    error: grpc.aio.AioRpcError,
) -> list[error_details_pb2.BadRequest.FieldViolation]:
    for key, value in error.trailing_metadata() or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        violations = []
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                violations.extend(bad_request.field_violations)
        return violations
    return []


def _fail(message: str, status: int) -> int:
    print(f"{PROGRAM}: {message}", file=sys.stderr)
    return status
