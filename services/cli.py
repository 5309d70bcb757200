"""The ``profilemesh`` command: serve one service, run the whole mesh, ask how it is."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from profilemesh.services.audit_command import add_audit_parser, run_audit
from profilemesh.services.certs_command import add_certs_parser, run_certs
from profilemesh.services.generator.command import add_generate_parser, run_generate
from profilemesh.services.import_command import add_import_parser, run_import
from profilemesh.services.privacy_commands import add_privacy_parsers, run_privacy_command
from profilemesh.services.profile_command import add_profile_parser, run_profile
from profilemesh.services.records_command import add_records_parser, run_records
from profilemesh.services.scoring_commands import add_scoring_parsers, run_scoring_command
from profilemesh.services.token_commands import add_tokens_parser, run_tokens
from profilemesh.shared.settings import SERVICE_NAMES, Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="profilemesh",
        description="profilemesh: unified, real-time customer profiles as a mesh of gRPC services.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run one service in this process")
    serve.add_argument("service", choices=SERVICE_NAMES)
    serve.add_argument("--port", type=int, help="listen here instead of the configured port")
    serve.add_argument(
        "--parent-pid", type=int, help="stop when this process (a supervisor) goes away"
    )

    up = commands.add_parser("up", help="run all five services on localhost until Ctrl-C")
    up.add_argument("--data-dir", type=Path, help="where the embedded backend keeps its data")
    up.add_argument(
        "--startup-timeout", type=float, default=60.0, help="seconds to wait for SERVING"
    )

    status = commands.add_parser("status", help="print every service's health")
    status.add_argument("--timeout", type=float, default=1.0, help="seconds per health check")
    status.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="check only the server at this address (a container's probe: 127.0.0.1:50051)",
    )

    commands.add_parser("plugins", help="list installed plugins and what they register")
    add_import_parser(commands)
    add_records_parser(commands)
    add_generate_parser(commands)
    add_scoring_parsers(commands)
    add_profile_parser(commands)
    add_privacy_parsers(commands)
    add_tokens_parser(commands)
    add_audit_parser(commands)
    add_certs_parser(commands)
    demo = commands.add_parser(
        "demo", help="run the whole mesh on generated data and write a report"
    )
    demo.add_argument(
        "--customers", type=int, default=5_000, help="customers to generate (default 5,000)"
    )
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=Path("profilemesh-data"),
        help="where everything the demo writes goes (default: ./profilemesh-data)",
    )
    demo.add_argument(
        "--keep-running", action="store_true", help="leave the mesh up after the report"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "certs":
        # Before the settings: the variables may already name the files about to be written.
        return run_certs(args)
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"profilemesh: invalid settings:\n{error}", file=sys.stderr)
        return 2
    if getattr(args, "data_dir", None) is not None and args.command != "demo":
        settings = settings.model_copy(update={"data_dir": args.data_dir})

    if args.command == "serve":
        from profilemesh.services.runner import serve_main

        return serve_main(args.service, settings, port=args.port, parent_pid=args.parent_pid)
    if args.command == "up":
        from profilemesh.services.mesh import run_mesh

        return asyncio.run(run_mesh(settings, sys.stdout, startup_timeout=args.startup_timeout))
    if args.command == "status":
        return asyncio.run(_status(settings, args.timeout, args.target))
    if args.command == "plugins":
        return _plugins(settings)
    if args.command == "import":
        return run_import(args, settings)
    if args.command == "records":
        return run_records(args)
    if args.command == "generate":
        return run_generate(args)
    if args.command == "demo":
        from profilemesh.services.demo.run import run_demo_command

        return run_demo_command(settings, args, sys.stdout)
    if args.command == "tokens":
        return run_tokens(args, settings)
    if args.command == "audit":
        return run_audit(args, settings)
    if args.command == "profile":
        return run_profile(args, settings)
    if args.command in ("forget", "suppress", "unsuppress", "consent"):
        return run_privacy_command(args, settings)
    if args.command in ("train", "score", "segments"):
        return run_scoring_command(args, settings)

    raise AssertionError(f"unhandled command {args.command}")


async def _status(settings: Settings, timeout: float, target: str | None = None) -> int:
    from profilemesh.shared.health_client import check_health

    names: Sequence[str] = SERVICE_NAMES if target is None else ("server",)
    targets = [settings.services.of(name).target for name in names] if target is None else [target]
    statuses = await asyncio.gather(
        *(check_health(address, settings, timeout=timeout) for address in targets)
    )
    for name, address, status in zip(names, targets, statuses, strict=True):
        print(f"{name:<11} {address:<21} {status}")
    return 0 if all(status == "SERVING" for status in statuses) else 1


def _plugins(settings: Settings) -> int:
    from profilemesh.shared.plugin_manager import create_plugin_manager

    plugins = create_plugin_manager(disabled=settings.disabled_plugins)
    for row in plugins.describe():
        print(row)
    for name in plugins.skipped:
        print(f"{name}: disabled")
    return 1 if plugins.failures else 0


if __name__ == "__main__":
    sys.exit(main())
